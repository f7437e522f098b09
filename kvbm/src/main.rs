//! `kvbm` — the kvtier block manager daemon. See `kvbm --help`.

use clap::Parser;
use kvbm::config::{Config, Flags};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVBM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = match Config::load(Flags::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvbm: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvbm: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvbm: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> kvbm::Result<()> {
    let (store, listening, listeners) = kvbm::server::start(cfg.clone()).await?;
    // One line on stdout that scripts and tests read to find the daemon.
    println!(
        "kvbm listening {listening} data_dir={} host_bytes={} disk_bytes={}",
        cfg.data_dir.display(),
        store.pool().len(),
        cfg.disk_bytes
    );
    kvbm::server::serve(store, listeners, shutdown_signal()).await
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
