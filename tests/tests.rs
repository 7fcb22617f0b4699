mod util;

mod chaos;
mod conformance;
mod failures;
mod smoke;
mod triggers;
mod api;
mod replay;
mod workflows_data;
mod workflows_http;
mod workflows_flows;
