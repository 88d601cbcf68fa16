"""Callback URL checks: a server that POSTs wherever a client says is an SSRF risk.

A URL passes when its scheme is http(s), its host is on the allowlist (if one is configured), and
every address the host resolves to is public, or inside a network the operator allowed. Checked
when the job is submitted (422) and again before each delivery (DNS may have changed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from app.errors import ValidationError
from app.jobs.settings import JobsSettings


def _host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and (host.endswith(entry[1:]) or host == entry[2:]):
            return True
        if host == entry:
            return True
    return False


def _is_private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
            or address.is_reserved or address.is_unspecified)


async def resolve(host: str, port: int) -> list[str]:
    try:
        return [ipaddress.ip_address(host).compressed]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0].split("%")[0] for info in infos})


async def check_callback_url(url: str, settings: JobsSettings, param: str = "callback_url") -> str:
    """The URL if it may be called back; otherwise a 422 that says why."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"{param} must be an http(s) URL with a host, got {url!r}", param=param,
                              code="invalid_callback_url")
    host = parts.hostname
    if settings.callback_allowed_hosts and not _host_allowed(host, settings.callback_allowed_hosts):
        raise ValidationError(f"{param}: the host {host!r} is not on the callback allowlist", param=param,
                              code="callback_host_not_allowed")
    try:
        addresses = await resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
    except OSError as exc:
        raise ValidationError(f"{param}: the host {host!r} does not resolve ({exc})", param=param,
                              code="invalid_callback_url") from None
    networks = [ipaddress.ip_network(n, strict=False) for n in settings.callback_allowed_networks]
    for text in addresses:
        address = ipaddress.ip_address(text)
        if _is_private(address) and not any(address in net for net in networks):
            raise ValidationError(
                f"{param}: {host!r} resolves to {text}, a private, loopback or link-local address; "
                "such callbacks are refused unless jobs.callback_allowed_networks includes it",
                param=param, code="callback_address_not_allowed")
    return url
