//! Workflow definitions as plain data: the TOML format users write, its validation, the
//! registry of loaded workflows and the built-in Molochain workflows.
//!
//! Nothing here does I/O beyond reading the one file it is asked to read.

pub mod actions;
pub mod duration;
pub mod schedule;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use duration::{format_duration, parse_duration};
pub use schedule::{Catchup, Overlap, Schedule};

/// The built-in Molochain registry, used when `WORKFLOWS_FILE` is unset. Same format as users write.
const BUILTIN_WORKFLOWS: &str = include_str!("builtin.toml");
const BUILTIN_NAME: &str = "<built-in registry>";

/// What is wrong with a definition, and where: file, workflow, field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionError {
    pub file: String,
    pub workflow: Option<String>,
    pub field: Option<String>,
    pub problem: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(workflow) = &self.workflow {
            write!(f, ": workflow `{workflow}`")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// A validated workflow definition. Serialised as JSON it is the snapshot a run records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowDef {
    pub id: String,
    pub description: String,
    pub schedule: Option<String>,
    pub timezone: Option<String>,
    /// What to do with fires missed while no replica ran.
    pub catchup: Catchup,
    /// How far back `catchup = "all"` looks.
    #[serde(with = "duration::serde_human")]
    pub catchup_window: Duration,
    /// What to do with a fire while the schedule's previous run is still active.
    pub overlap: Overlap,
    pub events: Vec<String>,
    pub steps: Vec<StepDef>,
    /// Input fields a run is indexed by when it is created, so that its runs can be found by
    /// their values (`GET /api/runs?workflowId=W&input.<field>=<value>`). Left out of the
    /// snapshot when empty, so that workflows without it keep their definition hashes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// The step whose output is the run's result, which a parent of the run (a step with
    /// `action = "workflow"`) gets; `None`: the last step's. Left out of the snapshot when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// At most this many runs active at once (started, not ended), per key value when the key is
    /// set. Left out of the snapshot when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// At most this many run starts per period, per key value when the key is set. Left out of
    /// the snapshot when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Triggers (REST, events) of one key within `period` of each other start one run, `period`
    /// after the last of them, with its input. Left out of the snapshot when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce: Option<Debounce>,
}

/// `debounce = { period = "30s", key = "${input.serviceId}", max_wait = "5m" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debounce {
    #[serde(with = "duration::serde_human")]
    pub period: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The longest a burst is put off from its first trigger, so that triggers that never stop
    /// still start a run now and then; `None`: no bound.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "duration::serde_human_option")]
    pub max_wait: Option<Duration>,
}

/// The shortest and longest debounce periods (and `max_wait`s).
pub const MIN_DEBOUNCE: Duration = Duration::from_millis(100);
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(7 * 24 * 3600);

/// `rate_limit = { limit = 100, period = "1m", key = "${input.partner}" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub limit: u32,
    #[serde(with = "duration::serde_human")]
    pub period: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The largest rate limit, and the shortest and longest periods.
pub const MAX_RATE: u32 = 100_000;
pub const MIN_RATE_PERIOD: Duration = Duration::from_millis(100);
pub const MAX_RATE_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// `concurrency = { limit = 2 }` or `{ limit = 1, key = "${input.userId}" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    pub limit: u32,
    /// A text with `${input...}` templates: runs whose keys render alike share the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The largest concurrency limit.
pub const MAX_CONCURRENCY: u32 = 10_000;

/// The most input fields a workflow may index.
pub const MAX_SEARCH_FIELDS: usize = 8;
/// The longest input value that is indexed (a longer one is not).
pub const MAX_SEARCH_VALUE: usize = 256;

impl WorkflowDef {
    /// The step whose output is the run's result (see [`WorkflowDef::result`]).
    pub fn result_step(&self) -> u32 {
        let named = self.result.as_ref().and_then(|id| self.steps.iter().position(|s| &s.id == id));
        named.unwrap_or(self.steps.len().saturating_sub(1)) as u32
    }

    /// The steps `step` starts after (see [`StepDef::needs`]).
    pub fn needs(&self, step: u32) -> impl Iterator<Item = u32> + '_ {
        let explicit = self.steps.get(step as usize).and_then(|def| def.needs.as_deref());
        let implicit = (explicit.is_none() && step > 0).then(|| step - 1);
        explicit.unwrap_or(&[]).iter().copied().chain(implicit)
    }

    /// The steps that start with the run: those that need nothing.
    pub fn roots(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.steps.len() as u32).filter(|&step| self.needs(step).next().is_none())
    }

    /// Whether `step` comes after `ancestor` in the graph: needs it, or needs a step that does.
    pub fn depends_on(&self, step: u32, ancestor: u32) -> bool {
        let mut seen = vec![false; self.steps.len()];
        let mut stack: Vec<u32> = self.needs(step).collect();
        while let Some(next) = stack.pop() {
            if next == ancestor {
                return true;
            }
            if let Some(seen) = seen.get_mut(next as usize).filter(|seen| !**seen) {
                *seen = true;
                stack.extend(self.needs(next));
            }
        }
        false
    }

    /// The values a run with `input` is indexed by: `(field, value)` for each `search` field the
    /// input holds as a string (at most [`MAX_SEARCH_VALUE`] bytes), a number or a boolean,
    /// written as text (`7`, `true`), so that `input.userId=7` finds `{"userId": 7}` and
    /// `{"userId": "7"}` alike. Other values are not indexed.
    pub fn search_values(&self, input: &serde_json::Value) -> Vec<(String, String)> {
        self.search
            .iter()
            .filter_map(|field| {
                let value = match input.get(field)? {
                    serde_json::Value::String(text) if text.len() <= MAX_SEARCH_VALUE => text.clone(),
                    serde_json::Value::Number(number) => number.to_string(),
                    serde_json::Value::Bool(flag) => flag.to_string(),
                    _ => return None,
                };
                Some((field.clone(), value))
            })
            .collect()
    }
}

