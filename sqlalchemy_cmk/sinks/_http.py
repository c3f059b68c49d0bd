"""The one HTTPS client the HTTP destinations share (webhook, Splunk HEC, OTLP/HTTP).

Stdlib only (``http.client`` and ``ssl``), and deliberately small:

* https only, and the host passes the :class:`~sqlalchemy_cmk.sinks.NetworkPolicy` (allowlist,
  no non-public address unless allowed);
* it connects to an address :meth:`NetworkPolicy.resolve` returned and checked, never resolves
  the name again (DNS rebinding), while TLS's SNI, the certificate check and ``Host`` use the
  host name;
* TLS is always verified (the system's CAs, or the spec's ``ca_file`` for a private CA);
* no proxy from the environment and no redirect: a 3xx is a non-retryable
  :class:`DeliveryError` naming the status, so a destination cannot send our events (or its
  credentials) somewhere the policy never checked;
* one origin: a request may go to another *path* of the checked URL's origin (HEC's
  acknowledgement endpoint), never to another host or port;
* one ``timeout`` bounds the whole request, connect to last byte: a timer closes the socket at
  the deadline, so a receiver that trickles bytes cannot hold the shipper;
* 408, 429, 5xx and network errors are retryable (``Retry-After`` honoured), other 4xx not.

Messages name the destination by its origin (``https://host:port``) only: a webhook URL's path
or query may carry a token, and no message carries a header value or an event body.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from ..errors import ConfigurationError, DeliveryError
from . import NetworkPolicy, check_regular_file
from ._fields import DEFAULT_TIMEOUT

__all__ = ["HttpsClient", "Response", "raise_for_status"]

# An answer's body is read for diagnosis only (HEC's code); more than this is not needed and a
# receiver must not be able to make us buffer without limit.
_MAX_RESPONSE = 64 * 1024
_RETRYABLE_4XX = frozenset({408, 429})
_MAX_REASON = 64


@dataclass(frozen=True)
class Response:
    """A destination's answer.

    Attributes:
        status: The HTTP status code.
        reason: The status line's reason phrase.
        headers: The headers, names lower-cased (of a repeated one, the last).
        body: At most the first 64 KiB of the body.
        set_cookies: Every ``Set-Cookie`` header's value, in order (``headers`` keeps the last
            only).
    """

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes
    set_cookies: tuple[str, ...] = ()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address, with SNI, certificate and Host for ``host``."""

    def __init__(
        self, host: str, port: int, address: str, *, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        # As http.client's own connect does: headers and body go out in separate writes, and
        # Nagle's algorithm would hold the body for the server's delayed ACK (~40 ms).
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Set before the handshake so that the deadline timer can abort a stalled one.
        self.sock = raw
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class HttpsClient:
    """POSTs to one https URL under a network policy; one request per call, no redirects.

    Args:
        url: The https URL (checked against ``policy`` here: no DNS yet).
        policy: The network policy.
        timeout: Seconds for the whole request.
        ca_file: A PEM bundle of CAs to trust instead of the system's (a private CA).
        what: How messages name the destination (``"webhook"``).

    Raises:
        ConfigurationError: the URL or host is refused, or ``ca_file`` cannot be loaded.
    """

    def __init__(
        self,
        url: str,
        *,
        policy: NetworkPolicy,
        timeout: float = DEFAULT_TIMEOUT,
        ca_file: str | None = None,
        what: str = "destination",
    ) -> None:
        parts = policy.check_url(url, what=f"{what} url")
        assert parts.hostname is not None  # check_url refuses a URL without one
        self.host = parts.hostname
        self.port = parts.port or 443
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.origin = f"https://{host}:{self.port}"
        self.what = what
        self.timeout = timeout
        self._policy = policy
        if ca_file is not None:
            check_regular_file(ca_file, f"{what}: cannot load ca_file")
        try:
            # A fresh context per client: verification on, the system's CAs or the private CA.
            self._tls = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"{what}: cannot load ca_file {ca_file!r} ({type(exc).__name__})"
            ) from None

    def post(self, body: bytes, headers: Mapping[str, str], *, path: str | None = None) -> Response:
        """POST ``body`` and return the answer, whatever its status.

        Args:
            body: The request body.
            headers: The request headers.
            path: Another path on the same origin, in place of the URL's path and query (HEC's
                acknowledgement endpoint beside its event endpoint). Only the request target
                changes: host, port, policy check, pinned address and TLS are the URL's, so
                there is no second URL to parse or check, and none that could differ.

        Raises:
            ValueError: ``path`` is not an absolute path of printable ASCII (a programming
                error: callers pass constants).
            DeliveryError: the host now resolves to an address the policy refuses (not
                retryable); no answer: the name does not resolve, no address takes the
                connection, TLS fails, or the deadline passed (retryable).
        """
        target = self.target if path is None else _checked_path(path)
        deadline = time.monotonic() + self.timeout
        try:
            addresses = self._policy.resolve(
                self.host, self.port, what=f"{self.what} host", timeout=self.timeout
            )
        except ConfigurationError as exc:
            # The name now points somewhere the policy refuses: retrying will not help until
            # its DNS or the policy changes.
            raise DeliveryError(str(exc), retryable=False) from None
        last: BaseException | None = None
        for address in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return self._post_to(address, target, body, headers, remaining)
            except (OSError, http.client.HTTPException) as exc:
                last = exc
                if isinstance(exc, ssl.SSLCertVerificationError):
                    # Another address of the same name will present the same certificate.
                    break
        if last is None or isinstance(last, TimeoutError) or time.monotonic() >= deadline:
            raise DeliveryError(
                f"{self.what} {self.origin} did not answer within {self.timeout:g} s"
            ) from None
        raise DeliveryError(
            f"{self.what} {self.origin}: {_describe(last)}",
        ) from None

    def _post_to(
        self, address: str, target: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Response:
        conn = _PinnedHTTPSConnection(
            self.host, self.port, address, timeout=timeout, context=self._tls
        )
        # Socket timeouts bound each wait, not their sum: the timer bounds the sum by closing
        # the socket at the deadline (a blocked read then fails at once).
        timer = threading.Timer(timeout, _abort, (conn,))
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", target, body=body, headers=dict(headers))
            resp = conn.getresponse()
            data = resp.read(_MAX_RESPONSE)
            return Response(
                status=resp.status,
                reason=resp.reason or "",
                headers={k.lower(): v for k, v in resp.getheaders()},
                body=data,
                set_cookies=tuple(v for k, v in resp.getheaders() if k.lower() == "set-cookie"),
            )
        except (OSError, http.client.HTTPException) as exc:
            if not timer.is_alive():
                # The deadline closed the socket: whatever broke, the cause is the time.
                raise TimeoutError from exc
            raise
        finally:
            timer.cancel()
            conn.close()


def _checked_path(path: str) -> str:
    # Origin-form only ("/a/b"): never "//host/..." or "https://..." (absolute-form, which a
    # server may read as another host), never a space or control character.
    if not path.startswith("/") or path.startswith("//") or not all("!" <= c <= "~" for c in path):
        raise ValueError("path must be an absolute path of printable ASCII")
    return path


def _abort(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: nothing to abort
            sock.shutdown(socket.SHUT_RDWR)


def _describe(exc: BaseException) -> str:
    # The exception's class and errno text only: an SSL or socket message names addresses and
    # certificate fields, never anything we sent.
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"network error ({exc.strerror})"
    return f"network error ({type(exc).__name__})"


def retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or HTTP-date), capped at an
    hour; None when absent or unreadable."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), 3600.0)


def _safe_reason(reason: str) -> str:
    # The reason phrase is the receiver's, and the receiver is the tenant's: it reaches the
    # operator's log, the shipper's last_error and ``audit status``. Printable ASCII only, and
    # short, so it can neither forge a log line nor drive the operator's terminal.
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in reason[:_MAX_REASON])
    return cleaned + ("..." if len(reason) > _MAX_REASON else "")


def raise_for_status(resp: Response, client: HttpsClient, detail: str = "") -> None:
    """Return for a 2xx answer; otherwise raise the :class:`DeliveryError` it means.

    Args:
        resp: The answer.
        client: The client that got it (names the destination).
        detail: What the destination said, already made safe (HEC's code), or "".

    Raises:
        DeliveryError: 3xx (redirects are not followed) and 4xx other than 408 and 429 are not
            retryable; 408, 429 and 5xx are, with ``retry_after`` from ``Retry-After``.
    """
    status = resp.status
    if 200 <= status < 300:
        return
    said = f"{client.what} {client.origin} answered {status} {_safe_reason(resp.reason)}".rstrip()
    if detail:
        said += f" ({detail})"
    if 300 <= status < 400:
        raise DeliveryError(
            f"{said}: a redirect, not followed (set the destination's final URL)",
            retryable=False,
        )
    if status in _RETRYABLE_4XX or 500 <= status < 600:
        raise DeliveryError(said, retryable=True, retry_after=retry_after(resp.headers))
    raise DeliveryError(said, retryable=False)
