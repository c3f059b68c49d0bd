"""Lazy decryption: a query's encrypted values decrypted on first access, a column at a time.

A pending value is what SQLAlchemy calls a deferred, unloaded attribute: its key is absent from
the instance's ``__dict__`` (``state.dict``), and a loader is registered in
``state.callables[key]``, which the attribute's ``get`` calls on first access (SQLAlchemy's own
deferred columns load this way). So every path that already copes with an unloaded column (a
flush that updates another column, ``merge``, ``expire``, ``refresh``, ``populate_existing``)
copes with a pending one, and no object ever holds ciphertext: it lives only in the load's
:class:`_Batch`.

At load, everything :meth:`CMK.open` checks before it unwraps a key still runs (companion
format, tenant in context, each row's key bound to it, the declared tenant column); only the
key lookup, the cipher and the decoding wait. On first access of a column on any object of the
load, that column is decrypted for every object of the load still pending for it, through the
key cache *at that moment* (an expired entry is fetched again from the KMS, so a revocation
still bites within ``cache_ttl``), under the tenant context of that moment, with one audit
event. A value that fails to decrypt raises and stays pending: nothing of it is exposed, and
the next access raises again.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from sqlalchemy.orm import loading as _loading
from sqlalchemy.orm.base import LoaderCallableStatus, PassiveFlag
from sqlalchemy.orm.state import InstanceState

from . import _format
from ._access import access
from ._cmk import CMK
from ._mapping import ColumnSpec, TableSpec
from .context import current_context
from .errors import DecryptionError, NoTenantError
from .types import EncryptedValue

# SQLAlchemy's loader of expired and deferred column attributes (renamed private in 2.1).
_load_columns: Any = vars(_loading).get("_load_scalar_attributes") or vars(_loading).get(
    "load_scalar_attributes"
)
_SQL_OK = PassiveFlag.SQL_OK
_NO_RESULT = LoaderCallableStatus.PASSIVE_NO_RESULT
_WAS_SET = LoaderCallableStatus.ATTR_WAS_SET


class _Reload:
    """What a pending value becomes when its object is pickled: the batch (and its
    ciphertexts) stays behind, so the value is read again from the database on access, like
    an expired attribute (``DetachedInstanceError`` for an object in no session)."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, state: InstanceState[Any], passive: PassiveFlag) -> Any:
        if not passive & _SQL_OK:
            return _NO_RESULT
        return _reload(state, self.key, passive)


def _reload(state: InstanceState[Any], key: str, passive: PassiveFlag) -> Any:
    """Read the attribute again from the database, as an expired one is (and decrypted at
    once: a column load is never lazy, see ``_session._do_orm_execute``)."""
    _load_columns(state.mapper, state, {key}, passive)
    state.callables.pop(key, None)
    return _WAS_SET


class _Column:
    """The pending values of one column of one table in a load, and their loader."""

    __slots__ = ("batch", "column", "companions", "states", "table", "values")

    def __init__(self, batch: _Batch, table: TableSpec, column: ColumnSpec) -> None:
        self.batch = batch
        self.table = table
        self.column = column
        self.states: list[weakref.ref[InstanceState[Any]]] = []
        self.companions: list[bytes] = []
        self.values: list[EncryptedValue] = []

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Reload, (self.column.key,))

    def __call__(self, state: InstanceState[Any], passive: PassiveFlag) -> Any:
        if not passive & _SQL_OK:
            # A flush or history check that may not load: the value counts as unloaded.
            return _NO_RESULT
        self.open()
        if self.column.key in state.dict:
            return _WAS_SET
        # Not one of this load's objects: the loader was copied onto it (merge(load=False)).
        return _reload(state, self.column.key, passive)

    def open(self) -> None:
        """Decrypt this column for every object of the load still pending for it."""
        started = time.monotonic()
        key = self.column.key
        t = self.table
        live: list[InstanceState[Any]] = []
        dicts: list[dict[str, Any]] = []
        envelopes: dict[bytes, None] = {}  # of the values still pending: only their keys
        ckey = t.companion_key
        split = 1 + _format.ROW_ID_SIZE
        last = b"\x00"  # never an envelope
        for ref, companion, value in zip(self.states, self.companions, self.values, strict=True):
            state = ref()
            # Pending = unloaded and still ours: an assignment, a refresh or an expiry since
            # took the attribute over (and an expiry removed this loader).
            if state is None or key in state.dict or state.callables.get(key) is not self:
                continue
            live.append(state)
            dicts.append({ckey: companion, key: value})
            if not (len(companion) - split == len(last) and companion.endswith(last)):
                last = companion[split:]
                envelopes[last] = None
        if live:
            # The load checked the rows (format, tenant in its context); the tenant is checked
            # again against the context of this access, and the keys come through the cache
            # now. Raises before anything is set: every value stays pending on failure.
            cmk = self.batch.cmk
            ctx = current_context()
            # The first access is an access of its own: audited once, refused or not.
            with access(cmk._keys, ctx, "decrypt") as acc:
                acc.table(t.table, (self.column.name,))
                acc.fixed = True
                if ctx is None:
                    raise NoTenantError(
                        f"encrypted values of {t.table!r} read with no tenant in context: wrap "
                        "the work in `with tenant_context(tenant_id, ...)`",
                        table=t.table,
                    )
                tenant_of = cmk._check_tenants(envelopes, ctx, t.table)
                cmk._open_checked(dicts, [t] * len(dicts), ctx, started, tenant_of, envelopes)
            for state, d in zip(live, dicts, strict=True):
                state.dict[key] = d[key]
                del state.callables[key]
        self.states, self.companions, self.values = [], [], []  # nothing left to decrypt


class _Batch:
    """One load's pending values, a :class:`_Column` per encrypted column."""

    __slots__ = ("cmk", "columns")

    def __init__(self, cmk: CMK) -> None:
        self.cmk = cmk
        # By table and attribute: in joined inheritance, each mapper has its own TableSpec of
        # the base table, and one column of one table is one batch.
        self.columns: dict[tuple[str, str], _Column] = {}


def defer_values(
    cmk: CMK,
    owners: list[InstanceState[Any]],
    dicts: list[dict[str, Any]],
    tables: list[TableSpec],
) -> None:
    """Check a load's rows as :meth:`CMK.open` does before any unwrap, then move their
    encrypted values out of the objects into one batch, each attribute left unloaded with the
    batch's loader (``dicts[i]`` is ``owners[i].dict``)."""
    if cmk._check_open(dicts, tables, current_context()) is None:
        return
    batch = _Batch(cmk)
    columns = batch.columns
    min_value = _format.MIN_VALUE
    enc_value = EncryptedValue
    for state, d, t in zip(owners, dicts, tables, strict=True):
        companion = d.get(t.companion_key)
        if companion is None:
            continue  # no values (_check_open refused a row with values and no companion)
        ref = weakref.ref(state)
        if "callables" not in state.__dict__:  # the class-level default is a shared empty dict
            state.callables = {}
        callables = state.callables
        for c in t.columns:
            v = d.get(c.key)
            if type(v) is not enc_value:
                continue
            if len(v) < min_value or v[0] != 1:
                raise DecryptionError("stored value is malformed or of an unknown version")
            col = columns.get((t.table, c.key))
            if col is None:
                col = columns[(t.table, c.key)] = _Column(batch, t, c)
            col.states.append(ref)
            col.companions.append(companion)
            col.values.append(v)
            del d[c.key]
            callables[c.key] = col
