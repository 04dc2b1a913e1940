"""A real HTTP file server on 127.0.0.1 for download tests.

It serves the files of one folder, honours `Range: bytes=N-` (206 + Content-Range),
always sends Content-Length, logs every request as (path, Range header or None),
and can be told to misbehave: cut a response short, or answer with an error status.

    with ArchiveServer(folder) as server:
        server.drop_after(1000)          # next response: 1000 body bytes, then the socket closes
        server.fail(500, times=2)        # the two after that: HTTP 500
        fetch(server.url("a.zip"), ...)
        server.requests                  # [("/a.zip", None), ("/a.zip", "bytes=1000-"), ...]
"""

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:
        archive_server = self.server.owner
        range_header = self.headers.get("Range")
        fault = archive_server._record(self.path, range_header)
        if fault is not None and fault[0] == "status":
            return self._reply(fault[1], b"")
        path = archive_server.root / unquote(urlsplit(self.path).path).lstrip("/")
        if not path.is_file():
            return self._reply(404, b"not found\n")
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if not (match and archive_server.honour_ranges):
            return self._reply(200, data, drop=fault)
        start = int(match.group(1))
        if start >= len(data):
            return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        content_range = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._reply(206, data[start:], {"Content-Range": content_range}, drop=fault)

    def _reply(self, status: int, body: bytes, headers: dict | None = None, drop=None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if drop is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[: drop[1]])  # announce the whole body, send part, hang up
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format, *args) -> None:  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    owner: "ArchiveServer"


class ArchiveServer:
    """Serve `root` over HTTP on a free port of 127.0.0.1 while the `with` block runs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.requests: list[tuple[str, str | None]] = []
        self.honour_ranges = True  # False: answer every request 200 with the whole file
        self._faults: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)  # quick shutdown

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{name}"

    def drop_after(self, nbytes: int, times: int = 1) -> None:
        """The next `times` requests get only `nbytes` of their body, then the socket closes."""
        with self._lock:
            self._faults += [("drop", nbytes)] * times

    def fail(self, status: int, times: int = 1) -> None:
        """The next `times` requests are answered with `status` and an empty body."""
        with self._lock:
            self._faults += [("status", status)] * times

    def _record(self, path: str, range_header: str | None) -> tuple[str, int] | None:
        with self._lock:
            self.requests.append((path, range_header))
            return self._faults.pop(0) if self._faults else None

    def __enter__(self) -> "ArchiveServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
