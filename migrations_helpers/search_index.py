"""Online, resumable builds and key rotations of blind indexes (searchable encrypted columns).

A blind index (``EncryptedType(..., search=BlindIndex(...))``) is written by every application
write, but rows written before the column became searchable, or before a rotation began, hold
no value (or the previous key version's) in the slot a search will read. The functions here
fill it, online, on the backfill engine of :mod:`migrations_helpers.backfill` (the walk by
primary key, a transaction and a compare-and-swap per batch, each row opened under its own
tenant's key and audited), and move the index's state one phase at a time:

=========================  ==================================================================
call                       what it does
=========================  ==================================================================
:func:`build_index`        no state (or ``building``) -> wait -> fill the current slot ->
                           ``ready``; on a ready index: only :func:`verify_index`
:func:`rotate_index`       ``ready(s, v, b)`` -> ``rotating(s, v, b, other=(v+1, b'))`` -> wait
                           -> fill slot ``1-s`` with key version ``v+1`` ->
                           ``switched(1-s, v+1, b', other=(v, b))`` -> wait ->
                           ``ready(1-s, v+1, b')``
:func:`index_status`       per domain its state, per table rows done and pending (no keys)
:func:`verify_index`       recompute every row's read slot (and both write slots while
                           rotating or switched); mismatches counted by tenant, never values
=========================  ==================================================================

Why the waits. Every process caches a domain's state for ``CMK(search_state_ttl=...)``
seconds, so after a state change some processes still act on the previous state for up to that
long. The core's phases are designed so that any two *adjacent* phases are safe together
(``sqlalchemy_cmk._search``), and the tools here never move a domain on before ``settle``
seconds (by default twice the CMK's ``search_state_ttl``) have passed since the last move:
then no process is two phases behind. In particular, the walk filling the new slot starts
only once every process writes both slots, so no application write after the walk can leave
the new slot empty.

Why the walk never overwrites an application write with a stale index: each row's update
compares the tenant, the encrypted value, the companion (EDEK) and both slots with what was
read (compare-and-swap); a row the application changed in between is left to the
application, which (after the wait) computed its slots under the same state.

Every state change is a compare-and-swap on the state row (``UPDATE ... WHERE phase = :old
AND slot = :old AND version = :old``), so two operators running the same rotation cannot both
move it; the one that loses re-reads the state and continues from there (or does nothing).
Resuming a killed run is running it again: the state row says which phase the domain is in,
its ``updated_at`` how much of the wait is left, and the walk selects only the rows whose slots
are missing, of another key version or of another width.

Running several processes at once is safe (on PostgreSQL and MariaDB 10.6+ they share the walk
through ``FOR UPDATE SKIP LOCKED``; see :func:`migrations_helpers.backfill.parallel_workers`).
"""

from __future__ import annotations

import datetime
import functools
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Engine,
    LargeBinary,
    MetaData,
    Table,
    and_,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from sqlalchemy_cmk import CMK, TenantContext, _codecs
from sqlalchemy_cmk import _search as _core
from sqlalchemy_cmk import search as _s
from sqlalchemy_cmk._access import access, claimed_tenant
from sqlalchemy_cmk.errors import CMKError, ConfigurationError, DecryptionError
from sqlalchemy_cmk.types import EDEKType, EncryptedType

from .backfill import (
    _SPLIT,
    Models,
    ProgressCallback,
    Report,
    _as_bytes,
    _Batch,
    _budgeted,
    _check_batch_args,
    _check_row_tenant,
    _codec_of_tag,
    _Crypto,
    _note_claim,
    _now,
    _pk_repr,
    _require_tenant,
    _scrubbed,
    _Target,
    _target,
    _total,
    _walk,
    _with,
)

__all__ = [
    "IndexReport",
    "IndexStatus",
    "IndexVerifyReport",
    "build_index",
    "index_status",
    "rotate_index",
    "verify_index",
]

_HEADER = struct.Struct(">BI")  # an index value's format byte and key version (search.py)


# -- reports -------------------------------------------------------------------------------------


@dataclass
class IndexVerifyReport:
    """Rows of one index domain checked by :func:`verify_index`, counted by tenant.

    ``mismatched`` counts rows where a slot that must hold the row's index value does not
    (missing, of another key version, or another value); ``failed`` rows whose value did not
    decrypt. No value is ever reported, only counts and the first rows' primary keys.
    """

    domain: str
    phase: str
    checked: int = 0
    ok: dict[str, int] = field(default_factory=dict)
    mismatched: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    # (table, primary key, tenant, "mismatch" or "failed"): the first 1,000
    failures: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.mismatched and not self.failed


@dataclass
class IndexReport:
    """What one call of :func:`build_index` or :func:`rotate_index` did."""

    operation: str  # "build" or "rotate"
    domain: str
    phase: str  # the state the call left the domain in
    version: int
    bits: int
    steps: list[str] = field(default_factory=list)  # state changes made, "ready -> rotating"
    # rows whose slots this call wrote (without row locks, as on SQLite, a row another worker
    # wrote with the very same value in between counts too)
    rows: int = 0
    conflicts: int = 0  # rows an application write changed in between (left to it)
    by_table: dict[str, int] = field(default_factory=dict)
    waited: float = 0.0  # seconds spent waiting for every process to see a state
    seconds: float = 0.0
    verify: IndexVerifyReport | None = None  # a rerun on a finished index only verifies


