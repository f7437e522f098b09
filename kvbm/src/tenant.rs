//! Tenants: groups of clients whose blocks nobody else can see.
//!
//! A tenant is named in the configuration with who belongs to it — Unix
//! users or groups on the local sockets, a bearer token on TCP — and how
//! much it may hold: its own host pool (a memfd of its own, so a client
//! mapping it sees no other tenant's blocks) and a disk quota. Every
//! namespace a tenant's client names is the tenant's: `llama` asked for by
//! tenant `a` is the namespace `a::llama`, so two tenants never share a
//! block, a key or even the knowledge that a prompt was cached. Clients
//! that belong to no tenant are the node's operator: they see every
//! namespace under its full name, as before tenants existed.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

use kvtier_net::BearerToken;
use serde::Deserialize;

use crate::config::Size;
use crate::error::{Error, Result};

/// Between a tenant's name and its namespace's name in the full name.
pub const SEPARATOR: &str = "::";

/// A tenant as the configuration file declares it (`[[tenants]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// `[A-Za-z0-9_-]`, 1 to 64 characters.
    pub name: String,
    /// Unix users whose processes belong to the tenant on the local sockets.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Unix groups (the process's primary group) likewise.
    #[serde(default)]
    pub gids: Vec<u32>,
    /// A file holding the bearer token the tenant's TCP clients present.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The tenant's own host pool.
    pub host_bytes: Size,
    /// Bytes of the tenant's blocks the disk tier may hold; absent: no
    /// limit beyond the tier's size.
    #[serde(default)]
    pub disk_bytes: Option<Size>,
}

/// A configured tenant.
#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    /// Its host pool: the pool's segment, 1 and up (0 is the shared pool).
    pub pool: u8,
    pub host_bytes: u64,
    /// 0: no limit.
    pub disk_bytes: u64,
    uids: Vec<u32>,
    gids: Vec<u32>,
    token: Option<BearerToken>,
}

/// Who is asking: the operator (a client of no tenant) or a tenant.
#[derive(Debug, Clone)]
pub enum Principal {
    Operator,
    Tenant(Arc<Tenant>),
}

impl Principal {
    /// The full name of the namespace this principal calls `name` (the
    /// operator's as it is: no copy on its lookups).
    pub fn namespace<'a>(&self, name: &'a str) -> Cow<'a, str> {
        match self {
            Principal::Operator => Cow::Borrowed(name),
            Principal::Tenant(t) => Cow::Owned(format!("{}{SEPARATOR}{name}", t.name)),
        }
    }

    /// The name this principal knows a namespace's full name by; `None`
    /// when it is not its namespace.
    pub fn sees<'a>(&self, full: &'a str) -> Option<&'a str> {
        match self {
            Principal::Operator => Some(full),
            Principal::Tenant(t) => full
                .strip_prefix(t.name.as_str())
                .and_then(|rest| rest.strip_prefix(SEPARATOR)),
        }
    }

    /// The host pool this principal's clients map.
    pub fn pool(&self) -> u8 {
        match self {
            Principal::Operator => 0,
            Principal::Tenant(t) => t.pool,
        }
    }

    pub fn is_operator(&self) -> bool {
        matches!(self, Principal::Operator)
    }
}

/// The configured tenants.
#[derive(Debug, Default)]
pub struct Tenants(Vec<Arc<Tenant>>);

