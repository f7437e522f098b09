//! The worker registry: who can serve which model, where their events come
//! from, and how loaded they are.
//!
//! Load has two sources:
//! - **In flight**: every routed request counts on its worker until
//!   `POST /v1/route/{id}/done` (or the end of its ext_proc stream), or until
//!   `load.in_flight_ttl_s` passes. Its prompt tokens to recompute join the
//!   worker's **backlog**, which drains at `scoring.prefill_tokens_per_s`
//!   (a fluid model of the engine's prefill queue).
//! - **Engine metrics** scraped from `metrics_url` every
//!   `load.scrape_interval_ms`: `vllm:num_requests_waiting`,
//!   `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (summed over
//!   label sets; the usage is the maximum).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::event::WorkerId;
use crate::index::Index;
use crate::scoring::{Load, Utilization};

/// A worker as registered (`POST /v1/workers`, `[[workers]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    pub worker_id: String,
    /// Where requests go: `host:port` (or a URL; the ext_proc header gets
    /// the `host:port` part).
    pub endpoint: String,
    pub model: String,
    /// The engine's ZMQ PUB endpoint (e.g. `tcp://10.0.0.1:5557`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zmq_endpoint: Option<String>,
    /// The engine's ZMQ ROUTER endpoint for replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zmq_replay_endpoint: Option<String>,
    /// Data-parallel ranks behind `zmq_endpoint` (rank r on port + r); in
    /// bind mode, the ranks replay is asked for. Default 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub dp_ranks: u32,
    /// The node's kvbm gRPC address (`http://10.0.0.1:7070`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvbm: Option<String>,
    /// The engine's Prometheus endpoint (`http://10.0.0.1:8000/metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_url: Option<String>,
    /// Name of the shared remote (G4) store this worker reaches; remote
    /// blocks reported by any member count for every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_group: Option<String>,
}

fn one() -> u32 {
    1
}
fn is_one(v: &u32) -> bool {
    *v == 1
}

impl WorkerSpec {
    /// Checks the fields a request can get wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.worker_id.trim().is_empty() {
            return Err("worker_id must not be empty".into());
        }
        if self.worker_id.contains('/') {
            return Err("worker_id must not contain '/'".into());
        }
        if self.endpoint.trim().is_empty() {
            return Err("endpoint must not be empty".into());
        }
        if self.model.trim().is_empty() {
            return Err("model must not be empty".into());
        }
        if self.dp_ranks == 0 || self.dp_ranks > 1024 {
            return Err("dp_ranks must be in 1..=1024".into());
        }
        if let Some(u) = &self.metrics_url {
            parse_http_url(u).map_err(|e| format!("metrics_url: {e}"))?;
        }
        Ok(())
    }

    /// `host:port` of the endpoint (scheme and path stripped).
    pub fn host_port(&self) -> &str {
        let e = self.endpoint.trim();
        let e = e.split_once("://").map_or(e, |(_, r)| r);
        e.split('/').next().unwrap_or(e)
    }
}

/// Requests in flight on one worker and its prefill backlog.
#[derive(Debug)]
struct InFlight {
    backlog: f64,
    last: Instant,
    requests: HashMap<u64, Instant>,
    /// Work routed here per second, timed from `since`.
    work: Utilization,
    since: Instant,
}

/// Engine figures from the last scrape.
#[derive(Debug, Default, Clone, Copy)]
pub struct EngineLoad {
    pub waiting: f64,
    pub running: f64,
    pub kv_usage: f64,
}

/// Something that stops a background task when dropped (an ingestion
/// subscription, a scraper).
pub type Guard = Box<dyn Send + Sync>;

/// One registered worker.
pub struct Worker {
    pub id: WorkerId,
    pub spec: WorkerSpec,
    in_flight: Mutex<InFlight>,
    engine: Mutex<EngineLoad>,
    guards: Mutex<Vec<Guard>>,
}

impl Worker {
    fn new(spec: WorkerSpec) -> Self {
        Self {
            id: Arc::from(spec.worker_id.as_str()),
            spec,
            in_flight: Mutex::new(InFlight {
                backlog: 0.0,
                last: Instant::now(),
                requests: HashMap::new(),
                work: Utilization::default(),
                since: Instant::now(),
            }),
            engine: Mutex::new(EngineLoad::default()),
            guards: Mutex::new(Vec::new()),
        }
    }

    /// Attaches a background task that ends when the worker is removed.
    pub fn attach(&self, g: Guard) {
        self.guards.lock().push(g);
    }

    pub fn set_engine_load(&self, l: EngineLoad) {
        *self.engine.lock() = l;
    }

    pub fn engine_load(&self) -> EngineLoad {
        *self.engine.lock()
    }

