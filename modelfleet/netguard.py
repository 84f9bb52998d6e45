"""Outbound requests made on a tenant's behalf (webhooks) go only where allowed.

A tenant names a URL; the platform POSTs to it from inside the operator's
network.  Left alone, that is a blind SSRF: loopback services, the cloud
metadata endpoint, private hosts.  So:

    at creation:  ``check_url`` refuses what is wrong on its face (400): a
                  scheme other than http(s), ``user:pass@``, a numeric host in
                  no notation we can read
    at connect:   ``Guard.session()`` is an aiohttp session whose resolver
                  checks every address a name resolves to, and whose socket
                  factory checks the address each socket is about to connect
                  to (literal IPs skip aiohttp's resolver).  The address
                  checked is the address connected to, so DNS rebinding
                  between a check and the connect cannot pass.  A refusal is
                  final (not retried) and reads the same whatever listens
                  there: ``destination not allowed``.

What is denied (``refusal``): loopback, link-local (169.254.0.0/16 holds the
cloud metadata endpoint; fe80::/10), private ranges (RFC 1918, fc00::/7),
CGNAT 100.64.0.0/10, 0.0.0.0/8 and ``::``, multicast, reserved and
documentation ranges, anything not globally routable, scoped IPv6, and the
IPv6 forms that carry an IPv4 address: IPv4-mapped, -compatible and
-translated (denied outright), 6to4 and NAT64 (the embedded IPv4 is checked).

The operator opens internal destinations on purpose with an allow-list
(``MODELFLEET_WEBHOOK_ALLOW``, comma-separated): CIDRs or addresses
(``10.1.0.0/16``, ``127.0.0.1``), ``address:port`` (``[::1]:9000``), host
names, or ``host:port`` (``hooks.internal:8443``: any address that name
resolves to, on that port).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from modelfleet.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NOT_ALLOWED = "destination not allowed"

# Ranges denied beyond what the ipaddress predicates already say.
_DENIED: tuple[tuple[str, IPNetwork], ...] = tuple(
    (label, ipaddress.ip_network(net)) for label, net in (
        ("this network", "0.0.0.0/8"),
        ("carrier-grade NAT", "100.64.0.0/10"),
        ("IETF protocol assignments", "192.0.0.0/24"),
        ("benchmarking", "198.18.0.0/15"),
        ("reserved", "240.0.0.0/4"),
        ("unique-local", "fc00::/7"),
        ("link-local", "fe80::/10"),
        ("site-local", "fec0::/10"),
        ("local-use NAT64", "64:ff9b:1::/48"),
        ("discard-only", "100::/64"),
        ("Teredo", "2001::/32"),
        ("ORCHID", "2001:10::/28"),
        ("documentation", "2001:db8::/32"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_IN_V6 = (ipaddress.ip_network("::/96"), ipaddress.ip_network("::ffff:0:0/96"),
             ipaddress.ip_network("::ffff:0:0:0/96"))
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
_HEX_OR_DEC = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_NAME = re.compile(r"([a-z0-9_]([a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?\.?")


class DestinationNotAllowed(OSError):
    """Raised at connect time for an address the policy denies.  An OSError, so
    aiohttp carries it in its connector errors; its text is always the same, so
    nothing about the destination leaks through it."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(NOT_ALLOWED)
        self.reason = reason  # for the operator's log, never for the tenant


def refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be connected to by default, or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "scoped IPv6"
        if ip.is_unspecified or ip.is_loopback:
            return "unspecified" if ip.is_unspecified else "loopback"
        if any(ip in net for net in _V4_IN_V6):
            return "IPv4 inside IPv6"
        inner = ip.sixtofour or (ipaddress.IPv4Address(ip.packed[-4:]) if ip in _NAT64 else None)
        if inner is not None:
            why = refusal(inner)
            return f"{why} (inside IPv6)" if why else None
    checks = (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
              ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("private", ip.is_private), ("reserved", ip.is_reserved))
    for label, hit in checks:
        if hit:
            return label
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    for label, net in _DENIED:
        if ip.version == net.version and ip in net:
            return label
    if not ip.is_global:
        return "not globally routable"
    return None


