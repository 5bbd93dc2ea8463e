//! The router: turns a request's `model` string into what serves it (the base model, or an
//! adapter generation leased for the request's life) and the *task* the request belongs to.
//!
//! Accepted names: the base model's name, an adapter alias, `base:alias`, and fine-tuned
//! model names (which are registered as aliases). An unknown name is an error, never a
//! fallback to the base. No HTTP types here; the API maps `RouteError` to its status.

use std::sync::Arc;

use crate::adapters::{prompt_hash, AdapterLease, AdapterRegistry};
use crate::engine::ChatMessage;

/// The outcome of routing one request.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The name the client asked for, echoed in responses.
    pub model: String,
    /// The generation the request runs on; `None` for the base model.
    pub adapter: Option<AdapterLease>,
    /// What the request is logged and measured under: the alias it called, else
    /// `metadata.task`, else the model name.
    pub task: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("The model '{0}' does not exist or you do not have access to it.")]
    ModelNotFound(String),
}

/// The tenant that owns an adapter: `owner` in its `tunegate.json`, written by a client
/// key's fine-tuning job. `None`: the operator's adapter, callable by every key its
/// `models` list allows.
pub fn adapter_owner(meta: Option<&serde_json::Value>) -> Option<&str> {
    meta?.get("owner")?.as_str()
}

/// What a model name refers to, without taking a lease (for `/v1/models/{id}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Base,
    Adapter(String),
}

#[derive(Debug, Clone)]
pub struct Router {
    base: String,
    registry: Arc<AdapterRegistry>,
}

impl Router {
    pub fn new(base: impl Into<String>, registry: Arc<AdapterRegistry>) -> Self {
        Self { base: base.into(), registry }
    }

    pub fn base_name(&self) -> &str {
        &self.base
    }

    pub fn registry(&self) -> &Arc<AdapterRegistry> {
        &self.registry
    }

    /// Which alias (if any) a name designates, by its spelling alone.
    fn parse(&self, model: &str) -> Option<ModelRef> {
        if model == self.base {
            return Some(ModelRef::Base);
        }
        if let Some((base, alias)) = model.split_once(':') {
            return (base == self.base && !alias.is_empty()).then(|| ModelRef::Adapter(alias.to_string()));
        }
        Some(ModelRef::Adapter(model.to_string()))
    }

    /// Resolves a name to the base or a *currently loaded* alias.
    pub fn resolve(&self, model: &str) -> Result<ModelRef, RouteError> {
        match self.parse(model) {
            Some(ModelRef::Base) => Ok(ModelRef::Base),
            Some(ModelRef::Adapter(alias)) if self.registry.lease(&alias).is_some() => Ok(ModelRef::Adapter(alias)),
            _ => Err(RouteError::ModelNotFound(model.to_string())),
        }
    }

    /// Routes a request, taking a lease on the adapter's current generation.
    pub fn route(&self, model: &str, metadata_task: Option<&str>) -> Result<Routed, RouteError> {
        let not_found = || RouteError::ModelNotFound(model.to_string());
        let (adapter, alias) = match self.parse(model).ok_or_else(not_found)? {
            ModelRef::Base => (None, None),
            ModelRef::Adapter(alias) => {
                let lease = self.registry.lease(&alias).ok_or_else(not_found)?;
                (Some(lease), Some(alias))
            }
        };
        let task = alias
            .or_else(|| metadata_task.map(str::trim).filter(|t| !t.is_empty()).map(str::to_string))
            .unwrap_or_else(|| model.to_string());
        Ok(Routed { model: model.to_string(), adapter, task })
    }

    /// The prompt rewrite of context distillation: when the request's adapter was trained
    /// with the task's system prompt absorbed (`distilled_prompt` in its `tunegate.json`)
    /// and the request carries exactly that prompt, the prompt is dropped. Returns the
    /// prompt tokens this saves (0 when nothing was dropped). Any other system prompt is
    /// kept as is.
    pub fn distill(&self, routed: &Routed, messages: &mut Vec<ChatMessage>) -> usize {
        let Some(adapter) = &routed.adapter else { return 0 };
        let Some(d) = adapter.meta.as_ref().and_then(|m| m.get("distilled_prompt")) else { return 0 };
        let (Some(hash), Some(tokens)) = (d.get("sha256").and_then(|h| h.as_str()), d.get("tokens").and_then(|t| t.as_u64()))
        else {
            return 0;
        };
        match messages.first() {
            Some(m) if m.role == "system" && prompt_hash(&m.content) == hash => {
                messages.remove(0);
                tokens as usize
            }
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::AdapterLimits;

    fn router() -> Router {
        Router::new("base-m", Arc::new(AdapterRegistry::new(AdapterLimits::default())))
    }

    #[test]
    fn base_routes_without_adapter_and_tags_task() -> Result<(), RouteError> {
        let r = router();
        let routed = r.route("base-m", None)?;
        assert!(routed.adapter.is_none());
        assert_eq!(routed.task, "base-m");
        assert_eq!(r.route("base-m", Some("support"))?.task, "support");
        assert_eq!(r.route("base-m", Some("  "))?.task, "base-m");
        Ok(())
    }

    #[test]
    fn unknown_names_are_not_found() {
        let r = router();
        for name in ["other", "base-m:", "base-m:missing", "other:alias", "", "missing"] {
            assert_eq!(r.route(name, None).map(|_| ()), Err(RouteError::ModelNotFound(name.to_string())));
            assert!(r.resolve(name).is_err(), "{name}");
        }
        assert_eq!(r.resolve("base-m"), Ok(ModelRef::Base));
    }
}
