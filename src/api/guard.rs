//! Cross-site protection for an open (keyless) server. Such a server trusts whoever can
//! reach it, which is meant to be the local machine only; two browser tricks would extend
//! that to any web page the operator visits:
//! - DNS rebinding: a page's own host name re-pointed at 127.0.0.1 reads responses. Refused
//!   by checking `Host`: only loopback names (`localhost`, `127.0.0.1`, `[::1]`), the bound
//!   address and `auth.allowed_hosts` are answered.
//! - Cross-site simple requests (form or `text/plain` POSTs need no preflight): refused when
//!   the browser's `Origin` names another host. JSON bodies also require a JSON content
//!   type (`api::json`), which a page cannot send cross-site without a preflight.
//!   Origins listed in `server.cors_allowed_origins` are the operator's exception: they pass
//!   (CORS then lets their pages read `/v1/*` responses); `Host` is still checked.
//!
//! A keyed server needs neither: a page cannot attach the bearer key.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web;

use super::error::{ApiError, ErrorKind};
use super::AppState;

/// The host part of a `Host` header or an origin's authority (port and brackets removed).
fn host_name(authority: &str) -> String {
    let a = authority.trim();
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        a.rsplit_once(':').map_or(a, |(h, port)| if port.chars().all(|c| c.is_ascii_digit()) { h } else { a })
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether an open server answers a request for `host`.
pub fn host_allowed(host: &str, bind: &std::net::SocketAddr, extra: &[String]) -> bool {
    let h = host_name(host);
    matches!(h.as_str(), "localhost" | "127.0.0.1" | "::1")
        || h.ends_with(".localhost")
        || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip == bind.ip())
        || extra.iter().any(|e| e.eq_ignore_ascii_case(&h))
}

fn check(req: &ServiceRequest) -> Result<(), ApiError> {
    let Some(state) = req.app_data::<web::Data<AppState>>() else { return Ok(()) };
    if !state.auth.is_open() {
        return Ok(());
    }
    let cfg = &state.config;
    let extra = &cfg.auth.allowed_hosts;
    let refuse = |what: &str| {
        ApiError::new(
            ErrorKind::HostNotAllowed,
            format!(
                "This gateway has no API keys and answers only local requests; {what}. Add the name to \
                 auth.allowed_hosts, or configure API keys."
            ),
        )
    };
    if let Some(host) = req.headers().get(header::HOST).map(|h| h.to_str().unwrap_or("\u{0}")) {
        if !host_allowed(host, &cfg.server.bind, extra) {
            return Err(refuse("the Host header names another host"));
        }
    }
    if let Some(origin) = req.headers().get(header::ORIGIN).map(|h| h.to_str().unwrap_or("\u{0}")) {
        // `null` (sandboxed frames, file: pages) is cross-site too.
        // An origin the operator listed in `server.cors_allowed_origins` is let through
        // (exact match; `*` is refused on an open server at start).
        let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or("\u{0}");
        let listed = cfg.server.cors_allowed_origins.iter().any(|o| o == origin);
        if !listed && !host_allowed(authority, &cfg.server.bind, extra) {
            return Err(refuse("the request comes from a page on another site (Origin)"));
        }
    }
    Ok(())
}

/// Middleware around the whole app.
pub async fn open_server(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    check(&req)?;
    next.call(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let bind: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
        for ok in ["localhost", "localhost:8080", "127.0.0.1:8080", "[::1]:8080", "LOCALHOST.", "127.0.0.2", "app.localhost:3000"] {
            assert!(host_allowed(ok, &bind, &[]), "{ok}");
        }
        for bad in ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "[::2]:80", "", "\u{0}"] {
            assert!(!host_allowed(bad, &bind, &[]), "{bad}");
        }
        assert!(host_allowed("gw.internal:8080", &bind, &["gw.internal".to_string()]));
    }
}
