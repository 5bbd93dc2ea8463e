//! `x-request-id` on every response, so a client's logs can be matched to the gateway's
//! (the OpenAI SDKs expose it as `_request_id`). A client that sends its own (up to 128
//! letters, digits and `-_.:`) gets it back; otherwise completion routes answer with the
//! completion's id and every other route with a fresh `req_…` id. Error bodies carry it too
//! (`error.request_id`), and a logged request keeps it in its record.

use actix_web::body::{to_bytes, BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpRequest};

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The id the client sent, when it sent a usable one (kept in the request's extensions).
#[derive(Debug, Clone)]
pub struct ClientRequestId(pub String);

/// The client's id for this request, if it sent one.
pub fn client_id(req: &HttpRequest) -> Option<String> {
    req.extensions().get::<ClientRequestId>().map(|c| c.0.clone())
}

fn usable(v: &str) -> bool {
    (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The middleware: reads the client's id, and after the handler makes sure the response
/// names one, in its header and, for an error, in its body.
pub async fn track(req: ServiceRequest, next: Next<impl MessageBody + 'static>) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let sent = req.headers().get(&HEADER).and_then(|v| v.to_str().ok()).filter(|v| usable(v)).map(String::from);
    if let Some(id) = &sent {
        req.extensions_mut().insert(ClientRequestId(id.clone()));
    }
    let mut res = next.call(req).await?.map_into_boxed_body();
    let id = match res.headers().get(&HEADER).and_then(|v| v.to_str().ok()) {
        Some(set) => set.to_string(),
        None => sent.unwrap_or_else(|| format!("req_{}", uuid::Uuid::new_v4().simple())),
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(HEADER, v);
    }
    let is_json = res.headers().get(header::CONTENT_TYPE).is_some_and(|c| c.as_bytes().starts_with(b"application/json"));
    if !(res.status().is_client_error() || res.status().is_server_error()) || !is_json {
        return Ok(res);
    }
    // An error body is small and already whole: add the id to its `error` object.
    let (req, res) = res.into_parts();
    let (head, body) = res.into_parts();
    let bytes = to_bytes(body).await.unwrap_or_default();
    let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(mut v) if v.get("error").is_some_and(|e| e.is_object()) => {
            v["error"]["request_id"] = serde_json::Value::String(id);
            BoxBody::new(v.to_string())
        }
        _ => BoxBody::new(bytes),
    };
    let mut head = head.set_body(body);
    head.headers_mut().remove(header::CONTENT_LENGTH);
    Ok(ServiceResponse::new(req, head))
}
