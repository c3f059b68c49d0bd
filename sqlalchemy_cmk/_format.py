"""Stored formats, versions 1 and 2. Any change here must keep the golden vectors in tests passing.

The companion value (one per row and table, in the ``EDEKType`` column)::

    offset  size  field
    0       1     version, 0x01
    1       16    row id: random, binds each value to this row
    17      2     T, length of the tenant id (big-endian, 1..1024)
    19      T     tenant id, UTF-8
    ..      1     P, length of the provider scheme (1..64)
    ..      P     provider scheme, ASCII (``local``, ``aws-kms``...)
    ..      2     K, length of the key reference (1..2048)
    ..      K     key reference, UTF-8 (``local://acme``)
    ..      2     W, length of the wrapped data key (1..8192)
    ..      W     wrapped data key, as the provider returned it
    (end)         nothing may follow

Bytes 17 to the end are the *envelope*: everything needed to unwrap the data key. Rows written
in one write-key window share an envelope (and so a cache entry), but never a row id.

An encrypted value (one per encrypted column)::

    offset  size  field
    0       1     version, 0x01
    1       12    nonce, random
    13      n+16  AES-256-GCM ciphertext of (codec tag || encoded value), then the 16-byte tag

and its associated data, never stored, rebuilt from the row::

    b"sqlalchemy-cmk\\x01" || u16 len || tenant || u16 len || table || u16 len || column || row id

so a value moved to another row, column, table or tenant fails authentication.

Version 2 (leased keys, written only when ``CMK(lease_period=...)`` is set; always read). The
companion::

    offset  size  field
    0       1     version, 0x02
    1       16    row id, as in version 1
    17      2     0x0000: a zero tenant length, which no version-1 envelope has
    19      2     L, length of the lease envelope (big-endian)
    21      L     lease envelope: a version-1 envelope (tenant, provider, key reference, and the
                  tenant's KMS's wrap of a 32-byte *lease key*)
    ..      12    nonce, random
    ..      48    AES-256-GCM(lease key, data key, aad) then the 16-byte tag
    (end)         nothing may follow

with, for the local wrap of the data key::

    aad = b"sqlalchemy-cmk/lease-dek\x02" || u16 len || tenant

Bytes 17 to the end are the version-2 *envelope*. Its two leading zero bytes make an envelope
tell its own version wherever it travels without its companion (the key caches are keyed by
envelope; the session and the migration tools parse envelopes alone). The lease envelope is the
only part the KMS sees: one unwrap per lease, however many data keys it wraps.

What the local wrap binds, and why no more: the tenant (belt and braces: the KMS already binds
the lease key to the tenant through its wrap context). Not the KMS blob or the key reference,
so that re-wrapping a lease under the tenant's new primary key keeps every data key wrapped
under it valid (one KMS round trip per lease, not per data key). Not a lease id: a data key
wrapped under lease A presented with lease B's envelope is decrypted with B's key, a different
random 256-bit key, so the GCM tag fails; forging a wrap that opens under a key one does not
know is GCM's forgery bound (2**-128 per try), and lease keys never leave the process and the
tenant's KMS. The domain label keeps a lease key's wraps apart from every other use of
AES-GCM here (values use ``sqlalchemy-cmk\x01``), so a data key's envelope substituted for a
lease envelope (or the reverse) never authenticates either.

The value format is the same in both versions.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigurationError, DecryptionError

VERSION = 1
ROW_ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
DEK_SIZE = 32

VERSION_BYTE = bytes([VERSION])
_AAD_MAGIC = b"sqlalchemy-cmk\x01"
_U16 = struct.Struct(">H")
_MAX_TENANT = 1024
_MAX_PROVIDER = 64
_MAX_KEY_REF = 2048
_MAX_WRAPPED = 8192
MAX_WRAPPED = _MAX_WRAPPED  # the most a provider's wrapped key may hold
# version + nonce + codec tag + GCM tag: anything shorter cannot be a value we wrote.
MIN_VALUE = 1 + NONCE_SIZE + 1 + TAG_SIZE

VERSION_2 = 2
VERSION_2_BYTE = bytes([VERSION_2])
LEASED_MARK = b"\x00\x00"  # a version-2 envelope's first bytes: no tenant id is empty
LOCAL_WRAP_SIZE = NONCE_SIZE + DEK_SIZE + TAG_SIZE
_LEASE_DEK_MAGIC = b"sqlalchemy-cmk/lease-dek\x02"


AUTH_FAILED = (
    "stored value failed authentication: tampered, moved from another row, column or tenant, "
    "or written under another key"
)


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope: who the data key belongs to and how to unwrap it."""

    tenant: str
    provider: str
    key_ref: str
    wrapped: bytes


