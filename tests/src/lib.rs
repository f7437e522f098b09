//! Helpers shared by the end-to-end tests: locating the workspace's binaries
//! and the Python interpreter that has the real `vllm` package.

use std::path::PathBuf;

/// Path of a workspace binary (`kvbm`, `kvtier`, `kvrouter`) built next to
/// this test executable. The test command builds them first
/// (`cargo build --workspace --bins`); a missing one is a clear failure.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// The Python interpreter with `vllm==0.32.0` installed (`KVTIER_PYTHON`, set
/// by `scripts/test-all`). `None` outside that script on a developer machine;
/// under CI (`CI` set) its absence is a failure, never a silent skip.
pub fn python_with_vllm() -> Option<PathBuf> {
    match std::env::var_os("KVTIER_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("CI").is_some() => {
            panic!("KVTIER_PYTHON is not set under CI: run the tests through scripts/test-all")
        }
        None => {
            eprintln!("skipping: KVTIER_PYTHON is not set (scripts/test-all sets it)");
            None
        }
    }
}

/// Test certificates in `dir` (PEM): `ours-ca.pem` and `theirs-ca.pem`, and
/// leaves `server`, `client` (signed by ours) and `rogue` (by theirs) as
/// `NAME.pem` + `NAME.key`, valid for 127.0.0.1 and localhost.
pub fn certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let write = |name: &str, pem: String| std::fs::write(dir.join(name), pem).expect("write");
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let key = KeyPair::generate().expect("key");
        write(
            &format!("{name}-ca.pem"),
            p.self_signed(&key).expect("self-signed").pem(),
        );
        Issuer::new(p, key)
    };
    let (ours, theirs) = (ca("ours"), ca("theirs"));
    let leaf = |name: &str, issuer: &Issuer<'_, KeyPair>| {
        let p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("params");
        let key = KeyPair::generate().expect("key");
        write(
            &format!("{name}.pem"),
            p.signed_by(&key, issuer).expect("sign").pem(),
        );
        write(&format!("{name}.key"), key.serialize_pem());
    };
    leaf("server", &ours);
    leaf("client", &ours);
    leaf("rogue", &theirs);
}

/// The bearer token of [`Kvbm::start_secured`].
pub const KVBM_TOKEN: &str = "kvbm-t0ken";

/// Puts a chain of `blocks` 4 KiB blocks of model `model` (namespace
/// `{model}-ns`, `tokens_per_block` tokens each, token ids 0, 1, ...) into
/// the daemon behind `c`; returns the chain's token ids.
pub async fn put_chain(
    c: &kvtier_client::Client,
    model: &str,
    tokens_per_block: u32,
    blocks: u32,
) -> Vec<u32> {
    use kvtier_client::v1;
    let tokens: Vec<u32> = (0..blocks * tokens_per_block).collect();
    c.rpc()
        .register_namespace(v1::RegisterNamespaceRequest {
            name: format!("{model}-ns"),
            block_bytes: 4096,
            layout: Some(v1::Layout {
                model: model.into(),
                tokens_per_block,
                ..Default::default()
            }),
        })
        .await
        .expect("register namespace");
    let key = |j: u32| format!("block-{j}").into_bytes();
    for (i, t) in tokens.chunks(tokens_per_block as usize).enumerate() {
        let i = i as u32;
        c.rpc()
            .put(v1::PutRequest {
                namespace: format!("{model}-ns"),
                block: Some(v1::BlockMeta {
                    key: key(i),
                    parent: if i == 0 { vec![] } else { key(i - 1) },
                    token_ids: t.to_vec(),
                }),
                data: vec![i as u8; 4096],
            })
            .await
            .expect("put");
    }
    tokens
}

/// A two-thread runtime for a test's client calls.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A kvbm daemon process started for a test. Killed (SIGKILL) on drop unless
/// stopped first.
pub struct Kvbm {
    pub child: std::process::Child,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub grpc: String,
    pub http: String,
}

impl Kvbm {
    /// Starts `kvbm --data-dir DIR` with `args` (e.g. `--host-bytes 8MiB`),
    /// on free ports, and waits for its "kvbm listening" line.
    pub fn start(data_dir: &std::path::Path, args: &[&str]) -> anyhow::Result<Kvbm> {
        Kvbm::start_env(data_dir, args, &[])
    }

