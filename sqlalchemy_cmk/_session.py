"""The session hooks: encrypt on flush, decrypt on load.

Flush: ``before_flush`` seals every new or changed encrypted attribute (one batch, raising
before any SQL if anything cannot be sealed) and keeps the sealed values aside; the mapper's
``before_insert``/``before_update`` put them into the instances' ``__dict__`` (so the mapper
sends ciphertext) only once the flush is under way, inside its transaction; ``after_flush`` puts
the plaintext back, and ``after_soft_rollback`` does so when the flush failed. So an application
listener that raises after ours, or a flush that fails, never leaves ciphertext in an instance.

Tenants: a row is bound to the tenant in context when it enters the session (``add``, cascade,
``merge`` of a new object) or, for a row loaded without a key, when it is loaded; a flush under
any other tenant is refused with :class:`~sqlalchemy_cmk.TenantMismatchError`. A model may
declare its tenant column (:func:`~sqlalchemy_cmk.tenant_column`): it is then filled from the
context, checked against it on every write, and checked against the key's tenant on every load.

Companions: only these hooks write them. A companion changed by anything else (``merge`` of a
stale copy, an assignment) is put back before the flush; companions of updated rows are read
again from the database under a lock (``FOR UPDATE``, or SQLite's write lock), by the primary
key of the companion's own table, so a concurrent rotation or first write cannot strand values.

Load: ``do_orm_execute`` runs each ORM SELECT with a collector in a context variable, so the
mapper-level ``load``/``refresh`` events only note which instances arrived; once the result is
complete, all of them are decrypted together (distinct data keys unwrapped once each, in
parallel). Streaming results (``yield_per``, ``stream_results``) are decrypted the same way one
partition at a time, each before any of it reaches the caller (``_stream``).

Listeners are attached to the user's sessionmaker (or session) by ``install``; the per-class
listeners are inert outside an installed session.
"""

from __future__ import annotations

import contextvars
import itertools
import sys
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import event, false, select, tuple_, update
from sqlalchemy.engine.result import ChunkedIteratorResult
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.orm.state import InstanceState

from . import _format
from ._access import Access, access
from ._cmk import CMK
from ._dialects import select_dialect
from ._lazy import defer_values
from ._mapping import (
    ColumnSpec,
    MapperSpec,
    RowLookup,
    TableSpec,
    has_encrypted_columns,
    is_tenant_column,
    mapper_spec,
)
from .context import TenantContext, current_context, require_context
from .errors import (
    ConfigurationError,
    NoTenantError,
    PlaintextWriteError,
    TenantContextError,
    TenantMismatchError,
)
from .search import IndexValue
from .types import EncryptedValue, Sealed

_INFO_KEY = "sqlalchemy_cmk"
_BOUND_KEY = "sqlalchemy_cmk.bound"  # session.info: new row -> tenant, where not the first's
_FIRST_KEY = "sqlalchemy_cmk.first"  # session.info: the tenant of the session's first add
_TENANT_KEY = "sqlalchemy_cmk.tenant"  # state.info: tenant of a loaded or flushed row without key
_ABSENT = object()

_collector: contextvars.ContextVar[list[InstanceState[Any]] | None] = contextvars.ContextVar(
    "sqlalchemy_cmk_collector", default=None
)
_listened: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()
# Session hash key -> values sealed by before_flush, not yet swapped in (see _swap_in). A plain
# dict by int: _swap_in runs once per written row, and this is its cheapest possible lookup.
# Each value appears once in the four parallel lists, a row's entries next to each other;
# the last item maps each row (state) to the index of its first entry.
_Swap = tuple[list[dict[str, Any]], list[str], list[Sealed], list[Any], dict[Any, int]]
_swaps: dict[int, _Swap] = {}
_registries_seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


# -- load ----------------------------------------------------------------------------------------


def _on_load(state: InstanceState[Any], context: Any, *args: Any) -> None:
    if args or state.committed_state:  # a refresh (args: its attribute names), or a change
        _drop_untrusted_companions(state, args[0] if args else (), refresh=bool(args))
    collected = _collector.get()
    if collected is not None:
        collected.append(state)
        return
    session = getattr(context, "session", None)
    cmk = session.info.get(_INFO_KEY) if session is not None else None
    if cmk is not None:
        decrypt_states(cmk, [state])


def _drop_untrusted_companions(state: InstanceState[Any], attrs: Any, *, refresh: bool) -> None:
    """Drop the in-memory companions that may not be the row's own, so they are read again
    from the database with the others a load left out.

    Two kinds: one changed in memory (a merge of a stale copy: it would never be written, so it
    must not be read either, nor can the value from before the change be trusted, as a rewrap
    may have replaced it since); and, in a refresh that loaded encrypted values but not their
    companion (``refresh(obj, [names])``, an expired or deferred attribute loaded on access,
    ``populate_existing``), the companion from the earlier load, which a rotation or another
    session's first write may have replaced since. Done at the event, not once the result is
    complete: a populate_existing load marks every attribute unchanged right after it.
    """
    committed = state.committed_state
    d = state.dict
    for t in mapper_spec(state.mapper).tables:
        key = t.companion_key
        if key in committed:
            del committed[key]
            d.pop(key, None)
        elif (
            refresh
            and (attrs is None or key not in attrs)
            and key in d
            and any(type(d.get(c.key)) is EncryptedValue for c in t.columns)
        ):
            del d[key]


def _listen_mappers(mappers: Any) -> None:
    """Attach the per-class listeners to every mapper with encrypted columns in these
    registries (the whole registry: relationship loads bring in other classes).

    A model whose encrypted columns are misconfigured is listened too, and raises when it is
    used, not when another model of its registry is queried.
    """
    for m in mappers:
        mapper_spec(m)  # the statement's own models: a misconfigured one raises here
        registry = m.registry
        if _registries_seen.get(registry) == len(registry.mappers):
            continue
        for mapper in registry.mappers:
            if mapper not in _listened and has_encrypted_columns(mapper):
                event.listen(mapper, "load", _on_load, raw=True)
                event.listen(mapper, "refresh", _on_load, raw=True)
                event.listen(mapper, "before_insert", _swap_in, raw=True)
                event.listen(mapper, "before_update", _swap_in, raw=True)
                _listened.add(mapper)
        _registries_seen[registry] = len(registry.mappers)