@dataclass
class IndexStatus:
    """One domain's state and, per table, rows whose slots are done or still to fill."""

    domain: str
    phase: str
    slot: int
    version: int
    bits: int
    other_version: int | None
    other_bits: int | None
    tables: dict[str, dict[str, int]]  # table -> {"done": n, "pending": n}


# -- the domain: its members in the models, its state row ---------------------------------------


@dataclass(frozen=True)
class _Member:
    """One searchable column whose blind index belongs to the domain."""

    table: Table  # the model's table
    column: Column[Any]
    name: str  # the index's name: its slot columns are name and name_alt
    index: _s.BlindIndex

    @property
    def slots(self) -> tuple[str, str]:
        return _core.slot_columns(self.name)

    @property
    def codec(self) -> _codecs.Codec:
        codec: _codecs.Codec = self.column.type.codec  # type: ignore[attr-defined]
        return codec


def _metadatas(metadata: Models) -> list[MetaData | Table]:
    sources = list(metadata) if isinstance(metadata, list | tuple) else [metadata]
    out: list[MetaData | Table] = []
    for source in sources:
        md = source if isinstance(source, MetaData | Table) else getattr(source, "metadata", None)
        if not isinstance(md, MetaData | Table):
            raise ConfigurationError(
                "metadata= takes a MetaData, a declarative base or a Table, "
                f"not {type(source).__name__}"
            )
        out.append(md)
    return out


def _all_members(metadata: Models) -> dict[str, list[_Member]]:
    """Every blind index of the models, by domain."""
    found: dict[str, list[_Member]] = {}
    for md in _metadatas(metadata):
        tables = [md] if isinstance(md, Table) else list(md.tables.values())
        for table in tables:
            for column in table.columns:
                if not isinstance(column.type, EncryptedType) or not column.type.search:
                    continue
                for name, ix in _core.index_names(column):
                    domain = ix.domain or f"{table.name}.{name}"
                    found.setdefault(domain, []).append(_Member(table, column, name, ix))
    return found


def _domain(metadata: Models, index: str) -> tuple[str, list[_Member]]:
    """The domain ``index`` names ("table.index_name" or a shared domain) and its members."""
    if not isinstance(index, str) or not index:
        raise ConfigurationError('index must be "table.index_name" or an index domain')
    every = _all_members(metadata)
    if index in every:
        members = every[index]
    else:
        table, _, name = index.rpartition(".")
        hits = [
            (d, ms)
            for d, ms in every.items()
            if any(m.table.name == table and m.name == name for m in ms)
        ]
        if not hits:
            known = sorted(every) or ["(none: no column of the models has search=)"]
            raise ConfigurationError(
                f"the models given have no blind index {index!r}: name one as "
                f'"table.index_name" or by its domain; known domains: {", ".join(known)}'
            )
        index, members = hits[0]
    first = members[0].index
    for m in members[1:]:
        if m.index.fingerprint != first.fingerprint or m.index.width != first.width:
            raise ConfigurationError(
                f"blind index domain {index!r}: {m.table.name}.{m.name} declares another "
                "normalizer, transform or width than "
                f"{members[0].table.name}.{members[0].name}; indexes sharing a domain must "
                "be declared alike",
                table=m.table.name,
                column=m.column.name,
            )
    return index, members


def _states_table() -> Table:
    return _s.search_tables(MetaData())[1]


def _read(conn: Connection, domain: str) -> tuple[_core.DomainState, datetime.datetime] | None:
    states = _states_table()
    row = conn.execute(select(states).where(states.c.domain == domain)).first()
    if row is None:
        return None
    at = row.updated_at
    if at.tzinfo is None:
        at = at.replace(tzinfo=datetime.timezone.utc)
    return _core._row_state(row), at


def _require_states(engine: Engine) -> None:
    if not sa_inspect(engine).has_table(_s.STATES_TABLE):
        raise ConfigurationError(
            f"table {_s.STATES_TABLE} does not exist: create it with the application's schema "
            "(sqlalchemy_cmk.search.search_tables(metadata), then create_all or an Alembic "
            "migration) before building a blind index"
        )


def _state(
    engine: Engine, domain: str, members: Sequence[_Member]
) -> tuple[_core.DomainState, datetime.datetime] | None:
    with engine.connect() as conn:
        found = _read(conn, domain)
    if found is not None and found[0].fingerprint != members[0].index.fingerprint:
        raise ConfigurationError(
            f"blind index domain {domain!r} was built with {found[0].fingerprint!r}, and the "
            f"models declare {members[0].index.fingerprint!r}: a changed normalizer or "
            "transform needs a new index (a new name), built anew",
            table=members[0].table.name,
            column=members[0].column.name,
        )
    return found


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _values(state: _core.DomainState) -> dict[str, Any]:
    return {
        "phase": state.phase,
        "slot": state.slot,
        "version": state.version,
        "bits": state.bits,
        "other_version": state.other_version,
        "other_bits": state.other_bits,
        "fingerprint": state.fingerprint,
        "updated_at": _utcnow(),
    }