def _ipv4_number(part: str) -> int:
    """One part of a BSD ``inet_aton`` IPv4 notation: decimal, 0x hex, 0 octal."""
    if part.startswith("0x"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8)  # ValueError on 8 or 9
    return int(part)


def _legacy_ipv4(labels: list[str]) -> ipaddress.IPv4Address:
    """127.1, 0x7f000001, 2130706433, 0177.0.0.1: what inet_aton (and so some
    resolvers and libraries) take as an IPv4 address."""
    if not 1 <= len(labels) <= 4 or not all(_HEX_OR_DEC.match(p) for p in labels):
        raise ValueError("not an IPv4 address")
    numbers = [_ipv4_number(p) for p in labels]
    head, last = numbers[:-1], numbers[-1]
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise ValueError("IPv4 part out of range")
    value = last
    for i, n in enumerate(head):
        value |= n << (24 - 8 * i)
    return ipaddress.IPv4Address(value)


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host names literally, in any notation, or None for a
    name.  A host whose last label is numeric is an IPv4 address in some
    notation (as the WHATWG URL standard reads it); ValueError when it is not
    a valid one, so an odd notation is never passed on for a resolver to read."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        return ipaddress.IPv6Address(host.replace("%25", "%"))
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if _HEX_OR_DEC.match(labels[-1]):
        return _legacy_ipv4(labels)
    return None


def _is_local_name(host: str) -> bool:
    name = host.lower().rstrip(".")
    return name in _LOCAL_NAMES or name.endswith(".localhost")


@dataclass(frozen=True)
class Policy:
    """The deny list above, opened by the operator's allow-list."""

    networks: tuple[IPNetwork, ...] = ()
    # (address or lower-case host name, port or None for any port)
    endpoints: frozenset[tuple[str, int | None]] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Policy:
        """From ``MODELFLEET_WEBHOOK_ALLOW`` entries; ValueError on one we cannot read."""
        networks: list[IPNetwork] = []
        endpoints: set[tuple[str, int | None]] = set()
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            try:
                url = URL(f"http://{entry}")
                host, port = url.raw_host, url.explicit_port
            except ValueError:
                raise ValueError(f"webhook allow-list entry {entry!r} is not a CIDR, an "
                                 "address, a host name or host:port") from None
            if not host or url.raw_path not in ("", "/") or url.user or url.query_string:
                raise ValueError(f"webhook allow-list entry {entry!r} is not a CIDR, an "
                                 "address, a host name or host:port")
            try:
                literal = literal_address(host)
            except ValueError:
                raise ValueError(f"webhook allow-list entry {entry!r}: {host!r} is not a "
                                 "valid address") from None
            if literal is None and not _NAME.fullmatch(host):
                raise ValueError(f"webhook allow-list entry {entry!r}: {host!r} is not a "
                                 "host name")
            endpoints.add((str(literal) if literal else host.rstrip("."), port))
        return cls(tuple(networks), frozenset(endpoints))

    def _listed(self, name: str, port: int | None) -> bool:
        return (name, None) in self.endpoints or (name, port) in self.endpoints

    def allows_name(self, host: str, port: int | None) -> bool:
        """The operator listed this host name (on this port): whatever it resolves to."""
        return self._listed(host.lower().rstrip("."), port)

    def allows(self, ip: IPAddress, port: int | None) -> bool:
        if any(ip.version == net.version and ip in net for net in self.networks):
            return True
        return self._listed(str(ip), port) or refusal(ip) is None


