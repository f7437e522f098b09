"""Fixtures: a real kvbm daemon per test, and the engine harness.

The daemon binary is ``$KVTIER_BIN_DIR/kvbm`` or the workspace's
``target/debug/kvbm`` (``cargo build --workspace --bins``). Run the tests
under the Python that has ``vllm`` (``$KVTIER_PYTHON -m pytest
connectors/tests``) with the package installed (``pip install ./connectors``)
or with ``connectors/python`` on ``PYTHONPATH`` and the built extension next
to it.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def kvbm_binary() -> Path:
    bin_dir = os.environ.get("KVTIER_BIN_DIR")
    path = Path(bin_dir) / "kvbm" if bin_dir else ROOT / "target" / "debug" / "kvbm"
    if not path.exists():
        pytest.fail(f"kvbm binary not found at {path}: run cargo build --workspace --bins")
    return path


class Daemon:
    """One kvbm process on a Unix socket in a temporary directory; with
    `remote`, on that Garage's bucket too (G4), every block offered to it at
    its first commit."""

    def __init__(
        self,
        workdir: Path,
        host_bytes: str = "64MiB",
        disk_bytes: str = "0",
        remote: "Garage | None" = None,
    ):
        self.workdir = workdir
        self.socket = str(workdir / "kvbm.sock")
        self.host_bytes = host_bytes
        self.disk_bytes = disk_bytes
        self.remote = remote
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "kvbm.log"
        # host:port of the gRPC TCP listener, once started.
        self.grpc = ""

    def start(self) -> "Daemon":
        args = [
            str(kvbm_binary()),
            "--data-dir",
            str(self.workdir / "data"),
            "--socket",
            self.socket,
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--host-bytes",
            self.host_bytes,
            "--disk-bytes",
            self.disk_bytes,
        ]
        env = None
        if self.remote is not None:
            conf = self.workdir / "kvbm.toml"
            conf.write_text(self.remote.kvbm_toml())
            args += ["--config", str(conf)]
            env = {**os.environ, **self.remote.env()}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=env)
        deadline = time.monotonic() + 30
        line = self.proc.stdout.readline().decode()
        if "kvbm listening" not in line:
            self.proc.kill()
            pytest.fail(f"kvbm did not start: {line!r}; log: {self.log.read_text()[-2000:]}")
        self.grpc = line.split(" grpc=", 1)[1].split()[0]
        while not os.path.exists(self.socket + ".pool") and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """SIGKILL: the daemon dies without any goodbye."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None
        for p in (self.socket, self.socket + ".pool"):
            if os.path.exists(p):
                os.unlink(p)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path).start()
    yield d
    d.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Garage:
    """A single-node Garage (the S3-compatible server of the G4 tests) in
    `workdir`, on free ports, with bucket `kvtier` and a static key: the
    Python twin of `Garage` in tests/src/lib.rs."""

    KEY_ID = "GK0123456789abcdef01234567"
    SECRET = "5" * 64

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.s3 = _free_port()
        rpc = _free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "garage.toml"
        self.conf.write_text(
            f'metadata_dir = "{workdir}/meta"\ndata_dir = "{workdir}/data"\n'
            'db_engine = "lmdb"\nreplication_factor = 1\n'
            f'rpc_bind_addr = "127.0.0.1:{rpc}"\nrpc_public_addr = "127.0.0.1:{rpc}"\n'
            f'rpc_secret = "{"7" * 64}"\n'
            f'[s3_api]\ns3_region = "garage"\napi_bind_addr = "127.0.0.1:{self.s3}"\n'
        )
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["garage", "-c", str(self.conf), *args], capture_output=True, text=True
        )
        if out.returncode != 0:
            pytest.fail(f"garage {args}: {out.stderr}")
        return out.stdout

    def start(self) -> "Garage":
        with open(self.workdir / "garage.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["garage", "-c", str(self.conf), "server"], stdout=log, stderr=log
            )
        for _ in range(300):
            up = subprocess.run(
                ["garage", "-c", str(self.conf), "status"], capture_output=True
            ).returncode == 0
            if up:
                try:
                    socket.create_connection(("127.0.0.1", self.s3), timeout=1).close()
                    break
                except OSError:
                    pass
            time.sleep(0.1)
        else:
            self.stop()
            pytest.fail(f"garage did not start: {self.workdir}")
        node = self.cli("node", "id", "-q").strip()[:64]
        self.cli("layout", "assign", "-z", "dc1", "-c", "1G", node)
        self.cli("layout", "apply", "--version", "1")
        self.cli("key", "import", "--yes", "-n", "kvtier", self.KEY_ID, self.SECRET)
        self.cli("bucket", "create", "kvtier")
        self.cli("bucket", "allow", "--read", "--write", "--owner", "kvtier", "--key", "kvtier")
        return self

    def env(self) -> dict[str, str]:
        """The `AWS_*` environment kvbm reaches it with."""
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3}",
            "AWS_REGION": "garage",
            "AWS_ACCESS_KEY_ID": self.KEY_ID,
            "AWS_SECRET_ACCESS_KEY": self.SECRET,
            "AWS_ALLOW_HTTP": "true",
        }

    def kvbm_toml(self) -> str:
        """kvbm's G4 settings: short linger and poll keep tests quick,
        deadlines are generous for a loaded machine."""
        return (
            'remote_url = "s3://kvtier/connector"\nremote_admit = 1\n'
            "remote_linger_ms = 100\nremote_poll_ms = 250\nremote_timeout_ms = 3000\n"
            'remote_min_bytes_per_s = "5MiB"\nremote_segment_bytes = "1MiB"\n'
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def garage(tmp_path):
    """A Garage server for the test; skipped where there is none (a
    developer machine: scripts/test-all installs it), a failure under CI."""
    if shutil.which("garage") is None:
        if os.environ.get("CI"):
            pytest.fail("garage is not on PATH under CI: run the tests through scripts/test-all")
        pytest.skip("no garage on PATH (scripts/test-all installs it)")
    g = Garage(tmp_path / "garage").start()
    yield g
    g.stop()