def _create(engine: Engine, domain: str, state: _core.DomainState) -> bool:
    """Insert the domain's first state; False if another process inserted one first."""
    states = _states_table()
    try:
        with engine.begin() as conn:
            conn.execute(states.insert().values(domain=domain, **_values(state)))
    except IntegrityError:
        return False
    return True


def _swap(engine: Engine, domain: str, old: _core.DomainState, new: _core.DomainState) -> bool:
    """Move the domain from ``old`` to ``new``: compare-and-swap on phase, slot and version."""
    states = _states_table()
    with engine.begin() as conn:
        result = conn.execute(
            update(states)
            .where(
                states.c.domain == domain,
                states.c.phase == old.phase,
                states.c.slot == old.slot,
                states.c.version == old.version,
            )
            .values(**_values(new))
        )
    return bool(result.rowcount == 1)


#: The longest wait between two phases: a longer one is a typo, and time.sleep() overflows
#: somewhere past it, after the state has moved.
MAX_SETTLE = 86400.0


def _settle(cmk: CMK, settle: float | None) -> float:
    # Checked before anything moves. NaN passes a ">= 0" test and then waits nothing (the
    # wait that keeps every process in adjacent phases), infinity moves the state and then
    # overflows the sleep: neither is a number of seconds.
    if settle is None:
        derived = 2.0 * float(cmk._search.ttl)
        if not math.isfinite(derived) or derived > MAX_SETTLE:
            raise ConfigurationError(
                f"twice the CMK's search_state_ttl ({cmk._search.ttl!r}) is not a wait of at "
                f"most {MAX_SETTLE:g} seconds: pass settle= explicitly"
            )
        return derived
    if (
        isinstance(settle, bool)
        or not isinstance(settle, int | float)
        or not math.isfinite(settle)
        or not 0 <= settle <= MAX_SETTLE
    ):
        raise ConfigurationError(
            f"settle must be a number of seconds from 0 to {MAX_SETTLE:g}, not {settle!r}"
        )
    return float(settle)


def _wait(since: datetime.datetime, settle: float, sleep: Callable[[float], None]) -> float:
    """Sleep out what is left of ``settle`` seconds after the state was written at ``since``
    (all of it if the clocks disagree by more than that)."""
    age = (_utcnow() - since).total_seconds()
    left = settle if age < 0 else max(0.0, settle - age)
    if left > 0:
        sleep(left)
    return left


# -- the walk -------------------------------------------------------------------------------------


def _companion(table: Table) -> str:
    found = [c.name for c in table.columns if isinstance(c.type, EDEKType)]
    if len(found) != 1:
        raise ConfigurationError(
            f"{table.name}: a searchable table needs exactly one companion (EDEKType) column",
            table=table.name,
        )
    return found[0]


@dataclass
class _Plan:
    """One table of the domain: its backfill target, and where each member's columns are."""

    tgt: _Target
    # member, its source's column index, slot -> the slot column's index (the slots taken)
    members: list[tuple[_Member, int, dict[int, int]]]


def _plan(
    engine: Engine, table: Table, members: Sequence[_Member], slots: Sequence[int] = (0, 1)
) -> _Plan:
    """The target over the members' sources and the slot columns ``slots`` (a walk takes only
    the slots it fills: the rows it sends and compares are then the smallest they can be)."""
    sources: list[str] = []
    for m in members:
        if m.column.name not in sources:
            sources.append(m.column.name)
    names = [m.slots[k] for m in members for k in slots]
    tgt = _target(
        engine,
        table.name,
        [*sources, *names],
        tenant_column=None,
        companion_column=_companion(table),
        schema=table.schema,
        metadata=table,
    )
    placed = []
    for m in members:
        i = sources.index(m.column.name)
        placed.append((m, i, {k: len(sources) + names.index(m.slots[k]) for k in slots}))
    return _Plan(tgt, placed)


def _by_table(members: Sequence[_Member]) -> dict[Table, list[_Member]]:
    out: dict[Table, list[_Member]] = {}
    for m in members:
        out.setdefault(m.table, []).append(m)
    return out


def _slot_ok(col: Any, version: int, bits: int) -> ColumnElement[bool]:
    """SQL: an index value of ``version`` and ``bits`` (what the walk cannot tell without
    keys is whether it is the row's; :func:`verify_index` checks that)."""
    header = literal(_HEADER.pack(_s.FORMAT, version), LargeBinary())
    return and_(
        col.is_not(None),
        func.length(col) == _s.HEADER_SIZE + (bits + 7) // 8,
        func.substr(col, 1, _s.HEADER_SIZE) == header,
    )


