//! Daemon configuration: embedded defaults, then a TOML file (`--config`),
//! then environment variables (`KVBM_*`), then command-line flags; each later
//! source overrides the earlier ones. Every default is stated where the field
//! is defined.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::tenant::TenantConfig;

/// How the disk tier decides which blocks are worth writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Admission {
    /// Every committed block is written behind to disk.
    Always,
    /// Only blocks seen at least twice (put or looked up) are written, to
    /// spare the drive from one-off prompts.
    Frequency,
}

/// How a tier compresses blocks at rest (G3: `disk_compression`, G4:
/// `remote_compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Blocks are stored as they are.
    #[default]
    None,
    /// lz4 (block format): fast, modest ratio.
    Lz4,
    /// zstd at the tier's `*_zstd_level`: slower, better ratio.
    Zstd,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Root of everything the daemon writes. Default `./kvtier-data`.
    pub data_dir: PathBuf,
    /// Size of the shared host pool (G2). Default 1 GiB.
    pub host_bytes: u64,
    /// Size of the disk tier file (G3); 0 disables the tier. Default 8 GiB
    /// (allocated region by region as it fills, not up front).
    pub disk_bytes: u64,
    /// Disk admission policy. Default `always`.
    pub disk_admit: Admission,
    /// The disk tier's file (a file on the NVMe file system, or a raw
    /// device). Default `<data-dir>/g3.dat`.
    pub disk_path: PathBuf,
    /// Disk region size: the unit of allocation and eviction. Default 64 MiB.
    pub region_bytes: u64,
    /// Disk I/O queue depth per ring. Default 32.
    pub disk_queue_depth: u32,
    /// Pending write-behind blocks before new ones are dropped. Default 1024.
    pub write_queue: usize,
    /// Compression of each disk entry (kept only where it makes the entry
    /// smaller). Default none.
    pub disk_compression: Compression,
    /// zstd's level for disk entries, 1 to 19. Default 3.
    pub disk_zstd_level: i32,
    /// File holding the key disk entries, and the catalog's token ids, are
    /// encrypted with (AES-256-GCM): 32 raw bytes or 64 hex digits; it may
    /// be the `remote_key_file`. With a key, only entries encrypted under it
    /// are read. Default none: entries and token ids stored in the clear.
    pub disk_key_file: Option<PathBuf>,
    /// gRPC Unix socket. Default `<data-dir>/kvbm.sock`; the pool socket is
    /// that path with `.pool` appended.
    pub socket: PathBuf,
    /// gRPC TCP address. Default `127.0.0.1:50051`; empty disables TCP.
    pub grpc: String,
    /// HTTP address for `/metrics` and `/healthz`. Default `127.0.0.1:9091`;
    /// empty disables it.
    pub http: String,
    /// A lease not released by then is dropped. Default 30 s.
    pub lease_ttl: Duration,
    /// Event batches kept for subscribers to resume from. Default 4096.
    pub event_ring: usize,
    /// Group given access to the Unix sockets (mode 0660); without it they
    /// are private to the daemon's user (0600). Default none.
    pub socket_group: Option<String>,
    /// Largest block a namespace may have; also bounds every gRPC message
    /// (plus 1 MiB for metadata), so no request buffers more. Default 64 MiB.
    pub max_block_bytes: u64,
    /// Pool-socket clients (engine processes) served at once; more wait.
    /// Default 256.
    pub max_clients: usize,
    /// TLS on the TCP listeners (gRPC and HTTP): certificate, key and, for
    /// mutual TLS, the CA client certificates must chain to. Default none
    /// (plain TCP).
    pub tls: Option<kvtier_net::TlsFiles>,
    /// File holding the bearer token every request on the TCP listeners
    /// must carry (`authorization: Bearer T`), `/healthz` excepted.
    /// Default none.
    pub auth_token_file: Option<PathBuf>,
    /// Tenants (`[[tenants]]` in the file only; see [`crate::tenant`]).
    /// Default none: every client is the operator.
    pub tenants: Vec<TenantConfig>,
    /// The shared object-store tier (G4). Default none: off.
    pub remote: Option<RemoteConfig>,
}