def _lp(data: bytes) -> bytes:
    return _U16.pack(len(data)) + data


def encode_envelope(tenant: str, provider: str, key_ref: str, wrapped: bytes) -> bytes:
    """Serialize an envelope; raises ConfigurationError for fields out of bounds."""
    try:
        t, p, k = tenant.encode(), provider.encode("ascii"), key_ref.encode()
    except UnicodeEncodeError:
        t = p = k = b""  # refused below, outside the handler: no error chained to this one
    if not (t and p and k):
        raise ConfigurationError(
            "tenant id, provider scheme or key reference is empty or not encodable (a lone "
            "surrogate, or a non-ASCII scheme)",
            tenant=tenant,
        )
    if not (0 < len(t) <= _MAX_TENANT and 0 < len(p) <= _MAX_PROVIDER):
        raise ConfigurationError("tenant id or provider scheme empty or too long", tenant=tenant)
    if not (0 < len(k) <= _MAX_KEY_REF and 0 < len(wrapped) <= _MAX_WRAPPED):
        raise ConfigurationError(
            "key reference or wrapped key empty or too long", tenant=tenant, key_ref=key_ref
        )
    return _lp(t) + bytes([len(p)]) + p + _lp(k) + _lp(wrapped)


def parse_envelope(data: bytes) -> Envelope:
    """Parse an envelope; every malformation raises the same opaque DecryptionError.

    A version-2 envelope gives its lease envelope's fields: the tenant, and the KMS key and
    provider its lease key is wrapped under (``wrapped`` is then the lease key's wrap).
    """
    if data[:2] == LEASED_MARK:
        return _parse_v1(split_leased(data)[0])
    return _parse_v1(data)


def _parse_v1(data: bytes) -> Envelope:
    try:
        pos = 0
        (n,) = _U16.unpack_from(data, pos)
        pos += 2
        tenant = data[pos : pos + n]
        pos += n
        p = data[pos]
        pos += 1
        provider = data[pos : pos + p]
        pos += p
        (k,) = _U16.unpack_from(data, pos)
        pos += 2
        key_ref = data[pos : pos + k]
        pos += k
        (w,) = _U16.unpack_from(data, pos)
        pos += 2
        wrapped = data[pos : pos + w]
        pos += w
        if (
            pos != len(data)
            or not (0 < n <= _MAX_TENANT and len(tenant) == n)
            or not (0 < p <= _MAX_PROVIDER and len(provider) == p)
            or not (0 < k <= _MAX_KEY_REF and len(key_ref) == k)
            or not (0 < w <= _MAX_WRAPPED and len(wrapped) == w)
        ):
            raise ValueError
        env = Envelope(tenant.decode(), provider.decode("ascii"), key_ref.decode(), bytes(wrapped))
        if not env.key_ref.startswith(env.provider + "://"):
            raise ValueError  # the recorded provider must be the key reference's scheme
        return env
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        pass
    # Raised outside the handler, so the error does not carry a UnicodeDecodeError (which holds
    # the stored bytes) as its __context__.
    raise DecryptionError("stored key envelope is malformed")


def is_leased(envelope: bytes) -> bool:
    """Whether ``envelope`` is of version 2 (a data key wrapped under a lease key)."""
    return envelope[:2] == LEASED_MARK


