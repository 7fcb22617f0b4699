//! Time on a manual clock: an engine given a `ManualClock` (on a private redis-server) parks a
//! run for an hour's sleep, a day's wait and a ten-minute back-off, and wakes each exactly when
//! the test moves the clock past it: nothing waits for the hour, the day or the ten minutes.

use crate::util::RedisServer;
use std::sync::Arc;
use std::time::Duration;
use workflow_orchestrator::config::Settings;
use workflow_orchestrator::definition::Registry;
use workflow_orchestrator::engine::{Engine, EngineConfig, ManualClock};
use workflow_orchestrator::machine::{Millis, Trigger};
use workflow_orchestrator::store::redis::RedisStore;

const WORKFLOWS: &str = r#"
[[workflow]]
id = "patient"
[[workflow.step]]
id = "nap"
action = "sleep"
with = { duration = "1h" }
[[workflow.step]]
id = "await"
action = "wait_for_event"
with = { event = "never.comes", timeout = "24h" }
[[workflow.step]]
id = "flaky"
action = "exec"
retry = { max_attempts = 2, initial_backoff = "10m", max_backoff = "10m", jitter = 0.0 }
with = { command = ["sh", "-c", "test -f \"$MARKER\" || { touch \"$MARKER\"; exit 1; }"], env = { MARKER = "{marker}" } }
"#;

const HOUR: Millis = 3_600_000;

#[test]
fn a_sleep_a_wait_and_a_back_off_end_when_the_manual_clock_passes_them() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("tried");
    let registry =
        Registry::parse("clock.toml", &WORKFLOWS.replace("{marker}", &marker.display().to_string())).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let store = RedisStore::connect(&redis.url(), "wfo", 4).await.expect("the test connects to Redis");
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let settings = Settings::from_lookup(|_| None).unwrap();
        let config = EngineConfig { clock: Some(clock.clone()), ..EngineConfig::from_settings(&settings) };
        let engine = Engine::new(Arc::new(store), Arc::new(registry), config).await.expect("an engine");
        engine.start();
        let run = engine.trigger("patient", &serde_json::json!({}), None, Trigger::Api).await.unwrap().run_id;
        let run_id: workflow_orchestrator::store::RunId = run.parse().unwrap();
        // The status after the engine had time to act (bounded): a few timer polls.
        let settle = |want: &'static str| {
            let engine = Arc::clone(&engine);
            let run_id = run_id.clone();
            async move {
                for _ in 0..100 {
                    let status = engine.summary(&run_id).await.unwrap().map(|s| s.status.name().to_owned());
                    if status.as_deref() == Some(want) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("the run never became {want}: {:?}", engine.summary(&run_id).await.unwrap());
            }
        };
        settle("sleeping").await;
        clock.advance(HOUR - 1_000);
        tokio::time::sleep(Duration::from_millis(600)).await;
        settle("sleeping").await; // a second short of the hour: still asleep
        clock.advance(1_000);
        settle("waiting").await;
        clock.advance(24 * HOUR);
        settle("retrying").await; // the wait timed out; `flaky` failed once, back-off 10 minutes
        clock.advance(10 * 60_000);
        settle("completed").await;
        let history = engine.history(&run_id).await.unwrap().unwrap();
        let kinds: Vec<&str> = history.iter().map(|l| l.recorded.transition.kind()).collect();
        assert_eq!(
            kinds,
            [
                "run_created",
                "step_started",
                "step_sleeping",
                "timer_fired",
                "step_completed",
                "step_started",
                "step_waiting",
                "timer_fired",
                "step_completed",
                "step_started",
                "step_failed",
                "timer_fired",
                "step_started",
                "step_completed",
                "run_completed"
            ]
        );
        // The records carry the manual clock's times: the hour, the day and the ten minutes.
        let first = history[0].recorded.at;
        let woke = history[3].recorded.at;
        assert!(woke - first >= HOUR, "woke {} ms after the start", woke - first);
        assert!(engine.shutdown().await);
    });
}
