//! Replays one [`Stream`] through an index under test ([`Subject`]) and
//! measures it: write rate (clock stopped only once every write is applied and
//! visible), lookup rate and latency, bytes allocated per holding, and lookup
//! latency alone vs with a writer running at full speed.
//!
//! Cores are real: each configuration pins the process's new threads to the
//! first `cores` CPUs it may use, before the index under test is built (so an
//! index's own threads run on them too).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use crate::percentile;
use crate::stream::{Op, Stream};

/// An index under test.
pub trait Subject {
    /// A write as the index receives it (built before the clock starts).
    type Event: Clone + Send + Sync;
    /// What a lookup returns.
    type Answer;
    fn name(&self) -> String;
    /// The event of write `op` (never a lookup).
    fn event(&self, op: &Op) -> Self::Event;
    /// Applies (or queues) one write.
    fn apply(&self, ev: Self::Event);
    /// Returns once every write passed to `apply` is applied and visible to
    /// lookups.
    fn drain(&self);
    fn lookup(&self, prompt: &[u32]) -> Self::Answer;
    /// Matched blocks per worker of an answer, sorted by worker (for the
    /// cross-check, untimed).
    fn depths(&self, a: &Self::Answer) -> Vec<(u32, u32)>;
    /// Caller threads that apply writes with `cores` cores: 1 where the index
    /// spreads writes over its own threads.
    fn write_lanes(&self, cores: usize) -> usize;
}

/// A global allocator that counts live bytes (requested sizes; the
/// allocator's own overhead is not included).
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter is only bookkeeping.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(new, Ordering::Relaxed);
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
        q
    }
}

/// Bytes live through [`CountingAlloc`] (0 when it is not the global
/// allocator).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn allowed_cpus() -> &'static [usize] {
    static CPUS: OnceLock<Vec<usize>> = OnceLock::new();
    CPUS.get_or_init(|| {
        // SAFETY: a zeroed cpu_set_t is a valid empty set, and the size passed
        // is its own.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return vec![0];
            }
            (0..libc::CPU_SETSIZE as usize)
                .filter(|c| libc::CPU_ISSET(*c, &set))
                .collect()
        }
    })
}

/// CPUs this process may use.
pub fn cpu_count() -> usize {
    allowed_cpus().len()
}

/// Pins the calling thread, and the threads it starts from now on, to the
/// first `cores` CPUs the process was allowed at start.
pub fn pin(cores: usize) -> anyhow::Result<()> {
    let cpus = allowed_cpus();
    anyhow::ensure!(
        cores >= 1 && cores <= cpus.len(),
        "{cores} cores asked, {} available",
        cpus.len()
    );
    // SAFETY: as in `allowed_cpus`; CPU_SET writes inside the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in &cpus[..cores] {
            libc::CPU_SET(*c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Lookup latencies, nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Latency {
    fn of(ns: &mut [f64]) -> Self {
        ns.sort_by(f64::total_cmp);
        Self {
            p50_us: percentile(ns, 0.5) / 1e3,
            p99_us: percentile(ns, 0.99) / 1e3,
        }
    }
}

/// Everything measured of one subject in one core configuration.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub subject: String,
    pub cores: usize,
    /// Blocks stored per second of the write replay (its removes included
    /// in the time).
    pub store_blocks_per_s: f64,
    /// Block events (stores + removes) per second.
    pub events_per_s: f64,
    pub lookups_per_s: f64,
    pub lookup: Latency,
    /// Bytes allocated by the index per holding (block x worker) it keeps.
    pub bytes_per_holding: f64,
    /// One reader alone (same cores), and the same reader while a writer
    /// replays another fleet's writes without pause.
    pub alone: Option<Latency>,
    pub with_writer: Option<Latency>,
    /// Block events per second the concurrent writer achieved.
    pub writer_events_per_s: Option<f64>,
}

fn blocks(op: &Op) -> (u64, u64) {
    match op {
        Op::Store { ids, .. } => (ids.len() as u64, 0),
        Op::Remove { ids, .. } => (0, ids.len() as u64),
        Op::Lookup(_) => (0, 0),
    }
}

fn lanes_of<S: Subject>(s: &S, stream: &Stream, lanes: usize) -> Vec<Vec<S::Event>> {
    let mut out: Vec<Vec<S::Event>> = (0..lanes).map(|_| Vec::new()).collect();
    for op in stream.writes() {
        let w = op.worker().unwrap_or(0) as usize;
        out[w % lanes].push(s.event(op));
    }
    out
}

fn write_rates(stream: &Stream, secs: f64, row: &mut Row) {
    let (st, rm) = stream
        .writes()
        .map(blocks)
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    row.store_blocks_per_s = st as f64 / secs;
    row.events_per_s = (st + rm) as f64 / secs;
}

/// Builds the index from the stream's writes one event at a time (each
/// event made just before it is applied, so only the index's own memory
/// remains), and returns its bytes per holding.
fn build_state<S: Subject>(s: &S, stream: &Stream) -> f64 {
    let before = live_bytes();
    for op in stream.writes() {
        s.apply(s.event(op));
    }
    s.drain();
    let bytes = live_bytes().saturating_sub(before);
    bytes as f64 / stream.holdings.max(1) as f64
}

fn timed_lookups<'a, S: Subject>(
    s: &S,
    prompts: impl IntoIterator<Item = &'a Vec<u32>>,
    ns: &mut Vec<f64>,
) {
    for p in prompts {
        let t = Instant::now();
        let a = s.lookup(p);
        ns.push(t.elapsed().as_nanos() as f64);
        std::hint::black_box(a);
    }
}