/// A concurrency or rate limit's key: 1-256 characters whose templates name the input only.
fn check_group_key(field: &'static str, key: Option<&str>) -> Result<(), (&'static str, String)> {
    let Some(key) = key else { return Ok(()) };
    if key.trim().is_empty() || key.len() > 256 {
        return Err((field, "must be 1-256 characters".to_owned()));
    }
    if let Some(other) = actions::templates(key).iter().find(|t| t.root() != "input") {
        return Err((field, format!("`${{{}}}`: a key is made of the run's input only (`${{input...}}`)", other.path)));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebounce {
    period: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    max_wait: Option<String>,
}

impl RawDebounce {
    fn validate(self) -> Result<Debounce, (&'static str, String)> {
        let bounded = |field: &'static str, text: &str| {
            let duration = parse_duration(text).map_err(|problem| (field, problem))?;
            if !(MIN_DEBOUNCE..=MAX_DEBOUNCE).contains(&duration) {
                return Err((field, "must be from 100ms to 7d".to_owned()));
            }
            Ok(duration)
        };
        let period = bounded("debounce.period", &self.period)?;
        let max_wait = self.max_wait.map(|text| bounded("debounce.max_wait", &text)).transpose()?;
        if max_wait.is_some_and(|max_wait| max_wait < period) {
            return Err(("debounce.max_wait", "must be at least the period".to_owned()));
        }
        check_group_key("debounce.key", self.key.as_deref())?;
        Ok(Debounce { period, key: self.key, max_wait })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    limit: u32,
    period: String,
    #[serde(default)]
    key: Option<String>,
}

/// A searchable input field's name: 1-64 letters, digits or `_`.
pub fn valid_search_field(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDef {
    pub id: String,
    pub action: ActionSpec,
    /// A template (`${steps.wait.timedOut}`): the step runs only when it is truthy; otherwise it
    /// is recorded skipped (`step_skipped`), its output `{"skipped": true}`.
    #[serde(default)]
    pub when: Option<String>,
    #[serde(with = "duration::serde_human")]
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// The steps (by index) this one starts after: it runs once all of them completed (or were
    /// skipped). `None`, a step without `needs` in its file, follows the step before it (the
    /// first step starts at once); left out of the snapshot then, so that a workflow without
    /// `needs` keeps its definition hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs: Option<Vec<u32>>,
}

/// What a step does, with its parameters (the TOML `action` and `with`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", content = "with", rename_all = "snake_case")]
pub enum ActionSpec {
    /// Completes at once with the run's input as its output.
    Noop,
    /// Runs an argv directly (no shell of ours), with a timeout and bounded output capture.
    Exec(ExecSpec),
    Http(actions::HttpSpec),
    Publish(actions::PublishSpec),
    Notify(actions::NotifySpec),
    Sleep(actions::SleepSpec),
    WaitForEvent(actions::WaitSpec),
    Inngest(actions::InngestSpec),
    Builtin(actions::BuiltinSpec),
    /// Runs another workflow as a child and completes with its output.
    Workflow(actions::ChildSpec),
}

impl ActionSpec {
    pub fn name(&self) -> &'static str {
        match self {
            ActionSpec::Noop => "noop",
            ActionSpec::Exec(_) => "exec",
            ActionSpec::Http(_) => "http",
            ActionSpec::Publish(_) => "publish",
            ActionSpec::Notify(_) => "notify",
            ActionSpec::Sleep(_) => "sleep",
            ActionSpec::WaitForEvent(_) => "wait_for_event",
            ActionSpec::Inngest(_) => "inngest",
            ActionSpec::Builtin(_) => "builtin",
            ActionSpec::Workflow(_) => "workflow",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes of stdout and of stderr kept (each); the rest is dropped and marked as truncated.
    #[serde(default = "ExecSpec::default_max_output")]
    pub max_output: usize,
}

impl ExecSpec {
    const fn default_max_output() -> usize {
        64 * 1024
    }
}

/// Exponential backoff with bounded jitter. `max_attempts` counts the first attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    #[serde(with = "duration::serde_human")]
    pub initial_backoff: Duration,
    #[serde(with = "duration::serde_human")]
    pub max_backoff: Duration,
    pub multiplier: f64,
    /// Fraction of the backoff by which a delay may deviate either way, in `[0, 1]`.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `failed_attempt + 1`, before jitter: `initial * multiplier^(n-1)`,
    /// capped at `max_backoff`.
    pub fn base_delay(&self, failed_attempt: u32) -> Duration {
        let exponent = failed_attempt.saturating_sub(1).min(64) as i32;
        let millis = self.initial_backoff.as_millis() as f64 * self.multiplier.powi(exponent);
        let capped = millis.min(self.max_backoff.as_millis() as f64);
        Duration::from_millis(capped.max(0.0) as u64)
    }

    /// The delay with jitter applied; `unit` is a sample in `[-1, 1]` supplied by the caller so
    /// that this stays a pure function.
    pub fn delay(&self, failed_attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(failed_attempt).as_millis() as f64;
        let factor = 1.0 + self.jitter * unit.clamp(-1.0, 1.0);
        Duration::from_millis((base * factor).max(0.0) as u64)
    }
}

/// A loaded workflow with its content hash and JSON snapshot, shared by the whole replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub def: WorkflowDef,
    /// First 16 hex digits of SHA-256 over `snapshot`: runs record it, so editing a workflow
    /// never changes the definition of a run in flight.
    pub hash: String,
    pub snapshot: String,
    /// The parsed `schedule`, if the workflow has one.
    pub schedule: Option<Schedule>,
}

impl Workflow {
    /// Seals a validated definition (its schedule was checked by validation).
    pub fn new(def: WorkflowDef) -> Workflow {
        let snapshot = serde_json::to_string(&def).expect("definitions serialise to JSON");
        let hash = hex::encode(&Sha256::digest(snapshot.as_bytes())[..8]);
        let schedule = def.schedule.as_deref().and_then(|s| Schedule::parse(s, def.timezone.as_deref()).ok());
        Workflow { def, hash, snapshot, schedule }
    }

    /// Rebuilds a workflow from a stored snapshot, keeping the hash it was stored under.
    pub fn from_snapshot(hash: &str, snapshot: &str) -> Result<Workflow, serde_json::Error> {
        let def: WorkflowDef = serde_json::from_str(snapshot)?;
        let schedule = def.schedule.as_deref().and_then(|s| Schedule::parse(s, def.timezone.as_deref()).ok());
        Ok(Workflow { def, hash: hash.to_owned(), snapshot: snapshot.to_owned(), schedule })
    }
}

/// The workflows this replica serves, by id, in file order.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    ordered: Vec<Arc<Workflow>>,
    by_id: HashMap<String, Arc<Workflow>>,
}

impl Registry {
    /// The file named by `path`, or the built-in registry when there is none.
    pub fn load(path: Option<&Path>) -> Result<Registry, DefinitionError> {
        match path {
            Some(path) => {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|err| DefinitionError {
                    file: name.clone(),
                    workflow: None,
                    field: None,
                    problem: format!("cannot read the file: {err}"),
                })?;
                Registry::parse(&name, &text)
            }
            None => Registry::builtin(),
        }
    }

    pub fn builtin() -> Result<Registry, DefinitionError> {
        Registry::parse(BUILTIN_NAME, BUILTIN_WORKFLOWS)
    }

    /// Parses and validates a whole file; the first error found is returned.
    pub fn parse(file: &str, text: &str) -> Result<Registry, DefinitionError> {
        let raw: RawFile = toml::from_str(text).map_err(|err| DefinitionError {
            file: file.to_owned(),
            workflow: None,
            field: None,
            problem: err.to_string().trim_end().to_owned(),
        })?;
        let mut registry = Registry::default();
        for raw_workflow in raw.workflow {
            let def = raw_workflow.validate(file)?;
            if registry.by_id.contains_key(&def.id) {
                return Err(DefinitionError {
                    file: file.to_owned(),
                    workflow: Some(def.id.clone()),
                    field: Some("id".to_owned()),
                    problem: "defined twice".to_owned(),
                });
            }
            let workflow = Arc::new(Workflow::new(def));
            registry.by_id.insert(workflow.def.id.clone(), Arc::clone(&workflow));
            registry.ordered.push(workflow);
        }
        // A child workflow must be one of this registry (defined anywhere in the file).
        for workflow in &registry.ordered {
            for (index, step) in workflow.def.steps.iter().enumerate() {
                if let ActionSpec::Workflow(child) = &step.action
                    && !registry.by_id.contains_key(&child.workflow)
                {
                    return Err(DefinitionError {
                        file: file.to_owned(),
                        workflow: Some(workflow.def.id.clone()),
                        field: Some(format!("step[{index}].with.workflow")),
                        problem: format!("`{}` is not a workflow of this file", child.workflow),
                    });
                }
            }
        }
        Ok(registry)
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Workflow>> {
        self.by_id.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Workflow>> {
        self.ordered.iter()
    }

    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}

/// Checks an identifier (workflow or step id): what a URL, a key and a shell can carry.
pub fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_')
}

// ---- the file format, before validation ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    workflow: Vec<RawWorkflow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    id: String,
    #[serde(default)]
    description: String,
    schedule: Option<String>,
    timezone: Option<String>,
    #[serde(default)]
    catchup: Catchup,
    catchup_window: Option<String>,
    #[serde(default)]
    overlap: Overlap,
    #[serde(default)]
    events: Vec<String>,
    #[serde(default)]
    search: Vec<String>,
    result: Option<String>,
    concurrency: Option<Concurrency>,
    rate_limit: Option<RawRateLimit>,
    debounce: Option<RawDebounce>,
    #[serde(default)]
    step: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: String,
    action: String,
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    with: Option<toml::Value>,
    timeout: Option<String>,
    retry: Option<RawRetry>,
    #[serde(default)]
    needs: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    initial_backoff: Option<String>,
    max_backoff: Option<String>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
}

