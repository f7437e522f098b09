//! Engine event batches (vLLM / SGLang `KVEventBatch` in msgpack) → normalized
//! engine events.
//!
//! Every encoding that has shipped is accepted:
//!
//! - the batch as an array `[ts, events, data_parallel_rank?]` (msgspec
//!   `array_like`, vLLM ≤ 0.10 and SGLang) or as a map
//!   `{"ts", "events", "data_parallel_rank"?}` (newer vLLM);
//! - each event as a positional array tagged by its first element
//!   (`["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
//!   lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
//!   kv_cache_spec_sliding_window]`, `["BlockRemoved", block_hashes, medium,
//!   group_idx]`, `["AllBlocksCleared"]`; missing trailing fields are null) or
//!   as a map tagged by `"type"` (absent keys are null, unknown keys ignored);
//! - block hashes as 64-bit integers (signed or unsigned) or byte strings
//!   (msgpack bin or str, 1..=64 bytes), normalized as [`EngineHash`] says.
//!
//! A malformed batch yields an error; a malformed event inside a good batch
//! is reported and skipped while the others go through. Nothing here panics
//! on any input.

use super::msgpack::{self, Value};
use crate::event::{EngineHash, Tier};

/// Why something was rejected: the label of the `decode_errors` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DecodeErrorKind {
    /// A message with other than 3 frames (or a replay reply of a bad shape).
    Frames,
    /// A sequence frame that is not 8 bytes.
    Seq,
    /// Bytes that are not one msgpack value.
    Msgpack,
    /// A batch that is neither `[ts, events, ...]` nor a map with `events`.
    Batch,
    /// An event with a missing or wrongly typed field.
    Field,
    /// An event tag this router does not know.
    UnknownEvent,
    /// A block hash that is neither a 64-bit integer nor 1..=64 bytes.
    Hash,
    /// A `medium` this router cannot place in a tier.
    Medium,
    /// `token_ids` not `block_size` tokens per block hash.
    TokenCount,
    /// A message or batch over the configured size limits.
    TooLarge,
    /// A protobuf event from kvbm that cannot be used.
    Proto,
}

impl DecodeErrorKind {
    pub const ALL: [DecodeErrorKind; 11] = [
        DecodeErrorKind::Frames,
        DecodeErrorKind::Seq,
        DecodeErrorKind::Msgpack,
        DecodeErrorKind::Batch,
        DecodeErrorKind::Field,
        DecodeErrorKind::UnknownEvent,
        DecodeErrorKind::Hash,
        DecodeErrorKind::Medium,
        DecodeErrorKind::TokenCount,
        DecodeErrorKind::TooLarge,
        DecodeErrorKind::Proto,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorKind::Frames => "frames",
            DecodeErrorKind::Seq => "seq",
            DecodeErrorKind::Msgpack => "msgpack",
            DecodeErrorKind::Batch => "batch",
            DecodeErrorKind::Field => "field",
            DecodeErrorKind::UnknownEvent => "unknown_event",
            DecodeErrorKind::Hash => "hash",
            DecodeErrorKind::Medium => "medium",
            DecodeErrorKind::TokenCount => "token_count",
            DecodeErrorKind::TooLarge => "too_large",
            DecodeErrorKind::Proto => "proto",
        }
    }
}

/// A rejected batch or event: its kind and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub kind: DecodeErrorKind,
    pub reason: String,
}

impl DecodeError {
    pub fn new(kind: DecodeErrorKind, reason: impl Into<String>) -> Self {
        DecodeError {
            kind,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.reason)
    }
}

impl std::error::Error for DecodeError {}

/// One engine event, before the subscription adds source and model.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Stored {
        hashes: Vec<EngineHash>,
        parent: Option<EngineHash>,
        token_ids: Vec<u32>,
        block_size: u32,
        /// `lora_name`; when only the deprecated `lora_id` is present, its
        /// decimal string (so LoRA blocks never match base-model requests).
        lora_name: Option<String>,
        tier: Tier,
        /// `group_idx`, 0 when absent.
        group: u32,
    },
    Removed {
        hashes: Vec<EngineHash>,
        tier: Tier,
        group: Option<u32>,
    },
    AllCleared,
}

/// A decoded batch: the good events in order and the rejected ones.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DecodedBatch {
    pub ts: Option<f64>,
    pub dp_rank: Option<u32>,
    pub events: Vec<EngineEvent>,
    pub errors: Vec<DecodeError>,
}