    /// The load snapshot scoring uses (utilization over `window_s`).
    pub fn load(&self, rate: f64, window_s: f64, ttl: Duration) -> Load {
        let now = Instant::now();
        let mut f = self.in_flight.lock();
        drain(&mut f, now, rate);
        f.requests.retain(|_, t| now.duration_since(*t) < ttl);
        let e = *self.engine.lock();
        let at = now.duration_since(f.since).as_secs_f64();
        Load {
            backlog_tokens: f.backlog,
            in_flight: f.requests.len() as f64,
            engine_waiting: e.waiting,
            engine_running: e.running,
            kv_usage: e.kv_usage,
            utilization: f.work.get(at, window_s),
        }
    }

    /// Counts a routed request: `recompute` prefill tokens join the backlog,
    /// `work_s` seconds (prefill and onboard) the utilization over
    /// `window_s`.
    pub fn begin(&self, id: u64, recompute: f64, work_s: f64, rate: f64, window_s: f64) {
        let now = Instant::now();
        let mut f = self.in_flight.lock();
        drain(&mut f, now, rate);
        f.backlog += recompute.max(0.0);
        f.requests.insert(id, now);
        let at = now.duration_since(f.since).as_secs_f64();
        f.work.add(at, work_s, window_s);
    }

    /// The request is done; false when it was not in flight here.
    pub fn end(&self, id: u64) -> bool {
        self.in_flight.lock().requests.remove(&id).is_some()
    }
}

fn drain(f: &mut InFlight, now: Instant, rate: f64) {
    let dt = now.duration_since(f.last).as_secs_f64();
    f.backlog = (f.backlog - dt * rate.max(0.0)).max(0.0);
    f.last = now;
}

/// Starts the background tasks of a new worker (ingestion subscriptions,
/// metrics scraper) and hands back their guards.
pub type Spawner = Arc<dyn Fn(&Arc<Worker>) -> Vec<Guard> + Send + Sync>;

/// All workers, by id.
pub struct Workers {
    map: RwLock<HashMap<WorkerId, Arc<Worker>>>,
    index: Arc<Index>,
    spawner: Option<Spawner>,
}

/// Why a worker could not be added.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid worker: {0}")]
    Invalid(String),
    #[error("worker {0} already exists with a different spec")]
    Conflict(String),
}

impl Workers {
    pub fn new(index: Arc<Index>, spawner: Option<Spawner>) -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            index,
            spawner,
        }
    }

    /// Adds a worker (idempotent for an identical spec). Returns true when
    /// it is new.
    pub fn add(&self, spec: WorkerSpec) -> Result<bool, WorkerError> {
        spec.validate().map_err(WorkerError::Invalid)?;
        let w = {
            let mut m = self.map.write();
            if let Some(old) = m.get(spec.worker_id.as_str()) {
                if old.spec == spec {
                    return Ok(false);
                }
                return Err(WorkerError::Conflict(spec.worker_id));
            }
            let w = Arc::new(Worker::new(spec));
            m.insert(w.id.clone(), w.clone());
            w
        };
        self.index.set_worker(&w.id, w.spec.remote_group.as_deref());
        if let Some(sp) = &self.spawner {
            for g in sp(&w) {
                w.attach(g);
            }
        }
        Ok(true)
    }

    /// Removes a worker, stops its tasks and purges its blocks.
    pub fn remove(&self, id: &str) -> bool {
        let w = self.map.write().remove(id);
        match w {
            Some(w) => {
                w.guards.lock().clear();
                self.index.remove_worker(id);
                true
            }
            None => false,
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Worker>> {
        self.map.read().get(id).cloned()
    }

    /// Every worker, sorted by id.
    pub fn list(&self) -> Vec<Arc<Worker>> {
        let mut v: Vec<_> = self.map.read().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Workers serving `model`, sorted by id.
    pub fn for_model(&self, model: &str) -> Vec<Arc<Worker>> {
        let mut v: Vec<_> = self
            .map
            .read()
            .values()
            .filter(|w| w.spec.model == model)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

// ---------------------------------------------------------- metrics scraping

/// `(host:port, path)` of an `http://` URL.
pub fn parse_http_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (hp, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if hp.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let hp = if hp.contains(':') {
        hp.to_string()
    } else {
        format!("{hp}:80")
    };
    Ok((hp, path.to_string()))
}

/// Sums the vLLM load gauges in a Prometheus text exposition.
pub fn parse_engine_metrics(text: &str) -> EngineLoad {
    let mut l = EngineLoad::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let value_part = match line.rfind('}') {
            Some(i) => &line[i + 1..],
            None => &line[name_end..],
        };
        let Some(v) = value_part
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<f64>().ok())
        else {
            continue;
        };
        if !v.is_finite() {
            continue;
        }
        match name {
            "vllm:num_requests_waiting" => l.waiting += v,
            "vllm:num_requests_running" => l.running += v,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                l.kv_usage = l.kv_usage.max(v)
            }
            _ => {}
        }
    }
    l
}

/// One HTTP/1.0 GET with a deadline and a 16 MiB cap; the body as text.
pub async fn http_get(url: &str, timeout: Duration) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (hp, path) = parse_http_url(url)?;
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(&hp)
            .await
            .map_err(|e| format!("connect {hp}: {e}"))?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {hp}\r\nAccept: text/plain\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.take(16 << 20)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| "no HTTP header".to_string())?;
        let ok = head
            .lines()
            .next()
            .is_some_and(|l| l.split_whitespace().nth(1) == Some("200"));
        if !ok {
            return Err(format!(
                "status: {}",
                head.lines().next().unwrap_or_default()
            ));
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("{url}: timed out"))?
}

