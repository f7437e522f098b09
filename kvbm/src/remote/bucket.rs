//! The bucket: `object_store`'s S3 client under kvtier's failure policy.
//!
//! - Every request has a hard deadline (an outer timeout, whatever the
//!   client's own retries would do), and the client retries at most twice
//!   within a short budget: the library's defaults (10 retries over up to
//!   three minutes) would turn a dead server into a hung engine.
//! - A circuit breaker stops traffic after [`BREAKER_FAILURES`] failures in a
//!   row and lets one probe through after a back-off that doubles up to a
//!   minute; a success closes it. It never gives up for good.
//! - Nothing here is an error to the engine: callers turn every failure into
//!   a miss (a read) or a dropped write, and count it.
//!
//! Segments are read by range: the footer from the object's tail, blocks by
//! coalesced ranges, each block checked against its footer checksum.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};
use parking_lot::Mutex;

use super::segment::{self, decode_tail, Fault, Footer, Sealed};
use crate::config::RemoteConfig;
use kvtier_net::backoff::Backoff;

/// Segment uploads a node has in flight at once (background work).
pub const UPLOADS: usize = 4;
/// Segment reads in flight at once, per chain read.
pub const READS: usize = 8;

/// Failures in a row that open the breaker.
pub const BREAKER_FAILURES: u32 = 3;

/// Bytes read from a segment's end first: enough for the footer of a
/// segment of a few hundred blocks; a longer footer costs a second read.
const TAIL_GUESS: u64 = 64 << 10;

/// Why a bucket operation did not succeed; every one is a miss to callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Miss {
    #[error("the breaker is open after repeated failures")]
    Breaker,
    #[error("deadline passed")]
    Timeout,
    #[error("object not found")]
    NotFound,
    #[error("segment refused: {0:?}")]
    Segment(Fault),
    #[error("object store: {0}")]
    Store(String),
}

/// Consecutive failures and when the next probe may go.
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
    backoff: Backoff,
}

/// See the module documentation.
pub struct Breaker {
    state: Mutex<BreakerState>,
}

impl Breaker {
    pub fn new() -> Self {
        Breaker {
            state: Mutex::new(BreakerState {
                failures: 0,
                open_until: None,
                probing: false,
                backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            }),
        }
    }

