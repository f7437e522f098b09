//! Engine event streams over ZeroMQ (vLLM's and SGLang's `ZmqEventPublisher`).
//!
//! Per data-parallel rank: a SUB connection to the engine's PUB (rank r on
//! port + r), sequencing by the 8-byte big-endian seq frame, replay through
//! a DEALER connection to the engine's ROUTER, restart detection and
//! reconnection with backoff. In bind mode one listening SUB takes every
//! publisher that connects and sorts batches by their `data_parallel_rank`.
//!
//! Sequencing rules, per rank:
//! - on every (re)connection, when a replay endpoint is known: replay from
//!   the last applied seq + 1 (from 0 the first time) before reading the live
//!   stream, so what an idle engine published before the router knew it (or
//!   while it was away) is routed on at once, not after its next batch;
//! - the first batch seen: when its seq is above 0 and a replay endpoint is
//!   known, replay from 0 first (whatever the engine's replay buffer still
//!   holds), then go on live;
//! - seq = last + 1: apply;
//! - seq > last + 1 (a gap): replay from last + 1, then apply; what replay
//!   cannot supply is counted as an unrecovered gap and skipped;
//! - a live seq at or below the previous *live* seq: the engine restarted
//!   (its counter starts at 0 again): every tier this rank reported is
//!   cleared and the new stream is taken up as a first batch;
//! - a live seq at or below the last *applied* seq but above the previous
//!   live one: a batch already applied through replay, skipped.
//!
//! One case cannot be told apart without an incarnation id in vLLM's
//! protocol: an engine that restarted while the router was disconnected and
//! published past the router's last seq before it reconnected looks like a
//! gap. Heartbeats (ZMTP PING every [`StreamOptions::heartbeat`]) keep that
//! window short by noticing a dead peer within three intervals.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::decode::{decode_batch, DecodeError, DecodeErrorKind, DecodedBatch, EngineEvent};
use super::metrics::IngestMetrics;
use super::zmtp::{self, Conn, Endpoint, Incoming, Listener, Role};
use super::{AbortOnDrop, Backoff, ConnectedGuard, StreamOptions, SubscriptionHandle};
use crate::event::{EventSink, IndexEvent, Scope, Source, Tier, WorkerId};

/// One engine's ZMQ event streams (one per data-parallel rank).
#[derive(Debug, Clone)]
pub struct EngineSubscription {
    pub worker: WorkerId,
    /// The model the worker registered with: the `Scope::model` of its
    /// blocks (vLLM's events do not carry it).
    pub model: String,
    /// The engine's PUB address, e.g. `tcp://10.0.0.5:5557` (the router
    /// connects; rank r is on port + r). A host of `*` (`tcp://*:5557`) or a
    /// `bind:` prefix (`bind:tcp://127.0.0.1:5557`) binds instead, for
    /// engines configured to connect their PUB to the router; then ranks
    /// come from each batch's `data_parallel_rank`.
    pub zmq_endpoint: String,
    /// The engine's replay ROUTER address (rank r on port + r). Without it,
    /// gaps are counted and skipped.
    pub zmq_replay_endpoint: Option<String>,
    /// Data-parallel ranks to subscribe to in connect mode; in bind mode,
    /// the ranks replay is asked for (default 1).
    pub dp_ranks: u32,
    /// Topic prefix to subscribe to (vLLM's `kv_events_config.topic`;
    /// default empty: everything).
    pub topic: String,
    pub options: StreamOptions,
}

impl EngineSubscription {
    /// A subscription with every default: one rank, no replay endpoint, all
    /// topics, [`StreamOptions::default`].
    pub fn new(
        worker: impl Into<WorkerId>,
        model: impl Into<String>,
        zmq_endpoint: impl Into<String>,
    ) -> Self {
        EngineSubscription {
            worker: worker.into(),
            model: model.into(),
            zmq_endpoint: zmq_endpoint.into(),
            zmq_replay_endpoint: None,
            dp_ranks: 1,
            topic: String::new(),
            options: StreamOptions::default(),
        }
    }
}

/// What every rank task of one subscription shares.
struct Shared {
    worker: WorkerId,
    model: Arc<str>,
    topic: Vec<u8>,
    options: StreamOptions,
    sink: Arc<dyn EventSink>,
    metrics: Arc<IngestMetrics>,
    /// Error kinds already logged for this worker.
    logged: Mutex<HashSet<&'static str>>,
}

