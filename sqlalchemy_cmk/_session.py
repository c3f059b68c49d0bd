"""The session hooks: encrypt on flush, decrypt on load.

Flush: ``before_flush`` encrypts every new or changed encrypted attribute and puts the sealed
value in the instance's ``__dict__`` (so the mapper sends ciphertext), remembering the plaintext;
``after_flush`` puts the plaintext back, and ``after_soft_rollback`` does so when the flush
failed. Nothing is sent unless every value of the flush was sealed: a missing tenant or a KMS
failure raises from ``before_flush``, before any SQL.

Load: ``do_orm_execute`` runs each ORM SELECT with a collector in a context variable, so the
mapper-level ``load``/``refresh`` events only note which instances arrived; once the result is
complete, all of them are decrypted together (distinct data keys unwrapped once each, in
parallel). Streaming results (``yield_per``) are decrypted instance by instance instead.

Listeners are attached to the user's sessionmaker (or session) by ``install``; the per-class
``load``/``refresh`` listeners are inert outside an installed session.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Sequence
from typing import Any

from sqlalchemy import event, select, tuple_
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm.state import InstanceState

from ._cmk import CMK
from ._mapping import ColumnSpec, TableSpec, mapper_spec
from .context import current_context, require_context
from .errors import PlaintextWriteError
from .types import EncryptedValue, Sealed

_INFO_KEY = "sqlalchemy_cmk"
_PENDING_KEY = "sqlalchemy_cmk.pending"
_ABSENT = object()

_collector: contextvars.ContextVar[list[InstanceState[Any]] | None] = contextvars.ContextVar(
    "sqlalchemy_cmk_collector", default=None
)
_listened: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()
_registries_seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


# -- load ----------------------------------------------------------------------------------------


def _on_load(state: InstanceState[Any], context: Any, *args: Any) -> None:
    collected = _collector.get()
    if collected is not None:
        collected.append(state)
        return
    session = getattr(context, "session", None)
    cmk = session.info.get(_INFO_KEY) if session is not None else None
    if cmk is not None:
        decrypt_states(cmk, [state])


def _listen_mappers(mappers: Any) -> None:
    """Attach load/refresh listeners to every mapper with encrypted columns in these registries."""
    for m in mappers:
        registry = m.registry
        if _registries_seen.get(registry) == len(registry.mappers):
            continue
        for mapper in registry.mappers:
            if mapper not in _listened and mapper_spec(mapper).tables:
                event.listen(mapper, "load", _on_load, raw=True)
                event.listen(mapper, "refresh", _on_load, raw=True)
                _listened.add(mapper)
        _registries_seen[registry] = len(registry.mappers)


def decrypt_states(cmk: CMK, states: list[InstanceState[Any]]) -> None:
    dicts: list[dict[str, Any]] = []
    tables: list[TableSpec] = []
    tables_of: dict[Mapper[Any], tuple[TableSpec, ...]] = {}
    deferred: list[InstanceState[Any]] = []  # companion not loaded (load_only, defer)
    for state in states:
        mapper = state.mapper
        specs = tables_of.get(mapper)
        if specs is None:
            specs = tables_of[mapper] = mapper_spec(mapper).tables
        d = state.dict
        for t in specs:
            dicts.append(d)
            tables.append(t)
            if t.companion_key not in d:
                deferred.append(state)
    if not dicts:
        return
    try:
        if deferred:
            _load_missing_companions(deferred, tables_of)
        cmk.open(dicts, tables, current_context())
    except BaseException:
        # Leave no ciphertext (nor half a batch of plaintext) in loaded objects: expire the
        # encrypted attributes, so a later access reloads and raises again.
        for state in states:
            session, obj = state.session, state.obj()
            if session is not None and obj is not None and state.key is not None:
                keys = [c.key for t in tables_of[state.mapper] for c in t.columns]
                session.expire(obj, keys)
        raise


def _load_missing_companions(
    states: list[InstanceState[Any]], tables_of: dict[Mapper[Any], tuple[TableSpec, ...]]
) -> None:
    """Fetch the companions that a ``load_only``/``defer`` left out, one query per table."""
    missing: dict[tuple[Mapper[Any], TableSpec], list[InstanceState[Any]]] = {}
    for state in states:
        d = state.dict
        for t in tables_of[state.mapper]:
            if (
                t.companion_key not in d
                and state.key is not None
                and any(type(d.get(c.key)) is EncryptedValue for c in t.columns)
            ):
                missing.setdefault((state.mapper, t), []).append(state)
    for (mapper, t), group in missing.items():
        session = group[0].session
        if session is None:
            return
        pk = mapper.primary_key
        companion = mapper.columns[t.companion_key]
        by_ident = {state.key[1]: state for state in group if state.key is not None}
        idents = list(by_ident)
        with session.no_autoflush:
            for i in range(0, len(idents), 500):
                chunk = idents[i : i + 500]
                where = pk[0].in_([k[0] for k in chunk]) if len(pk) == 1 else tuple_(*pk).in_(chunk)
                for row in session.execute(select(*pk, companion).where(where)):
                    found = by_ident.get(tuple(row[: len(pk)]))
                    if found is not None:
                        found.dict[t.companion_key] = row[-1]
                        found.committed_state.pop(t.companion_key, None)


def _do_orm_execute(cmk: CMK, orm_state: ORMExecuteState) -> Any:
    session = orm_state.session
    session.info[_INFO_KEY] = cmk
    if not orm_state.is_orm_statement:
        return None
    _listen_mappers(orm_state.all_mappers)
    if orm_state.is_insert:
        return _bulk_insert(cmk, orm_state)
    if not orm_state.is_select or _collector.get() is not None:
        return None
    opts = orm_state.execution_options
    if opts.get("yield_per") or opts.get("stream_results"):
        return None  # streaming: _on_load decrypts each instance as it arrives
    collected: list[InstanceState[Any]] = []
    token = _collector.set(collected)
    try:
        frozen = orm_state.invoke_statement().freeze()
    finally:
        _collector.reset(token)
    decrypt_states(cmk, collected)
    return frozen()


# -- flush ---------------------------------------------------------------------------------------


def _before_flush(
    cmk: CMK, session: Session, flush_context: UOWTransaction, instances: Any
) -> None:
    session.info[_INFO_KEY] = cmk
    # Parallel lists, not per-row objects: see CMK.seal.
    states: list[InstanceState[Any]] = []
    dicts: list[dict[str, Any]] = []
    tables: list[TableSpec] = []
    columns: list[Sequence[ColumnSpec]] = []
    companions: list[bytes | None] = []
    tables_of: dict[Mapper[Any], tuple[TableSpec, ...]] = {}
    for obj in list(session.new) + list(session.dirty):
        state: InstanceState[Any] = obj._sa_instance_state
        mapper = state.mapper
        specs = tables_of.get(mapper)
        if specs is None:
            specs = tables_of[mapper] = mapper_spec(mapper).tables
        if not specs:
            continue
        d = state.dict
        if state.key is None:  # new: every value that is set
            for t in specs:
                for c in t.columns:
                    v = d.get(c.key)
                    if v is not None and type(v) is not Sealed:
                        break
                else:
                    continue
                states.append(state)
                dicts.append(d)
                tables.append(t)
                columns.append(t.columns)
                companions.append(None)
            continue
        committed = state.committed_state
        for t in specs:
            cols = [
                c
                for c in t.columns
                if c.key in committed
                and (v := d.get(c.key)) is not None
                and type(v) is not Sealed
                and type(v) is not EncryptedValue
                and committed[c.key] != v
            ]
            if cols:
                states.append(state)
                dicts.append(d)
                tables.append(t)
                columns.append(cols)
                companions.append(None)  # read from the database below
    if not dicts:
        return
    _current_companions(session, states, tables, companions)
    new_companions, cts = cmk.seal(dicts, tables, columns, companions, require_context())
    # Only now, with every value sealed, touch the instances. What to restore after the flush
    # is kept as four flat lists.
    pending = session.info.get(_PENDING_KEY)
    if pending is None:
        empty: tuple[list[dict[str, Any]], list[str], list[Sealed], list[Any]] = ([], [], [], [])
        pending = session.info[_PENDING_KEY] = empty
    p_dicts, p_keys, p_boxes, p_plain = pending
    n = 0
    for state, d, t, row_cols, companion in zip(
        states, dicts, tables, columns, new_companions, strict=True
    ):
        for c in row_cols:
            v = d.get(c.key)
            if v is None:
                continue
            box = Sealed(cts[n])
            n += 1
            p_dicts.append(d)
            p_keys.append(c.key)
            p_boxes.append(box)
            p_plain.append(v)
            d[c.key] = box
        if companion is None:
            continue
        if state.key is None:
            d[t.companion_key] = companion  # an INSERT reads the dict; no history needed
        else:
            setattr(state.obj(), t.companion_key, companion)


def _current_companions(
    session: Session,
    states: list[InstanceState[Any]],
    tables: list[TableSpec],
    companions: list[bytes | None],
) -> None:
    """Fill in the companions of updated rows from the database, locking the rows (PostgreSQL).

    Not from memory: a backfill, a key rotation or another session may have given the row a
    companion since this session loaded it, and sealing under a stale one would strand the
    row's other encrypted values. One query per table per flush; ``FOR UPDATE`` keeps the
    companion from changing until this transaction ends (backfills skip locked rows).
    """
    groups: dict[tuple[Mapper[Any], TableSpec], dict[tuple[Any, ...], list[int]]] = {}
    for i, (state, t) in enumerate(zip(states, tables, strict=True)):
        if state.key is not None:
            groups.setdefault((state.mapper, t), {}).setdefault(state.key[1], []).append(i)
    with session.no_autoflush:
        for (mapper, t), by_ident in groups.items():
            pk = mapper.primary_key
            companion = mapper.columns[t.companion_key]
            idents = list(by_ident)
            for n in range(0, len(idents), 500):
                chunk = idents[n : n + 500]
                where = pk[0].in_([k[0] for k in chunk]) if len(pk) == 1 else tuple_(*pk).in_(chunk)
                query = select(*pk, companion).where(where).with_for_update()
                for row in session.execute(query):
                    current = row[-1]
                    for i in by_ident.get(tuple(row[: len(pk)]), ()):
                        companions[i] = current if isinstance(current, bytes) else None
                        d = states[i].dict
                        if d.get(t.companion_key) != companions[i]:
                            d[t.companion_key] = companions[i]  # what the database holds
                            states[i].committed_state.pop(t.companion_key, None)


def _restore(session: Session, *args: Any) -> None:
    pending = session.info.pop(_PENDING_KEY, None)
    if pending is None:
        return
    for d, key, box, plain in zip(*pending, strict=True):
        if d.get(key) is box:
            d[key] = plain


def _bulk_insert(cmk: CMK, orm_state: ORMExecuteState) -> Any:
    mapper = orm_state.bind_mapper
    if mapper is None or not mapper_spec(mapper).tables or not orm_state.parameters:
        return None
    if getattr(orm_state.statement, "_post_values_clause", None) is not None:
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
    dicts: list[dict[str, Any]] = []
    tables: list[TableSpec] = []
    for d in new_rows:
        for t in mapper_spec(mapper).tables:
            if any(d.get(c.key) is not None for c in t.columns):
                dicts.append(d)
                tables.append(t)
    if not dicts:
        return None
    companions, cts = cmk.seal(
        dicts, tables, [t.columns for t in tables], [None] * len(dicts), require_context()
    )
    n = 0
    for d, t, companion in zip(dicts, tables, companions, strict=True):
        d[t.companion_key] = companion
        for c in t.columns:
            if d.get(c.key) is not None:
                d[c.key] = Sealed(cts[n])
                n += 1
    return orm_state.invoke_statement(params=new_rows if isinstance(params, list) else new_rows[0])


# -- install -------------------------------------------------------------------------------------


def install(cmk: CMK, target: Any) -> list[tuple[str, Any]]:
    def before_flush(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
        _before_flush(cmk, session, flush_context, instances)

    def do_orm_execute(orm_state: ORMExecuteState) -> Any:
        return _do_orm_execute(cmk, orm_state)

    listeners: list[tuple[str, Any]] = [
        ("before_flush", before_flush),
        ("after_flush", _restore),
        ("after_soft_rollback", _restore),
        ("do_orm_execute", do_orm_execute),
    ]
    for name, fn in listeners:
        event.listen(target, name, fn)
    return listeners


def uninstall(target: Any, listeners: list[tuple[str, Any]]) -> None:
    for name, fn in listeners:
        event.remove(target, name, fn)