/// Aborts a tokio task when dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts scraping `w.spec.metrics_url` every `interval` (needs a tokio
/// runtime). Failures keep the last figures and are logged once per streak.
pub fn spawn_scraper(w: &Arc<Worker>, interval: Duration) -> Option<Guard> {
    let url = w.spec.metrics_url.clone()?;
    let weak = Arc::downgrade(w);
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let task = handle.spawn(async move {
        let mut failing = false;
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
        loop {
            tick.tick().await;
            let Some(w) = weak.upgrade() else {
                return;
            };
            match http_get(&url, Duration::from_secs(2)).await {
                Ok(body) => {
                    w.set_engine_load(parse_engine_metrics(&body));
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(worker = %w.id, error = %e, "scraping engine metrics failed");
                    }
                    failing = true;
                }
            }
        }
    });
    Some(Box::new(AbortOnDrop(task)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::IndexConfig;

    fn spec(id: &str) -> WorkerSpec {
        WorkerSpec {
            worker_id: id.into(),
            endpoint: "http://10.0.0.1:8000/v1".into(),
            model: "m".into(),
            zmq_endpoint: None,
            zmq_replay_endpoint: None,
            dp_ranks: 1,
            kvbm: None,
            metrics_url: None,
            remote_group: None,
        }
    }

    #[test]
    fn registry_add_conflict_remove() {
        let ws = Workers::new(Arc::new(Index::new(IndexConfig::default())), None);
        assert!(matches!(ws.add(spec("a")), Ok(true)));
        assert!(matches!(ws.add(spec("a")), Ok(false)));
        let mut other = spec("a");
        other.model = "x".into();
        assert!(matches!(ws.add(other), Err(WorkerError::Conflict(_))));
        assert!(matches!(ws.add(spec("")), Err(WorkerError::Invalid(_))));
        assert_eq!(ws.for_model("m").len(), 1);
        assert_eq!(
            ws.get("a").map(|w| w.spec.host_port().to_string()),
            Some("10.0.0.1:8000".into())
        );
        assert!(ws.remove("a"));
        assert!(!ws.remove("a"));
    }

    #[test]
    fn in_flight_and_backlog() {
        let w = Worker::new(spec("a"));
        w.begin(1, 1000.0, 0.1, 0.0, 30.0);
        w.begin(2, 500.0, 0.05, 0.0, 30.0);
        let l = w.load(0.0, 30.0, Duration::from_secs(60));
        // 0.15 s of work over a 30 s window, barely decayed since
        assert!(l.utilization > 0.0049 && l.utilization <= 0.005, "{l:?}");
        assert_eq!(l.in_flight, 2.0);
        assert_eq!(l.backlog_tokens, 1500.0);
        assert!(w.end(1));
        assert!(!w.end(1));
        assert_eq!(w.load(0.0, 30.0, Duration::from_secs(60)).in_flight, 1.0);
        assert_eq!(w.load(0.0, 30.0, Duration::ZERO).in_flight, 0.0);
        // drains at the rate
        std::thread::sleep(Duration::from_millis(20));
        assert!(w.load(1e6, 30.0, Duration::ZERO).backlog_tokens < 1500.0);
    }

    #[test]
    fn engine_metrics_text() {
        let t = "# HELP x\nvllm:num_requests_waiting{model_name=\"m\"} 3.0\nvllm:num_requests_waiting{model_name=\"n\"} 1\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc{a=\"b\"} 0.5\ngarbage\nvllm:num_requests_running{x=\"}\"} NaN\n";
        let l = parse_engine_metrics(t);
        assert_eq!(l.waiting, 4.0);
        assert_eq!(l.running, 2.0);
        assert_eq!(l.kv_usage, 0.5);
        assert!(parse_http_url("https://x").is_err());
        assert_eq!(
            parse_http_url("http://h:1/m").ok(),
            Some(("h:1".to_string(), "/m".to_string()))
        );
    }
}
