//! The HTTP API (actix-web): OpenAI-compatible routes under `/v1`, the vLLM-compatible
//! adapter admin routes, health, readiness, `/metrics` and the review page's static files.
//! Owns auth, limits, OpenAI-shaped errors and SSE; runs no model code and never blocks a
//! worker (the engine has its own threads, adapter loads go to the blocking pool).

pub mod admin;
pub mod auth;
pub mod error;
pub mod guard;
pub mod health;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod request_id;
pub mod server;
pub mod ui;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use actix_web::middleware::from_fn;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};

use crate::config::Config;
use crate::engine::Engine;
use crate::router::Router;
use error::{ApiError, ErrorKind};

/// What every handler can reach.
pub struct AppState {
    pub config: Arc<Config>,
    pub engine: Engine,
    pub router: Router,
    /// Upstream engines: models named `<upstream>/<model>` or by a route.
    pub upstreams: Arc<crate::upstream::Upstreams>,
    pub auth: auth::Auth,
    pub limiter: Arc<limits::ConcurrencyLimiter>,
    /// Held while the task overview is computed (one at a time).
    pub overview_lock: tokio::sync::Mutex<()>,
    /// Upload slots (`limits.max_concurrent_uploads`).
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// Unix seconds; the base model's `created` in `/v1/models`.
    pub started_at: u64,
    /// `system_fingerprint`: changes when the model or the gateway's version does.
    pub fingerprint: Arc<str>,
    /// True once the adapters folder's start-up scan is done (or there is none).
    pub adapters_scanned: Arc<AtomicBool>,
    /// Fine-tuning jobs and uploaded files; `None` when `[training] enabled = false`.
    pub jobs: Option<crate::training::jobs::JobManager>,
    /// This server's Prometheus registry.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Request logs and review; `None` when `[logs] enabled = false`.
    pub logs: Option<Arc<crate::logs::Logs>>,
}

impl AppState {
    /// Routes `model` for `caller`: a model outside the key's `models` list, or an adapter
    /// another tenant owns, is "not found" (a client cannot tell it from a name that does not
    /// exist).
    pub fn route_for(
        &self,
        caller: &auth::Caller,
        model: &str,
        metadata_task: Option<&str>,
    ) -> Result<crate::router::Routed, ApiError> {
        let hidden = || ApiError::from(crate::router::RouteError::ModelNotFound(model.to_string()));
        if !caller.may_call(model) {
            return Err(hidden());
        }
        let routed = self.router.route(model, metadata_task)?;
        let owner = routed.adapter.as_ref().and_then(|a| crate::router::adapter_owner(a.meta.as_ref()));
        if owner.is_some() && !caller.owns(owner) {
            return Err(hidden());
        }
        Ok(routed)
    }
}

/// CORS for browser pages on `origins` (`server.cors_allowed_origins`): preflights answered
/// for the `/v1/*` routes with the headers the SDKs send (any requested header: their
/// `x-stainless-*` and `openai-*` set grows), `x-request-id` readable by the page. Requests
/// from other origins are not blocked here, only left without CORS headers (the browser then
/// withholds the response; an open server refuses them in `guard`).
fn cors(origins: &[String]) -> actix_cors::Cors {
    let cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "POST", "DELETE", "OPTIONS"])
        .allow_any_header()
        .expose_headers(["x-request-id", "x-tunegate-prompt-tokens-saved", "retry-after"])
        .max_age(3600)
        .block_on_origin_mismatch(false);
    if origins.iter().any(|o| o == "*") {
        // No cookies are involved (keys travel in `Authorization`), so `*` is safe to send.
        return cors.allow_any_origin().send_wildcard();
    }
    origins.iter().fold(cors, |c, o| c.allowed_origin(o))
}

