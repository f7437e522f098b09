//! The ring threads of the G3 tier.
//!
//! Each ring thread owns one `io_uring` instance and a pool of page-sized
//! buffers for entry headers and partial tail pages. Requests arrive over an
//! unbounded `mpsc` channel (the bound on writes is enforced by the caller
//! side, see `DiskTier::submit_write`) plus an eventfd that the thread keeps a
//! read armed on inside its own ring. The thread therefore always waits in
//! exactly one place, `io_uring_enter(min_complete = 1)`, and wakes on either
//! an I/O completion or a new request; when idle it sleeps in the kernel and
//! burns no CPU (no busy polling).
//!
//! Senders coalesce wake-ups through an atomic flag so a burst of requests
//! costs one eventfd write, not one per request.
//!
//! Up to `queue_depth` requests (blocks) are in flight per ring. A request is
//! one to three SQEs (header page, data body, zero-padded tail page); counting
//! blocks rather than SQEs keeps "queue depth 32" meaning 32 blocks on the
//! device, as in the plain benchmark loop.
//!
//! Buffers: a sparse fixed-buffer table is registered at start. Slot 0 holds
//! the header/tail page pool; `register_buffers` fills further slots with the
//! caller's memory (the G2 pool). An operation whose buffer lies entirely
//! inside a registered range uses `WriteFixed`/`ReadFixed` (no page pinning
//! per I/O), anything else plain `Write`/`Read`. If the kernel refuses buffer
//! registration everything falls back to plain operations.
//!
//! With a codec (`DiskConfig::codec`) a write is encoded here, into a bounce
//! buffer kept for reuse, and only then placed in a region (its stored size
//! is known only then); a compressed entry is read into such a buffer and
//! decoded into the caller's. Bounce buffers are unregistered memory: plain
//! operations.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};
use xxhash_rust::xxh3::xxh3_64;

use super::codec::{self, Encoder};
use super::entry::{entry_bytes, round_up, AlignedBuf, Header, PAGE};
use super::region::Slot;
use super::{DiskError, DiskLocation, Shared};

/// Completion callback of a write: the entry's location and the checksum
/// (xxh3-64) of its stored bytes, or why it was not stored.
pub type WriteDone = Box<dyn FnOnce(Result<(DiskLocation, u64), DiskError>) + Send>;
/// Completion callback of a read: `Ok` only when header and data verified.
pub type ReadDone = Box<dyn FnOnce(Result<(), DiskError>) + Send>;

/// Maximum length of one registered buffer (the kernel limit per iovec).
const MAX_FIXED: usize = 1 << 30;
/// Size of the sparse fixed-buffer table: slot 0 is the page pool, the
/// rest hold up to 1023 GiB of caller memory (kernel limit: 16384 slots).
const FIXED_SLOTS: u32 = 1024;
/// `user_data` of the eventfd read.
const UD_WAKE: u64 = u64::MAX;

/// A block key, inline (at most 32 bytes, checked before queueing).
#[derive(Clone, Copy)]
pub(crate) struct Key {
    bytes: [u8; 32],
    len: u8,
}

