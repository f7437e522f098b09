//! Measures the G4 block codecs (`kvbm::remote::codec`): the ratio and the
//! single-core speed of lz4 and zstd, with and without AES-256-GCM, on raw
//! KV bytes from a file or on synthetic data.
//!
//! ```sh
//! cargo build -p kvbm --example g4_codec     # dependencies at opt-level 2
//! target/debug/examples/g4_codec --input kv.bin            # real KV bytes
//! target/debug/examples/g4_codec --synthetic bf16-normal   # the default
//! target/debug/examples/g4_codec --synthetic random
//! ```
//!
//! The input is cut into blocks of `--block-bytes` (a namespace's block
//! size; the tail that does not fill one is left out), each encoded and
//! decoded as the tier does. Speeds are raw bytes per second on one thread
//! (MB = 10^6 bytes), the fastest of `--repeat` passes; the ratio is stored
//! bytes over raw bytes (AES adds 36 bytes per block; a block that does not
//! get smaller is stored raw).

use std::time::Instant;

use bytes::Bytes;
use clap::Parser;
use kvbm::config::{Compression, Size};
use kvbm::remote::codec::Codec;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
#[command(about = "G4 block codecs: ratio and speed")]
struct Args {
    /// Raw KV bytes (e.g. a dump of a host-pool namespace's blocks).
    #[arg(long, conflicts_with = "synthetic")]
    input: Option<std::path::PathBuf>,
    /// Synthetic input: bf16-normal (bf16 values of N(0, 1), roughly what
    /// KV activations look like) or random (incompressible bytes).
    #[arg(long, default_value = "bf16-normal")]
    synthetic: String,
    /// Block size.
    #[arg(long, default_value = "2MiB")]
    block_bytes: Size,
    /// Bytes to measure (synthetic: generated; a file: read at most).
    #[arg(long, default_value = "256MiB")]
    bytes: Size,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Passes over the input per codec; the fastest counts (a loaded
    /// machine slows some passes down).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
}

fn synthetic(kind: &str, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut v = vec![0u8; len];
    match kind {
        "random" => rng.fill(&mut v[..]),
        "bf16-normal" => {
            for pair in v.chunks_exact_mut(4) {
                // Box-Muller: two N(0, 1) values, each rounded to bf16 (the
                // high half of the f32, rounded to nearest even).
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                let r = (-2.0 * u1.ln()).sqrt();
                let t = 2.0 * std::f64::consts::PI * u2;
                for (k, x) in [r * t.cos(), r * t.sin()].into_iter().enumerate() {
                    let bits = (x as f32).to_bits();
                    let bf16 = ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
                    pair[2 * k..2 * k + 2].copy_from_slice(&bf16.to_le_bytes());
                }
            }
        }
        other => panic!("--synthetic {other}: expected bf16-normal or random"),
    }
    v
}

fn main() {
    let args = Args::parse();
    let block = args.block_bytes.0 as usize;
    let data = match &args.input {
        Some(path) => {
            let mut d = std::fs::read(path).expect("read --input");
            d.truncate(args.bytes.0 as usize);
            d
        }
        None => synthetic(&args.synthetic, args.bytes.0 as usize),
    };
    let blocks: Vec<Bytes> = data
        .chunks_exact(block)
        .map(Bytes::copy_from_slice)
        .collect();
    assert!(!blocks.is_empty(), "less than one block of input");
    let raw = (blocks.len() * block) as f64;
    let what = match &args.input {
        Some(p) => p.display().to_string(),
        None => args.synthetic.clone(),
    };
    println!(
        "input {what}: {} blocks of {block} bytes ({:.0} MB), zstd level {}",
        blocks.len(),
        raw / 1e6,
        args.zstd_level
    );
    println!("| codec | stored / raw | encode MB/s | decode MB/s |");
    println!("|---|---|---|---|");
    let key = [0x42u8; 32];
    for (name, comp, enc) in [
        ("none + AES-256-GCM", Compression::None, true),
        ("lz4", Compression::Lz4, false),
        ("zstd", Compression::Zstd, false),
        ("lz4 + AES-256-GCM", Compression::Lz4, true),
        ("zstd + AES-256-GCM", Compression::Zstd, true),
    ] {
        let codec = Codec::new(comp, args.zstd_level, enc.then_some(&key));
        let (mut enc_s, mut dec_s) = (f64::MAX, f64::MAX);
        let mut stored = Vec::new();
        for _ in 0..args.repeat.max(1) {
            let mut e = codec.encoder();
            let t = Instant::now();
            stored = blocks
                .iter()
                .map(|b| e.encode("ns", b"key", b.clone()).expect("encodes"))
                .collect::<Vec<(u8, u32, Bytes)>>();
            enc_s = enc_s.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let decoded: Vec<Bytes> = stored
                .iter()
                .map(|(c, n, s)| {
                    codec
                        .open("ns", b"key", *c, *n, s.clone(), block as u64)
                        .expect("decodes")
                })
                .collect();
            dec_s = dec_s.min(t.elapsed().as_secs_f64());
            assert!(decoded == blocks, "{name}: round trip");
        }
        let bytes: usize = stored.iter().map(|(_, _, s)| s.len()).sum();
        let compressed = stored.iter().filter(|(c, _, _)| c & 3 != 0).count();
        // Blocks stored raw in the clear are served without a copy.
        let dec = if stored.iter().all(|(c, _, _)| *c == 0) {
            "no copy".to_string()
        } else {
            format!("{:.0}", raw / dec_s / 1e6)
        };
        println!(
            "| {name} | {:.3} ({compressed}/{} blocks compressed) | {:.0} | {dec} |",
            bytes as f64 / raw,
            stored.len(),
            raw / enc_s / 1e6,
        );
    }
}
