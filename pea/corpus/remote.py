"""Remote manifests: an fsspec filesystem per manifest URL, for DuckDB to stream and for the fingerprints.

    fs, path = manifest_filesystem(url, allowed)   # http(s): GuardedHTTPFileSystem; s3://, gs://: s3fs, gcsfs
    info = describe(fs, path, url)                  # size, ETag... or one clear error (refused, missing, unreachable)

http(s) manifests are read through fsspec's HTTPFileSystem (aiohttp) with two changes:

- every socket it opens, on the first request and on every redirect hop (aiohttp follows them itself), goes only
  to an address pea.io.addresses allows: the check runs in aiohttp's socket factory on the address actually
  connected to, so neither a redirect nor a name that resolves differently later (DNS rebinding) gets past it,
  and a refused one is recorded so that any failure it causes (a HEAD, a read deep inside DuckDB) is reported
  as the same clear error; no proxy from the environment (its address would hide the target's);
- `modified()`, which DuckDB asks of every file it opens and fsspec's HTTP filesystem does not implement (its
  absence made every http(s) manifest fail with "modified() is not implemented").

Reads are ranged (fsspec's HTTPFile: what DuckDB asks for plus BLOCK_BYTES), so a manifest is streamed, never held
whole; the existence check is a HEAD, not fsspec's GET (which starts sending the whole file). A URL
with user-info (`https://user:pass@host/m.parquet`) is sent as a Basic Authorization header with the host resolved
alone (aiohttp; dropped on a redirect to another host); error messages mask the password (pea.io.redact).

s3:// and gs:// go through s3fs and gcsfs (the `remote` extra) to the object store their own configuration names
(AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST, credentials): the operator's settings, not a spec's, pick those hosts.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import socket
import ssl
from urllib.parse import urlsplit

import aiohttp
import fsspec
from fsspec.implementations.http import HTTPFileSystem

from pea.io.addresses import Network, refusal
from pea.io.redact import redact

CONNECT_S, READ_S = 30, 120  # a manifest host that stops answering fails instead of holding the stage
# Bytes each ranged read fetches beyond what DuckDB asked for (its reads are ~2 MiB, one per thread): what a manifest
# costs in memory whatever its size. fsspec's default (5 MiB) made each request ~7 MiB.
BLOCK_BYTES = 1 << 20
OBJECT_STORES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


class BlockedAddress(OSError):
    """A connection pea refused to open: the address is not public and not in corpus.allow_networks."""


def _guarded_socket(allowed: tuple[Network, ...], refused: list[str], addr_info: tuple) -> socket.socket:
    """aiohttp's socket factory: a socket only for an allowed address (called for each address of each hop)."""
    family, kind, proto, _, sockaddr = addr_info
    if (why := refusal(sockaddr[0], allowed)) is not None:
        refused.append(f"{sockaddr[0]} ({why})")
        raise BlockedAddress(f"refused to connect to {sockaddr[0]} ({why})")
    return socket.socket(family, kind, proto)


async def _guarded_client(allowed: tuple[Network, ...], refused: list[str], **kwargs) -> aiohttp.ClientSession:
    # The TLS context is made here, not at aiohttp's import: SSL_CERT_FILE (a private CA) is read when it is made.
    connector = aiohttp.TCPConnector(socket_factory=functools.partial(_guarded_socket, allowed, refused),
                                     ssl=ssl.create_default_context())
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_S, sock_read=READ_S)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False, **kwargs)


class GuardedHTTPFileSystem(HTTPFileSystem):
    """fsspec's HTTP filesystem connecting only to allowed addresses, with the `modified()` DuckDB needs."""

    cachable = False  # fsspec would hand every caller of the same arguments one instance, sharing `refused`

    def __init__(self, allowed: tuple[Network, ...] = (), **kwargs) -> None:
        self.refused: list[str] = []  # addresses refused so far, in order ("127.0.0.2 (loopback)")
        super().__init__(get_client=functools.partial(_guarded_client, tuple(allowed), self.refused),
                         block_size=BLOCK_BYTES, **kwargs)

    async def _exists(self, path: str, **kwargs) -> bool:
        """By HEAD (fsspec's sends a GET, which starts the whole body of a manifest that may be gigabytes)."""
        try:
            await self._info(path, **kwargs)
            return True
        except FileNotFoundError:
            return False

    def modified(self, path: str) -> datetime.datetime:
        """The Last-Modified the server sends; the epoch when it sends none (DuckDB only compares it)."""
        stamp = self.info(path).get("Last-Modified")
        try:
            return email.utils.parsedate_to_datetime(stamp)
        except (TypeError, ValueError):
            return datetime.datetime.fromtimestamp(0, datetime.timezone.utc)


def manifest_filesystem(url: str, allowed: tuple[Network, ...] = ()) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that reads the remote manifest `url`, and the path to give it."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return GuardedHTTPFileSystem(allowed), url
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = OBJECT_STORES.get(scheme, f"the fsspec implementation of {scheme}://")
        raise ImportError(f"manifest {redact(url)}: reading {scheme}:// needs {package}; install it (pip install "
                          "'pea[remote]')") from None


def refused_error(fs: fsspec.AbstractFileSystem, url: str) -> PermissionError | None:
    """The clear error for a manifest whose reads were refused an address (directly or after a redirect)."""
    refused = getattr(fs, "refused", None)
    if not refused:
        return None
    return PermissionError(f"manifest {redact(url)}: refused to connect to {', '.join(dict.fromkeys(refused))}, "
                           "where the URL or a redirect from it led; pea reads manifests only from public addresses "
                           "unless the spec's corpus.allow_networks lists the network")


def _cause(err: BaseException) -> BaseException:
    """The innermost error of a chain (fsspec wraps aiohttp's in FileNotFoundError)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def describe(fs: fsspec.AbstractFileSystem, path: str, url: str) -> dict:
    """fs.info(path) (size, ETag, Last-Modified...), or one clear error naming the manifest (password masked)."""
    try:
        return fs.info(path)
    except Exception as err:  # noqa: BLE001 - every failure becomes one of the errors below
        if (blocked := refused_error(fs, url)) is not None:
            raise blocked from None
        cause = _cause(err)
        if isinstance(cause, aiohttp.ClientResponseError) and cause.status in (401, 403):
            raise PermissionError(f"manifest {redact(url)}: the server answered {cause.status} {cause.message}; "
                                  "give credentials (user-info in the URL, or the object store's own) or fix "
                                  "corpus.manifests in the spec") from None
        if isinstance(cause, aiohttp.ClientResponseError) or (isinstance(err, FileNotFoundError) and cause is err):
            raise FileNotFoundError(f"manifest {redact(url)} does not exist; fix corpus.manifests in the spec"
                                    ) from None
        if isinstance(cause, aiohttp.ClientConnectorDNSError):
            raise FileNotFoundError(f"manifest {redact(url)}: cannot resolve its host ({cause.os_error}); fix the URL "
                                    "in corpus.manifests or the machine's DNS") from None
        raise ConnectionError(f"manifest {redact(url)} cannot be reached ({type(cause).__name__}: "
                              f"{redact(str(cause))}); check the URL, the network, or retry") from None