/// The object-store tier (G4): where its bucket is and how much of it this
/// node may fill. Endpoint, region, credentials and `allow_http` left unset
/// come from the usual `AWS_*` environment.
#[derive(Clone)]
pub struct RemoteConfig {
    /// `s3://BUCKET/PREFIX`: every daemon given the same one shares blocks.
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub allow_http: Option<bool>,
    /// Virtual-hosted-style requests; path-style otherwise. Default false.
    pub virtual_hosted: bool,
    /// Bytes of segments this node keeps in the bucket; its oldest go
    /// first. Default 64 GiB.
    pub bytes: u64,
    /// Sightings (the commit, then each read) before a block is uploaded;
    /// 1 uploads every block. Default 2.
    pub admit: u32,
    /// A segment is sealed and uploaded at this size. Default 32 MiB.
    pub segment_bytes: u64,
    /// ... or when its first block waited this long. Default 500 ms.
    pub linger: Duration,
    /// Block bytes waiting for upload before new ones are dropped. Default
    /// 512 MiB.
    pub queue_bytes: u64,
    /// How often other nodes' index objects are listed. Default 500 ms.
    pub poll: Duration,
    /// Deadline of one request; data transfers add their bytes at
    /// `min_bytes_per_s`. Defaults 2 s and 50 MB/s.
    pub timeout: Duration,
    pub min_bytes_per_s: u64,
    /// Compression of each block (kept only where it makes the block
    /// smaller). Default none.
    pub compression: Compression,
    /// zstd's level, 1 to 19. Default 3.
    pub zstd_level: i32,
    /// File holding the key blocks are encrypted with (AES-256-GCM): 32 raw
    /// bytes or 64 hex digits. With a key, only blocks encrypted under it
    /// are read. Default none: blocks stored in the clear, and encrypted
    /// ones never read.
    pub key_file: Option<PathBuf>,
}

