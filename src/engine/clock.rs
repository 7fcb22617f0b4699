//! The one clock replicas judge time by: the store's. Each replica keeps the offset between its
//! own clock and the store's, measured at start and refreshed by the sweeper, so that reading
//! the time costs no round trip. A test may give an engine a [`ManualClock`] instead (see
//! [`super::EngineConfig::clock`]): time then moves only when the test moves it.

use crate::machine::Millis;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// What an engine reads the time from.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Millis;

    /// Adjusts to a reading of the store's clock taken between `sent` and now.
    fn calibrate(&self, store_now: Millis, sent: Instant);
}

/// The store's clock, read locally: this machine's clock plus the offset last measured.
#[derive(Debug, Default)]
pub struct StoreClock {
    /// Store time minus local time, in ms.
    offset: AtomicI64,
}

fn local_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Clock for StoreClock {
    fn now(&self) -> Millis {
        (local_now() + self.offset.load(Ordering::Relaxed)).max(0) as Millis
    }

    /// Half the round trip is assumed to have passed when the store read its clock.
    fn calibrate(&self, store_now: Millis, sent: Instant) {
        let half_trip = (sent.elapsed().as_millis() / 2) as i64;
        let local = local_now() - half_trip;
        self.offset.store(store_now as i64 - local, Ordering::Relaxed);
    }
}

/// A clock that stands still until it is moved: for tests of what happens at a time (a
/// retry's back-off, a sleep's end, a wait's time-out) without waiting for it.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    pub fn new(at: Millis) -> ManualClock {
        ManualClock { now: AtomicU64::new(at) }
    }

    /// Moves the clock forward by `by` milliseconds.
    pub fn advance(&self, by: Millis) {
        self.now.fetch_add(by, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.now.load(Ordering::Relaxed)
    }

    /// A manual clock is the test's: readings of the store's clock do not move it.
    fn calibrate(&self, _store_now: Millis, _sent: Instant) {}
}
