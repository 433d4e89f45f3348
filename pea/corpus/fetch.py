"""img2dataset with a hardened fetch: one deadline per download, a body-size cap, http(s) only, typed errors.

img2dataset's own fetch bounds each socket read by `timeout` but not the download: a server that
trickles its status line, headers or body a byte at a time holds the whole run forever. It also follows
redirects to `ftp://` and opens `file://` URLs. `download(spec, url_list, raw_dir, extra_columns)` runs
`img2dataset.download` with a `Downloader` subclass whose shards fetch with `fetch_image` instead: one
deadline of `corpus.timeout_s` bounds the whole download, redirects included (the connection's connect gets
the time left; every read of the status line, the headers and the body goes through `_DeadlineReader`,
which gives the socket only the time left and fails once none is; a TLS handshake is bounded per read by
the time left at connect), bodies over
`corpus.max_download_bytes` and non-image content types are refused unread, redirects may only lead to
http/https, every connection (redirects included) goes only to a resolved address pea.io.addresses allows
(public, or in `corpus.allow_networks`; checked on the address actually connected to, before anything is sent;
no proxy from the environment, whose address would hide the target's), and every error message starts with its
class (`http_error:`, `timeout:`, `connection:`, `redirect:`, `not_image:`, `too_large:`, `bad_url:`,
`blocked_address:`) so the filter counts drops per class.

The subclass is pickled by reference to this module, so the hardened fetch runs in img2dataset's
spawned workers, and on pyspark/ray workers too (where pea must be installed).
"""

from __future__ import annotations

import functools
import http.client
import io
import os
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pea.io.addresses import Network, networks, refusal
from pea.io.redact import redact
from pea.spec import URL_SCHEMES, LanguageSpec

# img2dataset imports wandb and albumentations, which reach for the network unless told not to.
OFFLINE_ENV = {"WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
USER_AGENT = "Mozilla/5.0 (compatible; pea-img2dataset; +https://github.com/rom1504/img2dataset)"
NOT_IMAGE_TYPES = ("text/", "audio/", "video/", "font/", "multipart/", "application/json", "application/xml",
                   "application/javascript", "application/pdf", "application/zip", "application/xhtml")


def _has_userinfo(url: str) -> bool:
    """`user[:pass]@` before the host: urllib would take 'user:pass@host' for the host (a DNS lookup of the
    credentials, or a 'port' of 'pass@host'), so such a URL is refused, never sent."""
    return "@" in urlsplit(url).netloc


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        if urlsplit(newurl).scheme.lower() not in URL_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl[:80]!r}", headers, fp)
        if _has_userinfo(newurl):
            raise urllib.error.HTTPError(newurl, code, "redirect to a URL with user-info (credentials before '@'), "
                                         "which the fetch never sends", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class FetchError(Exception):
    """A download that failed in a known way; str() starts with its class."""


def _time_left(deadline: float, timeout: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"the download took longer than {timeout} s")
    return remaining


class _DeadlineReader(io.RawIOBase):
    """The socket's reader for a response (status line, headers, body): each read may use only the time left."""

    def __init__(self, sock: socket.socket, deadline: float, timeout: float) -> None:
        super().__init__()
        self._sock, self._raw, self._deadline, self._timeout = sock, sock.makefile("rb", buffering=0), deadline, timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(_time_left(self._deadline, self._timeout))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, deadline: float, timeout: float, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # http.client's own reader, unused: reads go through the deadline
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline, timeout))


class _DeadlineConnection:
    """Mixed into http.client's connections: connect within the time left, only to an allowed address, and
    respond through _DeadlineResponse."""

    def __init__(self, *args: Any, deadline: float, limit: float, allowed: tuple[Network, ...] = (),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline, self._limit, self._allowed = deadline, limit, allowed
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline, timeout=limit)
        self._create_connection = self._connect_allowed  # http.client's connect() (and TLS after it) goes here

    def _connect_allowed(self, address: tuple[str, int], timeout: float, source_address: Any = None) -> socket.socket:
        """socket.create_connection, but resolving once and connecting only to addresses that pass the check: the
        socket's peer is the address checked, the Host header and TLS name stay the URL's."""
        host, port = address
        refused, error = [], None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            if (why := refusal(sockaddr[0], self._allowed)) is not None:
                refused.append(f"{sockaddr[0]} ({why})")
                continue
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as err:
                sock.close()
                error = err
        if error is not None:
            raise error
        raise FetchError(f"blocked_address: {host} is {', '.join(refused)}; the fetch connects only to public "
                         "addresses unless the spec's corpus.allow_networks lists the network")

    def connect(self) -> None:
        self.timeout = _time_left(self._deadline, self._limit)  # also what a TLS handshake's reads get
        super().connect()