def check_url(url: str, param: str = "webhook_url") -> URL:
    """A tenant's URL, refused with a 400 when it is wrong on its face: not
    http(s), a user name or password in it, no host, or a numeric host in no
    notation we read.  Where it points is checked at every connect (``Guard``):
    a job whose webhook points inside is accepted, and its webhook fails with
    ``destination not allowed`` without a packet sent there."""
    try:
        parsed = URL(url)
        host = parsed.raw_host
    except ValueError:
        raise InvalidRequest(f"{param} is not a valid URL", param=param) from None
    if parsed.scheme not in ("http", "https") or not host or any(c.isspace() for c in url):
        raise InvalidRequest(f"{param} must be an http:// or https:// URL", param=param)
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise InvalidRequest(f"{param} must not contain a user name or password", param=param)
    try:
        literal_address(host)
    except ValueError:
        raise InvalidRequest(f"{param} has a host that is neither a name nor a valid "
                             "IP address", param=param) from None
    return parsed


def _address_of(host: str) -> IPAddress:
    return ipaddress.ip_address(host)


class GuardedResolver(AbstractResolver):
    """Resolves with ``inner`` (aiohttp's default resolver unless given) and
    refuses the name when any address it resolves to is denied: one internal
    address among public ones is how rebinding and split answers get in."""

    def __init__(self, guard: Guard, inner: AbstractResolver | None = None) -> None:
        self.guard = guard
        self.inner = inner or aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if _is_local_name(host) and not self.guard.policy.allows_name(host, port):
            raise DestinationNotAllowed(f"{host}: a local name")
        results = await self.inner.resolve(host, port, family)
        vouched = self.guard.policy.allows_name(host, port)
        for result in results:
            ip = _address_of(result["host"])
            if vouched:
                self.guard.vouch(ip, result["port"])
            elif not self.guard.policy.allows(ip, result["port"]):
                raise DestinationNotAllowed(f"{host} resolves to {ip} ({refusal(ip)})")
        return results

    async def close(self) -> None:
        await self.inner.close()


class Guard:
    """The policy, applied to every socket an outbound session opens."""

    def __init__(self, policy: Policy, resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = resolver
        # Addresses that host names on the allow-list resolved to: the socket
        # factory only sees addresses, so the resolver vouches for these.
        self._vouched: set[tuple[IPAddress, int]] = set()

    def vouch(self, ip: IPAddress, port: int) -> None:
        if len(self._vouched) < 4096:
            self._vouched.add((ip, port))

    def check_address(self, ip: IPAddress, port: int) -> None:
        if (ip, port) not in self._vouched and not self.policy.allows(ip, port):
            raise DestinationNotAllowed(f"{ip} ({refusal(ip)})")

    def socket_factory(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """aiohttp's last step before connect: every address, literal or resolved."""
        family, type_, proto, _, sockaddr = addr_info
        self.check_address(_address_of(str(sockaddr[0])), int(sockaddr[1]))
        return socket.socket(family=family, type=type_, proto=proto)

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """A client session that connects only where the policy allows (no proxy
        from the environment, redirects are the caller's to refuse)."""
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self, self._inner),
                                         socket_factory=self.socket_factory,
                                         limit=100, ttl_dns_cache=None, use_dns_cache=False)
        return aiohttp.ClientSession(connector=connector, trust_env=False, **kwargs)

    def check_destination(self, url: str) -> None:
        """Before a request: a literal host (in any notation) that the policy
        denies raises DestinationNotAllowed; names are left to the resolver, at
        connect."""
        try:
            parsed = URL(url)
            host, port = parsed.raw_host or "", parsed.port
            literal = literal_address(host)
        except ValueError:
            raise DestinationNotAllowed("unreadable host") from None
        if parsed.raw_user is not None or parsed.raw_password is not None:
            raise DestinationNotAllowed("credentials in the URL")
        if literal is not None:
            self.check_address(literal, port or 0)


def not_allowed(exc: BaseException) -> DestinationNotAllowed | None:
    """The DestinationNotAllowed inside an aiohttp error, if that is what it was."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, DestinationNotAllowed):
            return item
        stack += [item.__cause__, item.__context__, getattr(item, "os_error", None)]
    return None
