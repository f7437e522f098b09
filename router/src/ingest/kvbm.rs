//! kvbm event streams: `SubscribeEvents(from_seq, incarnation)` over gRPC
//! (TCP `http://host:port`, `https://host:port` with the subscription's
//! credentials, or a Unix socket `unix:/path`), dialled through
//! `kvtier_client` like every other kvbm client.
//!
//! Rules: batches are applied in seq order; a seq already applied is
//! skipped; a gap on the live stream resubscribes from last + 1 (the
//! daemon replays from its ring, or answers with a snapshot); a new
//! incarnation, or the first batch of a snapshot, clears what this daemon
//! reported (every kvbm tier) before its events are applied; a broken
//! stream reconnects with backoff and resumes from last + 1 with the known
//! incarnation.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_client::{Client, Credentials, Rpc};
use kvtier_proto::v1::{self as pb, event::Kind};
use parking_lot::Mutex;

use super::decode::{bytes_hash, DecodeError, DecodeErrorKind};
use super::metrics::IngestMetrics;
use super::{Backoff, ConnectedGuard, StreamOptions, SubscriptionHandle};
use crate::event::{EngineHash, EventSink, IndexEvent, Scope, Source, Tier, WorkerId};

/// One kvbm daemon's event stream.
#[derive(Debug, Clone)]
pub struct KvbmSubscription {
    /// The worker whose node the daemon serves (its blocks count for this
    /// worker; `dp_rank` 0).
    pub worker: WorkerId,
    /// `http://host:port`, `https://host:port` or `unix:/path/to/kvbm.sock`.
    pub endpoint: String,
    /// What a TCP endpoint is given: TLS trust, a client certificate, a
    /// token (`[kvbm_client]`). Default none.
    pub credentials: Credentials,
    pub options: StreamOptions,
}

impl KvbmSubscription {
    pub fn new(worker: impl Into<WorkerId>, endpoint: impl Into<String>) -> Self {
        KvbmSubscription {
            worker: worker.into(),
            endpoint: endpoint.into(),
            credentials: Credentials::default(),
            options: StreamOptions::default(),
        }
    }
}

/// Starts the task of one kvbm subscription. Must be called within a Tokio
/// runtime.
pub fn spawn_kvbm(
    cfg: KvbmSubscription,
    sink: Arc<dyn EventSink>,
    metrics: Arc<IngestMetrics>,
) -> SubscriptionHandle {
    let task = tokio::spawn(run(cfg, sink, metrics));
    SubscriptionHandle::new(vec![task])
}

/// The tiers a kvbm daemon reports, cleared on a new incarnation.
const KVBM_TIERS: [Tier; 3] = [Tier::Host, Tier::Disk, Tier::Remote];

struct State {
    cfg: KvbmSubscription,
    source: Source,
    sink: Arc<dyn EventSink>,
    metrics: Arc<IngestMetrics>,
    incarnation: Option<String>,
    last_seq: Option<u64>,
    in_snapshot: bool,
    /// Tiers reported by this daemon (the kvbm tiers, plus GPU if it ever
    /// reports that).
    tiers: HashSet<Tier>,
    logged: Mutex<HashSet<&'static str>>,
}

impl State {
    fn log_once(&self, kind: &'static str, reason: &str) {
        if self.logged.lock().insert(kind) {
            tracing::warn!(
                worker = %self.cfg.worker, endpoint = %self.cfg.endpoint, kind, reason,
                "kvbm event stream: rejected input (logged once per worker and kind)"
            );
        }
    }

    fn note(&self, err: &DecodeError) {
        self.metrics.decode_error(err.kind);
        self.log_once(err.kind.as_str(), &err.reason);
    }

    fn clear_all(&self) {
        let mut tiers: Vec<Tier> = self.tiers.iter().copied().collect();
        tiers.sort();
        for tier in tiers {
            self.clear(Some(tier));
        }
    }

    fn clear(&self, tier: Option<Tier>) {
        match tier {
            Some(t) => {
                self.metrics.event("cleared");
                self.sink.apply(IndexEvent::Cleared {
                    source: self.source.clone(),
                    tier: Some(t),
                });
            }
            None => self.clear_all(),
        }
    }

