"""Starts a kvbm daemon for a benchmark (no TCP ports) and
waits for its "kvbm listening" line. Shared by the scripts beside this one,
which import it as a sibling module."""

import os
import subprocess


def start_kvbm(
    binary: str, workdir: str, host_bytes: str, disk_bytes: str = "0"
) -> tuple[subprocess.Popen, str]:
    """Runs ``binary`` with its data, disk tier and socket under ``workdir``;
    returns the process and the socket path. Exits the script if it does not
    start."""
    socket = os.path.join(workdir, "kvbm.sock")
    proc = subprocess.Popen(
        [binary, "--data-dir", os.path.join(workdir, "data"), "--socket", socket,
         "--grpc", "", "--http", "", "--host-bytes", host_bytes, "--disk-bytes", disk_bytes],
        stdout=subprocess.PIPE,
    )
    line = proc.stdout.readline().decode()
    if "kvbm listening" not in line:
        proc.kill()
        raise SystemExit(f"kvbm did not start from {binary}: {line!r}")
    return proc, socket
