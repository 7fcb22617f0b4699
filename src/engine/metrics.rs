//! Per-workflow measurements of this replica, for `/metrics`: runs started, completed and
//! failed, and step durations as histograms.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the step duration buckets.
pub const STEP_BUCKETS: [f64; 14] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkflowMetrics {
    pub runs_started: u64,
    pub runs_completed: u64,
    pub runs_failed: u64,
    /// Cumulative counts per bucket of [`STEP_BUCKETS`] (then `+Inf` is `steps`).
    pub step_buckets: [u64; STEP_BUCKETS.len()],
    pub step_seconds: f64,
    pub steps: u64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// By workflow id. Updated once per step or run end; sections are a few additions long and
    /// never held across `.await`.
    workflows: Mutex<BTreeMap<String, WorkflowMetrics>>,
    /// Executors running a step now. Counted around the step itself, not from the executor
    /// semaphore: the claim loop holds every free permit while its read blocks.
    executors_busy: AtomicUsize,
}

/// An executor counted busy until this is dropped (however the step ends).
pub struct BusyExecutor<'a>(&'a AtomicUsize);

impl Drop for BusyExecutor<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    fn with(&self, workflow: &str, update: impl FnOnce(&mut WorkflowMetrics)) {
        let mut workflows = self.workflows.lock();
        match workflows.get_mut(workflow) {
            Some(metrics) => update(metrics),
            None => update(workflows.entry(workflow.to_owned()).or_default()),
        }
    }

    pub fn run_started(&self, workflow: &str) {
        self.with(workflow, |m| m.runs_started += 1);
    }

    pub fn run_ended(&self, workflow: &str, completed: bool) {
        self.with(workflow, |m| if completed { m.runs_completed += 1 } else { m.runs_failed += 1 });
    }

    pub fn step_took(&self, workflow: &str, took: Duration) {
        let seconds = took.as_secs_f64();
        self.with(workflow, |m| {
            for (bucket, bound) in m.step_buckets.iter_mut().zip(STEP_BUCKETS) {
                if seconds <= bound {
                    *bucket += 1;
                }
            }
            m.step_seconds += seconds;
            m.steps += 1;
        });
    }

    /// Counts an executor busy for as long as the returned guard lives.
    pub fn executor_busy(&self) -> BusyExecutor<'_> {
        self.executors_busy.fetch_add(1, Ordering::Relaxed);
        BusyExecutor(&self.executors_busy)
    }

    pub fn executors_busy(&self) -> usize {
        self.executors_busy.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Vec<(String, WorkflowMetrics)> {
        self.workflows.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_executor_is_busy_while_its_guard_lives() {
        let metrics = Metrics::default();
        assert_eq!(metrics.executors_busy(), 0);
        let first = metrics.executor_busy();
        let second = metrics.executor_busy();
        assert_eq!(metrics.executors_busy(), 2);
        drop(first);
        assert_eq!(metrics.executors_busy(), 1);
        drop(second);
        assert_eq!(metrics.executors_busy(), 0);
    }
}
