"""An unreachable Hugging Face Hub is offline: revision pinning, model loading and `pea validate` give the offline
message naming the download command (never a connection traceback), and load what the cache has. The Hub is a
closed loopback port, a loopback server that resets or never answers, a proxy on loopback answering 502, or a
name that only a patched resolver answers (no DNS query leaves the machine)."""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import close_session
from test_hub import COMMIT_A, REPO, _publish  # noqa: F401 - tests/test_hub.py: a real cache layout

from pea.models import load_student
from pea.spec import StudentSpec
from pea.spec.hub import pinned_revision

ROOT = Path(__file__).resolve().parents[1]
UNRESOLVABLE = "hub.pea-test.invalid"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Listener:
    """A loopback server doing one thing to every connection: 'reset' (RST at once), 'silent' (never answers) or
    'proxy502' (answers as a failing proxy)."""

    def __init__(self, behaviour: str):
        self.behaviour, self.stop = behaviour, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections.append(conn)
            if self.behaviour == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()
            elif self.behaviour == "proxy502":
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                conn.close()

    def close(self) -> None:
        self.stop.set()
        for conn in self.connections:
            conn.close()
        self.sock.close()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(params=["refused", "reset", "silent", "proxy502", "unresolvable"])
def unreachable_hub(request, monkeypatch):
    """The Hub at an address that fails the way `param` says; huggingface_hub online (as without HF_HUB_OFFLINE)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after: pinned_revision may switch it on
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    listener, resolved = None, []
    kind = request.param
    if kind == "refused":
        endpoint = f"http://127.0.0.1:{_closed_port()}"
    elif kind in ("reset", "silent"):
        listener = _Listener(kind)
        endpoint = f"http://127.0.0.1:{listener.port}"
    elif kind == "proxy502":
        listener = _Listener(kind)
        endpoint = f"http://{UNRESOLVABLE}"  # the proxy would resolve it; it answers 502 first
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{listener.port}")
    else:
        real = socket.getaddrinfo

        def resolver(host, *args, **kwargs):
            if host == UNRESOLVABLE:
                resolved.append(host)
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real(host, *args, **kwargs)
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        endpoint = f"http://{UNRESOLVABLE}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    close_session()  # a fresh client: it reads the proxy settings when it is made
    yield kind, resolved
    close_session()
    if listener is not None:
        listener.close()


def _offline_message(repo: str, revision: str) -> str:
    with pytest.raises(ValueError) as raised:
        pinned_revision(repo, revision)
    return str(raised.value)


def test_an_unreachable_hub_gives_the_offline_message_and_the_cache_still_loads(hub_cache, unreachable_hub,
                                                                                   monkeypatch):
    kind, resolved = unreachable_hub
    with pytest.raises(ValueError) as raised:
        pinned_revision("org/absent", "main")
    assert constants.HF_HUB_OFFLINE, "the process did not switch to offline"
    offline = _offline_message("org/absent", "main")  # asked again, offline now: the offline case's own text
    assert str(raised.value) == offline and "`hf download org/absent --revision main`" in offline
    if kind == "unresolvable":
        assert resolved == [UNRESOLVABLE]  # asked of the patched resolver, once; never of a DNS server

    # Model loading: back online (unreachable), a model the cache has loads, pinned to the commit refs/main names.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _publish(hub_cache, REPO, COMMIT_A, seed=0)
    assert pinned_revision(REPO, "main") == COMMIT_A
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    encoder = load_student(StudentSpec(id=REPO, revision="main", max_length=8))
    assert encoder.encode(["左边有一个红色的圆形"]).shape == (1, 8, 32)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match=r"org/absent at revision 'v2' is not in the Hugging Face cache .*`hf download"):
        load_student(StudentSpec(id="org/absent", revision="v2", max_length=8))


RUN_VALIDATE = """
import socket, sys
real = socket.getaddrinfo
def resolver(host, *args, **kwargs):
    if host == sys.argv[1]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return real(host, *args, **kwargs)
socket.getaddrinfo = resolver  # no DNS query for the Hub's name: the patched resolver answers it
from pea.cli import main
main(["validate", "zh"])
"""


def _validate(tmp_path: Path, hub: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "empty-cache"), HF_HUB_ETAG_TIMEOUT="2", PYTHONPATH=str(ROOT), **hub)
    return subprocess.run([sys.executable, "-c", RUN_VALIDATE, UNRESOLVABLE], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_pea_validate_says_the_same_offline_and_with_the_hub_unreachable(tmp_path):
    offline = _validate(tmp_path, {"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert "hf download" in offline.stdout and "valid" in offline.stdout
    for endpoint in (f"http://127.0.0.1:{_closed_port()}", f"http://{UNRESOLVABLE}"):
        unreachable = _validate(tmp_path, {"HF_ENDPOINT": endpoint})
        assert unreachable.returncode == 0 and "Traceback" not in unreachable.stderr, unreachable.stderr
        assert unreachable.stdout == offline.stdout
