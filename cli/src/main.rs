//! `kvtier` — the command-line client of kvtier: namespaces, blocks, lookup,
//! stats, benchmarks and trace replay. See `kvtier --help`.

mod bench;
mod blocks;
mod replay;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kvtier_client::{Client, Credentials, DEFAULT_SOCKET};

#[derive(Parser)]
#[command(name = "kvtier", version, about = "kvtier command-line client")]
struct Cli {
    /// kvbm address: a Unix socket path, unix:/path, or http://host:port.
    #[arg(long, global = true, env = "KVTIER_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: String,
    /// CA (PEM) to check kvbm's TLS certificate against (https:// addresses).
    #[arg(long, global = true, env = "KVTIER_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, env = "KVTIER_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, global = true, env = "KVTIER_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// File holding the bearer token kvbm's TCP port asks for.
    #[arg(long, global = true, env = "KVTIER_AUTH_TOKEN_FILE")]
    auth_token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Namespaces (one per KV layout).
    Ns {
        #[command(subcommand)]
        cmd: blocks::NsCmd,
    },
    /// Put or get one block.
    Block {
        #[command(subcommand)]
        cmd: blocks::BlockCmd,
    },
    /// Longest prefix of a key chain present, per tier.
    Lookup(blocks::LookupArgs),
    /// Wait until write-behind is on disk; prints the durable block count
    /// and the blocks that are not durable (their write was dropped or
    /// failed). Exits 1 when some are not.
    Sync {
        /// Write dropped blocks again, waiting for room in the write queue.
        #[arg(long)]
        retry_dropped: bool,
        /// List the blocks that are not durable (namespace and hex key).
        #[arg(long)]
        list: bool,
    },
    /// Daemon statistics.
    Stats {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks against a plain baseline in the same run.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
    /// Replay a request trace against simulated engines and compare routing
    /// policies (the router's real index and scoring, in-process).
    Replay(replay::ReplayArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvtier: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvtier: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let creds = Credentials {
        tls_ca: cli.tls_ca,
        tls_cert: cli.tls_cert,
        tls_key: cli.tls_key,
        token_file: cli.auth_token_file,
    };
    let connect = |addr: &str| {
        let addr = addr.to_string();
        let creds = creds.clone();
        async move { anyhow::Ok(Client::connect_with(&addr, &creds).await?) }
    };
    match cli.cmd {
        Cmd::Bench { cmd } => bench::run(cmd).await.map(|_| ExitCode::SUCCESS),
        Cmd::Replay(args) => tokio::task::spawn_blocking(move || replay::run(args))
            .await?
            .map(|_| ExitCode::SUCCESS),
        Cmd::Ns { cmd } => blocks::ns(&connect(&cli.socket).await?, cmd).await,
        Cmd::Block { cmd } => blocks::block(&connect(&cli.socket).await?, cmd).await,
        Cmd::Lookup(args) => blocks::lookup(&connect(&cli.socket).await?, args).await,
        Cmd::Sync {
            retry_dropped,
            list,
        } => {
            let req = kvtier_proto::v1::SyncRequest {
                retry_dropped,
                list_not_durable: list,
            };
            let r = connect(&cli.socket).await?.sync_report(req).await?;
            println!(
                "{} blocks durable on disk; {} not durable (write dropped or failed); \
                 {} lost before being written",
                r.durable_blocks, r.not_durable, r.lost
            );
            for b in &r.not_durable_blocks {
                println!("not durable: {} {}", b.namespace, kvbm::store::hex(&b.key));
            }
            Ok(if r.not_durable > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Stats { json } => blocks::stats(&connect(&cli.socket).await?, json).await,
    }
}