    /// Whether a request may go now: the breaker is closed, or its back-off
    /// passed and no other probe is out.
    pub fn allow(&self) -> bool {
        let mut s = self.state.lock();
        match s.open_until {
            None => true,
            Some(t) if Instant::now() >= t && !s.probing => {
                s.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    /// The outcome of a request [`Breaker::allow`] let through.
    pub fn record(&self, ok: bool) {
        let mut s = self.state.lock();
        s.probing = false;
        if ok {
            s.failures = 0;
            s.open_until = None;
            s.backoff.reset();
            return;
        }
        s.failures = s.failures.saturating_add(1);
        if s.failures >= BREAKER_FAILURES {
            let d = s.backoff.next_delay();
            s.open_until = Some(Instant::now() + d);
        }
    }

    /// Whether traffic is stopped (for `/healthz` and metrics).
    pub fn is_open(&self) -> bool {
        self.state.lock().open_until.is_some()
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Self::new()
    }
}

/// An S3-compatible bucket (and key prefix) as kvtier uses it.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    cfg: RemoteConfig,
    breaker: Breaker,
}

impl Bucket {
    /// Builds the client: the URL names bucket and prefix; endpoint, region,
    /// credentials and `AWS_ALLOW_HTTP` come from the usual `AWS_*`
    /// environment. Nothing is sent yet.
    pub fn open(cfg: RemoteConfig) -> Result<Bucket, Miss> {
        let rest = cfg
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| Miss::Store(format!("not an s3:// URL: {}", cfg.url)))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Miss::Store(format!("no bucket in {}", cfg.url)));
        }
        // reqwest is built without a TLS provider of its own: ring, as for
        // every other TLS in kvtier. Fails only if one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let allow_http = cfg.allow_http.unwrap_or_else(|| {
            std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true" || v == "1")
        });
        let client = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(Duration::from_secs(1))
            // The outer deadline of each request (its bytes at the slowest
            // rate allowed) is the limit; the client's own timeout only
            // backs it up, so it must not cut a large transfer short.
            .with_timeout(Duration::from_secs(600));
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(3),
        };
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(cfg.virtual_hosted)
            .with_client_options(client)
            .with_retry(retry);
        if let Some(v) = &cfg.endpoint {
            b = b.with_endpoint(v);
        }
        if let Some(v) = &cfg.region {
            b = b.with_region(v);
        }
        if let Some(v) = &cfg.access_key_id {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = &cfg.secret_access_key {
            b = b.with_secret_access_key(v);
        }
        let store = b.build().map_err(|e| Miss::Store(e.to_string()))?;
        Ok(Bucket {
            store: Arc::new(store),
            prefix: Path::from(prefix),
            cfg,
            breaker: Breaker::new(),
        })
    }

    /// The object store under the policy, for callers that compare with it.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// `name` under the bucket's prefix.
    pub fn path(&self, name: &str) -> Path {
        self.prefix
            .parts()
            .chain(Path::from(name).parts())
            .collect()
    }

    /// The deadline of a small request.
    pub fn timeout(&self) -> Duration {
        self.cfg.timeout
    }

    /// Runs one request under the breaker and a deadline.
    pub(super) async fn guarded<T>(
        &self,
        deadline: Duration,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, Miss> {
        if !self.breaker.allow() {
            return Err(Miss::Breaker);
        }
        let out = match tokio::time::timeout(deadline, f).await {
            Err(_) => Err(Miss::Timeout),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(object_store::Error::NotFound { .. })) => Err(Miss::NotFound),
            Ok(Err(e)) => Err(Miss::Store(e.to_string())),
        };
        // A missing object is an answer, not a sick server.
        self.breaker
            .record(matches!(out, Ok(_) | Err(Miss::NotFound)));
        out
    }

    /// The deadline of a transfer of `bytes` that shares the link with up
    /// to `sharing - 1` others of its kind: each gets its share of the
    /// slowest rate allowed.
    pub(super) fn deadline(&self, bytes: u64, sharing: usize) -> Duration {
        let rate = self.cfg.min_bytes_per_s.max(1) as f64 / sharing.max(1) as f64;
        self.cfg.timeout + Duration::from_secs_f64(bytes as f64 / rate)
    }

    /// Writes a sealed segment in one PUT.
    pub async fn put_segment(&self, name: &str, s: &Sealed) -> Result<(), Miss> {
        let path = self.path(name);
        let payload: PutPayload = s.parts.iter().cloned().collect();
        self.guarded(
            self.deadline(s.len, UPLOADS),
            self.store.put(&path, payload),
        )
        .await
        .map(|_| ())
    }

    /// Reads a segment's footer from its tail.
    pub async fn read_footer(&self, name: &str) -> Result<Footer, Miss> {
        let path = self.path(name);
        let opts = |n: u64| GetOptions {
            range: Some(GetRange::Suffix(n)),
            ..GetOptions::default()
        };
        let first = self
            .guarded(self.deadline(TAIL_GUESS, 1), async {
                let r = self.store.get_opts(&path, opts(TAIL_GUESS)).await?;
                let len = r.meta.size;
                Ok((r.bytes().await?, len))
            })
            .await?;
        let (tail, len) = first;
        match decode_tail(&tail, len) {
            Err(Fault::Short(need))
                if need <= u64::from(segment::MAX_FOOTER) + segment::TRAILER =>
            {
                let tail = self
                    .guarded(self.deadline(need, 1), async {
                        self.store.get_opts(&path, opts(need)).await?.bytes().await
                    })
                    .await?;
                decode_tail(&tail, len).map_err(Miss::Segment)
            }
            r => r.map_err(Miss::Segment),
        }
    }

    /// Reads blocks `which` (indexes into `footer.blocks`) of a segment:
    /// adjacent blocks in one range, all ranges of one call under one
    /// deadline. A block whose bytes fail their checksum comes back `None`;
    /// a failed request fails the call.
    pub async fn read_blocks(
        &self,
        name: &str,
        footer: &Footer,
        which: &[usize],
    ) -> Result<Vec<Option<Bytes>>, Miss> {
        let path = self.path(name);
        let ranges = footer.ranges(which);
        let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let got = self
            .guarded(
                self.deadline(total, READS),
                self.store.get_ranges(&path, &ranges),
            )
            .await?;
        if got.len() != ranges.len() {
            return Err(Miss::Store("short range answer".into()));
        }
        // `ranges` follow `which` in order, so each block lies in the range
        // under the cursor or in a later one: one forward pass.
        let mut out = Vec::with_capacity(which.len());
        let mut r = 0;
        for &i in which {
            let Some(b) = footer.blocks.get(i) else {
                out.push(None);
                continue;
            };
            let inside = |r: &std::ops::Range<u64>| r.start <= b.offset && b.range().end <= r.end;
            while r < ranges.len() && !inside(&ranges[r]) {
                r += 1;
            }
            let slice = ranges.get(r).zip(got.get(r)).and_then(|(range, data)| {
                let at = (b.offset - range.start) as usize;
                data.get(at..at + b.len as usize)
                    .map(|_| data.slice(at..at + b.len as usize))
            });
            out.push(slice.filter(|d| b.verify(d)));
        }
        Ok(out)
    }

    /// Opens `range` of object `name` as a stream of its bytes, in order,
    /// in the pieces they arrive in. Not guarded: the caller runs the
    /// request and the reading of its body in [`Bucket::guarded`].
    pub(super) async fn read_range(
        &self,
        name: &str,
        range: Range<u64>,
    ) -> object_store::Result<BoxStream<'static, object_store::Result<Bytes>>> {
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..GetOptions::default()
        };
        Ok(self
            .store
            .get_opts(&self.path(name), opts)
            .await?
            .into_stream())
    }

    /// Deletes an object (a missing one is fine).
    pub async fn delete(&self, name: &str) -> Result<(), Miss> {
        let path = self.path(name);
        match self
            .guarded(self.cfg.timeout, self.store.delete(&path))
            .await
        {
            Ok(()) | Err(Miss::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