impl std::fmt::Debug for RemoteConfig {
    // The secret stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bytes", &self.bytes)
            .field("admit", &self.admit)
            .field("compression", &self.compression)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl RemoteConfig {
    pub fn new(url: impl Into<String>) -> RemoteConfig {
        RemoteConfig {
            url: url.into(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: None,
            virtual_hosted: false,
            bytes: 64 << 30,
            admit: 2,
            segment_bytes: 32 << 20,
            linger: Duration::from_millis(500),
            queue_bytes: 512 << 20,
            poll: Duration::from_millis(500),
            timeout: Duration::from_secs(2),
            min_bytes_per_s: 50_000_000,
            compression: Compression::None,
            zstd_level: 3,
            key_file: None,
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        let data_dir = PathBuf::from("kvtier-data");
        Config {
            socket: data_dir.join("kvbm.sock"),
            disk_path: data_dir.join("g3.dat"),
            data_dir,
            host_bytes: 1 << 30,
            disk_bytes: 8 << 30,
            disk_admit: Admission::Always,
            region_bytes: 64 << 20,
            disk_queue_depth: 32,
            write_queue: 1024,
            disk_compression: Compression::None,
            disk_zstd_level: 3,
            disk_key_file: None,
            grpc: "127.0.0.1:50051".into(),
            http: "127.0.0.1:9091".into(),
            lease_ttl: Duration::from_secs(30),
            event_ring: 4096,
            socket_group: None,
            max_block_bytes: 64 << 20,
            max_clients: 256,
            tls: None,
            auth_token_file: None,
            tenants: Vec::new(),
            remote: None,
        }
    }
}

/// The TOML file: every key optional, same names as the flags with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub host_bytes: Option<Size>,
    pub disk_bytes: Option<Size>,
    pub disk_admit: Option<Admission>,
    pub disk_path: Option<PathBuf>,
    pub region_bytes: Option<Size>,
    pub disk_queue_depth: Option<u32>,
    pub write_queue: Option<usize>,
    pub disk_compression: Option<Compression>,
    pub disk_zstd_level: Option<i32>,
    pub disk_key_file: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub grpc: Option<String>,
    pub http: Option<String>,
    pub lease_ttl_secs: Option<u64>,
    pub event_ring: Option<usize>,
    pub socket_group: Option<String>,
    pub max_block_bytes: Option<Size>,
    pub max_clients: Option<usize>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub auth_token_file: Option<PathBuf>,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    pub remote_url: Option<String>,
    pub remote_endpoint: Option<String>,
    pub remote_region: Option<String>,
    pub remote_access_key_id: Option<String>,
    pub remote_secret_access_key: Option<String>,
    pub remote_allow_http: Option<bool>,
    pub remote_virtual_hosted: Option<bool>,
    pub remote_bytes: Option<Size>,
    pub remote_admit: Option<u32>,
    pub remote_segment_bytes: Option<Size>,
    pub remote_linger_ms: Option<u64>,
    pub remote_queue_bytes: Option<Size>,
    pub remote_poll_ms: Option<u64>,
    pub remote_timeout_ms: Option<u64>,
    pub remote_min_bytes_per_s: Option<Size>,
    pub remote_compression: Option<Compression>,
    pub remote_zstd_level: Option<i32>,
    pub remote_key_file: Option<PathBuf>,
}

/// Command-line flags; each also read from the environment variable named.
#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "kvbm",
    version,
    about = "kvtier's per-node KV block manager daemon"
)]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long, env = "KVBM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./kvtier-data].
    #[arg(long, env = "KVBM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Host pool size, e.g. 512MiB, 8GiB [default: 1GiB].
    #[arg(long, env = "KVBM_HOST_BYTES")]
    pub host_bytes: Option<Size>,
    /// Disk tier size; 0 disables it [default: 8GiB].
    #[arg(long, env = "KVBM_DISK_BYTES")]
    pub disk_bytes: Option<Size>,
    /// Disk admission policy [default: always].
    #[arg(long, env = "KVBM_DISK_ADMIT")]
    pub disk_admit: Option<Admission>,
    /// Disk tier file [default: <data-dir>/g3.dat].
    #[arg(long, env = "KVBM_DISK_PATH")]
    pub disk_path: Option<PathBuf>,
    /// Disk region size [default: 64MiB].
    #[arg(long, env = "KVBM_REGION_BYTES")]
    pub region_bytes: Option<Size>,
    /// Key file encrypting disk entries and catalog token ids [default: none].
    #[arg(long, env = "KVBM_DISK_KEY_FILE")]
    pub disk_key_file: Option<PathBuf>,
    /// gRPC Unix socket [default: <data-dir>/kvbm.sock].
    #[arg(long, env = "KVBM_SOCKET")]
    pub socket: Option<PathBuf>,
    /// gRPC TCP address; "" disables [default: 127.0.0.1:50051].
    #[arg(long, env = "KVBM_GRPC")]
    pub grpc: Option<String>,
    /// HTTP address for /metrics and /healthz; "" disables [default: 127.0.0.1:9091].
    #[arg(long, env = "KVBM_HTTP")]
    pub http: Option<String>,
    /// Lease time-to-live in seconds [default: 30].
    #[arg(long, env = "KVBM_LEASE_TTL_SECS")]
    pub lease_ttl_secs: Option<u64>,
    /// Group allowed to use the Unix sockets (mode 0660) [default: none, 0600].
    #[arg(long, env = "KVBM_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// TLS certificate chain (PEM) for the TCP listeners [default: none].
    #[arg(long, env = "KVBM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the TCP listeners [default: none].
    #[arg(long, env = "KVBM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) client certificates must chain to: mutual TLS [default: none].
    #[arg(long, env = "KVBM_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Bearer token file for requests on the TCP listeners [default: none].
    #[arg(long, env = "KVBM_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Object-store tier (G4) bucket, s3://BUCKET/PREFIX; endpoint, region
    /// and credentials from AWS_* [default: none, off].
    #[arg(long, env = "KVBM_REMOTE_URL")]
    pub remote_url: Option<String>,
    /// Bytes this node keeps in the bucket [default: 64GiB].
    #[arg(long, env = "KVBM_REMOTE_BYTES")]
    pub remote_bytes: Option<Size>,
    /// Sightings before a block goes to the bucket; 1: every block [default: 2].
    #[arg(long, env = "KVBM_REMOTE_ADMIT")]
    pub remote_admit: Option<u32>,
}

