//! The proxy's logs: to stderr, as text or one JSON object per line, with a filter that the
//! admin API can change at run time.
use clap::ValueEnum;

/// Sets the log filter (an `EnvFilter` directive such as `debug` or `info,ztunnel=trace`).
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr; returns how to change the filter at run time (the admin API's `/logging`).
pub fn init(format: LogFormat) -> (String, SetLogLevel) {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _, EnvFilter};
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
    }
    let set: SetLogLevel = Box::new(move |directive: &str| {
        let filter = EnvFilter::try_new(directive)
            .map_err(|e| format!("bad log filter {directive:?}: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    (initial, set)
}