/// Matched blocks per worker for the first `n` prompts, on the built index.
pub fn answers<S: Subject>(s: &S, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<(u32, u32)>> {
    prompts
        .iter()
        .take(n)
        .map(|p| s.depths(&s.lookup(p)))
        .collect()
}

/// One core: writes on one thread (plus the index's own threads, on the same
/// core), then lookups on one thread. Returns the row and the built index.
pub fn bench_one_core<S: Subject>(
    make: impl Fn() -> S,
    stream: &Stream,
) -> anyhow::Result<(Row, S)> {
    pin(1)?;
    let mut row = Row {
        cores: 1,
        ..Row::default()
    };
    {
        let s = make();
        row.subject = s.name();
        let events = lanes_of(&s, stream, 1).pop().unwrap_or_default();
        let t = Instant::now();
        for e in events {
            s.apply(e);
        }
        s.drain();
        write_rates(stream, t.elapsed().as_secs_f64(), &mut row);
    }
    let s = make();
    row.bytes_per_holding = build_state(&s, stream);
    let mut ns = Vec::with_capacity(stream.prompts.len());
    let t = Instant::now();
    timed_lookups(&s, &stream.prompts, &mut ns);
    row.lookups_per_s = ns.len() as f64 / t.elapsed().as_secs_f64();
    row.lookup = Latency::of(&mut ns);
    Ok((row, s))
}

/// `cores` cores: writes on the subject's lanes, lookups on `cores` reader
/// threads, then one reader alone and with a writer replaying `writer`'s
/// writes (another fleet, disjoint blocks) in a loop.
pub fn bench_cores<S: Subject + Sync>(
    make: impl Fn() -> S,
    stream: &Stream,
    writer: &Stream,
    cores: usize,
) -> anyhow::Result<Row> {
    pin(cores)?;
    let mut row = Row {
        cores,
        ..Row::default()
    };
    {
        let s = make();
        row.subject = s.name();
        let lanes = lanes_of(&s, stream, s.write_lanes(cores).max(1));
        let t = Instant::now();
        std::thread::scope(|sc| {
            for lane in lanes {
                let s = &s;
                sc.spawn(move || {
                    for e in lane {
                        s.apply(e);
                    }
                });
            }
        });
        s.drain();
        write_rates(stream, t.elapsed().as_secs_f64(), &mut row);
    }
    let s = make();
    row.bytes_per_holding = build_state(&s, stream);

    // Readers: every `cores`-th prompt each.
    let t = Instant::now();
    let mut all: Vec<f64> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..cores)
            .map(|r| {
                let s = &s;
                sc.spawn(move || {
                    let mut ns = Vec::with_capacity(stream.prompts.len() / cores + 1);
                    timed_lookups(s, stream.prompts.iter().skip(r).step_by(cores), &mut ns);
                    ns
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    row.lookups_per_s = all.len() as f64 / t.elapsed().as_secs_f64();
    row.lookup = Latency::of(&mut all);

    let mut ns = Vec::with_capacity(stream.prompts.len());
    timed_lookups(&s, &stream.prompts, &mut ns);
    row.alone = Some(Latency::of(&mut ns));

    let events: Vec<(S::Event, u64)> = writer
        .writes()
        .map(|op| {
            let (a, b) = blocks(op);
            (s.event(op), a + b)
        })
        .collect();
    let stop = AtomicBool::new(false);
    let mut ns = Vec::with_capacity(stream.prompts.len());
    let (written, secs) = std::thread::scope(|sc| {
        let s = &s;
        let stop = &stop;
        let events = &events;
        let w = sc.spawn(move || {
            let t = Instant::now();
            let mut n = 0u64;
            // A drain every 256 events bounds an asynchronous index's queue;
            // a synchronous one has nothing to wait for.
            'run: loop {
                for chunk in events.chunks(256) {
                    for (e, b) in chunk {
                        s.apply(e.clone());
                        n += b;
                    }
                    s.drain();
                    if stop.load(Ordering::Relaxed) {
                        break 'run;
                    }
                }
            }
            (n, t.elapsed().as_secs_f64())
        });
        timed_lookups(s, &stream.prompts, &mut ns);
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap_or((0, 1.0))
    });
    row.with_writer = Some(Latency::of(&mut ns));
    row.writer_events_per_s = Some(written as f64 / secs);
    Ok(row)
}

/// The markdown header of [`Row::markdown`].
pub const TABLE_HEADER: &str = "| input | index | cores | store blocks/s | block events/s | lookups/s | lookup p50 / p99 µs | bytes/holding | 1 reader alone p50 / p99 µs | with writer p50 / p99 µs | writer events/s |\n|---|---|---|---|---|---|---|---|---|---|---|";

impl Row {
    pub fn markdown(&self, input: &str) -> String {
        let lat = |l: Option<Latency>| {
            l.map_or("–".to_string(), |l| {
                format!("{:.1} / {:.1}", l.p50_us, l.p99_us)
            })
        };
        format!(
            "| {input} | {} | {} | {:.2} M | {:.2} M | {:.0} k | {:.1} / {:.1} | {:.0} | {} | {} | {} |",
            self.subject,
            self.cores,
            self.store_blocks_per_s / 1e6,
            self.events_per_s / 1e6,
            self.lookups_per_s / 1e3,
            self.lookup.p50_us,
            self.lookup.p99_us,
            self.bytes_per_holding,
            lat(self.alone),
            lat(self.with_writer),
            self.writer_events_per_s
                .map_or("–".to_string(), |w| format!("{:.2} M", w / 1e6)),
        )
    }
}