    /// Applies one batch. `Err(from)` asks to resubscribe from `from`.
    fn on_batch(&mut self, b: pb::EventBatch) -> Result<(), u64> {
        let new_incarnation = self
            .incarnation
            .as_deref()
            .is_some_and(|i| i != b.incarnation);
        // A snapshot starts with TierCleared{UNSPECIFIED}; when it does, that
        // event is the purge, and clearing here too would only repeat it.
        let starts_with_full_clear = matches!(
            b.events.first().and_then(|e| e.kind.as_ref()),
            Some(Kind::Cleared(c)) if c.tier == pb::Tier::Unspecified as i32
        );
        let snapshot_start = b.snapshot && !self.in_snapshot;
        if new_incarnation {
            self.metrics.restarts.inc();
            tracing::info!(worker = %self.cfg.worker, old = ?self.incarnation, new = %b.incarnation, "kvbm restarted: purging");
            self.last_seq = None;
        }
        if (new_incarnation || snapshot_start) && !starts_with_full_clear {
            self.clear_all();
        }
        self.incarnation = Some(b.incarnation.clone());
        if b.snapshot {
            self.in_snapshot = true;
        } else {
            self.in_snapshot = false;
            match self.last_seq {
                Some(l) if b.seq <= l => return Ok(()),
                Some(l) if b.seq > l + 1 => {
                    self.metrics.gaps.inc();
                    return Err(l + 1);
                }
                _ => {}
            }
        }
        self.last_seq = Some(b.seq);
        self.metrics.batches.inc();
        for ev in b.events {
            if let Err(e) = self.apply(ev) {
                self.note(&e);
            }
        }
        Ok(())
    }

    fn apply(&mut self, ev: pb::Event) -> Result<(), DecodeError> {
        let proto = |m: String| DecodeError::new(DecodeErrorKind::Proto, m);
        match ev.kind {
            Some(Kind::Stored(s)) => {
                let tier =
                    tier(s.tier)?.ok_or_else(|| proto("BlockStored without a tier".into()))?;
                let hashes = keys(&s.keys)?;
                if hashes.is_empty() {
                    return Ok(());
                }
                let parent = if s.parent.is_empty() {
                    None
                } else {
                    Some(key(&s.parent)?)
                };
                if s.tokens_per_block == 0 {
                    return Err(proto("BlockStored with tokens_per_block 0".into()));
                }
                if s.token_ids.len() as u64 != hashes.len() as u64 * s.tokens_per_block as u64 {
                    return Err(DecodeError::new(
                        DecodeErrorKind::TokenCount,
                        format!(
                            "BlockStored: {} tokens for {} blocks of {}",
                            s.token_ids.len(),
                            hashes.len(),
                            s.tokens_per_block
                        ),
                    ));
                }
                let model = if s.model.is_empty() {
                    s.namespace
                } else {
                    s.model
                };
                self.tiers.insert(tier);
                self.metrics.event("stored");
                self.metrics.blocks("stored", hashes.len());
                self.sink.apply(IndexEvent::Stored {
                    source: self.source.clone(),
                    tier,
                    scope: Scope {
                        model: Arc::from(model),
                        lora_name: None,
                        group: 0,
                    },
                    hashes,
                    parent,
                    token_ids: s.token_ids,
                    block_size: s.tokens_per_block,
                });
            }
            Some(Kind::Removed(r)) => {
                let tier =
                    tier(r.tier)?.ok_or_else(|| proto("BlockRemoved without a tier".into()))?;
                let hashes = keys(&r.keys)?;
                if hashes.is_empty() {
                    return Ok(());
                }
                self.metrics.event("removed");
                self.metrics.blocks("removed", hashes.len());
                self.sink.apply(IndexEvent::Removed {
                    source: self.source.clone(),
                    tier,
                    scope: None,
                    hashes,
                });
            }
            Some(Kind::Cleared(c)) => self.clear(tier(c.tier)?),
            None => return Err(proto("event without a kind".into())),
        }
        Ok(())
    }
}

fn tier(t: i32) -> Result<Option<Tier>, DecodeError> {
    match pb::Tier::try_from(t) {
        Ok(pb::Tier::Unspecified) => Ok(None),
        Ok(pb::Tier::Gpu) => Ok(Some(Tier::Gpu)),
        Ok(pb::Tier::Host) => Ok(Some(Tier::Host)),
        Ok(pb::Tier::Disk) => Ok(Some(Tier::Disk)),
        Ok(pb::Tier::Remote) => Ok(Some(Tier::Remote)),
        Err(_) => Err(DecodeError::new(
            DecodeErrorKind::Proto,
            format!("unknown tier {t}"),
        )),
    }
}

/// A kvbm block key (1..=32 bytes, as kvtier.v1 defines it).
fn key(k: &[u8]) -> Result<EngineHash, DecodeError> {
    bytes_hash(k)
        .filter(|_| k.len() <= 32)
        .ok_or_else(|| DecodeError::new(DecodeErrorKind::Hash, format!("key of {} bytes", k.len())))
}

fn keys(ks: &[Vec<u8>]) -> Result<Vec<EngineHash>, DecodeError> {
    ks.iter().map(|k| key(k)).collect()
}

