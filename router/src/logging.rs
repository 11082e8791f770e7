//! Log setup: tracing to stderr as text or JSON. The level can change on reload; the format
//! is fixed at start (switching writers under a running subscriber is not worth the risk).

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::{Log, LogFormat};

/// Changes the level of a running logger.
#[derive(Debug, Clone)]
pub struct LevelHandle(reload::Handle<EnvFilter, Registry>);

fn filter(log: &Log) -> EnvFilter {
    // RUST_LOG, when set, wins: it is how an operator debugs one module without a reload.
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(log.level.as_str()))
}

pub fn init(log: &Log) -> LevelHandle {
    let (filter_layer, handle) = reload::Layer::new(filter(log));
    let registry = tracing_subscriber::registry().with(filter_layer);
    // Colour only for a person at a terminal; files and `kubectl logs` get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // A second init (tests) is not an error worth failing over.
    let _ = match log.format {
        LogFormat::Text => registry.with(fmt.with_target(false)).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
    LevelHandle(handle)
}

impl LevelHandle {
    pub fn set(&self, log: &Log) {
        if let Err(e) = self.0.reload(filter(log)) {
            tracing::warn!(error = %e, "could not change the log level");
        }
    }
}