/// The most steps a workflow may have.
pub const MAX_STEPS: usize = 256;

/// A step's `needs` as step indexes: every name another step of the workflow, none twice.
fn resolve_needs(step: &str, names: &[String], step_ids: &[String]) -> Result<Vec<u32>, String> {
    let mut needs = Vec::with_capacity(names.len());
    for name in names {
        if name == step {
            return Err(format!("step `{step}` cannot need itself"));
        }
        let Some(index) = step_ids.iter().position(|id| id == name) else {
            return Err(format!("step `{step}` needs `{name}`, which is not a step of this workflow"));
        };
        if needs.contains(&(index as u32)) {
            return Err(format!("step `{step}` names `{name}` twice"));
        }
        needs.push(index as u32);
    }
    Ok(needs)
}

/// A cycle of steps that need each other, by id, the first repeated at the end; `None` when
/// the steps form a graph without one (every step can start eventually).
fn find_cycle(steps: &[StepDef]) -> Option<Vec<String>> {
    let needs = |step: usize| -> Vec<usize> {
        match &steps[step].needs {
            Some(needs) => needs.iter().map(|&n| n as usize).collect(),
            None => step.checked_sub(1).into_iter().collect(),
        }
    };
    // Depth-first, with the path on a stack: 0 unvisited, 1 on the path, 2 done.
    let mut mark = vec![0u8; steps.len()];
    for start in 0..steps.len() {
        if mark[start] != 0 {
            continue;
        }
        let mut path: Vec<(usize, Vec<usize>)> = vec![(start, needs(start))];
        mark[start] = 1;
        while let Some((step, pending)) = path.last_mut() {
            let step = *step;
            match pending.pop() {
                Some(next) if mark[next] == 1 => {
                    let from = path.iter().position(|(s, _)| *s == next).unwrap_or(0);
                    let mut cycle: Vec<String> = path[from..].iter().map(|(s, _)| steps[*s].id.clone()).collect();
                    cycle.push(steps[next].id.clone());
                    return Some(cycle);
                }
                Some(next) if mark[next] == 0 => {
                    mark[next] = 1;
                    path.push((next, needs(next)));
                }
                Some(_) => {}
                None => {
                    mark[step] = 2;
                    path.pop();
                }
            }
        }
    }
    None
}

