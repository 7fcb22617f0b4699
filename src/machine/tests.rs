use super::*;
use crate::definition::{ActionSpec, RetryPolicy, StepDef, WorkflowDef};
use proptest::prelude::*;
use std::time::Duration;

/// A workflow of `steps` steps, each following the one before it (no `needs`).
fn definition(steps: usize, max_attempts: u32) -> WorkflowDef {
    graph(&vec![None; steps], max_attempts)
}

/// A workflow whose step `i` needs `needs[i]` (`None`: the step before it).
fn graph(needs: &[Option<Vec<u32>>], max_attempts: u32) -> WorkflowDef {
    WorkflowDef {
        id: "wf".to_owned(),
        description: String::new(),
        schedule: None,
        timezone: None,
        catchup: Default::default(),
        catchup_window: std::time::Duration::from_secs(3600),
        overlap: Default::default(),
        events: Vec::new(),
        steps: needs
            .iter()
            .enumerate()
            .map(|(i, needs)| StepDef {
                id: format!("s{i}"),
                action: ActionSpec::Noop,
                when: None,
                timeout: Duration::from_secs(1),
                retry: RetryPolicy { max_attempts, ..RetryPolicy::default() },
                needs: needs.clone(),
            })
            .collect(),
        search: Vec::new(),
        result: None,
        concurrency: None,
        rate_limit: None,
        debounce: None,
    }
}

/// The diamond: `a`; `b` and `c` need `a`; `d` needs `b` and `c`.
fn diamond() -> WorkflowDef {
    graph(&[None, Some(vec![0]), Some(vec![0]), Some(vec![1, 2])], 2)
}

/// A random graph without cycles: each step needs a subset of the steps before it in a random
/// order, or (`None`) the step before it by index; then the indexes are shuffled, so that a step
/// may need a later one.
fn random_graph() -> impl Strategy<Value = WorkflowDef> {
    (1usize..7, 1u32..4)
        .prop_flat_map(|(steps, max_attempts)| {
            let needs =
                proptest::collection::vec(proptest::option::weighted(0.8, proptest::bits::u8::masked(0x3f)), steps);
            (
                needs,
                Just(steps).prop_perturb(|steps, mut rng| {
                    let mut order: Vec<u32> = (0..steps as u32).collect();
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.random_range(0..=i));
                    }
                    order
                }),
                Just(max_attempts),
            )
        })
        .prop_map(|(masks, order, max_attempts)| {
            // `order[k]` is the index of the k-th step in an order the graph respects.
            let mut needs = vec![None; order.len()];
            for (k, mask) in masks.iter().enumerate() {
                let step = order[k];
                let follows_previous = step > 0 && order[..k].contains(&(step - 1));
                needs[step as usize] = match mask {
                    Some(mask) => Some((0..k).filter(|j| mask & (1 << j) != 0).map(|j| order[j]).collect()),
                    // Without `needs` a step follows the one before it by index: acyclic only
                    // when that one comes earlier in the order.
                    None if follows_previous => None,
                    None => Some(Vec::new()),
                };
            }
            graph(&needs, max_attempts)
        })
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
    /// The step starts a child run (which later completes, on `Succeed`, or fails).
    Child,
    /// The step's `when` condition is false.
    Skip,
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
        1 => Just(Choice::Child),
        1 => Just(Choice::Skip),
    ]
}

/// What a drive saw besides the log: every step attempt an advance queued, in order, from the
/// last resume on (a resume queues again the steps left queued when the run failed, whose
/// entries were withdrawn then).
#[derive(Debug, Default)]
struct Seen {
    dispatched: Vec<(u32, u32)>,
}