/// Decodes one msgpack `KVEventBatch`. `max_events` bounds the events of
/// one batch (a larger batch is rejected whole, as `TooLarge`).
pub fn decode_batch(payload: &[u8], max_events: usize) -> Result<DecodedBatch, DecodeError> {
    let value = msgpack::decode(payload)
        .map_err(|e| DecodeError::new(DecodeErrorKind::Msgpack, e.to_string()))?;
    let (ts, events, dp_rank) = match &value {
        Value::Array(items) => (items.first(), items.get(1), items.get(2)),
        Value::Map(_) => (
            value.get("ts"),
            value.get("events"),
            value
                .get("data_parallel_rank")
                .or_else(|| value.get("dp_rank")),
        ),
        other => {
            return Err(DecodeError::new(
                DecodeErrorKind::Batch,
                format!("batch is a msgpack {}", other.kind()),
            ))
        }
    };
    let events = match events {
        Some(Value::Array(events)) => events,
        Some(other) => {
            return Err(DecodeError::new(
                DecodeErrorKind::Batch,
                format!("batch events is a {}", other.kind()),
            ))
        }
        None => {
            return Err(DecodeError::new(
                DecodeErrorKind::Batch,
                "batch has no events",
            ))
        }
    };
    if events.len() > max_events {
        return Err(DecodeError::new(
            DecodeErrorKind::TooLarge,
            format!("batch of {} events (limit {max_events})", events.len()),
        ));
    }
    let ts = match ts {
        Some(Value::Float(f)) => Some(*f),
        Some(Value::Int(i)) => Some(*i as f64),
        _ => None,
    };
    let dp_rank = match dp_rank {
        Some(Value::Int(i)) => u32::try_from(*i).ok(),
        _ => None,
    };
    let mut out = DecodedBatch {
        ts,
        dp_rank,
        events: Vec::with_capacity(events.len()),
        errors: Vec::new(),
    };
    for ev in events {
        match decode_event(ev) {
            Ok(Some(e)) => out.events.push(e),
            Ok(None) => {}
            Err(e) => out.errors.push(e),
        }
    }
    Ok(out)
}

/// Field access for both event encodings: position `i` of a tagged array,
/// or key `name` of a tagged map. Absent → `Nil`.
struct Fields<'v, 'a> {
    value: &'v Value<'a>,
}

const NIL: Value<'static> = Value::Nil;

impl<'v, 'a> Fields<'v, 'a> {
    fn get(&self, pos: usize, name: &str) -> &'v Value<'a> {
        match self.value {
            Value::Array(items) => items.get(pos).unwrap_or(&NIL),
            Value::Map(_) => self.value.get(name).unwrap_or(&NIL),
            _ => &NIL,
        }
    }
}

fn field_err(event: &str, name: &str, v: &Value<'_>) -> DecodeError {
    DecodeError::new(
        DecodeErrorKind::Field,
        format!("{event}.{name} is a {}", v.kind()),
    )
}

