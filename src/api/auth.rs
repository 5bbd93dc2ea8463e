//! API keys. The config stores SHA-256 digests of keys, never keys; a bearer token is hashed
//! and compared with every stored digest in constant time. Two scopes: client keys may call
//! `/v1/*`, admin keys may also call the admin routes. Each key belongs to a tenant
//! (`[[auth.keys]]`; a key of the plain lists is a tenant of its own). With no key
//! configured the server is open: any or no token is accepted (config validation keeps such
//! a server on loopback).
//!
//! The middlewares put the resolved [`Caller`] into the request's extensions; handlers take
//! it as an extractor.

use std::future::{ready, Ready};
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{http::header, web, FromRequest, HttpMessage, HttpRequest};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::{ApiError, ErrorKind};
use super::AppState;
use crate::config::{AuthConfig, KeyHash};

/// Who is calling: the key, its tenant and what the key may do. Every object a client
/// creates is stamped with `tenant`; a client key sees and changes only its tenant's
/// objects, an admin key sees all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// A short, non-secret id of the key (first 12 hex digits of its digest), or
    /// `anonymous` on an open server without a token.
    pub key_id: String,
    pub tenant: String,
    pub admin: bool,
    /// Models the key may call; `None` = any its tenant can see.
    pub models: Option<Arc<[String]>>,
    /// Tasks the key may train on (their approved logs) and whose alias its jobs may replace.
    pub train_tasks: Arc<[String]>,
    /// What the per-key limits count under: the key id, or one shared name on an open server
    /// (a fresh bearer token per request must not be a fresh budget).
    pub limit_key: String,
}

/// The tenant of every caller on an open (keyless) server: one operator, on loopback.
pub const OPEN_TENANT: &str = "local";

impl Caller {
    /// Whether this caller may see or change an object owned by `owner` (`None`: made
    /// before tenancy existed, or by the operator: admins only).
    pub fn owns(&self, owner: Option<&str>) -> bool {
        self.admin || owner == Some(self.tenant.as_str())
    }

    /// The tenant to filter lists by: `None` (everything) for admins.
    pub fn tenant_filter(&self) -> Option<String> {
        (!self.admin).then(|| self.tenant.clone())
    }

    /// Whether the key's `models` list allows calling `model` (checked before the router
    /// looks at adapter owners).
    pub fn may_call(&self, model: &str) -> bool {
        self.admin || self.models.as_ref().is_none_or(|m| m.iter().any(|x| x == model))
    }

    /// Whether the key may train on `task`'s logs and replace its alias.
    pub fn may_train(&self, task: &str) -> bool {
        self.admin || self.train_tasks.iter().any(|t| t == task)
    }

}

#[derive(Debug, Clone)]
struct Key {
    hash: KeyHash,
    tenant: String,
    admin: bool,
    models: Option<Arc<[String]>>,
    train_tasks: Arc<[String]>,
}

#[derive(Debug, Clone)]
pub struct Auth {
    keys: Vec<Key>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Client,
    Admin,
}

impl Auth {
    pub fn new(cfg: &AuthConfig) -> Self {
        let plain = |hash: &KeyHash, admin: bool| Key {
            hash: *hash,
            tenant: format!("key-{}", key_id(hash)),
            admin,
            models: None,
            train_tasks: Arc::from(Vec::new()),
        };
        let named = cfg.keys.iter().map(|k| Key {
            hash: k.hash,
            tenant: k.tenant.clone(),
            admin: k.admin,
            models: k.models.clone().map(Arc::from),
            train_tasks: Arc::from(k.train_tasks.clone()),
        });
        let mut keys: Vec<Key> = named.collect();
        keys.extend(cfg.admin_keys.iter().map(|h| plain(h, true)));
        keys.extend(cfg.api_keys.iter().map(|h| plain(h, false)));
        Self { keys }
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks an `Authorization` header value for a scope.
    pub fn authenticate(&self, authorization: Option<&str>, scope: Scope) -> Result<Caller, ApiError> {
        let token = authorization.and_then(bearer);
        if self.is_open() {
            let key_id = token.map(|t| key_id(&digest(t))).unwrap_or_else(|| "anonymous".into());
            return Ok(Caller {
                key_id,
                tenant: OPEN_TENANT.into(),
                admin: true,
                models: None,
                train_tasks: Arc::from(Vec::new()),
                limit_key: OPEN_TENANT.into(),
            });
        }
        let Some(token) = token else {
            return Err(ApiError::new(
                ErrorKind::MissingApiKey,
                "You didn't provide an API key. Provide it in an Authorization header using Bearer auth \
                 (Authorization: Bearer YOUR_KEY).",
            ));
        };
        let d = digest(token);
        let Some(key) = find(&d, &self.keys) else {
            return Err(ApiError::new(ErrorKind::InvalidApiKey, "Incorrect API key provided."));
        };
        if scope == Scope::Admin && !key.admin {
            return Err(ApiError::new(
                ErrorKind::InsufficientScope,
                "This route needs an admin key (auth.admin_keys); the key provided is a client key.",
            ));
        }
        let id = key_id(&d);
        Ok(Caller {
            limit_key: id.clone(),
            key_id: id,
            tenant: key.tenant.clone(),
            admin: key.admin,
            models: key.models.clone(),
            train_tasks: key.train_tasks.clone(),
        })
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
/// which (or whether any) key matched. The first matching entry wins.
fn find<'a>(d: &KeyHash, keys: &'a [Key]) -> Option<&'a Key> {
    let mut found = None;
    for k in keys {
        let hit: bool = k.hash.ct_eq(d).into();
        if hit && found.is_none() {
            found = Some(k);
        }
    }
    found
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
        Auth::new(&AuthConfig {
            api_keys: vec![digest("client-key")],
            admin_keys: vec![digest("admin-key")],
            ..AuthConfig::default()
        })
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
