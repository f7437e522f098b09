//! Who may add and remove workers over the APIs (`POST`/`DELETE
//! /v1/workers`, gRPC `AddWorker`/`RemoveWorker`), and what a worker added
//! that way may make the router bind and connect to.
//!
//! A registered worker names addresses the router then acts on: an engine
//! PUB it connects to or binds for (`zmq_endpoint`), a replay ROUTER
//! (`zmq_replay_endpoint`), a kvbm daemon (`kvbm`), a metrics page
//! (`metrics_url`). Unchecked, any client of the API could make the router
//! open ports, replace files with sockets, or reach hosts the client cannot.
//!
//! Workers of the configuration file (`[[workers]]`) are trusted: the file is
//! the operator's, the same one that writes these rules. The one rule that
//! holds for them too lives in the ZMTP listener: binding a Unix socket
//! never replaces anything but a stale socket.
//!
//! `endpoint` (where requests are sent) is not checked: the router never
//! connects to it; the gateway does, and registering at all needs the token.

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use kvtier_net::BearerToken;
use serde::{Deserialize, Serialize};

use crate::ingest::{zmq_endpoint_mode, zmtp::Endpoint};
use crate::workers::WorkerSpec;

/// `[registration]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationConfig {
    /// Whether workers can be added and removed over HTTP and gRPC.
    /// Default true.
    pub enabled: bool,
    /// File holding the bearer token those calls must present
    /// (`Authorization: Bearer TOKEN`; surrounding whitespace is ignored).
    /// Default none: no token asked.
    pub token_file: Option<PathBuf>,
    /// Directory under which a registered worker may have the router bind
    /// an `ipc://` endpoint. Default none: such binds are refused.
    pub ipc_dir: Option<PathBuf>,
    /// Addresses a registered worker may have the router bind (`bind:` or
    /// `*` endpoints), as patterns (see [`AddrPattern`]). Default empty:
    /// no TCP binds.
    pub allow_bind: Vec<String>,
    /// Addresses a registered worker may have the router connect to, as
    /// patterns (see [`AddrPattern`]). Default `["127.0.0.0/8", "::1",
    /// "unix:/"]`: this host only, like the default listeners.
    pub allow_connect: Vec<String>,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        RegistrationConfig {
            enabled: true,
            token_file: None,
            ipc_dir: None,
            allow_bind: Vec::new(),
            allow_connect: vec!["127.0.0.0/8".into(), "::1".into(), "unix:/".into()],
        }
    }
}

/// Why a registration call is refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// 403 / PERMISSION_DENIED.
    #[error("worker registration is disabled (registration.enabled = false)")]
    Disabled,
    /// 401 / UNAUTHENTICATED.
    #[error("worker registration needs a valid bearer token")]
    Unauthenticated,
    /// 403 / PERMISSION_DENIED: an address outside the allow-lists.
    #[error("{0}")]
    Forbidden(String),
}

/// One allow-list entry.
///
/// - `unix:PATH`: Unix sockets at or below `PATH` (`unix:/`: all).
/// - `HOST` or `HOST:PORTS`, where `HOST` is `*` (any host), an IP address,
///   a CIDR block (`10.0.0.0/8`, `fd00::/8`; IPv6 with a port in brackets:
///   `[fd00::/8]:5557`) or a host name (matched as written, not resolved),
///   and `PORTS` is `N`, `N-M` or `*` (any; also when omitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrPattern {
    Unix(PathBuf),
    Inet {
        host: HostPattern,
        ports: (u16, u16),
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Net(IpAddr, u8),
    Name(String),
}

