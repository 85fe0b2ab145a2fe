"""moto's S3 server on a free loopback port, from the .venv-s3 that scripts/s3-server.sh makes.

moto needs boto3, which cannot share a venv with the kubernetes client, so the server runs
as its own process from its own venv; kubeforge talks to it with its real S3 code (minio).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("KUBEFORGE_S3_VENV", ROOT / ".venv-s3")) / "bin" / "python"
MISSING = f"no S3-compatible server: {PYTHON} is absent (scripts/s3-server.sh installs moto there)"


def available() -> bool:
    return PYTHON.exists()


@contextmanager
def moto_server() -> Iterator[str]:
    """The endpoint URL of a fresh, empty S3 server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(PYTHON), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on port {port}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
