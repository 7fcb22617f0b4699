//! What operators do to runs: read them (replayed from their logs), cancel, retry (resume a
//! failed run at its failed step) and rerun (a new run of the same definition snapshot that
//! reuses the recorded outputs of the steps before a chosen one).

use super::record::Recording;
use super::{Engine, EngineError, Triggered};
use crate::definition::Workflow;
use crate::machine::{self, RunState, Status, Transition, Trigger};
use crate::store::{Commit, CommitOutcome, Logged, RunId, StoreError};
use std::sync::Arc;

/// How often an operator action retries after losing a race with the run's own progress.
const OPERATOR_ATTEMPTS: usize = 5;

/// A run as its log says it is.
#[derive(Debug, Clone)]
pub struct LoadedRun {
    pub id: RunId,
    pub log: Vec<Logged>,
    pub state: RunState,
    pub workflow: Arc<Workflow>,
}

impl Engine {
    /// Reads a run's log and folds it: the run's state by replay.
    pub async fn load(&self, run: &RunId) -> Result<Option<LoadedRun>, EngineError> {
        let Some(log) = self.store.history(run).await? else { return Ok(None) };
        self.fold(run, log).await
    }

    /// The run as it was right after its log entry `at` (a seq, from 1): the machine's fold of the
    /// log up to and including that entry, with that part of the log. `None` for no such run;
    /// an `at` past the end of the log is invalid.
    pub async fn load_at(&self, run: &RunId, at: u64) -> Result<Option<LoadedRun>, EngineError> {
        let Some(mut log) = self.store.history(run).await? else { return Ok(None) };
        let last = log.last().map_or(0, |l| l.seq);
        if at == 0 || at > last {
            return Err(EngineError::Invalid(format!("`at` must be a seq of the run's log, from 1 to {last}")));
        }
        log.retain(|l| l.seq <= at);
        self.fold(run, log).await
    }

    /// Folds `log` (the whole log of `run`, or its beginning) into the run's state.
    async fn fold(&self, run: &RunId, log: Vec<Logged>) -> Result<Option<LoadedRun>, EngineError> {
        let Some(first) = log.first() else { return Ok(None) };
        let Some(hash) = machine::definition_of(log.iter().map(|l| &l.recorded)) else {
            let problem = "the log does not start with `run_created`".to_owned();
            return Err(EngineError::CorruptLog { run: run.to_string(), entry: first.seq, problem });
        };
        let workflow = self.definition(run.shard, hash).await?;
        let state = match machine::replay(log.iter().map(|l| &l.recorded), &workflow.def) {
            Ok(Some(state)) => state,
            Ok(None) => return Ok(None),
            Err((index, err)) => {
                let entry = log.get(index).map_or(index as u64 + 1, |l| l.seq);
                return Err(EngineError::CorruptLog { run: run.to_string(), entry, problem: err.to_string() });
            }
        };
        Ok(Some(LoadedRun { id: run.clone(), log, state, workflow }))
    }

    /// [`Engine::load`] for the engine's loops, whose errors are the store's: a log that does not
    /// replay is corrupt data.
    pub(super) async fn load_for_loop(&self, run: &RunId) -> Result<Option<LoadedRun>, StoreError> {
        match self.load(run).await {
            Ok(loaded) => Ok(loaded),
            Err(EngineError::Store(err)) => Err(err),
            Err(other) => Err(StoreError::Corrupt { key: run.to_string(), problem: other.to_string() }),
        }
    }

    async fn load_existing(&self, run: &RunId) -> Result<LoadedRun, EngineError> {
        self.load(run).await?.ok_or_else(|| EngineError::UnknownRun(run.to_string()))
    }

    /// Cancels a live run. A step running now finishes, but its outcome is discarded by the
    /// fence; a step still queued is withdrawn.
    pub async fn cancel(&self, run: &RunId, reason: &str) -> Result<RunState, EngineError> {
        let recording = self.record_on_run(run, true, |loaded, _| {
            let cancelled = Transition::RunCancelled { reason: reason.to_owned() };
            (!loaded.state.status.is_terminal()).then(|| (vec![cancelled], ()))
        });
        match recording.await? {
            // The commit withdrew the run's queued steps; its children are cancelled too.
            Recording::Applied { before, after, .. } => {
                self.cancel_children(run, &before.state).await;
                Ok(*after)
            }
            Recording::Nothing(Some(loaded)) => {
                Err(EngineError::Conflict(format!("run {run} is already {}", loaded.state.status.name())))
            }
            Recording::Nothing(None) => Err(EngineError::UnknownRun(run.to_string())),
            Recording::KeptChanging => Err(EngineError::Conflict(format!("run {run} kept changing; try again"))),
        }
    }

