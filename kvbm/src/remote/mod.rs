//! The shared object-store tier (G4): blocks every kvbm daemon of a cluster
//! writes to and reads from one S3-compatible bucket, so a prefix computed on
//! one node is reused on every other.
//!
//! - [`segment`]: the object format — blocks packed in chain order into
//!   immutable segments with a footer that lists them.
//! - [`codec`]: how each block is stored at rest — optional compression
//!   (lz4, zstd) and encryption (AES-256-GCM).
//! - [`bucket`]: the S3 client under kvtier's failure policy (deadlines,
//!   short retries, a circuit breaker; every failure a miss).
//! - [`discovery`]: index objects, and how a node lists other nodes'
//!   segments incrementally.
//! - [`tier`]: the tier driver the store uses — its catalog, write-behind,
//!   discovery, chain reads and capacity.
#[cfg(feature = "remote")]
pub mod bucket;
#[cfg(feature = "remote")]
pub mod codec;
#[cfg(feature = "remote")]
pub mod discovery;
pub mod segment;
#[cfg(feature = "remote")]
pub mod tier;