/// How far back `catchup = "all"` looks by default.
const DEFAULT_CATCHUP_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Default time a step may take before it is failed (and retried per its policy).
const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(300);

impl RawWorkflow {
    fn validate(self, file: &str) -> Result<WorkflowDef, DefinitionError> {
        let workflow = self.id.clone();
        let fail = |field: &str, problem: String| DefinitionError {
            file: file.to_owned(),
            workflow: Some(workflow.clone()),
            field: Some(field.to_owned()),
            problem,
        };
        if !valid_id(&self.id) {
            return Err(fail(
                "id",
                "must be 1-64 characters of a-z, 0-9, `-` or `_`, starting with a letter or digit".to_owned(),
            ));
        }
        match (&self.schedule, &self.timezone) {
            (Some(schedule), zone) => {
                Schedule::parse(schedule, zone.as_deref()).map_err(|problem| {
                    let field = if problem.contains("time zone") { "timezone" } else { "schedule" };
                    fail(field, problem)
                })?;
            }
            (None, Some(_)) => {
                return Err(fail("timezone", "only a workflow with a `schedule` has a time zone".to_owned()));
            }
            (None, None) => {}
        }
        let catchup_window = match &self.catchup_window {
            Some(text) => parse_duration(text).map_err(|problem| fail("catchup_window", problem))?,
            None => DEFAULT_CATCHUP_WINDOW,
        };
        for event in &self.events {
            if !valid_event_type(event) {
                return Err(fail(
                    "events",
                    format!("`{event}` is not an event type (`^[a-z0-9][a-z0-9_.-]{{0,127}}$`)"),
                ));
            }
        }
        if self.search.len() > MAX_SEARCH_FIELDS {
            return Err(fail("search", format!("at most {MAX_SEARCH_FIELDS} input fields are indexed")));
        }
        for (index, field) in self.search.iter().enumerate() {
            if !valid_search_field(field) {
                return Err(fail(
                    "search",
                    format!("`{field}` is not an input field name (1-64 letters, digits or `_`)"),
                ));
            }
            if self.search[..index].contains(field) {
                return Err(fail("search", format!("`{field}` is named twice")));
            }
        }
        if let Some(concurrency) = &self.concurrency {
            if !(1..=MAX_CONCURRENCY).contains(&concurrency.limit) {
                return Err(fail("concurrency.limit", format!("must be from 1 to {MAX_CONCURRENCY}")));
            }
            check_group_key("concurrency.key", concurrency.key.as_deref())
                .map_err(|(field, problem)| fail(field, problem))?;
        }
        let rate_limit = match self.rate_limit {
            None => None,
            Some(raw) => {
                if !(1..=MAX_RATE).contains(&raw.limit) {
                    return Err(fail("rate_limit.limit", format!("must be from 1 to {MAX_RATE}")));
                }
                let period = parse_duration(&raw.period).map_err(|problem| fail("rate_limit.period", problem))?;
                if !(MIN_RATE_PERIOD..=MAX_RATE_PERIOD).contains(&period) {
                    return Err(fail("rate_limit.period", "must be from 100ms to 24h".to_owned()));
                }
                check_group_key("rate_limit.key", raw.key.as_deref())
                    .map_err(|(field, problem)| fail(field, problem))?;
                let concurrency_key = self.concurrency.as_ref().map(|c| c.key.as_deref());
                if concurrency_key.is_some_and(|key| key != raw.key.as_deref()) {
                    // A limited run lives on its group's shard: one group, one shard.
                    return Err(fail(
                        "rate_limit.key",
                        "must be the same as concurrency.key when both are set".to_owned(),
                    ));
                }
                Some(RateLimit { limit: raw.limit, period, key: raw.key })
            }
        };
        let debounce =
            self.debounce.map(RawDebounce::validate).transpose().map_err(|(field, problem)| fail(field, problem))?;
        if self.step.is_empty() {
            return Err(fail("step", "a workflow needs at least one [[workflow.step]]".to_owned()));
        }
        if self.step.len() > MAX_STEPS {
            return Err(fail("step", format!("a workflow has at most {MAX_STEPS} steps")));
        }
        let step_ids: Vec<String> = self.step.iter().map(|raw| raw.id.clone()).collect();
        let mut steps: Vec<StepDef> = Vec::with_capacity(self.step.len());
        for (index, raw) in self.step.into_iter().enumerate() {
            let at = |name: &str| format!("step[{index}].{name}");
            if !valid_id(&raw.id) {
                return Err(fail(&at("id"), format!("`{}` must be 1-64 characters of a-z, 0-9, `-` or `_`", raw.id)));
            }
            if steps.iter().any(|s| s.id == raw.id) {
                return Err(fail(&at("id"), format!("step id `{}` is used twice", raw.id)));
            }
            let action = parse_action(&raw.action, raw.with).map_err(|(field, problem)| fail(&at(field), problem))?;
            let timeout = match raw.timeout {
                Some(text) => parse_duration(&text).map_err(|problem| fail(&at("timeout"), problem))?,
                None => DEFAULT_STEP_TIMEOUT,
            };
            if timeout.is_zero() {
                return Err(fail(&at("timeout"), "must be greater than zero".to_owned()));
            }
            let retry = match raw.retry {
                Some(raw_retry) => {
                    raw_retry.validate().map_err(|(field, problem)| fail(&at(&format!("retry.{field}")), problem))?
                }
                None => RetryPolicy::default(),
            };
            let needs = match raw.needs {
                Some(names) => {
                    Some(resolve_needs(&raw.id, &names, &step_ids).map_err(|problem| fail(&at("needs"), problem))?)
                }
                None => None,
            };
            steps.push(StepDef { id: raw.id, action, when: raw.when, timeout, retry, needs });
        }
        if let Some(result) = &self.result
            && !steps.iter().any(|s| &s.id == result)
        {
            return Err(fail("result", format!("`{result}` is not a step of this workflow")));
        }
        if let Some(cycle) = find_cycle(&steps) {
            return Err(fail("needs", format!("the steps need each other in a cycle: {}", cycle.join(" -> "))));
        }
        Ok(WorkflowDef {
            id: self.id,
            description: self.description,
            schedule: self.schedule,
            timezone: self.timezone,
            catchup: self.catchup,
            catchup_window,
            overlap: self.overlap,
            events: self.events,
            steps,
            search: self.search,
            result: self.result,
            concurrency: self.concurrency,
            rate_limit,
            debounce,
        })
    }
}