async fn connect(endpoint: &str, creds: &Credentials, timeout: Duration) -> Result<Rpc, String> {
    // kvtier_client reads any address that is not a URL as a socket path;
    // only the forms this module documents are dialled.
    let addr = if let Some(path) = endpoint.strip_prefix("unix:") {
        format!("unix:{}", path.trim_start_matches("//"))
    } else if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_owned()
    } else {
        return Err("only http://, https:// and unix: addresses are supported".into());
    };
    match tokio::time::timeout(timeout, Client::connect_with(&addr, creds)).await {
        Ok(Ok(c)) => Ok(c.rpc()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
}

impl State {
    fn new(cfg: KvbmSubscription, sink: Arc<dyn EventSink>, metrics: Arc<IngestMetrics>) -> State {
        State {
            source: Source {
                worker: cfg.worker.clone(),
                dp_rank: 0,
            },
            cfg,
            sink,
            metrics,
            incarnation: None,
            last_seq: None,
            in_snapshot: false,
            tiers: KVBM_TIERS.into_iter().collect(),
            logged: Mutex::new(HashSet::new()),
        }
    }
}

/// What the `kvbm_events` fuzz target drives: each of `batches` decoded as
/// an `EventBatch` (as tonic decodes the stream's messages) and applied in
/// order to one subscription's state over `sink`. A message that does not
/// decode is skipped (on a live stream it ends the stream, which resumes
/// from the last batch applied). Returns the resubscriptions asked for.
#[cfg(fuzzing)]
pub fn apply_encoded(worker: &str, sink: Arc<dyn EventSink>, batches: &[&[u8]]) -> usize {
    use prost::Message as _;
    let cfg = KvbmSubscription::new(worker, "unix:/fuzz");
    let mut st = State::new(cfg, sink, Arc::new(IngestMetrics::new()));
    let mut resubscribe = 0;
    for bytes in batches {
        if let Ok(b) = pb::EventBatch::decode(*bytes) {
            resubscribe += st.on_batch(b).is_err() as usize;
        }
    }
    resubscribe
}

async fn run(cfg: KvbmSubscription, sink: Arc<dyn EventSink>, metrics: Arc<IngestMetrics>) {
    let opts = cfg.options.clone();
    let mut st = State::new(cfg, sink, metrics);
    if st.cfg.endpoint.starts_with("https://") && st.cfg.credentials.tls_ca.is_none() {
        // Every attempt fails the same way; the daemon being down is
        // otherwise the usual reason, hence debug-level connect errors.
        tracing::warn!(worker = %st.cfg.worker, endpoint = %st.cfg.endpoint,
            "an https:// kvbm address needs kvbm_client.tls_ca: the subscription cannot connect");
    }
    let mut backoff = Backoff::new(opts.backoff_initial, opts.backoff_max);
    let mut ever = false;
    // set when a gap asks for a resubscription without waiting
    let mut resume_now = false;
    let mut last_was_gap = false;
    loop {
        if ever && !resume_now {
            tokio::time::sleep(backoff.next_delay()).await;
        }
        resume_now = false;
        let rpc = match connect(&st.cfg.endpoint, &st.cfg.credentials, opts.connect_timeout).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(worker = %st.cfg.worker, endpoint = %st.cfg.endpoint, error = %e, "kvbm connect failed");
                if !ever {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                continue;
            }
        };
        let from_seq = st.last_seq.map(|s| s + 1).unwrap_or(0);
        let req = pb::SubscribeEventsRequest {
            from_seq,
            incarnation: st.incarnation.clone().unwrap_or_default(),
        };
        let mut client = rpc.max_decoding_message_size(opts.max_message_bytes);
        let mut stream = match client.subscribe_events(req).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                st.log_once("subscribe", &e.to_string());
                if !ever {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                continue;
            }
        };
        if ever {
            st.metrics.reconnects.inc();
        }
        if from_seq > 0 {
            st.metrics.replays.inc();
        }
        ever = true;
        let connected = ConnectedGuard::new(&st.metrics);
        tracing::info!(worker = %st.cfg.worker, endpoint = %st.cfg.endpoint, from_seq, "kvbm event stream connected");
        let since = Instant::now();
        let mut gap = false;
        loop {
            match stream.message().await {
                Ok(Some(batch)) => {
                    if let Err(from) = st.on_batch(batch) {
                        tracing::debug!(worker = %st.cfg.worker, from, "kvbm sequence gap: resubscribing");
                        // at once, unless gaps keep coming (then with backoff)
                        resume_now = since.elapsed() > Duration::from_secs(1) || !last_was_gap;
                        gap = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if e.code() == tonic::Code::OutOfRange
                        || e.code() == tonic::Code::ResourceExhausted
                    {
                        st.note(&DecodeError::new(DecodeErrorKind::TooLarge, e.to_string()));
                    }
                    tracing::debug!(worker = %st.cfg.worker, error = %e, "kvbm stream ended");
                    break;
                }
            }
        }
        drop(connected);
        last_was_gap = gap;
        if since.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
    }
}
