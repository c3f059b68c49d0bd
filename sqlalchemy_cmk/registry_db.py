"""A key registry kept in a database table, each row integrity-protected by an HMAC.

:class:`DatabaseKeyRegistry` stores one row per tenant: its primary key reference (wraps new
data keys), every accepted reference (may still unwrap), references to the credentials a
provider uses for it (a role ARN, a client id, a secret *name*; never the secrets), a disabled
flag, a version bumped by every change, optionally where its audit events go (its
:class:`~sqlalchemy_cmk.delivery.TenantAudit`), and a MAC.

The MAC is HMAC-SHA256 under a key derived (HKDF-SHA256) from an application secret that is
*not* in the database. It covers every other column, the tenant id, the version and, since MAC
version 2, the **registry identity** the application configures per deployment
(``registry_id="prod-eu"``), the schema and the table name. So someone who can write to the
database but does not hold the secret cannot point a tenant at a key they control, move one
tenant's row to another, re-enable a disabled tenant, forge a new tenant, or bring in a row (or
a whole table) from another deployment that shares the secret: the row is refused with
:class:`RegistryIntegrityError`. Putting back an *older* row (a replay) is refused by any
registry object that has seen a newer version; a process that never saw it cannot tell (see
docs/registry.md for what this does and does not protect).

The canonical encodings the MACs cover (all integers big-endian; str = u32 length + UTF-8)::

    v2 (written by every change)           v1 (read only while allow_v1_macs=True, or by
                                               upgrade_macs(), which rewrites it as v2)
    "sqlalchemy-cmk/registry/v2"           "sqlalchemy-cmk/registry/v1"   domain = HKDF info
    str  registry id                       -
    str  schema ("" for the default)       -
    str  table name                        str  table name
    str  tenant id                         (the same from here on)
    str  primary key reference
    u32  n, then n str             accepted key references, sorted, primary included
    u32  m, then m (str, str)      credential references, sorted by name
    u8   disabled (0 or 1)
    u64  version
    i64  updated_at                microseconds since the Unix epoch, UTC
    then, only for a row whose ``audit`` column is not NULL (absent otherwise):
    str  "audit"                   the field's name
    str  audit                     the audit column exactly as stored (canonical JSON)

The ``audit`` column (the tenant's :class:`~sqlalchemy_cmk.delivery.TenantAudit`, added after
MAC version 2 existed) is covered by the same MAC without a new MAC version, so rows written
before it keep their bytes and their MAC and verify unchanged, with no mass re-MAC. A row with
and a row without it can never share an encoding: every field before it is self-delimiting
(strings length-prefixed, lists counted, the tail of fixed size), so the encoding of a row
without ``audit`` ends exactly where the encoding of the same fields with ``audit`` goes on;
no encoding is a proper prefix of another, so none equals another with a suffix appended.
Hence nulling the column of a row that had one, or filling in the column of a row that had
none, changes the bytes the MAC covers, like any other edit. The name before the value keeps
later optional fields apart from this one (each would come with its own name, in a fixed
order). The MAC covers the stored text byte for byte, not its parsed meaning: the registry
writes it in one canonical form (sorted keys, no blanks, ASCII only, so no database collation
or character set can change it), and any other spelling is refused.

Stored in the ``mac`` column as ``"v2:"`` + the unpadded base64url of the 32-byte tag (46
characters); a v1 MAC is 64 hexadecimal digits. The two versions use different HKDF keys and
domains, so a tag of one can never pass as the other.

Every row is parsed strictly before its MAC is checked, with the sizes and JSON nesting bounded
first: a malformed row (a negative version, deeply nested JSON, a wrong type, bytes that are not
UTF-8) is reported as a :class:`RegistryIntegrityError` like any other bad row, never as a parser
or driver error.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import logging
import re
import shlex
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError

from ._dialects import ExactString, LongText, Timestamp, select_dialect
from .delivery import TenantAudit
from .errors import (
    ConfigurationError,
    RegistryConflictError,
    RegistryIntegrityError,
    TenantNotConfiguredError,
    TenantRevokedError,
)
from .registry import TENANT_ID_MAX as _TENANT_MAX
from .registry import TenantKeys, parse_key_ref, tenant_id_problem

__all__ = [
    "NOTIFY_CHANNEL",
    "DatabaseKeyRegistry",
    "RegistryConflictError",
    "RegistryIntegrityError",
    "TenantRecord",
    "tenant_id_problem",
]

_log = logging.getLogger("sqlalchemy_cmk.registry")

_DOMAIN_V1 = b"sqlalchemy-cmk/registry/v1"
_DOMAIN_V2 = b"sqlalchemy-cmk/registry/v2"
_MAC_V2_PREFIX = "v2:"
_MIN_SECRET = 32
# Bounds on what a row may hold, checked on write and, before any parsing, on read: a registry
# row is a handful of short URIs, and a bound keeps a vandalized row from costing more than that.
_REF_MAX = 2048  # a key reference, a credential name or value
_JSON_MAX = 65_536  # the accepted_key_refs and credentials columns, as stored
_U32 = struct.Struct(">I")
_TAIL = struct.Struct(">BQq")  # disabled, version, updated_at
_VERSION_MAX = 2**31 - 1  # the version column is a 32-bit INTEGER on every dialect
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
# A tenant's audit set-up is a few destination specs: a list of objects whose values may be
# objects or lists themselves (labels, headers), so a few levels deep, never more than this.
_AUDIT_NESTING = 6
_AUDIT_FIELD = "audit"
_HEX64 = re.compile(r"[0-9a-f]{64}")

NOTIFY_CHANNEL = "sqlalchemy_cmk"
"""The PostgreSQL channel every registry (and revocation) change is announced on.

