//! What a step does. [`Actions::run`] runs a step's action to its end (or until its cancellation
//! token fires: time-out, lost lease, shutdown) and returns its output as JSON, or says that the
//! step parks the run (`sleep`, `wait_for_event`) or waits for a child run it started
//! (`workflow`), or fails saying whether trying again may help.
//!
//! Actions reach the rest of the system only through [`Services`], which the engine implements.
//! Built-in actions ([`Builtin`]) are Rust code behind one small trait; a library user can
//! implement it and register more with [`Actions::register`].

pub mod builtins;
mod exec;
mod http;
pub mod template;

use crate::definition::actions::BuiltinSpec;
use crate::definition::{ActionSpec, StepDef};
use crate::machine::Millis;
use async_trait::async_trait;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use http::sign;

/// Everything an action may know about the step it runs.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub run_id: String,
    pub workflow_id: String,
    /// The step's index in the run's definition, and its id.
    pub step: u32,
    pub step_id: String,
    pub attempt: u32,
    /// The run's input, as JSON text.
    pub input: String,
    /// Outputs of the run's earlier steps, by step id (filled when the step's templates name
    /// them).
    pub steps: serde_json::Map<String, Value>,
    /// What started the run: `{"kind": "api"|"cron"|"event"|"rerun", "eventType", "eventId", ...}`.
    pub trigger: Value,
    /// The span what the step calls is a child of (W3C trace context): sent as `traceparent`
    /// and `tracestate` by `http`, `notify` and `inngest`, given to `exec` as `TRACEPARENT` and
    /// `TRACESTATE`. `None` for a run without a trace.
    pub trace: Option<crate::machine::TraceContext>,
}

impl StepContext {
    /// Stable across attempts and deliveries: side effects are at-least-once, so an action hands
    /// this to whatever it calls to make repeats harmless.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.run_id, self.step_id)
    }

    /// The `traceparent` and `tracestate` headers to send, if any (`tracestate` only when
    /// there is one).
    pub fn trace_headers(&self) -> Vec<(&'static str, String)> {
        let Some(trace) = &self.trace else { return Vec::new() };
        let mut headers = vec![("traceparent", trace.traceparent())];
        if !trace.tracestate.is_empty() {
            headers.push(("tracestate", trace.tracestate.clone()));
        }
        headers
    }

    fn input_value(&self) -> Value {
        serde_json::from_str(&self.input).unwrap_or(Value::Null)
    }
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ActionError {
    pub message: String,
    /// Whether another attempt may succeed (a 4xx, say, will not).
    pub retryable: bool,
}

impl ActionError {
    pub fn retryable(message: impl Into<String>) -> ActionError {
        ActionError { message: message.into(), retryable: true }
    }

    pub fn fatal(message: impl Into<String>) -> ActionError {
        ActionError { message: message.into(), retryable: false }
    }
}

/// What the engine offers actions.
#[async_trait]
pub trait Services: Send + Sync {
    /// The store's clock.
    fn now(&self) -> Millis;
    /// Appends an event to the bus; returns its id.
    async fn publish(&self, event_type: &str, payload: &Value, key: Option<&str>) -> Result<String, ActionError>;
    /// A small durable value (a sync cursor, say), shared by every replica.
    async fn get_value(&self, key: &str) -> Result<Option<String>, ActionError>;
    async fn set_value(&self, key: &str, value: &str) -> Result<(), ActionError>;
    /// Runs and events since `since`, summarised (for digests).
    async fn activity(&self, since: Millis) -> Result<Value, ActionError>;
    /// The orchestrator's own housekeeping: trims streams, expires finished runs, reports the
    /// store's memory and queues.
    async fn housekeeping(&self) -> Result<Value, ActionError>;
    /// The store's security-relevant settings: `{"kind", "authenticated", "warnings": [...]}`.
    async fn store_report(&self) -> Result<Value, ActionError>;
    /// Starts a run of `workflow` with `input` as the child of the step `parent` runs, once per
    /// step attempt (a redelivered attempt gets the run it started); returns the child's id.
    async fn start_child(&self, parent: &StepContext, workflow: &str, input: &Value) -> Result<String, ActionError>;
}

