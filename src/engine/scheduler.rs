//! The engine thread (stub; being written).

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use super::{EngineConfig, EngineError, SamplingParams, Shared, StreamEvent};
use crate::adapters::{AdapterLease, AdapterRegistry};

pub(crate) enum Command {
    Generate(Box<Pending>),
    Wake,
}

pub(crate) struct Pending {
    pub tokens: Vec<u32>,
    pub params: SamplingParams,
    pub adapter: Option<AdapterLease>,
    pub tx: tokio::sync::mpsc::UnboundedSender<StreamEvent>,
    pub submitted: std::time::Instant,
}

pub(crate) struct Context {
    pub config: Arc<EngineConfig>,
    pub shared: Arc<Shared>,
    pub registry: Arc<AdapterRegistry>,
    pub queued: Arc<AtomicUsize>,
    pub rx: std::sync::mpsc::Receiver<Command>,
}

pub(crate) fn spawn(ctx: Context) {
    let _ = ctx.shared.load_error.set(EngineError::Load("engine not written yet".into()));
}
