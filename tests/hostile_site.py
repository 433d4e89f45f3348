"""The hostile site: good images and every hostile case a download can meet, served from 127.0.0.1, and a
manifest that points at all of them. Shared by tests/test_acquire_hostile.py and tests/test_engine.py (the
same site through Ray); conftest.py's `hostile_server` fixture serves it per module.
"""

import gzip
import io
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

from pea.corpus.synthetic import all_scenes, render
from pea.spec import LanguageSpec, ManifestSpec

TIMEOUT_S = 2
MAX_BYTES = 200_000


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb() -> bytes:
    """A 200-byte PNG that declares a 50000 x 50000 grey canvas."""
    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 50_001))
            + _chunk(b"IEND", b""))


GOOD = {f"/ok/{i}.png": _png(render(scene, 64, seed=i)) for i, scene in enumerate(all_scenes()[:8])}


class Hostile(BaseHTTPRequestHandler):
    stop = threading.Event()

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _head(self, code: int, ctype: str = "image/png", length: int | None = None, **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path
        try:
            if path in GOOD:
                self._head(200, length=len(GOOD[path]))
                self.wfile.write(GOOD[path])
            elif path == "/500.png":
                self.send_error(500)
            elif path == "/stall.png":  # headers, a little of the body, then nothing
                self._head(200, length=10_000)
                self.wfile.write(GOOD["/ok/0.png"][:100])
                self.wfile.flush()
                self.stop.wait(60)
            elif path == "/trickle.png":  # a byte every 0.2 s, forever: each read is quick, the download never ends
                self._head(200)
                while not self.stop.wait(0.2):
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
            elif path == "/slow-headers.png":  # the status line and headers a byte every 0.2 s, never finished
                for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n" + b"X-Pad: " + b"a" * 10_000:
                    if self.stop.wait(0.2):
                        break
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                self.close_connection = True
            elif path == "/bomb.png":
                data = _bomb()
                self._head(200, length=len(data))
                self.wfile.write(data)
            elif path == "/huge.png":
                self._head(200, length=10 * MAX_BYTES)
                self.wfile.write(b"\x00" * 1000)
            elif path == "/corrupt.png":
                data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
                self._head(200, length=len(data))
                self.wfile.write(data)
            elif path == "/truncated.png":
                data = GOOD["/ok/1.png"][: len(GOOD["/ok/1.png"]) // 3]
                self._head(200, length=len(data))
                self.wfile.write(data)
            elif path == "/page.png":
                data = b"<html><body>not an image</body></html>"
                self._head(200, ctype="text/html; charset=utf-8", length=len(data))
                self.wfile.write(data)
            elif path == "/loop.png":
                self._head(302, length=0, Location="/loop.png")
            elif path == "/to-file.png":
                self._head(302, length=0, Location="file:///etc/passwd")
            elif path == "/to-private.png":  # 127.0.0.2 is loopback but not the allowed 127.0.0.1/32: never contacted
                self._head(302, length=0, Location="http://127.0.0.2:9/metadata.png")
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass


@contextmanager
def serving() -> Iterator[str]:
    """The hostile site on 127.0.0.1 for the duration of the block; yields its base URL."""
    Hostile.stop.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        Hostile.stop.set()  # releases the stalled and trickling handlers
        httpd.shutdown()
        httpd.server_close()


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


EXPECTED = {  # path -> reason (None: kept)
    **{path: None for path in GOOD},
    "/404.png": "download_http_error", "/500.png": "download_http_error", "REFUSED": "download_connection",
    "/stall.png": "download_timeout", "/trickle.png": "download_timeout", "/slow-headers.png": "download_timeout",
    "/bomb.png": "download_too_large",
    "/huge.png": "download_too_large", "/corrupt.png": "download_not_image", "/truncated.png": "download_not_image",
    "/page.png": "download_not_image", "/loop.png": "download_redirect", "/to-file.png": "download_redirect",
    "ftp://127.0.0.1/x.png": "bad_url", "file:///etc/passwd": "bad_url",
    "/to-private.png": "download_blocked_address", "http://127.0.0.2:9/x.png": "download_blocked_address",
}
ALLOWED = ("127.0.0.1/32",)  # what the embedded profile's corpus.allow_networks says



def hostile_spec(base: LanguageSpec, server: str, root: Path, **corpus: Any) -> LanguageSpec:
    """`base` reading one gzipped CSV manifest of every EXPECTED path on `server` (written under `root`), with the
    hostile test's deadline and size cap; `corpus` overrides further corpus fields."""
    refused = f"http://127.0.0.1:{_refused_port()}/x.png"
    lines = ["url,caption_en,caption_zh"]
    for i, path in enumerate(EXPECTED):
        url = refused if path == "REFUSED" else path if "://" in path else server + path
        lines.append(f"{url},one red circle number {i},左边有一个红色的圆形{i}")
    # Captions: control characters (cleaned, kept), 10k characters (too long), invalid UTF-8 (unreadable row).
    lines[1] = f"{server}/ok/0.png,\"one\x01 red\x07 circle\",\"左边\x02有一个红色的圆形\""
    lines[2] = f"{server}/ok/1.png,one red circle,{'长' * 10_000}"
    data = ("\n".join(lines) + "\n").encode() + f"{server}/ok/2.png,bad ".encode() + b"\xff\xfe bytes," + "红色\n".encode()
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "hostile.csv.gz"
    manifest.write_bytes(gzip.compress(data))
    fields = {"synthetic": None, "manifests": [ManifestSpec(path=str(manifest))], "timeout_s": TIMEOUT_S,
              "max_download_bytes": MAX_BYTES, "rows_per_shard": 100, "threads": 8,
              "allow_networks": list(ALLOWED), **corpus}
    return base.model_copy(update={"corpus": base.corpus.model_copy(update=fields)})
