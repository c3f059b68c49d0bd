"""AWS KMS: each tenant's master key is a KMS key in the tenant's own AWS account.

Key references are ``aws-kms://`` followed by the key's ARN, or an alias ARN::

    aws-kms://arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab
    aws-kms://arn:aws:kms:eu-west-1:111122223333:alias/acme-app-data

Full ARNs only (not bare key ids or alias names): the region picks the client, and AWS requires
an ARN to use a key of another account. A data key is wrapped with KMS ``Encrypt`` and unwrapped
with ``Decrypt`` (always naming ``KeyId``), both with the ``EncryptionContext``
``{"tenant": ..., "data_label": ...}``: KMS binds the wrapped key to it, and the tenant's CloudTrail
records it with each call, so the tenant sees which of its tenants and what kind of data every
use of its key was for.

Because :meth:`AwsKmsProvider.unwrap_key` only gets ``{"tenant": ...}``, the wrapped bytes record
the exact context sent to ``Encrypt``. Layout (version 1, integers big-endian)::

    offset  size  field
    0       1     version, 0x01
    1       2     C: length of the encryption context, 1..2000
    3       C     the EncryptionContext sent to KMS, canonical JSON: an object of strings with
                  "tenant", sorted keys, no whitespace, UTF-8
    3+C     2     B: length of the KMS ciphertext blob, 1..6144
    5+C     B     the CiphertextBlob that KMS Encrypt returned
                  (nothing follows: the total length is exactly 5 + C + B)

Unwrap parses this strictly, checks the recorded tenant against the caller's before calling KMS,
and sends the recorded context back; KMS refuses (``InvalidCiphertextException``) a context that
was altered. Any malformation is the same opaque :class:`~sqlalchemy_cmk.errors.DecryptionError`.

Clients: pass one boto3 KMS client (``client=``), or ``client_factory(region) -> client`` when
tenants' keys are in several regions (one client per region, made on first use and kept), or use
:meth:`AwsKmsProvider.from_session`, which builds clients whose timeouts derive from the CMK's
``kms_deadline`` and that never retry on their own (the core ``KeyManager`` retries transient
errors itself, with backoff, until the deadline; retries at both levels would multiply).

Timeouts (:func:`kms_client_config`): botocore sets them per client, not per call, so they are
derived once, when a client is built, from a deadline ``D``: connect ``min(2, D / 5)`` seconds,
read ``D / 2``, botocore's attempts 1. A call that hangs then ends on its own well within the
deadline, and the core has time left for another attempt on a fresh connection; with CMK's
default ``kms_deadline=10`` that is 2 s and 5 s. ``D`` is ``from_session(kms_deadline=...)`` when
given, else the deadline of the CMK call during which the region's client is built (its first
use), else 10.
"""

from __future__ import annotations

import json
import math
import re
import ssl
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

try:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]
    from botocore.exceptions import (  # type: ignore[import-untyped]
        BotoCoreError,
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import SSLError as BotoSSLError
except ImportError as exc:  # pragma: no cover - exercised by a test that hides boto3
    raise ImportError(
        "the AWS KMS provider needs boto3; install it with: pip install 'sqlalchemy-cmk[aws]'"
    ) from exc

from ..errors import (
    ConfigurationError,
    DecryptionError,
    KeyAccessDeniedError,
    KeyAccessError,
    KeyNotFoundError,
    KMSUnavailableError,
)
from . import call_timeout

__all__ = ["AwsKmsProvider", "kms_client_config"]

_SCHEME = "aws-kms"
_PREFIX = "aws-kms://"
_VERSION = 1
_MAX_CONTEXT = 2000  # with the largest blob, 5 + 2000 + 6144 fits the envelope's 8192
_MAX_BLOB = 6144  # KMS's documented maximum CiphertextBlob size
_U16 = struct.Struct(">H")
_DEFAULT_DEADLINE = 10.0  # CMK's default kms_deadline
# Clients outlive the call that builds them: never derive their timeouts from less than this.
_MIN_DERIVED_DEADLINE = 1.0
# arn:<partition>:kms:<region>:<12-digit account>:key/<key id> or :alias/<alias name>
_ARN = re.compile(
    r"arn:(?P<partition>aws(?:-[a-z]+)*):kms:(?P<region>[a-z]{2,4}(?:-[a-z]+)+-\d+):"
    r"(?P<account>\d{12}):(?:key/(?:mrk-[0-9a-f]{32}|[0-9a-fA-F-]{36})|alias/[A-Za-z0-9/_-]{1,250})"
)

# AWS error codes, by what they mean for the tenant's key.
_DECRYPTION_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_NOT_FOUND_CODES = frozenset({"NotFoundException", "InvalidArnException"})
_DENIED_CODES = frozenset(
    {
        "DisabledException",  # the tenant disabled the key
        "KMSInvalidStateException",  # pending deletion, pending import, unavailable key store
        "AccessDeniedException",  # key policy, grant or IAM does not allow this caller
        "AccessDenied",
    }
)
# The application's own credentials were refused: a forbidden caller, as far as the key goes.
_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "InvalidClientTokenId",
    }
)
_UNAVAILABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",  # "You can retry the request", says the API reference
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "TooManyRequestsException",
    }
)
_CONFIG_CODES = frozenset(
    {"InvalidKeyUsageException", "UnsupportedOperationException", "ValidationException"}
)


