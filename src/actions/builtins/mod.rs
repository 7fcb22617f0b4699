//! The built-in actions the Molochain workflows name. Each is Rust behind [`super::Builtin`].

use super::Builtin;
use std::sync::Arc;

/// The built-ins every replica has.
pub fn standard() -> Vec<Arc<dyn Builtin>> {
    Vec::new()
}