/// Drives a run the way the engine does (through `advance`), acting each time on the live step
/// `pick` names among those that can move (queued, parked or retrying), and returns its whole
/// log with the state maintained incrementally along the way.
fn drive(def: &WorkflowDef, choices: &[(Choice, usize)], jitter: f64) -> (Vec<Recorded>, RunState, Seen) {
    let mut now: Millis = 1;
    let mut seen = Seen::default();
    let mut outcome = advance(None, def, vec![created()], now).unwrap();
    let mut log = outcome.appended.clone();
    let mut state = outcome.state.clone();
    let record = |seen: &mut Seen, effects: &[Effect]| {
        for effect in effects {
            if let Effect::Dispatch { step, attempt } = effect {
                seen.dispatched.push((*step, *attempt));
            }
        }
    };
    record(&mut seen, &outcome.effects);
    for (choice, pick) in choices {
        now += 10;
        if state.status.is_terminal() {
            match (choice, &state.status, &state.last_error) {
                (Choice::Resume, Status::Failed, Some(err)) => {
                    let resumed = at(now, Transition::RunResumed { step: err.step, attempt: err.attempt + 1 });
                    outcome = advance(Some(&state), def, vec![resumed], now).unwrap();
                    seen.dispatched.clear();
                    record(&mut seen, &outcome.effects);
                    log.extend(outcome.appended.iter().cloned());
                    state = outcome.state.clone();
                    continue;
                }
                _ => break,
            }
        }
        let movable: Vec<(u32, StepStatus)> = state
            .steps
            .iter()
            .filter(|(_, s)| !matches!(s, StepStatus::Completed | StepStatus::Failed { .. }))
            .map(|(step, s)| (*step, s.clone()))
            .collect();
        assert!(!movable.is_empty(), "a live run has a step that can move: {state:?}");
        let (step, status) = movable[pick % movable.len()].clone();
        let happened = match (*choice, status) {
            (Choice::Cancel, _) => vec![at(now, Transition::RunCancelled { reason: "test".to_owned() })],
            (Choice::TimeOut, _) => vec![at(now, Transition::RunTimedOut)],
            (choice, StepStatus::AwaitingChild { attempt, child }) => {
                let ending = match choice {
                    Choice::Succeed => ChildEnding::Completed { output: "{\"child\":1}".to_owned() },
                    Choice::Fail | Choice::Sleep => {
                        ChildEnding::Ended { status: Status::Failed, reason: "boom".to_owned() }
                    }
                    _ => ChildEnding::Ended { status: Status::Cancelled, reason: "operator".to_owned() },
                };
                child_ended(def, &state, step, attempt, &child, ending, now, jitter)
                    .into_iter()
                    .map(|t| at(now, t))
                    .collect()
            }
            (Choice::Skip, StepStatus::Queued { attempt }) => vec![
                at(now, Transition::StepStarted { step, attempt }),
                at(now, Transition::StepSkipped { step, attempt }),
            ],
            (Choice::Child, StepStatus::Queued { attempt }) => vec![
                at(now, Transition::StepStarted { step, attempt }),
                at(now, Transition::ChildStarted { step, attempt, child: format!("child-{step}-{attempt}") }),
            ],
            (Choice::Succeed, StepStatus::Waiting { attempt, .. }) => {
                event_arrived(step, attempt, "1-0", "user.verified", &serde_json::json!({}))
                    .into_iter()
                    .map(|t| at(now, t))
                    .collect()
            }
            (
                _,
                StepStatus::Sleeping { until, .. }
                | StepStatus::Waiting { until, .. }
                | StepStatus::Retrying { due: until, .. },
            ) => {
                // Its timer fires (with every other timer of the run due by then).
                now = now.max(until);
                timers_fired(&state, now).into_iter().flat_map(|(_, t)| t).map(|t| at(now, t)).collect()
            }
            (Choice::Sleep | Choice::Wait, StepStatus::Queued { attempt }) => vec![
                at(now, Transition::StepStarted { step, attempt }),
                at(
                    now,
                    Transition::StepSuspended {
                        step,
                        attempt,
                        until: now + 100,
                        event: matches!(choice, Choice::Wait).then(|| "user.verified".to_owned()),
                    },
                ),
            ],
            (Choice::Succeed, StepStatus::Queued { attempt }) => vec![
                at(now, Transition::StepStarted { step, attempt }),
                at(now, Transition::StepCompleted { step, attempt, output: "{}".to_owned() }),
            ],
            (Choice::Fail | Choice::Resume, StepStatus::Queued { attempt }) => vec![
                at(now, Transition::StepStarted { step, attempt }),
                at(now, step_failure(def, &state, step, attempt, "boom".to_owned(), now, jitter)),
            ],
            (_, other) => panic!("{other:?} is never durable"),
        };
        outcome = advance(Some(&state), def, happened, now).unwrap();
        record(&mut seen, &outcome.effects);
        log.extend(outcome.appended.iter().cloned());
        state = outcome.state.clone();
        assert_eq!(state.seq as usize, log.len(), "seq counts the log");
    }
    (log, state, seen)
}

