"""A manifest host on loopback, as object stores and web servers serve files: HEAD, ranged GET, Basic auth, and
redirects; an origin on 127.0.0.1 (plain and TLS) and a canary on 127.0.0.2 that counts every request it gets; and
FakeGCS, Cloud Storage's JSON API as far as gcsfs reads a file.
Shared by tests/test_remote_manifests.py and tests/test_secrets_cli.py."""

import base64
import json
import re
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER, PASSWORD = "alice", "pw-5ecret/#9"  # a password no URL parser keeps whole: '/' and '#'


@dataclass
class Site:
    files: dict[str, bytes] = field(default_factory=dict)  # path -> body
    hits: list[tuple] = field(default_factory=list)  # (method, path, Range, Authorization), in order
    largest_body: int = 0  # the most bytes one response sent
    redirect_to: str = ""  # base URL that /to/<path> and (GET only) /get-to/<path> answer 302 to


def _handler(site: Site) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002
            pass

        def do_HEAD(self):  # noqa: N802
            self._answer(body=False)

        def do_GET(self):  # noqa: N802
            self._answer(body=True)

        def _send(self, code: int, data: bytes, body: bool, **headers: str) -> None:
            self.send_response(code)
            for name, value in {"Content-Length": str(len(data)), "Accept-Ranges": "bytes", **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                site.largest_body = max(site.largest_body, len(data))
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # a client that only wanted the headers
                    pass

        def _answer(self, body: bool) -> None:
            site.hits.append((self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization")))
            path = self.path
            if path.startswith("/to/") or (path.startswith("/get-to/") and body):
                self._send(302, b"", body, Location=site.redirect_to + "/" + path.split("/", 2)[2])
                return
            path = path.replace("/get-to/", "/", 1)
            if path.startswith("/private/"):
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self._send(401, b"", body, **{"WWW-Authenticate": 'Basic realm="manifests"'})
                    return
            data = site.files.get(path)
            if data is None:
                self._send(404, b"", body)
                return
            if match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or ""):
                start = int(match[1])
                end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
                self._send(206, data[start:end + 1], body, **{"Content-Range": f"bytes {start}-{end}/{len(data)}"})
                return
            self._send(200, data, body, **{"Last-Modified": "Tue, 01 Dec 2026 10:00:00 GMT", "ETag": '"v1"'})

    return Handler


@contextmanager
def serving(site: Site, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """`site` served on `host` (TLS with `tls`) for the block; yields its base URL."""
    httpd = ThreadingHTTPServer((host, 0), _handler(site))
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, address: None  # a client that hung up (reads cut short): nothing to say
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://{host}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class FakeGCS(BaseHTTPRequestHandler):
    """The part of Cloud Storage's JSON API gcsfs reads a file through (object metadata, listing by prefix, ranged
    media download), for STORAGE_EMULATOR_HOST. `objects`: (bucket, name) -> bytes."""

    protocol_version = "HTTP/1.1"
    objects: dict[tuple[str, str], bytes] = {}

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _json(self, code: int, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _meta(self, bucket: str, name: str) -> dict:
        return {"kind": "storage#object", "bucket": bucket, "name": name, "generation": "1", "metageneration": "1",
                "size": str(len(self.objects[bucket, name])), "updated": "2026-12-01T10:00:00.000Z"}

    def do_GET(self):  # noqa: N802
        url = urlsplit(self.path)
        if match := re.fullmatch(r"/download/storage/v1/b/([^/]+)/o/(.+)", url.path):
            data = self.objects.get((match[1], unquote(match[2])))
            if data is None:
                return self._json(404, {"error": {"code": 404, "message": "No such object"}})
            start, end = 0, len(data) - 1
            if span := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or ""):
                start, end = int(span[1]), min(int(span[2]) if span[2] else end, end)
            self.send_response(206 if span else 200)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(end + 1 - start))
            self.end_headers()
            return self.wfile.write(data[start:end + 1])
        if match := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", url.path):
            if (match[1], unquote(match[2])) not in self.objects:
                return self._json(404, {"error": {"code": 404, "message": "No such object"}})
            return self._json(200, self._meta(match[1], unquote(match[2])))
        if match := re.fullmatch(r"/storage/v1/b/([^/]+)/o", url.path):
            prefix = parse_qs(url.query).get("prefix", [""])[0]
            return self._json(200, {"kind": "storage#objects", "items": [
                self._meta(b, n) for b, n in self.objects if b == match[1] and n.startswith(prefix)]})
        return self._json(404, {"error": {"code": 404, "message": "not found"}})
