"""Google Cloud KMS: data keys wrapped by a tenant's symmetric CryptoKey.

Key references are ``gcp-kms://projects/<project>/locations/<location>/keyRings/<ring>/cryptoKeys/
<key>``: a CryptoKey, never one of its versions. Cloud KMS encrypts under the key's primary
version and decrypts with the version recorded in the ciphertext, so a tenant may rotate its key
without telling anyone.

Each wrap sends the wrap context (the tenant, and the data label when there is one) as
``additional_authenticated_data``; Cloud KMS binds it to the ciphertext, so a wrapped key of one
tenant never unwraps as another's. Unwrap only gets ``{"tenant": ...}``, so the context is
recorded in the wrapped bytes (see ``_encode``)::

    offset  size  field
    0       1     version, 0x01
    1       2     A: length of the AAD, big-endian (1..65535)
    3       A     AAD: canonical JSON ["sqlalchemy-cmk/gcp-kms/v1", {context, sorted}]
    3 + A   rest  Cloud KMS ciphertext (1..66560 bytes: 64 KiB plus overhead)

The client library does not check the CRC32C integrity fields of Cloud KMS; this module does, in
both directions: it sends ``plaintext_crc32c``/``ciphertext_crc32c`` and
``additional_authenticated_data_crc32c``, requires the ``verified_*`` flags on the encrypt
response, and compares ``ciphertext_crc32c``/``plaintext_crc32c`` of the responses with the
bytes received. A mismatch is data corrupted in transit: ``KMSUnavailableError`` (retryable).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Mapping
from typing import Any, NoReturn

try:
    import google_crc32c
    from google.api_core import exceptions as gexc
    from google.api_core.client_options import ClientOptions
    from google.auth import exceptions as auth_exc
    from google.auth.credentials import Credentials
    from google.cloud import kms
    from google.cloud.kms_v1.services.key_management_service.transports import (
        KeyManagementServiceGrpcTransport,
    )
except ImportError as exc:
    raise ImportError(
        "the Google Cloud KMS provider needs google-cloud-kms and google-crc32c; install them "
        "with: pip install 'sqlalchemy-cmk[gcp]'"
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

__all__ = ["DEFAULT_TIMEOUT", "GcpKmsProvider"]

_SCHEME = "gcp-kms"
_PREFIX = "gcp-kms://"
_WRAP_VERSION = 1
_AAD_LABEL = "sqlalchemy-cmk/gcp-kms/v1"
_HEADER = struct.Struct(">BH")  # version, AAD length
_MAX_AAD = 65535  # Cloud KMS accepts up to 64 KiB of AAD; the length field holds 65535
_MAX_CIPHERTEXT = 65536 + 1024  # 64 KiB of plaintext plus Cloud KMS's overhead
_KEY_NAME = re.compile(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+")
#: Seconds each Encrypt/Decrypt call may take, connecting included (the SDK's default is 60).
DEFAULT_TIMEOUT = 5.0
_MALFORMED = "wrapped key is malformed, corrupt or bound to another tenant"
# gRPC's wording for a handshake the TLS library refused (not one the network cut short).
_TLS_REFUSED = re.compile(r"handshake failed.*SSL_ERROR_SSL", re.IGNORECASE | re.DOTALL)

_log = logging.getLogger(__name__)
# The SDK's transports log whole requests and responses (the data key among them) at DEBUG.
_SDK_PAYLOAD_LOGGERS = tuple(
    logging.getLogger(f"google.cloud.kms_v1.services.key_management_service.transports.{t}")
    for t in ("grpc", "rest")
)


def _crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


def _key_name(key_ref: str) -> str:
    name = key_ref[len(_PREFIX) :] if key_ref.startswith(_PREFIX) else ""
    if not _KEY_NAME.fullmatch(name):
        raise KeyNotFoundError(
            f"{key_ref!r} is not a Cloud KMS key reference; expected "
            "gcp-kms://projects/<project>/locations/<location>/keyRings/<ring>/cryptoKeys/<key> "
            "(a CryptoKey, not a CryptoKeyVersion)",
            key_ref=key_ref,
            provider=_SCHEME,
        )
    return name


def _aad(context: Mapping[str, str]) -> bytes:
    # Canonical JSON (sorted keys, no spaces, ASCII): unambiguous, and readable if it is ever
    # shown. Unwrap requires the recorded AAD in exactly this form: changing the encoding needs a
    # new wrap version (tests pin it).
    return json.dumps([_AAD_LABEL, dict(context)], sort_keys=True, separators=(",", ":")).encode()


def _encode(aad: bytes, ciphertext: bytes) -> bytes:
    return _HEADER.pack(_WRAP_VERSION, len(aad)) + aad + ciphertext


def _decode(wrapped: bytes, tenant: str) -> tuple[bytes, bytes]:
    """Split the wrapped bytes into (AAD, ciphertext); ValueError unless well formed for tenant."""
    if len(wrapped) <= _HEADER.size:
        raise ValueError("short")
    version, aad_len = _HEADER.unpack_from(wrapped)
    aad = wrapped[_HEADER.size : _HEADER.size + aad_len]
    ciphertext = wrapped[_HEADER.size + aad_len :]
    if (
        version != _WRAP_VERSION
        or len(aad) != aad_len
        or not 0 < len(ciphertext) <= _MAX_CIPHERTEXT
    ):
        raise ValueError("layout")
    doc = json.loads(aad.decode())
    if not (isinstance(doc, list) and len(doc) == 2 and doc[0] == _AAD_LABEL):
        raise ValueError("label")
    recorded = doc[1]
    if not (
        isinstance(recorded, dict)
        and all(isinstance(v, str) for v in recorded.values())
        and recorded.get("tenant") == tenant
        and _aad(recorded) == aad
    ):
        raise ValueError("context")
    return aad, ciphertext


class GcpKmsProvider:
    """Wraps data keys with Cloud KMS ``Encrypt`` and unwraps them with ``Decrypt``.

    The client is injected, so the caller chooses endpoint, credentials and transport::

        from google.cloud import kms
        provider = GcpKmsProvider(kms.KeyManagementServiceClient())

    or built by :meth:`from_credentials`. Each call has a deadline of ``timeout`` seconds and no
    SDK retry by default: ``CMK``'s key manager retries ``KMSUnavailableError`` with backoff
    under an overall deadline, and retries in both places would multiply.

    The application's service account needs ``roles/cloudkms.cryptoKeyEncrypterDecrypter`` on
    each tenant's key; see docs/providers/gcp.md.
    """

    scheme = _SCHEME

    def __init__(
        self,
        client: Any,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: Any = None,
    ) -> None:
        """Args:
            client: A ``google.cloud.kms.KeyManagementServiceClient`` (or one of the same shape).
            timeout: Deadline of each Encrypt/Decrypt call in seconds, connecting included.
            retry: A ``google.api_core.retry.Retry`` for the SDK to apply, or None (the
                default) for no SDK retry.

        Raises:
            ConfigurationError: no client, or a timeout that is not a positive number.
        """
        if client is None:
            raise ConfigurationError(
                "GcpKmsProvider needs a KeyManagementServiceClient; or use "
                "GcpKmsProvider.from_credentials()"
            )
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
            raise ConfigurationError("GcpKmsProvider timeout must be in (0, 600] seconds")
        self._client = client
        self._timeout = float(timeout)
        self._retry = retry
        self._warned_sdk_logging = False

    @classmethod
    def from_credentials(
        cls,
        credentials: Credentials | None = None,
        *,
        api_endpoint: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        quota_project_id: str | None = None,
        root_certificates: bytes | None = None,
    ) -> GcpKmsProvider:
        """Build a provider with its own ``KeyManagementServiceClient`` (gRPC over TLS).

        Args:
            credentials: Google credentials (e.g. ``service_account.Credentials``, or
                ``impersonated_credentials.Credentials`` for a per-application service
                account); None uses Application Default Credentials.
            api_endpoint: Host[:port] of the API, e.g. a regional or private (PSC) endpoint;
                None for ``cloudkms.googleapis.com``.
            timeout: Deadline of each call in seconds (the SDK's own default is 60).
            quota_project_id: The project billed for quota, if not the credentials' own.
            root_certificates: PEM CA certificates to verify the endpoint with, instead of
                the system's (an endpoint behind a TLS-inspecting proxy with a private CA).
        """
        options = ClientOptions(api_endpoint=api_endpoint, quota_project_id=quota_project_id)
        if root_certificates is None:
            client = kms.KeyManagementServiceClient(credentials=credentials, client_options=options)
        else:
            import grpc  # type: ignore[import-untyped]  # google-cloud-kms depends on it

            transport = KeyManagementServiceGrpcTransport(
                host=api_endpoint or "cloudkms.googleapis.com",
                credentials=credentials,
                ssl_channel_credentials=grpc.ssl_channel_credentials(root_certificates),
                quota_project_id=quota_project_id,
            )
            client = kms.KeyManagementServiceClient(transport=transport)
        return cls(client, timeout=timeout)

    def __repr__(self) -> str:
        return f"GcpKmsProvider(timeout={self._timeout!r})"

    # -- the protocol --------------------------------------------------------------------------

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        name = _key_name(key_ref)
        _check_context(context, key_ref)
        aad = _aad(context)
        if len(aad) > _MAX_AAD:
            raise ConfigurationError(
                "wrap context too large for Cloud KMS additional authenticated data",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        self._check_sdk_logging()
        request = kms.EncryptRequest(
            name=name,
            plaintext=data_key,
            plaintext_crc32c=_crc32c(data_key),
            additional_authenticated_data=aad,
            additional_authenticated_data_crc32c=_crc32c(aad),
        )
        try:
            response = self._client.encrypt(
                request=request, timeout=call_timeout(self._timeout), retry=self._retry
            )
        except Exception as exc:
            _raise_mapped(exc, key_ref, decrypting=False)
        if not (
            response.verified_plaintext_crc32c
            and response.verified_additional_authenticated_data_crc32c
        ):
            raise KMSUnavailableError(
                "Cloud KMS did not verify the request checksums: the request was corrupted in "
                "transit or the endpoint does not check integrity",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        ciphertext = bytes(response.ciphertext)
        if response.ciphertext_crc32c != _crc32c(ciphertext):
            raise KMSUnavailableError(
                "Cloud KMS ciphertext failed its CRC32C check: corrupted in transit",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        if response.name and not response.name.startswith(name + "/cryptoKeyVersions/"):
            raise KMSUnavailableError(
                "Cloud KMS answered with a version of another key",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        if not 0 < len(ciphertext) <= _MAX_CIPHERTEXT:
            raise KMSUnavailableError(
                "Cloud KMS returned a ciphertext of unexpected size",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        return _encode(aad, ciphertext)

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        name = _key_name(key_ref)
        _check_context(context, key_ref)
        try:
            aad, ciphertext = _decode(wrapped, context["tenant"])
        except (ValueError, RecursionError, struct.error, UnicodeDecodeError):
            # One opaque error for a bad layout, a bad recorded context and another tenant's key.
            raise DecryptionError(_MALFORMED, key_ref=key_ref, provider=_SCHEME) from None
        self._check_sdk_logging()
        request = kms.DecryptRequest(
            name=name,
            ciphertext=ciphertext,
            ciphertext_crc32c=_crc32c(ciphertext),
            additional_authenticated_data=aad,
            additional_authenticated_data_crc32c=_crc32c(aad),
        )
        try:
            response = self._client.decrypt(
                request=request, timeout=call_timeout(self._timeout), retry=self._retry
            )
        except Exception as exc:
            _raise_mapped(exc, key_ref, decrypting=True)
        plaintext = bytes(response.plaintext)
        if response.plaintext_crc32c != _crc32c(plaintext):
            raise KMSUnavailableError(
                "Cloud KMS plaintext failed its CRC32C check: corrupted in transit",
                key_ref=key_ref,
                provider=_SCHEME,
            )
        return plaintext

    # -- helpers -------------------------------------------------------------------------------

    def _check_sdk_logging(self) -> None:
        if not self._warned_sdk_logging and any(
            lg.isEnabledFor(logging.DEBUG) and lg.hasHandlers() for lg in _SDK_PAYLOAD_LOGGERS
        ):
            self._warned_sdk_logging = True
            _log.warning(
                "the google.cloud.kms_v1 transport loggers are at DEBUG: they log request and "
                "response payloads, data keys included; raise their level to INFO or above"
            )


def _check_context(context: Mapping[str, str], key_ref: str) -> None:
    tenant = context.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise ConfigurationError(
            "the wrap context needs a non-empty 'tenant'", key_ref=key_ref, provider=_SCHEME
        )
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
        raise ConfigurationError(
            "wrap context entries must be strings", key_ref=key_ref, provider=_SCHEME
        )


def _raise_mapped(exc: Exception, key_ref: str, *, decrypting: bool) -> NoReturn:
    """Map an SDK error onto the error tree: the one boundary, most specific first."""
    kw: dict[str, Any] = {"key_ref": key_ref, "provider": _SCHEME}
    if isinstance(exc, gexc.GoogleAPICallError):
        # Cloud KMS status messages name keys, permissions and states, never payloads.
        detail = f"{exc.grpc_status_code.name if exc.grpc_status_code else exc.code}: "
        detail += (exc.message or "")[:300]
    else:
        detail = type(exc).__name__
    if isinstance(exc, gexc.PermissionDenied):
        # Cloud KMS answers a key that does not exist exactly like a key the caller may not
        # use ("... denied on resource ... (or it may not exist)"): it will not say which.
        raise KeyAccessDeniedError(
            "Cloud KMS: the key was not found or no permission (Cloud KMS does not say which): "
            "check the key name (project, location, key ring, key) and that this identity has "
            f"roles/cloudkms.cryptoKeyEncrypterDecrypter on it ({detail})",
            **kw,
        ) from exc
    if isinstance(exc, gexc.Unauthenticated):
        raise KeyAccessDeniedError(f"Cloud KMS refused the credentials ({detail})", **kw) from exc
    if isinstance(exc, gexc.FailedPrecondition):
        # A disabled, destroyed or destroy-scheduled key version, or a key with no primary.
        raise KeyAccessDeniedError(f"Cloud KMS key is not usable ({detail})", **kw) from exc
    if isinstance(exc, gexc.NotFound):
        # Only a caller allowed to see the key hears NOT_FOUND (a destroyed version, say).
        raise KeyNotFoundError(f"Cloud KMS does not know the key ({detail})", **kw) from exc
    if isinstance(exc, gexc.InvalidArgument):
        if "crc32c" in (exc.message or "").lower():
            # Cloud KMS found our request checksums wrong: corrupted on the way there.
            raise KMSUnavailableError(f"request corrupted in transit ({detail})", **kw) from exc
        if decrypting:
            # Another AAD or a corrupt ciphertext: opaque, like every DecryptionError.
            raise DecryptionError(_MALFORMED, **kw) from exc
        raise ConfigurationError(
            f"Cloud KMS rejected the encrypt request; is the key a symmetric ENCRYPT_DECRYPT "
            f"key? ({detail})",
            **kw,
        ) from exc
    if isinstance(exc, gexc.ServiceUnavailable) and _TLS_REFUSED.search(exc.message or ""):
        # gRPC reports a refused TLS handshake (certificate, protocol) as UNAVAILABLE; no retry
        # cures it, as with every provider. A handshake cut by the network (SSL_ERROR_SYSCALL)
        # stays transient.
        error = KMSUnavailableError(
            "TLS to Cloud KMS failed (the endpoint's certificate does not verify, or no common "
            "protocol); check api_endpoint and root_certificates",
            **kw,
        )
        error.retryable = False
        raise error from exc
    if isinstance(
        exc,
        (
            gexc.ServerError,  # 5xx: Unavailable, DeadlineExceeded, Internal, Unknown...
            gexc.TooManyRequests,  # ResourceExhausted: quota
            gexc.Aborted,
            gexc.Cancelled,
            gexc.RetryError,
            auth_exc.TransportError,  # fetching a token failed on the network
        ),
    ):
        raise KMSUnavailableError(f"Cloud KMS unavailable ({detail})", **kw) from exc
    if isinstance(exc, auth_exc.RefreshError):
        if getattr(exc, "retryable", False):
            raise KMSUnavailableError(f"credentials refresh failed ({detail})", **kw) from exc
        raise KeyAccessDeniedError(f"credentials were refused ({detail})", **kw) from exc
    if isinstance(exc, gexc.GoogleAPICallError):
        raise KeyAccessError(f"Cloud KMS call failed ({detail})", **kw) from exc
    raise exc