The payload is the changed table's full name, never a tenant id or a key reference: a
:class:`~sqlalchemy_cmk.revocation.RevocationWatcher` treats a notification only as a hint to
read the table again, so a forged ``NOTIFY`` can cost a query but change nothing.
"""


def notify_change(conn: Connection, table: Table) -> None:
    """Announce a change of ``table`` on :data:`NOTIFY_CHANNEL`, on PostgreSQL only.

    Run inside the writing transaction: PostgreSQL delivers the notification at commit, and
    drops it on rollback, so listeners never re-read for a change that did not happen.
    """
    select_dialect(conn.dialect).notify(conn, NOTIFY_CHANNEL, table.fullname)


# Credential names that announce a secret value rather than a reference to one. ``secret_name``,
# ``secret_id``, ``client_id``, ``role_arn`` are references and pass.
_SECRET_NAME = re.compile(
    r"(^|_)(password|passwd|passphrase|secret|client_secret|token|access_token|api_key|apikey|"
    r"private_key|secret_access_key|secret_key|session_token)$"
)


@dataclass(frozen=True)
class TenantRecord:
    """One verified registry row.

    Attributes:
        tenant: The tenant id.
        primary: The key reference that wraps new data keys.
        accepted: Every key reference that may unwrap, sorted (includes ``primary``).
        credentials: Credential references for the provider (names, ARNs, ids; never secrets).
        disabled: True when the tenant is switched off (lookups refuse it).
        version: Bumped by every change; starts at 1.
        updated_at: When the row was last written (UTC).
        audit_json: The tenant's audit set-up as stored and MACed: the canonical JSON of
            :meth:`TenantAudit.to_dict() <sqlalchemy_cmk.delivery.TenantAudit.to_dict>`, or
            None when the tenant has no destination of its own. :meth:`audit` builds it.
    """

    tenant: str
    primary: str
    accepted: tuple[str, ...]
    credentials: Mapping[str, str]
    disabled: bool
    version: int
    updated_at: datetime.datetime
    audit_json: str | None = None
    _keys: TenantKeys = field(init=False, repr=False, compare=False)
    # The TenantAudit built from audit_json, once (records are cached: building it checks every
    # destination spec, which should not run on every event).
    _audit: list[TenantAudit | None] = field(
        init=False, repr=False, compare=False, default_factory=list
    )

    def __post_init__(self) -> None:
        # Read-only views: records are cached and shared between threads.
        credentials = MappingProxyType(dict(self.credentials))
        object.__setattr__(self, "credentials", credentials)
        object.__setattr__(
            self, "_keys", TenantKeys(self.primary, frozenset(self.accepted), credentials)
        )

    @property
    def keys(self) -> TenantKeys:
        """The record as the :class:`~sqlalchemy_cmk.registry.TenantKeys` that CMK uses."""
        return self._keys

    def audit(self) -> TenantAudit | None:
        """The tenant's audit set-up, or None when it has no destination of its own.

        Built on first use, not when the row is read: a spec that no longer checks (its kind's
        extra was uninstalled, say) fails here, never the tenant's key lookups.

        Raises:
            ConfigurationError: a stored destination spec does not check; the message names
                the tenant and the field.
        """
        if self._audit:  # a one-item list: the built value, None included
            return self._audit[0]
        built = None
        if self.audit_json is not None:
            try:
                built = TenantAudit.from_dict(json.loads(self.audit_json))
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"the audit set-up of tenant {self.tenant!r} in the key registry does not "
                    f"check: {exc}",
                    tenant=self.tenant,
                ) from None
        # Racing threads may both build it: equal values, and list.append is atomic.
        if not self._audit:
            self._audit.append(built)
        return built

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``sqlalchemy-cmk tenants list --json`` prints); ``audit``
        is the stored audit set-up (``TenantAudit.to_dict()``'s form) or None."""
        return {
            "tenant": self.tenant,
            "primary": self.primary,
            "accepted": list(self.accepted),
            "credentials": dict(self.credentials),
            "disabled": self.disabled,
            "version": self.version,
            "updated_at": self.updated_at.isoformat(),
            "audit": None if self.audit_json is None else json.loads(self.audit_json),
        }


def _utc(value: datetime.datetime) -> datetime.datetime:
    # SQLite hands back naive datetimes: the registry only ever writes UTC.
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.timezone.utc)
    return value.astimezone(datetime.timezone.utc)


def _micros(value: datetime.datetime) -> int:
    delta = _utc(value) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _canonical(domain: bytes, header: Iterable[str], rec: TenantRecord) -> bytes:
    """The bytes a MAC covers: ``header`` (what binds the row to its table) then the row.

    Raises ValueError (a ``UnicodeEncodeError``) or ``struct.error`` for a record that cannot
    be encoded; records built by this module never are such.
    """
    out = bytearray(domain)

    def put(text: str) -> None:
        data = text.encode("utf-8")
        out.extend(_U32.pack(len(data)))
        out.extend(data)

    for item in header:
        put(item)
    put(rec.tenant)
    put(rec.primary)
    accepted = sorted(set(rec.accepted))
    out.extend(_U32.pack(len(accepted)))
    for ref in accepted:
        put(ref)
    creds = sorted(rec.credentials.items())
    out.extend(_U32.pack(len(creds)))
    for name, value in creds:
        put(name)
        put(value)
    out.extend(_TAIL.pack(1 if rec.disabled else 0, rec.version, _micros(rec.updated_at)))
    # Optional fields come last, each named, and contribute nothing when absent: rows written
    # before they existed keep their encoding (why this cannot be confused with it: the module
    # docstring).
    if rec.audit_json is not None:
        put(_AUDIT_FIELD)
        put(rec.audit_json)
    return bytes(out)


def _check_tenant_id(tenant: object, what: str = "tenant id") -> str:
    problem = tenant_id_problem(tenant)
    if problem is not None:
        raise ConfigurationError(
            f"{what} {_shown(tenant)} is refused: {problem}",
            tenant=tenant if what == "tenant id" and isinstance(tenant, str) else None,
        )
    assert isinstance(tenant, str)
    return tenant


def _check_text(value: str, what: str, tenant: str) -> str:
    if len(value) > _REF_MAX or not value.isprintable():
        raise ConfigurationError(
            f"{what} {_shown(value)} of tenant {tenant!r} must be at most {_REF_MAX} printable "
            "characters",
            tenant=tenant,
        )
    return value


def _check_ref(ref: object, tenant: str) -> str:
    parse_key_ref(ref, tenant)
    assert isinstance(ref, str)
    return _check_text(ref, "key reference", tenant)


def _check_credentials(credentials: Mapping[str, str] | None, tenant: str) -> dict[str, str]:
    if credentials is None:
        return {}
    if not isinstance(credentials, Mapping):
        raise ConfigurationError(
            f"credentials of tenant {tenant!r} must be a mapping of name -> reference",
            tenant=tenant,
        )
    checked: dict[str, str] = {}
    for name, value in credentials.items():
        if not isinstance(name, str) or not name or not isinstance(value, str) or not value:
            raise ConfigurationError(
                f"credential {name!r} of tenant {tenant!r} must be a non-empty string name with "
                "a non-empty string value",
                tenant=tenant,
            )
        if _SECRET_NAME.search(name.lower().replace("-", "_")) or "-----BEGIN" in value:
            raise ConfigurationError(
                f"credential {name!r} of tenant {tenant!r} looks like a secret: the registry "
                "stores references to credentials (a role ARN, a client id, the *name* of a "
                "secret in a secret manager), never the credentials themselves",
                tenant=tenant,
            )
        checked[_check_text(name, "credential name", tenant)] = _check_text(
            value, "credential value", tenant
        )
    return checked


def _shown(value: object) -> str:
    """A repr for messages: escapes every non-printable character, and is cut short."""
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