    /// [`Kvbm::start`] with more environment (e.g. [`Garage::env`]).
    pub fn start_env(
        data_dir: &std::path::Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<Kvbm> {
        use std::io::BufRead;
        let socket = data_dir.join("kvbm.sock");
        let mut child = std::process::Command::new(bin("kvbm"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("KVBM_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the daemon never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait()?;
                anyhow::bail!("kvbm did not start ({status})");
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
                .unwrap_or_default()
        };
        Ok(Kvbm {
            grpc: format!("http://{}", field("grpc")),
            http: field("http"),
            child,
            data_dir: data_dir.to_path_buf(),
            socket,
        })
    }

    /// Starts kvbm as [`Kvbm::start`] with TLS on its TCP ports, clients
    /// needing a certificate of `ours-ca.pem` and the token [`KVBM_TOKEN`]
    /// (file `token`); the [`certificates`] are made in `pki`.
    pub fn start_secured(
        data_dir: &std::path::Path,
        pki: &std::path::Path,
        args: &[&str],
    ) -> anyhow::Result<Kvbm> {
        std::fs::create_dir_all(pki)?;
        certificates(pki);
        std::fs::write(pki.join("token"), format!("{KVBM_TOKEN}\n"))?;
        let f = |n: &str| pki.join(n).display().to_string();
        let (cert, key, ca, token) = (
            f("server.pem"),
            f("server.key"),
            f("ours-ca.pem"),
            f("token"),
        );
        let mut all = vec![
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            "--auth-token-file",
            &token,
        ];
        all.extend_from_slice(args);
        Kvbm::start(data_dir, &all)
    }

    pub fn socket_str(&self) -> String {
        self.socket.display().to_string()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc_kill(self.child.id() as i32, 15);
        }
        Ok(self.child.wait()?)
    }

    /// GET a path on the HTTP port; returns the body.
    pub fn http_get(&self, path: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.http)?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or(out))
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Kvbm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A single-node Garage (the S3-compatible server the G4 tests run against)
/// in a temporary directory, on free ports, with bucket `kvtier` and a
/// static key. Killed on drop.
pub struct Garage {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

/// The test key Garage is given (a key id is "GK" and 24 hex digits).
pub const GARAGE_KEY_ID: &str = "GK0123456789abcdef01234567";
pub const GARAGE_SECRET: &str = "5555555555555555555555555555555555555555555555555555555555555555";

impl Garage {
    /// Starts a node. `None` when no `garage` is on PATH outside CI (a
    /// developer machine; `scripts/test-all` installs it); under CI its
    /// absence is a failure.
    pub fn start() -> Option<Garage> {
        let found = std::process::Command::new("garage")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(
                std::env::var_os("CI").is_none(),
                "garage is not on PATH under CI: run the tests through scripts/test-all"
            );
            eprintln!("skipping: no garage on PATH (scripts/test-all installs it)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let port = |()| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port")
        };
        let (s3, rpc) = (port(()), port(()));
        let d = dir.path().display();
        let conf = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"lmdb\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n",
            "7".repeat(64)
        );
        std::fs::write(dir.path().join("garage.toml"), conf).expect("write garage.toml");
        let mut g = Garage {
            child: None,
            dir,
            endpoint: format!("http://127.0.0.1:{s3}"),
        };
        g.restart();
        let node = g.cli(&["node", "id", "-q"]);
        let node = node.trim().get(..64).expect("node id").to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "kvtier",
            GARAGE_KEY_ID,
            GARAGE_SECRET,
        ]);
        g.cli(&["bucket", "create", "kvtier"]);
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", "kvtier", "--key", "kvtier",
        ]);
        Some(g)
    }

    /// `garage -c <this node's config>`.
    fn command(&self) -> std::process::Command {
        let mut c = std::process::Command::new("garage");
        c.arg("-c").arg(self.dir.path().join("garage.toml"));
        c
    }

    /// Runs a `garage` command against this node; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("run garage");
        assert!(
            out.status.success(),
            "garage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `AWS_*` environment a client needs to reach this node.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "garage".into()),
            ("AWS_ACCESS_KEY_ID", GARAGE_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", GARAGE_SECRET.into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// A client of the bucket `kvtier` under `prefix`, the tests' own (to
    /// put, look at or damage objects), with deadlines generous for a
    /// debug build of Garage on a loaded 2-core CI machine (the daemon's
    /// defaults are 2 s and 50 MB/s).
    pub fn bucket(&self, prefix: &str) -> kvbm::remote::bucket::Bucket {
        let mut c = kvbm::config::RemoteConfig::new(format!("s3://kvtier/{prefix}"));
        c.endpoint = Some(self.endpoint.clone());
        c.region = Some("garage".into());
        c.access_key_id = Some(GARAGE_KEY_ID.into());
        c.secret_access_key = Some(GARAGE_SECRET.into());
        c.allow_http = Some(true);
        c.timeout = std::time::Duration::from_secs(3);
        c.min_bytes_per_s = 5 << 20;
        kvbm::remote::bucket::Bucket::open(c).expect("bucket client")
    }

    /// SIGKILL: the server disappears.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data and ports; returns once it
    /// answers.
    pub fn restart(&mut self) {
        self.kill9();
        let log = std::fs::File::create(self.dir.path().join("garage.log")).expect("log");
        let child = self
            .command()
            .arg("server")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn garage");
        self.child = Some(child);
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        for _ in 0..300 {
            let up = self
                .command()
                .arg("status")
                .output()
                .is_ok_and(|o| o.status.success());
            if up && std::net::TcpStream::connect(&addr).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("garage did not start: {}", self.dir.path().display());
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill9();
    }
}
