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
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm.state import InstanceState

from ._cmk import CMK, OpenJob, SealJob
from ._mapping import mapper_spec
from .context import current_context, require_context
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
    jobs: list[tuple[InstanceState[Any], str, OpenJob]] = []
    for state in states:
        d = state.dict
        for t in mapper_spec(state.mapper).tables:
            values = {
                c: v.ciphertext for c in t.columns if type(v := d.get(c.key)) is EncryptedValue
            }
            if not values:
                continue
            companion = d.get(t.companion_key)
            jobs.append((state, t.companion_key, OpenJob(t.table, companion, values)))  # type: ignore[arg-type]
    if not jobs:
        return
    try:
        if any(j.companion is None for _, _, j in jobs):
            from .errors import DecryptionError

            raise DecryptionError(
                "a row holds encrypted values but its EDEK column is NULL "
                "or was not loaded (do not defer the EDEK column)"
            )
        cmk.open([j for _, _, j in jobs], current_context())
    except BaseException:
        # Leave no ciphertext behind in loaded objects: expire what could not be decrypted, so a
        # later access reloads and raises again instead of returning an opaque value.
        for state, _, job in jobs:
            session = state.session
            obj = state.obj()
            if session is not None and obj is not None and state.key is not None:
                session.expire(obj, [c.key for c in job.values])
        raise
    for state, _, job in jobs:
        d = state.dict
        for col, value in (job.plain or {}).items():
            d[col.key] = value


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
    jobs: list[tuple[InstanceState[Any], str, SealJob]] = []
    for obj in list(session.new) + list(session.dirty):
        state: InstanceState[Any] = obj._sa_instance_state
        spec = mapper_spec(state.mapper)
        if not spec.tables:
            continue
        _listen_mappers([state.mapper])
        d, committed, is_new = state.dict, state.committed_state, state.key is None
        for t in spec.tables:
            values: dict[Any, Any] = {}
            for c in t.columns:
                v = d.get(c.key)
                if v is None or type(v) is Sealed or type(v) is EncryptedValue:
                    continue
                if is_new or (c.key in committed and committed[c.key] != v):
                    values[c] = v
            if not values:
                continue
            companion = None if is_new else _companion_of(obj, t.companion_key)
            jobs.append((state, t.companion_key, SealJob(t.table, values, companion)))
    if not jobs:
        return
    ctx = require_context()
    cmk.seal([j for _, _, j in jobs], ctx)
    # Only now, with every value sealed, touch the instances.
    pending: list[tuple[InstanceState[Any], str, object, object]] = session.info.setdefault(
        _PENDING_KEY, []
    )
    for state, companion_key, job in jobs:
        d = state.dict
        for col, ct in (job.sealed or {}).items():
            sealed = Sealed(ct)
            pending.append((state, col.key, sealed, d[col.key]))
            d[col.key] = sealed
        if job.new_companion is not None:
            obj = state.obj()
            setattr(obj, companion_key, job.new_companion)


def _companion_of(obj: Any, key: str) -> bytes | None:
    # Loads the companion if it was expired (an object changed after commit without a reload).
    value = getattr(obj, key)
    return value if isinstance(value, bytes) else None


def _restore(session: Session, *args: Any) -> None:
    for state, key, sealed, plain in session.info.pop(_PENDING_KEY, ()):
        if state.dict.get(key) is sealed:
            state.dict[key] = plain


def _bulk_insert(cmk: CMK, orm_state: ORMExecuteState) -> Any:
    mapper = orm_state.bind_mapper
    if mapper is None or not mapper_spec(mapper).tables or not orm_state.parameters:
        return None
    params: Any = orm_state.parameters
    rows: list[dict[str, Any]] = params if isinstance(params, list) else [params]
    jobs: list[tuple[int, str, SealJob]] = []
    for i, row in enumerate(rows):
        for t in mapper_spec(mapper).tables:
            values = {c: row[c.key] for c in t.columns if row.get(c.key) is not None}
            if values:
                jobs.append((i, t.companion_key, SealJob(t.table, values)))
    if not jobs:
        return None
    cmk.seal([j for _, _, j in jobs], require_context())
    new_rows = [dict(r) for r in rows]
    for i, companion_key, job in jobs:
        new_rows[i][companion_key] = job.new_companion
        for col, ct in (job.sealed or {}).items():
            new_rows[i][col.key] = Sealed(ct)
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