    /// Resumes a failed run at its failed step, with a fresh retry budget.
    pub async fn retry(&self, run: &RunId) -> Result<RunState, EngineError> {
        for _ in 0..OPERATOR_ATTEMPTS {
            let loaded = self.load_existing(run).await?;
            let (step, attempt) = match (&loaded.state.status, &loaded.state.last_error) {
                (Status::Failed, Some(err)) => (err.step, err.attempt + 1),
                (status, _) => {
                    return Err(EngineError::Conflict(format!(
                        "only a failed run can be retried; run {run} is {}",
                        status.name()
                    )));
                }
            };
            let now = self.clock.now();
            let resumed = self.recorded(now, Transition::RunResumed { step, attempt });
            let advanced = machine::advance(Some(&loaded.state), &loaded.workflow.def, vec![resumed], now)
                .map_err(|err| EngineError::Conflict(err.to_string()))?;
            let dispatch = crate::store::Dispatch::of_effects(&advanced.effects);
            // Steps of the run still parked or retrying keep their timer.
            let timer = advanced.state.next_timer();
            let state = advanced.state.clone();
            let commit = Commit {
                run: run.clone(),
                expected_seq: loaded.state.seq,
                lease: None,
                records: advanced.appended,
                state: advanced.state,
                dispatch,
                timer,
                clear_timer: false,
            };
            match self.store.reopen(commit).await? {
                CommitOutcome::Applied { .. } => return Ok(state),
                CommitOutcome::Stale => continue,
                CommitOutcome::Gone | CommitOutcome::LeaseLost => {
                    return Err(EngineError::UnknownRun(run.to_string()));
                }
            }
        }
        Err(EngineError::Conflict(format!("run {run} kept changing; try again")))
    }

    /// Starts a new run of `run`'s definition snapshot, reusing the outputs it recorded for the
    /// steps that do not come after `from_step` (default: the first, so nothing is reused; in a
    /// workflow without `needs`, the steps before it), with `input` or the original input.
    pub async fn rerun(
        &self,
        run: &RunId,
        from_step: Option<&str>,
        input: Option<&serde_json::Value>,
    ) -> Result<Triggered, EngineError> {
        let loaded = self.load_existing(run).await?;
        let steps = &loaded.workflow.def.steps;
        let from = match from_step {
            None => 0,
            Some(id) => steps.iter().position(|s| s.id == id).ok_or_else(|| {
                let known: Vec<&str> = steps.iter().map(|s| s.id.as_str()).collect();
                EngineError::Invalid(format!(
                    "`fromStep`: the workflow has no step `{id}` (steps: {})",
                    known.join(", ")
                ))
            })? as u32,
        };
        let def = &loaded.workflow.def;
        let output_of = |step: u32| {
            loaded.log.iter().rev().find_map(|l| match machine::output_of(&l.recorded.transition) {
                Some((s, output)) if s == step => Some(output.to_owned()),
                _ => None,
            })
        };
        // Every step `from` comes after must have an output to reuse; the other steps that do
        // not come after it (parallel branches) are reused where they completed, else run again.
        let mut outputs: Vec<Option<String>> = Vec::with_capacity(steps.len());
        for step in 0..steps.len() as u32 {
            let reusable = step != from && !def.depends_on(step, from);
            let output = if reusable { output_of(step) } else { None };
            if output.is_none() && def.depends_on(from, step) {
                return Err(EngineError::Invalid(format!(
                    "`fromStep`: step `{}` has no recorded output in run {run} to reuse",
                    steps[step as usize].id
                )));
            }
            outputs.push(output);
        }
        // Each reused after the steps it needs (a step reused is one the run reached).
        let mut reused = Vec::new();
        let mut placed = vec![false; steps.len()];
        for _ in 0..steps.len() {
            for step in 0..steps.len() as u32 {
                let index = step as usize;
                if !placed[index] && outputs[index].is_some() && def.needs(step).all(|need| placed[need as usize]) {
                    placed[index] = true;
                    reused.push((step, outputs[index].clone().unwrap_or_default()));
                }
            }
        }
        let input = match input {
            Some(input) => input.clone(),
            None => serde_json::from_str(&loaded.state.input).unwrap_or_else(|_| serde_json::json!({})),
        };
        let trigger = Trigger::Rerun { run_id: run.to_string(), from_step: from };
        // The same shard as the source run: its definition snapshot is stored there.
        let origin = super::Origin { trigger, caller: None };
        self.start_run(&loaded.workflow, run.shard, &input, origin, reused, None).await
    }
}
