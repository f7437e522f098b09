//! The inputs of the indexer bench, from the command line: a Mooncake trace
//! (repeated with disjoint ids) and the generated conversation stream.

use std::path::PathBuf;

use kvrouter::replay::read_trace;

use crate::stream::{conversation_trace, copies, Assign, ConversationConfig, Stream, StreamConfig};

/// Flags shared by the indexer bench binaries.
#[derive(clap::Parser, Debug, Clone)]
pub struct Args {
    /// Mooncake JSONL trace; none: only the conversation stream.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Copies of the trace, with disjoint block ids, interleaved in time.
    #[arg(long, default_value_t = 4)]
    pub copies: u64,
    /// Conversation sessions (0: none).
    #[arg(long, default_value_t = 4000)]
    pub sessions: u64,
    /// Writes the generated conversation trace here (Mooncake JSONL).
    #[arg(long)]
    pub write_trace: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub workers: u32,
    /// Blocks (512 tokens each) a worker's cache holds.
    #[arg(long, default_value_t = 1024)]
    pub capacity: usize,
    /// Core counts to run (each pins the process to that many CPUs).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub cores: Vec<usize>,
    /// Prompts whose answers are compared across indexes.
    #[arg(long, default_value_t = 2000)]
    pub check: usize,
}

impl Args {
    /// Parses the process's arguments (`cargo bench` adds `--bench`: dropped).
    pub fn from_env() -> Self {
        use clap::Parser;
        Self::parse_from(std::env::args().filter(|a| a != "--bench"))
    }
}

/// One input: the stream replayed, and a second fleet's writes for the
/// concurrent writer.
pub struct Input {
    pub name: String,
    pub stream: Stream,
    pub writer: Stream,
}

/// Ids of the concurrent writer's fleet start here (tokens are u32).
const WRITER_IDS: u64 = 1 << 31;

/// The inputs the flags ask for.
pub fn inputs(args: &Args) -> anyhow::Result<Vec<Input>> {
    let mut out = Vec::new();
    let cfg = StreamConfig {
        workers: args.workers,
        capacity: args.capacity,
        worker_base: 0,
        id_base: 0,
        drain_at_end: false,
    };
    let writer_cfg = StreamConfig {
        worker_base: args.workers,
        id_base: WRITER_IDS,
        drain_at_end: true,
        ..cfg
    };
    if args.sessions > 0 {
        let (reqs, sessions) = conversation_trace(&ConversationConfig {
            sessions: args.sessions,
            ..ConversationConfig::default()
        });
        if let Some(p) = &args.write_trace {
            crate::stream::write_jsonl(p, &reqs)?;
        }
        out.push(Input {
            name: format!("conversation ({} sessions)", args.sessions),
            stream: Stream::build(&reqs, &sessions, Assign::Sticky, cfg),
            writer: Stream::build(&reqs, &sessions, Assign::Sticky, writer_cfg),
        });
    }
    if let Some(path) = &args.trace {
        let reqs = copies(&read_trace(path)?, args.copies);
        let name = path
            .file_name()
            .map_or("trace".into(), |n| n.to_string_lossy().into_owned());
        out.push(Input {
            name: format!("{name} x{}", args.copies),
            stream: Stream::build(&reqs, &[], Assign::Spread, cfg),
            writer: Stream::build(&reqs, &[], Assign::Spread, writer_cfg),
        });
    }
    Ok(out)
}

/// A one-line description of an input's stream.
pub fn describe(i: &Input) -> String {
    let s = &i.stream;
    let lookups = s.prompts.len();
    let blocks: usize = s.prompts.iter().map(Vec::len).sum();
    format!(
        "{}: {lookups} lookups (mean {:.1} blocks), {} blocks stored, {} removed, {} holdings ({} distinct blocks) at the end",
        i.name,
        blocks as f64 / lookups.max(1) as f64,
        s.stored,
        s.removed,
        s.holdings,
        s.distinct
    )
}
