"""Which addresses the corpus fetch may connect to: public ones, plus the networks a spec allows.

A manifest row, or a redirect, can name any host: the cloud metadata service (169.254.169.254), the cluster's
private network, the worker's own loopback services. The fetch (pea.corpus.fetch) resolves each host once,
checks every resolved address here and connects only to an address that passes, on the first request and on
every redirect, so a name that resolves differently later (DNS rebinding) cannot slip past the check.

Refused unless `corpus.allow_networks` holds them: loopback, private (RFC 1918, ULA), link-local, multicast,
reserved, unspecified and every other non-global address (carrier-grade NAT, documentation ranges); an
IPv4-mapped IPv6 address is judged as its IPv4 address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
KINDS = ("loopback", "link_local", "private", "multicast", "reserved", "unspecified")


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """'127.0.0.1/32' ... → networks; a malformed one raises ValueError naming it."""
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr, strict=True))
        except ValueError as err:
            raise ValueError(f"{cidr!r} is not a network in CIDR form such as '127.0.0.1/32' or '10.8.0.0/16' "
                             f"({err})") from None
    return tuple(out)


def refusal(address: str | Address, allowed: Iterable[Network] = ()) -> str | None:
    """Why the fetch must not connect to `address` (e.g. 'loopback'), or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)  # no IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allowed):
        return None
    for kind in KINDS:
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def check_url(url: str, allowed: Iterable[Network] = (), what: str = "manifest") -> None:
    """Refuse an http(s) URL whose host resolves to any address `refusal` refuses (a manifest is read by fsspec,
    which resolves the name again when it connects: a rebinding DNS could still switch it in between, so this
    guards against a misconfigured or hostile spec, not a hostile DNS server; the corpus fetch pins its address)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 443, 0,
                                                                socket.SOCK_STREAM)}
    except OSError as err:
        raise FileNotFoundError(f"{what} {url}: cannot resolve {parts.hostname} ({err})") from None
    if refused := sorted(f"{a} ({why})" for a in resolved if (why := refusal(a, allowed)) is not None):
        raise PermissionError(f"{what} {url}: {parts.hostname} resolves to {', '.join(refused)}; pea reads only "
                              "public addresses unless the spec's corpus.allow_networks lists the network")
