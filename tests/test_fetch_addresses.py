"""The fetch connects only to allowed addresses, on the first request and on every redirect. Every server here
listens on 127.0.0.0/8 and no test sends traffic anywhere else: refusals are checked before connecting."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from pea.corpus.fetch import fetch_image
from pea.io.addresses import networks, refusal
from pea.spec import CorpusSpec

LOOPBACK = ("127.0.0.1/32",)
IMAGE = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.mark.parametrize("address, kind", [
    ("169.254.169.254", "link-local"), ("10.1.2.3", "private"), ("192.168.0.7", "private"),
    ("127.0.0.2", "loopback"), ("::1", "loopback"), ("fe80::1%eth0", "link-local"), ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "link-local"), ("224.0.0.251", "multicast"), ("fc00::5", "private"),
    ("0.0.0.0", None), ("100.64.0.1", None), ("240.0.0.1", None),
])
def test_non_public_addresses_are_refused_by_kind(address, kind):
    why = refusal(address)
    assert why is not None and (kind is None or why == kind), (address, why)


@pytest.mark.parametrize("address, kind", [
    ("2002:7f00:1::", "loopback"), ("2002:a9fe:a9fe::1", "link-local"), ("2002:0a00:0001:1::5", "private"),  # 6to4
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo: client 127.0.0.1 (stored inverted)
    ("2001:0:a9fe:a9fe::f5ff:fffe", "link-local"),  # Teredo: server 169.254.169.254
    ("fec0::1", "site-local"), ("feff::1", "site-local"), ("64:ff9b::7f00:1", None),
])
def test_ipv6_forms_carrying_an_ipv4_address_are_judged_by_it(address, kind):
    why = refusal(address)
    assert why is not None and (kind is None or why == kind), (address, why)


def test_carried_public_addresses_pass_and_allowed_networks_apply_to_the_carried_one():
    assert refusal("2002:808:808::1") is None  # 6to4 of 8.8.8.8, judged, never contacted
    assert refusal("2001:0:808:808::f7f7:f7f7") is None  # Teredo, server and client 8.8.8.8
    assert refusal("2002:7f00:1::", networks(LOOPBACK)) is None and refusal("2002:7f00:2::", networks(LOOPBACK))


def test_a_url_with_user_info_is_refused_and_never_resolved(servers, monkeypatch):
    import socket

    looked_up = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: looked_up.append(host) or real(host, *a, **k))
    origin, _, hits = servers
    before = len(hits["origin"])
    host = origin.split("://")[1]
    key, stream, error = fetch_image((6, f"http://bob:hunter2-x@{host}/ok.png"), 5, max_bytes=10_000,
                                     allow_networks=LOOPBACK)
    assert stream is None and error.startswith("bad_url: the URL has user-info"), error
    assert "hunter2" not in error and looked_up == [] and len(hits["origin"]) == before


def test_public_addresses_pass_and_allowed_networks_open_exactly_themselves():
    assert refusal("93.184.215.14") is None and refusal("2606:4700::1111") is None  # judged, never contacted
    allowed = networks(LOOPBACK)
    assert refusal("127.0.0.1", allowed) is None and refusal("::ffff:127.0.0.1", allowed) is None
    assert refusal("127.0.0.2", allowed) == "loopback" and refusal("10.0.0.1", allowed) == "private"
    assert refusal("10.8.3.4", networks(["10.8.0.0/16"])) is None


def test_the_spec_validates_allow_networks_naming_the_bad_one():
    assert CorpusSpec(synthetic={}, allow_networks=["127.0.0.1/32", "fd00::/8"]).allow_networks == \
        ["127.0.0.1/32", "fd00::/8"]
    for bad in ("10.0.0.1/8", "localhost", "300.1.1.1/32"):
        with pytest.raises(ValidationError, match=f"{bad!r} is not a network in CIDR form"):
            CorpusSpec(synthetic={}, allow_networks=[bad])


def _serve(host: str, handler: type) -> tuple[ThreadingHTTPServer, str]:
    httpd = ThreadingHTTPServer((host, 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://{host}:{httpd.server_address[1]}"


@pytest.fixture(scope="module")
def servers():
    """origin on 127.0.0.1 (allowed): /ok.png and /to-canary.png (302 to the canary); canary on 127.0.0.2 (not
    allowed), which counts every request it receives."""
    hits = {"origin": [], "canary": []}

    def handler(name: str) -> type:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002
                pass

            def do_GET(self):  # noqa: N802
                hits[name].append(self.path)
                if self.path == "/to-userinfo.png":
                    self.send_response(302)
                    self.send_header("Location", origin_url.replace("://", "://eve:pw-9z@") + "/ok.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/to-canary.png":
                    self.send_response(302)
                    self.send_header("Location", canary_url + "/ok.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(IMAGE)))
                self.end_headers()
                self.wfile.write(IMAGE)
        return Handler

    canary, canary_url = _serve("127.0.0.2", handler("canary"))
    origin, origin_url = _serve("127.0.0.1", handler("origin"))
    yield origin_url, canary_url, hits
    for httpd in (origin, canary):
        httpd.shutdown()
        httpd.server_close()


def test_an_allowed_address_is_fetched(servers):
    origin, _, hits = servers
    key, stream, error = fetch_image((1, origin + "/ok.png"), 5, max_bytes=10_000, allow_networks=LOOPBACK)
    assert error is None and stream.read() == IMAGE and "/ok.png" in hits["origin"]


def test_loopback_is_refused_without_a_connection_unless_allowed(servers):
    origin, _, hits = servers
    before = len(hits["origin"])
    key, stream, error = fetch_image((2, origin + "/ok.png"), 5, max_bytes=10_000)
    assert stream is None and error.startswith("blocked_address: 127.0.0.1 is 127.0.0.1 (loopback)"), error
    assert "corpus.allow_networks" in error and len(hits["origin"]) == before


def test_a_redirect_from_an_allowed_address_to_a_refused_one_is_blocked_before_connecting(servers):
    origin, canary, hits = servers
    key, stream, error = fetch_image((3, origin + "/to-canary.png"), 5, max_bytes=10_000, allow_networks=LOOPBACK)
    assert stream is None and error.startswith("blocked_address: 127.0.0.2 is 127.0.0.2 (loopback)"), error
    assert "/to-canary.png" in hits["origin"] and hits["canary"] == []  # followed, but never connected
    key, stream, error = fetch_image((4, canary + "/ok.png"), 5, max_bytes=10_000, allow_networks=LOOPBACK)
    assert error.startswith("blocked_address:") and hits["canary"] == []  # a manifest row naming it directly


def test_a_named_network_opens_the_redirect_target(servers):
    origin, _, hits = servers
    key, stream, error = fetch_image((5, origin + "/to-canary.png"), 5, max_bytes=10_000,
                                     allow_networks=("127.0.0.0/8",))
    assert error is None and stream.read() == IMAGE and hits["canary"] == ["/ok.png"]


def test_a_redirect_to_a_url_with_user_info_is_refused(servers):
    origin, _, hits = servers
    key, stream, error = fetch_image((7, origin + "/to-userinfo.png"), 5, max_bytes=10_000, allow_networks=LOOPBACK)
    assert stream is None and error.startswith("redirect:") and "user-info" in error and "pw-9z" not in error, error