def kms_client_config(
    *,
    kms_deadline: float = _DEFAULT_DEADLINE,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    max_attempts: int = 1,
    max_pool_connections: int = 16,
) -> Any:
    """A ``botocore.config.Config`` for KMS clients used by this provider.

    Timeouts derived from the CMK's ``kms_deadline`` instead of botocore's 60 s, and by default
    no SDK-level retry (``total_max_attempts=1``): the core retries transient errors with
    backoff until the deadline, and retries at both levels would multiply. The pool fits the
    core's default ``max_concurrency`` of 16 parallel unwraps.

    Args:
        kms_deadline: The ``kms_deadline`` of the CMK using the client, seconds.
        connect_timeout: Seconds to establish a connection; by default
            ``min(2, kms_deadline / 5)``.
        read_timeout: Seconds to wait for a response; by default ``kms_deadline / 2``.
        max_attempts: Attempts per call made by botocore itself, including the first.
        max_pool_connections: HTTP connections kept per client.

    Raises:
        ConfigurationError: a deadline or timeout that is not positive, a timeout longer than
            the deadline (the call would outlive it), ``max_attempts`` or the pool below 1.
    """
    if not kms_deadline > 0:
        raise ConfigurationError("kms_client_config needs a positive kms_deadline")
    if connect_timeout is None:
        connect_timeout = min(2.0, kms_deadline / 5)
    if read_timeout is None:
        read_timeout = kms_deadline / 2
    if (
        not 0 < connect_timeout <= kms_deadline
        or not 0 < read_timeout <= kms_deadline
        or max_attempts < 1
        or max_pool_connections < 1
    ):
        raise ConfigurationError(
            "kms_client_config needs timeouts in (0, kms_deadline], max_attempts >= 1 and a "
            "pool >= 1"
        )
    return Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max_pool_connections,
    )