def decrypt_states(cmk: CMK, states: list[InstanceState[Any]], *, lazy: bool = False) -> None:
    """Decrypt loaded objects' encrypted values in place, or with ``lazy``, check them as
    ``CMK.open`` does before any unwrap and leave them pending (``_lazy``). One access: a
    refusal is audited once per table (``_access``)."""
    if not states:
        return
    with access(cmk._keys, current_context(), "decrypt") as acc:
        _decrypt_states(cmk, states, lazy, acc)


def _decrypt_states(cmk: CMK, states: list[InstanceState[Any]], lazy: bool, acc: Access) -> None:
    dicts: list[dict[str, Any]] = []
    tables: list[TableSpec] = []
    owners: list[InstanceState[Any]] = []  # the state of each row dict (lazy only)
    specs_of: dict[Mapper[Any], MapperSpec] = {}
    deferred: list[InstanceState[Any]] = []  # companion not loaded (load_only, defer)
    unkeyed: list[InstanceState[Any]] = []  # no companion yet: bound to the loading tenant
    checked: list[tuple[InstanceState[Any], str, TableSpec]] = []  # declared tenant columns
    try:
        for state in states:
            mapper = state.mapper
            spec = specs_of.get(mapper)
            if spec is None:
                spec = specs_of[mapper] = mapper_spec(mapper)
                for t in spec.tables:
                    acc.table(t.table, t.column_names)
            d = state.dict
            for t in spec.tables:
                dicts.append(d)
                tables.append(t)
                if lazy:
                    owners.append(state)
                companion = d.get(t.companion_key, _ABSENT)
                if companion is _ABSENT:
                    deferred.append(state)
                elif companion is None:
                    unkeyed.append(state)
                if spec.tenant_key is not None:
                    checked.append((state, spec.tenant_key, t))
        if not dicts:
            return
        if deferred:
            _load_missing_companions(deferred, specs_of)
        ctx = current_context()
        if checked:
            _check_loaded_tenants(checked, ctx)
        if lazy:
            defer_values(cmk, owners, dicts, tables)
        else:
            cmk.open(dicts, tables, ctx)
        if unkeyed and ctx is not None and ctx.tenant_id is not None:
            for state in unkeyed:
                # A declared tenant column says whose row it is, whoever loaded it.
                key = specs_of[state.mapper].tenant_key
                owner = state.dict.get(key) if key is not None else None
                state.info.setdefault(_TENANT_KEY, str(owner) if owner else ctx.tenant_id)
    except BaseException:
        # Leave no ciphertext (nor half a batch of plaintext) in loaded objects: expire the
        # encrypted attributes, so a later access reloads and raises again.
        for state in states:
            session, obj = state.session, state.obj()
            spec = specs_of.get(state.mapper)
            if session is not None and obj is not None and state.key is not None and spec:
                session.expire(obj, [c.key for t in spec.tables for c in t.columns])
        raise


def _check_loaded_tenants(
    checked: list[tuple[InstanceState[Any], str, TableSpec]], ctx: TenantContext | None
) -> None:
    """A declared tenant column must name the tenant the row's key is bound to."""
    memo: dict[bytes, str] = {}
    split = 1 + _format.ROW_ID_SIZE
    for state, key, t in checked:
        d = state.dict
        companion = d.get(t.companion_key)
        if type(companion) is not bytes and type(companion) is not Sealed:
            continue
        envelope = companion[split:]
        owner = memo.get(envelope)
        if owner is None:
            _format.split_companion(bytes(companion))
            owner = memo[envelope] = _format.parse_envelope(envelope).tenant
        declared = d.get(key, _ABSENT)
        if declared is _ABSENT:
            continue  # not loaded: the row's key is still checked against the context
        if declared is None or str(declared) != owner:
            raise TenantMismatchError(
                f"a row of {t.table!r} names another tenant in its tenant column than the one "
                "its key belongs to: the row was moved or edited outside the application",
                row_tenant=owner,
                tenant=ctx.tenant_id if ctx is not None else None,
                table=t.table,
            )


def _by_own_key(
    session: Session,
    mapper: Mapper[Any],
    lookup: RowLookup,
    idents: list[tuple[Any, ...]],
    *,
    lock: bool,
    extra: Sequence[Any] = (),
) -> dict[tuple[Any, ...], Any]:
    """Companions by identity, read by the primary key of the companion's own table (with
    the ``extra`` columns: then each found value is ``(companion, *extra values)``).

    Not by the mapper's primary key: in joined inheritance that is the base table's, and
    selecting it with a subclass table's companion would join the two tables on nothing.
    """
    pk, index = lookup.pk, lookup.ident_index
    found: dict[tuple[Any, ...], Any] = {}
    for i in range(0, len(idents), 500):
        chunk = idents[i : i + 500]
        own = [tuple(ident[j] for j in index) for ident in chunk]
        where = pk[0].in_([k[0] for k in own]) if len(pk) == 1 else tuple_(*pk).in_(own)
        query = select(*pk, lookup.companion, *extra).where(where)
        if lock:
            query = query.with_for_update()
        n = len(pk)
        rows = {
            tuple(row[:n]): tuple(row[n:]) if extra else row[n] for row in session.execute(query)
        }
        for ident, key in zip(chunk, own, strict=True):
            if key in rows:
                found[ident] = rows[key]
    return found


