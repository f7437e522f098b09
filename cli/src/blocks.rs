//! `kvtier ns`, `block`, `lookup` and `stats`.

use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kvtier_client::{v1, Client};

#[derive(Subcommand)]
pub enum NsCmd {
    /// Register a namespace (idempotent for the same block size).
    Create {
        name: String,
        /// Bytes per block.
        #[arg(long)]
        block_bytes: u64,
    },
    /// List namespaces.
    List,
}

#[derive(Subcommand)]
pub enum BlockCmd {
    /// Store a block read from standard input.
    Put {
        #[arg(long)]
        ns: String,
        /// Block key, hex (1 to 32 bytes).
        #[arg(long)]
        key: String,
        /// Parent block key, hex.
        #[arg(long)]
        parent: Option<String>,
    },
    /// Write a block to standard output; exit code 1 on a miss.
    Get {
        #[arg(long)]
        ns: String,
        #[arg(long)]
        key: String,
    },
}

#[derive(Args)]
pub struct LookupArgs {
    #[arg(long)]
    ns: String,
    /// Keys of the chain, hex, root first.
    #[arg(required = true)]
    keys: Vec<String>,
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    let s = s.trim();
    if s.is_empty() || !s.len().is_multiple_of(2) {
        bail!("invalid hex key {s:?}: expected an even number of hex digits");
    }
    // By bytes, not by string slices: a multi-byte character would split a
    // slice inside a character (a panic) rather than fail to parse.
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(hi), Some(lo)) => Ok((hi * 16 + lo) as u8),
                _ => bail!("invalid hex key {s:?}"),
            }
        })
        .collect()
}

pub async fn ns(client: &Client, cmd: NsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        NsCmd::Create { name, block_bytes } => {
            let ns = client.register_namespace(&name, block_bytes).await?;
            println!(
                "namespace {} id={} block_bytes={}",
                ns.name, ns.id, ns.block_bytes
            );
        }
        NsCmd::List => {
            let list = client
                .rpc()
                .list_namespaces(v1::ListNamespacesRequest {})
                .await?
                .into_inner();
            for ns in list.namespaces {
                let model = ns.layout.map(|l| l.model).unwrap_or_default();
                println!(
                    "{}\tid={}\tblock_bytes={}\tmodel={model}",
                    ns.name, ns.id, ns.block_bytes
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn block(client: &Client, cmd: BlockCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BlockCmd::Put { ns, key, parent } => {
            let mut data = Vec::new();
            std::io::stdin()
                .read_to_end(&mut data)
                .context("reading the block from standard input")?;
            let block = v1::BlockMeta {
                key: unhex(&key)?,
                parent: parent
                    .as_deref()
                    .map(unhex)
                    .transpose()?
                    .unwrap_or_default(),
                token_ids: vec![],
            };
            let stored = client
                .rpc()
                .put(v1::PutRequest {
                    namespace: ns,
                    block: Some(block),
                    data,
                })
                .await?
                .into_inner()
                .stored;
            eprintln!("{}", if stored { "stored" } else { "already present" });
            Ok(ExitCode::SUCCESS)
        }
        BlockCmd::Get { ns, key } => {
            let r = client
                .rpc()
                .get(v1::GetRequest {
                    namespace: ns.clone(),
                    key: unhex(&key)?,
                })
                .await;
            match r {
                Ok(resp) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&resp.into_inner().data)?;
                    out.flush()?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    eprintln!("kvtier: miss: {}", s.message());
                    Ok(ExitCode::from(1))
                }
                Err(s) => Err(s.into()),
            }
        }
    }
}

pub async fn lookup(client: &Client, args: LookupArgs) -> anyhow::Result<ExitCode> {
    let keys = args
        .keys
        .iter()
        .map(|k| unhex(k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let n = keys.len();
    let r = client.lookup(&args.ns, keys).await?;
    let per_tier: Vec<String> = r
        .tiers
        .iter()
        .map(|t| format!("{}={}", tier_name(t.tier), t.blocks))
        .collect();
    println!("matched {}/{} {}", r.matched, n, per_tier.join(" "));
    Ok(ExitCode::SUCCESS)
}

fn tier_name(t: i32) -> &'static str {
    match v1::Tier::try_from(t) {
        Ok(v1::Tier::Gpu) => "gpu",
        Ok(v1::Tier::Host) => "host",
        Ok(v1::Tier::Disk) => "disk",
        Ok(v1::Tier::Remote) => "remote",
        _ => "unknown",
    }
}

pub async fn stats(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let s = client.stats().await?;
    if json {
        let tiers: Vec<serde_json::Value> = s
            .tiers
            .iter()
            .map(|t| {
                serde_json::json!({
                    "tier": tier_name(t.tier),
                    "capacity_bytes": t.capacity_bytes,
                    "used_bytes": t.used_bytes,
                    "blocks": t.blocks,
                    "hits": t.hits,
                    "misses": t.misses,
                    "evictions": t.evictions,
                    "dropped_writes": t.dropped_writes,
                    "checksum_failures": t.checksum_failures,
                    "degraded": t.degraded,
                    "degraded_reason": t.degraded_reason,
                    "read_bytes_per_s": t.read_bytes_per_s,
                    "write_bytes_per_s": t.write_bytes_per_s,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "incarnation": s.incarnation,
                "event_seq": s.event_seq,
                "namespaces": s.namespaces,
                "index_blocks": s.index_blocks,
                "index_bytes": s.index_bytes,
                "tiers": tiers,
            })
        );
    } else {
        println!(
            "incarnation {}  events {}  namespaces {}  indexed blocks {} ({} bytes)",
            s.incarnation, s.event_seq, s.namespaces, s.index_blocks, s.index_bytes
        );
        println!("tier    blocks      used/capacity        hits    misses  evictions  dropped  checksum  state");
        for t in &s.tiers {
            println!(
                "{:<6} {:>7} {:>9}/{:<10} {:>9} {:>9} {:>10} {:>8} {:>9}  {}",
                tier_name(t.tier),
                t.blocks,
                human(t.used_bytes),
                human(t.capacity_bytes),
                t.hits,
                t.misses,
                t.evictions,
                t.dropped_writes,
                t.checksum_failures,
                if t.degraded {
                    format!("degraded: {}", t.degraded_reason)
                } else {
                    "ok".into()
                }
            );
            if t.read_bytes_per_s + t.write_bytes_per_s > 0 {
                println!(
                    "       measured: read {}/s, write {}/s",
                    human(t.read_bytes_per_s),
                    human(t.write_bytes_per_s)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1}{}", U[i])
}

#[cfg(test)]
mod tests {
    use super::unhex;

    #[test]
    fn hex_keys() {
        assert_eq!(unhex("00ff10").unwrap(), vec![0, 255, 16]);
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
        assert!(unhex("").is_err());
        // Non-ASCII input, including characters that straddle a digit pair.
        assert!(unhex("é").is_err());
        assert!(unhex("0é0").is_err());
        assert!(unhex("€0").is_err());
        assert!(unhex("+1").is_err());
    }
}
