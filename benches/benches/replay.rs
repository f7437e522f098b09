//! Trace replay policy comparison through the same code and flags as
//! `kvtier replay` (`cli/src/replay.rs`):
//! `cargo bench -p kvtier-benches --bench replay -- --trace FILE [--workers N]
//! [--gpu-tokens N] [--host-tokens N] [--disk-tokens N] [--remote-tokens N]
//! [--policies kv,...] [--json]`.

#[path = "../../cli/src/replay.rs"]
mod cli_replay;

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: cli_replay::ReplayArgs,
}

fn main() -> anyhow::Result<()> {
    // cargo bench passes `--bench`; drop it
    let argv: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let cli = Cli::parse_from(argv);
    cli_replay::run(cli.args)
}
