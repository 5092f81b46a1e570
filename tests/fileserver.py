"""A threaded HTTP server on 127.0.0.1 for the download tests (the stage's and tools/get_pretrained.py's)."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving in-memory files, with Range/If-Range support and faults a test
    can arm: `cut_once` (send half the body, then close), `fail_once` (answer an HTTP error code once),
    `ignore_range` (always answer 200 with the whole file) and `redirects` ({path: Location}, answered with 302)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.last_modified = "Mon, 01 Jan 2024 00:00:00 GMT"
        self.requests: list[dict[str, Any]] = []
        self.cut_once = False
        self.fail_once: int | None = None
        self.fail_always: int | None = None
        self.ignore_range = False
        self.redirects: dict[str, str] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                        "if_range": self.headers.get("If-Range")})
                if server.fail_always or server.fail_once:
                    code = server.fail_always or server.fail_once
                    server.fail_once = None
                    self.send_error(code)
                    return
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if_range = self.headers.get("If-Range")
                if match and not server.ignore_range and (if_range is None or if_range == server.last_modified):
                    start, status = int(match.group(1)), 206
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Last-Modified", server.last_modified)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.cut_once:
                    server.cut_once = False
                    self.wfile.write(body[:len(body) // 2])
                    return  # HTTP/1.0: returning closes the connection, short of Content-Length
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
