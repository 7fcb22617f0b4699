//! The API's error: a status and a JSON body `{"error":{"code","message"}}`.

use crate::engine::EngineError;
use crate::store::StoreError;
use hyper::StatusCode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For 405: the methods the route answers.
    pub allow: Option<&'static str>,
    /// For 503 when busy: seconds after which a retry is welcome (`Retry-After`).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), allow: None, retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "code": self.code, "message": self.message } })
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        match err {
            StoreError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", err.to_string())
            }
            StoreError::Corrupt { .. } | StoreError::Fatal(_) => {
                tracing::error!(%err, "store error while serving a request");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store_error", err.to_string())
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> ApiError {
        match err {
            EngineError::UnknownWorkflow(id) => ApiError::not_found(format!("no workflow `{id}`")),
            EngineError::UnknownRun(id) => ApiError::not_found(format!("no run `{id}`")),
            EngineError::Conflict(message) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            EngineError::Invalid(message) => ApiError::bad_request(message),
            EngineError::CorruptLog { .. } => {
                tracing::error!(%err, "a run's log does not replay");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt_log", err.to_string())
            }
            EngineError::Store(err) => err.into(),
        }
    }
}
