//! API keys. The config stores SHA-256 digests of keys, never keys; a bearer token is hashed
//! and compared with every stored digest in constant time. Two scopes: client keys may call
//! `/v1/*`, admin keys may also call the admin routes. With no key configured the server is
//! open: any or no token is accepted (config validation keeps such a server on loopback).
//!
//! The middlewares put the resolved [`Caller`] into the request's extensions; handlers take
//! it as an extractor.

use std::future::{ready, Ready};

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{http::header, web, FromRequest, HttpMessage, HttpRequest};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::{ApiError, ErrorKind};
use super::AppState;
use crate::config::{AuthConfig, KeyHash};

/// Who is calling, as far as limits and logs need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// A short, non-secret id of the key (first 12 hex digits of its digest), or
    /// `anonymous` on an open server without a token.
    pub key_id: String,
    pub admin: bool,
}

#[derive(Debug, Clone)]
pub struct Auth {
    api_keys: Vec<KeyHash>,
    admin_keys: Vec<KeyHash>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Client,
    Admin,
}

impl Auth {
    pub fn new(cfg: &AuthConfig) -> Self {
        Self { api_keys: cfg.api_keys.clone(), admin_keys: cfg.admin_keys.clone() }
    }

    pub fn is_open(&self) -> bool {
        self.api_keys.is_empty() && self.admin_keys.is_empty()
    }

    /// Checks an `Authorization` header value for a scope.
    pub fn authenticate(&self, authorization: Option<&str>, scope: Scope) -> Result<Caller, ApiError> {
        let token = authorization.and_then(bearer);
        if self.is_open() {
            let key_id = token.map(|t| key_id(&digest(t))).unwrap_or_else(|| "anonymous".into());
            return Ok(Caller { key_id, admin: true });
        }
        let Some(token) = token else {
            return Err(ApiError::new(
                ErrorKind::MissingApiKey,
                "You didn't provide an API key. Provide it in an Authorization header using Bearer auth \
                 (Authorization: Bearer YOUR_KEY).",
            ));
        };
        let d = digest(token);
        let admin = matches_any(&d, &self.admin_keys);
        let client = matches_any(&d, &self.api_keys);
        if !admin && !client {
            return Err(ApiError::new(ErrorKind::InvalidApiKey, "Incorrect API key provided."));
        }
        if scope == Scope::Admin && !admin {
            return Err(ApiError::new(
                ErrorKind::InsufficientScope,
                "This route needs an admin key (auth.admin_keys); the key provided is a client key.",
            ));
        }
        Ok(Caller { key_id: key_id(&d), admin })
    }
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn digest(token: &str) -> KeyHash {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares with every stored digest, without an early exit, so timing says nothing about
/// which (or whether any) key matched.
fn matches_any(d: &KeyHash, keys: &[KeyHash]) -> bool {
    keys.iter().fold(subtle::Choice::from(0u8), |acc, k| acc | k.ct_eq(d)).into()
}

fn key_id(d: &KeyHash) -> String {
    hex::encode(&d[..6])
}

async fn check(req: ServiceRequest, scope: Scope) -> Result<ServiceRequest, actix_web::Error> {
    let state =
        req.app_data::<web::Data<AppState>>().ok_or_else(|| ApiError::internal("application state is missing"))?;
    let value = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let caller = state.auth.authenticate(value, scope)?;
    req.extensions_mut().insert(caller);
    Ok(req)
}

/// Middleware for `/v1/*`.
pub async fn client(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    next.call(check(req, Scope::Client).await?).await
}

/// Middleware for admin routes.
pub async fn admin(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    next.call(check(req, Scope::Admin).await?).await
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<Caller>()
                .cloned()
                .ok_or_else(|| ApiError::internal("route has no authentication middleware")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&AuthConfig { api_keys: vec![digest("client-key")], admin_keys: vec![digest("admin-key")] })
    }

    fn kind(r: Result<Caller, ApiError>) -> Option<ErrorKind> {
        r.err().map(|e| e.kind)
    }

    #[test]
    fn scopes() {
        let a = auth();
        assert_eq!(kind(a.authenticate(None, Scope::Client)), Some(ErrorKind::MissingApiKey));
        assert_eq!(kind(a.authenticate(Some("Bearer nope"), Scope::Client)), Some(ErrorKind::InvalidApiKey));
        assert_eq!(kind(a.authenticate(Some("Basic client-key"), Scope::Client)), Some(ErrorKind::MissingApiKey));
        assert_eq!(kind(a.authenticate(Some("Bearer client-key"), Scope::Client)), None);
        assert_eq!(kind(a.authenticate(Some("bearer client-key"), Scope::Admin)), Some(ErrorKind::InsufficientScope));
        assert_eq!(kind(a.authenticate(Some("Bearer admin-key"), Scope::Admin)), None);
        assert_eq!(kind(a.authenticate(Some("Bearer admin-key"), Scope::Client)), None);
    }

    #[test]
    fn open_server_accepts_anything() {
        let a = Auth::new(&AuthConfig::default());
        assert_eq!(a.authenticate(None, Scope::Admin).map(|c| c.key_id), Ok("anonymous".to_string()));
        assert!(a.authenticate(Some("Bearer whatever"), Scope::Admin).is_ok());
    }
}