class _DeadlineHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: float, limit: float, allowed: tuple[Network, ...]) -> None:
        super().__init__()
        self._connection = functools.partial(_DeadlineHTTPConnection, deadline=deadline, limit=limit, allowed=allowed)

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self._connection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: float, limit: float, allowed: tuple[Network, ...]) -> None:
        super().__init__()
        self._connection = functools.partial(_DeadlineHTTPSConnection, deadline=deadline, limit=limit,
                                             allowed=allowed)

    def https_open(self, req: urllib.request.Request) -> Any:
        extra = {"check_hostname": self._check_hostname} if hasattr(self, "_check_hostname") else {}  # Python 3.11
        return self.do_open(self._connection, req, context=self._context, **extra)


def _opener(deadline: float, limit: float, allowed: tuple[Network, ...]) -> urllib.request.OpenerDirector:
    """An opener for one download: every connection and read it makes, redirects included, ends by `deadline`
    and goes only to an allowed address. No proxies: the check must see the target's address, not a proxy's."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _HttpOnlyRedirects,
                                       _DeadlineHTTPHandler(deadline, limit, allowed),
                                       _DeadlineHTTPSHandler(deadline, limit, allowed))


def _classify(err: BaseException) -> str:
    if isinstance(err, FetchError):
        return str(err)
    if isinstance(err, urllib.error.HTTPError):
        kind = "redirect" if 300 <= err.code < 400 or "redirect" in str(err.reason).lower() else "http_error"
        return f"{kind}: HTTP {err.code} {err.reason}"[:300]
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason):
        return f"timeout: {reason}"[:300]
    if isinstance(reason, (ConnectionError, socket.gaierror, ssl.SSLError, OSError)):
        return f"connection: {type(reason).__name__}: {reason}"[:300]
    return f"other: {type(err).__name__}: {err}"[:300]


def _check_canvas(stream: io.BytesIO, max_area: float) -> None:
    """Refuse a decompression bomb from its header (a small file declaring a huge canvas), before any decoding."""
    from PIL import Image

    stream.seek(0)
    try:
        with Image.open(stream) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise FetchError(f"too_large: {err}") from None
    except Exception:  # noqa: BLE001 - not an image PIL knows: img2dataset's decoder will say so
        return
    if width * height > max_area:
        raise FetchError(f"too_large: the image declares {width}x{height} pixels, more than max_image_area {max_area:.0f}")


def fetch_image(row: tuple[int, str], timeout: float, user_agent_token: str | None = None,
                disallowed_header_directives: Any = None, *, max_bytes: int, max_area: float = float("inf"),
                allow_networks: tuple[str, ...] = ()) -> tuple[int, io.BytesIO | None, str | None]:
    """img2dataset's `download_image` contract: (key, bytes stream or None, error message or None).
    `allow_networks`: CIDRs the fetch may reach besides public addresses (corpus.allow_networks)."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    deadline = time.monotonic() + timeout
    try:
        if not isinstance(url, str) or urlsplit(url).scheme.lower() not in URL_SCHEMES:
            raise FetchError(f"bad_url: only {'/'.join(URL_SCHEMES)} URLs are fetched, not {str(url)[:80]!r}")
        if _has_userinfo(url):
            raise FetchError("bad_url: the URL has user-info (credentials before '@'), which the fetch never sends; "
                             "give images at URLs without credentials (signed URLs work)")
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with _opener(deadline, timeout, networks(allow_networks)).open(request, timeout=timeout) as response:
            if disallowed_header_directives and is_disallowed(response.headers, user_agent_token,
                                                              disallowed_header_directives):
                raise FetchError("disallowed: X-Robots-Tag forbids using this image")
            content_type = (response.headers.get("Content-Type") or "").lower()
            if content_type.startswith(NOT_IMAGE_TYPES):
                raise FetchError(f"not_image: content type {content_type[:60]!r}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"too_large: {declared} bytes declared, more than max_download_bytes {max_bytes}")
            stream = io.BytesIO()
            while True:
                chunk = response.read1(64 * 1024)  # through _DeadlineReader: no read outlives the deadline
                if not chunk:
                    break
                stream.write(chunk)
                if stream.tell() > max_bytes:
                    raise FetchError(f"too_large: the body exceeds max_download_bytes {max_bytes}")
        _check_canvas(stream, max_area)
        stream.seek(0)
        return key, stream, None
    except Exception as err:  # noqa: BLE001 - every failure becomes a counted error message, as in img2dataset
        return key, None, redact(_classify(err))  # messages quote URLs, which may carry signatures


def _downloader_class() -> type:
    from img2dataset.downloader import Downloader

    class PeaDownloader(Downloader):
        """img2dataset's Downloader, fetching with `fetch_image` in whichever process runs the shard."""

        def __init__(self, *args: Any, max_bytes: int, max_area: float, allow_networks: tuple[str, ...] = (),
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.max_bytes, self.max_area, self.allow_networks = max_bytes, max_area, tuple(allow_networks)

        def __call__(self, row: Any) -> Any:
            import img2dataset.downloader as module

            original = module.download_image
            module.download_image = functools.partial(fetch_image, max_bytes=self.max_bytes, max_area=self.max_area,
                                                      allow_networks=self.allow_networks)
            try:
                return super().__call__(row)
            finally:
                module.download_image = original

    PeaDownloader.__module__ = __name__
    PeaDownloader.__qualname__ = "PeaDownloader"
    return PeaDownloader


def __getattr__(name: str) -> Any:
    # Built on first use: importing img2dataset is slow and needs OFFLINE_ENV set first. Pickle finds the
    # class here by name in img2dataset's worker processes.
    if name == "PeaDownloader":
        cls = _downloader_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def download(spec: LanguageSpec, url_list: Path, raw_dir: Path, extra_columns: list[str]) -> None:
    """img2dataset over `url_list` into `raw_dir`: incremental, sha256, the spec's guards and distributor."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)  # inherited by img2dataset's spawned workers
    import img2dataset

    i2d_main = sys.modules["img2dataset.main"]  # the package's `main` attribute is the CLI function, not the module

    corpus = spec.corpus
    quality = corpus.encode_quality
    if quality is None:
        quality = 9 if corpus.encode_format == "png" else 95  # for PNG the "quality" is the zlib level, 0-9
    downloader_cls = __getattr__("PeaDownloader")
    previous_signal, previous_downloader = signal.getsignal(signal.SIGINT), i2d_main.Downloader
    i2d_main.Downloader = functools.partial(downloader_cls, max_bytes=corpus.max_download_bytes,
                                            max_area=corpus.max_image_area, allow_networks=tuple(corpus.allow_networks))
    try:
        img2dataset.download(
            url_list=str(url_list), output_folder=str(raw_dir), input_format="parquet",
            output_format=corpus.output_format, url_col="url", caption_col="caption_en",
            save_additional_columns=list(extra_columns), incremental_mode="incremental", compute_hash="sha256",
            image_size=corpus.image_size, resize_mode=corpus.resize_mode,
            encode_format=corpus.encode_format, encode_quality=quality,
            min_image_size=corpus.min_image_size, max_image_area=corpus.max_image_area,
            processes_count=corpus.processes, thread_count=corpus.threads,
            timeout=corpus.timeout_s, retries=corpus.retries, number_sample_per_shard=corpus.rows_per_shard,
            distributor="multiprocessing" if corpus.engine is None else corpus.engine.kind, enable_wandb=False,
            extract_exif=False,
        )
    finally:
        i2d_main.Downloader = previous_downloader
        signal.signal(signal.SIGINT, previous_signal)  # img2dataset's handler calls sys.exit; don't leave it behind