impl Shared {
    fn note(&self, rank: u32, err: &DecodeError) {
        self.metrics.decode_error(err.kind);
        self.log_once(err.kind.as_str(), rank, &err.reason);
    }

    fn log_once(&self, kind: &'static str, rank: u32, reason: &str) {
        if self.logged.lock().insert(kind) {
            tracing::warn!(
                worker = %self.worker, dp_rank = rank, kind, reason,
                "engine event stream: rejected input (logged once per worker and kind)"
            );
        }
    }
}

/// Starts the tasks of one engine subscription. Must be called within a
/// Tokio runtime. A bad endpoint is logged and counted; the handle is then
/// already finished.
pub fn spawn_engine(
    cfg: EngineSubscription,
    sink: Arc<dyn EventSink>,
    metrics: Arc<IngestMetrics>,
) -> SubscriptionHandle {
    let shared = Arc::new(Shared {
        worker: cfg.worker.clone(),
        model: Arc::from(cfg.model.as_str()),
        topic: cfg.topic.clone().into_bytes(),
        options: cfg.options.clone(),
        sink,
        metrics,
        logged: Mutex::new(HashSet::new()),
    });
    let mut tasks = Vec::new();
    let endpoint = zmq_endpoint_mode(&cfg.zmq_endpoint);
    let replay = cfg
        .zmq_replay_endpoint
        .as_deref()
        .map(Endpoint::parse)
        .transpose();
    let ((bind, endpoint), replay) = match (endpoint, replay) {
        (Ok(e), Ok(r)) => (e, r),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(worker = %cfg.worker, error = %e, "engine subscription: bad endpoint");
            return SubscriptionHandle::new(tasks);
        }
    };
    if bind {
        let ranks = cfg.dp_ranks.max(1);
        tasks.push(tokio::spawn(run_bound(shared, endpoint, replay, ranks)));
    } else {
        for rank in 0..cfg.dp_ranks.max(1) {
            let ep = endpoint.offset(rank);
            let rp = replay.as_ref().map(|r| r.offset(rank)).transpose();
            match (ep, rp) {
                (Ok(ep), Ok(rp)) => {
                    let st = RankState::new(&shared, rank, rp);
                    tasks.push(tokio::spawn(run_connected(shared.clone(), st, ep)));
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(worker = %cfg.worker, rank, error = %e, "engine subscription: bad endpoint");
                }
            }
        }
    }
    SubscriptionHandle::new(tasks)
}

/// Whether an engine endpoint is bound (a `bind:` prefix, or a host of `*`)
/// rather than connected to, and the endpoint itself.
pub(crate) fn zmq_endpoint_mode(s: &str) -> Result<(bool, Endpoint), String> {
    let (bind, ep) = match s.strip_prefix("bind:") {
        Some(rest) => (true, rest),
        None => (s.contains("://*:"), s),
    };
    Ok((bind, Endpoint::parse(ep)?))
}

/// Sequencing state of one rank's stream.
struct RankState {
    rank: u32,
    source: Source,
    replay: Option<Endpoint>,
    /// Last seq seen on the live (PUB) stream.
    live_last: Option<u64>,
    /// Last seq applied (live or replayed).
    applied_last: Option<u64>,
    /// Tiers this rank has reported blocks in (cleared on restart and on
    /// `AllBlocksCleared`); GPU always.
    tiers: HashSet<Tier>,
}

impl RankState {
    fn new(sh: &Shared, rank: u32, replay: Option<Endpoint>) -> Self {
        RankState {
            rank,
            source: Source {
                worker: sh.worker.clone(),
                dp_rank: rank,
            },
            replay,
            live_last: None,
            applied_last: None,
            tiers: HashSet::from([Tier::Gpu]),
        }
    }

    /// A batch from the live stream.
    async fn on_live(&mut self, sh: &Shared, seq: u64, batch: Result<DecodedBatch, DecodeError>) {
        if self.live_last.is_some_and(|l| seq <= l) {
            sh.metrics.restarts.inc();
            tracing::info!(
                worker = %sh.worker, dp_rank = self.rank, seq,
                last = ?self.live_last, "engine restarted (sequence went backwards): purging"
            );
            self.clear_all(sh);
            self.applied_last = None;
        }
        self.live_last = Some(seq);
        match self.applied_last {
            Some(a) if seq <= a => return, // already applied through replay
            Some(a) if seq == a + 1 => {}
            Some(a) => {
                sh.metrics.gaps.inc();
                tracing::debug!(worker = %sh.worker, dp_rank = self.rank, from = a + 1, to = seq, "sequence gap");
                if self.replay.is_some() {
                    self.replay_from(sh, a + 1).await;
                }
                match self.applied_last {
                    Some(b) if seq <= b => return,
                    Some(b) if seq > b + 1 => {
                        sh.metrics.gaps_unrecovered.inc();
                    }
                    _ => {}
                }
            }
            None => {
                if seq > 0 && self.replay.is_some() {
                    self.replay_from(sh, 0).await;
                    if self.applied_last.is_some_and(|b| seq <= b) {
                        return;
                    }
                }
            }
        }
        self.apply(sh, seq, batch);
    }

