use super::*;
use crate::definition::{ActionSpec, RetryPolicy, StepDef, WorkflowDef};
use proptest::prelude::*;
use std::time::Duration;

fn definition(steps: usize, max_attempts: u32) -> WorkflowDef {
    WorkflowDef {
        id: "wf".to_owned(),
        description: String::new(),
        schedule: None,
        timezone: None,
        catchup: Default::default(),
        catchup_window: std::time::Duration::from_secs(3600),
        overlap: Default::default(),
        events: Vec::new(),
        steps: (0..steps)
            .map(|i| StepDef {
                id: format!("s{i}"),
                action: ActionSpec::Noop,
                when: None,
                timeout: Duration::from_secs(1),
                retry: RetryPolicy { max_attempts, ..RetryPolicy::default() },
            })
            .collect(),
        search: Vec::new(),
    }
}

fn at(at: Millis, transition: Transition) -> Recorded {
    Recorded { at, replica: Some("r1".to_owned()), transition }
}

fn created() -> Recorded {
    at(
        1,
        Transition::RunCreated {
            workflow: "wf".to_owned(),
            definition: "h".to_owned(),
            input: "{}".to_owned(),
            trigger: Trigger::Api,
            trace: None,
        },
    )
}

/// What a driver may do next to a run: the choices a real engine (or an operator) has.
#[derive(Debug, Clone, Copy)]
enum Choice {
    Succeed,
    Fail,
    Cancel,
    TimeOut,
    /// Resume the run if it failed (an operator's retry).
    Resume,
    /// The step sleeps (a timer wakes it).
    Sleep,
    /// The step waits for an event (which arrives, or the time-out fires).
    Wait,
}

fn choice() -> impl Strategy<Value = Choice> {
    prop_oneof![
        6 => Just(Choice::Succeed),
        3 => Just(Choice::Fail),
        1 => Just(Choice::Cancel),
        1 => Just(Choice::TimeOut),
        1 => Just(Choice::Resume),
        1 => Just(Choice::Sleep),
        1 => Just(Choice::Wait),
    ]
}

