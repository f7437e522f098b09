"""Fixtures: a real kvbm daemon per test, and the engine harness.

The daemon binary is ``$KVTIER_BIN_DIR/kvbm`` or the workspace's
``target/debug/kvbm`` (``cargo build --workspace --bins``). Run the tests
under the Python that has ``vllm`` (``$KVTIER_PYTHON -m pytest
connectors/tests``) with the package installed (``pip install ./connectors``)
or with ``connectors/python`` on ``PYTHONPATH`` and the built extension next
to it.
"""

import os
import signal
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
    """One kvbm process on a Unix socket in a temporary directory."""

    def __init__(self, workdir: Path, host_bytes: str = "64MiB", disk_bytes: str = "0"):
        self.workdir = workdir
        self.socket = str(workdir / "kvbm.sock")
        self.host_bytes = host_bytes
        self.disk_bytes = disk_bytes
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "kvbm.log"

    def start(self) -> "Daemon":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
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
                ],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        line = self.proc.stdout.readline().decode()
        if "kvbm listening" not in line:
            self.proc.kill()
            pytest.fail(f"kvbm did not start: {line!r}; log: {self.log.read_text()[-2000:]}")
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