impl AddrPattern {
    pub fn parse(s: &str) -> Result<AddrPattern, String> {
        let s = s.trim();
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(AddrPattern::Unix(
                clean_path(Path::new(p)).map_err(|e| format!("{s:?}: {e}"))?,
            ));
        }
        let (host, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (h, tail) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: no closing ']'"))?;
            match tail {
                "" => (h, None),
                t => (
                    h,
                    Some(
                        t.strip_prefix(':')
                            .ok_or_else(|| format!("{s:?}: junk after ']'"))?,
                    ),
                ),
            }
        } else if s.matches(':').count() > 1 {
            (s, None) // a bare IPv6 address or block
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let host = parse_host_pattern(host).map_err(|e| format!("{s:?}: {e}"))?;
        let ports = match ports {
            None | Some("*") => (0, u16::MAX),
            Some(p) => {
                let port = |x: &str| {
                    x.trim()
                        .parse::<u16>()
                        .map_err(|_| format!("{s:?}: bad port {x:?}"))
                };
                match p.split_once('-') {
                    Some((a, b)) => (port(a)?, port(b)?),
                    None => (port(p)?, port(p)?),
                }
            }
        };
        if ports.0 > ports.1 {
            return Err(format!("{s:?}: empty port range"));
        }
        Ok(AddrPattern::Inet { host, ports })
    }

    fn matches(&self, target: &Target) -> bool {
        match (self, target) {
            (AddrPattern::Unix(dir), Target::Unix(p)) => p.starts_with(dir),
            (AddrPattern::Inet { host, ports }, Target::Inet { host: h, port }) => {
                (ports.0..=ports.1).contains(port) && host.matches(h)
            }
            _ => false,
        }
    }
}

fn parse_host_pattern(h: &str) -> Result<HostPattern, String> {
    if h == "*" {
        return Ok(HostPattern::Any);
    }
    if let Some((ip, len)) = h.split_once('/') {
        let ip: IpAddr = ip.parse().map_err(|_| format!("bad address {ip:?}"))?;
        let ip = ip.to_canonical();
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("bad prefix length {len:?}"))?;
        return Ok(HostPattern::Net(ip, len));
    }
    if let Ok(ip) = h.parse::<IpAddr>() {
        let ip = ip.to_canonical();
        return Ok(HostPattern::Net(ip, if ip.is_ipv4() { 32 } else { 128 }));
    }
    if h.is_empty()
        || !h
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    {
        return Err(format!("bad host {h:?}"));
    }
    Ok(HostPattern::Name(h.to_ascii_lowercase()))
}

impl HostPattern {
    fn matches(&self, host: &str) -> bool {
        let ip = host.parse::<IpAddr>().ok().map(|i| i.to_canonical());
        match (self, ip) {
            (HostPattern::Any, _) => true,
            (HostPattern::Net(net, len), Some(ip)) => in_net(ip, *net, *len),
            (HostPattern::Name(n), None) => host.eq_ignore_ascii_case(n),
            _ => false,
        }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - len as u32).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// An absolute path without `.` or `..` components (so that a prefix test
/// on it means what it says).
fn clean_path(p: &Path) -> Result<PathBuf, String> {
    if !p.is_absolute() {
        return Err(format!("{}: not an absolute path", p.display()));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("{}: '.' and '..' are not allowed", p.display()));
    }
    Ok(p.to_path_buf())
}

/// `p` with symlinks of its directory resolved (the file itself need not
/// exist), so that a link inside an allowed directory cannot lead out of it.
fn resolve_parent(p: &Path) -> Result<PathBuf, String> {
    let p = clean_path(p)?;
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(format!("{}: no file name", p.display()));
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| format!("{}: {e}", parent.display()))?;
    Ok(parent.join(name))
}

/// An address the router would act on.
#[derive(Debug)]
enum Target {
    Unix(PathBuf),
    Inet { host: String, port: u16 },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
            Target::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Splits `host:port` (`[v6]:port` too); `default_port` when absent.
fn split_host_port(hp: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = hp.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or("no closing ']'")?;
        (h, tail.strip_prefix(':'))
    } else {
        match hp.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hp, None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) => p
            .parse::<u16>()
            .map_err(|_| format!("bad port in {hp:?}"))?,
        (None, Some(d)) => d,
        (None, None) => return Err(format!("no port in {hp:?}")),
    };
    if host.is_empty() {
        return Err(format!("no host in {hp:?}"));
    }
    Ok((host.to_string(), port))
}

