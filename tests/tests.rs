mod util;

mod api;
mod chaos;
mod children;
mod clock;
mod conformance;
mod failures;
mod hardening;
mod logs;
mod replay;
mod smoke;
mod traces;
mod triggers;
mod ui;
mod workflows_data;
mod workflows_flows;
mod workflows_http;
