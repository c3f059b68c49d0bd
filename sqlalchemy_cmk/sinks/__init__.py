"""Where a tenant's audit events go: one sink per destination kind, built from a JSON spec.

A *destination* is a JSON-ready mapping set by the operator (in code, in the key registry or with
``sqlalchemy-cmk tenants audit ...``), never by the tenant: ``{"kind": "webhook", "url": ...}``.
:func:`check_destination` validates and normalises one without any I/O or secret;
:func:`build_sink` makes the :class:`Sink` that ships batches of :class:`Record` to it.

Credentials in a spec are *references* (``env:NAME``, ``file:/path``, or a scheme the
application registers), resolved when the sink is built; never the secret itself.

Kinds and their optional extras (``pip install "sqlalchemy-cmk[audit-<extra>]"``)::

    webhook        HTTPS POST, each batch signed (HMAC-SHA256 or Ed25519)   (no extra)
    splunk_hec     Splunk HTTP Event Collector                              (no extra)
    otlp_http      OpenTelemetry logs over OTLP/HTTP (the OTel SDK)         audit-otlp
    syslog_tls     RFC 5424 messages, RFC 5425 (TLS) framing                (no extra)
    cloudwatch     AWS CloudWatch Logs                                      audit-aws
    gcp_logging    Google Cloud Logging                                     audit-gcp
    azure_monitor  Azure Monitor Logs ingestion (DCR)                       audit-azure

Network destinations pass a :class:`NetworkPolicy`: https (or TLS) only, no redirects, and no
private, loopback or link-local address unless the policy allows it (tests, on-premises
collectors); an allowlist can limit hosts further.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import socket
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import SplitResult, urlsplit

from ..errors import CMKError, ConfigurationError, DeliveryError

__all__ = [
    "DeliveryError",
    "NetworkPolicy",
    "Record",
    "Sink",
    "SinkEnv",
    "build_sink",
    "check_destination",
    "check_secret_ref",
    "is_public",
    "resolve_secret",
]


@dataclass(frozen=True, slots=True)
class Record:
    """One audit event as shipped to a tenant.

    Attributes:
        id: The stable event id: the same on every re-delivery, so a receiver de-duplicates by it.
        tenant: The tenant it is delivered to.
        time_ns: When the access happened, nanoseconds since the epoch.
        severity: ``"info"`` for an access that was served, ``"warning"`` for a refused one.
        body: The event as canonical JSON (UTF-8), exactly the bytes the tenant's hash chain
            covers (``docs/audit.md``). Sinks send it unchanged, as the message or log body.
    """

    id: str
    tenant: str
    time_ns: int
    severity: str
    body: bytes


@runtime_checkable
class Sink(Protocol):
    """Ships batches of records to one destination.

    ``send`` delivers the whole batch, in order, or raises :class:`DeliveryError` (anything
    else it raises is treated as a retryable DeliveryError). It must return or raise within
    the spec's ``timeout`` (seconds, default 10); one that waits for the destination to confirm
    (``splunk_hec`` with ``ack``) may take its ``ack_timeout`` longer. The shipper calls one sink
    from one thread at a time, and never with more than ``max_batch`` records.
    """

    kind: str
    max_batch: int

    def send(self, records: Sequence[Record]) -> None: ...

    def close(self) -> None: ...


#: Seconds :meth:`NetworkPolicy.resolve` waits for DNS unless told otherwise.
RESOLVE_TIMEOUT = 10.0


@dataclass(frozen=True)
class NetworkPolicy:
    """Which network destinations a sink may reach.

    Attributes:
        allowed_hosts: None: any host whose addresses are public. Otherwise only these host
            names (exact, case-insensitive, or ``*.example.com`` for its subdomains).
        allow_private: Allow loopback, private, link-local and other non-global addresses
            (tests and on-premises collectors). Off by default: an operator's typo, or a
            registry row someone edited, must not make the application POST to its own
            metadata service or admin ports.
    """

    allowed_hosts: frozenset[str] | None = None
    allow_private: bool = False

    def check_url(self, url: str, *, what: str = "destination url") -> SplitResult:
        """Parse an ``https://`` URL and check its host against the allowlist (no DNS).

        Raises:
            ConfigurationError: not a URL, not https, no host, an invalid port, credentials in
                the URL, or a host the allowlist does not name.
        """
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - a port out of range or not a number raises here
        except ValueError:
            # urlsplit's own errors (an unclosed "[", a netloc that NFKC changes) and the
            # port's: the message names the field, not urllib's reading of the value.
            raise ConfigurationError(f"{what} is not a valid URL (its host or port)") from None
        if parts.scheme != "https":
            raise ConfigurationError(f"{what} must be an https:// URL, not {parts.scheme!r}")
        if not parts.hostname:
            raise ConfigurationError(f"{what} has no host")
        if parts.username or parts.password:
            raise ConfigurationError(
                f"{what} carries credentials: give them as a secret reference instead"
            )
        self.check_host(parts.hostname, what=what)
        return parts

    def check_host(self, host: str, *, what: str = "destination host") -> None:
        """Check a host name against the allowlist (no DNS)."""
        if self.allowed_hosts is None:
            return
        name = host.lower().rstrip(".")
        for allowed in self.allowed_hosts:
            a = allowed.lower().rstrip(".")
            if name == a or (a.startswith("*.") and name.endswith(a[1:])):
                return
        raise ConfigurationError(f"{what} host {host!r} is not in the allowlist")

    def resolve(
        self,
        host: str,
        port: int,
        *,
        what: str = "destination host",
        timeout: float = RESOLVE_TIMEOUT,
    ) -> list[str]:
        """The addresses to connect to for ``host``, each checked against the policy.

        Connect to one of these, not to ``host`` again: resolving twice would let a DNS answer
        that changes in between (rebinding) reach an address that was never checked.

        Args:
            timeout: Seconds to wait for the answer (the send's own deadline): the system
                resolver has none of its own that a caller can set, and a tenant's slow DNS
                would otherwise hold a send worker for as long as it likes.

        Raises:
            ConfigurationError: the host is not allowed or resolves to a refused address.
            DeliveryError: the name does not resolve, or not in time (retryable).
        """
        self.check_host(host, what=what)
        infos = _getaddrinfo(host, port, timeout, what)
        addrs: list[str] = []
        for info in infos:
            addr = str(info[4][0])
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
            if not self.allow_private and not is_public(ip):
                raise ConfigurationError(
                    f"{what} {host!r} resolves to the non-public address {addr}: refused "
                    "(NetworkPolicy(allow_private=True) allows it, for tests and on-premises "
                    "collectors)"
                )
            if addr not in addrs:
                addrs.append(addr)
        return addrs


def _getaddrinfo(host: str, port: int, timeout: float, what: str) -> list[Any]:
    """``socket.getaddrinfo`` given up after ``timeout`` seconds. The lookup runs in a thread
    of its own, left to finish by itself when it is late: getaddrinfo cannot be interrupted."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:  # an address: nothing to ask DNS
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    answer: list[Any] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            answer.append(exc)
        finally:
            done.set()

    threading.Thread(target=lookup, name="cmk-audit-resolve", daemon=True).start()
    if not done.wait(max(timeout, 0.0)):
        raise DeliveryError(f"{what} {host!r} did not resolve within {timeout:g} s")
    if isinstance(answer[0], OSError):
        raise DeliveryError(f"{what} {host!r} does not resolve: {answer[0]}") from None
    return list(answer[0])


# IPv6 prefixes whose addresses carry an IPv4 address in their last 32 bits, for a translator
# or a tunnel to reach: NAT64's well-known prefix (RFC 6052; DNS64 answers with it on IPv6-only
# networks) and IPv4-compatible addresses (deprecated, still parsed and routed by some).
_EMBEDS_IPV4_LOW32 = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::/96"),
)
# Never public though ``ipaddress`` says global: NAT64's local-use prefix (RFC 8215, not
# globally reachable per IANA) and the deprecated site-local prefix (RFC 3879).
_NOT_PUBLIC_V6 = (
    ipaddress.IPv6Network("64:ff9b:1::/48"),
    ipaddress.IPv6Network("fec0::/10"),
)


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is a public address, and so is every address it stands for.

    ``ipaddress``'s ``is_global`` alone calls ``64:ff9b::a9fe:a9fe`` global, but a NAT64
    translator sends it to 169.254.169.254 (the cloud metadata service); likewise 6to4 and
    IPv4-compatible addresses. Those are judged by the IPv4 address they embed.
    """
    if not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return True
    if any(ip in net for net in _NOT_PUBLIC_V6):
        return False
    embedded: list[ipaddress.IPv4Address] = []
    if any(ip in net for net in _EMBEDS_IPV4_LOW32):
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for v4 in (ip.ipv4_mapped, ip.sixtofour):
        if v4 is not None:
            embedded.append(v4)
    return all(v4.is_global for v4 in embedded)


SecretResolver = Callable[[str], bytes]

# env:NAME, file:/absolute/path, or <scheme>:<rest> of a resolver the application registers.
# Anything else is taken for a secret pasted where its reference belongs (a token with a colon
# in it, "Bearer abc:def"): refused, and never repeated in a message.
_REF = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*|file:/\S+|(?!env:|file:)[a-z][a-z0-9+.-]{0,31}:\S+")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
# A secret file is a key, a token or a service account's JSON: kilobytes. More is a mistake
# (or a registry row pointing at a log file), and is refused unread.
MAX_SECRET_FILE = 1024 * 1024


def is_secret_ref(value: object) -> bool:
    """Whether ``value`` has the form of a secret reference (see :func:`resolve_secret`)."""
    return isinstance(value, str) and "-----BEGIN" not in value and bool(_REF.fullmatch(value))


def check_secret_ref(value: object, what: str) -> str:
    """``value`` if it has the form of a secret reference (no I/O, nothing resolved).

    Args:
        value: The field's value.
        what: The field, for the message (``"splunk_hec destination field 'token'"``).

    Raises:
        ConfigurationError: naming ``what``, never the value (it may be the secret itself).
    """
    if not is_secret_ref(value):
        raise ConfigurationError(
            f"{what} must be a secret reference (env:NAME, file:/path or a registered "
            "scheme), never the secret itself"
        )
    assert isinstance(value, str)
    return value


def _shown_ref(ref: str) -> str:
    # env:NAME and file:/path name where the secret is, and are shown; of anything else the
    # scheme at most (the rest may be the secret itself, pasted where a reference belongs).
    if ref.startswith(("env:", "file:/")) and _REF.fullmatch(ref):
        return repr(ref)
    scheme = ref.partition(":")[0]
    return f"with the scheme {scheme!r}" if _SCHEME.fullmatch(scheme) else "(not shown)"


# A CA bundle (the system's is a few hundred KiB) or a certificate chain.
MAX_CERT_FILE = 16 * 1024 * 1024


def check_regular_file(path: str, what: str, max_bytes: int = MAX_CERT_FILE) -> None:
    """Refuse a path that is not a regular file of at most ``max_bytes``, before OpenSSL reads it.

    OpenSSL reads a CA or certificate file whole: a FIFO would block the thread that builds the
    sink (the shipper's) for good, and ``/dev/zero`` never ends.

    Raises:
        ConfigurationError: naming ``what`` and the path, never the file's content.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigurationError(
            f"{what} {path!r}: cannot read the file ({exc.strerror})"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigurationError(f"{what} {path!r}: not a regular file")
    if st.st_size > max_bytes:
        raise ConfigurationError(f"{what} {path!r}: the file is larger than {max_bytes} bytes")


def _read_secret_file(ref: str, path: str) -> bytes:
    # O_NONBLOCK: opening a FIFO for reading would wait for a writer, for ever. Only a regular
    # file is read, and only so much of it: /dev/zero or a log file must not fill the memory.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(
            f"secret reference {ref!r}: cannot read the file ({exc.strerror})"
        ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"secret reference {ref!r}: not a regular file")
        if st.st_size > MAX_SECRET_FILE:
            raise ConfigurationError(
                f"secret reference {ref!r}: the file is larger than {MAX_SECRET_FILE} bytes"
            )
        try:
            data = f.read(MAX_SECRET_FILE + 1)
        except OSError as exc:
            raise ConfigurationError(
                f"secret reference {ref!r}: cannot read the file ({exc.strerror})"
            ) from None
    if len(data) > MAX_SECRET_FILE:  # grew since the fstat
        raise ConfigurationError(
            f"secret reference {ref!r}: the file is larger than {MAX_SECRET_FILE} bytes"
        )
    return data.strip()