def _pending(
    plan: _Plan, writes: Sequence[tuple[int, int, int]], full: bool
) -> ColumnElement[bool]:
    """SQL: rows the walk must look at. A derived index's value may rightly be NULL beside a
    value (its transform gave none): such rows stay candidates, and are seen once per pass."""
    cols = plan.tgt.cols
    conds: list[ColumnElement[bool]] = []
    for _m, i, pair in plan.members:
        src = cols[i]
        for slot, version, bits in writes:
            sc = cols[pair[slot]]
            if full:
                conds.append(or_(src.is_not(None), sc.is_not(None)))
            else:
                conds.append(
                    or_(
                        and_(src.is_(None), sc.is_not(None)),
                        and_(src.is_not(None), ~_slot_ok(sc, version, bits)),
                    )
                )
    return or_(*conds) if conds else true()


class _Indexer:
    """Index values of one call: each row's value opened under its own key (through the
    call's :class:`_Crypto`, audited per tenant), prepared, and MACed under its tenant's index
    key of each version written, as ``sqlalchemy_cmk._search.compute`` does.

    The index keys are derived once per tenant, domain and version and batch (``compute``
    would ask the key manager per value), and each tenant's root key is created on first use,
    as an application write would (``create=True``).
    """

    def __init__(self, cmk: CMK, domain: str, actor: str) -> None:
        self.cmk = cmk
        self.domain = domain
        self.actor = actor
        self.store = cmk._search

    def keys(
        self,
        conn: Connection,
        tenants: Sequence[str],
        versions: Sequence[int],
        *,
        create: bool = True,
    ) -> dict[tuple[str, int], bytes]:
        """Index keys by (tenant, version); without ``create``, none for a tenant that has
        no root key."""
        reader = _core._Reader(lambda: conn)
        out: dict[tuple[str, int], bytes] = {}
        for tenant in tenants:
            ctx = TenantContext(tenant_id=tenant, actor=self.actor)
            if create:
                env: bytes | None = self.store.create_root(reader, tenant, ctx)
            else:
                env = self.store.root_envelope(reader, tenant)
            if env is None:
                continue
            for v in set(versions):
                out[(tenant, v)] = self.store.index_key(env, self.domain, v, ctx)
        return out

    def opened(
        self,
        plan: _Plan,
        rows: Sequence[Any],
        crypto: _Crypto,
        source_idx: Sequence[int],
        counts: dict[str, int] | None = None,
    ) -> list[dict[int, Any]]:
        """Each row's decoded source values (source index -> value); raises on a value that
        does not decrypt, naming the row only. One access: a refusal is audited once, for
        the call's cross-tenant context, before it propagates (``_access``). The rows opened
        are audited per tenant, or, with ``counts``, added to it for the caller's access to
        audit (once all its attempts are done)."""
        with access(crypto.km, crypto.ctx, "decrypt") as acc:
            acc.table(plan.tgt.name, plan.tgt.names)
            return self._opened(plan, rows, crypto, source_idx, counts)

    def _opened(
        self,
        plan: _Plan,
        rows: Sequence[Any],
        crypto: _Crypto,
        source_idx: Sequence[int],
        counts: dict[str, int] | None,
    ) -> list[dict[int, Any]]:
        tgt = plan.tgt
        codecs = {i: m.codec for m, i, _ in plan.members}
        # Tenants first, as a load and backfill's _open_batch check them: nothing is unwrapped
        # for a batch refused for another tenant's EDEK in one of its rows.
        # Only the keys of rows with a value to open are unwrapped (not those of plaintext rows).
        envelopes: list[bytes] = []
        for row in rows:
            tenant = _require_tenant(tgt, row[0], row[1])
            if row[-1] is not None and any(
                tgt.ciphertext(i, row[2 + i]) is not None for i in source_idx
            ):
                _check_row_tenant(tgt, row[0], tenant, bytes(row[-1]), crypto)
                envelopes.append(bytes(row[-1])[_SPLIT:])
        errors = crypto.load(envelopes)
        out: list[dict[int, Any]] = []
        by_tenant: dict[str, int] = {}
        for row in rows:
            comp = _as_bytes(row[-1])
            values: dict[int, Any] = {}
            tenant = _require_tenant(tgt, row[0], row[1])
            decrypted = False
            for i in source_idx:
                v = row[2 + i]
                ct = tgt.ciphertext(i, v)
                if ct is None:
                    if v is not None:  # plaintext of an in-place encryption not yet done
                        values[i] = v
                    continue
                if comp is None:
                    _note_claim(crypto, comp, tenant)
                    raise DecryptionError(
                        f"row {_pk_repr(row[0])} of {tgt.label()!r} holds an encrypted value "
                        "but its EDEK column is NULL",
                        table=tgt.name,
                    )
                error = errors.get(comp[_SPLIT:])
                if error is not None:
                    raise error
                try:
                    raw = crypto.open(comp, tgt.cols[i].name, ct)
                except DecryptionError:
                    _note_claim(crypto, comp, tenant)
                    raise DecryptionError(
                        f"row {_pk_repr(row[0])} of {tgt.label()!r} did not decrypt; nothing "
                        "of its batch was written: run verify for a full report",
                        table=tgt.name,
                    ) from None
                codec = codecs[i]
                if not raw or raw[0] != codec.tag:
                    codec = _codec_of_tag(raw[0] if raw else 0, tgt.name, tgt.cols[i].name)
                values[i] = _codecs.decode(codec, raw, table=tgt.name, column=tgt.cols[i].name)
                decrypted = True
            # Audited as decrypted under the tenant's key only if a value was: a row of plaintext
            # (an in-place encryption not yet done) opens nothing, and its tenant column is the
            # row's word alone, which puts no access in any tenant's trail.
            if decrypted:
                by_tenant[tenant] = by_tenant.get(tenant, 0) + 1
            out.append(values)
        if counts is None:
            crypto.audit(by_tenant)
        else:
            for tenant, n in by_tenant.items():
                counts[tenant] = counts.get(tenant, 0) + n
        return out

    def expected(
        self,
        plan: _Plan,
        rows: Sequence[Any],
        values: Sequence[dict[int, Any]],
        keys: dict[tuple[str, int], bytes],
        writes: Sequence[tuple[int, int, int]],
    ) -> list[dict[int, bytes | None]]:
        """Per row, column index -> the value each written slot must hold."""
        tgt = plan.tgt
        out: list[dict[int, bytes | None]] = []
        for row, vals in zip(rows, values, strict=True):
            tenant = str(row[1])
            want: dict[int, bytes | None] = {}
            for m, i, pair in plan.members:
                value = vals.get(i)
                prepared = None if value is None else m.index.prepare(value)
                msg = None
                if prepared is not None:
                    msg = _s.message(
                        prepared,
                        m.codec if m.index.transform is None else None,
                        table=tgt.name,
                        column=m.column.name,
                    )
                for slot, version, bits in writes:
                    want[pair[slot]] = (
                        None
                        if msg is None
                        else _s.index_value(keys[(tenant, version)], version, bits, msg)
                    )
            out.append(want)
        return out


