//! Regression tests of issue 8 (hardening): what an attacker or a careless client could do, each
//! class tested against a served binary on a private redis-server.

mod api_edges;
mod backlog;
mod bus;
mod inputs;
