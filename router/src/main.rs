//! `kvrouter`: the global KV-aware router.
//!
//! ```text
//! kvrouter [--http ADDR] [--grpc ADDR] [--config FILE] [--max-blocks N] [--temperature T]
//! ```
//!
//! Precedence: flag, then environment (`KVROUTER_HTTP`, `KVROUTER_GRPC`,
//! `KVROUTER_CONFIG`, `KVROUTER_MAX_BLOCKS`, `KVROUTER_TEMPERATURE`,
//! `KVROUTER_LOG`), then the TOML file, then the defaults (HTTP
//! `0.0.0.0:8090`, gRPC `0.0.0.0:9002`). Prints where it listens on stdout.

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use kvrouter::config::Config;

#[derive(Debug, Parser)]
#[command(name = "kvrouter", version, about = "kvtier's global KV-aware router")]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "KVROUTER_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP listen address [default: 0.0.0.0:8090].
    #[arg(long, env = "KVROUTER_HTTP")]
    http: Option<String>,
    /// gRPC listen address (router, ext_proc, health) [default: 0.0.0.0:9002].
    #[arg(long, env = "KVROUTER_GRPC")]
    grpc: Option<String>,
    /// Most holdings in the index [default: 20000000].
    #[arg(long, env = "KVROUTER_MAX_BLOCKS")]
    max_blocks: Option<usize>,
    /// Softmax temperature of the choice; 0 = lowest estimate [default: 0].
    #[arg(long, env = "KVROUTER_TEMPERATURE")]
    temperature: Option<f64>,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "KVROUTER_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(h) = args.http {
        cfg.http = h;
    }
    if let Some(g) = args.grpc {
        cfg.grpc = g;
    }
    if let Some(m) = args.max_blocks {
        cfg.index.max_blocks = m;
    }
    if let Some(t) = args.temperature {
        anyhow::ensure!(t.is_finite() && t >= 0.0, "--temperature must be >= 0");
        cfg.scoring.temperature = t;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let running = kvrouter::api::start(cfg).await?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "kvrouter: HTTP listening on {}", running.http_addr)?;
            writeln!(
                out,
                "kvrouter: gRPC (router, ext_proc, health) listening on {}",
                running.grpc_addr
            )?;
            out.flush()?;
        }
        tokio::select! {
            _ = running.wait() => {}
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
            }
        }
        Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