def _fill(
    engine: Engine,
    cmk: CMK,
    domain: str,
    members: Sequence[_Member],
    state: _core.DomainState,
    report: IndexReport,
    *,
    batch_size: int,
    progress: ProgressCallback | None,
    actor: str,
    full: bool,
    started: float,
) -> None:
    """Walk every table of the domain and write each row's values of the slot to fill, where
    they differ, with compare-and-swap: while building, the one slot written; while rotating,
    the new one (the current slot, complete since the build, is kept by every write)."""
    if state.phase == "rotating":
        assert state.other_version is not None and state.other_bits is not None
        writes = [(1 - state.slot, state.other_version, state.other_bits)]
    else:
        writes = [state.read]
    versions = [v for _, v, _ in writes]
    indexer = _Indexer(cmk, domain, actor)
    for table, ms in _by_table(members).items():
        plan = _plan(engine, table, ms, [slot for slot, _, _ in writes])
        tgt = plan.tgt
        sources = sorted({i for _, i, _ in plan.members})
        pending = _pending(plan, writes, full)
        part_report = Report("index", table.name, tgt.names)

        def handle(
            conn: Connection,
            rows: Sequence[Any],
            part: Report,
            crypto: _Crypto,
            plan: _Plan = plan,
            sources: list[int] = sources,
        ) -> None:
            values = indexer.opened(plan, rows, crypto, sources)
            tenants = sorted({str(row[1]) for row, v in zip(rows, values, strict=True) if v})
            keys = indexer.keys(conn, tenants, versions)
            wanted = indexer.expected(plan, rows, values, keys, writes)
            batch = _Batch(plan.tgt)
            for row, want in zip(rows, wanted, strict=True):
                old = tuple(row[2 : 2 + len(plan.tgt.cols)])
                new = list(old)
                changed = False
                for j, value in want.items():
                    stored = _as_bytes(old[j])
                    if stored != value:
                        new[j] = value
                        changed = True
                if changed:
                    comp = _as_bytes(row[-1])
                    batch.add(row[0], row[1], old, new, comp, comp, str(row[1]))
            batch.apply(conn, part)

        with _Crypto(cmk, tgt, actor) as crypto:
            _walk(
                engine,
                tgt,
                part_report,
                pending=pending,
                handle=functools.partial(_with, handle, crypto),
                batch_size=batch_size,
                max_batches=None,
                progress=progress,
                started=started,
                total=_total(engine, tgt, pending) if progress is not None else None,
                max_passes=2,
            )
        report.rows += part_report.rows
        report.conflicts += part_report.conflicts
        report.by_table[table.name] = report.by_table.get(table.name, 0) + part_report.rows


# -- public API -----------------------------------------------------------------------------------


def _new(phase: str, slot: int, version: int, bits: int, other: Any, fp: str) -> _core.DomainState:
    ov, ob = other if other is not None else (None, None)
    return _core.DomainState(phase, slot, version, bits, ov, ob, fp)


