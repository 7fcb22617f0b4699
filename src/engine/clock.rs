//! The one clock replicas judge time by: the store's. Each replica keeps the offset between its
//! own clock and the store's, measured at start and refreshed by the sweeper, so that reading
//! the time costs no round trip.

use crate::machine::Millis;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Default)]
pub struct Clock {
    /// Store time minus local time, in ms.
    offset: AtomicI64,
}

fn local_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Clock {
    pub fn now(&self) -> Millis {
        (local_now() + self.offset.load(Ordering::Relaxed)).max(0) as Millis
    }

    /// Calibrates against a store reading taken between `sent` and now (half the round trip is
    /// assumed to have passed when the store read its clock).
    pub fn calibrate(&self, store_now: Millis, sent: Instant) {
        let half_trip = (sent.elapsed().as_millis() / 2) as i64;
        let local = local_now() - half_trip;
        self.offset.store(store_now as i64 - local, Ordering::Relaxed);
    }
}