def resolve_secret(ref: str, resolvers: Mapping[str, SecretResolver] | None = None) -> bytes:
    """The secret a reference names: ``env:NAME``, ``file:/path`` (an absolute path to a
    regular file of at most 1 MiB) or ``<scheme>:...`` of a resolver the application registers
    (a secret manager's client, say).

    Raises:
        ConfigurationError: not a reference, an unknown scheme, an unset variable, an
            unreadable file, a resolver that raised (named by its class). The message names
            an ``env:`` or ``file:`` reference, of any other the scheme only, and never the
            secret.
    """
    if not is_secret_ref(ref):
        raise ConfigurationError(
            f"secret reference {_shown_ref(ref) if isinstance(ref, str) else ''} must look "
            "like env:NAME, file:/path or <scheme>:... (never the secret itself)"
        )
    scheme, _, rest = ref.partition(":")
    if resolvers and scheme in resolvers:
        try:
            return resolvers[scheme](rest)
        except CMKError:
            raise  # the application's own, already fit to show
        except Exception as exc:
            # A secret manager's client may quote what it read, or its own token: its class
            # only, at this one boundary.
            raise ConfigurationError(
                f"secret reference {_shown_ref(ref)}: its resolver failed ({type(exc).__name__})"
            ) from None
    if scheme == "env":
        value = os.environ.get(rest)
        if not value:
            raise ConfigurationError(f"secret reference {ref!r}: the variable is not set")
        return value.encode()
    if scheme == "file":
        return _read_secret_file(ref, rest)
    raise ConfigurationError(
        f"secret reference {_shown_ref(ref)} has an unknown scheme; known: env, file"
        + "".join(f", {s}" for s in sorted(resolvers or ()))
    )