def _load_missing_companions(
    states: list[InstanceState[Any]], specs_of: dict[Mapper[Any], MapperSpec]
) -> None:
    """Fetch the companions that a ``load_only``/``defer`` left out, one query per table."""
    missing: dict[tuple[Mapper[Any], int], list[InstanceState[Any]]] = {}
    for state in states:
        d = state.dict
        spec = specs_of[state.mapper]
        for n, t in enumerate(spec.tables):
            if (
                t.companion_key not in d
                and state.key is not None
                and any(type(d.get(c.key)) is EncryptedValue for c in t.columns)
            ):
                missing.setdefault((state.mapper, n), []).append(state)
    for (mapper, n), group in missing.items():
        session = group[0].session
        if session is None:
            continue
        spec = specs_of[mapper]
        t, lookup = spec.tables[n], spec.lookups[n]
        by_ident = {state.key[1]: state for state in group if state.key is not None}
        with session.no_autoflush:
            found = _by_own_key(session, mapper, lookup, list(by_ident), lock=False)
        for ident, companion in found.items():
            state = by_ident[ident]
            state.dict[t.companion_key] = companion
            state.committed_state.pop(t.companion_key, None)


def _do_orm_execute(cmk: CMK, orm_state: ORMExecuteState, checks: Any = None) -> Any:
    session = orm_state.session
    session.info[_INFO_KEY] = cmk
    if not orm_state.is_orm_statement:
        return None
    _listen_mappers(orm_state.all_mappers)
    if orm_state.is_insert:
        return _bulk_insert(cmk, orm_state)
    if orm_state.is_update and orm_state.parameters:
        _refuse_companions(orm_state)
    if not orm_state.is_select or _collector.get() is not None:
        return None
    opts = orm_state.execution_options
    if opts.get("yield_per") or opts.get("stream_results"):
        return _stream(cmk, orm_state)
    collected: list[InstanceState[Any]] = []
    token = _collector.set(collected)
    try:
        frozen = orm_state.invoke_statement().freeze()
    finally:
        _collector.reset(token)
    # Lazy only where the objects outlive the query: a column load (refresh, an expired or
    # deferred attribute) must leave its value in place, and a search checks decrypted rows.
    lazy = (
        not checks
        and not orm_state.is_column_load
        and bool(orm_state.execution_options.get("cmk_lazy", cmk.lazy_decrypt))
    )
    decrypt_states(cmk, collected, lazy=lazy)
    if checks:
        from ._search import filter_rows

        frozen = filter_rows(checks, frozen)
    return frozen()


def _stream(cmk: CMK, orm_state: ORMExecuteState) -> Any:
    """A streamed result (``yield_per``, ``stream_results``) decrypted one partition at a time.

    The ORM builds the objects of a streamed result in chunks (``yield_per`` rows each, or all
    the rows at once for ``stream_results`` without it): a ``ChunkedIteratorResult`` whose
    ``chunks(size)`` generator fetches and populates one chunk per step. Wrapping that generator
    covers every way of consuming the result (iteration, ``partitions()``, ``fetchmany()``,
    ``scalars()``, legacy ``Query.yield_per``): each chunk is built with the collector set, then
    decrypted as one batch (one key lookup per distinct data key, unwrapped in parallel, one
    audit event) before any of it is handed on. A chunk that fails to decrypt raises before it
    is yielded, its objects' encrypted attributes expired (``decrypt_states``), and the result
    is closed.
    """
    result = orm_state.invoke_statement()
    if not isinstance(result, ChunkedIteratorResult):
        # Another listener answered (a result cache's frozen rows, say): whatever built its
        # instances did so with no collector set, so _on_load decrypted each as it arrived.
        return result
    chunks = result.chunks

    def decrypted(size: int | None) -> Iterator[Any]:
        source = chunks(size)
        try:
            while True:
                collected: list[InstanceState[Any]] = []
                token = _collector.set(collected)
                try:
                    rows = next(source, _ABSENT)
                finally:
                    _collector.reset(token)
                if rows is _ABSENT:
                    return
                decrypt_states(cmk, collected)
                yield rows
        except Exception:
            # Not GeneratorExit: a server-side result drops this generator for a new one at
            # every fetchmany(), and must stay open.
            close = getattr(source, "close", None)  # the ORM's is a generator
            if close is not None:
                close()
            result.close()
            raise

    result.chunks = decrypted
    # The result's iterator was made from the undecorated chunks, and not yet started.
    result.iterator = itertools.chain.from_iterable(decrypted(result._yield_per))
    return result


# -- flush ---------------------------------------------------------------------------------------


def _on_pending(session: Session, obj: Any) -> None:
    """Bind a new row to the tenant in context as it enters the session.

    This runs for every add, so the usual case costs nothing per row: rows added under the
    tenant of the session's first add are not recorded; only the others (another tenant, or
    none) are, in one dict per session (not ``state.info``, a dict per row).
    """
    ctx = current_context()
    tenant = ctx.tenant_id if ctx is not None else None
    info = session.info
    first = info.get(_FIRST_KEY, _ABSENT)
    if tenant == first:
        return
    if first is _ABSENT and tenant is not None:
        info[_FIRST_KEY] = tenant
        return
    state: InstanceState[Any] = obj._sa_instance_state
    if _binds_tenant(state.mapper):
        bound = info.get(_BOUND_KEY)
        if bound is None:
            bound = info[_BOUND_KEY] = {}
        bound[state] = tenant


def _prune_bound(session: Session) -> dict[InstanceState[Any], str | None]:
    """The bindings of rows still new; rows flushed since are bound by their key, or, if they
    have none, in their own ``state.info``."""
    bound: dict[InstanceState[Any], str | None] = session.info.get(_BOUND_KEY) or {}
    for state in [s for s in bound if s.key is not None or s.session_id != session.hash_key]:
        tenant = bound.pop(state)
        if (
            tenant is not None
            and state.key is not None
            and any(
                state.dict.get(t.companion_key) is None for t in mapper_spec(state.mapper).tables
            )
        ):
            state.info.setdefault(_TENANT_KEY, tenant)
    return bound


_binds: weakref.WeakKeyDictionary[Mapper[Any], bool] = weakref.WeakKeyDictionary()


