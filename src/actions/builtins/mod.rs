//! The built-in actions the Molochain workflows name. Each is Rust behind [`super::Builtin`].

use super::Builtin;
use std::sync::Arc;

pub(super) mod bounded_http;
mod cache_warm;
mod cms_sync;
mod digest;
mod health_probe;
mod housekeeping;
mod log_rotation;
mod pg_backup;
mod sales_leads;
mod security_audit;

/// The built-ins every replica has.
pub fn standard() -> Vec<Arc<dyn Builtin>> {
    let mut builtins: Vec<Arc<dyn Builtin>> = Vec::new();
    // cms-sync, health-monitoring, cache-warmup, performance-optimization, notification-digest
    builtins.extend([
        Arc::new(cms_sync::CmsSync) as Arc<dyn Builtin>,
        Arc::new(health_probe::HealthProbe),
        Arc::new(cache_warm::CacheWarm),
        Arc::new(housekeeping::Housekeeping),
        Arc::new(digest::Digest),
    ]);
    // sales-operations, security-audit
    builtins.extend([Arc::new(sales_leads::SalesLeads) as Arc<dyn Builtin>, Arc::new(security_audit::SecurityAudit)]);
    // database-backup, log-rotation
    builtins.extend([Arc::new(pg_backup::PgBackup) as Arc<dyn Builtin>, Arc::new(log_rotation::LogRotation)]);
    builtins
}