impl Tenants {
    /// Checks the configured tenants; reads no files (see
    /// [`Tenants::load`]).
    pub fn validate(cfgs: &[TenantConfig]) -> Result<()> {
        if cfgs.len() > 255 {
            return Err(Error::invalid("at most 255 tenants"));
        }
        let mut names = std::collections::HashSet::new();
        let mut uids = std::collections::HashSet::new();
        let mut gids = std::collections::HashSet::new();
        for t in cfgs {
            let ok = (1..=64).contains(&t.name.len())
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(Error::invalid(format!(
                    "tenant name {:?}: 1 to 64 of A-Z a-z 0-9 _ -",
                    t.name
                )));
            }
            if !names.insert(t.name.as_str()) {
                return Err(Error::invalid(format!("tenant {:?} twice", t.name)));
            }
            if t.uids.is_empty() && t.gids.is_empty() && t.token_file.is_none() {
                return Err(Error::invalid(format!(
                    "tenant {:?} has no members: give uids, gids or token_file",
                    t.name
                )));
            }
            for u in &t.uids {
                if !uids.insert(*u) {
                    return Err(Error::invalid(format!("uid {u} in two tenants")));
                }
            }
            for g in &t.gids {
                if !gids.insert(*g) {
                    return Err(Error::invalid(format!("gid {g} in two tenants")));
                }
            }
            if t.host_bytes.0 < 1 << 20 {
                return Err(Error::invalid(format!(
                    "tenant {:?}: host_bytes must be at least 1MiB",
                    t.name
                )));
            }
        }
        Ok(())
    }

    /// The tenants of a validated configuration, their token files read.
    pub fn load(cfgs: &[TenantConfig]) -> Result<Tenants> {
        Tenants::validate(cfgs)?;
        let mut out = Vec::with_capacity(cfgs.len());
        for (i, t) in cfgs.iter().enumerate() {
            let token = match &t.token_file {
                Some(f) => Some(
                    BearerToken::from_file(f)
                        .map_err(|e| Error::io(format!("token of tenant {:?}", t.name), e))?,
                ),
                None => None,
            };
            out.push(Arc::new(Tenant {
                name: t.name.clone(),
                pool: (i + 1) as u8,
                host_bytes: t.host_bytes.0,
                disk_bytes: t.disk_bytes.map_or(0, |s| s.0),
                uids: t.uids.clone(),
                gids: t.gids.clone(),
                token,
            }));
        }
        Ok(Tenants(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.0.iter()
    }

    /// Whether any tenant has a token (then TCP callers must present one).
    pub fn have_tokens(&self) -> bool {
        self.0.iter().any(|t| t.token.is_some())
    }

    /// The principal of a local peer, by its user and primary group.
    pub fn of_peer(&self, uid: u32, gid: u32) -> Principal {
        self.0
            .iter()
            .find(|t| t.uids.contains(&uid))
            .or_else(|| self.0.iter().find(|t| t.gids.contains(&gid)))
            .map_or(Principal::Operator, |t| Principal::Tenant(t.clone()))
    }

    /// The tenant whose token an `Authorization` header carries.
    pub fn of_token(&self, authorization: Option<&[u8]>) -> Option<Principal> {
        self.0
            .iter()
            .find(|t| t.token.as_ref().is_some_and(|k| k.accepts(authorization)))
            .map(|t| Principal::Tenant(t.clone()))
    }

    /// The host pool a namespace's blocks live in, by its full name: its
    /// tenant's, or the shared pool (0).
    pub fn pool_of_namespace(&self, full: &str) -> u8 {
        full.split_once(SEPARATOR)
            .and_then(|(tenant, _)| self.0.iter().find(|t| t.name == tenant))
            .map_or(0, |t| t.pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, uid: u32) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            uids: vec![uid],
            gids: vec![],
            token_file: None,
            host_bytes: Size(1 << 20),
            disk_bytes: None,
        }
    }

    #[test]
    fn names_are_scoped_and_never_escape() {
        let tenants = Tenants::load(&[cfg("a", 1001), cfg("ab", 1002)]).unwrap();
        let a = tenants.of_peer(1001, 0);
        let ab = tenants.of_peer(1002, 0);
        assert!(tenants.of_peer(0, 0).is_operator());
        assert_eq!(a.namespace("llama"), "a::llama");
        assert_eq!(a.sees("a::llama"), Some("llama"));
        // Neither another tenant's namespace nor one that merely shares a
        // prefix of the tenant's name.
        assert_eq!(a.sees("ab::llama"), None);
        assert_eq!(ab.sees("a::llama"), None);
        assert_eq!(a.sees("llama"), None);
        // A tenant naming "b::x" stays inside its own scope.
        assert_eq!(a.namespace("ab::x"), "a::ab::x");
        assert_eq!(tenants.pool_of_namespace("a::ab::x"), 1);
        assert_eq!(tenants.pool_of_namespace("ab::x"), 2);
        assert_eq!(tenants.pool_of_namespace("llama"), 0);
        assert_eq!(tenants.pool_of_namespace("zz::llama"), 0);
    }

    #[test]
    fn bad_configurations_are_refused() {
        for bad in [
            vec![cfg("a b", 1)],
            vec![cfg("", 1)],
            vec![cfg("a", 1), cfg("a", 2)],
            vec![cfg("a", 1), cfg("b", 1)],
            vec![TenantConfig {
                uids: vec![],
                ..cfg("a", 1)
            }],
            vec![TenantConfig {
                host_bytes: Size(4096),
                ..cfg("a", 1)
            }],
        ] {
            assert!(Tenants::validate(&bad).is_err(), "{bad:?}");
        }
    }
}