def _binds_tenant(mapper: Mapper[Any]) -> bool:
    """Whether rows of this class are bound to a tenant: it has encrypted or tenant columns.
    (Not ``mapper_spec``, which raises for a misconfigured model: that is for the flush.)"""
    found = _binds.get(mapper)
    if found is None:
        found = _binds[mapper] = has_encrypted_columns(mapper) or any(
            is_tenant_column(c) for c in mapper.columns
        )
    return found


def _refuse_other_tenant(table: str, bound: str, tenant: str | None, how: str) -> None:
    raise TenantMismatchError(
        f"a row of {table!r} {how} another tenant than the context tenant {tenant!r}: flush "
        "it in the tenant_context it was added or loaded under, or expunge it",
        row_tenant=bound,
        tenant=tenant,
        table=table,
    )


def _check_tenant_column(
    state: InstanceState[Any],
    key: str,
    table: str,
    ctx: TenantContext | None,
    fills: list[tuple[InstanceState[Any], str, str]],
) -> None:
    """The declared tenant column of a row being written must be the context tenant. A new
    row's empty one is noted in ``fills``, filled only once the whole flush is accepted."""
    tenant = ctx.tenant_id if ctx is not None else None
    d = state.dict
    if state.key is None:
        if tenant is None:
            raise NoTenantError(
                f"a new row of {table!r} needs a tenant: write it inside "
                "`with tenant_context(tenant_id)`",
                table=table,
            )
        value = d.get(key)
        if value is None:
            fills.append((state, key, tenant))
        elif str(value) != tenant:
            _refuse_other_tenant(table, str(value), tenant, "names")
        return
    if key in state.committed_state:
        old = state.committed_state[key]
        if d.get(key) != old and isinstance(old, str):
            raise TenantMismatchError(
                f"a row of {table!r} cannot move to another tenant: its values are bound to "
                "its tenant's key; copy it under the new tenant and delete the old row",
                row_tenant=old,
                tenant=tenant,
                table=table,
            )
    if tenant is not None:  # in a cross-tenant context, whatever the row's tenant is
        obj = state.obj()
        value = d[key] if key in d else getattr(obj, key, None)  # loads it if expired
        if value is not None and str(value) != tenant:
            _refuse_other_tenant(table, str(value), tenant, "names")


def _revert_slots(state: InstanceState[Any], keys: tuple[str, ...]) -> None:
    """Undo changes of blind index slots that these hooks did not make (a merge of a stale
    copy, an assignment): index values are computed here, from the value they index."""
    d = state.dict
    committed = state.committed_state
    for key in keys:
        value = d.get(key)
        if value is None or type(value) is IndexValue:
            continue
        if state.key is None:
            d[key] = None  # copied onto a new object: recomputed below if the value is set
        elif key in committed:
            old = committed.pop(key)
            if old is None or isinstance(old, bytes):
                d[key] = old
            else:
                d.pop(key, None)


def _revert_companion(state: InstanceState[Any], key: str) -> None:
    """Undo a change of a persistent row's companion that these hooks did not make."""
    committed = state.committed_state
    if key not in committed:
        return
    old = committed.pop(key)
    if isinstance(old, bytes) or old is None:
        state.dict[key] = old
    else:  # never loaded: forget the new value, so nothing is written
        state.dict.pop(key, None)


def _before_flush(
    cmk: CMK, session: Session, flush_context: UOWTransaction, instances: Any
) -> None:
    session.info[_INFO_KEY] = cmk
    # One access: a refusal is audited once per table (``_access``), before it propagates.
    with access(cmk._keys, current_context(), "encrypt") as acc:
        _flush(cmk, session, acc)