fn endpoint_target(ep: &Endpoint) -> Result<Target, String> {
    match ep {
        Endpoint::Tcp(hp) => {
            let (host, port) = split_host_port(hp, None)?;
            let host = if host == "*" { "0.0.0.0".into() } else { host };
            Ok(Target::Inet { host, port })
        }
        Endpoint::Ipc(p) => Ok(Target::Unix(resolve_parent(p)?)),
    }
}

/// The target of a kvbm address: `unix:/path`, `unix:///path` or
/// `http(s)://host[:port]`.
fn kvbm_target(s: &str) -> Result<Target, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        let p = p.strip_prefix("//").unwrap_or(p);
        return Ok(Target::Unix(resolve_parent(Path::new(p))?));
    }
    let (rest, port) = if let Some(r) = s.strip_prefix("http://") {
        (r, 80)
    } else if let Some(r) = s.strip_prefix("https://") {
        (r, 443)
    } else {
        return Err("only http://, https:// and unix: addresses are supported".into());
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.contains('@') {
        return Err("user information in the address is not supported".into());
    }
    let (host, port) = split_host_port(authority, Some(port))?;
    Ok(Target::Inet { host, port })
}

/// The registration rules, ready to check calls against.
#[derive(Debug)]
pub struct Registration {
    enabled: bool,
    token: Option<BearerToken>,
    ipc_dir: Option<PathBuf>,
    allow_bind: Vec<AddrPattern>,
    allow_connect: Vec<AddrPattern>,
}

impl Registration {
    /// Reads the token file and parses the patterns.
    pub fn from_config(c: &RegistrationConfig) -> anyhow::Result<Registration> {
        let token = match &c.token_file {
            Some(f) => Some(
                BearerToken::from_file(f)
                    .map_err(|e| anyhow::anyhow!("registration.token_file: {e}"))?,
            ),
            None => None,
        };
        let ipc_dir = match &c.ipc_dir {
            Some(d) => Some(
                clean_path(d)
                    .and_then(|d| {
                        d.canonicalize()
                            .map_err(|e| format!("{}: {e}", d.display()))
                    })
                    .map_err(|e| anyhow::anyhow!("registration.ipc_dir: {e}"))?,
            ),
            None => None,
        };
        let patterns = |key: &str, v: &[String]| -> anyhow::Result<Vec<AddrPattern>> {
            v.iter()
                .map(|s| {
                    AddrPattern::parse(s).map_err(|e| anyhow::anyhow!("registration.{key}: {e}"))
                })
                .collect()
        };
        Ok(Registration {
            enabled: c.enabled,
            token,
            ipc_dir,
            allow_bind: patterns("allow_bind", &c.allow_bind)?,
            allow_connect: patterns("allow_connect", &c.allow_connect)?,
        })
    }

    /// The token registration calls must present, if any.
    pub fn token(&self) -> Option<&BearerToken> {
        self.token.as_ref()
    }

    /// Checks a call's `Authorization` value (`Bearer TOKEN`).
    pub fn authorize(&self, authorization: Option<&[u8]>) -> Result<(), RegistrationError> {
        if !self.enabled {
            return Err(RegistrationError::Disabled);
        }
        match &self.token {
            Some(t) if !t.accepts(authorization) => Err(RegistrationError::Unauthenticated),
            _ => Ok(()),
        }
    }