/// The route table; `cors_origins` may call `/v1/*` from a browser.
pub fn routes(cfg: &mut web::ServiceConfig, cors_origins: &[String]) {
    cfg.service(resource("/health").route(web::get().to(health::health)))
        .service(resource("/ready").route(web::get().to(health::ready)))
        // The review page; its files are public, the admin API it calls is not.
        .service(resource("/ui").route(web::get().to(ui::index)))
        .service(resource("/ui/").route(web::get().to(ui::index)))
        .service(resource("/ui/{file}").route(web::get().to(ui::asset)))
        .service(resource("/metrics").route(web::get().to(metrics::scrape)))
        .service(
            resource("/v1/load_lora_adapter").route(web::post().to(admin::adapters::load)).wrap(from_fn(auth::admin)),
        )
        .service(
            resource("/v1/unload_lora_adapter")
                .route(web::post().to(admin::adapters::unload))
                .wrap(from_fn(auth::admin)),
        )
        .service(resource("/v1/lora_adapters").route(web::get().to(admin::adapters::list)).wrap(from_fn(auth::admin)))
        .service(
            web::scope("/admin")
                .wrap(from_fn(auth::admin))
                .service(resource("/logs").route(web::get().to(admin::logs::list)))
                // Before `/logs/{id}`: `review` is not an id here.
                .service(resource("/logs/review").route(web::post().to(admin::logs::review_bulk)))
                .service(resource("/logs/{id}").route(web::get().to(admin::logs::get)))
                .service(resource("/logs/{id}/review").route(web::post().to(admin::logs::review)))
                .service(resource("/tasks").route(web::get().to(admin::logs::tasks)))
                .default_service(web::to(not_found)),
        )
        .service(
            web::scope("/v1")
                .wrap(from_fn(auth::client))
                // Outside the key check: a preflight carries no key.
                .wrap(actix_web::middleware::Condition::new(!cors_origins.is_empty(), cors(cors_origins)))
                .service(
                    resource("/chat/completions")
                        .route(web::post().to(openai::chat::create))
                        .route(web::get().to(openai::stored::list)),
                )
                .service(
                    resource("/chat/completions/{id}")
                        .route(web::get().to(openai::stored::retrieve))
                        .route(web::post().to(openai::stored::update))
                        .route(web::delete().to(openai::stored::delete)),
                )
                .service(resource("/chat/completions/{id}/messages").route(web::get().to(openai::stored::messages)))
                .service(resource("/feedback").route(web::post().to(openai::feedback::create)))
                .service(resource("/completions").route(web::post().to(openai::completions::create)))
                .service(resource("/responses").route(web::post().to(openai::responses::create)))
                .service(resource("/embeddings").route(web::post().to(openai::embeddings::create)))
                .service(
                    resource("/responses/{id}")
                        .route(web::get().to(openai::responses::retrieve))
                        .route(web::delete().to(openai::responses::delete)),
                )
                .service(resource("/responses/{id}/input_items").route(web::get().to(openai::responses::input_items)))
                .service(resource("/models").route(web::get().to(openai::models::list)))
                // Model ids may contain '/' (`org/name`), so the id is the rest of the path.
                .service(resource("/models/{id:.+}").route(web::get().to(openai::models::retrieve)))
                .service(
                    resource("/files")
                        .route(web::post().to(openai::files::create))
                        .route(web::get().to(openai::files::list)),
                )
                .service(
                    resource("/files/{id}")
                        .route(web::get().to(openai::files::retrieve))
                        .route(web::delete().to(openai::files::delete)),
                )
                .service(resource("/files/{id}/content").route(web::get().to(openai::files::content)))
                .service(
                    resource("/fine_tuning/jobs")
                        .route(web::post().to(openai::fine_tuning::create))
                        .route(web::get().to(openai::fine_tuning::list)),
                )
                .service(resource("/fine_tuning/jobs/{id}").route(web::get().to(openai::fine_tuning::retrieve)))
                .service(resource("/fine_tuning/jobs/{id}/cancel").route(web::post().to(openai::fine_tuning::cancel)))
                .service(resource("/fine_tuning/jobs/{id}/events").route(web::get().to(openai::fine_tuning::events)))
                .service(
                    resource("/fine_tuning/jobs/{id}/checkpoints").route(web::get().to(openai::fine_tuning::checkpoints)),
                )
                .default_service(web::to(not_found)),
        );
}

fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

/// Any path no route matches.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::new(ErrorKind::UnknownUrl, format!("Invalid URL ({} {}).", req.method(), req.path())).error_response()
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    ApiError::new(ErrorKind::MethodNotAllowed, format!("{} is not allowed on {}.", req.method(), req.path()))
        .error_response()
}
