"""Hostile inputs served from 127.0.0.1: acquire (img2dataset, really downloading) then filter count every one.

One manifest holds good images and every hostile case; none may crash or hang the stage, and each lands
under its own reason in the data-quality report.
"""

import gzip
import io
import json
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pea.corpus.acquire import acquire
from pea.corpus.fetch import fetch_image
from pea.corpus.filter import filter_pairs
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


@pytest.fixture(scope="module")
def server():
    Hostile.stop.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    Hostile.stop.set()
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


@pytest.fixture(scope="module")
def acquired(zh_spec: LanguageSpec, server: str, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostile")
    refused = f"http://127.0.0.1:{_refused_port()}/x.png"
    lines = ["url,caption_en,caption_zh"]
    for i, path in enumerate(EXPECTED):
        url = refused if path == "REFUSED" else path if "://" in path else server + path
        lines.append(f"{url},one red circle number {i},左边有一个红色的圆形{i}")
    # Captions: control characters (cleaned, kept), 10k characters (too long), invalid UTF-8 (unreadable row).
    lines[1] = f"{server}/ok/0.png,\"one\x01 red\x07 circle\",\"左边\x02有一个红色的圆形\""
    lines[2] = f"{server}/ok/1.png,one red circle,{'长' * 10_000}"
    data = ("\n".join(lines) + "\n").encode() + f"{server}/ok/2.png,bad ".encode() + b"\xff\xfe bytes," + "红色\n".encode()
    manifest = root / "hostile.csv.gz"
    manifest.write_bytes(gzip.compress(data))
    corpus = zh_spec.corpus.model_copy(update={
        "synthetic": None, "manifests": [ManifestSpec(path=str(manifest))], "timeout_s": TIMEOUT_S,
        "max_download_bytes": MAX_BYTES, "rows_per_shard": 100, "threads": 8})
    spec = zh_spec.model_copy(update={"corpus": corpus})
    start = time.perf_counter()
    result = acquire(spec, root / "lake")
    return spec, root / "lake", result, time.perf_counter() - start


def test_every_hostile_url_ends_within_the_timeout_and_is_counted(acquired) -> None:
    spec, lake, result, seconds = acquired
    assert seconds < 60  # img2dataset's own fetch would hang forever on /trickle.png
    assert result.manifest_rows == len(EXPECTED) + 1 and result.dropped_before_download["bad_url"] == 2
    assert result.dropped_before_download["manifest_unreadable"] == 1
    raw = pq.read_table(lake / "zh" / "raw" / "00000.parquet", columns=["url", "error_message"]).to_pylist()
    for name in ("/stall.png", "/trickle.png", "/slow-headers.png"):
        row = next(r for r in raw if r["url"].endswith(name))
        assert row["error_message"].startswith("timeout:"), (name, row["error_message"])
    # In img2dataset's worker processes too: the spec's allow-list reached them (the good rows were fetched from
    # 127.0.0.1) and nothing else non-public was contacted, directly or through a redirect.
    assert spec.corpus.allow_networks == list(ALLOWED) and result.successes == len(GOOD)
    for name in ("/to-private.png", "127.0.0.2:9/x.png"):
        row = next(r for r in raw if r["url"].endswith(name))
        assert row["error_message"].startswith("blocked_address: 127.0.0.2 is 127.0.0.2 (loopback)"), row


@pytest.mark.parametrize("path", ["/slow-headers.png", "/trickle.png", "/loop.png"])
def test_one_deadline_bounds_the_whole_download_headers_and_redirects_included(server: str, path: str) -> None:
    # Each byte of /slow-headers.png's status line and headers comes well within the timeout, so a timeout per
    # read (http.client's, img2dataset's) would wait for all 10 kB: about 30 minutes.
    import img2dataset.downloader  # noqa: F401 - fetch_image imports it; its import time is no download time

    start = time.monotonic()
    key, stream, error = fetch_image((7, server + path), TIMEOUT_S, max_bytes=MAX_BYTES, allow_networks=ALLOWED)
    seconds = time.monotonic() - start
    assert key == 7 and stream is None and seconds < TIMEOUT_S + 1
    assert error.startswith("redirect:" if path == "/loop.png" else "timeout:"), error


def test_fetch_still_downloads_a_good_image_through_the_deadline_reader(server: str) -> None:
    key, stream, error = fetch_image((1, server + "/ok/3.png"), TIMEOUT_S, max_bytes=MAX_BYTES, allow_networks=ALLOWED)
    assert error is None and stream.read() == GOOD["/ok/3.png"]


def test_filter_counts_each_hostile_input_under_its_reason(acquired) -> None:
    spec, lake, _, _ = acquired
    result = filter_pairs(spec, lake)
    expected: dict[str, int] = {}
    for path, reason in EXPECTED.items():
        if reason is not None:
            expected[reason] = expected.get(reason, 0) + 1
    expected["manifest_unreadable"] = 1
    expected["caption_too_long"] = 1  # /ok/1.png with 10k characters
    assert {k: v for k, v in result.dropped.items() if v} == expected
    assert result.rows_in == len(EXPECTED) + 1
    assert result.rows_out == len(GOOD) - 1
    pairs = pq.read_table(result.pairs_path).to_pylist()
    first = next(p for p in pairs if p["caption_en"].startswith("one red circle") and "number" not in p["caption_en"])
    assert first["caption_en"] == "one red circle" and first["caption"] == "左边有一个红色的圆形"  # controls gone
    report = json.loads(result.report_path.read_text())
    assert report["dropped"] == result.dropped
    messages = {e["reason"] for e in report["download_errors"]}
    assert {"download_timeout", "download_redirect", "download_too_large"} <= messages


def test_manifest_missing_a_column_is_refused_naming_it_and_the_columns_it_has(zh_spec, tmp_path) -> None:
    manifest = tmp_path / "zh.csv"
    manifest.write_text("url,caption_en\nhttp://127.0.0.1:9/x.png,x\n")
    corpus = zh_spec.corpus.model_copy(update={"manifests": [ManifestSpec(path=str(manifest))], "synthetic": None})
    with pytest.raises(ValueError, match=r"zh\.csv lacks column\(s\) caption_zh \(has url, caption_en\)"):
        acquire(zh_spec.model_copy(update={"corpus": corpus}), tmp_path / "lake")