/// Drives a run the way the engine does (through `advance` and `next`) and returns its whole log
/// with the state maintained incrementally along the way.
fn drive(def: &WorkflowDef, choices: &[Choice], jitter: f64) -> (Vec<Recorded>, RunState) {
    let mut now: Millis = 1;
    let mut outcome = advance(None, def, vec![created()], now).unwrap();
    let mut log = outcome.appended.clone();
    let mut state = outcome.state.clone();
    for choice in choices {
        now += 10;
        if state.status.is_terminal() {
            match (choice, &state.status, &state.last_error) {
                (Choice::Resume, Status::Failed, Some(err)) => {
                    let resumed = at(now, Transition::RunResumed { step: err.step, attempt: err.attempt + 1 });
                    outcome = advance(Some(&state), def, vec![resumed], now).unwrap();
                    log.extend(outcome.appended.iter().cloned());
                    state = outcome.state.clone();
                    continue;
                }
                _ => break,
            }
        }
        let happened = match (*choice, outcome.effects.first()) {
            (Choice::Cancel, _) => vec![at(now, Transition::RunCancelled { reason: "test".to_owned() })],
            (Choice::TimeOut, _) => vec![at(now, Transition::RunTimedOut)],
            (choice, Some(Effect::SetTimer { .. })) => {
                let (step, attempt) = state.status.step_attempt().unwrap();
                let completed = at(now, Transition::StepCompleted { step, attempt, output: "{}".to_owned() });
                match (&state.status, choice) {
                    // A parked step wakes (its event, or its timer) and completes in one commit.
                    (Status::Waiting { .. }, Choice::Succeed) => vec![
                        at(
                            now,
                            Transition::EventReceived {
                                step,
                                attempt,
                                event_id: "1-0".to_owned(),
                                payload: "{}".to_owned(),
                            },
                        ),
                        completed,
                    ],
                    (Status::Sleeping { .. } | Status::Waiting { .. }, _) => {
                        vec![at(now, Transition::TimerFired { step, attempt }), completed]
                    }
                    _ => vec![at(now, Transition::TimerFired { step, attempt })],
                }
            }
            (Choice::Sleep | Choice::Wait, Some(Effect::Dispatch { step, attempt })) => vec![
                at(now, Transition::StepStarted { step: *step, attempt: *attempt }),
                at(
                    now,
                    Transition::StepSuspended {
                        step: *step,
                        attempt: *attempt,
                        until: now + 100,
                        event: matches!(choice, Choice::Wait).then(|| "user.verified".to_owned()),
                    },
                ),
            ],
            (Choice::Succeed, Some(Effect::Dispatch { step, attempt })) => vec![
                at(now, Transition::StepStarted { step: *step, attempt: *attempt }),
                at(now, Transition::StepCompleted { step: *step, attempt: *attempt, output: "{}".to_owned() }),
            ],
            (Choice::Fail | Choice::Resume, Some(Effect::Dispatch { step, attempt })) => vec![
                at(now, Transition::StepStarted { step: *step, attempt: *attempt }),
                at(now, step_failure(def, &state, *step, *attempt, "boom".to_owned(), now, jitter)),
            ],
            (_, other) => panic!("a live run must have an effect, got {other:?} in {:?}", state.status),
        };
        outcome = advance(Some(&state), def, happened, now).unwrap();
        log.extend(outcome.appended.iter().cloned());
        state = outcome.state.clone();
        assert_eq!(state.seq as usize, log.len(), "seq counts the log");
    }
    (log, state)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn folding_the_log_equals_the_incremental_state(
        steps in 1usize..6,
        max_attempts in 1u32..4,
        choices in proptest::collection::vec(choice(), 0..40),
        jitter in -1.0f64..1.0,
    ) {
        let def = definition(steps, max_attempts);
        let (log, state) = drive(&def, &choices, jitter);
        let replayed = replay(&log).unwrap().unwrap();
        prop_assert_eq!(&replayed, &state);
        // Every prefix of a valid log folds too.
        for cut in 1..log.len() {
            prop_assert!(replay(&log[..cut]).is_ok());
        }
    }

    #[test]
    fn terminal_states_absorb_duplicates(
        steps in 1usize..4,
        choices in proptest::collection::vec(choice(), 40..60),
    ) {
        let def = definition(steps, 2);
        let (log, state) = drive(&def, &choices, 0.0);
        prop_assume!(state.status.is_terminal());
        for recorded in log.iter().skip(1).filter(|r| !matches!(r.transition, Transition::RunResumed { .. })) {
            prop_assert_eq!(apply(Some(&state), recorded).unwrap(), state.clone());
        }
        prop_assert!(apply(Some(&state), &log[0]).is_err(), "a second run_created is an error");
    }

    #[test]
    fn any_transition_in_any_state_is_a_value_never_a_panic(
        choices in proptest::collection::vec(choice(), 0..20),
        step in 0u32..4,
        attempt in 0u32..4,
        kind in 0usize..13,
    ) {
        let def = definition(3, 3);
        let (_, state) = drive(&def, &choices, 0.5);
        let transition = match kind {
            0 => Transition::StepStarted { step, attempt },
            1 => Transition::StepCompleted { step, attempt, output: "1".to_owned() },
            2 => Transition::StepFailed { step, attempt, error: "e".to_owned(), retry_at: Some(5) },
            3 => Transition::StepFailed { step, attempt, error: "e".to_owned(), retry_at: None },
            4 => Transition::TimerFired { step, attempt },
            5 => Transition::RunCompleted,
            6 => Transition::RunFailed { error: "e".to_owned() },
            7 => Transition::RunCancelled { reason: "r".to_owned() },
            8 => Transition::StepReused { step, output: "{}".to_owned() },
            9 => Transition::RunResumed { step, attempt },
            10 => Transition::StepSuspended { step, attempt, until: 5, event: None },
            11 => Transition::EventReceived { step, attempt, event_id: "1-0".to_owned(), payload: "{}".to_owned() },
            _ => Transition::RunTimedOut,
        };
        let result = apply(Some(&state), &at(99, transition.clone()));
        if let Ok(next_state) = &result
            && !state.status.is_terminal() {
                prop_assert_eq!(next_state.seq, state.seq + 1);
            }
        // Step transitions for an attempt that is not current are always rejected.
        let current = state.status.step_attempt();
        let step_level = matches!(kind, 0..=4 | 10 | 11);
        // A resume applies to a failed run only, for its failed step's next attempt.
        if kind == 9 {
            let resumable = matches!((&state.status, &state.last_error), (Status::Failed, Some(e)) if e.step == step && e.attempt + 1 == attempt);
            prop_assert_eq!(result.is_ok(), resumable, "{:?} in {:?}", transition, state.status);
        }
        if step_level && !state.status.is_terminal() && current != Some((step, attempt)) {
            prop_assert!(result.is_err(), "{:?} accepted in {:?}", transition, state.status);
        }
    }
}