impl RawRetry {
    fn validate(self) -> Result<RetryPolicy, (&'static str, String)> {
        let defaults = RetryPolicy::default();
        let duration = |field: &'static str, value: Option<String>, default: Duration| match value {
            Some(text) => parse_duration(&text).map_err(|problem| (field, problem)),
            None => Ok(default),
        };
        let policy = RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(defaults.max_attempts),
            initial_backoff: duration("initial_backoff", self.initial_backoff, defaults.initial_backoff)?,
            max_backoff: duration("max_backoff", self.max_backoff, defaults.max_backoff)?,
            multiplier: self.multiplier.unwrap_or(defaults.multiplier),
            jitter: self.jitter.unwrap_or(defaults.jitter),
        };
        if policy.max_attempts == 0 || policy.max_attempts > 1000 {
            return Err(("max_attempts", format!("{} is outside 1..=1000", policy.max_attempts)));
        }
        if policy.max_backoff < policy.initial_backoff {
            return Err(("max_backoff", "must not be smaller than initial_backoff".to_owned()));
        }
        if !(policy.multiplier.is_finite() && (1.0..=100.0).contains(&policy.multiplier)) {
            return Err(("multiplier", format!("{} is outside 1.0..=100.0", policy.multiplier)));
        }
        if !(policy.jitter.is_finite() && (0.0..=1.0).contains(&policy.jitter)) {
            return Err(("jitter", format!("{} is outside 0.0..=1.0", policy.jitter)));
        }
        Ok(policy)
    }
}

fn parse_action(action: &str, with: Option<toml::Value>) -> Result<ActionSpec, (&'static str, String)> {
    match action {
        "noop" => match with {
            None => Ok(ActionSpec::Noop),
            Some(_) => Err(("with", "`noop` takes no parameters".to_owned())),
        },
        "exec" => {
            let with = with.ok_or(("with", "`exec` needs `with = { command = [\"prog\", \"arg\"] }`".to_owned()))?;
            let spec: ExecSpec = with.try_into().map_err(|err: toml::de::Error| ("with", err.message().to_owned()))?;
            if spec.command.is_empty() || spec.command[0].is_empty() {
                return Err(("with.command", "must name a program: [\"prog\", \"arg\", ...]".to_owned()));
            }
            if spec.max_output == 0 || spec.max_output > 16 * 1024 * 1024 {
                return Err(("with.max_output", "must be between 1 and 16777216 bytes".to_owned()));
            }
            refuse_exec_templates(&spec)?;
            Ok(ActionSpec::Exec(spec))
        }
        other => actions::parse_more(other, with).unwrap_or_else(|| {
            Err((
                "action",
                format!(
                    "unknown action `{other}` (known: noop, exec, http, publish, notify, sleep, wait_for_event, inngest, builtin, workflow)"
                ),
            ))
        }),
    }
}

/// `exec` never renders templates: a template in an argv, an environment value or a directory
/// would be a run's input reaching a command line. The author reads the input from the process
/// instead, so a template there is refused rather than passed on as text the author did not
/// mean. Only templates naming our roots are refused: a shell's own `${HOME}` is no template
/// (no shell variable name holds a `.`).
fn refuse_exec_templates(spec: &ExecSpec) -> Result<(), (&'static str, String)> {
    let ours = |text: &str| {
        actions::templates(text).iter().any(|t| {
            matches!(t.root(), "input" | "steps" | "env" | "run") && t.path[t.root().len()..].starts_with(['.', ':'])
        })
    };
    let advice = "`exec` does not render templates (no run value ever reaches a command line): \
                  read the run's input from the file named by WFO_INPUT_FILE (its JSON), from \
                  stdin, or from WFO_INPUT (small inputs only), e.g. with `jq`";
    if let Some((index, arg)) = spec.command.iter().enumerate().find(|(_, arg)| ours(arg)) {
        return Err(("with.command", format!("argument {index} `{arg}` holds a template; {advice}")));
    }
    if let Some((name, value)) = spec.env.iter().find(|(name, value)| ours(name) || ours(value)) {
        return Err(("with.env", format!("`{name} = \"{value}\"` holds a template; {advice}")));
    }
    if let Some(cwd) = spec.cwd.as_deref().filter(|cwd| ours(cwd)) {
        return Err(("with.cwd", format!("`{cwd}` holds a template; {advice}")));
    }
    Ok(())
}

/// The event type syntax of the bus: `^[a-z0-9][a-z0-9_.-]{0,127}$`.
pub fn valid_event_type(event: &str) -> bool {
    let bytes = event.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[workflow]]