/// Decodes one event; `Ok(None)` for an event that carries nothing (a
/// `BlockStored` or `BlockRemoved` with no hashes).
pub fn decode_event(ev: &Value<'_>) -> Result<Option<EngineEvent>, DecodeError> {
    let tag = match ev {
        Value::Array(items) => items.first().and_then(Value::as_str),
        Value::Map(_) => ev.get("type").and_then(Value::as_str),
        other => {
            return Err(DecodeError::new(
                DecodeErrorKind::Field,
                format!("event is a {}", other.kind()),
            ))
        }
    };
    let Some(tag) = tag else {
        return Err(DecodeError::new(
            DecodeErrorKind::Field,
            "event without a string tag",
        ));
    };
    let f = Fields { value: ev };
    match tag {
        "BlockStored" => {
            let hashes = hash_list("BlockStored", f.get(1, "block_hashes"))?;
            let parent = match f.get(2, "parent_block_hash") {
                Value::Nil => None,
                v => Some(hash(v)?),
            };
            let token_ids = token_list(f.get(3, "token_ids"))?;
            let block_size = match f.get(4, "block_size") {
                Value::Int(n) if *n > 0 && *n <= u32::MAX as i128 => *n as u32,
                v => return Err(field_err("BlockStored", "block_size", v)),
            };
            let lora_id = match f.get(5, "lora_id") {
                Value::Nil => None,
                Value::Int(n) => Some(*n),
                v => return Err(field_err("BlockStored", "lora_id", v)),
            };
            let tier = medium(f.get(6, "medium"))?;
            let lora_name = match f.get(7, "lora_name") {
                Value::Nil => None,
                v @ Value::Str(_) => match v.as_str() {
                    Some(s) => Some(s.to_owned()),
                    None => return Err(field_err("BlockStored", "lora_name", v)),
                },
                v => return Err(field_err("BlockStored", "lora_name", v)),
            };
            // A LoRA is identified by name; vLLM before `lora_name` only
            // sent the id, which still must keep LoRA blocks apart.
            let lora_name = lora_name.or_else(|| lora_id.map(|id| id.to_string()));
            let group = group(f.get(9, "group_idx"))?.unwrap_or(0);
            if hashes.is_empty() {
                return Ok(None);
            }
            let expected = hashes.len() as u64 * block_size as u64;
            if token_ids.len() as u64 != expected {
                return Err(DecodeError::new(
                    DecodeErrorKind::TokenCount,
                    format!(
                        "BlockStored: {} tokens for {} blocks of {block_size}",
                        token_ids.len(),
                        hashes.len()
                    ),
                ));
            }
            Ok(Some(EngineEvent::Stored {
                hashes,
                parent,
                token_ids,
                block_size,
                lora_name,
                tier,
                group,
            }))
        }
        "BlockRemoved" => {
            let hashes = hash_list("BlockRemoved", f.get(1, "block_hashes"))?;
            let tier = medium(f.get(2, "medium"))?;
            let group = group(f.get(3, "group_idx"))?;
            if hashes.is_empty() {
                return Ok(None);
            }
            Ok(Some(EngineEvent::Removed {
                hashes,
                tier,
                group,
            }))
        }
        "AllBlocksCleared" => Ok(Some(EngineEvent::AllCleared)),
        other => Err(DecodeError::new(
            DecodeErrorKind::UnknownEvent,
            format!("unknown event type {:?}", truncate(other, 64)),
        )),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Normalizes one engine block hash as [`EngineHash`] documents.
pub fn hash(v: &Value<'_>) -> Result<EngineHash, DecodeError> {
    match v {
        Value::Int(i) if *i >= i64::MIN as i128 && *i <= u64::MAX as i128 => {
            // two's complement: -1 and u64::MAX are the same hash
            Ok(EngineHash(*i as u64))
        }
        Value::Bin(b) | Value::Str(b) => bytes_hash(b).ok_or_else(|| {
            DecodeError::new(
                DecodeErrorKind::Hash,
                format!("block hash of {} bytes", b.len()),
            )
        }),
        other => Err(DecodeError::new(
            DecodeErrorKind::Hash,
            format!("block hash is a {}", other.kind()),
        )),
    }
}

/// Byte-string block hashes (vLLM's 32-byte sha256, 16-byte xxh3-128, kvbm
/// keys): the xxh3-64 of the bytes. `None` for empty or over 64 bytes.
pub fn bytes_hash(b: &[u8]) -> Option<EngineHash> {
    if b.is_empty() || b.len() > 64 {
        return None;
    }
    Some(EngineHash(xxhash_rust::xxh3::xxh3_64(b)))
}

fn hash_list(event: &str, v: &Value<'_>) -> Result<Vec<EngineHash>, DecodeError> {
    match v {
        Value::Array(items) => items.iter().map(hash).collect(),
        other => Err(field_err(event, "block_hashes", other)),
    }
}

fn token_list(v: &Value<'_>) -> Result<Vec<u32>, DecodeError> {
    match v {
        Value::Array(items) => items
            .iter()
            .map(|t| match t {
                Value::Int(n) if *n >= 0 && *n <= u32::MAX as i128 => Ok(*n as u32),
                other => Err(DecodeError::new(
                    DecodeErrorKind::Field,
                    format!("BlockStored.token_ids holds a {} out of u32", other.kind()),
                )),
            })
            .collect(),
        other => Err(field_err("BlockStored", "token_ids", other)),
    }
}

fn group(v: &Value<'_>) -> Result<Option<u32>, DecodeError> {
    match v {
        Value::Nil => Ok(None),
        Value::Int(n) if *n >= 0 && *n <= u32::MAX as i128 => Ok(Some(*n as u32)),
        other => Err(field_err("event", "group_idx", other)),
    }
}

/// `medium` → tier. Absent means the engine's GPU cache. Names are matched
/// case-insensitively: GPU/CUDA/HBM → Gpu; CPU/HOST/DRAM/PINNED → Host
/// (vLLM's CPU offloading, LMCache's local CPU); DISK/SSD/NVME/FILE → Disk;
/// REMOTE/S3/OBJECT → Remote. Anything else is rejected (counted as
/// `medium`) rather than guessed: a block in an unknown place is not
/// routable knowledge.
pub fn medium(v: &Value<'_>) -> Result<Tier, DecodeError> {
    let s = match v {
        Value::Nil => return Ok(Tier::Gpu),
        Value::Str(_) => v.as_str().unwrap_or(""),
        other => {
            return Err(DecodeError::new(
                DecodeErrorKind::Field,
                format!("medium is a {}", other.kind()),
            ))
        }
    };
    medium_name(s).ok_or_else(|| {
        DecodeError::new(
            DecodeErrorKind::Medium,
            format!("unknown medium {:?}", truncate(s, 64)),
        )
    })
}

/// The tier of a medium name, as [`medium`] documents.
pub fn medium_name(s: &str) -> Option<Tier> {
    let up = s.trim().to_ascii_uppercase();
    Some(match up.as_str() {
        "" | "GPU" | "CUDA" | "HBM" | "G1" => Tier::Gpu,
        "CPU" | "HOST" | "DRAM" | "PINNED" | "CPU_PINNED" | "LOCALCPU" | "LOCAL_CPU" | "G2" => {
            Tier::Host
        }
        "DISK" | "SSD" | "NVME" | "FILE" | "LOCALDISK" | "LOCAL_DISK" | "G3" => Tier::Disk,
        "REMOTE" | "S3" | "OBJECT" | "G4" => Tier::Remote,
        _ => return None,
    })
}