@_scrubbed("build_index")
@_budgeted
def build_index(
    engine: Engine,
    cmk: CMK,
    metadata: Models,
    index: str,
    *,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk search",
    settle: float | None = None,
    full: bool = False,
    max_kms_rps: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> IndexReport:
    """Build a blind index over the rows that exist: fill its slot for every row, then make it
    searchable (phase ``ready``).

    Deploy the application with the column declared searchable first: from then on every
    write fills the index, and this call does the rows written before. If the domain has no
    state yet, it is created as ``building`` (what every process assumes without one) and the
    call waits ``settle`` seconds so every process has read it; then each table of the domain
    is walked by primary key (see :mod:`migrations_helpers.backfill`): rows whose slot is
    missing, or of another key version or width (all rows with ``full=True``) are decrypted,
    each under its own tenant's key (audited as a decrypt), their index values computed under
    the tenant's index key (its root key created if it has none, as an application write
    would) and written with compare-and-swap. Then the state moves to ``ready``.

    Rerunning finishes a killed run; on a ready (or rotating) index the call only verifies
    (:func:`verify_index`, in ``report.verify``), after, with ``full=True`` on a ready index,
    recomputing every row's read slot (a repair, for rows a process wrote without the index).

    Args:
        engine: The database.
        cmk: The application's CMK (its tenants' keys).
        metadata: The models (a MetaData, a declarative base, a Table, or a list of them).
        index: ``"table.index_name"`` (``"users.email_bidx"``) or a domain shared by several
            tables (``BlindIndex(domain=...)``): every member is built.
        batch_size: Rows per batch (one transaction each).
        progress: Called after every batch.
        actor: The audit events' actor.
        settle: Seconds to wait after a state change before acting on it; default twice the
            CMK's ``search_state_ttl``. Shorter than the ttl of any process is unsafe.
        full: Recompute every row, not only those whose slot is missing or of another
            version (for an index a process wrote wrongly: see :func:`verify_index`).
        max_kms_rps: KMS requests per second for the whole call.
        sleep: The waiting seam (tests).

    Returns:
        What the call did.

    Raises:
        ConfigurationError: unknown index; the states table missing; the state's fingerprint
            differs from the declaration.
        MigrationDatabaseError: the database refused a batch (a unique index found two rows
            of one tenant with the same value: names the row, never a value).
    """
    _check_batch_args(batch_size)
    started = _now()
    wait = _settle(cmk, settle)
    domain, members = _domain(metadata, index)
    _require_states(engine)
    ix = members[0].index
    found = _state(engine, domain, members)
    if found is None:
        fresh = _core.default_state(ix)
        if _create(engine, domain, fresh):
            found = (fresh, _utcnow())
            steps = ["(none) -> building"]
        else:
            found = _state(engine, domain, members)
            steps = []
        assert found is not None
    else:
        steps = []
    state, since = found
    report = IndexReport("build", domain, state.phase, state.version, state.bits, steps)
    if state.phase != "building":
        if full and state.phase == "ready":  # repair: every row's read slot, recomputed
            _fill(
                engine,
                cmk,
                domain,
                members,
                state,
                report,
                batch_size=batch_size,
                progress=progress,
                actor=actor,
                full=True,
                started=started,
            )
        report.verify = verify_index(engine, cmk, metadata, domain, actor=actor)
        report.seconds = _now() - started
        return report
    report.waited += _wait(since, wait, sleep)
    _fill(
        engine,
        cmk,
        domain,
        members,
        state,
        report,
        batch_size=batch_size,
        progress=progress,
        actor=actor,
        full=full,
        started=started,
    )
    ready = _new("ready", state.slot, state.version, state.bits, None, state.fingerprint)
    if _swap(engine, domain, state, ready):
        report.steps.append("building -> ready")
        state = ready
    else:
        now = _state(engine, domain, members)
        assert now is not None
        state = now[0]  # another process finished it first
    report.phase, report.version, report.bits = state.phase, state.version, state.bits
    report.seconds = _now() - started
    return report


@_scrubbed("rotate_index")
@_budgeted
def rotate_index(
    engine: Engine,
    cmk: CMK,
    metadata: Models,
    index: str,
    *,
    bits: int | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    actor: str = "sqlalchemy-cmk search",
    settle: float | None = None,
    max_kms_rps: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> IndexReport:
    """Rotate a blind index to its next key version (and, with ``bits``, a new width), online.

    ``ready(s, v, b)`` -> ``rotating(s, v, b, other=(v+1, bits or b))``: every process writes
    both slots and still reads slot ``s``; after ``settle`` seconds the call fills slot
    ``1-s`` with version ``v+1`` for every row, then -> ``switched(1-s, v+1, b', other=(v,
    b))``: searches read the new slot, writes still fill both (a process that has not seen the
    switch reads the old slot, which stays complete); after ``settle`` seconds -> ``ready(1-s,
    v+1, b')``. Rerunning resumes from the phase the state row holds (waiting only what is
    left of the wait); on a ready index it starts a new rotation.

    Args:
        engine: The database.
        cmk: The application's CMK.
        metadata: The models.
        index: ``"table.index_name"`` or a domain.
        bits: The new width (default: unchanged). An exact index (128 bits or more) stays
            exact and a truncated one truncated: the query rewrite decides from the
            declaration, so change the declaration (a new index) to cross that line.
        batch_size: Rows per batch.
        progress: Called after every batch.
        actor: The audit events' actor.
        settle: Seconds to wait after each state change; default twice ``search_state_ttl``.
        max_kms_rps: KMS requests per second for the whole call.
        sleep: The waiting seam (tests).

    Returns:
        What the call did (``steps``: the state changes it made).

    Raises:
        ConfigurationError: the index is not built (phase building, or no state: run
            ``sqlalchemy-cmk search build`` first); ``bits`` out of range, crossing the exact
            line, or contradicting a rotation already under way.
    """
    _check_batch_args(batch_size)
    started = _now()
    wait = _settle(cmk, settle)
    domain, members = _domain(metadata, index)
    _require_states(engine)
    ix = members[0].index
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= _s.MAX_BITS:
            raise ConfigurationError(f"bits must be an int from 1 to {_s.MAX_BITS}, not {bits!r}")
        if (bits >= _s.EXACT_BITS) != (ix.width >= _s.EXACT_BITS):
            raise ConfigurationError(
                f"blind index {domain!r} is declared {ix.width} bits: rotating it to {bits} "
                f"would cross {_s.EXACT_BITS} bits (exact vs truncated), which the queries "
                "decide from the declaration; declare a new index instead"
            )
    found = _state(engine, domain, members)
    if found is None or found[0].phase == "building":
        raise ConfigurationError(
            f"blind index {domain!r} is not built yet (phase building): run `sqlalchemy-cmk "
            "search build` (or op.build_blind_index) first, then rotate it"
        )
    state, since = found
    report = IndexReport("rotate", domain, state.phase, state.version, state.bits)
    if state.phase == "ready":
        new_bits = state.bits if bits is None else bits
        rotating = _new(
            "rotating",
            state.slot,
            state.version,
            state.bits,
            (state.version + 1, new_bits),
            state.fingerprint,
        )
        if _swap(engine, domain, state, rotating):
            report.steps.append("ready -> rotating")
            state, since = rotating, _utcnow()
        else:
            now = _state(engine, domain, members)
            assert now is not None
            state, since = now
    if state.phase == "rotating":
        assert state.other_version is not None and state.other_bits is not None
        if bits is not None and bits != state.other_bits:
            raise ConfigurationError(
                f"blind index {domain!r} is already rotating to {state.other_bits} bits, not "
                f"{bits}: finish that rotation first (rerun without bits)"
            )
        report.waited += _wait(since, wait, sleep)
        _fill(
            engine,
            cmk,
            domain,
            members,
            state,
            report,
            batch_size=batch_size,
            progress=progress,
            actor=actor,
            full=False,
            started=started,
        )
        switched = _new(
            "switched",
            1 - state.slot,
            state.other_version,
            state.other_bits,
            (state.version, state.bits),
            state.fingerprint,
        )
        if _swap(engine, domain, state, switched):
            report.steps.append("rotating -> switched")
            state, since = switched, _utcnow()
        else:
            now = _state(engine, domain, members)
            assert now is not None
            state, since = now
    if state.phase == "switched":
        report.waited += _wait(since, wait, sleep)
        ready = _new("ready", state.slot, state.version, state.bits, None, state.fingerprint)
        if _swap(engine, domain, state, ready):
            report.steps.append("switched -> ready")
            state = ready
        else:
            now = _state(engine, domain, members)
            assert now is not None
            state = now[0]
    report.phase, report.version, report.bits = state.phase, state.version, state.bits
    report.seconds = _now() - started
    return report


@_scrubbed("index_status")
def index_status(engine: Engine, metadata: Models, index: str | None = None) -> list[IndexStatus]:
    """Every blind index domain of the models (or the one ``index`` names): its state, and per
    table the rows whose written slots are done (right key version and width) or pending.
    Reads no key and decrypts nothing.
    """
    if index is not None:
        domain, members = _domain(metadata, index)
        domains = {domain: members}
    else:
        domains = _all_members(metadata)
    has_states = sa_inspect(engine).has_table(_s.STATES_TABLE)
    out: list[IndexStatus] = []
    for domain, members in sorted(domains.items()):
        found = _state(engine, domain, members) if has_states else None
        state = _core.default_state(members[0].index) if found is None else found[0]
        tables: dict[str, dict[str, int]] = {}
        for table, ms in _by_table(members).items():
            plan = _plan(engine, table, ms)
            pending = _total(engine, plan.tgt, _pending(plan, state.writes(), False))
            total = _total(engine, plan.tgt, true())
            tables[table.name] = {"done": total - pending, "pending": pending}
        out.append(
            IndexStatus(
                domain,
                state.phase,
                state.slot,
                state.version,
                state.bits,
                state.other_version,
                state.other_bits,
                tables,
            )
        )
    return out


_MAX_LISTED = 1000


@_scrubbed("verify_index")
@_budgeted
def verify_index(
    engine: Engine,
    cmk: CMK,
    metadata: Models,
    index: str,
    *,
    batch_size: int = 1000,
    actor: str = "sqlalchemy-cmk verify",
    max_kms_rps: float | None = None,
) -> IndexVerifyReport:
    """Recompute every row's index values and compare them with the stored ones: the read
    slot's, and while rotating or switched both written slots'. Decrypts every row (audited
    per tenant); changes nothing. Rows an application writes meanwhile may show as mismatched
    if their state moves under the check: verify a quiet index, or rerun.

    Returns:
        Counts by tenant, and the first 1,000 rows that failed (table, primary key, tenant,
        ``"mismatch"`` or the error's type). Never a value.
    """
    _check_batch_args(batch_size)
    domain, members = _domain(metadata, index)
    _require_states(engine)
    found = _state(engine, domain, members)
    state = _core.default_state(members[0].index) if found is None else found[0]
    report = IndexVerifyReport(domain, state.phase)
    slots = state.writes() if state.phase in ("rotating", "switched") else [state.read]
    indexer = _Indexer(cmk, domain, actor)
    for table, ms in _by_table(members).items():
        plan = _plan(engine, table, ms)
        tgt = plan.tgt
        sources = sorted({i for _, i, _ in plan.members})
        assert tgt.tenant is not None and tgt.companion is not None
        selected = [tgt.pk, tgt.tenant, *tgt.cols, tgt.companion]
        base = select(*selected).order_by(tgt.pk).limit(batch_size)
        last: Any = None
        with engine.connect() as conn, _Crypto(cmk, tgt, actor) as crypto:
            while True:
                stmt = base if last is None else base.where(tgt.pk > last)
                rows = conn.execute(stmt).all()
                conn.rollback()
                if not rows:
                    break
                last = rows[-1][0]
                _verify_batch(report, indexer, plan, rows, crypto, conn, sources, slots)
    return report


def _verify_batch(
    report: IndexVerifyReport,
    indexer: _Indexer,
    plan: _Plan,
    rows: Sequence[Any],
    crypto: _Crypto,
    conn: Connection,
    sources: Sequence[int],
    slots: Sequence[tuple[int, int, int]],
) -> None:
    """Check one batch: opened together (one audit event per tenant), or row by row when a
    row does not open, to count it and go on. The batch is one access: the row-by-row
    retries join it (the scopes nest), and its events are emitted at its end, one per tenant
    for the rows opened and one per claimed tenant and error for the rows refused
    (``_Crypto.refused``), not one per attempt."""
    with access(crypto.km, crypto.ctx, "decrypt") as acc:
        acc.table(plan.tgt.name, plan.tgt.names)
        opened: dict[str, int] = {}
        refused: dict[tuple[str | None, type[CMKError]], int] = {}
        try:
            _verify_rows(report, indexer, plan, rows, crypto, conn, sources, slots, opened, refused)
        finally:
            crypto.audit(opened)
            crypto.refused(refused)


def _verify_rows(
    report: IndexVerifyReport,
    indexer: _Indexer,
    plan: _Plan,
    rows: Sequence[Any],
    crypto: _Crypto,
    conn: Connection,
    sources: Sequence[int],
    slots: Sequence[tuple[int, int, int]],
    opened: dict[str, int],
    refused: dict[tuple[str | None, type[CMKError]], int],
) -> None:
    try:
        values = indexer.opened(plan, rows, crypto, sources, opened)
    except CMKError as exc:
        if len(rows) > 1:
            for row in rows:
                _verify_rows(
                    report, indexer, plan, [row], crypto, conn, sources, slots, opened, refused
                )
            return
        _fail(report, plan, rows[0], "failed", report.failed)
        claimed = claimed_tenant(exc) or crypto.claimed(_as_bytes(rows[0][-1]), rows[0][1])
        refused[(claimed, type(exc))] = refused.get((claimed, type(exc)), 0) + 1
        return
    tenants = sorted({str(row[1]) for row, v in zip(rows, values, strict=True) if v})
    keys = indexer.keys(conn, tenants, [v for _, v, _ in slots], create=False)
    conn.rollback()
    for row, vals in zip(rows, values, strict=True):
        report.checked += 1
        tenant = str(row[1])
        if vals and any((tenant, v) not in keys for _, v, _ in slots):
            _fail(report, plan, row, "mismatch", report.mismatched)  # no root key: no index
            continue
        want = indexer.expected(plan, [row], [vals], keys, slots)[0]
        if any(_as_bytes(row[2 + j]) != value for j, value in want.items()):
            _fail(report, plan, row, "mismatch", report.mismatched)
            continue
        report.ok[tenant] = report.ok.get(tenant, 0) + 1


def _fail(
    report: IndexVerifyReport, plan: _Plan, row: Any, why: str, tally: dict[str, int]
) -> None:
    tenant = "(null)" if row[1] is None else str(row[1])
    if why == "failed":
        report.checked += 1
    tally[tenant] = tally.get(tenant, 0) + 1
    if len(report.failures) < _MAX_LISTED:
        report.failures.append((plan.tgt.name, _pk_repr(row[0]), tenant, why))