    fn apply(&mut self, sh: &Shared, seq: u64, batch: Result<DecodedBatch, DecodeError>) {
        self.applied_last = Some(seq);
        sh.metrics.batches.inc();
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                sh.note(self.rank, &e);
                return;
            }
        };
        for e in &batch.errors {
            sh.note(self.rank, e);
        }
        for ev in batch.events {
            self.emit(sh, ev);
        }
    }

    fn emit(&mut self, sh: &Shared, ev: EngineEvent) {
        match ev {
            EngineEvent::Stored {
                hashes,
                parent,
                token_ids,
                block_size,
                lora_name,
                tier,
                group,
            } => {
                self.tiers.insert(tier);
                sh.metrics.event("stored");
                sh.metrics.blocks("stored", hashes.len());
                sh.sink.apply(IndexEvent::Stored {
                    source: self.source.clone(),
                    tier,
                    scope: Scope {
                        model: sh.model.clone(),
                        lora_name: lora_name.map(Arc::from),
                        group,
                    },
                    hashes,
                    parent,
                    token_ids,
                    block_size,
                });
            }
            EngineEvent::Removed { hashes, tier, .. } => {
                sh.metrics.event("removed");
                sh.metrics.blocks("removed", hashes.len());
                sh.sink.apply(IndexEvent::Removed {
                    source: self.source.clone(),
                    tier,
                    scope: None,
                    hashes,
                });
            }
            EngineEvent::AllCleared => self.clear_all(sh),
        }
    }

    /// Clears every tier this rank has reported. Per tier rather than
    /// `tier: None`, so that a worker's kvbm tiers (another stream of the
    /// same worker) survive an engine restart.
    fn clear_all(&self, sh: &Shared) {
        let mut tiers: Vec<Tier> = self.tiers.iter().copied().collect();
        tiers.sort();
        for tier in tiers {
            sh.metrics.event("cleared");
            sh.sink.apply(IndexEvent::Cleared {
                source: self.source.clone(),
                tier: Some(tier),
            });
        }
    }

    /// Catches up at a (re)connection: everything the engine's replay buffer
    /// holds past what was applied.
    async fn catch_up(&mut self, sh: &Shared) {
        if self.replay.is_some() {
            let from = self.applied_last.map_or(0, |a| a + 1);
            self.replay_from(sh, from).await;
        }
    }

    /// Asks the engine's ROUTER for every batch from `from` on and applies
    /// what continues the sequence. Failures are logged once and counted.
    async fn replay_from(&mut self, sh: &Shared, from: u64) {
        let Some(ep) = self.replay.clone() else {
            return;
        };
        sh.metrics.replays.inc();
        let timeout = sh.options.replay_timeout;
        let limits = sh.options.limits();
        let conn =
            match tokio::time::timeout(timeout, Conn::connect(&ep, Role::Dealer, limits)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    sh.log_once("replay_connect", self.rank, &format!("{ep}: {e}"));
                    return;
                }
                Err(_) => {
                    sh.log_once("replay_connect", self.rank, &format!("{ep}: timed out"));
                    return;
                }
            };
        let (mut rd, wr) = conn.split();
        if let Err(e) = wr.send(&[b"", &from.to_be_bytes()]).await {
            sh.log_once("replay_send", self.rank, &format!("{ep}: {e}"));
            return;
        }
        loop {
            let msg = match tokio::time::timeout(timeout, rd.recv()).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    sh.log_once("replay_recv", self.rank, &format!("{ep}: {e}"));
                    return;
                }
                Err(_) => {
                    sh.log_once(
                        "replay_recv",
                        self.rank,
                        &format!("{ep}: no end marker within {timeout:?}"),
                    );
                    return;
                }
            };
            let frames = match msg {
                Incoming::Message(f) => f,
                Incoming::Command => continue,
                Incoming::Oversized { bytes, frames } => {
                    sh.note(
                        self.rank,
                        &DecodeError::new(
                            DecodeErrorKind::TooLarge,
                            format!("replayed message of {bytes} bytes in {frames} frames"),
                        ),
                    );
                    continue;
                }
            };
            // [b"", (topic,)? seq, payload]: the last two frames matter.
            let n = frames.len();
            if n < 2 {
                sh.note(
                    self.rank,
                    &DecodeError::new(
                        DecodeErrorKind::Frames,
                        format!("replay reply of {n} frames"),
                    ),
                );
                continue;
            }
            let Some(seq) = seq_of(&frames[n - 2]) else {
                sh.note(
                    self.rank,
                    &DecodeError::new(
                        DecodeErrorKind::Seq,
                        format!("replay seq frame of {} bytes", frames[n - 2].len()),
                    ),
                );
                continue;
            };
            if seq as i64 == -1 {
                return;
            }
            sh.metrics.replayed_batches.inc();
            match self.applied_last {
                Some(a) if seq <= a => continue,
                Some(a) if seq > a + 1 => {
                    sh.metrics.gaps_unrecovered.inc();
                }
                _ => {}
            }
            let batch = decode_batch(&frames[n - 1], sh.options.max_batch_events);
            self.apply(sh, seq, batch);
        }
    }
}

