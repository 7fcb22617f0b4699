mod util;

mod chaos;
mod conformance;
mod failures;
mod smoke;
mod triggers;
mod api;
mod replay;