fn choices(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<(Choice, usize)>> {
    proptest::collection::vec((choice(), 0usize..8), len)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, max_global_rejects: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn folding_the_log_equals_the_incremental_state(
        def in random_graph(),
        choices in choices(0..60),
        jitter in -1.0f64..1.0,
    ) {
        let (log, state, _) = drive(&def, &choices, jitter);
        let replayed = replay(&log, &def).unwrap().unwrap();
        prop_assert_eq!(&replayed, &state);
        // Every prefix of a valid log folds too.
        for cut in 1..log.len() {
            prop_assert!(replay(&log[..cut], &def).is_ok());
        }
    }

    #[test]
    fn a_step_never_starts_before_its_needs_and_each_attempt_is_queued_once(
        def in random_graph(),
        choices in choices(0..60),
    ) {
        let (log, _, seen) = drive(&def, &choices, 0.0);
        let mut completed = std::collections::HashSet::new();
        for recorded in &log {
            match &recorded.transition {
                Transition::StepStarted { step, .. } => {
                    for need in def.needs(*step) {
                        prop_assert!(completed.contains(&need), "step {} started before its need {}: {:#?}", step, need, log);
                    }
                }
                Transition::StepCompleted { step, .. } | Transition::StepReused { step, .. } | Transition::StepSkipped { step, .. } => {
                    completed.insert(*step);
                }
                _ => {}
            }
        }
        let mut queued = seen.dispatched.clone();
        queued.sort_unstable();
        let before = queued.len();
        queued.dedup();
        prop_assert_eq!(queued.len(), before, "a step attempt queued twice: {:?}", seen.dispatched);
    }

    #[test]
    fn every_order_of_completing_siblings_reaches_the_same_state(
        def in random_graph(),
        first in proptest::collection::vec(0usize..8, 0..40),
        second in proptest::collection::vec(0usize..8, 0..40),
    ) {
        // Every step succeeds, in two orders: the same end (but the times and who did it).
        let run = |picks: &[usize]| {
            let mut choices: Vec<(Choice, usize)> = picks.iter().map(|p| (Choice::Succeed, *p)).collect();
            choices.extend(std::iter::repeat_n((Choice::Succeed, 0), def.steps.len()));
            drive(&def, &choices, 0.0).1
        };
        let (a, b) = (run(&first), run(&second));
        prop_assert_eq!(a.status, Status::Completed);
        prop_assert_eq!((&a.status, &a.steps, a.seq), (&b.status, &b.steps, b.seq));
    }

    #[test]
    fn a_siblings_outcome_computed_on_an_older_state_applies_on_the_newer_one(
        def in random_graph(),
        picks in proptest::collection::vec(0usize..8, 1..30),
    ) {
        // Two queued steps ran at once from the same state; one committed first. The other's
        // outcome, re-applied on the state that commit made, is taken (the work is not redone),
        // and the two queue each later step once between them. Checked at every state of a run
        // whose steps all succeed, in the order `picks` says.
        let outcome = |(step, attempt): (u32, u32)| vec![
            at(500, Transition::StepStarted { step, attempt }),
            at(500, Transition::StepCompleted { step, attempt, output: "{}".to_owned() }),
        ];
        let mut checked = 0;
        for cut in 0..picks.len() {
            let choices: Vec<(Choice, usize)> = picks[..cut].iter().map(|p| (Choice::Succeed, *p)).collect();
            let (_, state, _) = drive(&def, &choices, 0.0);
            let queued: Vec<(u32, u32)> = state.steps.iter().filter_map(|(s, st)| match st {
                StepStatus::Queued { attempt } => Some((*s, *attempt)),
                _ => None,
            }).collect();
            if queued.len() < 2 || state.status.is_terminal() {
                continue;
            }
            let (b, c) = (queued[picks[cut] % queued.len()], queued[(picks[cut] + 1) % queued.len()]);
            let after_b = advance(Some(&state), &def, outcome(b), 500).unwrap();
            let after_c = advance(Some(&after_b.state), &def, outcome(c), 500);
            prop_assert!(after_c.is_ok(), "{:?}", after_c);
            for effect in &after_c.unwrap().effects {
                if let Effect::Dispatch { step, attempt } = effect {
                    let queued_alone = after_b.effects.contains(&Effect::Dispatch { step: *step, attempt: *attempt });
                    prop_assert!(!queued_alone, "step {} attempt {} queued twice", step, attempt);
                }
            }
            checked += 1;
        }
        // Chains have no siblings.
        prop_assume!(checked > 0);
    }

    #[test]
    fn terminal_states_absorb_everything(
        def in random_graph(),
        choices in choices(40..80),
    ) {
        let (log, state, _) = drive(&def, &choices, 0.0);
        prop_assume!(state.status.is_terminal());
        for recorded in log.iter().skip(1).filter(|r| !matches!(r.transition, Transition::RunResumed { .. })) {
            prop_assert_eq!(apply(Some(&state), recorded, &def).unwrap(), state.clone());
        }
        prop_assert!(apply(Some(&state), &log[0], &def).is_err(), "a second run_created is an error");
    }

    #[test]
    fn any_transition_in_any_state_is_a_value_never_a_panic(
        def in random_graph(),
        choices in choices(0..20),
        step in 0u32..8,
        attempt in 0u32..4,
        kind in 0usize..14,
    ) {
        let (_, state, _) = drive(&def, &choices, 0.5);
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
            12 => Transition::StepSkipped { step, attempt },
            _ => Transition::RunTimedOut,
        };
        let result = apply(Some(&state), &at(99, transition.clone()), &def);
        if let Ok(next_state) = &result
            && !state.status.is_terminal() {
                prop_assert_eq!(next_state.seq, state.seq + 1);
            }
        // A resume applies to a failed run only, for its failed step's next attempt.
        if kind == 9 {
            let resumable = matches!((&state.status, &state.last_error), (Status::Failed, Some(e)) if e.step == step && e.attempt + 1 == attempt);
            prop_assert_eq!(result.is_ok(), resumable, "{:?} in {:?}", transition, state.status);
        }
        // Step transitions for an attempt the step is not at are always rejected.
        let at_attempt = state.steps.get(&step).and_then(StepStatus::attempt) == Some(attempt);
        if matches!(kind, 0..=4 | 10..=12) && !state.status.is_terminal() && !at_attempt {
            prop_assert!(result.is_err(), "{:?} accepted in {:?}", transition, state.steps);
        }
        // A step that was not reached never starts.
        if kind == 0 && !state.status.is_terminal() && !state.steps.contains_key(&step) {
            prop_assert!(result.is_err());
        }
    }
}

