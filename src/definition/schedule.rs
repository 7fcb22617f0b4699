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

/// What the catch-up policy makes of the fires missed since `last` (the newest fire any replica
/// handled), found at `now`: see [`Schedule::plan_catch_up`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUpPlan {
    /// The missed fires to start, oldest first.
    pub run: Vec<Millis>,
    /// The newest fire skipped: every missed fire up to it is skipped (all older than `run`).
    pub skipped_until: Option<Millis>,
    /// Under `skip`: fires too recent (within `grace` of `now`) to call missed yet, which
    /// running replicas may be about to handle; decided once their grace has passed.
    pub deferred: Vec<Millis>,
}

/// What to do with a fire while the schedule's previous run may be active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireDecision {
    Start,
    /// Keep it, to start when the previous run ends.
    Buffer,
    Skip,
}

/// The overlap policy for one fire: `previous_active` says whether the schedule's previous run
/// is still live, `buffered` whether a fire already waits.
pub fn decide_fire(overlap: Overlap, previous_active: bool, buffered: bool) -> FireDecision {
    match (overlap, previous_active) {
        (Overlap::Allow, _) | (_, false) => FireDecision::Start,
        (Overlap::Buffer, true) if !buffered => FireDecision::Buffer,
        (Overlap::Skip | Overlap::Buffer, true) => FireDecision::Skip,
    }
}

impl Schedule {
    /// Applies the catch-up policy to the fires missed since `last`, at `now`. Missed fires are
    /// found from the newest back rather than listed from `last`: after a long outage there are
    /// more of them than any bound, and listing only the oldest made `latest` run a stale fire,
    /// `all` look outside its window, and `skip` hand every fire past the bound to the normal
    /// path, which started them all.
    pub fn plan_catch_up(
        &self,
        catchup: Catchup,
        window: std::time::Duration,
        last: Millis,
        now: Millis,
        grace: std::time::Duration,
    ) -> CatchUpPlan {
        let newest_until = |until: Millis| self.latest_until(until).filter(|fire| *fire > last);
        match catchup {
            Catchup::Skip => {
                // A fire this recent may simply not be handled yet by replicas that are running:
                // it is neither started nor skipped until its grace has passed.
                let recent = now.saturating_sub(grace.as_millis() as u64);
                let skipped_until = newest_until(recent.saturating_sub(1));
                let deferred = self.fires_between(skipped_until.unwrap_or(last).max(last), now, 16);
                CatchUpPlan { run: Vec::new(), skipped_until, deferred }
            }
            Catchup::Latest => match newest_until(now) {
                Some(latest) => CatchUpPlan {
                    run: vec![latest],
                    skipped_until: newest_until(latest.saturating_sub(1)),
                    deferred: Vec::new(),
                },
                None => CatchUpPlan { run: Vec::new(), skipped_until: None, deferred: Vec::new() },
            },
            Catchup::All => {
                let window_start = now.saturating_sub(window.as_millis() as u64);
                let mut run = Vec::new();
                let mut cursor = now;
                while run.len() < MAX_CATCHUP {
                    match newest_until(cursor) {
                        Some(fire) if fire >= window_start => {
                            run.push(fire);
                            cursor = fire.saturating_sub(1);
                        }
                        _ => break,
                    }
                }
                run.reverse();
                let skipped_until = newest_until(run.first().map_or(now, |first| first.saturating_sub(1)));
                CatchUpPlan { run, skipped_until, deferred: Vec::new() }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MINUTE: Millis = 60_000;

    /// A fake clock's readings: the plans are pure functions of the times they are given.
    #[test]
    fn catch_up_after_an_outage_follows_the_policy() {
        let every_minute = Schedule::parse("* * * * *", None).unwrap();
        let (last, grace, day) = (100 * MINUTE, Duration::from_secs(2), Duration::from_secs(86_400));
        // Down from just after 100 min to 110 min + 30 s: fires 101..=110 were missed.
        let now = 110 * MINUTE + 30_000;
        let plan = every_minute.plan_catch_up(Catchup::Latest, day, last, now, grace);
        assert_eq!(plan, CatchUpPlan { run: vec![110 * MINUTE], skipped_until: Some(109 * MINUTE), deferred: vec![] });
        let plan = every_minute.plan_catch_up(Catchup::Skip, day, last, now, grace);
        assert_eq!(plan, CatchUpPlan { run: vec![], skipped_until: Some(110 * MINUTE), deferred: vec![] });
        let all = every_minute.plan_catch_up(Catchup::All, Duration::from_secs(5 * 60), last, now, grace);
        // Within a window of 5 minutes: 106..=110 run, 101..=105 skipped.
        assert_eq!(all.run, (106..=110).map(|m| m * MINUTE).collect::<Vec<_>>());
        assert_eq!(all.skipped_until, Some(105 * MINUTE));
        // A fire within the grace under `skip` is deferred, not skipped: a running replica may
        // be about to handle it.
        let just_after = 110 * MINUTE + 1_000;
        let plan = every_minute.plan_catch_up(Catchup::Skip, day, last, just_after, grace);
        assert_eq!((plan.skipped_until, plan.deferred), (Some(109 * MINUTE), vec![110 * MINUTE]));
        // Nothing missed: nothing to do.
        let plan = every_minute.plan_catch_up(Catchup::Latest, day, 110 * MINUTE, now, grace);
        assert_eq!(plan, CatchUpPlan { run: vec![], skipped_until: None, deferred: vec![] });
        // A year down under `all`: at most MAX_CATCHUP runs, the newest, the rest skipped.
        let year = 365 * 24 * 60 * MINUTE;
        let plan =
            every_minute.plan_catch_up(Catchup::All, Duration::from_secs(400 * 86_400), last, last + year, grace);
        assert_eq!(plan.run.len(), MAX_CATCHUP);
        assert_eq!(plan.run.last(), Some(&(last + year)));
        assert_eq!(plan.skipped_until, Some(plan.run[0] - MINUTE));
    }

    #[test]
    fn the_overlap_policy_decides_each_fire() {
        use FireDecision::*;
        for (overlap, active, buffered, decision) in [
            (Overlap::Skip, false, false, Start),
            (Overlap::Skip, true, false, Skip),
            (Overlap::Allow, true, true, Start),
            (Overlap::Buffer, true, false, Buffer),
            (Overlap::Buffer, true, true, Skip),
            (Overlap::Buffer, false, true, Start),
        ] {
            assert_eq!(
                decide_fire(overlap, active, buffered),
                decision,
                "{overlap:?} active {active} buffered {buffered}"
            );
        }
    }

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