id = "nightly-report"
description = "what it does"
schedule = "0 2 * * *"
events = ["report.requested"]
[[workflow.step]]
id = "build"
action = "exec"
with = { command = ["sh", "-c", "make report"] }
timeout = "30s"
retry = { max_attempts = 5, initial_backoff = "1s", max_backoff = "1m", multiplier = 2.0, jitter = 0.2 }
"#;

    #[test]
    fn parses_the_documented_example() {
        let registry = Registry::parse("example.toml", EXAMPLE).unwrap();
        let workflow = registry.get("nightly-report").unwrap();
        let step = &workflow.def.steps[0];
        assert_eq!(step.timeout, Duration::from_secs(30));
        assert_eq!(step.retry.max_attempts, 5);
        assert_eq!(step.retry.max_backoff, Duration::from_secs(60));
        match &step.action {
            ActionSpec::Exec(spec) => assert_eq!(spec.command, vec!["sh", "-c", "make report"]),
            other => panic!("expected exec, got {other:?}"),
        }
        assert_eq!(workflow.hash.len(), 16);
    }

    #[test]
    fn concurrency_limits_are_checked_at_load() {
        let with = |concurrency: &str| {
            EXAMPLE.replace("[[workflow.step]]", &format!("concurrency = {concurrency}\n[[workflow.step]]"))
        };
        let registry = Registry::parse("t.toml", &with(r#"{ limit = 2, key = "user-${input.userId}" }"#)).unwrap();
        let def = &registry.get("nightly-report").unwrap().def;
        assert_eq!(def.concurrency, Some(Concurrency { limit: 2, key: Some("user-${input.userId}".to_owned()) }));
        for (bad, field) in [
            ("{ limit = 0 }", "concurrency.limit"),
            ("{ limit = 10001 }", "concurrency.limit"),
            (r#"{ limit = 1, key = "${steps.a.id}" }"#, "concurrency.key"),
            (r#"{ limit = 1, key = "${env.HOME}" }"#, "concurrency.key"),
            (r#"{ limit = 1, key = "" }"#, "concurrency.key"),
        ] {
            let err = Registry::parse("t.toml", &with(bad)).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{bad}: {err}");
        }
        let err = Registry::parse("t.toml", &with("{ limit = 1, per = 2 }")).unwrap_err();
        assert!(err.to_string().contains("per"), "{err}");
    }

    #[test]
    fn rate_limits_are_checked_at_load() {
        let with = |fields: &str| EXAMPLE.replace("[[workflow.step]]", &format!("{fields}\n[[workflow.step]]"));
        let registry =
            Registry::parse("t.toml", &with(r#"rate_limit = { limit = 100, period = "1m", key = "${input.p}" }"#))
                .unwrap();
        let rate = registry.get("nightly-report").unwrap().def.rate_limit.clone().unwrap();
        assert_eq!((rate.limit, rate.period, rate.key.as_deref()), (100, Duration::from_secs(60), Some("${input.p}")));
        for (bad, field) in [
            (r#"rate_limit = { limit = 0, period = "1s" }"#, "rate_limit.limit"),
            (r#"rate_limit = { limit = 1, period = "10ms" }"#, "rate_limit.period"),
            (r#"rate_limit = { limit = 1, period = "2d" }"#, "rate_limit.period"),
            (r#"rate_limit = { limit = 1, period = "soon" }"#, "rate_limit.period"),
            (r#"rate_limit = { limit = 1, period = "1s", key = "${run.id}" }"#, "rate_limit.key"),
            (
                "concurrency = { limit = 1, key = \"${input.a}\" }\nrate_limit = { limit = 1, period = \"1s\", key = \"${input.b}\" }",
                "rate_limit.key",
            ),
        ] {
            let err = Registry::parse("t.toml", &with(bad)).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{bad}: {err}");
        }
    }

    #[test]
    fn debounces_are_checked_at_load() {
        let with = |fields: &str| EXAMPLE.replace("[[workflow.step]]", &format!("{fields}\n[[workflow.step]]"));
        let registry = Registry::parse(
            "t.toml",
            &with(r#"debounce = { period = "30s", key = "${input.serviceId}", max_wait = "5m" }"#),
        )
        .unwrap();
        let debounce = registry.get("nightly-report").unwrap().def.debounce.clone().unwrap();
        assert_eq!(debounce.period, Duration::from_secs(30));
        assert_eq!(debounce.key.as_deref(), Some("${input.serviceId}"));
        assert_eq!(debounce.max_wait, Some(Duration::from_secs(300)));
        for (bad, field) in [
            (r#"debounce = { period = "10ms" }"#, "debounce.period"),
            (r#"debounce = { period = "8d" }"#, "debounce.period"),
            (r#"debounce = { period = "later" }"#, "debounce.period"),
            (r#"debounce = { period = "1m", max_wait = "30s" }"#, "debounce.max_wait"),
            (r#"debounce = { period = "1s", key = "${steps.a.id}" }"#, "debounce.key"),
            (r#"debounce = { period = "1s", key = "" }"#, "debounce.key"),
        ] {
            let err = Registry::parse("t.toml", &with(bad)).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{bad}: {err}");
        }
        let err = Registry::parse("t.toml", &with(r#"debounce = { period = "1s", every = "2s" }"#)).unwrap_err();
        assert!(err.to_string().contains("every"), "{err}");
    }

    #[test]
    fn search_fields_are_checked_and_index_scalar_values_only() {
        let with =
            |search: &str| EXAMPLE.replace("[[workflow.step]]", &format!("search = {search}\n[[workflow.step]]"));
        let registry = Registry::parse("jobs.toml", &with(r#"["userId", "region"]"#)).unwrap();
        let def = &registry.get("nightly-report").unwrap().def;
        let input = serde_json::json!({ "userId": 7, "region": ["eu"], "other": "x" });
        assert_eq!(def.search_values(&input), [("userId".to_owned(), "7".to_owned())]);
        let long = serde_json::json!({ "userId": "x".repeat(MAX_SEARCH_VALUE + 1), "region": true });
        assert_eq!(def.search_values(&long), [("region".to_owned(), "true".to_owned())]);
        for (bad, says) in [
            (r#"["user.id"]"#, "is not an input field name"),
            (r#"[""]"#, "is not an input field name"),
            (r#"["a", "a"]"#, "named twice"),
            (r#"["a", "b", "c", "d", "e", "f", "g", "h", "i"]"#, "at most 8"),
        ] {
            let err = Registry::parse("jobs.toml", &with(bad)).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("search"), "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
        // Without `search` a workflow keeps the hash it had before the field existed.
        let plain = Registry::parse("example.toml", EXAMPLE).unwrap();
        assert!(!plain.get("nightly-report").unwrap().snapshot.contains("search"));
    }

    #[test]
    fn the_snapshot_round_trips_to_the_same_definition() {
        let registry = Registry::parse("example.toml", EXAMPLE).unwrap();
        let workflow = registry.get("nightly-report").unwrap();
        let back = Workflow::from_snapshot(&workflow.hash, &workflow.snapshot).unwrap();
        assert_eq!(&back, workflow.as_ref());
    }

    #[test]
    fn errors_name_file_workflow_and_field() {
        let bad = EXAMPLE.replace("timeout = \"30s\"", "timeout = \"thirty\"");
        let err = Registry::parse("jobs.toml", &bad).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("jobs.toml: workflow `nightly-report`: field `step[0].timeout`"), "{text}");
        assert!(text.contains("thirty"), "{text}");

        let bad = EXAMPLE.replace("0 2 * * *", "61 * * * *");
        let err = Registry::parse("jobs.toml", &bad).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("schedule"), "{err}");

        let bad = EXAMPLE.replace("action = \"exec\"", "action = \"teleport\"");
        let err = Registry::parse("jobs.toml", &bad).unwrap_err();
        assert!(err.to_string().contains("unknown action `teleport`"), "{err}");

        let bad = EXAMPLE.replace("jitter = 0.2", "jitter = 3.0");
        let err = Registry::parse("jobs.toml", &bad).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("step[0].retry.jitter"), "{err}");

        let bad = EXAMPLE.replace("timeout =", "timout =");
        let err = Registry::parse("jobs.toml", &bad).unwrap_err();
        assert!(err.to_string().contains("timout"), "{err}");
    }

    /// A workflow of steps `a`, `b`, `c`, `d` with the given `needs` lines (`""`: none).
    fn graph(needs: [&str; 4]) -> Result<Registry, DefinitionError> {
        let mut text = "[[workflow]]\nid = \"g\"\n".to_owned();
        for (id, needs) in ["a", "b", "c", "d"].iter().zip(needs) {
            text.push_str(&format!("[[workflow.step]]\nid = \"{id}\"\naction = \"noop\"\n{needs}\n"));
        }
        Registry::parse("g.toml", &text)
    }

    #[test]
    fn needs_form_a_graph_checked_at_load() {
        let diamond = graph(["", "needs = [\"a\"]", "needs = [\"a\"]", "needs = [\"b\", \"c\"]"]).unwrap();
        let def = &diamond.get("g").unwrap().def;
        let needs = |step| def.needs(step).collect::<Vec<_>>();
        assert_eq!((needs(0), needs(1), needs(2), needs(3)), (vec![], vec![0], vec![0], vec![1, 2]));
        assert_eq!(def.roots().collect::<Vec<_>>(), [0]);
        assert!(def.depends_on(3, 0) && def.depends_on(3, 2) && !def.depends_on(2, 1) && !def.depends_on(0, 3));
        // Without `needs` a step follows the one before it; `needs = []` starts with the run.
        let mixed = graph(["", "", "needs = []", "needs = [\"d\"]"]);
        let err = mixed.unwrap_err();
        assert!(err.to_string().contains("cannot need itself"), "{err}");
        let mixed = graph(["", "", "needs = []", ""]).unwrap();
        let def = &mixed.get("g").unwrap().def;
        assert_eq!(def.roots().collect::<Vec<_>>(), [0, 2]);
        assert_eq!(def.needs(3).collect::<Vec<_>>(), [2]);
        // A step may need a later one.
        let later = graph(["needs = [\"d\"]", "", "", "needs = []"]).unwrap();
        assert_eq!(later.get("g").unwrap().def.roots().collect::<Vec<_>>(), [3]);

        for (needs, field, problem) in [
            (["", "needs = [\"zz\"]", "", ""], "step[1].needs", "`zz`, which is not a step"),
            (["", "needs = [\"a\", \"a\"]", "", ""], "step[1].needs", "names `a` twice"),
            (["needs = [\"c\"]", "", "", ""], "needs", "cycle: a -> c -> b -> a"),
            (["needs = [\"b\"]", "needs = [\"a\"]", "", ""], "needs", "cycle"),
        ] {
            let err = graph(needs).unwrap_err();
            assert_eq!((err.workflow.as_deref(), err.field.as_deref()), (Some("g"), Some(field)), "{err}");
            assert!(err.problem.contains(problem), "{err}");
        }
    }

    #[test]
    fn a_result_names_a_step() {
        let named = EXAMPLE.replace("[[workflow.step]]", "result = \"build\"\n[[workflow.step]]");
        let registry = Registry::parse("example.toml", &named).unwrap();
        assert_eq!(registry.get("nightly-report").unwrap().def.result_step(), 0);
        let wrong = EXAMPLE.replace("[[workflow.step]]", "result = \"deploy\"\n[[workflow.step]]");
        let err = Registry::parse("example.toml", &wrong).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("result"), "{err}");
        assert!(err.problem.contains("`deploy` is not a step"), "{err}");
        assert!(
            !Registry::parse("example.toml", EXAMPLE)
                .unwrap()
                .get("nightly-report")
                .unwrap()
                .snapshot
                .contains("result")
        );
    }

    #[test]
    fn a_workflow_without_needs_keeps_its_definition_hash() {
        let plain = Registry::parse("example.toml", EXAMPLE).unwrap();
        assert!(!plain.get("nightly-report").unwrap().snapshot.contains("needs"));
        let explicit = EXAMPLE.replace("id = \"build\"", "id = \"build\"\nneeds = []");
        let with = Registry::parse("example.toml", &explicit).unwrap();
        assert!(with.get("nightly-report").unwrap().snapshot.contains("needs"));
        assert_ne!(with.get("nightly-report").unwrap().hash, plain.get("nightly-report").unwrap().hash);
    }

    #[test]
    fn the_builtin_registry_has_the_ten_molochain_workflows() {
        let registry = Registry::builtin().unwrap();
        let ids: Vec<&str> = registry.iter().map(|w| w.def.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "cms-sync",
                "database-backup",
                "health-monitoring",
                "cache-warmup",
                "sales-operations",
                "log-rotation",
                "performance-optimization",
                "user-onboarding",
                "notification-digest",
                "security-audit"
            ]
        );
    }

    fn one_step(action: &str, with: &str) -> Result<Registry, DefinitionError> {
        let text =
            format!("[[workflow]]\nid = \"wf\"\n[[workflow.step]]\nid = \"s\"\naction = \"{action}\"\nwith = {with}\n");
        Registry::parse("t.toml", &text)
    }

    #[test]
    fn a_url_whose_origin_a_run_could_choose_is_refused_unless_allowed() {
        for url in [
            "http://app.internal${input.path}",
            "http://${input.host}/x",
            "http://app:${input.port}/x",
            "http://${input.user}@app/x",
            "${input.scheme}://app/x",
            "${steps.find.url}",
            "${run.trigger.url}/x",
            "https://${env.HOST}${input.rest}",
        ] {
            let err = one_step("http", &format!("{{ url = \"{url}\" }}")).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("step[0].with.url"), "{url}: {err}");
            assert!(err.to_string().contains("workflow `wf`") && err.problem.contains("allow_dynamic_host"), "{err}");
            let allowed = one_step("http", &format!("{{ url = \"{url}\", allow_dynamic_host = true }}"));
            assert!(allowed.is_ok(), "{url}: {allowed:?}");
        }
        for url in [
            "http://127.0.0.1:8080/items/${input.id}?q=${input.q}#${run.id}",
            "${env.CMS_API_URL}/items/${input.id}",
            "${env.OPTIMIZE_HOOK_URL:-}",
            "https://${env.HOST}:${env.PORT:-443}/x?next=https://${input.host}/",
            "${env.BASE}/redirect?to=https://${input.host}",
        ] {
            assert!(one_step("http", &format!("{{ url = \"{url}\" }}")).is_ok(), "{url}");
        }
        // Off by default, and left out of the snapshot then (hashes of older definitions hold).
        let registry = one_step("http", "{ url = \"http://h/x\" }").unwrap();
        assert!(!registry.get("wf").unwrap().snapshot.contains("allow_dynamic_host"));
    }

    #[test]
    fn url_origins_end_at_the_first_literal_path_query_or_fragment() {
        use actions::url_origin_len;
        fn origin(url: &str) -> &str {
            &url[..url_origin_len(url)]
        }
        assert_eq!(origin("http://h:1/a/${input.x}"), "http://h:1");
        assert_eq!(origin("http://h?x=${input.x}"), "http://h");
        assert_eq!(origin("http://h${input.x}/a"), "http://h${input.x}");
        assert_eq!(origin("${env.A}/b"), "${env.A}");
        assert_eq!(origin("${env.A:-http://x/y}"), "${env.A:-http://x/y}");
        assert_eq!(origin("${env.S}://${env.H}/p"), "${env.S}://${env.H}");
        assert_eq!(origin("/relative/${input.x}"), "");
    }

    #[test]
    fn exec_refuses_templates_in_its_command_env_and_cwd() {
        for (with, field) in [
            (r#"{ command = ["echo", "${input.name}"] }"#, "step[0].with.command"),
            (r#"{ command = ["sh", "-c", "echo ${ env.HOME }"] }"#, "step[0].with.command"),
            (r#"{ command = ["true"], env = { NAME = "${input.name}" } }"#, "step[0].with.env"),
            (r#"{ command = ["true"], cwd = "/srv/${steps.a.dir}" }"#, "step[0].with.cwd"),
        ] {
            let err = one_step("exec", with).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{err}");
            assert!(err.problem.contains("WFO_INPUT_FILE"), "{err}");
            assert!(err.to_string().starts_with("t.toml: workflow `wf`"), "{err}");
        }
        // A shell's own variables are no templates of ours.
        assert!(one_step("exec", r#"{ command = ["sh", "-c", "echo ${HOME} $WFO_INPUT"] }"#).is_ok());
    }

    #[test]
    fn backoff_grows_is_capped_and_jitter_is_bounded() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            multiplier: 2.0,
            jitter: 0.2,
        };
        assert_eq!(policy.base_delay(1), Duration::from_millis(100));
        assert_eq!(policy.base_delay(2), Duration::from_millis(200));
        assert_eq!(policy.base_delay(4), Duration::from_millis(800));
        assert_eq!(policy.base_delay(5), Duration::from_millis(1000));
        assert_eq!(policy.delay(2, 1.0), Duration::from_millis(240));
        assert_eq!(policy.delay(2, -1.0), Duration::from_millis(160));
        assert_eq!(policy.delay(2, 7.0), Duration::from_millis(240));
    }
}