    /// Checks every address of `spec` against the allow-lists.
    pub fn check(&self, spec: &WorkerSpec) -> Result<(), RegistrationError> {
        let deny = |field: &str, e: String| RegistrationError::Forbidden(format!("{field}: {e}"));
        if let Some(z) = &spec.zmq_endpoint {
            let (bind, ep) = zmq_endpoint_mode(z).map_err(|e| deny("zmq_endpoint", e))?;
            if bind {
                self.check_bind(&ep).map_err(|e| deny("zmq_endpoint", e))?;
            } else {
                for r in 0..spec.dp_ranks {
                    let ep = ep.offset(r).map_err(|e| deny("zmq_endpoint", e))?;
                    self.check_connect(&ep)
                        .map_err(|e| deny("zmq_endpoint", e))?;
                }
            }
        }
        if let Some(z) = &spec.zmq_replay_endpoint {
            let ep = Endpoint::parse(z).map_err(|e| deny("zmq_replay_endpoint", e))?;
            for r in 0..spec.dp_ranks {
                let ep = ep.offset(r).map_err(|e| deny("zmq_replay_endpoint", e))?;
                self.check_connect(&ep)
                    .map_err(|e| deny("zmq_replay_endpoint", e))?;
            }
        }
        if let Some(k) = &spec.kvbm {
            let t = kvbm_target(k).map_err(|e| deny("kvbm", e))?;
            self.allowed(&self.allow_connect, &t, "allow_connect")
                .map_err(|e| deny("kvbm", e))?;
        }
        if let Some(u) = &spec.metrics_url {
            let (hp, _) = crate::workers::parse_http_url(u).map_err(|e| deny("metrics_url", e))?;
            let (host, port) = split_host_port(&hp, None).map_err(|e| deny("metrics_url", e))?;
            self.allowed(
                &self.allow_connect,
                &Target::Inet { host, port },
                "allow_connect",
            )
            .map_err(|e| deny("metrics_url", e))?;
        }
        Ok(())
    }

    fn check_connect(&self, ep: &Endpoint) -> Result<(), String> {
        let t = endpoint_target(ep)?;
        self.allowed(&self.allow_connect, &t, "allow_connect")
    }

    fn check_bind(&self, ep: &Endpoint) -> Result<(), String> {
        match ep {
            Endpoint::Ipc(_) => {
                let Some(dir) = &self.ipc_dir else {
                    return Err(format!("{ep}: ipc binds need registration.ipc_dir"));
                };
                let Target::Unix(p) = endpoint_target(ep)? else {
                    return Err(format!("{ep}: not a path"));
                };
                if !p.starts_with(dir) {
                    return Err(format!(
                        "{ep}: not under registration.ipc_dir ({})",
                        dir.display()
                    ));
                }
                crate::ingest::zmtp::existing_socket(&p).map_err(|e| format!("{ep}: {e}"))?;
                Ok(())
            }
            Endpoint::Tcp(_) => self.allowed(&self.allow_bind, &endpoint_target(ep)?, "allow_bind"),
        }
    }

