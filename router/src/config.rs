//! Configuration: a TOML file, environment overrides (`KVROUTER_*`) and
//! command-line flags, in increasing precedence. Every default is written
//! where it is defined and in `docs/router.md`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::index::IndexConfig;
use crate::registration::RegistrationConfig;
use crate::scoring::ScoringConfig;
use crate::workers::WorkerSpec;

/// Default HTTP listen address (`/v1/route`, `/v1/workers`, `/metrics`).
/// Loopback: the APIs have no authentication but the registration token,
/// so reaching them from other hosts is the operator's explicit choice.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8090";
/// Default gRPC listen address (router service, Envoy ext_proc, health).
/// 9002 is the port the Gateway API Inference Extension expects of an
/// endpoint picker.
pub const DEFAULT_GRPC: &str = "127.0.0.1:9002";

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP listen address. Default `127.0.0.1:8090`; env `KVROUTER_HTTP`;
    /// flag `--http`.
    pub http: String,
    /// gRPC listen address. Default `127.0.0.1:9002`; env `KVROUTER_GRPC`;
    /// flag `--grpc`.
    pub grpc: String,
    pub index: IndexSection,
    pub scoring: ScoringConfig,
    pub load: LoadConfig,
    /// Per-model settings (tokenizer, chat template, KV group to route on).
    pub models: Vec<ModelConfig>,
    /// Workers known at start (more through `POST /v1/workers`). Trusted:
    /// `[registration]`'s address rules apply to API registrations only.
    pub workers: Vec<WorkerSpec>,
    /// Who may add and remove workers over the APIs, and which addresses
    /// such workers may name.
    pub registration: RegistrationConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: DEFAULT_HTTP.into(),
            grpc: DEFAULT_GRPC.into(),
            index: IndexSection::default(),
            scoring: ScoringConfig::default(),
            load: LoadConfig::default(),
            models: Vec::new(),
            workers: Vec::new(),
            registration: RegistrationConfig::default(),
        }
    }
}

/// `[index]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexSection {
    /// Lock shards. Default 64.
    pub shards: usize,
    /// Most holdings kept (block x source x tier), oldest pruned first.
    /// Default 20,000,000; env `KVROUTER_MAX_BLOCKS`; flag `--max-blocks`.
    pub max_blocks: usize,
}

impl Default for IndexSection {
    fn default() -> Self {
        let d = IndexConfig::default();
        Self {
            shards: d.shards,
            max_blocks: d.max_blocks,
        }
    }
}

impl IndexSection {
    pub fn to_index_config(&self) -> IndexConfig {
        IndexConfig {
            shards: self.shards,
            max_blocks: self.max_blocks,
        }
    }
}

/// `[load]`: where load figures come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadConfig {
    /// How often each worker's `metrics_url` is scraped, ms. Default 1000.
    pub scrape_interval_ms: u64,
    /// A routed request not reported done (`POST /v1/route/{id}/done`, or
    /// the end of its ext_proc stream) stops counting as in flight after
    /// this many seconds. Default 300.
    pub in_flight_ttl_s: u64,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            scrape_interval_ms: 1000,
            in_flight_ttl_s: 300,
        }
    }
}

/// `[[models]]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// The model name requests carry.
    pub name: String,
    /// Path of the model's `tokenizer.json` (needed for `prompt` and
    /// `messages` requests; `token_ids` requests need none).
    pub tokenizer: Option<PathBuf>,
    /// Chat template: a `tokenizer_config.json` (its `chat_template` key) or
    /// a Jinja file. None: the built-in minimal template (see docs).
    pub chat_template: Option<PathBuf>,
    /// KV-cache group routed on (hybrid models). Default 0.
    pub kv_group: u32,
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_default_to_loopback() {
        for a in [DEFAULT_HTTP, DEFAULT_GRPC] {
            let addr: std::net::SocketAddr = a.parse().unwrap_or_else(|e| panic!("{a}: {e}"));
            assert!(kvtier_net::is_loopback(&addr), "{a}");
        }
        let r = RegistrationConfig::default();
        assert!(r.enabled && r.token_file.is_none() && r.ipc_dir.is_none());
        assert!(r.allow_bind.is_empty());
    }

    #[test]
    fn defaults_and_full_file() {
        let c = Config::from_toml("").unwrap_or_default();
        assert_eq!(c.http, DEFAULT_HTTP);
        assert_eq!(c.grpc, DEFAULT_GRPC);
        let c = Config::from_toml(
            r#"
http = "127.0.0.1:1"
[index]
max_blocks = 10
[scoring]
temperature = 0.5
[[models]]
name = "m"
tokenizer = "/t/tokenizer.json"
[[workers]]
worker_id = "w0"
endpoint = "10.0.0.1:8000"
model = "m"
remote_group = "s3"
"#,
        );
        let c = match c {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.index.max_blocks, 10);
        assert_eq!(c.scoring.temperature, 0.5);
        assert_eq!(c.workers[0].remote_group.as_deref(), Some("s3"));
        assert!(c.model("m").is_some());
        assert!(Config::from_toml("nope = 1").is_err());
        let c = Config::from_toml(
            r#"
[registration]
enabled = false
allow_connect = ["10.0.0.0/8:5557-5600"]
"#,
        )
        .unwrap_or_default();
        assert!(!c.registration.enabled);
        assert_eq!(c.registration.allow_connect, ["10.0.0.0/8:5557-5600"]);
        assert!(Config::from_toml("[registration]\ntoken = \"x\"").is_err());
    }
}