impl Key {
    /// `None` when longer than 32 bytes.
    pub(crate) fn new(k: &[u8]) -> Option<Key> {
        let mut bytes = [0u8; 32];
        bytes.get_mut(..k.len())?.copy_from_slice(k);
        Some(Key {
            bytes,
            len: k.len() as u8,
        })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

pub(crate) struct WriteOp {
    pub ns: u32,
    pub key: Key,
    pub data: *const u8,
    pub len: u32,
    /// Where the entry goes: placed by the submitter, or, when the tier
    /// encodes, by the ring thread once the stored size is known.
    pub slot: Option<Slot>,
    pub seq: u64,
    pub on_done: WriteDone,
    pub started: Instant,
}

pub(crate) struct ReadOp {
    pub loc: DiskLocation,
    pub ns: u32,
    pub key: Key,
    pub dst: *mut u8,
    pub on_done: ReadDone,
    pub started: Instant,
}

pub(crate) enum Msg {
    Write(WriteOp),
    Read(ReadOp),
    Register(
        Vec<(usize, usize)>,
        mpsc::SyncSender<Result<usize, DiskError>>,
    ),
    Shutdown,
}

// SAFETY: the raw pointers inside WriteOp/ReadOp are only dereferenced by the
// ring thread, under the contract of `DiskTier::submit_write`/`submit_read`
// (the memory stays valid and untouched by others until `on_done` runs).
unsafe impl Send for Msg {}

/// Wakes a ring thread out of `io_uring_enter`.
pub(crate) struct Waker {
    efd: OwnedFd,
    /// Set by the first sender after the ring consumed the last wake-up;
    /// later senders skip the syscall.
    pending: AtomicBool,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        // SAFETY: plain syscall; the returned fd is checked and owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            // SAFETY: fd is a fresh descriptor nobody else owns.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            pending: AtomicBool::new(false),
        })
    }

    pub(crate) fn wake(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            self.force();
        }
    }

    fn force(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A failure
        // (counter overflow) means a wake-up is already pending: ignorable.
        unsafe {
            libc::write(
                self.efd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }
}

/// The sending side kept by `DiskTier`.
pub(crate) struct RingHandle {
    pub tx: mpsc::Sender<Msg>,
    pub waker: Arc<Waker>,
    pub thread: Option<std::thread::JoinHandle<()>>,
    /// Kernel thread id of the ring thread (for per-thread CPU accounting
    /// in tests and diagnostics).
    #[cfg_attr(not(test), allow(dead_code))]
    pub tid: i32,
}

impl RingHandle {
    /// Queues a message and wakes the ring. Returns the message back when the
    /// ring thread is gone.
    // The message comes back only when the ring is gone: boxing every
    // message to shrink that rare error is not worth an allocation per I/O.
    #[allow(clippy::result_large_err)]
    pub(crate) fn send(&self, msg: Msg) -> Result<(), Msg> {
        self.tx.send(msg).map_err(|e| e.0)?;
        self.waker.wake();
        Ok(())
    }
}

/// Starts ring thread number `idx`; returns once its ring is set up.
pub(crate) fn spawn(shared: Arc<Shared>, idx: usize) -> Result<RingHandle, DiskError> {
    let waker = Arc::new(Waker::new().map_err(|e| DiskError::Io(e, "eventfd".into()))?);
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let w = waker.clone();
    let thread = std::thread::Builder::new()
        .name(format!("kvbm-g3-ring{idx}"))
        .spawn(move || match Ring::new(shared, rx, w) {
            Ok(mut ring) => {
                // SAFETY: gettid has no preconditions.
                let _ = ready_tx.send(Ok(unsafe { libc::gettid() }));
                ring.run();
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| DiskError::Io(e, "spawning the G3 ring thread".into()))?;
    match ready_rx.recv() {
        Ok(Ok(tid)) => Ok(RingHandle {
            tx,
            waker,
            thread: Some(thread),
            tid,
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(DiskError::Degraded("G3 ring thread died at start".into()))
        }
    }
}

/// Fixed page pool for headers and tail pages (fixed-buffer slot 0).
struct Pages {
    buf: AlignedBuf,
    free: Vec<u32>,
}

impl Pages {
    fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    fn ptr(&mut self, i: u32) -> *mut u8 {
        // In bounds: i < buf.len() / PAGE by construction of `free`.
        self.buf[i as usize * PAGE..].as_mut_ptr()
    }

    fn page(&mut self, i: u32) -> &mut [u8] {
        &mut self.buf[i as usize * PAGE..(i as usize + 1) * PAGE]
    }
}

enum Kind {
    /// The write and, once known, its stored length and checksum.
    Write(WriteOp, (u32, u64)),
    Read(ReadOp),
}

/// One request in flight: up to three SQEs (0 header, 1 body, 2 tail).
struct InFlight {
    kind: Kind,
    remaining: u8,
    expect: [u32; 3],
    error: Option<DiskError>,
    hdr: Option<u32>,
    tail: Option<u32>,
    bounce: Option<AlignedBuf>,
    /// `bounce` goes back to the ring's spare buffers when done.
    pooled: bool,
}

struct Ring {
    ring: IoUring,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    fd: RawFd,
    qd: usize,
    pages: Pages,
    /// Registered ranges: (start, end, buffer index). Empty when fixed
    /// buffers are unsupported.
    fixed: Vec<(usize, usize, u16)>,
    fixed_ok: bool,
    next_fixed: u32,
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<u32>,
    inflight: usize,
    wake_armed: bool,
    wake_buf: Box<u64>,
    shutdown: bool,
    cqes: Vec<(u64, i32)>,
    /// This ring's encoder, when the tier has a codec.
    encoder: Option<Encoder>,
    /// Bounce buffers of encoded writes and compressed reads, kept for
    /// the next (at most `qd`).
    spare: Vec<AlignedBuf>,
}

impl Ring {
    fn new(shared: Arc<Shared>, rx: Receiver<Msg>, waker: Arc<Waker>) -> Result<Ring, DiskError> {
        let qd = shared.cfg.queue_depth.max(1) as usize;
        // Every request needs at most 3 SQEs plus one for the wake-up read.
        let entries = ((qd * 3 + 1) as u32).next_power_of_two();
        // SINGLE_ISSUER + DEFER_TASKRUN (6.1+) run completions only when this
        // thread enters the kernel, which it does anyway; fall back to a
        // plain ring on older kernels.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))
            .map_err(|e| DiskError::Io(e, "io_uring setup".into()))?;
        let npages = 2 * qd + 2;
        let buf = AlignedBuf::new(npages * PAGE).ok_or_else(|| {
            DiskError::Io(io::ErrorKind::OutOfMemory.into(), "G3 page pool".into())
        })?;
        let encoder = shared.cfg.codec.as_ref().map(|c| c.encoder());
        let mut r = Ring {
            encoder,
            spare: Vec::new(),
            fd: shared.file.as_raw_fd(),
            ring,
            rx,
            shared,
            waker,
            qd,
            pages: Pages {
                buf,
                free: (0..npages as u32).rev().collect(),
            },
            fixed: Vec::new(),
            fixed_ok: false,
            next_fixed: 1,
            slots: (0..qd).map(|_| None).collect(),
            free_slots: (0..qd as u32).rev().collect(),
            inflight: 0,
            wake_armed: false,
            wake_buf: Box::new(0),
            shutdown: false,
            cqes: Vec::with_capacity(entries as usize * 2),
        };
        r.setup_fixed();
        Ok(r)
    }

    fn setup_fixed(&mut self) {
        if let Err(e) = self.ring.submitter().register_buffers_sparse(FIXED_SLOTS) {
            tracing::warn!(error = %e, "G3: fixed buffers unavailable, using plain reads/writes");
            return;
        }
        let iov = libc::iovec {
            iov_base: self.pages.buf.as_mut_ptr().cast(),
            iov_len: self.pages.buf.len(),
        };
        // SAFETY: the page pool lives as long as the ring: both are fields of
        // `Ring`, and `ring` is declared (hence dropped) first.
        match unsafe {
            self.ring
                .submitter()
                .register_buffers_update(0, &[iov], None)
        } {
            Ok(()) => {
                self.fixed_ok = true;
                let start = self.pages.buf.as_ptr() as usize;
                self.fixed.push((start, start + self.pages.buf.len(), 0));
            }
            Err(e) => {
                tracing::warn!(error = %e, "G3: registering the page pool failed, plain I/O");
            }
        }
    }

    fn register(&mut self, ranges: Vec<(usize, usize)>) -> Result<usize, DiskError> {
        if !self.fixed_ok {
            return Ok(0);
        }
        let mut iovs = Vec::new();
        for (start, len) in ranges {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(MAX_FIXED);
                iovs.push(libc::iovec {
                    iov_base: (start + off) as *mut libc::c_void,
                    iov_len: n,
                });
                off += n;
            }
        }
        if iovs.is_empty() {
            return Ok(0);
        }
        if self.next_fixed as usize + iovs.len() > FIXED_SLOTS as usize {
            return Err(DiskError::Invalid("too many registered buffers"));
        }
        // SAFETY: the caller of `DiskTier::register_buffers` guarantees the
        // memory stays mapped for the life of the tier.
        unsafe {
            self.ring
                .submitter()
                .register_buffers_update(self.next_fixed, &iovs, None)
        }
        .map_err(|e| DiskError::Io(e, "registering G3 buffers".into()))?;
        for iov in &iovs {
            let s = iov.iov_base as usize;
            self.fixed
                .push((s, s + iov.iov_len, self.next_fixed as u16));
            self.next_fixed += 1;
        }
        Ok(iovs.len())
    }

    fn fixed_index(&self, ptr: *const u8, len: u32) -> Option<u16> {
        let s = ptr as usize;
        let e = s.checked_add(len as usize)?;
        self.fixed
            .iter()
            .find(|&&(a, b, _)| a <= s && e <= b)
            .map(|&(_, _, i)| i)
    }

    fn run(&mut self) {
        loop {
            while self.inflight < self.qd && !self.shutdown {
                match self.rx.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => self.shutdown = true,
                }
            }
            if self.shutdown && self.inflight == 0 {
                self.quiesce_wake();
                return;
            }
            if !self.wake_armed && self.inflight < self.qd && !self.shutdown {
                self.arm_wake();
            }
            self.wait_and_reap();
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Write(w) => self.start_write(w),
            Msg::Read(r) => self.start_read(r),
            Msg::Register(ranges, reply) => {
                let _ = reply.send(self.register(ranges));
            }
            Msg::Shutdown => self.shutdown = true,
        }
    }

    /// Blocks until at least one completion, then processes all available.
    fn wait_and_reap(&mut self) {
        if let Err(e) = self.ring.submit_and_wait(1) {
            match e.raw_os_error() {
                // Interrupted, or completions must be reaped first: reap.
                Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                _ => {
                    tracing::error!(error = %e, "G3 io_uring_enter failed");
                    // Avoid a hot loop on a persistent failure.
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        self.reap();
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &cqes {
            if ud == UD_WAKE {
                self.wake_armed = false;
                // Later senders must write the eventfd again. A swap (not a
                // store) acquires the flag from the last sender that set
                // it, so that sender's message is visible to the drain that
                // follows.
                self.waker.pending.swap(false, Ordering::SeqCst);
            } else {
                self.complete_sub(ud, res);
            }
        }
        cqes.clear();
        self.cqes = cqes;
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.waker.efd.as_raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(UD_WAKE);
        if self.push(&e) {
            self.wake_armed = true;
        }
    }

    /// Before the ring is dropped: a pending eventfd read must complete so
    /// the kernel never writes into `wake_buf` after it is freed.
    fn quiesce_wake(&mut self) {
        while self.wake_armed {
            self.waker.force();
            self.wait_and_reap();
        }
    }

    /// Pushes one SQE, submitting first if the queue is full. False when it
    /// cannot be queued (cannot happen with the sizing above; handled anyway).
    fn push(&mut self, e: &squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: every buffer referenced by the SQEs we build stays valid
            // until its completion is reaped (owned by the InFlight slot, the
            // page pool, or the caller under the submit_* contract).
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return true;
            }
            let _ = self.ring.submit();
        }
        false
    }

    fn rw(&mut self, write: bool, buf: *mut u8, len: u32, off: u64, ud: u64) -> bool {
        let fd = types::Fd(self.fd);
        let e = match (self.fixed_index(buf, len), write) {
            (Some(i), true) => opcode::WriteFixed::new(fd, buf, len, i).offset(off).build(),
            (Some(i), false) => opcode::ReadFixed::new(fd, buf, len, i).offset(off).build(),
            (None, true) => opcode::Write::new(fd, buf, len).offset(off).build(),
            (None, false) => opcode::Read::new(fd, buf, len).offset(off).build(),
        };
        self.push(&e.user_data(ud))
    }

    /// Takes a request slot for `kind` (always available: the run loop
    /// admits at most `qd` requests); gives `kind` back if none is free.
    fn take_slot(&mut self, kind: Kind) -> Option<u32> {
        let s = self.free_slots.pop()?;
        self.slots[s as usize] = Some(InFlight {
            kind,
            remaining: 0,
            expect: [0; 3],
            error: None,
            hdr: None,
            tail: None,
            bounce: None,
            pooled: false,
        });
        self.inflight += 1;
        Some(s)
    }

    /// A bounce buffer of at least `len` bytes, spare or new.
    fn take_buf(&mut self, len: usize) -> Option<AlignedBuf> {
        match self.spare.iter().position(|b| b.len() >= len) {
            Some(i) => Some(self.spare.swap_remove(i)),
            None => AlignedBuf::new(len),
        }
    }

    fn start_write(&mut self, w: WriteOp) {
        if let Some(reason) = self.shared.degraded() {
            // Queued before the tier degraded: drop it rather than write.
            self.shared
                .finish_write(w, Err(DiskError::Degraded(reason)));
            return;
        }
        if self.free_slots.is_empty() {
            let e = DiskError::Degraded("G3 ring slot accounting".into());
            self.shared.finish_write(w, Err(e));
            return;
        }
        let Some(base) = w.slot.as_ref().map(|s| s.offset) else {
            return self.start_encoded_write(w);
        };
        let len = w.len as usize;
        let data = w.data;
        let Some(slot) = self.take_slot(Kind::Write(w, (0, 0))) else {
            return;
        };
        // SAFETY: the submit_write contract: `data` is valid for `len` bytes
        // and unchanged until on_done runs.
        let src: &[u8] = if len == 0 {
            &[]
        } else {
            unsafe { std::slice::from_raw_parts(data, len) }
        };
        let hdr = self.pages.take();
        let body_len = len & !(PAGE - 1);
        let tail_len = len - body_len;
        let mut sub: Vec<(u8, *mut u8, u32, u64)> = Vec::with_capacity(3);
        let mut fail = None;
        let mut tail = None;
        let mut bounce = None;
        if data as usize & (PAGE - 1) == 0 {
            if body_len > 0 {
                sub.push((1, data as *mut u8, body_len as u32, base + PAGE as u64));
            }
            if tail_len > 0 {
                match self.pages.take() {
                    Some(p) => {
                        let page = self.pages.page(p);
                        page[..tail_len].copy_from_slice(&src[body_len..]);
                        page[tail_len..].fill(0);
                        sub.push((
                            2,
                            self.pages.ptr(p),
                            PAGE as u32,
                            base + (PAGE + body_len) as u64,
                        ));
                        tail = Some(p);
                    }
                    None => fail = Some(pool_err()),
                }
            }
        } else {
            // Unaligned source (not a pool slot): copy into an aligned bounce
            // buffer; O_DIRECT needs aligned memory.
            match AlignedBuf::new(len) {
                Some(mut b) => {
                    b[..len].copy_from_slice(src);
                    if len > 0 {
                        sub.push((
                            1,
                            b.as_mut_ptr(),
                            round_up(len as u64) as u32,
                            base + PAGE as u64,
                        ));
                    }
                    bounce = Some(b);
                }
                None => fail = Some(pool_err()),
            }
        }
        if hdr.is_none() {
            fail = Some(pool_err());
        }
        if let Some(inf) = self.slots[slot as usize].as_mut() {
            inf.hdr = hdr;
            inf.tail = tail;
            inf.bounce = bounce;
        }
        if let Some(e) = fail {
            self.fail_unsubmitted(slot, e);
            return;
        }
        // Data first, so the device works while we hash the block.
        self.submit_subs(slot, &sub);
        let _ = self.ring.submit();
        let sum = xxh3_64(src);
        let (ns, key, gen) = match self.slots[slot as usize].as_mut() {
            Some(InFlight {
                kind: Kind::Write(w, done),
                ..
            }) => {
                *done = (len as u32, sum);
                (w.ns, w.key, w.slot.as_ref().map_or(0, |s| s.generation))
            }
            _ => return,
        };
        let Some(h) = hdr else { return };
        Header::plain(ns, gen, base, len as u32, sum, key.as_slice().to_vec())
            .encode(self.pages.page(h));
        let p = self.pages.ptr(h);
        self.submit_subs(slot, &[(0, p, PAGE as u32, base)]);
    }

    /// A write through the tier's codec: encoded into a bounce buffer,
    /// placed by its stored size, sealed with its place in the associated
    /// data, then written (header and padded data).
    fn start_encoded_write(&mut self, w: WriteOp) {
        let len = w.len as usize;
        let (ns, key, data) = (w.ns, w.key, w.data);
        let Some(room) = self.encoder.as_ref().map(|e| e.room(len)) else {
            let e = DiskError::Degraded("G3 write without a place".into());
            return self.shared.finish_write(w, Err(e));
        };
        let Some(slot) = self.take_slot(Kind::Write(w, (0, 0))) else {
            return;
        };
        let hdr = self.pages.take();
        let buf = self.take_buf(room);
        let pooled = buf.is_some();
        if let Some(inf) = self.slots[slot as usize].as_mut() {
            inf.hdr = hdr;
            inf.bounce = buf;
            inf.pooled = pooled;
        }
        let Some(h) = hdr.filter(|_| pooled) else {
            return self.fail_unsubmitted(slot, pool_err());
        };
        match self.encode_into(slot, ns, key, data, len) {
            Ok((place, header)) => {
                header.encode(self.pages.page(h));
                let p = self.pages.ptr(h);
                let mut subs = vec![(0, p, PAGE as u32, place.offset)];
                let padded = round_up(u64::from(header.len)) as u32;
                if let Some(b) = self.bounce_of(slot).filter(|_| padded > 0) {
                    subs.push((1, b, padded, place.offset + PAGE as u64));
                }
                self.submit_subs(slot, &subs);
            }
            Err(e) => self.fail_unsubmitted(slot, e),
        }
    }

    /// Encodes the block at `data` into `slot`'s bounce buffer, places it
    /// and seals it: its place and its header (checksum included). The
    /// place is recorded in the slot's write as soon as it is taken, so a
    /// later failure releases it.
    fn encode_into(
        &mut self,
        slot: u32,
        ns: u32,
        key: Key,
        data: *const u8,
        len: usize,
    ) -> Result<(Slot, Header), DiskError> {
        // SAFETY: the submit_write contract: `data` is valid for `len` bytes
        // and unchanged until on_done runs.
        let src: &[u8] = if len == 0 {
            &[]
        } else {
            unsafe { std::slice::from_raw_parts(data, len) }
        };
        let (Some(enc), Some(inf)) = (self.encoder.as_mut(), self.slots[slot as usize].as_mut())
        else {
            return Err(pool_err());
        };
        let Some(buf) = inf.bounce.as_mut() else {
            return Err(pool_err());
        };
        let (compression, stored) = enc.compress(src, buf);
        let place = self.shared.allocate(entry_bytes(stored as u64))?;
        if let Kind::Write(w, _) = &mut inf.kind {
            w.slot = Some(place);
        }
        let mut header = Header {
            raw_len: len as u32,
            compression,
            ..Header::plain(
                ns,
                place.generation,
                place.offset,
                stored as u32,
                0,
                key.as_slice().to_vec(),
            )
        };
        enc.seal(&mut header, &mut buf[..stored]).ok_or_else(|| {
            DiskError::Io(
                io::Error::other("no random nonce"),
                "G3 entry encryption".into(),
            )
        })?;
        // Padding is zeros, whatever the buffer held before.
        buf[stored..round_up(stored as u64) as usize].fill(0);
        header.checksum = xxh3_64(&buf[..stored]);
        if let Kind::Write(_, done) = &mut inf.kind {
            *done = (stored as u32, header.checksum);
        }
        Ok((place, header))
    }

    /// The bounce buffer of `slot`, as a pointer for an SQE.
    fn bounce_of(&mut self, slot: u32) -> Option<*mut u8> {
        let inf = self.slots[slot as usize].as_mut()?;
        inf.bounce.as_mut().map(|b| b.as_mut_ptr())
    }

    fn start_read(&mut self, r: ReadOp) {
        let len = r.loc.len as usize;
        // Stored shorter than decoded: compressed, decoded from a bounce
        // buffer. Otherwise the stored bytes are the block's (decrypted in
        // place when encrypted).
        let compressed = r.loc.len < r.loc.raw_len;
        let dst = r.dst;
        let base = r.loc.offset;
        if self.free_slots.is_empty() {
            let e = DiskError::Degraded("G3 ring slot accounting".into());
            self.shared.finish_read(r, Err(e));
            return;
        }
        let Some(slot) = self.take_slot(Kind::Read(r)) else {
            return;
        };
        let hdr = self.pages.take();
        let body_len = len & !(PAGE - 1);
        let tail_len = len - body_len;
        let mut sub: Vec<(u8, *mut u8, u32, u64)> = Vec::with_capacity(3);
        let mut fail = None;
        let mut tail = None;
        let mut bounce = None;
        match hdr {
            Some(h) => sub.push((0, self.pages.ptr(h), PAGE as u32, base)),
            None => fail = Some(pool_err()),
        }
        if !compressed && dst as usize & (PAGE - 1) == 0 {
            if body_len > 0 {
                sub.push((1, dst, body_len as u32, base + PAGE as u64));
            }
            if tail_len > 0 {
                match self.pages.take() {
                    Some(p) => {
                        sub.push((
                            2,
                            self.pages.ptr(p),
                            PAGE as u32,
                            base + (PAGE + body_len) as u64,
                        ));
                        tail = Some(p);
                    }
                    None => fail = Some(pool_err()),
                }
            }
        } else if len > 0 {
            // Compressed (decoded from it), or an unaligned destination
            // (O_DIRECT needs aligned memory): a bounce buffer.
            match self.take_buf(len) {
                Some(mut b) => {
                    sub.push((
                        1,
                        b.as_mut_ptr(),
                        round_up(len as u64) as u32,
                        base + PAGE as u64,
                    ));
                    bounce = Some(b);
                }
                None => fail = Some(pool_err()),
            }
        }
        if let Some(inf) = self.slots[slot as usize].as_mut() {
            inf.hdr = hdr;
            inf.tail = tail;
            inf.pooled = bounce.is_some();
            inf.bounce = bounce;
        }
        if let Some(e) = fail {
            self.fail_unsubmitted(slot, e);
            return;
        }
        self.submit_subs(slot, &sub);
    }

    /// Queues sub-operations of `slot`; one that cannot be queued completes
    /// at once with an error.
    fn submit_subs(&mut self, slot: u32, subs: &[(u8, *mut u8, u32, u64)]) {
        let write = matches!(
            self.slots[slot as usize].as_ref().map(|i| &i.kind),
            Some(Kind::Write(..))
        );
        if let Some(inf) = self.slots[slot as usize].as_mut() {
            inf.remaining += subs.len() as u8;
            for &(tag, _, len, _) in subs {
                inf.expect[tag as usize] = len;
            }
        }
        for &(tag, buf, len, off) in subs {
            let ud = (slot as u64) << 2 | tag as u64;
            if !self.rw(write, buf, len, off, ud) {
                self.complete_sub(ud, -libc::EBUSY);
            }
        }
    }

    fn fail_unsubmitted(&mut self, slot: u32, e: DiskError) {
        if let Some(inf) = self.slots[slot as usize].as_mut() {
            inf.error = Some(e);
        }
        self.finish(slot);
    }

    fn complete_sub(&mut self, ud: u64, res: i32) {
        let slot = (ud >> 2) as u32;
        let tag = (ud & 3) as usize;
        let Some(inf) = self.slots.get_mut(slot as usize).and_then(|s| s.as_mut()) else {
            tracing::error!(ud, "G3: completion for an unknown request");
            return;
        };
        if inf.error.is_none() {
            let is_write = matches!(inf.kind, Kind::Write(..));
            if res < 0 {
                let err = io::Error::from_raw_os_error(-res);
                inf.error = Some(if is_write && res == -libc::ENOSPC {
                    DiskError::NoSpace
                } else {
                    let what = if is_write { "G3 write" } else { "G3 read" };
                    DiskError::Io(err, what.into())
                });
            } else if res as u32 != inf.expect[tag.min(2)] {
                inf.error = Some(if is_write {
                    DiskError::Io(io::ErrorKind::WriteZero.into(), "G3 short write".into())
                } else {
                    // Reading past what was ever written: not an entry.
                    DiskError::BadHeader
                });
            }
        }
        inf.remaining = inf.remaining.saturating_sub(1);
        if inf.remaining == 0 {
            self.finish(slot);
        }
    }

    fn finish(&mut self, slot: u32) {
        let Some(inf) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.free_slots.push(slot);
        self.inflight -= 1;
        let InFlight {
            kind,
            error,
            hdr,
            tail,
            mut bounce,
            pooled,
            ..
        } = inf;
        match kind {
            Kind::Write(w, done) => {
                let res = match error {
                    Some(e) => Err(e),
                    None => Ok(done),
                };
                self.shared.finish_write(w, res);
            }
            Kind::Read(r) => {
                let res = match error {
                    Some(e) => Err(e),
                    None => self.verify(&r, hdr, tail, bounce.as_mut()),
                };
                self.shared.finish_read(r, res);
            }
        }
        for p in [hdr, tail].into_iter().flatten() {
            self.pages.free.push(p);
        }
        if let Some(b) = bounce.filter(|_| pooled && self.spare.len() < self.qd) {
            self.spare.push(b);
        }
    }

    /// Checks a completed read: header fields, then the data checksum, then
    /// (for an encoded entry) authenticity and decoding. Leaves exactly the
    /// block's `raw_len` bytes in the caller's buffer, copying tail or
    /// bounce bytes there on the way.
    fn verify(
        &mut self,
        r: &ReadOp,
        hdr: Option<u32>,
        tail: Option<u32>,
        bounce: Option<&mut AlignedBuf>,
    ) -> Result<(), DiskError> {
        let Some(h) = hdr else {
            return Err(DiskError::BadHeader);
        };
        let header = Header::decode(self.pages.page(h)).map_err(|_| DiskError::BadHeader)?;
        if header.generation != r.loc.generation || header.offset != r.loc.offset {
            // A valid entry of another generation: the region was recycled.
            return Err(DiskError::Stale);
        }
        if header.namespace != r.ns
            || header.len != r.loc.len
            || header.raw_len != r.loc.raw_len
            || header.key != r.key.as_slice()
        {
            return Err(DiskError::BadHeader);
        }
        let len = r.loc.len as usize;
        let raw_len = r.loc.raw_len as usize;
        let body_len = len & !(PAGE - 1);
        // SAFETY: submit_read contract: `dst` is valid for `loc.raw_len`
        // bytes and exclusively ours until on_done runs; all I/O into it has
        // completed.
        let dst: &mut [u8] = if raw_len == 0 {
            &mut []
        } else {
            unsafe { std::slice::from_raw_parts_mut(r.dst, raw_len) }
        };
        let codec = self.shared.cfg.codec.as_deref();
        if let Some(b) = bounce {
            let stored = &mut b[..len];
            if xxh3_64(stored) != header.checksum {
                return Err(DiskError::ChecksumMismatch);
            }
            return codec::open(codec, &header, stored, Some(dst));
        }
        // Read in place: stored and raw lengths are equal.
        let stored = &mut dst[..len];
        if let Some(t) = tail {
            let page = self.pages.page(t);
            stored[body_len..].copy_from_slice(&page[..len - body_len]);
        }
        if xxh3_64(stored) != header.checksum {
            return Err(DiskError::ChecksumMismatch);
        }
        codec::open(codec, &header, stored, None)
    }
}

fn pool_err() -> DiskError {
    DiskError::Io(io::ErrorKind::OutOfMemory.into(), "G3 buffer pool".into())
}

/// Runs a user callback, containing a panic so it cannot kill a ring thread
/// with I/O in flight.
pub(crate) fn call_guarded(f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        tracing::error!("G3 completion callback panicked");
    }
}