def _encode_context(context: Mapping[str, str]) -> bytes:
    return json.dumps(
        dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def _pack(context: Mapping[str, str], blob: bytes) -> bytes:
    ctx = _encode_context(context)
    return b"".join((bytes([_VERSION]), _U16.pack(len(ctx)), ctx, _U16.pack(len(blob)), blob))


def _unpack(wrapped: bytes) -> tuple[dict[str, str], bytes] | None:
    """Split wrapped bytes into (recorded context, ciphertext blob); None if malformed."""
    if len(wrapped) < 5 or wrapped[0] != _VERSION:
        return None
    (c,) = _U16.unpack_from(wrapped, 1)
    if not 1 <= c <= _MAX_CONTEXT or len(wrapped) < 5 + c:
        return None
    raw = wrapped[3 : 3 + c]
    (b,) = _U16.unpack_from(wrapped, 3 + c)
    if not 1 <= b <= _MAX_BLOB or len(wrapped) != 5 + c + b:
        return None
    try:
        ctx = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if (
        not isinstance(ctx, dict)
        or not all(isinstance(v, str) for v in ctx.values())
        or not isinstance(ctx.get("tenant"), str)
        or _encode_context(ctx) != raw  # canonical only: one context, one encoding
    ):
        return None
    return ctx, wrapped[5 + c :]


class AwsKmsProvider:
    """Wraps data keys with AWS KMS ``Encrypt``/``Decrypt`` under the tenant's KMS key.

    Args:
        client: A boto3 KMS client (``boto3.client("kms", ...)``), used for every key; keys in
            another region than the client's are refused with ``ConfigurationError``.
        client_factory: Instead of ``client``, ``region -> client``; called once per region, on
            first use, and its clients kept (boto3 clients are thread-safe).

    Raises:
        ConfigurationError: neither or both of ``client`` and ``client_factory``.
    """

    scheme = _SCHEME

    def __init__(
        self,
        client: Any = None,
        *,
        client_factory: Callable[[str], Any] | None = None,
    ) -> None:
        if (client is None) == (client_factory is None):
            raise ConfigurationError(
                "AwsKmsProvider needs exactly one of client= or client_factory="
            )
        self._client = client
        self._factory = client_factory
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        if self._client is not None:
            region = getattr(getattr(self._client, "meta", None), "region_name", None)
            return f"AwsKmsProvider(client=<kms {region}>)"
        with self._lock:
            regions = sorted(self._clients)
        return f"AwsKmsProvider(client_factory=..., regions={regions!r})"

    @classmethod
    def from_session(
        cls,
        session: Any = None,
        *,
        endpoint_url: str | None = None,
        kms_deadline: float | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_attempts: int = 1,
        max_pool_connections: int = 16,
    ) -> AwsKmsProvider:
        """A provider making one client per region from a boto3 session, bounded by the deadline.

        Args:
            session: A ``boto3.session.Session`` holding the application's credentials (for
                example from an assumed role); by default a new session with boto3's default
                credential chain (environment, config files, container or instance role).
            endpoint_url: A KMS endpoint for every region (a VPC endpoint, a test server);
                by default each region's public endpoint.
            kms_deadline: The deadline the clients' timeouts derive from (see
                :func:`kms_client_config`). By default, the ``kms_deadline`` of the CMK call
                that first uses a region (what is left of it, at least 1 s), or 10 s when the
                provider is called outside a CMK.
            connect_timeout, read_timeout, max_attempts, max_pool_connections: See
                :func:`kms_client_config`.

        Raises:
            ConfigurationError: limits out of range (checked at once when ``kms_deadline`` is
                given, else when a client is built).
        """
        options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "max_attempts": max_attempts,
            "max_pool_connections": max_pool_connections,
        }
        if kms_deadline is not None:
            kms_client_config(kms_deadline=kms_deadline, **options)  # fail at start-up
        sess = session if session is not None else boto3.session.Session()

        def factory(region: str) -> Any:
            deadline = kms_deadline
            if deadline is None:
                left = call_timeout(math.inf)  # inside a CMK call: what is left of its deadline
                deadline = _DEFAULT_DEADLINE if left == math.inf else left
                deadline = max(deadline, _MIN_DERIVED_DEADLINE)
            config = kms_client_config(kms_deadline=deadline, **options)
            return sess.client("kms", region_name=region, endpoint_url=endpoint_url, config=config)

        return cls(client_factory=factory)

    @staticmethod
    def parse_key_ref(key_ref: str) -> tuple[str, str]:
        """Split an ``aws-kms://`` key reference into (the ARN sent as ``KeyId``, its region).

        Raises:
            ConfigurationError: not ``aws-kms://arn:<partition>:kms:<region>:<account>:key/<id>``
                nor ``...:alias/<name>``.
        """
        match = _ARN.fullmatch(key_ref[len(_PREFIX) :]) if key_ref.startswith(_PREFIX) else None
        if match is None:
            raise ConfigurationError(
                f"{key_ref!r} is not an AWS KMS key reference; expected "
                "aws-kms://arn:aws:kms:<region>:<account>:key/<key id> or ...:alias/<name>",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        return match.group(0), match.group("region")

    # -- the protocol ----------------------------------------------------------------------------

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        key_id, client = self._resolve(key_ref, context)
        if len(_encode_context(context)) > _MAX_CONTEXT:
            raise ConfigurationError(
                f"the encryption context exceeds {_MAX_CONTEXT} bytes; shorten the tenant id or "
                "data label",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        try:
            response = client.encrypt(
                KeyId=key_id, Plaintext=data_key, EncryptionContext=dict(context)
            )
        except Exception as exc:
            _raise_mapped(exc, key_ref, "Encrypt")
        blob = response.get("CiphertextBlob") if isinstance(response, dict) else None
        if not isinstance(blob, bytes) or not 1 <= len(blob) <= _MAX_BLOB:
            raise KeyAccessError(
                "AWS KMS Encrypt returned no usable ciphertext blob",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        return _pack(context, blob)

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        key_id, client = self._resolve(key_ref, context)
        parsed = _unpack(wrapped)
        # Every entry the caller gives (always the tenant) must be the one recorded at wrap time;
        # KMS then checks the recorded context itself.
        if parsed is None or any(parsed[0].get(k) != v for k, v in context.items()):
            raise DecryptionError(
                "wrapped key is malformed or bound to another context",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        recorded, blob = parsed
        try:
            response = client.decrypt(KeyId=key_id, CiphertextBlob=blob, EncryptionContext=recorded)
        except Exception as exc:
            _raise_mapped(exc, key_ref, "Decrypt")
        plaintext = response.get("Plaintext") if isinstance(response, dict) else None
        if not isinstance(plaintext, bytes) or not plaintext:
            raise KeyAccessError(
                "AWS KMS Decrypt returned no plaintext", key_ref=key_ref, provider=_SCHEME
            )
        return plaintext

    # -- helpers -------------------------------------------------------------------------------

    def _resolve(self, key_ref: str, context: Mapping[str, str]) -> tuple[str, Any]:
        """Return (the ARN to send as KeyId, the client for its region)."""
        tenant = context.get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise ConfigurationError(
                "the context must hold a non-empty tenant", key_ref=key_ref, provider=_SCHEME
            )
        arn, region = self.parse_key_ref(key_ref)
        return arn, self._client_for(region, key_ref)

    def _client_for(self, region: str, key_ref: str) -> Any:
        if self._client is not None:
            client_region = getattr(getattr(self._client, "meta", None), "region_name", None)
            if client_region != region:
                raise ConfigurationError(
                    f"key {key_ref!r} is in region {region} but the KMS client is for "
                    f"{client_region}; give AwsKmsProvider a client_factory for several regions",
                    key_ref=key_ref,
                    provider=_SCHEME,
                )
            return self._client
        with self._lock:  # boto3 sessions are not thread-safe: make clients one at a time
            client = self._clients.get(region)
            if client is None:
                assert self._factory is not None
                client = self._clients[region] = self._factory(region)
            return client


def _summary(message: object) -> str:
    # AWS's error messages name ARNs, principals and actions (useful to diagnose a grant), never
    # key material; still keep them short and on one line.
    text = " ".join(str(message or "").split())
    return text[:300]


# ssl errors of a connection that broke mid-handshake (EOF, reset): transient, unlike a refusal.
_TLS_TRANSIENT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _tls_refused(exc: BaseException) -> bool:
    """Whether an ``ssl.SSLError`` other than a broken connection lies behind ``exc``."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return not isinstance(current, _TLS_TRANSIENT)
        # botocore keeps urllib3's error in kwargs["error"], urllib3 its own in .reason.
        kwargs = getattr(current, "kwargs", None)
        todo += [current.__cause__, current.__context__, getattr(current, "reason", None)]
        todo += [*current.args, *(kwargs.values() if isinstance(kwargs, dict) else ())]
    return False


def _raise_mapped(exc: Exception, key_ref: str, operation: str) -> NoReturn:
    """The one place where AWS and botocore errors become ours, most specific first."""
    kw: dict[str, Any] = {"key_ref": key_ref, "provider": _SCHEME}
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        detail = f"AWS KMS {operation}: {code}"
        if code in _DECRYPTION_CODES:
            raise DecryptionError(
                f"AWS KMS could not decrypt the wrapped key ({code})", **kw
            ) from exc
        if code in _NOT_FOUND_CODES:
            raise KeyNotFoundError(f"{detail}: {_summary(error.get('Message'))}", **kw) from exc
        if code in _DENIED_CODES:
            raise KeyAccessDeniedError(f"{detail}: {_summary(error.get('Message'))}", **kw) from exc
        if code in _CREDENTIAL_CODES:
            raise KeyAccessDeniedError(
                f"{detail}: the application's AWS credentials were refused", **kw
            ) from exc
        if code in _UNAVAILABLE_CODES or status == 429 or status >= 500:
            raise KMSUnavailableError(f"{detail} (HTTP {status})", **kw) from exc
        if code in _CONFIG_CODES:
            hint = (
                "the request is invalid"
                if code == "ValidationException"
                else "the key must be a symmetric ENCRYPT_DECRYPT KMS key"
            )
            raise ConfigurationError(
                f"{detail}: {_summary(error.get('Message'))}; {hint}", **kw
            ) from exc
        if status == 403:
            raise KeyAccessDeniedError(f"{detail} (HTTP 403)", **kw) from exc
        raise KeyAccessError(f"{detail} (HTTP {status}): unexpected error", **kw) from exc
    if isinstance(exc, BotoSSLError) and _tls_refused(exc):
        # The certificate or the TLS handshake was refused: configuration, no retry cures it.
        error = KMSUnavailableError(
            f"AWS KMS {operation}: TLS failed: {_summary(exc)}; check the endpoint and its "
            "certificate",
            **kw,
        )
        error.retryable = False
        raise error from exc
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError,
        # SSLError, ProxyConnectionError.
        raise KMSUnavailableError(
            f"AWS KMS {operation}: {type(exc).__name__}: {_summary(exc)}", **kw
        ) from exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, NoRegionError)):
        raise ConfigurationError(
            f"AWS KMS {operation}: {type(exc).__name__}: configure the application's AWS "
            "credentials and region",
            **kw,
        ) from exc
    if isinstance(exc, BotoCoreError):
        raise KeyAccessError(f"AWS KMS {operation}: {type(exc).__name__}", **kw) from exc
    raise exc  # not an AWS error: a bug, let it through unchanged
