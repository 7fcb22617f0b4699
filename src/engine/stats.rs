//! Counts of recent runs for the dashboard's overview: how many runs were started in the last
//! hour and day, and how many of those have completed or failed, hour by hour. Read from the
//! run indexes by id only (a run id carries its creation time), never by loading runs.

use super::Engine;
use crate::machine::{Millis, Status};
use crate::store::{RunId, RunQuery, StoreError};

/// Ids read per index page.
const PAGE: usize = 500;
/// Most runs counted per series: beyond, the counts are lower bounds (`capped`).
pub const MAX_COUNTED: usize = 20_000;
const HOUR: Millis = 3_600_000;

/// Runs created in the last 24 hours: per hour (oldest first, the last one ending now),
/// started, and of those completed and failed by now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStats {
    pub now: Millis,
    /// The start of each of the 24 hours (the first 24 h before `now`).
    pub hours: Vec<Millis>,
    pub started: Vec<u64>,
    pub completed: Vec<u64>,
    pub failed: Vec<u64>,
    /// Some series had more runs than [`MAX_COUNTED`]: its counts are lower bounds.
    pub capped: bool,
}

impl Engine {
    pub async fn run_stats(&self) -> Result<RunStats, StoreError> {
        let now = self.clock.now();
        let first_hour = now.saturating_sub(24 * HOUR);
        let hours: Vec<Millis> = (0..24).map(|h| first_hour + h * HOUR).collect();
        let mut capped = false;
        let mut series = Vec::with_capacity(3);
        for status in [None, Some(Status::Completed), Some(Status::Failed)] {
            let mut counts = vec![0u64; 24];
            let mut cursor: Option<RunId> = None;
            let mut counted = 0;
            'pages: loop {
                let query = RunQuery { workflow: None, status, before: cursor.as_ref(), limit: PAGE };
                let page = self.store.list_runs(query).await?.runs;
                for run in &page {
                    let at = run.created_at();
                    if at < first_hour {
                        break 'pages;
                    }
                    let hour = ((at - first_hour) / HOUR).min(23) as usize;
                    counts[hour] += 1;
                    counted += 1;
                    if counted >= MAX_COUNTED {
                        capped = true;
                        break 'pages;
                    }
                }
                if page.len() < PAGE {
                    break;
                }
                cursor = page.last().cloned();
            }
            series.push(counts);
        }
        let failed = series.pop().unwrap_or_default();
        let completed = series.pop().unwrap_or_default();
        let started = series.pop().unwrap_or_default();
        Ok(RunStats { now, hours, started, completed, failed, capped })
    }
}