fn seq_of(frame: &Bytes) -> Option<u64> {
    let b: [u8; 8] = frame.as_ref().try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

/// Splits a live message `[topic, seq, payload]` (`[seq, payload]` is
/// accepted too).
fn split_live(frames: &[Bytes]) -> Result<(u64, &Bytes), DecodeError> {
    let n = frames.len();
    if !(2..=3).contains(&n) {
        return Err(DecodeError::new(
            DecodeErrorKind::Frames,
            format!("message of {n} frames"),
        ));
    }
    let seq = seq_of(&frames[n - 2]).ok_or_else(|| {
        DecodeError::new(
            DecodeErrorKind::Seq,
            format!("seq frame of {} bytes", frames[n - 2].len()),
        )
    })?;
    Ok((seq, &frames[n - 1]))
}

/// Forwards what a connection receives until it fails.
async fn read_loop(mut rd: zmtp::Reader, tx: mpsc::Sender<std::io::Result<Incoming>>) {
    loop {
        let r = rd.recv().await;
        let failed = r.is_err();
        if tx.send(r).await.is_err() || failed {
            return;
        }
    }
}

/// Connect mode: one rank, reconnecting forever.
async fn run_connected(sh: Arc<Shared>, mut st: RankState, ep: Endpoint) {
    let mut backoff = Backoff::new(sh.options.backoff_initial, sh.options.backoff_max);
    let mut ever = false;
    loop {
        let conn = match tokio::time::timeout(
            sh.options.connect_timeout,
            Conn::connect(&ep, Role::Sub, sh.options.limits()),
        )
        .await
        {
            Ok(Ok(c)) => Some(c),
            Ok(Err(e)) => {
                tracing::debug!(worker = %sh.worker, rank = st.rank, %ep, error = %e, "connect failed");
                None
            }
            Err(_) => None,
        };
        if let Some(conn) = conn {
            let (rd, wr) = conn.split();
            if wr.subscribe(&sh.topic).await.is_ok() {
                if ever {
                    sh.metrics.reconnects.inc();
                }
                ever = true;
                tracing::info!(worker = %sh.worker, rank = st.rank, %ep, "engine event stream connected");
                // Subscribed first, so nothing published from now on is
                // missed; live batches the replay also returned are skipped.
                st.catch_up(&sh).await;
                let connected = ConnectedGuard::new(&sh.metrics);
                let since = Instant::now();
                serve(&sh, &mut st, rd, wr).await;
                drop(connected);
                tracing::info!(worker = %sh.worker, rank = st.rank, %ep, "engine event stream lost");
                if since.elapsed() > Duration::from_secs(10) {
                    backoff.reset();
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Reads one connection until it fails or its peer stops answering.
async fn serve(sh: &Shared, st: &mut RankState, rd: zmtp::Reader, wr: zmtp::Writer) {
    let (tx, mut rx) = mpsc::channel(1024);
    let _reader = AbortOnDrop(tokio::spawn(read_loop(rd, tx)));
    let hb = sh.options.heartbeat.filter(|_| wr.heartbeats());
    let mut tick = tokio::time::interval(hb.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();
    loop {
        tokio::select! {
            m = rx.recv() => {
                match m {
                    Some(Ok(Incoming::Message(frames))) => match split_live(&frames) {
                        Ok((seq, payload)) => {
                            let batch = decode_batch(payload, sh.options.max_batch_events);
                            st.on_live(sh, seq, batch).await;
                        }
                        Err(e) => sh.note(st.rank, &e),
                    },
                    Some(Ok(Incoming::Oversized { bytes, frames })) => sh.note(
                        st.rank,
                        &DecodeError::new(
                            DecodeErrorKind::TooLarge,
                            format!("message of {bytes} bytes in {frames} frames"),
                        ),
                    ),
                    Some(Ok(Incoming::Command)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(worker = %sh.worker, rank = st.rank, error = %e, "stream error");
                        return;
                    }
                    None => return,
                }
                last_rx = Instant::now();
            }
            _ = tick.tick(), if hb.is_some() => {
                let ivl = hb.unwrap_or_default();
                if last_rx.elapsed() > ivl * 3 {
                    tracing::info!(worker = %sh.worker, rank = st.rank, "engine stopped answering heartbeats");
                    return;
                }
                if wr.ping(ivl * 3).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Bind mode: publishers connect to us; ranks come from the batches. Only
/// ranks below `replay_ranks` get a replay endpoint: the rank is the
/// publisher's word, and each one moves the replay port.
async fn run_bound(sh: Arc<Shared>, ep: Endpoint, replay: Option<Endpoint>, replay_ranks: u32) {
    let mut backoff = Backoff::new(sh.options.backoff_initial, sh.options.backoff_max);
    let listener = loop {
        match Listener::bind(&ep).await {
            Ok(l) => break l,
            Err(e) => {
                sh.log_once("bind", 0, &format!("{ep}: {e}"));
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    tracing::info!(worker = %sh.worker, endpoint = ?listener.local_endpoint().ok(), "engine event SUB bound");
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Incoming>>(1024);
    // Publishers that connected: every rank with a replay endpoint catches
    // up (the rank of a connection is known only from its batches).
    let (joined_tx, mut joined) = mpsc::channel::<()>(16);
    let mut peers = JoinSet::new();
    let mut ranks: HashMap<u32, RankState> = HashMap::new();
    let rank_state = |rank: u32| {
        let rp = replay
            .as_ref()
            .filter(|_| rank < replay_ranks)
            .and_then(|r| r.offset(rank).ok());
        RankState::new(&sh, rank, rp)
    };
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok(pending) => {
                    let sh2 = sh.clone();
                    let tx = tx.clone();
                    let joined_tx = joined_tx.clone();
                    peers.spawn(async move {
                        let Ok(conn) = pending.handshake(Role::Sub, sh2.options.limits()).await else {
                            return;
                        };
                        let (rd, wr) = conn.split();
                        if wr.subscribe(&sh2.topic).await.is_err() {
                            return;
                        }
                        let _ = joined_tx.try_send(());
                        let _connected = ConnectedGuard::new(&sh2.metrics);
                        read_loop(rd, tx).await;
                        drop(wr);
                    });
                }
                Err(e) => {
                    sh.log_once("accept", 0, &e.to_string());
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            },
            m = rx.recv() => {
                let Some(Ok(msg)) = m else { continue };
                match msg {
                    Incoming::Message(frames) => match split_live(&frames) {
                        Ok((seq, payload)) => {
                            let batch = decode_batch(payload, sh.options.max_batch_events);
                            let rank = batch.as_ref().ok().and_then(|b| b.dp_rank).unwrap_or(0);
                            let st = ranks.entry(rank).or_insert_with(|| rank_state(rank));
                            st.on_live(&sh, seq, batch).await;
                        }
                        Err(e) => sh.note(0, &e),
                    },
                    Incoming::Oversized { bytes, frames } => sh.note(
                        0,
                        &DecodeError::new(
                            DecodeErrorKind::TooLarge,
                            format!("message of {bytes} bytes in {frames} frames"),
                        ),
                    ),
                    Incoming::Command => {}
                }
            }
            Some(()) = joined.recv() => {
                if replay.is_some() {
                    for rank in 0..replay_ranks {
                        let st = ranks.entry(rank).or_insert_with(|| rank_state(rank));
                        st.catch_up(&sh).await;
                    }
                }
            }
            Some(_) = peers.join_next(), if !peers.is_empty() => {}
        }
    }
}
