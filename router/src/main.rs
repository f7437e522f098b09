//! `kvrouter`: the global KV-aware router.
//!
//! ```text
//! kvrouter [--http ADDR] [--grpc ADDR] [--config FILE] [--max-blocks N] [--temperature T]
//!          [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]] [--auth-token-file FILE]
//! ```
//!
//! Precedence: flag, then environment (`KVROUTER_HTTP`, `KVROUTER_GRPC`,
//! `KVROUTER_CONFIG`, `KVROUTER_MAX_BLOCKS`, `KVROUTER_TEMPERATURE`,
//! `KVROUTER_TLS_CERT`, `KVROUTER_TLS_KEY`, `KVROUTER_TLS_CLIENT_CA`,
//! `KVROUTER_AUTH_TOKEN_FILE`, `KVROUTER_LOG`), then the TOML file, then the
//! defaults (HTTP `127.0.0.1:8090`, gRPC `127.0.0.1:9002`, no TLS, no token). Prints where it listens on
//! stdout. SIGTERM, SIGINT and SIGHUP shut it down cleanly: listeners
//! close, requests in progress get up to 5 s, the exit status is 0.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Parser;
use kvrouter::config::Config;

#[derive(Debug, Parser)]
#[command(name = "kvrouter", version, about = "kvtier's global KV-aware router")]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "KVROUTER_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8090].
    #[arg(long, env = "KVROUTER_HTTP")]
    http: Option<String>,
    /// gRPC listen address (router, ext_proc, health) [default: 127.0.0.1:9002].
    #[arg(long, env = "KVROUTER_GRPC")]
    grpc: Option<String>,
    /// Most holdings in the index [default: 20000000].
    #[arg(long, env = "KVROUTER_MAX_BLOCKS")]
    max_blocks: Option<usize>,
    /// Softmax temperature of the choice; 0 = lowest estimate [default: 0].
    #[arg(long, env = "KVROUTER_TEMPERATURE")]
    temperature: Option<f64>,
    /// Certificate chain (PEM) both listeners serve TLS with [default: none, plain].
    #[arg(long, env = "KVROUTER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert [default: none].
    #[arg(long, env = "KVROUTER_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) clients' certificates must chain to: mutual TLS [default: none].
    #[arg(long, env = "KVROUTER_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// File holding the bearer token every request but health checks must
    /// present [default: none].
    #[arg(long, env = "KVROUTER_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
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
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match kvtier_net::raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the descriptor limit"),
    }
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
    for (arg, key) in [
        (args.tls_cert, &mut cfg.tls_cert),
        (args.tls_key, &mut cfg.tls_key),
        (args.tls_client_ca, &mut cfg.tls_client_ca),
        (args.auth_token_file, &mut cfg.auth_token_file),
    ] {
        if arg.is_some() {
            *key = arg;
        }
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
        // Before the addresses are printed: whoever reads them may signal
        // at once, and an unhandled SIGHUP would kill the process.
        let mut signals = Signals::new()?;
        let mut running = kvrouter::api::start(cfg).await?;
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
            _ = running.wait() => anyhow::bail!("a server task ended"),
            signal = signals.recv() => tracing::info!(signal, "shutting down"),
        }
        running.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// The signals that end the process cleanly. SIGHUP is one of them: a
/// closed terminal or a supervisor's reload must not kill the router
/// mid-request.
struct Signals {
    #[cfg(unix)]
    streams: Vec<(&'static str, tokio::signal::unix::Signal)>,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            streams: vec![
                ("SIGTERM", signal(SignalKind::terminate())?),
                ("SIGINT", signal(SignalKind::interrupt())?),
                ("SIGHUP", signal(SignalKind::hangup())?),
            ],
        })
    }

    #[cfg(not(unix))]
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {})
    }

    /// The name of the first signal received.
    #[cfg(unix)]
    async fn recv(&mut self) -> &'static str {
        let waits = self.streams.iter_mut().map(|(name, s)| {
            Box::pin(async move {
                s.recv().await;
                *name
            })
        });
        futures::future::select_all(waits).await.0
    }

    #[cfg(not(unix))]
    async fn recv(&mut self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}