def _flush(cmk: CMK, session: Session, acc: Access) -> None:
    _restore(session)  # a flush that failed before it began may have left values sealed
    bound_new = _prune_bound(session)
    first = session.info.get(_FIRST_KEY)
    ctx = current_context()
    tenant = ctx.tenant_id if ctx is not None else None
    fills: list[tuple[InstanceState[Any], str, str]] = []
    # Only when some new row may have been added under another tenant than this one.
    check_new = tenant is not None and (bool(bound_new) or first not in (None, tenant))
    # Parallel lists, not per-row objects: see CMK.seal.
    states: list[InstanceState[Any]] = []
    dicts: list[dict[str, Any]] = []
    tables: list[TableSpec] = []
    lookups: list[RowLookup] = []
    columns: list[Sequence[ColumnSpec]] = []
    specs_of: dict[Mapper[Any], MapperSpec] = {}
    cleared: list[tuple[InstanceState[Any], dict[str, Any], ColumnSpec]] = []  # set to None
    for obj in list(session.new) + list(session.dirty):
        state: InstanceState[Any] = obj._sa_instance_state
        mapper = state.mapper
        spec = specs_of.get(mapper)
        if spec is None:
            spec = specs_of[mapper] = mapper_spec(mapper)
        if not spec.active:
            continue
        if check_new and state.key is None:
            # Every new row, values or not: its tenant column and first values come later.
            added_under = bound_new.get(state, first)
            if added_under is not None and added_under != tenant:
                _refuse_other_tenant(_name(spec, mapper), added_under, tenant, "was bound to")
        if spec.tenant_key is not None:
            _check_tenant_column(state, spec.tenant_key, _name(spec, mapper), ctx, fills)
        d = state.dict
        if spec.slot_keys:
            _revert_slots(state, spec.slot_keys)
        if state.key is None:  # new: every value that is set
            for t, lookup in spec.pairs:
                for c in t.columns:
                    v = d.get(c.key)
                    if v is not None and type(v) is not Sealed:
                        break
                else:
                    # No values: no key. A companion copied onto a new object is dropped, and
                    # the row keeps the tenant it was added under for its first values.
                    if d.get(t.companion_key) is not None:
                        d[t.companion_key] = None
                    added_under = bound_new.get(state, first)
                    if added_under is not None:
                        state.info.setdefault(_TENANT_KEY, added_under)
                    continue
                states.append(state)
                dicts.append(d)
                tables.append(t)
                lookups.append(lookup)
                columns.append(t.columns)
            continue
        committed = state.committed_state
        for t, lookup in spec.pairs:
            _revert_companion(state, t.companion_key)
            cols = [
                c
                for c in t.columns
                if c.key in committed
                and (v := d.get(c.key)) is not None
                and type(v) is not Sealed
                and type(v) is not EncryptedValue
                and committed[c.key] != v
            ]
            for c in t.columns:
                if c.search and c.key in committed and d.get(c.key, 0) is None:
                    cleared.append((state, d, c))
            if cols:
                states.append(state)
                dicts.append(d)
                tables.append(t)
                lookups.append(lookup)
                columns.append(cols)
    # The tables written, known now; a refusal above named its row's table itself.
    for t in {id(t): t for t in tables}.values():
        acc.table(t.table, t.column_names)
    acc.fixed = True
    _load_expired_deletes(session)
    if cleared:
        _set_indexes([(st, c.search, None) for st, _, c in cleared])
    if not dicts:
        _fill(fills)
        return
    ctx = require_context()
    _listen_mappers(specs_of)
    searched = [
        (state, d, c)
        for state, d, row_cols in zip(states, dicts, columns, strict=True)
        for c in row_cols
        if c.search
    ]
    indexes: list[tuple[InstanceState[Any], Any, Any]] = []
    if searched:
        indexes = _index_values(cmk, session, searched, ctx)
    companions, witnesses = _current_companions(session, states, tables, lookups)
    unknown: list[int] = []  # rows that get their first key here with no known tenant
    for i, (state, t, comp) in enumerate(zip(states, tables, companions, strict=True)):
        if state.key is None:
            bound = bound_new.get(state, first) if bound_new else first
        elif comp is None:
            bound = state.info.get(_TENANT_KEY)
            if bound is None and len(mapper_spec(state.mapper).tables) > 1:
                unknown.append(i)
        else:
            continue  # bound by its key: CMK.seal checks the key's tenant
        if bound is not None and bound != tenant:
            _refuse_other_tenant(t.table, bound, tenant, "was bound to")
        key = specs_of[state.mapper].tenant_key
        if (
            key is not None
            and state.key is not None
            and tenant is not None
            and state.dict.get(key, _ABSENT) is None
        ):
            # A legacy row with no tenant in its tenant column gets its first key: the column
            # must name the key's tenant, or no load would accept the row again.
            fills.append((state, key, tenant))
    for i in unknown:
        owner = _tenant_of_other_tables(session, states[i])
        if owner is not None and owner != tenant:
            _refuse_other_tenant(tables[i].table, owner, tenant, "belongs to")
    new_companions, cts = cmk.seal(dicts, tables, columns, companions, ctx, witnesses)
    # Only now, with every value sealed, touch the instances: companions go in at once, values
    # wait for _swap_in, inside the flush.
    s_dicts: list[dict[str, Any]] = []
    s_keys: list[str] = []
    s_boxes: list[Sealed] = []
    s_plain: list[Any] = []
    starts: dict[Any, int] = {}
    n = 0
    for state, d, t, row_cols, companion in zip(
        states, dicts, tables, columns, new_companions, strict=True
    ):
        if state not in starts:
            starts[state] = len(s_keys)
        for c in row_cols:
            v = d.get(c.key)
            if v is None:
                continue
            s_dicts.append(d)
            s_keys.append(c.key)
            s_boxes.append(Sealed(cts[n]))
            s_plain.append(v)
            n += 1
        if companion is None:
            continue
        box = Sealed(companion)
        s_dicts.append(d)
        s_keys.append(t.companion_key)
        s_boxes.append(box)
        s_plain.append(companion)  # plain bytes again once the flush is over
        if state.key is None:
            d[t.companion_key] = box  # an INSERT reads the dict; no history needed
        else:
            obj = state.obj()
            if obj is not None:
                setattr(obj, t.companion_key, box)
    _swaps[session.hash_key] = (s_dicts, s_keys, s_boxes, s_plain, starts)
    _set_indexes(indexes)
    _fill(fills)


def _index_values(
    cmk: CMK,
    session: Session,
    searched: list[tuple[Any, dict[str, Any], ColumnSpec]],
    ctx: TenantContext,
) -> list[tuple[Any, Any, Any]]:
    """(row, slot attribute key, index value) for each searchable value written, computed
    before anything is sealed (a KMS failure for the tenant's root key stops the flush)."""
    from ._search import _Reader, index_writes

    owner = {id(d): row for row, d, _ in searched}
    mapper = searched[0][0].mapper if isinstance(searched[0][0], InstanceState) else None
    reader = _Reader(lambda: session.connection(bind_arguments={"mapper": mapper}))
    found = index_writes(cmk._search, reader, [(d, c, d.get(c.key)) for _, d, c in searched], ctx)
    return [(owner[id(d)], key, value) for d, key, value in found]


def _set_indexes(items: list[tuple[Any, Any, Any]]) -> None:
    """Put index values in place: new rows' dicts directly, loaded rows through the attribute
    (so the UPDATE carries them). A tuple of specs with None clears every slot of each."""
    for row, key, value in items:
        if isinstance(key, tuple):  # (specs, None): a searchable value set to None
            for spec in key:
                for k in spec.keys:
                    _set_one(row, k, None)
            continue
        _set_one(row, key, value)


def _set_one(row: Any, key: str, value: Any) -> None:
    if isinstance(row, dict):
        row[key] = value
        return
    state: InstanceState[Any] = row
    if state.key is None:
        state.dict[key] = value
        return
    obj = state.obj()
    if obj is not None and state.dict.get(key, _ABSENT) != value:
        setattr(obj, key, value)


def _name(spec: MapperSpec, mapper: Mapper[Any]) -> str:
    return str(spec.tables[0].table if spec.tables else mapper.local_table.description)


def _fill(fills: list[tuple[InstanceState[Any], str, str]]) -> None:
    for state, key, tenant in fills:
        obj = state.obj()
        if obj is not None:
            setattr(obj, key, tenant)


