//! The JSON body extractor used by every route. Unlike `web::Json` it reports errors in
//! OpenAI's shape with the offending field as `param` (via `serde_path_to_error`):
//! malformed JSON is `invalid_json`, a wrong type `invalid_type`, a missing field
//! `missing_required_parameter`, a body over `server.max_body_bytes` `413 request_too_large`.
//! Unknown fields are ignored, as OpenAI does.
//!
//! The body must be declared JSON (`application/json` or `*/*+json`, else `415`): a web page
//! can send a cross-site `text/plain` or form POST without a preflight, never a JSON one. A
//! body that takes longer than `limits.body_timeout_seconds` to arrive gets `408`.

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorKind};

/// The body limit, stored as app data beside actix's own `PayloadConfig`.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// How long a body may take to arrive, as app data.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub std::time::Duration);

/// Whether a `Content-Type` value declares JSON.
pub fn is_json_content_type(value: &str) -> bool {
    let mime = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

pub struct Json<T>(pub T);

/// [`Json`] that also keeps the body's bytes (to forward a request as the client wrote it).
pub struct JsonBody<T>(pub T, pub web::Bytes);

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let body = read(req, payload);
        Box::pin(async move { parse(&body.await?).map(Json) })
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let body = read(req, payload);
        Box::pin(async move {
            let body = body.await?;
            parse(&body).map(|v| JsonBody(v, body))
        })
    }
}

/// The body, once it is known to be declared JSON, within the size limit and on time.
fn read(req: &HttpRequest, payload: &mut Payload) -> LocalBoxFuture<'static, Result<web::Bytes, ApiError>> {
    let limit = req.app_data::<BodyLimit>().map(|l| l.0);
    let timeout = req.app_data::<BodyTimeout>().map_or(std::time::Duration::from_secs(30), |t| t.0);
    let content_type = req.headers().get(actix_web::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let json = content_type.is_some_and(is_json_content_type);
    let shown = content_type.unwrap_or("none").chars().take(100).collect::<String>();
    let body = web::Bytes::from_request(req, payload);
    Box::pin(async move {
        if !json {
            return Err(ApiError::new(
                ErrorKind::UnsupportedMediaType,
                format!("The request body must be JSON with 'Content-Type: application/json' (got {shown})."),
            ));
        }
        let body = tokio::time::timeout(timeout, body).await.map_err(|_| {
            ApiError::new(
                ErrorKind::RequestTimeout,
                format!("The request body did not arrive within {} s (limits.body_timeout_seconds).", timeout.as_secs_f64()),
            )
        })?;
        body.map_err(|e| {
            if e.as_response_error().status_code() == actix_web::http::StatusCode::PAYLOAD_TOO_LARGE {
                let limit = limit.map(|l| format!(" of {l} bytes")).unwrap_or_default();
                ApiError::new(ErrorKind::RequestTooLarge, format!("The request body is larger than the limit{limit}."))
            } else {
                ApiError::new(ErrorKind::InvalidJson, format!("Could not read the request body: {e}"))
            }
        })
    })
}

/// Parses a JSON body, mapping serde's errors to OpenAI's codes.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        classify(&path, &inner)
    })?;
    de.end().map_err(|e| classify(".", &e))?;
    Ok(value)
}

fn classify(path: &str, e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let at = (path != ".").then(|| path.to_string());
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::new(
            ErrorKind::InvalidJson,
            format!(
                "We could not parse the JSON body of your request ({e}). The body must be a JSON object; \
                 check for a trailing comma or an unquoted string."
            ),
        ),
        Category::Data => {
            let text = e.to_string();
            if let Some(field) = text.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
                let param = match &at {
                    Some(p) => format!("{p}.{field}"),
                    None => field.to_string(),
                };
                ApiError::new(ErrorKind::MissingRequiredParameter, format!("Missing required parameter: '{param}'."))
                    .with_param(param)
            } else {
                let mut err = ApiError::new(
                    ErrorKind::InvalidType,
                    match &at {
                        Some(p) => format!("Invalid type for '{p}': {text}"),
                        None => format!("Invalid request body: {text}"),
                    },
                );
                err.param = at;
                err
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[expect(dead_code, reason = "fields exist to be deserialized, not read")]
    struct Msg {
        role: String,
        content: String,
    }

    #[derive(Debug, serde::Deserialize)]
    #[expect(dead_code, reason = "fields exist to be deserialized, not read")]
    struct Req {
        model: String,
        messages: Vec<Msg>,
        max_tokens: Option<i64>,
    }

    fn err(body: &str) -> ApiError {
        match parse::<Req>(body.as_bytes()) {
            Ok(r) => ApiError::internal(format!("parsed: {r:?}")),
            Err(e) => e,
        }
    }

    #[test]
    fn codes_and_params() {
        let e = err("{\"model\": \"m\", ");
        assert_eq!((e.kind, e.param), (ErrorKind::InvalidJson, None));
        let e = err("{\"model\": \"m\", \"messages\": [{\"role\": 1, \"content\": \"x\"}]}");
        assert_eq!((e.kind, e.param.as_deref()), (ErrorKind::InvalidType, Some("messages[0].role")));
        let e = err("{\"model\": \"m\", \"messages\": [{\"role\": \"user\"}]}");
        assert_eq!((e.kind, e.param.as_deref()), (ErrorKind::MissingRequiredParameter, Some("messages[0].content")));
        let e = err("{\"model\": \"m\"}");
        assert_eq!((e.kind, e.param.as_deref()), (ErrorKind::MissingRequiredParameter, Some("messages")));
        let e = err("{\"model\": \"m\", \"messages\": [], \"max_tokens\": \"5\"}");
        assert_eq!((e.kind, e.param.as_deref()), (ErrorKind::InvalidType, Some("max_tokens")));
        let e = err("{\"model\": \"m\", \"messages\": []} x");
        assert_eq!(e.kind, ErrorKind::InvalidJson);
        let e = err("[]");
        assert_eq!((e.kind, e.param), (ErrorKind::InvalidType, None));
        assert!(parse::<Req>(b"{\"model\": \"m\", \"messages\": [], \"unknown\": {\"a\": 1}}").is_ok());
    }

    #[test]
    fn json_content_types() {
        for ok in ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"] {
            assert!(is_json_content_type(ok), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "text/json+x"] {
            assert!(!is_json_content_type(bad), "{bad}");
        }
    }
}