# -- audit set-ups: canonical, and never a literal secret -----------------------------------

# Field names that announce a secret, as for credentials (a ``*_ref`` name does not match: its
# value is checked as a reference by the destination's kind).
_AUDIT_SECRET_NAME = re.compile(
    r"(^|_)(password|passwd|passphrase|secret|client_secret|token|access_token|api_key|apikey|"
    r"private_key|secret_access_key|secret_key|session_token|authorization|hmac_key|"
    r"signing_key|shared_key|sas_token|connection_string|bearer)$"
)
# A secret reference: env:NAME, file:/path, or <scheme>:<rest> of a registered resolver.
_SECRET_REF = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*|file:/\S+|[a-z][a-z0-9+.-]*:\S+")
_PRIVATE_PEM = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
# An Authorization header's value: the scheme, then one credential-like word (long, with a
# digit), so that a label such as "Splunk forwarder" or "basic tier" is not taken for one.
_AUTH_LITERAL = re.compile(r"(?i)(bearer|basic|splunk|sharedaccesssignature)\s+(?=\S*\d)\S{16,}")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_URL_SECRET_PARAM = re.compile(
    r"(?i)^(sig|signature|token|access_token|api_key|apikey|key|secret|password|code|auth)$"
)


def _literal_secret(name: str, value: str) -> str | None:
    """Why ``value``, at a field called ``name``, looks like a secret itself; None if not."""
    if _PRIVATE_PEM.search(value):
        return "a PEM private key"
    if _AWS_KEY_ID.search(value):
        return "an AWS access key id"
    if _AUTH_LITERAL.fullmatch(value.strip()):
        return "an Authorization header value"
    if value.lower().startswith(("https://", "http://")):
        try:
            parts = urlsplit(value)
            query = parse_qsl(parts.query, keep_blank_values=True)
        except ValueError:  # not a URL after all: the destination's kind refuses it
            parts, query = None, []
        if parts is not None and (parts.password is not None or parts.username is not None):
            return "a URL with credentials in it"
        if any(_URL_SECRET_PARAM.match(k) for k, _ in query):
            return "a URL with a secret in its query string"
    if _AUDIT_SECRET_NAME.search(name.lower().replace("-", "_")) and not _SECRET_REF.fullmatch(
        value
    ):
        return "a value that is not a secret reference under a secret's name"
    return None


