"""A key registry kept in a database table, each row integrity-protected by an HMAC.

:class:`DatabaseKeyRegistry` stores one row per tenant: its primary key reference (wraps new
data keys), every accepted reference (may still unwrap), references to the credentials a
provider uses for it (a role ARN, a client id, a secret *name*; never the secrets), a disabled
flag, a version bumped by every change, and a MAC.

The MAC is HMAC-SHA256 under a key derived (HKDF-SHA256, info ``sqlalchemy-cmk/registry/v1``)
from an application secret that is *not* in the database. It covers every other column, the
tenant id, the version and the table name, so that someone who can write to the database but
does not hold the secret cannot point a tenant at a key they control, move one tenant's row to
another, re-enable a disabled tenant or forge a new tenant: the row is refused with
:class:`RegistryIntegrityError`. Putting back an *older* row (a replay) is refused by any registry
object that has seen a newer version; a process that never saw it cannot tell (see
docs/registry.md for what this does and does not protect).

The canonical encoding the MAC covers (all integers big-endian)::

    "sqlalchemy-cmk/registry/v1"   domain separation, the same string as the HKDF info
    str  table name                strings: u32 length + UTF-8 bytes
    str  tenant id
    str  primary key reference
    u32  n, then n str             accepted key references, sorted, primary included
    u32  m, then m (str, str)      credential references, sorted by name
    u8   disabled (0 or 1)
    u64  version
    i64  updated_at                microseconds since the Unix epoch, UTC
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    RowMapping,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from .errors import (
    ConfigurationError,
    RegistryConflictError,
    RegistryIntegrityError,
    TenantNotConfiguredError,
)
from .registry import TenantKeys, parse_key_ref

__all__ = [
    "DatabaseKeyRegistry",
    "RegistryConflictError",
    "RegistryIntegrityError",
    "TenantRecord",
]

_log = logging.getLogger("sqlalchemy_cmk.registry")

_DOMAIN = b"sqlalchemy-cmk/registry/v1"
_MIN_SECRET = 32
_TENANT_MAX = 255
_U32 = struct.Struct(">I")
_TAIL = struct.Struct(">BQq")  # disabled, version, updated_at
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

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
    """

    tenant: str
    primary: str
    accepted: tuple[str, ...]
    credentials: Mapping[str, str]
    disabled: bool
    version: int
    updated_at: datetime.datetime
    _keys: TenantKeys = field(init=False, repr=False, compare=False)

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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``sqlalchemy-cmk tenants list --json`` prints)."""
        return {
            "tenant": self.tenant,
            "primary": self.primary,
            "accepted": list(self.accepted),
            "credentials": dict(self.credentials),
            "disabled": self.disabled,
            "version": self.version,
            "updated_at": self.updated_at.isoformat(),
        }


def _utc(value: datetime.datetime) -> datetime.datetime:
    # SQLite hands back naive datetimes: the registry only ever writes UTC.
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.timezone.utc)
    return value.astimezone(datetime.timezone.utc)


def _micros(value: datetime.datetime) -> int:
    delta = _utc(value) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _canonical(table: str, rec: TenantRecord) -> bytes:
    out = bytearray(_DOMAIN)

    def put(text: str) -> None:
        data = text.encode("utf-8")
        out.extend(_U32.pack(len(data)))
        out.extend(data)

    put(table)
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
    return bytes(out)


def _check_tenant_id(tenant: object) -> str:
    if not isinstance(tenant, str) or not tenant or len(tenant) > _TENANT_MAX:
        raise ConfigurationError(
            f"tenant id {tenant!r} must be a non-empty string of at most {_TENANT_MAX} characters"
        )
    return tenant


def _check_ref(ref: object, tenant: str) -> str:
    parse_key_ref(ref, tenant)
    assert isinstance(ref, str)
    return ref


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
        checked[name] = value
    return checked


def _secret_key(secret: object) -> bytes:
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
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DOMAIN)
    return hkdf.derive(bytes(secret))


def _table(metadata: MetaData, name: str, schema: str | None) -> Table:
    return Table(
        name,
        metadata,
        Column("tenant_id", String(_TENANT_MAX), primary_key=True),
        Column("primary_key_ref", Text, nullable=False),
        Column("accepted_key_refs", Text, nullable=False),  # JSON list, sorted, primary included
        Column("credentials", Text, nullable=False),  # JSON object of references
        Column("disabled", Boolean, nullable=False),
        Column("version", Integer, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("mac", String(64), nullable=False),  # hex HMAC-SHA256
        schema=schema,
        comment="sqlalchemy-cmk tenant key registry; rows are HMAC-protected, edit via the API",
    )


class DatabaseKeyRegistry:
    """Tenants' key references in a database table, integrity-protected, cached for lookups.

    Implements :class:`~sqlalchemy_cmk.registry.KeyRegistry`: pass it as ``CMK(registry=...)``.
    Manage it with this API or the ``sqlalchemy-cmk tenants`` CLI.

    Args:
        engine: The database holding the table (it may be the application's database).
        secret: At least 32 random bytes, kept outside the database (an environment variable or a
            secret manager). Every process that reads or writes the registry needs the same one.
        table_name: The table's name; part of every row's MAC, so renaming the table means
            re-adding its rows.
        schema: The table's schema, when not the default one.
        cache_ttl: Seconds a looked-up tenant (found or not) is reused; the bound on how long a
            change made by another process takes to be seen here. 0 disables the cache.
        cache_max_entries: Most tenants cached at once (least recently used dropped first).
        metadata: A ``MetaData`` to define the table in (e.g. the application's, so Alembic
            autogenerate sees it); default: a private one.
        clock: Monotonic clock for the cache, injectable for tests.

    Raises:
        ConfigurationError: a secret that is not bytes, too short or visibly not random, or
            cache limits out of range.
    """

    def __init__(
        self,
        engine: Engine,
        secret: bytes,
        *,
        table_name: str = "cmk_tenants",
        schema: str | None = None,
        cache_ttl: float = 30.0,
        cache_max_entries: int = 10_000,
        metadata: MetaData | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cache_ttl < 0 or cache_max_entries < 1:
            raise ConfigurationError("cache_ttl must be >= 0 and cache_max_entries >= 1")
        self._mac_key = _secret_key(secret)
        self._engine = engine
        self._table_name = table_name
        self.table: Table = _table(
            metadata if metadata is not None else MetaData(), table_name, schema
        )
        self._ttl = cache_ttl
        self._max_entries = cache_max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[float, TenantRecord | None]] = OrderedDict()
        # Highest version of each tenant's row this object has seen: an older row is a replay.
        self._seen: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<DatabaseKeyRegistry table={self.table.fullname!r}>"

    # -- schema --------------------------------------------------------------------------------

    def create_table(self) -> None:
        """Create the registry table if it does not exist (or use ``registry.table`` in Alembic)."""
        self.table.create(self._engine, checkfirst=True)

    # -- lookups (the KeyRegistry protocol) ----------------------------------------------------

    def tenant_keys(self, tenant: str) -> TenantKeys:
        """The tenant's keys, from the cache or a verified row.

        Raises:
            TenantNotConfiguredError: the tenant is not in the registry, or is disabled.
            RegistryIntegrityError: the tenant's row failed its integrity check.
        """
        rec = self._lookup(tenant)
        if rec is None:
            raise TenantNotConfiguredError(
                f"tenant {tenant!r} is not in the key registry (table {self.table.fullname}): "
                f"add it with `sqlalchemy-cmk tenants add {tenant} --key <key reference>`",
                tenant=tenant,
            )
        if rec.disabled:
            raise TenantNotConfiguredError(
                f"tenant {tenant!r} is disabled in the key registry (table "
                f"{self.table.fullname}): enable it with `sqlalchemy-cmk tenants enable {tenant}`",
                tenant=tenant,
            )
        return rec.keys

    def get(self, tenant: str) -> TenantRecord:
        """The tenant's verified row, read now (not from the cache), disabled or not.

        Raises:
            TenantNotConfiguredError: no such tenant.
            RegistryIntegrityError: the row failed its integrity check.
        """
        with self._engine.connect() as conn:
            found = self._load(conn, tenant)
        if found is None:
            raise TenantNotConfiguredError(
                f"tenant {tenant!r} is not in the key registry (table {self.table.fullname})",
                tenant=tenant,
            )
        return found[0]

    def list_tenants(self) -> list[TenantRecord]:
        """Every tenant's verified row, by tenant id.

        Raises:
            RegistryIntegrityError: a row failed its integrity check (``verify()`` lists them all).
        """
        with self._engine.connect() as conn:
            rows = conn.execute(select(self.table).order_by(self.table.c.tenant_id)).all()
        return [self._verified(row._mapping)[0] for row in rows]

    def verify(
        self, expected_versions: Mapping[str, int] | None = None
    ) -> list[RegistryIntegrityError]:
        """Check every row's MAC; return one error per bad row (empty: all good).

        Args:
            expected_versions: Tenant -> the lowest version its row may have, e.g. from a
                snapshot of ``tenants list --json`` kept outside the database: catches a row
                (or the whole table) put back to an older state, which the MAC alone cannot.
                A tenant of the snapshot missing from the table is reported too.
        """
        problems: list[RegistryIntegrityError] = []
        present: set[str] = set()
        with self._engine.connect() as conn:
            rows = conn.execute(select(self.table).order_by(self.table.c.tenant_id)).all()
        for row in rows:
            try:
                rec = self._verified(row._mapping)[0]
            except RegistryIntegrityError as exc:
                problems.append(exc)
                continue
            present.add(rec.tenant)
            floor = (expected_versions or {}).get(rec.tenant)
            if floor is not None and rec.version < floor:
                problems.append(
                    self._rollback_error(rec.tenant, rec.version, floor, "the snapshot expects")
                )
        for tenant in sorted(set(expected_versions or {}) - present):
            if not any(p.tenant == tenant for p in problems):
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
            ConfigurationError: an invalid tenant id, key reference or credential (one that looks
                like a secret), or a tenant that already exists.
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

    def reseal(self, new_secret: bytes) -> int:
        """Rotate the registry secret: re-MAC every row under ``new_secret``; returns the count.

        Every row is verified under the current secret first and all are rewritten in one
        transaction (each version bumped), so a tampered row stops the rotation before anything
        is written. Afterwards this object uses the new secret; every other process refuses the
        rows until it is restarted with the new secret, so rotate in a maintenance window or
        accept that lookups fail closed meanwhile.

        Raises:
            ConfigurationError: a weak ``new_secret``.
            RegistryIntegrityError: a row failed its check under the current secret.
            RegistryConflictError: a row changed during the rotation (nothing was written).
        """
        new_key = _secret_key(new_secret)
        t = self.table
        now = self._now()
        with self._engine.begin() as conn:
            rows = conn.execute(select(t).order_by(t.c.tenant_id)).all()
            found = [self._verified(row._mapping) for row in rows]
            written = []
            for rec, mac in found:
                new = replace(rec, version=rec.version + 1, updated_at=now)
                result = conn.execute(
                    update(t)
                    .where(t.c.tenant_id == rec.tenant, t.c.version == rec.version, t.c.mac == mac)
                    .values(**self._columns(new, new_key))
                )
                if result.rowcount != 1:
                    raise self._conflict(rec.tenant, "it changed during the rotation")
                written.append(new)
        with self._lock:
            self._mac_key = new_key
            self._cache.clear()
            for new in written:
                self._seen[new.tenant] = max(self._seen.get(new.tenant, 0), new.version)
        _log.info("key registry: %d rows resealed under a new secret", len(written))
        return len(written)

    # -- internals -----------------------------------------------------------------------------

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
                raise TenantNotConfiguredError(
                    f"tenant {tenant!r} is not in the key registry (table {t.fullname})",
                    tenant=tenant,
                )
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
        self._written(new, what)
        return new

    def _conflict(self, tenant: str, why: str) -> RegistryConflictError:
        return RegistryConflictError(
            f"tenant {tenant!r} was changed by another writer ({why}); nothing was written: "
            "read it again and retry",
            tenant=tenant,
        )

    def _written(self, rec: TenantRecord, what: str) -> None:
        with self._lock:
            self._seen[rec.tenant] = max(self._seen.get(rec.tenant, 0), rec.version)
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
        with self._engine.connect() as conn:
            found = self._load(conn, tenant)
        rec = None if found is None else found[0]
        if self._ttl > 0:
            with self._lock:
                self._cache[tenant] = (self._clock() + self._ttl, rec)
                self._cache.move_to_end(tenant)
                while len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
        return rec

    def _load(self, conn: Connection, tenant: str) -> tuple[TenantRecord, str] | None:
        row = conn.execute(select(self.table).where(self.table.c.tenant_id == tenant)).first()
        if row is None:
            return None
        found = self._verified(row._mapping)
        if found[0].tenant != tenant:  # a collation that matched another spelling
            raise self._tampered(tenant, "its tenant id does not match")
        return found

    def _verified(self, row: RowMapping) -> tuple[TenantRecord, str]:
        """Parse a row strictly and check its MAC and version; the record and its stored MAC."""
        tenant = str(row["tenant_id"])
        try:
            accepted = json.loads(row["accepted_key_refs"])
            credentials = json.loads(row["credentials"])
            if not (
                isinstance(accepted, list)
                and all(isinstance(r, str) for r in accepted)
                and isinstance(credentials, dict)
                and all(isinstance(v, str) for v in credentials.values())
                and isinstance(row["primary_key_ref"], str)
                and isinstance(row["version"], int)
                and isinstance(row["updated_at"], datetime.datetime)
                and isinstance(row["mac"], str)
            ):
                raise ValueError("unexpected types")
            rec = TenantRecord(
                tenant,
                row["primary_key_ref"],
                tuple(sorted(set(accepted))),
                credentials,
                bool(row["disabled"]),
                row["version"],
                _utc(row["updated_at"]),
            )
        except (ValueError, TypeError, ConfigurationError):
            raise self._tampered(tenant, "it does not parse") from None
        expected = hmac.new(self._mac_key, _canonical(self._table_name, rec), hashlib.sha256)
        if not hmac.compare_digest(expected.hexdigest(), row["mac"].strip().lower()):
            raise self._tampered(tenant, "its MAC does not match")
        with self._lock:
            seen = self._seen.get(tenant, 0)
            if rec.version < seen:
                raise self._rollback_error(tenant, rec.version, seen)
            self._seen[tenant] = rec.version
        return rec, row["mac"]

    def _tampered(self, tenant: str, why: str) -> RegistryIntegrityError:
        return RegistryIntegrityError(
            f"the key registry row of tenant {tenant!r} (table {self.table.fullname}) failed "
            f"its integrity check ({why}): it was changed outside sqlalchemy-cmk, or this "
            "process has a different registry secret; refusing to use it. Check the row, then "
            "write it again with the sqlalchemy-cmk CLI",
            tenant=tenant,
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

    def _columns(self, rec: TenantRecord, mac_key: bytes | None = None) -> dict[str, Any]:
        key = self._mac_key if mac_key is None else mac_key
        mac = hmac.new(key, _canonical(self._table_name, rec), hashlib.sha256)
        return {
            "tenant_id": rec.tenant,
            "primary_key_ref": rec.primary,
            "accepted_key_refs": json.dumps(list(rec.accepted), separators=(",", ":")),
            "credentials": json.dumps(dict(sorted(rec.credentials.items())), separators=(",", ":")),
            "disabled": rec.disabled,
            "version": rec.version,
            "updated_at": rec.updated_at,
            "mac": mac.hexdigest(),
        }

    @staticmethod
    def _now() -> datetime.datetime:
        return datetime.datetime.now(datetime.timezone.utc)
