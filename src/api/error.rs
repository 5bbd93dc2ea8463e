//! The API's one error type. Each [`ErrorKind`] has an exhaustive HTTP status, a stable
//! snake_case `code` and an OpenAI error `type`; one `ResponseError` impl renders every
//! error as OpenAI does: `{"error":{"message","type","param","code"}}`.
//!
//! Engine, adapter and router errors convert here, so handlers only use `?`.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};

use crate::adapters::paths::PathError;
use crate::adapters::AdapterError;
use crate::engine::EngineError;
use crate::router::RouteError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The body is not JSON.
    InvalidJson,
    /// A field has the wrong JSON type.
    InvalidType,
    MissingRequiredParameter,
    /// A value of the right type that is not allowed (unknown role, bad enum value).
    InvalidValue,
    IntegerBelowMinValue,
    IntegerAboveMaxValue,
    DecimalBelowMinValue,
    DecimalAboveMaxValue,
    EmptyArray,
    /// A parameter OpenAI defines that this gateway does not implement.
    UnsupportedParameter,
    ContextLengthExceeded,
    RequestTooLarge,
    MissingApiKey,
    InvalidApiKey,
    /// A valid key without the admin scope on an admin route.
    InsufficientScope,
    ModelNotFound,
    AdapterNotFound,
    LoraPathNotFound,
    PathOutsideAdaptersRoot,
    InvalidAdapter,
    AdapterAlreadyLoaded,
    GenerationMismatch,
    AdapterLimitReached,
    UnknownUrl,
    MethodNotAllowed,
    TooManyConcurrentRequests,
    AdapterBusy,
    ModelNotReady,
    EngineOverloaded,
    ShuttingDown,
    FileNotFound,
    InvalidFile,
    JobNotFound,
    JobFinished,
    TrainingDisabled,
    LogNotFound,
    /// No stored response with that id (never stored, deleted, or another tenant's).
    ResponseNotFound,
    IllegalReviewTransition,
    LogsDisabled,
    LogStoreUnavailable,
    /// A body route got a body that is not `application/json` (cross-site form posts).
    UnsupportedMediaType,
    /// The request body did not arrive within `limits.body_timeout_seconds`.
    RequestTimeout,
    /// An open server got a `Host` it does not answer (DNS rebinding).
    HostNotAllowed,
    /// A client key asked for something only an admin or a grant allows (another task's
    /// alias or logs).
    PermissionDenied,
    /// A tenant has `limits.max_active_jobs_per_tenant` jobs queued or running.
    TooManyJobs,
    /// Too many uploads in progress (`limits.max_concurrent_uploads`).
    TooManyUploads,
    /// The log store cannot take more records (disk full): failing fast instead of waiting.
    LogStoreFull,
    /// An upstream engine is at its `max_concurrency`.
    UpstreamBusy,
    /// An upstream engine could not be reached, or failed (5xx) after the retries.
    UpstreamError,
    /// An upstream engine did not answer in time.
    UpstreamTimeout,
    /// An upstream engine's circuit breaker is open (it failed repeatedly just now).
    UpstreamUnavailable,
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        use ErrorKind::*;
        match self {
            InvalidJson
            | InvalidType
            | MissingRequiredParameter
            | InvalidValue
            | IntegerBelowMinValue
            | IntegerAboveMaxValue
            | DecimalBelowMinValue
            | DecimalAboveMaxValue
            | EmptyArray
            | UnsupportedParameter
            | ContextLengthExceeded
            | PathOutsideAdaptersRoot
            | InvalidAdapter
            | AdapterAlreadyLoaded
            | AdapterLimitReached
            | InvalidFile => StatusCode::BAD_REQUEST,
            MissingApiKey | InvalidApiKey => StatusCode::UNAUTHORIZED,
            InsufficientScope | PermissionDenied | HostNotAllowed => StatusCode::FORBIDDEN,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            TooManyJobs | TooManyUploads => StatusCode::TOO_MANY_REQUESTS,
            LogStoreFull => StatusCode::INSUFFICIENT_STORAGE,
            ModelNotFound | AdapterNotFound | LoraPathNotFound | UnknownUrl | FileNotFound | JobNotFound
            | LogNotFound | ResponseNotFound => {
                StatusCode::NOT_FOUND
            }
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GenerationMismatch | JobFinished | IllegalReviewTransition => StatusCode::CONFLICT,
            RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            TooManyConcurrentRequests | AdapterBusy | UpstreamBusy => StatusCode::TOO_MANY_REQUESTS,
            UpstreamError => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ModelNotReady | EngineOverloaded | ShuttingDown | TrainingDisabled | LogsDisabled | LogStoreUnavailable
            | UpstreamUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, public `code` of the error body.
    pub fn code(self) -> &'static str {
        use ErrorKind::*;
        match self {
            InvalidJson => "invalid_json",
            InvalidType => "invalid_type",
            MissingRequiredParameter => "missing_required_parameter",
            InvalidValue => "invalid_value",
            IntegerBelowMinValue => "integer_below_min_value",
            IntegerAboveMaxValue => "integer_above_max_value",
            DecimalBelowMinValue => "decimal_below_min_value",
            DecimalAboveMaxValue => "decimal_above_max_value",
            EmptyArray => "empty_array",
            UnsupportedParameter => "unsupported_parameter",
            ContextLengthExceeded => "context_length_exceeded",
            RequestTooLarge => "request_too_large",
            MissingApiKey => "missing_api_key",
            InvalidApiKey => "invalid_api_key",
            InsufficientScope => "insufficient_scope",
            ModelNotFound => "model_not_found",
            AdapterNotFound => "adapter_not_found",
            LoraPathNotFound => "lora_path_not_found",
            PathOutsideAdaptersRoot => "path_outside_adapters_root",
            InvalidAdapter => "invalid_adapter",
            AdapterAlreadyLoaded => "adapter_already_loaded",
            GenerationMismatch => "generation_mismatch",
            AdapterLimitReached => "adapter_limit_reached",
            UnknownUrl => "unknown_url",
            MethodNotAllowed => "method_not_allowed",
            TooManyConcurrentRequests => "too_many_concurrent_requests",
            AdapterBusy => "adapter_busy",
            ModelNotReady => "model_not_ready",
            EngineOverloaded => "engine_overloaded",
            ShuttingDown => "shutting_down",
            FileNotFound => "file_not_found",
            InvalidFile => "invalid_file",
            JobNotFound => "fine_tuning_job_not_found",
            JobFinished => "fine_tuning_job_finished",
            TrainingDisabled => "training_disabled",
            LogNotFound => "log_not_found",
            ResponseNotFound => "response_not_found",
            IllegalReviewTransition => "illegal_review_transition",
            LogsDisabled => "logs_disabled",
            LogStoreUnavailable => "log_store_unavailable",
            UnsupportedMediaType => "unsupported_media_type",
            RequestTimeout => "request_timeout",
            HostNotAllowed => "host_not_allowed",
            PermissionDenied => "permission_denied",
            TooManyJobs => "too_many_fine_tuning_jobs",
            TooManyUploads => "too_many_uploads",
            LogStoreFull => "log_store_full",
            UpstreamBusy => "upstream_busy",
            UpstreamError => "upstream_error",
            UpstreamTimeout => "upstream_timeout",
            UpstreamUnavailable => "upstream_unavailable",
            Internal => "internal_error",
        }
    }

    /// OpenAI's error `type`, which SDKs show next to the message.
    pub fn error_type(self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// Seconds a client should wait before retrying, where retrying makes sense.
    fn retry_after(self) -> Option<u32> {
        match self {
            ErrorKind::TooManyConcurrentRequests
            | ErrorKind::AdapterBusy
            | ErrorKind::EngineOverloaded
            | ErrorKind::TooManyUploads
            | ErrorKind::UpstreamBusy => Some(1),
            ErrorKind::ModelNotReady | ErrorKind::LogStoreUnavailable | ErrorKind::UpstreamUnavailable => Some(5),
            _ => None,
        }
    }
}