def _check_no_literal_secret(value: object, path: str, tenant: str) -> None:
    """Refuse an audit set-up holding something that looks like a secret, naming the field.

    The destinations' kinds check their own secret fields; this is the registry's own guard
    against mistakes (a token pasted into a header, a signed URL), not a proof: a secret under
    an innocent name in an unknown field passes. The message never repeats the value.
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_no_literal_secret(item, f"{path}.{key}" if path else str(key), tenant)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_no_literal_secret(item, f"{path}[{i}]", tenant)
    elif isinstance(value, str):
        why = _literal_secret(path.rsplit(".", 1)[-1].split("[", 1)[0], value)
        if why is not None:
            raise ConfigurationError(
                f"audit set-up of tenant {tenant!r}: field {path!r} holds what looks like a "
                f"secret ({why}); the key registry stores references to secrets (env:NAME, "
                "file:/path, a secret manager's scheme), never the secrets themselves",
                tenant=tenant,
            )


def _audit_json(audit: TenantAudit, tenant: str) -> str:
    """The canonical stored form of ``audit``: sorted keys, no blanks, ASCII only.

    ASCII only, so that no database character set or collation can change the bytes the MAC
    covers (MariaDB's utf8mb3 cannot even store some characters).
    """
    doc = audit.to_dict()
    for i, dest in enumerate(doc["destinations"], 1):
        _check_no_literal_secret(dest, f"destinations[{i}]({dest.get('kind')})", tenant)
    try:
        stored = json.dumps(
            doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"the audit set-up of tenant {tenant!r} is not JSON-ready: {exc}", tenant=tenant
        ) from None
    # What a read refuses must never be written: the tenant's key lookups would fail with it.
    if _nesting_exceeds(stored, _AUDIT_NESTING):
        raise ConfigurationError(
            f"the audit set-up of tenant {tenant!r} nests deeper than {_AUDIT_NESTING} levels",
            tenant=tenant,
        )
    return stored


class _MacKeys(NamedTuple):
    v1: bytes
    v2: bytes


def _secret_keys(secret: object) -> _MacKeys:
    if not isinstance(secret, bytes | bytearray):
        raise ConfigurationError(
            "the registry secret must be bytes, e.g. base64.b64decode(os.environ["
            "'SQLALCHEMY_CMK_REGISTRY_SECRET'])"
        )
    if len(secret) < _MIN_SECRET:
        raise ConfigurationError(
            f"the registry secret must be at least {_MIN_SECRET} random bytes; generate one "
            'with: python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"'
        )
    if len(set(secret)) < 8:
        raise ConfigurationError("the registry secret is visibly not random")

    def derive(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
            bytes(secret)
        )

    return _MacKeys(derive(_DOMAIN_V1), derive(_DOMAIN_V2))


def _table(metadata: MetaData, name: str, schema: str | None) -> Table:
    return Table(
        name,
        metadata,
        Column("tenant_id", ExactString(_TENANT_MAX), primary_key=True),
        Column("primary_key_ref", LongText(), nullable=False),
        # A JSON list, sorted, primary included; then a JSON object of references.
        Column("accepted_key_refs", LongText(), nullable=False),
        Column("credentials", LongText(), nullable=False),
        Column("disabled", Boolean, nullable=False),
        Column("version", Integer, nullable=False),
        Column("updated_at", Timestamp(), nullable=False),
        Column("mac", String(64), nullable=False),  # "v2:" + base64url, or v1: hex
        # The tenant's TenantAudit as canonical JSON; NULL: none. Last and nullable, so that
        # create_table() can add it to a table made before it existed (ALTER TABLE ... ADD).
        Column(_AUDIT_FIELD, LongText(), nullable=True),
        schema=schema,
        comment="sqlalchemy-cmk tenant key registry; rows are HMAC-protected, edit via the API",
    )


# -- reading rows strictly ---------------------------------------------------------------------


class _Malformed(Exception):
    """Internal: why a stored row does not parse (becomes a RegistryIntegrityError)."""


def _raw_select(table: Table, dialect: Dialect) -> Select[Any]:
    """Every column as the driver returns it, without SQLAlchemy's result processing.

    A vandalized value must become a reported bad row, not an exception while fetching (see
    ``DialectSupport.raw_column``: SQLite's text comes back as BLOBs, decoded here).
    """
    db = select_dialect(dialect)
    return select(*(db.raw_column(col) for col in table.c))


def _text(value: object, what: str, limit: int) -> str:
    if isinstance(value, bytes | bytearray | memoryview):  # SQLite, read as a BLOB
        if len(value) > 4 * limit:
            raise _Malformed(f"{what} is longer than {limit} characters")
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} is not UTF-8") from None
    if not isinstance(value, str):
        raise _Malformed(f"{what} is not text")
    if len(value) > limit:
        raise _Malformed(f"{what} is longer than {limit} characters")
    return value


def _nesting_exceeds(text: str, limit: int) -> bool:
    """True when JSON ``text`` nests arrays/objects deeper than ``limit`` (a linear scan)."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate name")
    return out


def _json(value: object, what: str, nesting: int = 1) -> Any:
    return _json_text(_text(value, what, _JSON_MAX), what, nesting)


def _json_text(text: str, what: str, nesting: int) -> Any:
    # Bounded before parsing: a valid column is one flat list or object (the audit column a
    # few levels), and json.loads recurses once per level (RecursionError at about a thousand).
    if _nesting_exceeds(text, nesting):
        raise _Malformed(f"{what} is nested JSON" if nesting == 1 else f"{what} nests too deep")
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except ValueError:  # JSONDecodeError, a duplicate name, an integer too long to convert
        raise _Malformed(f"{what} is not valid JSON") from None


def _audit_column(value: object) -> str | None:
    """The stored audit column, checked to be a JSON object (still as text: the MAC covers the
    text as stored); None for NULL."""
    if value is None:
        return None
    text = _text(value, _AUDIT_FIELD, _JSON_MAX)
    if not isinstance(_json_text(text, _AUDIT_FIELD, _AUDIT_NESTING), dict):
        raise _Malformed(f"{_AUDIT_FIELD} is not a JSON object")
    return text


def _timestamp(value: object) -> datetime.datetime:
    if isinstance(value, bytes | bytearray | memoryview):
        value = _text(value, "updated_at", 64)
    if isinstance(value, str):  # SQLite stores "YYYY-MM-DD HH:MM:SS.ffffff"
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise _Malformed("updated_at is not a timestamp") from None
    if not isinstance(value, datetime.datetime):
        raise _Malformed("updated_at is not a timestamp")
    try:
        return _utc(value)
    except OverflowError:  # a time zone that moves it past year 1 or 9999
        raise _Malformed("updated_at is out of range") from None


def _parse(row: Mapping[str, Any]) -> tuple[TenantRecord, str]:
    """A stored row as a record and its stored MAC; ``_Malformed`` says why it cannot be one."""
    tenant = _text(row["tenant_id"], "the tenant id", _TENANT_MAX)
    problem = tenant_id_problem(tenant)
    if problem is not None:
        raise _Malformed(f"the tenant id is not canonical: {problem}")
    primary = _text(row["primary_key_ref"], "the primary key reference", _REF_MAX)
    accepted = _json(row["accepted_key_refs"], "accepted_key_refs")
    if not isinstance(accepted, list) or not all(
        isinstance(r, str) and len(r) <= _REF_MAX for r in accepted
    ):
        raise _Malformed("accepted_key_refs is not a list of key references")
    if primary not in accepted:
        raise _Malformed("the primary key reference is not among the accepted ones")
    credentials = _json(row["credentials"], "credentials")
    if not isinstance(credentials, dict) or not all(
        len(k) <= _REF_MAX and isinstance(v, str) and len(v) <= _REF_MAX
        for k, v in credentials.items()
    ):
        raise _Malformed("credentials is not an object of credential references")
    disabled = row["disabled"]
    # bool on PostgreSQL, 0/1 on SQLite; anything else is not a value the registry wrote.
    if type(disabled) not in (bool, int) or disabled not in (0, 1):
        raise _Malformed("disabled is not a boolean")
    version = row["version"]
    if type(version) is not int or not 1 <= version <= _VERSION_MAX:
        raise _Malformed(f"version is not an integer from 1 to {_VERSION_MAX}")
    mac = _text(row["mac"], "mac", 64)
    rec = TenantRecord(
        tenant,
        primary,
        tuple(sorted(set(accepted))),
        credentials,
        bool(disabled),
        version,
        _timestamp(row["updated_at"]),
        _audit_column(row[_AUDIT_FIELD]),
    )
    return rec, mac


# -- the registry --------------------------------------------------------------------------------


class DatabaseKeyRegistry:
    """Tenants' key references in a database table, integrity-protected, cached for lookups.

    Implements :class:`~sqlalchemy_cmk.registry.KeyRegistry`: pass it as ``CMK(registry=...)``;
    and :class:`~sqlalchemy_cmk.delivery.AuditDestinations` (:meth:`tenant_audit`): pass it as
    the audit delivery's ``destinations``.
    Manage it with this API or the ``sqlalchemy-cmk tenants`` CLI.

    Args:
        engine: The database holding the table (it may be the application's database).
        secret: At least 32 random bytes, kept outside the database (an environment variable or a
            secret manager). Every process that reads or writes the registry needs the same one.
            Never share it between environments (staging and production).
        registry_id: This deployment's registry identity, e.g. ``"prod-eu"``: part of every
            row's MAC, so a row or a whole table copied from another deployment (another
            schema, another database) is refused even if it shares the secret. Keep it in the
            application's configuration, not only in the database; give every deployment its
            own, and the CLI the same (``--registry-id`` / ``$SQLALCHEMY_CMK_REGISTRY_ID``).
            Same rules as a tenant id (:func:`tenant_id_problem`).
        table_name: The table's name; part of every row's MAC, so renaming the table means
            re-adding its rows.
        schema: The table's schema, when not the default one; part of every row's MAC too.
        allow_v1_macs: Also accept rows whose MAC predates ``registry_id`` (MAC version 1), which
            a copy from another deployment with the same secret and table name passes. Only for
            the transition: set it while deploying this version, run :meth:`upgrade_macs`
            (``sqlalchemy-cmk tenants upgrade-mac``), then remove it. Even with it, a tenant
            whose version-2 row this object has seen is never accepted at version 1 again.
        cache_ttl: Seconds a looked-up tenant (found or not) is reused; the bound on how long a
            change made by another process takes to be seen here. 0 disables the cache.
        cache_max_entries: Most tenants cached at once (least recently used dropped first).
        metadata: A ``MetaData`` to define the table in (e.g. the application's, so Alembic
            autogenerate sees it); default: a private one.
        clock: Monotonic clock for the cache, injectable for tests.

    Raises:
        ConfigurationError: a secret that is not bytes, too short or visibly not random, an
            invalid ``registry_id``, or cache limits out of range.
    """

    def __init__(
        self,
        engine: Engine,
        secret: bytes,
        *,
        registry_id: str,
        table_name: str = "cmk_tenants",
        schema: str | None = None,
        allow_v1_macs: bool = False,
        cache_ttl: float = 30.0,
        cache_max_entries: int = 10_000,
        metadata: MetaData | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cache_ttl < 0 or cache_max_entries < 1:
            raise ConfigurationError("cache_ttl must be >= 0 and cache_max_entries >= 1")
        self.registry_id = _check_tenant_id(registry_id, "registry_id")
        self._mac_keys = _secret_keys(secret)
        self._engine = engine
        self._allow_v1 = bool(allow_v1_macs)
        self._v1_header = (table_name,)
        self._v2_header = (self.registry_id, schema or "", table_name)
        self.table: Table = _table(
            metadata if metadata is not None else MetaData(), table_name, schema
        )
        self._ttl = cache_ttl
        self._max_entries = cache_max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[float, TenantRecord | None]] = OrderedDict()
        # Bumped by every invalidation: a lookup that read the row before an invalidation must
        # not cache what it read after it (a disable would then be forgotten for cache_ttl).
        self._generation = 0
        # Highest version of each tenant's row this object has seen: an older row is a replay.
        self._seen: dict[str, int] = {}
        # Tenants whose version-2 row this object has seen: never accepted at version 1 again.
        self._seen_v2: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"<DatabaseKeyRegistry table={self.table.fullname!r} registry_id={self.registry_id!r}>"
        )

    # -- schema --------------------------------------------------------------------------------

    def create_table(self) -> None:
        """Create the registry table if it does not exist, or bring an existing one up to date
        (or use ``registry.table`` in Alembic).

        A table made before the ``audit`` column existed gets it (``ALTER TABLE ... ADD
        COLUMN audit``, nullable): its rows keep verifying unchanged, and processes still on
        the older version go on working (they neither read nor write the column). Run it
        (``sqlalchemy-cmk tenants init``) *before* deploying this version: this version reads
        the column. Idempotent.
        """
        with self._engine.begin() as conn:
            self.table.create(conn, checkfirst=True)
            present = {
                c["name"].lower()
                for c in inspect(conn).get_columns(self.table.name, schema=self.table.schema)
            }
            for col in self.table.c:
                if col.name.lower() in present:
                    continue
                # Only nullable columns were ever added; a NOT NULL one missing is not an older
                # table but another table (it would need a value for every existing row).
                if not col.nullable:
                    raise ConfigurationError(
                        f"table {self.table.fullname} has no column {col.name!r}: it is not a "
                        "key registry table"
                    )
                prep = conn.dialect.identifier_preparer
                conn.execute(
                    sql_text(
                        f"ALTER TABLE {prep.format_table(self.table)} ADD COLUMN "
                        f"{prep.format_column(col)} {col.type.compile(dialect=conn.dialect)}"
                    )
                )
                _log.info("key registry: column %s added to %s", col.name, self.table.fullname)

    # -- lookups (the KeyRegistry protocol) ----------------------------------------------------

    def tenant_keys(self, tenant: str) -> TenantKeys:
        """The tenant's keys, from the cache or a verified row.

        Raises:
            TenantRevokedError: the tenant is disabled.
            TenantNotConfiguredError: the tenant is not in the registry (a tenant id that is
                not canonical never is).
            RegistryIntegrityError: the tenant's row failed its integrity check.
        """
        rec = self._lookup(tenant)
        if rec is None:
            raise self._unknown(tenant, advice=True)
        if rec.disabled:
            raise TenantRevokedError(
                f"tenant {tenant!r} is disabled in the key registry (table "
                f"{self.table.fullname}): enable it with `sqlalchemy-cmk tenants enable "
                f"{shlex.quote(tenant)}`",
                tenant=tenant,
            )
        return rec.keys

    def tenant_audit(self, tenant: str) -> TenantAudit | None:
        """The tenant's audit set-up (the :class:`~sqlalchemy_cmk.delivery.AuditDestinations`
        protocol: pass the registry as ``AuditDelivery(destinations=registry)``).

        Read through the same cache as :meth:`tenant_keys` (one row read serves both, for
        ``cache_ttl``), verified by the same MAC, invalidated the same way (this object's writes,
        :meth:`invalidate`, a :class:`~sqlalchemy_cmk.revocation.RevocationWatcher`). A disabled
        tenant's set-up is returned too: its refused accesses are events it should see.

        Returns:
            The tenant's :class:`~sqlalchemy_cmk.delivery.TenantAudit`, or None when it has none
            of its own, or is not in the registry (a tenant id that is not canonical never is).

        Raises:
            RegistryIntegrityError: the tenant's row failed its integrity check (an edited,
                swapped or replayed audit column included): never a silent None, which would
                let whoever edits the table take a tenant's monitoring away.
            ConfigurationError: the stored set-up no longer checks (a kind whose extra is not
                installed, say); the tenant's key lookups still work.
        """
        rec = self._lookup(tenant)
        return None if rec is None else rec.audit()

    def get(self, tenant: str) -> TenantRecord:
        """The tenant's verified row, read now (not from the cache), disabled or not.

        Raises:
            TenantNotConfiguredError: no such tenant.
            RegistryIntegrityError: the row failed its integrity check.
        """
        with self._engine.connect() as conn:
            found = self._load(conn, tenant)
        if found is None:
            raise self._unknown(tenant)
        return found[0]

    def list_tenants(self) -> list[TenantRecord]:
        """Every tenant's verified row, by tenant id.

        Raises:
            RegistryIntegrityError: a row failed its integrity check (``verify()`` lists them all).
        """
        with self._engine.connect() as conn:
            rows = self._rows(conn)
        return [self._verified(row)[0] for row in rows]

    def verify(
        self, expected_versions: Mapping[str, int] | None = None
    ) -> list[RegistryIntegrityError]:
        """Check every row; return one error per bad row (empty: all good). Never raises for a row.

        A row is bad when it does not parse (a wrong type, a negative version, nested or
        oversized JSON, a tenant id that is not canonical), when its MAC does not match, when
        its MAC is version 1 and ``allow_v1_macs`` is off, or when it is older than this object
        or the snapshot has seen.

        Args:
            expected_versions: Tenant -> the lowest version its row may have, e.g. from a
                snapshot of ``tenants list --json`` kept outside the database: catches a row
                (or the whole table) put back to an older state, which the MAC alone cannot.
                A tenant of the snapshot missing from the table is reported too.
        """
        problems: list[RegistryIntegrityError] = []
        present: set[str] = set()
        with self._engine.connect() as conn:
            rows = self._rows(conn)
        for row in rows:
            try:
                rec = self._verified(row)[0]
            except RegistryIntegrityError as exc:
                problems.append(exc)
                if exc.tenant is not None:
                    present.add(exc.tenant)
                continue
            present.add(rec.tenant)
            floor = (expected_versions or {}).get(rec.tenant)
            if floor is not None and rec.version < floor:
                problems.append(
                    self._rollback_error(rec.tenant, rec.version, floor, "the snapshot expects")
                )
        for tenant in sorted(set(expected_versions or {}) - present):
            problems.append(
                RegistryIntegrityError(
                    f"tenant {tenant!r} is expected but missing from the key registry "
                    f"(table {self.table.fullname}): the row was deleted",
                    tenant=tenant,
                )
            )
        return problems

    def invalidate(self, tenant: str | None = None) -> None:
        """Drop a tenant's cached lookup (all if ``None``); the next lookup reads the row."""
        with self._lock:
            self._generation += 1
            if tenant is None:
                self._cache.clear()
            else:
                self._cache.pop(tenant, None)

    # -- changes -------------------------------------------------------------------------------

    def add_tenant(
        self,
        tenant: str,
        primary: str,
        *,
        accepted: Iterable[str] = (),
        credentials: Mapping[str, str] | None = None,
    ) -> TenantRecord:
        """Add a tenant with its primary key, any other accepted keys and credential references.

        Raises:
            ConfigurationError: an invalid tenant id (see :func:`tenant_id_problem`: a non-NFC
                id is refused with its NFC form in the message, not normalized), key reference
                or credential (one that looks like a secret), or a tenant that already exists.
        """
        _check_tenant_id(tenant)
        if isinstance(accepted, str):
            raise ConfigurationError("accepted= takes a list of key references, not a str")
        refs = {_check_ref(primary, tenant)} | {_check_ref(r, tenant) for r in accepted}
        rec = TenantRecord(
            tenant,
            primary,
            tuple(sorted(refs)),
            _check_credentials(credentials, tenant),
            False,
            1,
            self._now(),
        )
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(self.table).values(**self._columns(rec)))
                notify_change(conn, self.table)
        except IntegrityError:
            raise ConfigurationError(
                f"tenant {tenant!r} already exists in the key registry: change its keys with "
                "set-primary / add-key / remove-key",
                tenant=tenant,
            ) from None
        self._written(rec, "added with primary " + primary)
        return rec

    def set_primary(
        self, tenant: str, key_ref: str, *, expected_version: int | None = None
    ) -> TenantRecord:
        """Make ``key_ref`` the tenant's primary key; the old primary stays accepted.

        New data keys are wrapped under the new key (within the caches' lifetimes: this
        object's at once, other processes' within ``cache_ttl``; call ``CMK.forget_tenant`` to
        drop CMK's current write key); rows under the old key still read.
        """
        _check_ref(key_ref, tenant)

        def change(rec: TenantRecord) -> TenantRecord | None:
            if rec.primary == key_ref:
                return None
            return replace(rec, primary=key_ref, accepted=tuple(sorted({*rec.accepted, key_ref})))

        return self._change(tenant, change, expected_version, f"primary set to {key_ref}")

    def add_key(
        self, tenant: str, key_ref: str, *, expected_version: int | None = None
    ) -> TenantRecord:
        """Accept ``key_ref`` for unwrapping (a no-op if it already is)."""
        _check_ref(key_ref, tenant)

        def change(rec: TenantRecord) -> TenantRecord | None:
            if key_ref in rec.accepted:
                return None
            return replace(rec, accepted=tuple(sorted({*rec.accepted, key_ref})))

        return self._change(tenant, change, expected_version, f"key {key_ref} accepted")

    def remove_key(
        self, tenant: str, key_ref: str, *, expected_version: int | None = None
    ) -> TenantRecord:
        """Stop accepting ``key_ref``: rows still wrapped under it will no longer read.

        Raises:
            ConfigurationError: ``key_ref`` is the primary key, or not one of the tenant's keys.
        """

        def change(rec: TenantRecord) -> TenantRecord | None:
            if key_ref == rec.primary:
                raise ConfigurationError(
                    f"{key_ref!r} is the primary key of tenant {tenant!r}: set another primary "
                    "first",
                    tenant=tenant,
                    key_ref=key_ref,
                )
            if key_ref not in rec.accepted:
                raise ConfigurationError(
                    f"{key_ref!r} is not one of tenant {tenant!r}'s keys",
                    tenant=tenant,
                    key_ref=key_ref,
                )
            return replace(rec, accepted=tuple(r for r in rec.accepted if r != key_ref))

        return self._change(tenant, change, expected_version, f"key {key_ref} removed")

    def disable(self, tenant: str, *, expected_version: int | None = None) -> TenantRecord:
        """Refuse the tenant's lookups (its data stays as it is; ``enable`` undoes this)."""
        return self._set_disabled(tenant, True, expected_version)

    def enable(self, tenant: str, *, expected_version: int | None = None) -> TenantRecord:
        """Serve the tenant's lookups again."""
        return self._set_disabled(tenant, False, expected_version)

    def set_audit(
        self, tenant: str, audit: TenantAudit | None, *, expected_version: int | None = None
    ) -> TenantRecord:
        """Set the tenant's audit destinations (``None``: remove them; its events then go only to
        the application's sinks).

        Stored in the tenant's row as canonical JSON, under the row's MAC (see the module
        docstring): editing it in SQL, moving it to another tenant or putting an older one back
        is refused like a tampered key reference. A no-op (no new version) when it is already
        what is stored. Processes see it within their ``cache_ttl``.

        Set destinations only once every process reading the registry runs a version that
        knows the column: an older one refuses the tenant's row (fail closed), as its MAC then
        covers a field that version does not read.

        Args:
            tenant: The tenant (it must be in the registry).
            audit: Its destinations and policies, or None.
            expected_version: Change only if the row is still at this version.

        Raises:
            ConfigurationError: ``audit`` is not a TenantAudit, or a destination holds what
                looks like a literal secret (the registry stores references only: ``env:NAME``,
                ``file:/path``, a secret manager's scheme); the message names the field.
            TenantNotConfiguredError: no such tenant.
            RegistryConflictError: the row changed meanwhile, or is not at ``expected_version``.
            RegistryIntegrityError: the row failed its integrity check.
        """
        if audit is not None and not isinstance(audit, TenantAudit):
            raise ConfigurationError(
                f"set_audit() takes a TenantAudit or None, not {type(audit).__name__} (build one "
                "with TenantAudit.from_dict)",
                tenant=tenant if isinstance(tenant, str) else None,
            )
        stored = None if audit is None else _audit_json(audit, tenant)

        def change(rec: TenantRecord) -> TenantRecord | None:
            return None if rec.audit_json == stored else replace(rec, audit_json=stored)

        what = "audit destinations removed" if audit is None else "audit destinations set"
        return self._change(tenant, change, expected_version, what)

    def reseal(self, new_secret: bytes) -> int:
        """Rotate the registry secret: re-MAC every row under ``new_secret``; returns the count.

        Every row is verified under the current secret first (version-1 MACs only with
        ``allow_v1_macs``) and all are rewritten, as version 2, in one transaction (each version
        bumped), so a tampered row stops the rotation before anything is written. Afterwards
        this object uses the new secret; every other process refuses the rows until it is
        restarted with the new secret, so rotate in a maintenance window or accept that lookups
        fail closed meanwhile.

        Raises:
            ConfigurationError: a weak ``new_secret``.
            RegistryIntegrityError: a row failed its check under the current secret.
            RegistryConflictError: a row changed during the rotation (nothing was written).
        """
        new_keys = _secret_keys(new_secret)
        count = self._rewrite(new_keys, self._allow_v1, only_v1=False, why="the rotation")
        _log.info("key registry: %d rows resealed under a new secret", count)
        return count

    def upgrade_macs(self) -> int:
        """Rewrite every version-1 row with a version-2 MAC, which binds ``registry_id``.

        The upgrade step for tables written before ``registry_id`` existed. Each version-1 row
        is verified under its version-1 MAC first (whatever ``allow_v1_macs`` says) and every
        version-2 row under version 2; any bad row stops the upgrade before anything is written.
        Upgraded rows get a new version. Idempotent: returns how many rows were upgraded (0 when
        none was left). Version 1 cannot tell a row copied from another deployment sharing the
        secret from your own, so review ``list_tenants()`` before upgrading: from then on the
        rows are bound to this ``registry_id``.

        Raises:
            RegistryIntegrityError: a row failed its check (nothing was written).
            RegistryConflictError: a row changed during the upgrade (nothing was written).
        """
        count = self._rewrite(self._mac_keys, True, only_v1=True, why="the MAC upgrade")
        _log.info(
            "key registry: %d rows upgraded to MAC version 2 (registry id %r)",
            count,
            self.registry_id,
        )
        return count

    # -- internals -----------------------------------------------------------------------------

    def _rewrite(self, keys: _MacKeys, allow_v1: bool, *, only_v1: bool, why: str) -> int:
        t = self.table
        now = self._now()
        with self._engine.begin() as conn:
            found = [self._verified(row, allow_v1=allow_v1) for row in self._rows(conn)]
            written = []
            for rec, mac, mac_version in found:
                if only_v1 and mac_version != 1:
                    continue
                new = replace(rec, version=rec.version + 1, updated_at=now)
                result = conn.execute(
                    update(t)
                    .where(t.c.tenant_id == rec.tenant, t.c.version == rec.version, t.c.mac == mac)
                    .values(**self._columns(new, keys))
                )
                if result.rowcount != 1:
                    raise self._conflict(rec.tenant, f"it changed during {why}")
                written.append(new)
            if written:
                notify_change(conn, t)
        with self._lock:
            self._mac_keys = keys
            self._generation += 1
            self._cache.clear()
            for new in written:
                self._seen[new.tenant] = max(self._seen.get(new.tenant, 0), new.version)
                self._seen_v2.add(new.tenant)
        return len(written)

    def _set_disabled(
        self, tenant: str, disabled: bool, expected_version: int | None
    ) -> TenantRecord:
        def change(rec: TenantRecord) -> TenantRecord | None:
            return None if rec.disabled == disabled else replace(rec, disabled=disabled)

        return self._change(tenant, change, expected_version, "disabled" if disabled else "enabled")

    def _change(
        self,
        tenant: str,
        change: Callable[[TenantRecord], TenantRecord | None],
        expected_version: int | None,
        what: str,
    ) -> TenantRecord:
        # Optimistic concurrency: read (no lock), then write only if the row still has the
        # version and MAC that were read; a concurrent writer makes this one fail, not block.
        t = self.table
        with self._engine.begin() as conn:
            found = self._load(conn, tenant)
            if found is None:
                raise self._unknown(tenant)
            rec, mac = found
            if expected_version is not None and rec.version != expected_version:
                raise self._conflict(
                    tenant, f"it is at version {rec.version}, not {expected_version}"
                )
            new = change(rec)
            if new is None:
                return rec
            new = replace(new, version=rec.version + 1, updated_at=self._now())
            result = conn.execute(
                update(t)
                .where(t.c.tenant_id == tenant, t.c.version == rec.version, t.c.mac == mac)
                .values(**self._columns(new))
            )
            if result.rowcount != 1:
                raise self._conflict(tenant, f"it changed after version {rec.version} was read")
            notify_change(conn, t)
        self._written(new, what)
        return new

    def _unknown(self, tenant: object, *, advice: bool = False) -> TenantNotConfiguredError:
        problem = tenant_id_problem(tenant)
        if problem is not None:
            why = f": it is not a valid tenant id ({problem})"
        elif advice:
            why = (
                f": add it with `sqlalchemy-cmk tenants add {shlex.quote(str(tenant))} "
                "--key <key reference>`"
            )
        else:
            why = ""
        return TenantNotConfiguredError(
            f"tenant {_shown(tenant)} is not in the key registry (table "
            f"{self.table.fullname}){why}",
            tenant=tenant if isinstance(tenant, str) else None,
        )

    def _conflict(self, tenant: str, why: str) -> RegistryConflictError:
        return RegistryConflictError(
            f"tenant {tenant!r} was changed by another writer ({why}); nothing was written: "
            "read it again and retry",
            tenant=tenant,
        )

    def _written(self, rec: TenantRecord, what: str) -> None:
        with self._lock:
            self._seen[rec.tenant] = max(self._seen.get(rec.tenant, 0), rec.version)
            self._seen_v2.add(rec.tenant)
            self._generation += 1
            self._cache.pop(rec.tenant, None)
        _log.info("key registry: tenant %r %s (version %d)", rec.tenant, what, rec.version)

    def _lookup(self, tenant: str) -> TenantRecord | None:
        if self._ttl > 0:
            now = self._clock()
            with self._lock:
                hit = self._cache.get(tenant)
                if hit is not None and hit[0] > now:
                    self._cache.move_to_end(tenant)
                    return hit[1]
        if tenant_id_problem(tenant) is not None:
            return None  # never in the table; not cached, so garbage cannot evict real tenants
        generation = self._generation
        with self._engine.connect() as conn:
            found = self._load(conn, tenant)
        rec = None if found is None else found[0]
        if self._ttl > 0:
            with self._lock:
                if self._generation != generation:
                    return rec  # invalidated meanwhile: what was read may be stale already
                self._cache[tenant] = (self._clock() + self._ttl, rec)
                self._cache.move_to_end(tenant)
                while len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
        return rec

    def _rows(self, conn: Connection, tenant: str | None = None) -> list[Mapping[str, Any]]:
        stmt = _raw_select(self.table, conn.dialect)
        if tenant is None:
            stmt = stmt.order_by(self.table.c.tenant_id)
        else:
            stmt = stmt.where(self.table.c.tenant_id == tenant)
        return [dict(row._mapping) for row in conn.execute(stmt)]

    def _load(self, conn: Connection, tenant: str) -> tuple[TenantRecord, str] | None:
        # A tenant id that is not canonical is never in the table: "unknown", and never sent to
        # the database (PostgreSQL refuses a NUL with a DataError).
        if tenant_id_problem(tenant) is not None:
            return None
        for row in self._rows(conn, tenant):
            # Compared here, code point by code point: a case- or accent-insensitive collation
            # may match other spellings, which are other tenants.
            stored = row["tenant_id"]
            if isinstance(stored, bytes | bytearray | memoryview):
                if bytes(stored) != tenant.encode("utf-8"):
                    continue
            elif stored != tenant:
                continue
            rec, mac, _ = self._verified(row)
            return rec, mac
        return None

    def _verified(
        self, row: Mapping[str, Any], *, allow_v1: bool | None = None
    ) -> tuple[TenantRecord, str, int]:
        """Parse a raw row strictly, check its MAC and version; the record, stored MAC and MAC
        version. Raises RegistryIntegrityError, and nothing else, for any bad row."""
        stored_id = row["tenant_id"]
        if isinstance(stored_id, bytes | bytearray | memoryview):
            stored_id = bytes(stored_id).decode("utf-8", "replace")
        tenant = stored_id if isinstance(stored_id, str) else None
        try:
            rec, mac = _parse(row)
        except _Malformed as exc:
            raise self._tampered(tenant, f"it does not parse: {exc}") from None
        if allow_v1 is None:
            allow_v1 = self._allow_v1
        v1_form = mac.strip().lower()  # v1 was compared case- and blank-insensitively
        mac_version = 1 if _HEX64.fullmatch(v1_form) else 2
        try:
            expected = self._mac(rec, mac_version)
        except (ValueError, struct.error):  # e.g. a lone surrogate from a JSON "\ud800" escape
            raise self._tampered(rec.tenant, "it does not parse: invalid Unicode") from None
        given = v1_form if mac_version == 1 else mac
        # As UTF-8 bytes: compare_digest refuses str with non-ASCII characters.
        if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
            raise self._tampered(rec.tenant, "its MAC does not match")
        if mac_version == 1 and not allow_v1:
            raise self._tampered(
                rec.tenant,
                "its MAC is version 1, which does not bind the registry id, and allow_v1_macs "
                "is off. If this table was written before registry_id existed, run "
                "`sqlalchemy-cmk tenants upgrade-mac` (DatabaseKeyRegistry.upgrade_macs)",
                v1=True,
            )
        with self._lock:
            if mac_version == 1 and rec.tenant in self._seen_v2:
                raise self._tampered(
                    rec.tenant,
                    "its MAC is version 1 but this process has seen the row at version 2: a "
                    "version-1 row was put back",
                    v1=True,
                )
            seen = self._seen.get(rec.tenant, 0)
            if rec.version < seen:
                raise self._rollback_error(rec.tenant, rec.version, seen)
            self._seen[rec.tenant] = rec.version
            if mac_version == 2:
                self._seen_v2.add(rec.tenant)
        return rec, mac, mac_version

    def _tampered(
        self, tenant: str | None, why: str, *, v1: bool = False
    ) -> RegistryIntegrityError:
        what = (
            f"tenant {_shown(tenant)}"
            if tenant is not None and len(tenant) <= _TENANT_MAX
            else "a tenant whose id is not text or too long"
        )
        advice = (
            ""
            if v1
            else ": it was changed outside sqlalchemy-cmk, copied from another registry, or "
            "this process has a different registry secret or registry_id; refusing to use it. "
            "Check the row, then write it again with the sqlalchemy-cmk CLI"
        )
        return RegistryIntegrityError(
            f"the key registry row of {what} (table {self.table.fullname}) failed its "
            f"integrity check ({why}){advice}",
            tenant=tenant if tenant is not None and len(tenant) <= _TENANT_MAX else None,
        )

    def _rollback_error(
        self, tenant: str, version: int, floor: int, source: str = "this process has seen"
    ) -> RegistryIntegrityError:
        return RegistryIntegrityError(
            f"the key registry row of tenant {tenant!r} (table {self.table.fullname}) is at "
            f"version {version}, older than version {floor} that {source}: an old row was put "
            "back (replayed); refusing to use it",
            tenant=tenant,
        )

    def _columns(self, rec: TenantRecord, keys: _MacKeys | None = None) -> dict[str, Any]:
        """The row to store for ``rec``, always with a version-2 MAC.

        Raises:
            ConfigurationError: the record would not fit the bounds a read enforces.
        """
        columns: dict[str, Any] = {
            "tenant_id": rec.tenant,
            "primary_key_ref": rec.primary,
            "accepted_key_refs": json.dumps(list(rec.accepted), separators=(",", ":")),
            "credentials": json.dumps(dict(sorted(rec.credentials.items())), separators=(",", ":")),
            "disabled": rec.disabled,
            "version": rec.version,
            "updated_at": rec.updated_at,
            "mac": self._mac(rec, 2, keys),
            _AUDIT_FIELD: rec.audit_json,
        }
        for name in ("accepted_key_refs", "credentials"):
            if len(columns[name]) > _JSON_MAX:
                raise ConfigurationError(
                    f"tenant {rec.tenant!r} has too many key or credential references: its "
                    f"{name} would exceed {_JSON_MAX} characters",
                    tenant=rec.tenant,
                )
        if rec.audit_json is not None and len(rec.audit_json) > _JSON_MAX:
            raise ConfigurationError(
                f"the audit set-up of tenant {rec.tenant!r} is too large: its JSON would exceed "
                f"{_JSON_MAX} characters",
                tenant=rec.tenant,
            )
        if rec.version > _VERSION_MAX:
            raise ConfigurationError(f"tenant {rec.tenant!r} is at the highest version")
        return columns

    def _mac(self, rec: TenantRecord, mac_version: int, keys: _MacKeys | None = None) -> str:
        """The MAC of ``rec`` as stored: v2 ``"v2:" + base64url``, v1 64 hex digits."""
        keys = self._mac_keys if keys is None else keys
        if mac_version == 1:
            data = _canonical(_DOMAIN_V1, self._v1_header, rec)
            return hmac.new(keys.v1, data, hashlib.sha256).hexdigest()
        data = _canonical(_DOMAIN_V2, self._v2_header, rec)
        tag = hmac.new(keys.v2, data, hashlib.sha256).digest()
        return _MAC_V2_PREFIX + base64.urlsafe_b64encode(tag).decode().rstrip("=")

    @staticmethod
    def _now() -> datetime.datetime:
        return datetime.datetime.now(datetime.timezone.utc)