    fn allowed(&self, list: &[AddrPattern], t: &Target, key: &str) -> Result<(), String> {
        if list.iter().any(|p| p.matches(t)) {
            Ok(())
        } else {
            Err(format!("{t} is not in registration.{key}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkerSpec {
        WorkerSpec {
            worker_id: "w".into(),
            endpoint: "10.0.0.1:8000".into(),
            model: "m".into(),
            zmq_endpoint: None,
            zmq_replay_endpoint: None,
            dp_ranks: 1,
            kvbm: None,
            metrics_url: None,
            remote_group: None,
        }
    }

    fn reg(c: RegistrationConfig) -> Registration {
        match Registration::from_config(&c) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn patterns() {
        let ok = |p: &str, host: &str, port: u16| {
            AddrPattern::parse(p)
                .map(|p| {
                    p.matches(&Target::Inet {
                        host: host.into(),
                        port,
                    })
                })
                .unwrap_or_else(|e| panic!("{e}"))
        };
        assert!(ok("10.0.0.0/8", "10.1.2.3", 1));
        assert!(!ok("10.0.0.0/8", "11.1.2.3", 1));
        assert!(ok("10.0.0.0/8:5557-5560", "10.1.2.3", 5560));
        assert!(!ok("10.0.0.0/8:5557-5560", "10.1.2.3", 5561));
        assert!(ok("::1", "::1", 9));
        assert!(ok("127.0.0.0/8", "::ffff:127.0.0.1", 9));
        assert!(ok("[fd00::/8]:7070", "fd12::1", 7070));
        assert!(!ok("[fd00::/8]:7070", "fd12::1", 7071));
        assert!(ok("*:80", "anything", 80));
        assert!(ok("Node1.example", "node1.EXAMPLE", 1));
        assert!(!ok("node1.example", "10.0.0.1", 1));
        assert!(!ok("10.0.0.1", "node1", 1));
        assert!(ok("0.0.0.0/0", "1.2.3.4", 1));
        for bad in [
            "10.0.0.0/33",
            "x y",
            "1.2.3.4:99999",
            "1.2.3.4:9-1",
            "unix:rel",
            "unix:/a/../b",
            "[::1",
        ] {
            assert!(AddrPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_allows_this_host_only() {
        let r = reg(RegistrationConfig::default());
        let mut s = spec();
        s.kvbm = Some("http://127.0.0.1:7070".into());
        s.metrics_url = Some("http://[::1]:8000/metrics".into());
        s.zmq_endpoint = Some("tcp://127.0.0.1:5557".into());
        s.dp_ranks = 4;
        assert!(r.check(&s).is_ok());
        for (field, v) in [
            ("kvbm", "http://10.0.0.1:7070"),
            ("kvbm", "http://169.254.169.254"),
            ("metrics_url", "http://10.0.0.1:8000/metrics"),
            ("zmq_endpoint", "tcp://10.0.0.1:5557"),
            ("zmq_endpoint", "bind:tcp://127.0.0.1:5557"),
            ("zmq_endpoint", "tcp://*:5557"),
            ("zmq_endpoint", "bind:ipc:///tmp/x.sock"),
            ("zmq_replay_endpoint", "tcp://10.0.0.1:5558"),
        ] {
            let mut s = spec();
            match field {
                "kvbm" => s.kvbm = Some(v.into()),
                "metrics_url" => s.metrics_url = Some(v.into()),
                "zmq_endpoint" => s.zmq_endpoint = Some(v.into()),
                _ => s.zmq_replay_endpoint = Some(v.into()),
            }
            match r.check(&s) {
                Err(RegistrationError::Forbidden(m)) => assert!(m.starts_with(field), "{m}"),
                other => panic!("{field} = {v}: {other:?}"),
            }
        }
    }

    #[test]
    fn ranks_and_ports() {
        let r = reg(RegistrationConfig {
            allow_connect: vec!["10.0.0.0/24:5557-5558".into()],
            allow_bind: vec!["127.0.0.1:6000".into()],
            ..RegistrationConfig::default()
        });
        let mut s = spec();
        s.zmq_endpoint = Some("tcp://10.0.0.9:5557".into());
        s.dp_ranks = 2;
        assert!(r.check(&s).is_ok());
        s.dp_ranks = 3; // rank 2 on 5559
        assert!(r.check(&s).is_err());
        let mut s = spec();
        s.zmq_endpoint = Some("bind:tcp://127.0.0.1:6000".into());
        assert!(r.check(&s).is_ok());
        s.zmq_endpoint = Some("bind:tcp://0.0.0.0:6000".into());
        assert!(r.check(&s).is_err());
    }

    #[test]
    fn tokens_and_switch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret\n").expect("write");
        let r = reg(RegistrationConfig {
            token_file: Some(f.clone()),
            ..RegistrationConfig::default()
        });
        assert!(r.authorize(Some(b"Bearer s3cret")).is_ok());
        assert!(r.authorize(Some(b"bearer  s3cret ")).is_ok());
        for bad in [
            None,
            Some(&b"Bearer s3cre"[..]),
            Some(b"s3cret"),
            Some(b"Bearer "),
            Some(b"Basic s3cret"),
        ] {
            assert!(matches!(
                r.authorize(bad),
                Err(RegistrationError::Unauthenticated)
            ));
        }
        let off = reg(RegistrationConfig {
            enabled: false,
            ..RegistrationConfig::default()
        });
        assert!(matches!(
            off.authorize(None),
            Err(RegistrationError::Disabled)
        ));
        std::fs::write(&f, " \n").expect("write");
        assert!(Registration::from_config(&RegistrationConfig {
            token_file: Some(f),
            ..RegistrationConfig::default()
        })
        .is_err());
    }
}
