use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, EnvFilter};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = confab::cli::Cli::parse();
    // A configuration that does not load is reported by the command itself; the logger
    // then uses the defaults.
    let (level, format) = confab::cli::load_config(cli.config.as_ref())
        .map(|c| (c.log_level, c.log_format))
        .unwrap_or_else(|_| ("info".to_string(), confab::config::LogFormat::Human));
    // CONFAB_LOG overrides the configured level, also across reloads.
    let from_env = EnvFilter::try_from_env("CONFAB_LOG").ok();
    let fixed = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    let json = format == confab::config::LogFormat::Json;
    // One of the two is Some: an absent layer does nothing.
    let human = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    // One JSON object per line: timestamp, level, target, fields (message included)
    // at the top level, for log collectors (journald, Loki, Elasticsearch).
    let json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(human)
        .with(json)
        .init();
    if !fixed {
        confab::cli::set_log_reloader(Box::new(move |level: &str| {
            let _ = handle.reload(EnvFilter::new(level));
        }));
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(confab::cli::run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain: an administrator's terminal is not
            // the place for a backtrace (returning the error from main would print one
            // whenever RUST_BACKTRACE is set).
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