def _load_expired_deletes(session: Session) -> None:
    """Load deleted rows whose attributes are expired now, before any SQL: the flush would
    load (and so decrypt) them in the middle of its statements, where a refusal (no tenant,
    another tenant) would come after part of the flush was sent."""
    with session.no_autoflush:
        for obj in session.deleted:
            state: InstanceState[Any] = obj._sa_instance_state
            if state.expired_attributes and mapper_spec(state.mapper).tables:
                getattr(obj, next(iter(state.expired_attributes)))


def _tenant_of_other_tables(session: Session, state: InstanceState[Any]) -> str | None:
    """The tenant of a row whose table gets its first key, from the keys its other tables
    (joined inheritance) already have; None if none has one."""
    spec = mapper_spec(state.mapper)
    for t, lookup in spec.pairs:
        companion = state.dict.get(t.companion_key)
        if companion is None and state.key is not None:
            with session.no_autoflush:
                companion = _by_own_key(session, state.mapper, lookup, [state.key[1]], lock=False)
            companion = companion.get(state.key[1])
        if isinstance(companion, bytes):
            _format.split_companion(bytes(companion))
            return _format.parse_envelope(bytes(companion)[1 + _format.ROW_ID_SIZE :]).tenant
    return None


def _swap_in(mapper: Mapper[Any], connection: Any, state: InstanceState[Any]) -> None:
    """Put a row's sealed values in place as the flush writes it (inside its transaction, so a
    failure from here on reaches ``after_soft_rollback``). Row by row, so that an application's
    ``before_insert``/``before_update`` listener sees every row alike."""
    sid = state.session_id
    swap = _swaps.get(sid) if sid is not None else None
    if swap is None:
        return
    i = swap[4].get(state)
    if i is None:
        return
    s_dicts, s_keys, s_boxes, s_plain, _ = swap
    d = s_dicts[i]
    end = len(s_dicts)
    while i < end and s_dicts[i] is d:  # this row's entries
        key = s_keys[i]
        if d.get(key) is s_plain[i]:
            d[key] = s_boxes[i]
        # else: changed after it was sealed; the type refuses the unsealed value at bind time
        i += 1


def _current_companions(
    session: Session,
    states: list[InstanceState[Any]],
    tables: list[TableSpec],
    lookups: list[RowLookup],
) -> tuple[list[bytes | None], list[dict[str, Any] | None]]:
    """The companions of updated rows as the database holds them, locked until the
    transaction ends; ``None`` for new rows and for rows without a key yet.

    Not from memory: a backfill, a key rotation or another session may have given the row a
    companion since this session loaded it, and sealing under a stale one would strand the
    row's other values. The lock (``FOR UPDATE``; on SQLite, which has no row locks, the
    database write lock, taken before reading) keeps the companion from changing until this
    transaction ends, so two writers of a row's first companion cannot both win: the second
    waits and reads the first's, or fails; backfills skip locked rows.
    """
    companions: list[bytes | None] = [None] * len(states)
    # The row's stored encrypted values, read with its companion: CMK.seal checks a key the
    # KMS unwraps now against one of them before sealing under it.
    witnesses: list[dict[str, Any] | None] = [None] * len(states)
    groups: dict[tuple[Mapper[Any], RowLookup, str], dict[tuple[Any, ...], list[int]]] = {}
    for i, (state, t, lookup) in enumerate(zip(states, tables, lookups, strict=True)):
        if state.key is not None:
            by_ident = groups.setdefault((state.mapper, lookup, t.companion_key), {})
            by_ident.setdefault(state.key[1], []).append(i)
    if not groups:
        return companions, witnesses
    with session.no_autoflush:
        for (mapper, lookup, key), by_ident in groups.items():
            t = tables[next(iter(by_ident.values()))[0]]
            extra = [lookup.companion.table.c[c.name] for c in t.columns]
            if not select_dialect(session.get_bind(mapper).dialect).row_locks:
                # SQLite: take the write lock first, a no-op write that matches no row.
                key_col = lookup.pk[0]
                session.execute(update(key_col.table).where(false()).values({key_col: key_col}))
                found = _by_own_key(
                    session, mapper, lookup, list(by_ident), lock=False, extra=extra
                )
            else:
                found = _by_own_key(session, mapper, lookup, list(by_ident), lock=True, extra=extra)
            for ident, rows in by_ident.items():
                if ident not in found:
                    raise StaleDataError(
                        f"a row of {lookup.companion.table.description!r} being updated was "
                        "deleted by another transaction"
                    )
                current, *stored = found[ident]
                current = bytes(current) if isinstance(current, bytes) else None
                witness = {c.key: v for c, v in zip(t.columns, stored, strict=True)}
                for i in rows:
                    companions[i] = current
                    witnesses[i] = witness
                    d = states[i].dict
                    if d.get(key) != current:
                        d[key] = current  # what the database holds
                    states[i].committed_state.pop(key, None)
    return companions, witnesses


def _restore(session: Session, *args: Any) -> None:
    """Put plaintext back where sealed values are (and plain bytes where sealed companions
    are), after a flush, a failed one, or one that never began."""
    swap = _swaps.pop(session.hash_key, None)
    if swap is not None:
        for d, key, box, plain in zip(*swap[:4], strict=True):
            if d.get(key) is box:
                d[key] = plain


