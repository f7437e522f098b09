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
/// Loopback: without `auth_token_file` or `tls_client_ca` the APIs are open,
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
    /// PEM certificate chain both listeners serve TLS with (with
    /// `tls_key`; one without the other is a start-up error). Default none:
    /// plain HTTP and gRPC. Env `KVROUTER_TLS_CERT`; flag `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`. Default none; env `KVROUTER_TLS_KEY`;
    /// flag `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA that clients' certificates must chain to (mutual TLS; needs
    /// `tls_cert`). Default none: any client may connect. Env
    /// `KVROUTER_TLS_CLIENT_CA`; flag `--tls-client-ca`.
    pub tls_client_ca: Option<PathBuf>,
    /// File holding the bearer token every HTTP request (but `/health`,
    /// `/healthz`) and every gRPC call (but `grpc.health.v1`) must present
    /// (`Authorization: Bearer TOKEN`). Default none: no token asked. Env
    /// `KVROUTER_AUTH_TOKEN_FILE`; flag `--auth-token-file`.
    pub auth_token_file: Option<PathBuf>,
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
    /// Credentials presented to kvbm daemons reached over TCP.
    pub kvbm_client: KvbmClientConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: DEFAULT_HTTP.into(),
            grpc: DEFAULT_GRPC.into(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            auth_token_file: None,
            index: IndexSection::default(),
            scoring: ScoringConfig::default(),
            load: LoadConfig::default(),
            models: Vec::new(),
            workers: Vec::new(),
            registration: RegistrationConfig::default(),
            kvbm_client: KvbmClientConfig::default(),
        }
    }
}

/// `[kvbm_client]`: what the router presents to kvbm's TCP gRPC port when
/// it subscribes to events (see kvbm's `--tls-*` and `--auth-token-file`).
/// Unused for `unix:` addresses. Every key is a file and defaults to none.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvbmClientConfig {
    /// PEM CA kvbm's certificate must chain to; needed for `https://`
    /// addresses. Default none.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `tls_key`). Default none.
    pub tls_cert: Option<PathBuf>,
    /// PEM key of `tls_cert`. Default none.
    pub tls_key: Option<PathBuf>,
    /// File holding the bearer token sent with every call. Default none.
    pub token_file: Option<PathBuf>,
}

impl KvbmClientConfig {
    /// The credentials, after checking that the files can be read and go
    /// together: a mistake here is a start-up error, not a subscription
    /// that fails quietly forever.
    pub fn credentials(&self) -> anyhow::Result<kvtier_client::Credentials> {
        anyhow::ensure!(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "kvbm_client: tls_cert and tls_key go together"
        );
        anyhow::ensure!(
            self.tls_cert.is_none() || self.tls_ca.is_some(),
            "kvbm_client: a client certificate needs tls_ca"
        );
        for (key, f) in [
            ("tls_ca", &self.tls_ca),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("token_file", &self.token_file),
        ] {
            if let Some(f) = f {
                std::fs::File::open(f)
                    .map_err(|e| anyhow::anyhow!("kvbm_client.{key} {}: {e}", f.display()))?;
            }
        }
        Ok(kvtier_client::Credentials {
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            token_file: self.token_file.clone(),
        })
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

    /// The listeners' TLS files; none when `tls_cert` is not set.
    pub fn tls(&self) -> anyhow::Result<Option<kvtier_net::TlsFiles>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(kvtier_net::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })),
            (None, None) => {
                anyhow::ensure!(
                    self.tls_client_ca.is_none(),
                    "tls_client_ca needs tls_cert and tls_key"
                );
                Ok(None)
            }
            _ => anyhow::bail!("tls_cert and tls_key go together"),
        }
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

    #[test]
    fn tls_and_kvbm_client_keys() {
        let c = Config::default();
        assert!(c.tls_cert.is_none() && c.tls_key.is_none() && c.tls_client_ca.is_none());
        assert!(c.auth_token_file.is_none());
        assert!(matches!(c.tls(), Ok(None)));
        assert_eq!(
            c.kvbm_client.credentials().ok(),
            Some(kvtier_client::Credentials::default())
        );
        let c = Config::from_toml(
            r#"
tls_cert = "/etc/kvrouter/cert.pem"
tls_key = "/etc/kvrouter/key.pem"
tls_client_ca = "/etc/kvrouter/ca.pem"
auth_token_file = "/etc/kvrouter/token"
[kvbm_client]
tls_ca = "/etc/kvtier/ca.pem"
token_file = "/etc/kvtier/token"
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let tls = c.tls().ok().flatten().unwrap_or_else(|| panic!("no TLS"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/etc/kvrouter/ca.pem")));
        assert_eq!(
            c.auth_token_file,
            Some(PathBuf::from("/etc/kvrouter/token"))
        );
        assert_eq!(
            c.kvbm_client.tls_ca,
            Some(PathBuf::from("/etc/kvtier/ca.pem"))
        );
        // The named files do not exist: a start-up error naming the key.
        let e = c.kvbm_client.credentials().err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("kvbm_client.tls_ca")));
        for bad in [
            "tls_cert = \"c\"",
            "tls_key = \"k\"",
            "tls_client_ca = \"ca\"",
        ] {
            let c = Config::from_toml(bad).unwrap_or_else(|e| panic!("{e}"));
            assert!(c.tls().is_err(), "{bad}");
        }
        for bad in ["tls_cert = \"c\"", "tls_cert = \"c\"\ntls_key = \"k\""] {
            let c = Config::from_toml(&format!("[kvbm_client]\n{bad}"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(c.kvbm_client.credentials().is_err(), "{bad}");
        }
        assert!(Config::from_toml("[kvbm_client]\ntoken = \"x\"").is_err());
    }
}