def companion_version(envelope: bytes) -> bytes:
    """The companion version byte that goes with ``envelope``."""
    return VERSION_2_BYTE if envelope[:2] == LEASED_MARK else VERSION_BYTE


def encode_companion(row_id: bytes, envelope: bytes) -> bytes:
    return companion_version(envelope) + row_id + envelope


def split_companion(data: bytes) -> tuple[bytes, bytes]:
    """Return (row id, envelope bytes) of a companion value, checking version and length.

    The version byte must match the envelope's kind: a version-1 companion never carries a
    leased envelope, nor the reverse.
    """
    if (
        not isinstance(data, bytes)
        or len(data) < 1 + ROW_ID_SIZE + 8
        or data[0] != (VERSION_2 if data[1 + ROW_ID_SIZE : 3 + ROW_ID_SIZE] == LEASED_MARK else 1)
    ):
        raise DecryptionError("stored companion value is malformed or of an unknown version")
    return data[1 : 1 + ROW_ID_SIZE], data[1 + ROW_ID_SIZE :]


def encode_leased(lease_envelope: bytes, local_wrap: bytes) -> bytes:
    """A version-2 envelope: the lease envelope (a version-1 envelope), then the local wrap."""
    return LEASED_MARK + _lp(lease_envelope) + local_wrap


def split_leased(envelope: bytes) -> tuple[bytes, bytes]:
    """(lease envelope, local wrap) of a version-2 envelope; the lease envelope is parsed to
    check its form. Every malformation raises the same opaque DecryptionError."""
    ok = len(envelope) > 4 + LOCAL_WRAP_SIZE and envelope[:2] == LEASED_MARK
    if ok:
        (n,) = _U16.unpack_from(envelope, 2)
        ok = len(envelope) == 4 + n + LOCAL_WRAP_SIZE and envelope[4:6] != LEASED_MARK
    if not ok:
        raise DecryptionError("stored key envelope is malformed")
    lease = envelope[4 : 4 + n]
    _parse_v1(lease)
    return lease, envelope[4 + n :]


def _lease_aad(tenant: str) -> bytes:
    return _LEASE_DEK_MAGIC + _lp(tenant.encode())


def wrap_local(lease: AESGCM, nonce: bytes, tenant: str, data_key: bytes) -> bytes:
    """The local wrap of a data key under a lease key: nonce || AES-256-GCM(...) || tag."""
    return nonce + lease.encrypt(nonce, data_key, _lease_aad(tenant))


def unwrap_local(lease: AESGCM, tenant: str, local_wrap: bytes) -> bytes:
    """The data key of a local wrap; DecryptionError if it does not authenticate."""
    try:
        key = lease.decrypt(local_wrap[:NONCE_SIZE], local_wrap[NONCE_SIZE:], _lease_aad(tenant))
    except InvalidTag:
        key = b""
    if len(key) != DEK_SIZE:  # outside the handler: no InvalidTag chained
        raise DecryptionError(
            "a data key failed authentication under its lease key: its envelope was tampered "
            "with, its lease envelope taken from another lease or tenant, or the KMS unwrapped "
            "the lease to a wrong key",
            tenant=tenant,
        )
    return key


def aad_prefix(tenant: str, table: str, column: str) -> bytes:
    """The row-independent part of a value's associated data; the row id completes it."""
    return _AAD_MAGIC + _lp(tenant.encode()) + _lp(table.encode()) + _lp(column.encode())


def seal(aead: AESGCM, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
    return VERSION_BYTE + nonce + aead.encrypt(nonce, plaintext, aad)


def open_(aead: AESGCM, aad: bytes, value: bytes) -> bytes:
    """Decrypt a stored value; every failure raises the same opaque DecryptionError."""
    if len(value) < MIN_VALUE or value[0] != VERSION:
        raise DecryptionError("stored value is malformed or of an unknown version")
    try:
        return aead.decrypt(value[1 : 1 + NONCE_SIZE], value[1 + NONCE_SIZE :], aad)
    except InvalidTag:
        raise DecryptionError(AUTH_FAILED) from None
