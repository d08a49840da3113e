"""A loopback HTTP server for a folder, with Range support and injectable faults.

Faults are consumed one per GET of a path: ``("cut", n)`` sends the full
headers and then closes the connection after ``n`` body bytes; ``("status", code)``
answers ``code`` with no body; ``("trickle", ms)`` sends one byte every ``ms``
milliseconds; ``("pad", n)`` sends ``n`` bytes more than HEAD declared. Files carry an ETag (of their content) and Last-Modified, and a
Range request whose If-Range no longer matches gets the whole file (200), as
RFC 9110 says. Every request is recorded for the test to inspect.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from email.utils import formatdate
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    if_range: str | None = None
    status: int = 0
    body_bytes: int = 0
    accept_encoding: str | None = None


@dataclass
class MirrorState:
    root: Path
    faults: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    weak_etags: bool = False  # W/"..." ETags, as servers that compress on the fly send


def _handler(state: MirrorState):
    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def translate_path(self, path):
            return str(state.root / path.split("?", 1)[0].lstrip("/"))

        def do_HEAD(self):
            self._serve(head=True)

        def do_GET(self):
            self._serve(head=False)

        def _serve(self, head: bool):
            req = Request(self.command, self.path, self.headers.get("Range"), self.headers.get("If-Range"),
                          accept_encoding=self.headers.get("Accept-Encoding"))
            state.requests.append(req)
            fault = None
            if not head and state.faults.get(self.path):
                fault = state.faults[self.path].pop(0)
            if fault and fault[0] == "status":
                req.status = fault[1]
                self.send_response(fault[1])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            file = Path(self.translate_path(self.path))
            if not file.is_file():
                req.status = 404
                self.send_error(404)
                return
            data = file.read_bytes()
            etag = ("W/" if state.weak_etags else "") + f'"{hashlib.sha256(data).hexdigest()[:16]}"'
            last_modified = formatdate(file.stat().st_mtime, usegmt=True)
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", req.range or "")
            # RFC 9110 13.1.5: If-Range matches a strong ETag, or the Last-Modified date; a weak ETag never
            if match and req.if_range is not None and (req.if_range.startswith("W/") or
                                                       req.if_range not in (etag, last_modified)):
                match = None  # changed since the client's partial copy: the whole file
            if match:
                start = int(match.group(1))
                if start >= len(data):
                    req.status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                req.status = 206
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                req.status = 200
                self.send_response(200)
            body = data[start:]
            if fault and fault[0] == "pad":
                body += bytes(fault[1])
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", last_modified)
            self.end_headers()
            if head:
                return
            if fault and fault[0] == "trickle":
                for k in range(len(body)):
                    try:
                        self.wfile.write(body[k : k + 1])
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(fault[1] / 1000)
                return
            if fault and fault[0] == "cut":
                body = body[: fault[1]]
            self.wfile.write(body)
            req.body_bytes = len(body)
            if fault and fault[0] == "cut":
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler


class HttpMirror:
    def __init__(self, root: Path):
        self.state = MirrorState(Path(root))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[Request]:
        return self.state.requests

    def fault(self, path: str, *faults: tuple[str, int]) -> None:
        self.state.faults.setdefault(path, []).extend(faults)

    def __enter__(self) -> "HttpMirror":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
