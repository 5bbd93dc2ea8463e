//! The actix-web server over ready state: middleware, body limits and the route table.
//! Everything it serves is built by the composition root (`crate::gateway`), which also
//! stops it (graceful drain first) before the parts behind it.

use std::net::SocketAddr;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use anyhow::Context;

use super::json::{BodyLimit, BodyTimeout};
use super::{routes, AppState};

#[derive(Debug, Clone, Copy, Default)]
pub struct ListenOptions {
    /// Let actix stop gracefully on SIGTERM/SIGINT.
    pub handle_signals: bool,
}

/// A bound, running HTTP server.
pub struct Listening {
    pub addr: SocketAddr,
    pub handle: actix_web::dev::ServerHandle,
    /// Ends when the server has stopped.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds `server.bind` and serves the routes over `state` on the current tokio runtime.
pub fn listen(state: web::Data<AppState>, opts: ListenOptions) -> anyhow::Result<Listening> {
    let config = state.config.clone();
    let max_body = config.server.max_body_bytes;
    let body_timeout = Duration::from_secs_f64(config.limits.body_timeout_seconds);
    let cors_origins = config.server.cors_allowed_origins.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(max_body))
            .app_data(BodyLimit(max_body))
            .app_data(BodyTimeout(body_timeout))
            .wrap(actix_web::middleware::from_fn(super::guard::open_server))
            .wrap(actix_web::middleware::from_fn(super::metrics::track))
            .wrap(actix_web::middleware::from_fn(super::request_id::track))
            .configure(|c| routes(c, &cors_origins))
            .default_service(web::to(super::not_found))
    })
    .shutdown_timeout(config.server.shutdown_timeout.as_secs().max(1));
    if config.server.workers > 0 {
        server = server.workers(config.server.workers);
    }
    if !opts.handle_signals {
        server = server.disable_signals();
    }
    let server = server.bind(config.server.bind).with_context(|| format!("binding {}", config.server.bind))?;
    let addr = server.addrs().first().copied().context("the server has no address")?;
    let server = server.run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    Ok(Listening { addr, handle, task })
}