def _refuse_companions(orm_state: ORMExecuteState) -> None:
    """ORM bulk UPDATE by primary key: its rows may not set a companion (not even to NULL),
    nor the declared tenant column."""
    mapper = orm_state.bind_mapper
    if mapper is None:
        return
    spec = mapper_spec(mapper)
    keys = {t.companion_key for t in spec.tables}
    searchable = {
        k for t in spec.tables for c in t.columns for s in c.search for k in (c.key, *s.keys)
    }
    params: Any = orm_state.parameters
    for row in params if isinstance(params, list) else [params]:
        if spec.tenant_key is not None and spec.tenant_key in row:
            raise TenantContextError(
                f"a bulk UPDATE of {mapper.class_.__name__} sets its tenant column: a row "
                "cannot move to another tenant; nothing was sent"
            )
        if searchable.intersection(row):
            raise PlaintextWriteError(
                f"a bulk UPDATE of {mapper.class_.__name__} sets a searchable column or its "
                "blind index: the index would not follow the value. Change it on the loaded "
                "object; nothing was sent"
            )
        if keys.intersection(row):
            raise PlaintextWriteError(
                f"a bulk UPDATE of {mapper.class_.__name__} sets its EDEK (companion) column: "
                "companions are written by sqlalchemy-cmk's session hooks only; nothing was sent"
            )


def _check_insert_values(stmt: Any, spec: MapperSpec, name: str) -> None:
    """``insert(Model).values(...)``: the tenant column it names must be the context tenant."""
    ctx = current_context()
    tenant = ctx.tenant_id if ctx is not None else None
    rows = [stmt._values or {}, *(r for rows in stmt._multi_values for r in rows)]
    for row in rows:
        if not isinstance(row, dict):
            continue
        for key, value in row.items():
            if getattr(key, "key", key) != spec.tenant_key:
                continue
            given = getattr(value, "value", value)
            if tenant is None:
                raise NoTenantError(f"new rows of {name!r} need a tenant", table=name)
            if not isinstance(given, str | int) or str(given) != tenant:
                _refuse_other_tenant(name, str(given), tenant, "names")


def _bulk_insert(cmk: CMK, orm_state: ORMExecuteState) -> Any:
    mapper = orm_state.bind_mapper
    if mapper is None:
        return None
    spec = mapper_spec(mapper)
    if not spec.active:
        return None
    if not orm_state.parameters:
        if spec.tenant_key is not None:
            _check_insert_values(orm_state.statement, spec, str(mapper.local_table.description))
        return None
    post = getattr(orm_state.statement, "_post_values_clause", None)
    if spec.tables and post is not None and type(post).__name__ != "OnConflictDoNothing":
        # ON CONFLICT / ON DUPLICATE KEY: a conflicting row would keep its old EDEK and row id
        # while taking values sealed under new ones, and could never be decrypted again.
        raise PlaintextWriteError(
            f"upserts into {mapper.class_.__name__}, which has encrypted columns, cannot keep "
            "an existing row readable: load the row and change it, or insert new rows only"
        )
    params: Any = orm_state.parameters
    new_rows: list[dict[str, Any]] = [
        dict(p) for p in (params if isinstance(params, list) else [params])
    ]
    ctx = current_context()
    with access(cmk._keys, ctx, "encrypt") as acc:
        for t in spec.tables:
            acc.table(t.table, t.column_names)
        acc.fixed = True
        sealed = _seal_bulk(cmk, orm_state, spec, mapper, new_rows, ctx)
    if not sealed and spec.tenant_key is None:
        return None
    return orm_state.invoke_statement(params=new_rows if isinstance(params, list) else new_rows[0])


def _seal_bulk(
    cmk: CMK,
    orm_state: ORMExecuteState,
    spec: MapperSpec,
    mapper: Mapper[Any],
    new_rows: list[dict[str, Any]],
    ctx: TenantContext | None,
) -> bool:
    """Check and seal the rows of an ORM bulk INSERT in place; False if none has a value."""
    if spec.tenant_key is not None:
        name = spec.tables[0].table if spec.tables else str(mapper.local_table.description)
        tenant = ctx.tenant_id if ctx is not None else None
        if tenant is None:
            raise NoTenantError(
                f"new rows of {name!r} need a tenant: write them inside "
                "`with tenant_context(tenant_id)`",
                table=name,
            )
        for d in new_rows:
            value = d.get(spec.tenant_key)
            if value is None:
                d[spec.tenant_key] = tenant
            elif str(value) != tenant:
                _refuse_other_tenant(name, str(value), tenant, "names")
    dicts: list[dict[str, Any]] = []
    tables: list[TableSpec] = []
    for d in new_rows:
        for t in spec.tables:
            if any(d.get(c.key) is not None for c in t.columns):
                dicts.append(d)
                tables.append(t)
            else:
                d.pop(t.companion_key, None)  # no values, no key: never a companion from outside
    if dicts:
        searched = [
            (d, d, c) for d, t in zip(dicts, tables, strict=True) for c in t.columns if c.search
        ]
        indexes = (
            _index_values(cmk, orm_state.session, searched, require_context()) if searched else []
        )
        companions, cts = cmk.seal(
            dicts, tables, [t.columns for t in tables], [None] * len(dicts), require_context()
        )
        _set_indexes(indexes)
        n = 0
        for d, t, companion in zip(dicts, tables, companions, strict=True):
            d[t.companion_key] = Sealed(companion or b"")
            for c in t.columns:
                if d.get(c.key) is not None:
                    d[c.key] = Sealed(cts[n])
                    n += 1
    return bool(dicts)


# -- install -------------------------------------------------------------------------------------


# async_sessionmaker -> the Session subclass install() gave it as its sync_session_class.
_async_makers: weakref.WeakKeyDictionary[Any, type[Session]] = weakref.WeakKeyDictionary()