#[test]
fn a_three_step_run_completes_through_advance() {
    let def = definition(3, 1);
    let (log, state) = drive(&def, &[Choice::Succeed; 3], 0.0);
    assert_eq!(state.status, Status::Completed);
    let kinds: Vec<&str> = log.iter().map(|r| r.transition.kind()).collect();
    assert_eq!(
        kinds,
        [
            "run_created",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "run_completed"
        ]
    );
}

#[test]
fn retries_follow_the_policy_then_the_run_fails_with_the_last_error() {
    let def = definition(1, 3);
    let (log, state) = drive(&def, &[Choice::Fail; 10], 0.0);
    assert_eq!(state.status, Status::Failed);
    let retries: Vec<Option<Millis>> = log
        .iter()
        .filter_map(|r| match &r.transition {
            Transition::StepFailed { retry_at, .. } => Some(*retry_at),
            _ => None,
        })
        .collect();
    assert_eq!(retries.len(), 3);
    assert!(retries[0].is_some() && retries[1].is_some() && retries[2].is_none());
    match &log.last().unwrap().transition {
        Transition::RunFailed { error } => assert!(error.contains("attempt 3") && error.contains("boom"), "{error}"),
        other => panic!("expected run_failed, got {other:?}"),
    }
}

#[test]
fn a_resumed_run_retries_its_failed_step_with_a_fresh_budget() {
    let def = definition(2, 2);
    use Choice::{Fail, Resume, Succeed};
    // A choice is spent on each timer firing too (the `Fail` after each retry).
    let choices = [Succeed, Fail, Fail, Fail, Resume, Fail, Fail, Fail, Resume, Succeed];
    let (log, state) = drive(&def, &choices, 0.0);
    assert_eq!(state.status, Status::Completed, "{log:#?}");
    let resumed: Vec<(u32, u32)> = log
        .iter()
        .filter_map(|r| match r.transition {
            Transition::RunResumed { step, attempt } => Some((step, attempt)),
            _ => None,
        })
        .collect();
    // Two attempts, failed; resumed at attempt 3 with two more; failed; resumed at attempt 5.
    assert_eq!(resumed, [(1, 3), (1, 5)]);
}

#[test]
fn a_rerun_reuses_outputs_then_runs_the_rest() {
    let def = definition(3, 1);
    let created = created();
    let reused = at(2, Transition::StepReused { step: 0, output: "{\"a\":1}".to_owned() });
    let outcome = advance(None, &def, vec![created, reused], 2).unwrap();
    assert_eq!(outcome.state.status, Status::Queued { step: 1, attempt: 1 });
    assert_eq!(outcome.effects, [Effect::Dispatch { step: 1, attempt: 1 }]);
}

#[test]
fn invalid_transitions_are_errors_not_panics() {
    let err = apply(None, &at(1, Transition::RunCompleted)).unwrap_err();
    assert_eq!(err.transition, "run_completed");
    let state = apply(None, &created()).unwrap();
    let err = apply(Some(&state), &at(2, Transition::StepCompleted { step: 0, attempt: 1, output: String::new() }))
        .unwrap_err();
    assert!(err.to_string().contains("not running"), "{err}");
    let err = apply(Some(&state), &at(2, Transition::RunCompleted)).unwrap_err();
    assert!(err.to_string().contains("work left"), "{err}");
}