impl Config {
    /// Builds the configuration from the flags (which clap already merged
    /// with the environment) over the TOML file over the defaults.
    pub fn load(flags: Flags) -> Result<Config> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut c = Config::default();
        let data_dir = flags.data_dir.or(file.data_dir);
        if let Some(d) = data_dir {
            c.socket = d.join("kvbm.sock");
            c.disk_path = d.join("g3.dat");
            c.data_dir = d;
        }
        set(
            &mut c.host_bytes,
            flags.host_bytes.or(file.host_bytes).map(|s| s.0),
        );
        set(
            &mut c.disk_bytes,
            flags.disk_bytes.or(file.disk_bytes).map(|s| s.0),
        );
        set(&mut c.disk_admit, flags.disk_admit.or(file.disk_admit));
        set(&mut c.disk_path, flags.disk_path.or(file.disk_path));
        set(
            &mut c.region_bytes,
            flags.region_bytes.or(file.region_bytes).map(|s| s.0),
        );
        set(&mut c.disk_queue_depth, file.disk_queue_depth);
        set(&mut c.write_queue, file.write_queue);
        set(&mut c.disk_compression, file.disk_compression);
        set(&mut c.disk_zstd_level, file.disk_zstd_level);
        c.disk_key_file = flags.disk_key_file.or(file.disk_key_file);
        set(&mut c.socket, flags.socket.or(file.socket));
        set(&mut c.grpc, flags.grpc.or(file.grpc));
        set(&mut c.http, flags.http.or(file.http));
        set(
            &mut c.lease_ttl,
            flags
                .lease_ttl_secs
                .or(file.lease_ttl_secs)
                .map(Duration::from_secs),
        );
        set(&mut c.event_ring, file.event_ring);
        c.socket_group = flags.socket_group.or(file.socket_group);
        set(&mut c.max_block_bytes, file.max_block_bytes.map(|s| s.0));
        set(&mut c.max_clients, file.max_clients);
        let client_ca = flags.tls_client_ca.or(file.tls_client_ca);
        c.tls = match (
            flags.tls_cert.or(file.tls_cert),
            flags.tls_key.or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => Some(kvtier_net::TlsFiles {
                cert,
                key,
                client_ca,
            }),
            (None, None) if client_ca.is_none() => None,
            _ => {
                return Err(Error::invalid(
                    "tls-cert and tls-key go together (and tls-client-ca needs both)",
                ))
            }
        };
        c.auth_token_file = flags.auth_token_file.or(file.auth_token_file);
        c.tenants = file.tenants;
        if let Some(url) = flags.remote_url.or(file.remote_url) {
            let mut r = RemoteConfig::new(url);
            // The usual AWS_* environment overrides the file, as every
            // environment variable does.
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            r.endpoint = env("AWS_ENDPOINT_URL")
                .or_else(|| env("AWS_ENDPOINT"))
                .or(file.remote_endpoint);
            r.region = env("AWS_REGION").or(file.remote_region);
            r.access_key_id = env("AWS_ACCESS_KEY_ID").or(file.remote_access_key_id);
            r.secret_access_key = env("AWS_SECRET_ACCESS_KEY").or(file.remote_secret_access_key);
            r.allow_http = env("AWS_ALLOW_HTTP")
                .map(|v| v == "true" || v == "1")
                .or(file.remote_allow_http);
            set(&mut r.virtual_hosted, file.remote_virtual_hosted);
            set(
                &mut r.bytes,
                flags.remote_bytes.or(file.remote_bytes).map(|s| s.0),
            );
            set(&mut r.admit, flags.remote_admit.or(file.remote_admit));
            set(&mut r.segment_bytes, file.remote_segment_bytes.map(|s| s.0));
            set(
                &mut r.linger,
                file.remote_linger_ms.map(Duration::from_millis),
            );
            set(&mut r.queue_bytes, file.remote_queue_bytes.map(|s| s.0));
            set(&mut r.poll, file.remote_poll_ms.map(Duration::from_millis));
            set(
                &mut r.timeout,
                file.remote_timeout_ms.map(Duration::from_millis),
            );
            set(
                &mut r.min_bytes_per_s,
                file.remote_min_bytes_per_s.map(|s| s.0),
            );
            set(&mut r.compression, file.remote_compression);
            set(&mut r.zstd_level, file.remote_zstd_level);
            r.key_file = file.remote_key_file;
            c.remote = Some(r);
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        if self.host_bytes < 1 << 20 {
            return Err(Error::invalid("host-bytes must be at least 1MiB"));
        }
        if self.disk_bytes != 0 && self.region_bytes < 1 << 20 {
            return Err(Error::invalid("region-bytes must be at least 1MiB"));
        }
        if self.disk_bytes != 0 && self.disk_bytes < self.region_bytes {
            return Err(Error::invalid(format!(
                "disk-bytes ({}) is smaller than one region ({})",
                self.disk_bytes, self.region_bytes
            )));
        }
        if self.disk_queue_depth == 0
            || self.write_queue == 0
            || self.event_ring == 0
            || self.max_clients == 0
        {
            return Err(Error::invalid(
                "disk_queue_depth, write_queue, event_ring and max_clients must be positive",
            ));
        }
        if !(1..=19).contains(&self.disk_zstd_level) {
            return Err(Error::invalid("disk_zstd_level must be between 1 and 19"));
        }
        // Never silently in the clear: a build without the codec refuses
        // what it cannot honour.
        if cfg!(not(feature = "at-rest"))
            && (self.disk_key_file.is_some() || self.disk_compression != Compression::None)
        {
            return Err(Error::invalid(
                "disk-key-file or disk_compression given, but this kvbm was built without \
                 the at-rest codec (cargo feature `at-rest`)",
            ));
        }
        if !(4096..=1 << 30).contains(&self.max_block_bytes) {
            return Err(Error::invalid(
                "max_block_bytes must be between 4KiB and 1GiB",
            ));
        }
        if let Some(r) = &self.remote {
            if !r.url.starts_with("s3://") || r.url.len() <= "s3://".len() {
                return Err(Error::invalid(format!(
                    "remote-url must be s3://BUCKET/PREFIX, got {:?}",
                    r.url
                )));
            }
            if r.admit == 0 {
                return Err(Error::invalid("remote-admit must be at least 1"));
            }
            if !(1 << 20..=1 << 30).contains(&r.segment_bytes) {
                return Err(Error::invalid(
                    "remote_segment_bytes must be between 1MiB and 1GiB",
                ));
            }
            if r.bytes < r.segment_bytes || r.queue_bytes < r.segment_bytes {
                return Err(Error::invalid(
                    "remote-bytes and remote_queue_bytes must hold at least one segment",
                ));
            }
            if r.poll.is_zero() || r.timeout.is_zero() || r.min_bytes_per_s == 0 {
                return Err(Error::invalid(
                    "remote_poll_ms, remote_timeout_ms and remote_min_bytes_per_s must be positive",
                ));
            }
            if !(1..=19).contains(&r.zstd_level) {
                return Err(Error::invalid("remote_zstd_level must be between 1 and 19"));
            }
        }
        crate::tenant::Tenants::validate(&self.tenants)?;
        let quotas: u64 = self
            .tenants
            .iter()
            .filter_map(|t| t.disk_bytes.map(|s| s.0))
            .sum();
        if self.disk_bytes != 0 && quotas > self.disk_bytes {
            return Err(Error::invalid(format!(
                "tenants' disk_bytes ({quotas}) add up to more than disk-bytes ({})",
                self.disk_bytes
            )));
        }
        Ok(())
    }

