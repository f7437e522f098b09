//! TLS and bearer tokens for TCP listeners: the same certificate files and
//! token file serve a daemon's HTTP port (rustls, here) and its gRPC port
//! (tonic's own rustls acceptor, built from the same files).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A listener's certificate, key and, for mutual TLS, the CA its clients'
/// certificates must chain to (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// Clients must present a certificate signed by this CA; without it
    /// any client may connect (and needs a token to be let in).
    pub client_ca: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> io::Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display())))
}

fn invalid(what: &str, path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what} {}: {e}", path.display()),
    )
}

impl TlsFiles {
    /// The rustls configuration of an HTTP listener.
    pub fn server_config(&self) -> io::Result<Arc<rustls::ServerConfig>> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&self.cert, "certificate")?)
                .collect::<Result<_, _>>()
                .map_err(|e| invalid("certificate", &self.cert, e))?;
        if certs.is_empty() {
            return Err(invalid(
                "certificate",
                &self.cert,
                "no certificate in the file",
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key, "key")?)
            .map_err(|e| invalid("key", &self.key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(&read(ca, "client CA")?) {
                    roots
                        .add(c.map_err(|e| invalid("client CA", ca, e))?)
                        .map_err(|e| invalid("client CA", ca, e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| invalid("client CA", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder
            .with_single_cert(certs, key)
            .map_err(|e| invalid("key", &self.key, e))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// tonic's configuration of a gRPC listener, from the same files.
    pub fn tonic_config(&self) -> io::Result<tonic::transport::ServerTlsConfig> {
        // Parsed here too, so that a bad file is a start-up error with its
        // name rather than a failure at the first handshake.
        self.server_config()?;
        let identity = tonic::transport::Identity::from_pem(
            read(&self.cert, "certificate")?,
            read(&self.key, "key")?,
        );
        let mut cfg = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(read(
                ca,
                "client CA",
            )?));
        }
        Ok(cfg)
    }
}

/// A bearer token that requests must present (`Authorization: Bearer T`).
/// Kept as its SHA-256: comparing digests takes the same time whatever the
/// presented token's length or content.
#[derive(Clone)]
pub struct BearerToken([u8; 32]);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    /// Reads the token from `path` (surrounding whitespace ignored; an
    /// empty file is an error, never "no token").
    pub fn from_file(path: &Path) -> io::Result<BearerToken> {
        let text = String::from_utf8(read(path, "token file")?)
            .map_err(|e| invalid("token file", path, e))?;
        let t = text.trim();
        if t.is_empty() {
            return Err(invalid("token file", path, "empty"));
        }
        Ok(BearerToken(Sha256::digest(t.as_bytes()).into()))
    }

    /// Whether an `Authorization` header value carries this token (the
    /// scheme name is case-insensitive).
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(v) = authorization else {
            return false;
        };
        let Some(presented) = v
            .get(..7)
            .filter(|s| s.eq_ignore_ascii_case(b"bearer "))
            .map(|_| v[7..].trim_ascii())
        else {
            return false;
        };
        let got: [u8; 32] = Sha256::digest(presented).into();
        got.iter()
            .zip(&self.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("t");
        std::fs::write(&f, "  s3cret\n").expect("write");
        let t = BearerToken::from_file(&f).expect("token");
        assert!(t.accepts(Some(b"Bearer s3cret")));
        assert!(t.accepts(Some(b"bearer s3cret ")));
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer",
            b"Basic s3cret",
            b"s3cret",
            b"",
        ] {
            assert!(!t.accepts(Some(bad)), "{bad:?}");
        }
        assert!(!t.accepts(None));
        std::fs::write(&f, " \n").expect("write");
        assert!(BearerToken::from_file(&f).is_err());
    }
}