def _sync_target(target: Any, *, installing: bool) -> Any:
    """The synchronous object whose events serve ``target``: SQLAlchemy's asyncio classes
    have no events of their own, their sync counterparts run every flush and load."""
    if "sqlalchemy.ext.asyncio" not in sys.modules:
        # No asyncio object exists before its module is imported, and importing it here would
        # fail without greenlet, which SQLAlchemy 2.1 no longer installs by default.
        return target
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
    from sqlalchemy.ext.asyncio import async_sessionmaker as AsyncSessionmaker

    if isinstance(target, AsyncEngine):
        return target.sync_engine
    if isinstance(target, AsyncConnection):
        if target.sync_connection is None:
            raise ConfigurationError(
                "this AsyncConnection is not started: install on its AsyncEngine, or await "
                "its start() first"
            )
        return target.sync_connection
    if isinstance(target, AsyncSession):
        return target.sync_session
    if isinstance(target, AsyncSessionmaker):
        hooked = _async_makers.get(target)
        if hooked is None:
            if not installing:
                raise ConfigurationError("CMK is not installed on this async_sessionmaker")
            # A subclass of its own, as sessionmaker makes for each maker: listening on the
            # sync_session_class itself (Session, by default) would hook every session.
            base = target.kw.get("sync_session_class") or target.class_.sync_session_class
            hooked = type(base.__name__, (base,), {"__module__": base.__module__})
            target.configure(sync_session_class=hooked)
            _async_makers[target] = hooked
        return hooked
    if isinstance(target, type) and issubclass(target, AsyncSession):
        raise ConfigurationError(
            "install on an async_sessionmaker, one AsyncSession, or the Session subclass "
            "given as sync_session_class, not on an AsyncSession class"
        )
    return target


def install(cmk: CMK, target: Any) -> list[tuple[str, Any]]:
    from sqlalchemy import Connection, Engine

    from ._guard import check_statement

    target = _sync_target(target, installing=True)
    if isinstance(target, Engine | Connection):
        # Core execution cannot seal (a value is bound to its row's key, which only the unit of
        # work knows), but the statement guard still refuses what would store plaintext or read
        # ciphertext wrongly. The ORM's own flush statements pass through here too, and pass.
        def before_execute(
            conn: Any, stmt: Any, multiparams: Any, params: Any, execution_options: Any
        ) -> tuple[Any, Any, Any]:
            stmt = _search_rewrite(cmk, stmt, lambda: conn, orm=False)[0]
            check_statement(stmt)
            return stmt, multiparams, params

        event.listen(target, "before_execute", before_execute, retval=True)
        return [("before_execute", before_execute)]

    def before_flush(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
        _one_cmk(session.dispatch.before_flush, cmk)
        _before_flush(cmk, session, flush_context, instances)

    def do_orm_execute(orm_state: ORMExecuteState) -> Any:
        opts = orm_state.execution_options
        stmt, checks = _search_rewrite(
            cmk,
            orm_state.statement,
            lambda: orm_state.session.connection(bind_arguments=orm_state.bind_arguments),
            orm=orm_state.is_select,
            streaming=bool(opts.get("yield_per") or opts.get("stream_results")),
        )
        if stmt is not orm_state.statement:
            orm_state.statement = stmt
        session = orm_state.session
        _one_cmk(session.dispatch.do_orm_execute, cmk)
        if checks and not session.dirty and not session.new:
            # Rows are checked against their decrypted value: objects already in the identity
            # map must hold the database's value, not one another transaction has since
            # changed, or a row matched by its new value would be dropped as a collision.
            # (Nothing unflushed is lost: there is nothing unflushed.)
            orm_state.update_execution_options(populate_existing=True)
        check_statement(orm_state.statement)  # before anything, internal queries included
        return _do_orm_execute(cmk, orm_state, checks)

    listeners: list[tuple[str, Any]] = [
        ("before_flush", before_flush),
        ("after_flush", _own(_restore)),
        ("after_soft_rollback", _own(_restore)),
        ("transient_to_pending", _own(_on_pending)),
        ("do_orm_execute", do_orm_execute),
    ]
    for fn in (before_flush, do_orm_execute):  # this CMK's own closures (not _restore...)
        setattr(fn, _OWNER, cmk)  # an attribute, not a registry: nothing here outlives fn
    for name, fn in listeners:
        event.listen(target, name, fn)
    return listeners


_OWNER = "_sqlalchemy_cmk_owner"


def _own(fn: Any) -> Any:
    """A function of one install's own for a shared hook. SQLAlchemy before 2.0.37 (its issue
    12216) records one entry per function and event for every target of a class-level event,
    so a function listened on two sessionmakers' classes made the second removal raise
    KeyError from ``uninstall``."""

    def hook(*args: Any) -> Any:
        return fn(*args)

    return hook


def _one_cmk(listeners: Any, cmk: CMK) -> None:
    """ConfigurationError if a hook of another CMK serves this session too: each would seal
    and open every value with its own keys, rows written under one failing every read as if
    tampered with. Hooks reach a session through its class and every base class, its
    sessionmaker and the session itself, so only the session's own listeners tell (a few)."""
    for fn in listeners:
        owner = getattr(fn, _OWNER, None)
        if owner is not None and owner is not cmk:
            raise ConfigurationError(
                "more than one CMK is installed on this session (through its sessionmaker, "
                "its class or a base class, or the session itself), and each would seal and "
                "open its values with its own keys: install one CMK, and uninstall() any "
                "other first"
            )


_no_terms: dict[Any, bool] = {}


def _search_rewrite(
    cmk: CMK, stmt: Any, own: Any, *, orm: bool, streaming: bool = False
) -> tuple[Any, Any]:
    """Search terms rewritten into blind index comparisons; statements known to hold none
    (by structure) cost a lookup."""
    from sqlalchemy.sql.elements import ClauseElement

    from ._guard import _structure
    from ._search import find_terms, rewrite

    if not isinstance(stmt, ClauseElement):
        return stmt, None
    key = _structure(stmt)
    if key is not None and key in _no_terms:
        return stmt, None
    terms = find_terms(stmt)  # one traversal, handed on: a search pays it once, not twice
    if not terms:
        if key is not None:
            if len(_no_terms) > 2000:
                _no_terms.clear()
            _no_terms[key] = True
        return stmt, None
    return rewrite(cmk, stmt, own, orm=orm, streaming=streaming, terms=terms)


def uninstall(target: Any, listeners: list[tuple[str, Any]]) -> None:
    # An async_sessionmaker keeps its hooked subclass (inert without listeners) so that its
    # sessions already made are not left with a class the maker no longer knows.
    target = _sync_target(target, installing=False)
    for name, fn in listeners:
        event.remove(target, name, fn)