/// An error as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, in OpenAI's dotted form (`messages[0].role`).
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), param: None }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidValue, message).with_param(param)
    }

    pub fn unsupported(param: &str, why: &str) -> Self {
        Self::new(ErrorKind::UnsupportedParameter, format!("'{param}' is not supported by this gateway: {why}"))
            .with_param(param)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The JSON body OpenAI sends for this error.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind.error_type(),
                "param": self.param,
                "code": self.kind.code(),
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.code())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.kind.status()
    }

    fn error_response(&self) -> HttpResponse {
        if self.kind.status().is_server_error() {
            tracing::warn!(code = self.kind.code(), "{}", self.message);
        }
        let mut res = HttpResponse::build(self.kind.status());
        if let Some(secs) = self.kind.retry_after() {
            res.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        if matches!(self.kind, ErrorKind::MissingApiKey | ErrorKind::InvalidApiKey) {
            res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        res.json(self.body())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let kind = match &e {
            EngineError::NotReady | EngineError::Load(_) => ErrorKind::ModelNotReady,
            EngineError::Overloaded { .. } => ErrorKind::EngineOverloaded,
            EngineError::ContextLength { .. } => ErrorKind::ContextLengthExceeded,
            EngineError::InvalidRequest(_) | EngineError::Tokenizer(_) | EngineError::Template(_) => {
                ErrorKind::InvalidValue
            }
            EngineError::ShuttingDown => ErrorKind::ShuttingDown,
            EngineError::Internal(_) => ErrorKind::Internal,
        };
        let param = match &e {
            EngineError::ContextLength { .. } | EngineError::Template(_) => Some("messages".to_string()),
            _ => None,
        };
        ApiError { kind, message: e.to_string(), param }
    }
}

impl From<crate::logs::LogError> for ApiError {
    fn from(e: crate::logs::LogError) -> Self {
        use crate::logs::LogError as L;
        let kind = match &e {
            L::NotFound(_) => ErrorKind::LogNotFound,
            L::IllegalTransition { .. } => ErrorKind::IllegalReviewTransition,
            L::InvalidInput(_) => ErrorKind::InvalidValue,
            L::Unavailable(_) | L::WriterClosed => ErrorKind::LogStoreUnavailable,
            L::Storage(_) => ErrorKind::Internal,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl From<crate::training::files::FileError> for ApiError {
    fn from(e: crate::training::files::FileError) -> Self {
        use crate::training::files::FileError as F;
        let kind = match &e {
            F::Invalid(_) => ErrorKind::InvalidFile,
            F::NotFound(_) => ErrorKind::FileNotFound,
            F::Io(_) => ErrorKind::Internal,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl From<crate::training::jobs::JobsError> for ApiError {
    fn from(e: crate::training::jobs::JobsError) -> Self {
        use crate::training::jobs::JobsError as J;
        let kind = match &e {
            J::Invalid(_) => ErrorKind::InvalidValue,
            J::Limit(_) => ErrorKind::TooManyJobs,
            J::NotFound(_) => ErrorKind::JobNotFound,
            J::Conflict(_) => ErrorKind::JobFinished,
            J::Io(_) => ErrorKind::Internal,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        let kind = match &e {
            AdapterError::NotFound(_) => ErrorKind::AdapterNotFound,
            AdapterError::AlreadyLoaded { .. } => ErrorKind::AdapterAlreadyLoaded,
            AdapterError::GenerationMismatch { .. } => ErrorKind::GenerationMismatch,
            AdapterError::Busy(_) => ErrorKind::AdapterBusy,
            AdapterError::Invalid(_) | AdapterError::Io(_) => ErrorKind::InvalidAdapter,
            AdapterError::Limit(_) => ErrorKind::AdapterLimitReached,
            AdapterError::NotReady => ErrorKind::ModelNotReady,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::ModelNotFound(_) => ApiError::new(ErrorKind::ModelNotFound, e.to_string()).with_param("model"),
        }
    }
}

impl From<PathError> for ApiError {
    fn from(e: PathError) -> Self {
        let kind = match &e {
            PathError::OutsideRoot(_) => ErrorKind::PathOutsideAdaptersRoot,
            PathError::NotFound(_) | PathError::NoRoot(_) => ErrorKind::LoraPathNotFound,
        };
        ApiError::new(kind, e.to_string()).with_param("lora_path")
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        ApiError::internal("a background task was cancelled")
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let e = ApiError::invalid_value("messages[0].role", "bad role");
        assert_eq!(
            e.body(),
            serde_json::json!({"error": {"message": "bad role", "type": "invalid_request_error",
                "param": "messages[0].role", "code": "invalid_value"}})
        );
    }

    #[test]
    fn statuses_and_types() {
        assert_eq!(ErrorKind::ModelNotFound.status(), StatusCode::NOT_FOUND);
        assert_eq!(ErrorKind::InvalidApiKey.error_type(), "authentication_error");
        assert_eq!(ErrorKind::InsufficientScope.error_type(), "permission_error");
        assert_eq!(ErrorKind::AdapterBusy.error_type(), "rate_limit_error");
        assert_eq!(ErrorKind::Internal.error_type(), "server_error");
        let e: ApiError = EngineError::ContextLength { prompt: 9, needed: 10, limit: 8 }.into();
        assert_eq!((e.kind.status(), e.kind.code()), (StatusCode::BAD_REQUEST, "context_length_exceeded"));
        let e: ApiError =
            AdapterError::GenerationMismatch { alias: "a".into(), expected: Some(1), actual: Some(2) }.into();
        assert_eq!(e.kind.status(), StatusCode::CONFLICT);
    }
}
