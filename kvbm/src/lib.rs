//! kvbm — kvtier's per-node KV block manager.
//!
//! The daemon keeps KV-cache blocks of LLM engines in a shared host pool (G2)
//! and on local disk (G3), remembers them in a RocksDB catalog so a restart
//! is warm, and serves them over gRPC (Unix socket and TCP) with a zero-copy
//! path for local clients.
//!
//! - [`config`]: flags, environment, TOML file and their defaults.
//! - [`at_rest`]: compression and encryption of blocks at rest, shared by
//!   G3 and G4 (with the `at-rest` feature).
//! - [`store`]: the block store every API call goes through: the block
//!   table and the drivers (host pool, disk, journal) that carry it out.
//! - [`table`]: the block table: blocks, tiers, sessions, leases; no I/O.
//! - [`tenant`]: tenants, their namespaces, pools and quotas.
//! - [`index`]: the in-memory block index and host eviction order.
//! - [`pool`]: the shared-memory host pool and its slot allocator.
//! - [`disk`]: the NVMe tier (io_uring, `O_DIRECT`, append-only regions).
//! - [`catalog`]: durable metadata (RocksDB behind a trait).
//! - [`remote`]: the shared object-store tier (G4): its segment format.
//! - [`events`]: numbered block-event batches and their replay ring.
//! - [`server`]: gRPC, the pool socket, HTTP metrics and health (with the
//!   default `rocksdb` feature: the daemon needs its catalog).
//! - [`bench_disk`]: the plain io_uring loop `kvtier bench disk` compares with.

#[cfg(feature = "at-rest")]
pub mod at_rest;
pub mod bench_disk;
pub mod catalog;
pub mod config;
pub mod disk;
pub mod error;
pub mod events;
pub mod index;
pub mod metrics;
pub mod pool;
pub mod remote;
#[cfg(feature = "rocksdb")]
pub mod server;
pub mod store;
pub mod table;
pub mod tenant;

pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use store::Store;
