use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = confab::cli::Cli::parse();
    let level = confab::cli::load_config(cli.config.as_ref())
        .map(|c| c.log_level)
        .unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::try_from_env("CONFAB_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(confab::cli::run(cli))
}
