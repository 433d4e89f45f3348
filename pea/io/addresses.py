"""Which addresses the corpus fetch may connect to: public ones, plus the networks a spec allows.

A manifest row, or a redirect, can name any host: the cloud metadata service (169.254.169.254), the cluster's
private network, the worker's own loopback services. The fetch (pea.corpus.fetch) resolves each host once,
checks every resolved address here and connects only to an address that passes, on the first request and on
every redirect, so a name that resolves differently later (DNS rebinding) cannot slip past the check.

Refused unless `corpus.allow_networks` holds them: loopback, private (RFC 1918, ULA), link-local, multicast,
reserved, unspecified, deprecated site-local (fec0::/10) and every other non-global address (carrier-grade NAT,
documentation ranges, NAT64's 64:ff9b::/96). An IPv6 address that carries an IPv4 one is judged by what it carries:
IPv4-mapped (::ffff:a.b.c.d), 6to4 (2002:aabb:ccdd::/48) and Teredo (2001:0::/32: its server and its client, both
must pass), so 2002:7f00:1:: is loopback and 2002:a9fe:a9fe:: the metadata service.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

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


def _carried(ip: Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo's server and client), else none."""
    if ip.version != 6:
        return ()
    if ip.ipv4_mapped is not None:
        return (ip.ipv4_mapped,)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    return ip.teredo or ()


def refusal(address: str | Address, allowed: Iterable[Network] = ()) -> str | None:
    """Why the fetch must not connect to `address` (e.g. 'loopback'), or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)  # no IPv6 zone
    allowed = tuple(allowed)
    if carried := _carried(ip):  # the tunnel delivers to the IPv4 address: that is what is reached
        return next((why for why in (refusal(v4, allowed) for v4 in carried) if why is not None), None)
    if any(ip.version == net.version and ip in net for net in allowed):
        return None
    for kind in KINDS:
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if ip.version == 6 and ip.is_site_local:  # fec0::/10: deprecated, but still routed inside some sites
        return "site-local"
    return None if ip.is_global else "not globally routable"
