"""A local stand-in for the Hugging Face Hub: serves one folder as a model repository.

It answers what ``huggingface_hub.snapshot_download`` asks for: the revision's metadata
(``/api/models/{repo}/revision/{rev}``), its file tree (``/api/models/{repo}/tree/{sha}``) and each file
(``/{repo}/resolve/{sha}/{path}``, HEAD and GET, with the commit and ETag headers the
client checks). Every request is recorded with its Authorization header.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@contextmanager
def serve_repo(repo: str, folder: Path) -> Iterator[tuple[str, list[str]]]:
    """(endpoint URL, requests seen) while the fake Hub serves ``folder`` as ``repo``."""
    seen: list[str] = []
    files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, body: bool) -> None:
            seen.append(f"{self.command} {self.path} auth={self.headers.get('Authorization')}")
            path = self.path.split("?")[0]
            if path.startswith(f"/api/models/{repo}/revision/"):
                payload = json.dumps(
                    {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
                ).encode()
                return self._send(200, payload, "application/json", body)
            if path.startswith(f"/api/models/{repo}/tree/"):
                tree = [
                    {
                        "type": "file",
                        "path": name,
                        "size": p.stat().st_size,
                        "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                    }
                    for name, p in files.items()
                ]
                return self._send(200, json.dumps(tree).encode(), "application/json", body)
            for prefix in (f"/{repo}/resolve/{COMMIT}/", f"/{repo}/resolve/main/"):
                if path.startswith(prefix) and path[len(prefix) :] in files:
                    data = files[path[len(prefix) :]].read_bytes()
                    return self._send(
                        200, data, "application/octet-stream", body, etag=hashlib.sha256(data).hexdigest()
                    )
            return self._send(404, b'{"error": "Repository not found"}', "application/json", body)

        def _send(self, code: int, data: bytes, kind: str, body: bool, etag: str | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Repo-Commit", COMMIT)
            if etag:
                self.send_header("ETag", f'"{etag}"')
            if code == 404:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
