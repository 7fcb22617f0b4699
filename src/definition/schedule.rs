//! Cron schedules: croner expressions (5 fields, or 6 with seconds first) in a time zone (UTC
//! unless the workflow names one), and the policies for missed and overlapping fires.
//! Pure: times come in as arguments.

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// What to do, after downtime, with the fires that were missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Catchup {
    /// Start nothing for missed fires.
    Skip,
    /// Start one run, for the latest missed fire.
    #[default]
    Latest,
    /// Start a run for every missed fire within `catchup_window` (at most [`MAX_CATCHUP`], the
    /// newest; older ones are skipped).
    All,
}

/// What to do with a fire while the previous run of the schedule is still active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Skip the fire (logged and counted).
    #[default]
    Skip,
    /// Start it anyway.
    Allow,
    /// Keep one fire waiting and start it when the previous run ends; further fires are skipped.
    Buffer,
}

/// Most runs `Catchup::All` starts for one outage.
pub const MAX_CATCHUP: usize = 1000;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    cron: croner::Cron,
    zone: chrono_tz::Tz,
}

impl Schedule {
    /// Parses `expression` in `zone` (an IANA name such as `Europe/Berlin`; `None` = UTC).
    pub fn parse(expression: &str, zone: Option<&str>) -> Result<Schedule, String> {
        use croner::parser::{CronParser, Seconds};
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expression)
            .map_err(|err| format!("`{expression}` is not a cron expression: {err}"))?;
        let zone = match zone {
            None => chrono_tz::UTC,
            Some(name) => {
                name.parse().map_err(|_| format!("`{name}` is not an IANA time zone (e.g. `UTC`, `Europe/Berlin`)"))?
            }
        };
        Ok(Schedule { cron, zone })
    }

    fn at(&self, millis: Millis) -> Option<DateTime<chrono_tz::Tz>> {
        Utc.timestamp_millis_opt(millis as i64).single().map(|t| t.with_timezone(&self.zone))
    }

    /// The first fire strictly after `after`.
    pub fn next_after(&self, after: Millis) -> Option<Millis> {
        let start = self.at(after)?;
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        Some(next.timestamp_millis() as Millis)
    }

    /// The newest fire at or before `until`.
    pub fn latest_until(&self, until: Millis) -> Option<Millis> {
        // Fires fall on whole seconds: search from the second `until` falls in.
        let start = self.at(until - until % 1000)?;
        let previous = self.cron.find_previous_occurrence(&start, true).ok()?;
        Some(previous.timestamp_millis() as Millis).filter(|fire| *fire <= until)
    }

    /// Fires in `(after, until]`, oldest first, at most `max`.
    pub fn fires_between(&self, after: Millis, until: Millis, max: usize) -> Vec<Millis> {
        let mut fires = Vec::new();
        let mut cursor = after;
        while fires.len() < max {
            match self.next_after(cursor) {
                Some(fire) if fire <= until => {
                    fires.push(fire);
                    cursor = fire;
                }
                _ => break,
            }
        }
        fires
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Millis = 60_000;

    #[test]
    fn five_and_six_field_expressions() {
        let every_five = Schedule::parse("*/5 * * * *", None).unwrap();
        assert_eq!(every_five.next_after(0), Some(5 * MINUTE));
        assert_eq!(every_five.fires_between(0, 16 * MINUTE, 10), vec![5 * MINUTE, 10 * MINUTE, 15 * MINUTE]);
        let every_two_seconds = Schedule::parse("*/2 * * * * *", None).unwrap();
        assert_eq!(every_two_seconds.fires_between(0, 7_000, 10), vec![2_000, 4_000, 6_000]);
        assert_eq!(every_two_seconds.fires_between(0, 100_000, 3).len(), 3);
    }

    #[test]
    fn the_latest_fire_until_a_time() {
        let every_two_seconds = Schedule::parse("*/2 * * * * *", None).unwrap();
        let t0 = 1_800_000_000_000; // a multiple of 2 s
        assert_eq!(every_two_seconds.latest_until(t0), Some(t0));
        assert_eq!(every_two_seconds.latest_until(t0 + 1), Some(t0));
        assert_eq!(every_two_seconds.latest_until(t0 + 1_999), Some(t0));
        assert_eq!(every_two_seconds.latest_until(t0 + 2_000), Some(t0 + 2_000));
        assert_eq!(every_two_seconds.latest_until(t0 - 1), Some(t0 - 2_000));
        let every_five = Schedule::parse("*/5 * * * *", None).unwrap();
        assert_eq!(every_five.latest_until(16 * MINUTE + 59_999), Some(15 * MINUTE));
        assert_eq!(every_five.latest_until(15 * MINUTE), Some(15 * MINUTE));
        // 02:00 Berlin on 1970-01-02 is 01:00 UTC that day.
        let berlin = Schedule::parse("0 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(berlin.latest_until(48 * 60 * MINUTE), Some((24 + 1) * 60 * MINUTE));
        // Agrees with the forward walk, across both of Berlin's 2027 clock changes (March 28,
        // when 02:00 does not exist, and October 31, when 02:00-03:00 happens twice).
        let spring = 1_806_000_000_000; // 2027-03-25
        let autumn = 1_824_700_000_000; // 2027-10-29
        let hourly_berlin = Schedule::parse("30 * * * *", Some("Europe/Berlin")).unwrap();
        for (schedule, from, span) in [
            (&every_two_seconds, t0, 60 * MINUTE),
            (&every_five, t0, 3 * 24 * 60 * MINUTE),
            (&berlin, spring, 10 * 24 * 60 * MINUTE),
            (&berlin, autumn, 10 * 24 * 60 * MINUTE),
            (&hourly_berlin, spring, 5 * 24 * 60 * MINUTE),
            (&hourly_berlin, autumn, 5 * 24 * 60 * MINUTE),
        ] {
            let fires = schedule.fires_between(from, from + span, 100_000);
            assert!(fires.len() > 2);
            assert_eq!(schedule.latest_until(fires[0]), Some(fires[0]));
            for pair in fires.windows(2) {
                assert_eq!(schedule.latest_until(pair[1] - 1), Some(pair[0]));
            }
        }
    }

    #[test]
    fn time_zones_shift_fires() {
        let utc = Schedule::parse("0 2 * * *", None).unwrap();
        let berlin = Schedule::parse("0 2 * * *", Some("Europe/Berlin")).unwrap();
        // 1970-01-01 is winter: Berlin is UTC+1, so 02:00 there is 01:00 UTC.
        assert_eq!(utc.next_after(0), Some(2 * 60 * MINUTE));
        assert_eq!(berlin.next_after(0), Some(60 * MINUTE));
        assert!(Schedule::parse("0 2 * * *", Some("Mars/Olympus")).is_err());
        assert!(Schedule::parse("61 * * * *", None).is_err());
    }
}
