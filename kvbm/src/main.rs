//! `kvbm` — the kvtier block manager daemon. See `kvbm --help`.

use clap::Parser;
use kvbm::config::{Config, Flags};

fn main() -> std::process::ExitCode {
    // Everything the daemon creates (catalog, disk tier, sockets) holds or
    // reaches users' prompts: private unless a mode is set explicitly.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVBM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // A connection is a descriptor: serve as many as the hard limit allows.
    if let Err(e) = kvtier_net::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise the descriptor limit");
    }
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

/// Resolves on SIGTERM, SIGINT or SIGHUP: each stops the daemon cleanly (a
/// closed terminal or `systemctl kill -s HUP` must not lose write-behind).
/// The configuration is read at start only, so SIGHUP has nothing to reload.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down");
}
