//! The one path by which the engine records what happened to a run outside its executors (a
//! timer, an event, a child's end, an operator's cancel): load the run, let the caller decide from its state what
//! happened, advance the machine, commit; when another transition of the run committed first,
//! decide again on the new state. (An executor's outcome takes its own path, under its lease:
//! `executor::commit_outcome`.)

use super::executor::CommitPath;
use super::{Engine, LoadedRun};
use crate::machine::{self, Millis, RunState, Transition};
use crate::store::{CommitOutcome, RunId, StoreError};

/// How often a decision is made again after another transition of the run committed first.
const DECIDE_ATTEMPTS: usize = 5;

/// What recording on a run came to.
pub(super) enum Recording<T> {
    /// Committed: the run as it was before and as it is after, and what the decision noted
    /// beside its transitions.
    Applied { before: Box<LoadedRun>, after: Box<RunState>, note: T },
    /// Nothing to record: the decision found nothing (the run as it was), or the run is gone.
    Nothing(Option<Box<LoadedRun>>),
    /// Another transition of the run committed first, every time.
    KeptChanging,
}

impl Engine {
    /// Records on `run` the transitions `decide` finds in its state at a time (`None`: nothing
    /// happened), with what the machine decides follows, in one commit (`clear_timer`: the
    /// run's timer fired, or may be stale).
    pub(super) async fn record_on_run<T>(
        &self,
        run: &RunId,
        clear_timer: bool,
        mut decide: impl FnMut(&LoadedRun, Millis) -> Option<(Vec<Transition>, T)>,
    ) -> Result<Recording<T>, StoreError> {
        for _ in 0..DECIDE_ATTEMPTS {
            let Some(loaded) = self.load_for_loop(run).await? else { return Ok(Recording::Nothing(None)) };
            let now = self.clock.now();
            let Some((happened, note)) = decide(&loaded, now) else {
                return Ok(Recording::Nothing(Some(Box::new(loaded))));
            };
            let happened = happened.into_iter().map(|t| self.recorded(now, t)).collect();
            let advanced = machine::advance(Some(&loaded.state), &loaded.workflow.def, happened, now)
                .map_err(|err| StoreError::Corrupt { key: run.to_string(), problem: err.to_string() })?;
            let expected = loaded.state.seq;
            let after = advanced.state.clone();
            match self.commit_advanced(run, expected, None, advanced, clear_timer, CommitPath::Decided).await? {
                CommitOutcome::Applied { .. } => {
                    return Ok(Recording::Applied { before: Box::new(loaded), after: Box::new(after), note });
                }
                CommitOutcome::Stale => continue,
                CommitOutcome::Gone | CommitOutcome::LeaseLost => return Ok(Recording::Nothing(None)),
            }
        }
        Ok(Recording::KeptChanging)
    }
}