/// A named action written in Rust.
#[async_trait]
pub trait Builtin: Send + Sync {
    fn name(&self) -> &'static str;
    /// The parameters that choose where the built-in connects, what it runs or which files it
    /// writes: only the definition and the operator's environment may set them (literal text
    /// and `${env...}` templates), never a run's input, steps or run values. Checked when a
    /// replica starts, by [`Actions::check_builtin`].
    fn operator_params(&self) -> &'static [&'static str] {
        &[]
    }
    /// Runs with its parameters (templates already resolved).
    async fn run(&self, call: BuiltinCall<'_>) -> Result<Value, ActionError>;
}

/// What a built-in gets.
pub struct BuiltinCall<'a> {
    pub params: Value,
    pub step: &'a StepContext,
    pub services: &'a dyn Services,
    pub http: &'a reqwest::Client,
    pub cancel: CancellationToken,
}

impl BuiltinCall<'_> {
    /// A string parameter, or an error naming it.
    pub fn text(&self, name: &str) -> Result<String, ActionError> {
        match self.params.get(name) {
            Some(Value::String(text)) if !text.is_empty() => Ok(text.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => Err(ActionError::fatal(format!("parameter `{name}` is required (a non-empty string)"))),
        }
    }

    pub fn text_or(&self, name: &str, default: &str) -> String {
        self.text(name).unwrap_or_else(|_| default.to_owned())
    }

    pub fn number_or(&self, name: &str, default: u64) -> Result<u64, ActionError> {
        match self.params.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) => {
                n.as_u64().ok_or_else(|| ActionError::fatal(format!("parameter `{name}` must be a whole number")))
            }
            Some(Value::String(s)) if s.is_empty() => Ok(default),
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .map_err(|_| ActionError::fatal(format!("parameter `{name}`: `{s}` is not a whole number"))),
            Some(_) => Err(ActionError::fatal(format!("parameter `{name}` must be a whole number"))),
        }
    }

    pub fn duration_or(&self, name: &str, default: Duration) -> Result<Duration, ActionError> {
        match self.params.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) if s.is_empty() => Ok(default),
            Some(Value::String(s)) => {
                crate::definition::parse_duration(s).map_err(|p| ActionError::fatal(format!("parameter `{name}`: {p}")))
            }
            Some(_) => Err(ActionError::fatal(format!("parameter `{name}` must be a duration such as `30s`"))),
        }
    }

    /// A directory parameter: a path with no `..` component, so that a value that came from a
    /// run's input (through a template) cannot walk out of the directory the author meant.
    pub fn directory(&self, name: &str) -> Result<std::path::PathBuf, ActionError> {
        let text = self.text(name)?;
        let path = std::path::PathBuf::from(&text);
        if text.contains('\0') || path.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(ActionError::fatal(format!(
                "parameter `{name}`: `{text}` has a `..` component (or a NUL); name the directory without one"
            )));
        }
        Ok(path)
    }

    /// A list parameter: a JSON array of strings, or a comma-separated string.
    pub fn list(&self, name: &str) -> Vec<String> {
        match self.params.get(name) {
            Some(Value::Array(items)) => {
                items.iter().filter_map(|v| v.as_str().map(str::to_owned)).filter(|s| !s.is_empty()).collect()
            }
            Some(Value::String(s)) => {
                s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// Where actions send things, from the settings.
#[derive(Debug, Clone, Default)]
pub struct ActionConfig {
    /// `NOTIFY_WEBHOOK_URL`: the Communications Hub webhook.
    pub notify_url: Option<String>,
    /// `WEBHOOK_SECRET`: signs notifications (HMAC-SHA256 over the body).
    pub webhook_secret: Option<String>,
    /// `INNGEST_EVENT_KEY`.
    pub inngest_event_key: Option<String>,
    /// `INNGEST_BASE_URL` (default `https://inn.gs`).
    pub inngest_base_url: String,
}

impl ActionConfig {
    /// As the settings say (see [`crate::config::Settings::integrations`]).
    pub fn from_settings(integrations: &crate::config::Integrations) -> ActionConfig {
        ActionConfig {
            notify_url: integrations.notify_url.clone(),
            webhook_secret: integrations.webhook_secret.clone(),
            inngest_event_key: integrations.inngest_event_key.clone(),
            inngest_base_url: integrations.inngest_base_url.clone(),
        }
    }
}

/// What running a step's action came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The step's output, as JSON text.
    Done(String),
    /// The step's `when` condition is false: it does not run (the machine records it skipped).
    Skipped,
    /// The run parks until `until`, or until an event of type `event` arrives (a wait).
    Park { until: Millis, event: Option<String> },
    /// The step started child run `run_id` and waits for it to end.
    Child { run_id: String },
}

/// The actions of a replica: the HTTP client, where things are sent, the built-ins.
pub struct Actions {
    config: ActionConfig,
    http: reqwest::Client,
    builtins: HashMap<&'static str, Arc<dyn Builtin>>,
}

impl Actions {
    /// With the standard built-ins registered.
    pub fn new(config: ActionConfig) -> Actions {
        let http = reqwest::Client::builder()
            .user_agent(concat!("workflow-orchestrator/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .redirect(same_host_redirects())
            .build()
            .unwrap_or_default();
        let mut actions = Actions { config, http, builtins: HashMap::new() };
        for builtin in builtins::standard() {
            actions.register(builtin);
        }
        actions
    }

    /// Adds (or replaces) a built-in action.
    pub fn register(&mut self, builtin: Arc<dyn Builtin>) {
        self.builtins.insert(builtin.name(), builtin);
    }

    /// The names of the registered built-ins.
    pub fn builtin_names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.builtins.keys().copied().collect();
        names.sort_unstable();
        names
    }

    pub fn has_builtin(&self, name: &str) -> bool {
        self.builtins.contains_key(name)
    }

    /// Whether a step's built-in is registered, and its operator-only parameters
    /// ([`Builtin::operator_params`]) hold no template a run could fill; says what is wrong.
    pub fn check_builtin(&self, spec: &BuiltinSpec) -> Result<(), String> {
        let builtin = self.builtins.get(spec.name.as_str()).ok_or_else(|| {
            format!("no built-in action `{}` (known: {})", spec.name, self.builtin_names().join(", "))
        })?;
        for name in builtin.operator_params() {
            let Some(value) = spec.params.get(*name) else { continue };
            let text = value.to_string();
            if let Some(template) = crate::definition::actions::templates(&text).into_iter().find(|t| t.root() != "env")
            {
                return Err(format!(
                    "`{}`: parameter `{name}` holds `${{{}}}`, but it chooses where `{}` connects, what it runs or \
                     which files it writes: only literal text and `${{env.NAME}}` may set it, never a run's values",
                    spec.name, template.path, spec.name
                ));
            }
        }
        Ok(())
    }

    /// Whether running `step` needs the outputs of earlier steps (its templates name them).
    pub fn needs_outputs(step: &StepDef) -> bool {
        if step.when.as_deref().is_some_and(template::mentions_steps) {
            return true;
        }
        match &step.action {
            // No templates in their parameters: nothing to look at on the hot path.
            ActionSpec::Noop | ActionSpec::Exec(_) => false,
            action => template::mentions_steps(&serde_json::to_string(action).unwrap_or_default()),
        }
    }

    /// Runs a step's action to its end or until `cancel` fires. The step timeout is the caller's.
    pub async fn run(
        &self,
        step: &StepDef,
        context: &StepContext,
        services: &dyn Services,
        cancel: CancellationToken,
    ) -> Result<Outcome, ActionError> {
        let input = context.input_value();
        let scope = template::Scope {
            input: &input,
            steps: &context.steps,
            run: serde_json::json!({
                "id": context.run_id,
                "workflow": context.workflow_id,
                "step": context.step_id,
                "attempt": context.attempt,
                "trigger": context.trigger,
                "eventType": context.trigger.get("eventType"),
            }),
        };
        let render = |value: &Value| template::render_value(value, &scope).map_err(ActionError::fatal);
        let render_str = |text: &str| template::render_str(text, &scope).map_err(ActionError::fatal);
        if let Some(when) = &step.when
            && !template::condition(when, &scope).map_err(ActionError::fatal)?
        {
            return Ok(Outcome::Skipped);
        }
        let done = |value: Value| Ok(Outcome::Done(value.to_string()));
        match &step.action {
            ActionSpec::Noop => Ok(Outcome::Done(context.input.clone())),
            ActionSpec::Exec(spec) => exec::run(spec, context, cancel).await.map(Outcome::Done),
            ActionSpec::Http(spec) => {
                let rendered = http::Request {
                    url: template::render_url(&spec.url, spec.allow_dynamic_host, &scope)
                        .map_err(ActionError::fatal)?,
                    headers: spec
                        .headers
                        .iter()
                        .map(|(name, value)| Ok((name.clone(), render_str(value)?)))
                        .collect::<Result<_, ActionError>>()?,
                    body: spec.body.as_ref().map(render).transpose()?,
                };
                done(http::request(&self.http, spec, rendered, context, cancel).await?)
            }
            ActionSpec::Publish(spec) => {
                let event = render_str(&spec.event)?;
                let payload = match &spec.payload {
                    Some(payload) => render(payload)?,
                    None => serde_json::json!({}),
                };
                let key = spec.key.as_deref().map(render_str).transpose()?;
                // The default key makes a retried step publish once.
                let key = key.unwrap_or_else(|| context.idempotency_key());
                let id = services.publish(&event, &payload, Some(&key)).await?;
                done(serde_json::json!({ "eventId": id, "eventType": event }))
            }
            ActionSpec::Notify(spec) => {
                let message = render(&spec.message)?;
                let body = serde_json::json!({
                    "channel": spec.channel.as_deref().map(render_str).transpose()?,
                    "severity": spec.severity.as_deref().map(render_str).transpose()?.unwrap_or_else(|| "info".to_owned()),
                    "message": message,
                    "workflowId": context.workflow_id,
                    "runId": context.run_id,
                    "stepId": context.step_id,
                });
                done(http::notify(&self.http, &self.config, &body, context, cancel).await?)
            }
            ActionSpec::Inngest(spec) => {
                let data = match &spec.data {
                    Some(data) => render(data)?,
                    None => serde_json::json!({}),
                };
                let event = render_str(&spec.event)?;
                done(http::inngest(&self.http, &self.config, &event, &data, context, cancel).await?)
            }
            ActionSpec::Sleep(spec) => {
                Ok(Outcome::Park { until: services.now() + spec.duration.as_millis() as Millis, event: None })
            }
            ActionSpec::WaitForEvent(spec) => Ok(Outcome::Park {
                until: services.now() + spec.timeout.as_millis() as Millis,
                event: Some(spec.event.clone()),
            }),
            ActionSpec::Builtin(spec) => {
                let builtin = self.builtins.get(spec.name.as_str()).ok_or_else(|| {
                    ActionError::fatal(format!(
                        "no built-in action `{}` (known: {})",
                        spec.name,
                        self.builtin_names().join(", ")
                    ))
                })?;
                let call =
                    BuiltinCall { params: render(&spec.params)?, step: context, services, http: &self.http, cancel };
                done(builtin.run(call).await?)
            }
            ActionSpec::Workflow(spec) => {
                let input = match &spec.input {
                    Some(input) => render(input)?,
                    None => serde_json::json!({}),
                };
                if !input.is_object() {
                    return Err(ActionError::fatal(format!("the child's input must be a JSON object, not `{input}`")));
                }
                Ok(Outcome::Child { run_id: services.start_child(context, &spec.workflow, &input).await? })
            }
        }
    }

    /// Whether an event's payload satisfies a waiting step's correlation rule, for run `run_id`
    /// whose input is `input` (the rule may name `${input...}` and `${run.id}`).
    pub fn correlates(step: &StepDef, run_id: &str, input: &str, payload: &Value) -> bool {
        let ActionSpec::WaitForEvent(spec) = &step.action else { return false };
        let Some(rule) = &spec.correlate else { return true };
        let input: Value = serde_json::from_str(input).unwrap_or(Value::Null);
        let steps = serde_json::Map::new();
        let scope = template::Scope { input: &input, steps: &steps, run: serde_json::json!({ "id": run_id }) };
        let Ok(expected) = template::render_value(&Value::String(rule.equals.clone()), &scope) else { return false };
        let mut actual = payload;
        for part in rule.field.split('.') {
            match actual.get(part) {
                Some(next) => actual = next,
                None => return false,
            }
        }
        // 7 and "7" are the same user id, as far as correlation goes.
        actual == &expected || text_of(actual) == text_of(&expected)
    }
}

/// Redirects are followed only while they stay on the host the request was sent to: an open
/// redirect there (`/login?next=${input.url}`, its value encoded as it should be) must not carry
/// the step's headers, credentials the author set for that host among them, to a host a run's
/// input chose. A redirect elsewhere ends the request with its 3xx, which fails the step.
fn same_host_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let first = attempt.previous().first().map(|url| url.host_str().map(str::to_owned));
        if attempt.previous().len() > 10 {
            attempt.error("more than 10 redirects")
        } else if first.is_some_and(|host| host.as_deref() == attempt.url().host_str()) {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