#[test]
fn a_three_step_run_completes_through_advance() {
    let def = definition(3, 1);
    let (log, state, _) = drive(&def, &[(Choice::Succeed, 0); 3], 0.0);
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
fn a_diamond_queues_its_middle_steps_together_and_its_last_once_both_completed() {
    let def = diamond();
    let created = advance(None, &def, vec![created()], 1).unwrap();
    assert_eq!(created.effects, [Effect::Dispatch { step: 0, attempt: 1 }]);
    let done = |state: &RunState, step: u32| {
        let happened = vec![
            at(2, Transition::StepStarted { step, attempt: 1 }),
            at(2, Transition::StepCompleted { step, attempt: 1, output: "{}".to_owned() }),
        ];
        advance(Some(state), &def, happened, 2).unwrap()
    };
    let a = done(&created.state, 0);
    assert_eq!(a.effects, [Effect::Dispatch { step: 1, attempt: 1 }, Effect::Dispatch { step: 2, attempt: 1 }]);
    assert_eq!(a.state.status, Status::Running);
    let c = done(&a.state, 2);
    assert_eq!(c.effects, [], "d waits for b");
    let b = done(&c.state, 1);
    assert_eq!(b.effects, [Effect::Dispatch { step: 3, attempt: 1 }]);
    let d = done(&b.state, 3);
    assert_eq!(d.state.status, Status::Completed);
    assert_eq!(d.appended.last().unwrap().transition, Transition::RunCompleted);
}

#[test]
fn a_step_failing_for_good_fails_the_run_while_its_sibling_sleeps() {
    let def = graph(&[Some(vec![]), Some(vec![])], 1);
    let created = advance(None, &def, vec![created()], 1).unwrap();
    let slept = vec![
        at(2, Transition::StepStarted { step: 0, attempt: 1 }),
        at(2, Transition::StepSuspended { step: 0, attempt: 1, until: 1000, event: None }),
    ];
    let sleeping = advance(Some(&created.state), &def, slept, 2).unwrap();
    assert_eq!(sleeping.effects, [Effect::SetTimer { due: 1000 }]);
    assert_eq!(sleeping.state.status, Status::Running, "its sibling is queued");
    let failed = vec![
        at(3, Transition::StepStarted { step: 1, attempt: 1 }),
        at(3, step_failure(&def, &sleeping.state, 1, 1, "boom".to_owned(), 3, 0.0)),
    ];
    let ended = advance(Some(&sleeping.state), &def, failed, 3).unwrap();
    assert_eq!(ended.state.status, Status::Failed);
    assert_eq!(ended.state.next_timer(), None, "a run that ended has nothing to wake for");
    assert!(timers_fired(&ended.state, 2000).is_empty());
}

#[test]
fn retries_follow_the_policy_then_the_run_fails_with_the_last_error() {
    let def = definition(1, 3);
    let (log, state, _) = drive(&def, &[(Choice::Fail, 0); 10], 0.0);
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
    let choices = [Succeed, Fail, Fail, Fail, Resume, Fail, Fail, Fail, Resume, Succeed].map(|c| (c, 0));
    let (log, state, _) = drive(&def, &choices, 0.0);
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
    assert_eq!(outcome.state.steps.get(&1), Some(&StepStatus::Queued { attempt: 1 }));
    assert_eq!(outcome.effects, [Effect::Dispatch { step: 1, attempt: 1 }]);
}

#[test]
fn invalid_transitions_are_errors_not_panics() {
    let def = definition(1, 1);
    let err = apply(None, &at(1, Transition::RunCompleted), &def).unwrap_err();
    assert_eq!(err.transition, "run_completed");
    let state = apply(None, &created(), &def).unwrap();
    let err =
        apply(Some(&state), &at(2, Transition::StepCompleted { step: 0, attempt: 1, output: String::new() }), &def)
            .unwrap_err();
    assert!(err.to_string().contains("not running"), "{err}");
    let err = apply(Some(&state), &at(2, Transition::RunCompleted), &def).unwrap_err();
    assert!(err.to_string().contains("work left"), "{err}");
}

#[test]
fn step_views_show_each_steps_own_status_attempts_and_times() {
    let def = diamond();
    let mut log = vec![created()];
    let mut state = apply(None, &log[0], &def).unwrap();
    let mut push = |state: &mut RunState, recorded: Recorded| {
        *state = apply(Some(state), &recorded, &def).unwrap();
        log.push(recorded);
    };
    push(&mut state, at(10, Transition::StepStarted { step: 0, attempt: 1 }));
    push(&mut state, at(20, Transition::StepCompleted { step: 0, attempt: 1, output: "1".to_owned() }));
    push(&mut state, at(30, Transition::StepStarted { step: 1, attempt: 1 }));
    push(&mut state, at(40, Transition::StepFailed { step: 1, attempt: 1, error: "e".to_owned(), retry_at: Some(90) }));
    let views = step_views(&state, &log, &def);
    let shown: Vec<(&str, u32, Option<Millis>, Option<Millis>)> =
        views.iter().map(|v| (v.status, v.attempts, v.started_at, v.ended_at)).collect();
    assert_eq!(
        shown,
        [
            ("completed", 1, Some(10), Some(20)),
            ("retrying", 1, Some(30), None),
            ("running", 0, None, None),
            ("pending", 0, None, None)
        ]
    );
    assert_eq!(views[1].error.as_deref(), Some("e"));
    assert_eq!(views[0].output.as_deref(), Some("1"));
}

#[test]
fn an_attempt_that_cannot_succeed_again_fails_for_good_whatever_its_budget() {
    let def = definition(1, 5);
    let state = apply(None, &created(), &def).unwrap();
    let failure = |retryable| Failure { error: "e".to_owned(), retryable };
    let retried = attempt_failed(&def, &state, 0, 1, failure(true), 10, 0.0);
    assert!(matches!(retried, Transition::StepFailed { retry_at: Some(_), .. }), "{retried:?}");
    let final_one = attempt_failed(&def, &state, 0, 1, failure(false), 10, 0.0);
    assert_eq!(final_one, Transition::StepFailed { step: 0, attempt: 1, error: "e".to_owned(), retry_at: None });
}

#[test]
fn a_step_delivered_past_the_limit_fails_for_good() {
    let def = definition(1, 5);
    assert_eq!(delivery_limit(&def, 0, 3, 3), None);
    let failure = delivery_limit(&def, 0, 4, 3).unwrap();
    assert!(!failure.retryable);
    assert!(failure.error.contains("`s0` was delivered 4 times") && failure.error.contains("limit 3"), "{failure:?}");
}

#[test]
fn status_names_round_trip_in_the_documented_order() {
    let names: Vec<&str> = Status::ALL.iter().map(Status::name).collect();
    assert_eq!(names, STATUS_NAMES);
    for status in Status::ALL {
        assert_eq!(Status::from_name(status.name()), Some(status));
    }
    assert_eq!(Status::from_name("done"), None);
}