@dataclass(frozen=True)
class SinkEnv:
    """What a sink is built with besides its spec.

    Attributes:
        policy: The network policy every network destination passes.
        secret_resolvers: Extra secret-reference schemes (see :func:`resolve_secret`).
        clients: SDK clients or factories by kind, for tests and unusual set-ups (a boto3
            ``logs`` client with its own endpoint, say); a sink without one makes its own.
    """

    policy: NetworkPolicy = field(default_factory=NetworkPolicy)
    secret_resolvers: Mapping[str, SecretResolver] = field(default_factory=dict)
    clients: Mapping[str, Any] = field(default_factory=dict)

    def secret(self, ref: str) -> bytes:
        return resolve_secret(ref, self.secret_resolvers)


# kind -> (module, extra). Each module has ``check(spec) -> dict`` (validate and normalise,
# no I/O, no secrets) and ``build(spec, env) -> Sink``.
_KINDS: dict[str, tuple[str, str | None]] = {
    "webhook": ("sqlalchemy_cmk.sinks.webhook", None),
    "splunk_hec": ("sqlalchemy_cmk.sinks.splunk", None),
    "otlp_http": ("sqlalchemy_cmk.sinks.otlp", "audit-otlp"),
    "syslog_tls": ("sqlalchemy_cmk.sinks.syslog", None),
    "cloudwatch": ("sqlalchemy_cmk.sinks.cloudwatch", "audit-aws"),
    "gcp_logging": ("sqlalchemy_cmk.sinks.gcp_logging", "audit-gcp"),
    "azure_monitor": ("sqlalchemy_cmk.sinks.azure_monitor", "audit-azure"),
}


