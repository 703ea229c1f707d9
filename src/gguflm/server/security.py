"""Who may talk to the server: the ``Host`` and ``Origin`` checks, CORS, the API key, and a
time limit on request headers.

A server on 127.0.0.1 is still reachable from every web page the user opens: a page may
send "simple" requests (a ``text/plain`` POST) to any address without asking, and a page
whose DNS name is re-bound to 127.0.0.1 (DNS rebinding, the class of Ollama's
CVE-2024-28224) is even same-origin with it and may read the answers. :class:`Guard`
refuses both:

- ``Host``: a request must name the server as a loopback name (``localhost``), an IP
  address (a literal address cannot be re-bound), the address it listens on, or a name
  given with ``--allowed-hosts`` (``*``: any); else 403. Ports are not compared: a
  re-bound name is refused whatever its port.
- ``Origin`` (browsers send it with every cross-origin request and every POST): a request
  from another origin than the server's own is refused with 403, preflights included,
  unless that origin is listed with ``--cors-origins`` (``*``: any); listed origins get
  ``Access-Control-Allow-Origin`` on every answer and their preflights are answered.
- ``--api-key``: every ``/v1/`` request needs ``Authorization: Bearer <key>`` (compared in
  constant time); else 401 in OpenAI's shape. ``/`` and ``/health`` stay open.

:func:`header_timeout_protocol` closes connections whose request line and headers do not
arrive in time (slow-header, "slowloris" connections); uvicorn only times out idle
keep-alive connections.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gguflm.server.errors import APIError

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
DEFAULT_HEADER_TIMEOUT = 10.0   # seconds for a request line and its headers
PREFLIGHT_MAX_AGE = 600         # seconds a browser may cache an answered preflight


@dataclass(frozen=True)
class Security:
    """The server's access policy (see the module docstring). ``host``: the address the
    server listens on; ``allowed_hosts`` / ``cors_origins``: extra names and origins,
    ``"*"`` for any; ``api_key``: None for no key."""

    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    api_key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower() for h in self.allowed_hosts if h.strip()))
        object.__setattr__(self, "cors_origins", tuple(_origin(o) for o in self.cors_origins if o.strip()))
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request's ``Host`` header names this server (None: no header, HTTP/1.0)."""
        if host is None or "*" in self.allowed_hosts:
            return True
        name = _hostname(host)
        if name is None:
            return False
        if name in LOOPBACK_NAMES or name == self.host.lower().strip("[]") or _is_ip(name):
            return True
        return name in self.allowed_hosts or host.lower() in self.allowed_hosts

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.cors_origins or _origin(origin) in self.cors_origins

    def key_ok(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _hostname(host: str) -> str | None:
    """The name or address in a ``Host`` header (``[::1]:8080`` -> ``::1``); None if malformed."""
    try:
        parts = urlsplit("//" + host)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname.lower().rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin(origin: str) -> str:
    """``scheme://host[:port]`` lowercased, default ports dropped (``*`` and ``null`` kept)."""
    origin = origin.strip().lower().rstrip("/")
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return origin
    if not parts.scheme or not parts.hostname:
        return origin
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None or (parts.scheme, port) in (("http", 80), ("https", 443)):
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def same_origin(origin: str, host: str | None, scheme: str) -> bool:
    """Whether ``origin`` is the server's own origin as this request reached it."""
    return host is not None and _origin(origin) == _origin(f"{scheme}://{host}")


class Guard:
    """ASGI middleware enforcing a :class:`Security` policy on every HTTP request."""

    def __init__(self, app: ASGIApp, security: Security):
        self.app, self.security = app, security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sec = self.security
        headers = _headers(scope["headers"])
        host, origin = headers.get("host"), headers.get("origin")
        if not sec.host_allowed(host):
            await _error(scope, receive, send, APIError(
                403, f"the Host header {host!r:.100} does not name this server; start it with "
                     "--allowed-hosts to allow that name", "invalid_request_error", None, "host_not_allowed"))
            return
        cors: str | None = None
        if origin is not None and not same_origin(origin, host, scope.get("scheme", "http")):
            if not sec.origin_allowed(origin):
                await _error(scope, receive, send, APIError(
                    403, f"cross-origin requests from {origin!r:.100} are not allowed; start the server "
                         "with --cors-origins to allow that origin", "invalid_request_error", None,
                    "origin_not_allowed"))
                return
            cors = "*" if "*" in sec.cors_origins else origin
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await Response(status_code=204, headers=_preflight_headers(cors, headers))(scope, receive, send)
            return
        if cors is not None:
            send = _with_cors(send, cors)
        if scope["path"].startswith("/v1/") and not sec.key_ok(headers.get("authorization")):
            await _error(scope, receive, send, APIError(
                401, "Incorrect API key provided: send it as 'Authorization: Bearer <key>'",
                "invalid_request_error", None, "invalid_api_key"))
            return
        await self.app(scope, receive, send)


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The first value of each header, decoded as Latin-1 (as HTTP/1.1 defines them)."""
    out: dict[str, str] = {}
    for k, v in raw:
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


def _preflight_headers(cors: str | None, headers: dict[str, str]) -> dict[str, str]:
    if cors is None:  # same origin: browsers do not ask; answer without granting anything
        return {}
    return {"Access-Control-Allow-Origin": cors, "Vary": "Origin",
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": headers.get("access-control-request-headers", "")[:1000]
                                            or "Authorization, Content-Type",
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE)}


def _with_cors(send: Send, cors: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []),
                                              (b"access-control-allow-origin", cors.encode("latin-1")),
                                              (b"vary", b"Origin")]}
        await send(message)
    return wrapped


async def _error(scope: Scope, receive: Receive, send: Send, err: APIError) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    await JSONResponse(err.body(), err.status, headers=headers)(scope, receive, send)


def header_timeout_protocol(timeout: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not
    all arrived ``timeout`` seconds after it opened, or after the first byte of a further
    request on a kept-alive connection (a slow sender cannot reset the clock)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still reading a request's head
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection whose request headers took over %s s", timeout)
                self.transport.close()

    return HeaderTimeoutProtocol