    /// The largest gRPC message accepted or sent: one block and its metadata.
    pub fn max_message_bytes(&self) -> usize {
        (self.max_block_bytes + (1 << 20)) as usize
    }

    /// The pool socket next to the gRPC socket.
    pub fn pool_socket(&self) -> PathBuf {
        let mut s = self.socket.as_os_str().to_owned();
        s.push(".pool");
        PathBuf::from(s)
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("cannot read config {}", path.display()), e))?;
    toml::from_str(&text).map_err(|e| Error::invalid(format!("config {}: {e}", path.display())))
}

/// A byte size: `4096`, `512KiB`, `512MiB`, `8GiB`, `1TiB` (also `KB`,
/// `MB`, `GB`, `TB` as powers of ten, and `K`/`M`/`G`/`T` as powers of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Size, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            other => return Err(format!("unknown size unit {other:?} in {s:?}")),
        };
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected e.g. 512MiB or 8GiB"))?;
        let bytes = n * mult as f64;
        if !(0.0..=u64::MAX as f64).contains(&bytes) {
            return Err(format!("size {s:?} out of range"));
        }
        Ok(Size(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!("512MiB".parse::<Size>(), Ok(Size(512 << 20)));
        assert_eq!("8GiB".parse::<Size>(), Ok(Size(8 << 30)));
        assert_eq!("4096".parse::<Size>(), Ok(Size(4096)));
        assert_eq!("1.5GiB".parse::<Size>(), Ok(Size(3 << 29)));
        assert_eq!("2GB".parse::<Size>(), Ok(Size(2_000_000_000)));
        assert!("12 parsecs".parse::<Size>().is_err());
        assert!("GiB".parse::<Size>().is_err());
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvbm.toml");
        std::fs::write(
            &path,
            "data_dir = \"/srv/kv\"\nhost_bytes = \"2GiB\"\ndisk_admit = \"frequency\"\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(path),
            host_bytes: Some(Size(64 << 20)),
            ..Flags::default()
        };
        let c = Config::load(flags).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/kv"));
        assert_eq!(c.socket, PathBuf::from("/srv/kv/kvbm.sock"));
        assert_eq!(c.host_bytes, 64 << 20);
        assert_eq!(c.disk_admit, Admission::Frequency);
    }

    #[test]
    fn remote_compression_and_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvbm.toml");
        let load = |toml: &str| {
            std::fs::write(&path, toml).unwrap();
            Config::load(Flags {
                config: Some(path.clone()),
                ..Flags::default()
            })
        };
        let r = load("remote_url = \"s3://b/p\"\n").unwrap().remote.unwrap();
        assert_eq!(
            (r.compression, r.zstd_level, r.key_file),
            (Compression::None, 3, None)
        );
        let r = load(
            "remote_url = \"s3://b/p\"\nremote_compression = \"zstd\"\n\
             remote_zstd_level = 9\nremote_key_file = \"/etc/kvtier/g4.key\"\n",
        )
        .unwrap()
        .remote
        .unwrap();
        assert_eq!(r.compression, Compression::Zstd);
        assert_eq!(r.zstd_level, 9);
        assert_eq!(r.key_file, Some(PathBuf::from("/etc/kvtier/g4.key")));
        assert_eq!(
            load("remote_url = \"s3://b/p\"\nremote_compression = \"lz4\"\n")
                .unwrap()
                .remote
                .unwrap()
                .compression,
            Compression::Lz4
        );
        let err = load("remote_url = \"s3://b/p\"\nremote_compression = \"gzip\"\n").unwrap_err();
        assert!(err.to_string().contains("gzip"), "{err}");
        let err = load("remote_url = \"s3://b/p\"\nremote_zstd_level = 30\n").unwrap_err();
        assert!(err.to_string().contains("remote_zstd_level"), "{err}");
    }

    #[cfg(feature = "at-rest")]
    #[test]
    fn disk_compression_and_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvbm.toml");
        let load = |toml: &str, key_flag: Option<&str>| {
            std::fs::write(&path, toml).unwrap();
            Config::load(Flags {
                config: Some(path.clone()),
                disk_key_file: key_flag.map(PathBuf::from),
                ..Flags::default()
            })
        };
        let c = load("", None).unwrap();
        assert_eq!(
            (c.disk_compression, c.disk_zstd_level, c.disk_key_file),
            (Compression::None, 3, None)
        );
        let toml = "disk_compression = \"lz4\"\ndisk_zstd_level = 7\n\
                    disk_key_file = \"/etc/kvtier/g3.key\"\n";
        let c = load(toml, None).unwrap();
        assert_eq!(c.disk_compression, Compression::Lz4);
        assert_eq!(c.disk_zstd_level, 7);
        assert_eq!(c.disk_key_file, Some(PathBuf::from("/etc/kvtier/g3.key")));
        // The flag (or KVBM_DISK_KEY_FILE) over the file.
        let c = load(toml, Some("/run/g3.key")).unwrap();
        assert_eq!(c.disk_key_file, Some(PathBuf::from("/run/g3.key")));
        let err = load("disk_zstd_level = 0\n", None).unwrap_err();
        assert!(err.to_string().contains("disk_zstd_level"), "{err}");
        let err = load("disk_compression = \"gzip\"\n", None).unwrap_err();
        assert!(err.to_string().contains("gzip"), "{err}");
    }

    #[cfg(not(feature = "at-rest"))]
    #[test]
    fn a_disk_key_without_the_codec_is_an_error() {
        let err = Config::load(Flags {
            disk_key_file: Some(PathBuf::from("/etc/kvtier/g3.key")),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("at-rest"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvbm.toml");
        std::fs::write(&path, "host_byts = 5\n").unwrap();
        let err = Config::load(Flags {
            config: Some(path),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("host_byts"), "{err}");
    }
}