def _module(spec: Mapping[str, Any]) -> Any:
    if not isinstance(spec, Mapping):
        raise ConfigurationError("an audit destination is a mapping with a 'kind'")
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise ConfigurationError(
            f"audit destination kind {kind!r} is unknown; known: {', '.join(sorted(_KINDS))}"
        )
    name, extra = _KINDS[kind]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if extra is None or (exc.name or "").startswith("sqlalchemy_cmk"):
            raise
        raise ConfigurationError(
            f"audit destination kind {kind!r} needs an optional extra: "
            f'pip install "sqlalchemy-cmk[{extra}]" ({exc.name} is missing)'
        ) from None


def check_destination(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise one destination spec, with no I/O and no secret resolved.

    Every kind takes an optional ``name`` (letters, digits, ``-_.``; default: the kind): the
    shipper keeps each destination's delivery position under it, so changing a destination's
    other settings (a new URL) continues where it left off, and a new name starts afresh.

    Raises:
        ConfigurationError: naming the field to fix.
    """
    mod = _module(spec)
    rest = dict(spec)
    name = rest.pop("name", None)
    checked: dict[str, Any] = mod.check(rest)
    if name is not None:
        if not (
            isinstance(name, str)
            and 0 < len(name) <= 64
            and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
        ):
            raise ConfigurationError(
                "a destination's name must be 1 to 64 ASCII letters, digits, '-', '_' or '.'"
            )
        checked["name"] = name
    return checked


def destination_name(spec: Mapping[str, Any]) -> str:
    """The name a checked destination is delivered under (its ``name``, else its kind)."""
    return str(spec.get("name") or spec["kind"])


def build_sink(spec: Mapping[str, Any], env: SinkEnv | None = None) -> Sink:
    """The sink for one destination spec (checked first).

    Raises:
        ConfigurationError: a bad spec, a missing extra or an unresolvable secret reference.
    """
    mod = _module(spec)
    checked = check_destination(spec)
    checked.pop("name", None)
    sink: Sink = mod.build(checked, env or SinkEnv())
    return sink


def batches(records: Sequence[Record], size: int) -> list[Sequence[Record]]:
    """``records`` in slices of at most ``size``."""
    return [records[i : i + size] for i in range(0, len(records), size)]
