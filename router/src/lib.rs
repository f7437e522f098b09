//! kvrouter: the global KV-aware router.
//!
//! - [`event`]: the normalized block events ingestion hands the index.
//! - [`index`]: router-owned chain keys, the sharded global block index.
//! - [`scoring`]: the TTFT estimate per worker and the choice.
//! - [`workers`]: the worker registry, in-flight load, engine metrics scraping.
//! - [`registration`]: who may register workers over the APIs, and which
//!   addresses those workers may name.
//! - [`ingest`]: engine (ZMQ) and kvbm (gRPC) event streams into the index.
//! - [`route`]: the routing decision every API shares.
//! - [`tokenize`]: prompts and chat messages to token ids.
//! - [`config`]: the TOML configuration and its defaults.
//! - [`metrics`]: the Prometheus metrics.
//! - [`api`]: HTTP, gRPC and Envoy ext_proc servers.
//! - [`replay`]: trace replay against simulated engines.

pub mod api;
pub mod config;
pub mod engine_hash;
pub mod event;
pub mod index;
pub mod ingest;
pub mod metrics;
pub mod registration;
pub mod replay;
pub mod route;
pub mod scoring;
pub mod tokenize;
pub mod workers;
