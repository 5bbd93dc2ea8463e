//! The HTTP side of metrics: the middleware that counts every exchange (route template,
//! status class, duration to the end of the body, in-flight gauge, rejections), the
//! request extension through which a handler names the task and model it served, and
//! `GET /metrics`. The families themselves live in `crate::metrics`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use bytes::Bytes;

use super::auth::Scope;
use super::error::{ApiError, ErrorKind};
use super::AppState;
use crate::metrics::{HttpObservation, InFlight, Metrics};
use crate::router::Routed;

/// The label for paths no route matched.
const UNMATCHED_ROUTE: &str = "unmatched";

/// What a handler served, for the middleware's labels.
#[derive(Debug, Clone)]
struct Served {
    task: String,
    model: String,
}

/// Called by a handler once the request is routed, so its answer (errors included) is
/// counted under its task and model.
pub fn served(req: &HttpRequest, routed: &Routed) {
    req.extensions_mut().insert(Served { task: routed.task.clone(), model: routed.model.clone() });
}

/// Middleware around the whole app.
pub async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Some(metrics) = req.app_data::<web::Data<AppState>>().map(|s| s.metrics.clone()) else {
        return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
    };
    // From the app's resource map, so it is known before routing; the request itself must
    // not be cloned before routing (actix needs it unshared to record the match).
    let route = req.match_pattern().unwrap_or_else(|| UNMATCHED_ROUTE.to_string());
    let exchange = Exchange { metrics: metrics.clone(), started: Instant::now(), _in_flight: metrics.in_flight() };
    match next.call(req).await {
        Ok(res) => {
            let served = res.request().extensions().get::<Served>().cloned();
            let rejected = res.response().error().and_then(|e| e.as_error::<ApiError>()).map(|e| e.kind);
            let done = Done { exchange, route, served, status: res.status(), rejected };
            Ok(res.map_body(|_, body| BoxBody::new(Tracked { body: body.boxed(), done: Some(done) })))
        }
        Err(e) => {
            let rejected = e.as_error::<ApiError>().map(|e| e.kind);
            Done { exchange, route, served: None, status: e.as_response_error().status_code(), rejected }.record();
            Err(e)
        }
    }
}

/// The metrics handle and start of one exchange; holds the in-flight count.
struct Exchange {
    metrics: Arc<Metrics>,
    started: Instant,
    _in_flight: InFlight,
}

/// An exchange whose head is known, recorded when its body ends.
struct Done {
    exchange: Exchange,
    route: String,
    served: Option<Served>,
    status: StatusCode,
    rejected: Option<ErrorKind>,
}

impl Done {
    fn record(self) {
        let rejected = self
            .rejected
            .filter(|_| {
                matches!(
                    self.status,
                    StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                )
            })
            .map(ErrorKind::code);
        self.exchange.metrics.observe_http(&HttpObservation {
            route: &self.route,
            task: self.served.as_ref().map(|s| s.task.as_str()),
            model: self.served.as_ref().map(|s| s.model.as_str()),
            status: self.status.as_u16(),
            rejected,
            duration: self.exchange.started.elapsed(),
        });
    }
}

/// A response body that records its exchange when it is dropped: after the last byte, or
/// when the client went away mid-stream.
struct Tracked {
    body: BoxBody,
    done: Option<Done>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.record();
        }
    }
}

impl MessageBody for Tracked {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.body).poll_next(cx)
    }
}

/// `GET /metrics`: the Prometheus text exposition. Open unless `[metrics]
/// require_admin_key` is set (an open server accepts any caller either way).
pub async fn scrape(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let cfg = &state.config.metrics;
    if !cfg.enabled {
        return Err(ApiError::new(ErrorKind::UnknownUrl, "Invalid URL (GET /metrics): metrics are disabled."));
    }
    if cfg.require_admin_key {
        let value = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        state.auth.authenticate(value, Scope::Admin)?;
    }
    // Reading /proc and encoding is quick but is file I/O: keep it off the worker.
    let metrics = state.metrics.clone();
    let text = web::block(move || metrics.render())
        .await
        .map_err(|e| ApiError::internal(format!("the metrics scrape did not run: {e}")))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(text))
}
