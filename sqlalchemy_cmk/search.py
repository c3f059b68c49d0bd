"""Searchable encrypted columns: per-tenant blind indexes for equality, IN, joins and uniqueness.

A column declared ``EncryptedType(String, search=BlindIndex(...))`` keeps its randomized
ciphertext and gains, beside it, a *blind index*: an HMAC-SHA256 of the normalized value under a
key of the row's tenant, truncated to ``bits``. ``select(User).where(User.email == "a@b.c")``
is rewritten, when it executes, into a comparison of that index (and the tenant column), so
the term never reaches the database; rows that match only by a collision of a truncated index
are dropped after decryption. See ``docs/search.md`` for the threat model, the planner and the
rotation runbook.

Key hierarchy (one per tenant, shared with what comes next, such as leased data keys)::

    tenant master key (the tenant's KMS)
      └─ wraps ─> tenant root key (32 random bytes; stored wrapped in cmk_tenant_keys)
                    └─ HKDF-SHA256(info = "sqlalchemy-cmk/bidx/v1" | domain | version)
                         └─> index key of one domain and version ─ HMAC-SHA256 ─> index values

The root key is unwrapped through the tenant's KMS and cached exactly like a data key (the
same ``cache_ttl``, LRU, ``forget_tenant`` and revocation), so revoking a tenant stops its
searches within the same bound as its reads.

A stored index value (version 1)::

    offset  size  field
    0       1     format, 0x01
    1       4     key version (big-endian)
    5       n     HMAC-SHA256(index key, message)[:n], n = ceil(bits / 8), the bits past
                  ``bits`` zeroed

and the message is the codec tag byte and the codec encoding of the normalized (and, for a
derived index, transformed) value: the same canonical encoding that is encrypted.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import math
import re
import struct
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Dialect

from ._codecs import Codec, codec_for, encode
from ._dialects import ExactString, Timestamp, select_dialect
from .errors import ConfigurationError, InvalidValueError

__all__ = [
    "BlindIndex",
    "BlindIndexType",
    "SearchLeakageWarning",
    "coincidences",
    "email_domain",
    "last_digits",
    "plan_bits",
    "search_tables",
    "year",
]

FORMAT = 1
_HEADER = struct.Struct(">BI")  # format, key version
HEADER_SIZE = _HEADER.size
MAX_BITS = 256
#: From this width on an index is *exact*: a false match needs an HMAC collision on at least
#: 128 bits (probability below 2**-64 even for 2**32 rows of one tenant), so the database may
#: decide a statement from the index alone (COUNT, LIMIT, !=, UPDATE/DELETE ... WHERE).
EXACT_BITS = 128
_INFO = b"sqlalchemy-cmk/bidx/v1"
_U16 = struct.Struct(">H")


class SearchLeakageWarning(UserWarning):
    """A blind index declaration leaks more than it needs to, or filters too little to help."""


# -- normalizers and derived transforms ---------------------------------------------------------


def _nfkc(v: Any) -> Any:
    return unicodedata.normalize("NFKC", v) if isinstance(v, str) else v


def _trim(v: Any) -> Any:
    return v.strip() if isinstance(v, str) else v


def _lower(v: Any) -> Any:
    return v.casefold() if isinstance(v, str) else v


def _email(v: Any) -> Any:
    # An address compares without case (domains always do; every mainstream provider folds the
    # local part too), after Unicode compatibility folding and outer spaces. Provider-specific
    # rules (Gmail's dots and +tags) are left to a callable: they are not true of every domain.
    return _lower(_trim(_nfkc(v)))


def _digits(v: Any) -> Any:
    return "".join(ch for ch in v if ch.isdigit()) if isinstance(v, str) else v


_NORMALIZERS: dict[str, Callable[[Any], Any]] = {
    "nfkc": _nfkc,
    "trim": _trim,
    "lower": _lower,
    "email": _email,
    "digits": _digits,
}


@dataclass(frozen=True)
class _Transform:
    """A named derivation of a value (a derived index's input); named, so it can be recorded."""

    name: str
    fn: Callable[[Any], Any] = field(compare=False)
    input_bits: float | None = None  # how many bits of information the output can carry

    def __call__(self, value: Any) -> Any:
        return self.fn(value)


def last_digits(n: int) -> _Transform:
    """The last ``n`` digits of a value's digits (``"123-45-6789"`` -> ``"6789"``)."""
    if not isinstance(n, int) or n < 1:
        raise ConfigurationError("last_digits(n) needs a positive int")

    def fn(v: Any) -> Any:
        d = _digits(str(v))
        return d[-n:] if len(d) >= n else None

    return _Transform(f"last_digits({n})", fn, n * math.log2(10))


def _domain_of(v: Any) -> Any:
    text = _email(str(v))
    at = text.rfind("@")
    return text[at + 1 :] if at >= 0 and at + 1 < len(text) else None


#: The domain of an e-mail address (``"Ann@Example.COM"`` -> ``"example.com"``).
email_domain = _Transform("email_domain", _domain_of)


def _year_of(v: Any) -> Any:
    return v.year if isinstance(v, datetime.date) else None


#: The year of a date or datetime.
year = _Transform("year", _year_of, math.log2(200))


# -- the declaration ----------------------------------------------------------------------------


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")


@dataclass(frozen=True)
class BlindIndex:
    """A blind index on an encrypted column: what is searchable, at what leakage.

    Args:
        name: The index column's name; default ``<column>_bidx`` (required for a second index
            of the same column). A second column, ``<name>_alt``, holds the other key version
            while the index key rotates.
        normalize: What makes two values equal: ``"email"``, ``"lower"`` (case folding),
            ``"trim"``, ``"nfkc"``, ``"digits"``, a callable, or a sequence of them applied in
            order. Applied to stored values and to search terms alike.
        transform: For a *derived* index (last four digits, e-mail domain, year), applied after
            ``normalize``: :func:`last_digits`, :data:`email_domain`, :data:`year`, or a
            callable; a term searched with ``Model.col.blind("name") == term`` is transformed
            the same way. ``None`` from the transform means "no index value" (NULL).
        bits: Index width, 1 to 256. Default: chosen by :func:`plan_bits` from
            ``expected_rows``, or 32 without it; unique indexes take 128. At 128 bits and more
            the index is *exact* (see ``docs/search.md``).
        unique: Enforce uniqueness per tenant: a unique index over (tenant column, index).
            Needs ``bits >= 128`` so that distinct values do not collide.
        domain: Indexes that share a domain share their key, so their columns can be joined
            (``A.email == B.email``). Default: ``<table>.<name>``, its own key.
        expected_rows: Rows per tenant this index is planned for; the planner checks ``bits``
            against it when the model is declared and warns (:class:`SearchLeakageWarning`).
        input_bits: How much information the indexed input carries at most (a 4-digit suffix:
            about 13.3 bits); the planner counts ``min(bits, input_bits)``.
    """

    name: str | None = None
    normalize: str | Callable[[Any], Any] | Sequence[str | Callable[[Any], Any]] = ()
    transform: Callable[[Any], Any] | None = None
    bits: int | None = None
    unique: bool = False
    domain: str | None = None
    expected_rows: int | None = None
    input_bits: float | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not (
            isinstance(self.name, str) and _NAME.fullmatch(self.name)
        ):
            raise ConfigurationError(
                "BlindIndex name must be an identifier of at most 51 characters"
            )
        for step in self.steps:
            if not callable(step):
                raise ConfigurationError(
                    f"unknown normalizer {step!r}: use one of {sorted(_NORMALIZERS)} or a callable"
                )
        if self.transform is not None and not callable(self.transform):
            raise ConfigurationError("BlindIndex transform must be callable")
        # bool is an int subclass: BlindIndex(bits=True) would silently mean a 1-bit index.
        if self.bits is not None and not (type(self.bits) is int and 1 <= self.bits <= MAX_BITS):
            raise ConfigurationError(f"BlindIndex bits must be an int from 1 to {MAX_BITS}")
        if self.unique and self.bits is not None and self.bits < EXACT_BITS:
            raise ConfigurationError(
                f"a unique BlindIndex needs bits >= {EXACT_BITS}: with fewer, two distinct "
                "values of one tenant collide often enough to be refused as duplicates"
            )
        if self.domain is not None and not (
            isinstance(self.domain, str) and 0 < len(self.domain) <= 200
        ):
            raise ConfigurationError("BlindIndex domain must be a non-empty str of at most 200")
        if self.expected_rows is not None and not (
            type(self.expected_rows) is int and self.expected_rows >= 1
        ):
            raise ConfigurationError("BlindIndex expected_rows must be a positive int")

    @functools.cached_property
    def steps(self) -> tuple[Callable[[Any], Any], ...]:
        """The normalizers as callables (cached: every indexed value and term runs them)."""
        raw = self.normalize
        items = [raw] if isinstance(raw, str) or callable(raw) else list(raw)
        return tuple(
            (_NORMALIZERS[s] if s in _NORMALIZERS else _unknown(s)) if isinstance(s, str) else s
            for s in items
        )

    @property
    def width(self) -> int:
        """The declared width, or the planner's choice."""
        if self.bits is not None:
            return self.bits
        if self.unique:
            return EXACT_BITS
        if self.expected_rows is not None:
            return plan_bits(self.expected_rows, input_bits=self.input_bits_or_transform)
        return 32

    @property
    def input_bits_or_transform(self) -> float | None:
        if self.input_bits is not None:
            return self.input_bits
        return getattr(self.transform, "input_bits", None)

    @property
    def fingerprint(self) -> str:
        """What the stored values depend on besides key and width: recorded with the index, so a
        process declaring another normalizer or transform is refused instead of missing rows."""
        parts = [_callable_name(s) for s in self.steps]
        t = "" if self.transform is None else _callable_name(self.transform)
        return f"normalize={','.join(parts)};transform={t}"[:250]

    def prepare(self, value: Any) -> Any:
        """The value as indexed: normalized, then transformed (``None``: no index value)."""
        for step in self.steps:
            value = step(value)
            if value is None:
                return None
        if self.transform is not None:
            value = self.transform(value)
        return value


def _unknown(name: str) -> Callable[[Any], Any]:
    raise ConfigurationError(
        f"unknown normalizer {name!r}: use one of {sorted(_NORMALIZERS)} or a callable"
    )


def _callable_name(fn: Any) -> str:
    if isinstance(fn, _Transform):
        return fn.name
    for name, known in _NORMALIZERS.items():
        if fn is known:
            return name
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


# -- the planner --------------------------------------------------------------------------------


def coincidences(rows: int, widths: Sequence[float]) -> float:
    """Expected rows sharing one combination of index values: ``R / 2 ** sum(widths)``.

    ``widths`` are the effective widths ``min(bits, input_bits)`` of every index of a column.
    """
    return rows / 2 ** sum(widths)


def plan_bits(rows: int, *, others: Sequence[float] = (), input_bits: float | None = None) -> int:
    """The widest index keeping ``2 <= C <= sqrt(R)`` (CipherSweet's rule) for ``rows`` per
    tenant, given the effective widths of the column's ``others`` indexes.

    Widest within the rule: as selective as it can be while every index value is still shared
    by at least two rows on average, so the index alone never singles a row out.
    """
    if rows < 1:
        raise ConfigurationError("plan_bits needs rows >= 1")
    taken = sum(others)
    # C >= 2  <=>  bits <= log2(R) - 1 - taken
    best = math.floor(math.log2(rows) - 1 - taken)
    if input_bits is not None:
        best = min(best, math.floor(input_bits))
    return max(1, min(best, MAX_BITS))


def check_plan(column: str, indexes: Sequence[BlindIndex]) -> None:
    """Warn when a column's non-unique indexes leak too much or filter too little."""
    planned = [ix for ix in indexes if ix.expected_rows is not None and not ix.unique]
    if not planned:
        return
    rows = max(ix.expected_rows or 0 for ix in planned)
    widths = [
        min(float(ix.width), ix.input_bits_or_transform or float("inf"))
        for ix in indexes
        if not ix.unique
    ]
    c = coincidences(rows, widths)
    if c < 2:
        warnings.warn(
            f"{column}: its blind indexes ({sum(widths):.1f} bits in all, over {rows} rows per "
            f"tenant) leave C = {c:.3g} expected coincidences, below 2: most values can be told "
            f"apart from the index alone. Use fewer bits (plan_bits({rows}) = "
            f"{plan_bits(rows)}) or fewer derived indexes, or declare the index unique",
            SearchLeakageWarning,
            stacklevel=_outside(),
        )
    elif c > math.sqrt(rows):
        warnings.warn(
            f"{column}: its blind indexes ({sum(widths):.1f} bits over {rows} rows per tenant) "
            f"leave C = {c:.3g} expected coincidences, above sqrt(R) = {math.sqrt(rows):.3g}: "
            "a search reads (and decrypts) too many rows to be useful. Use more bits "
            f"(plan_bits({rows}) = {plan_bits(rows)})",
            SearchLeakageWarning,
            stacklevel=_outside(),
        )


def _outside() -> int:
    """The ``stacklevel`` (for a warning raised by this module's caller) of the first frame
    outside SQLAlchemy and sqlalchemy-cmk: the model's declaration, however many event and
    declarative frames lie between it and :func:`check_plan`, or whoever called it directly.

    Frames are told by their module (``__name__`` of their globals), not their file: SQLAlchemy
    also runs code it generates, whose file is ``<string>`` or ``<sqlalchemy...>``.
    """
    import sys

    frame = sys._getframe(2)  # the frame that called the caller of this function
    level = 2
    while frame is not None and _ours(str(frame.f_globals.get("__name__", ""))):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def _ours(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in _OURS)


_OURS = ("sqlalchemy", "sqlalchemy_cmk")


# -- index values -------------------------------------------------------------------------------


def index_key(root: bytes | bytearray, domain: str, version: int) -> bytes:
    """The HMAC key of one index domain and key version, derived from a tenant's root key."""
    d = domain.encode()
    info = _INFO + _U16.pack(len(d)) + d + struct.pack(">I", version)
    return HKDF(hashes.SHA256(), 32, None, info).derive(bytes(root))


_PY_CODECS: dict[type, Codec] = {
    str: codec_for(sqltypes.String()),
    int: codec_for(sqltypes.BigInteger()),
    bytes: codec_for(sqltypes.LargeBinary()),
}


def message(value: Any, codec: Codec | None, *, table: str, column: str) -> bytes:
    """The bytes an index MACs: the codec tag and canonical encoding of the prepared value.

    ``codec`` is the column's own for an index of the value itself (a value it cannot encode
    is refused as a write would be); a derived index's output is encoded by its Python type
    (str, int, bytes).
    """
    if codec is None:
        codec = _PY_CODECS.get(type(value))
        if codec is None:
            raise InvalidValueError(
                f"{table}.{column}: a derived blind index must give str, int or bytes, not "
                f"{type(value).__name__}",
                table=table,
                column=column,
            )
    return encode(codec, value, table=table, column=column)


def root_check(root: bytes | bytearray) -> bytes:
    """A root key's check value, stored beside its envelope: HMAC-SHA256(root, a fixed label).

    A KMS that unwraps a root envelope to another key (a lying or broken KMS, or one of the
    tenant's data-key envelopes put in the root's place by someone who can write to the
    database) would otherwise index and search under a wrong key without a sound: new rows
    indexed so, and every search missing rows. The check refuses the key instead. It reveals
    nothing of the key (a MAC under it, of a public message).
    """
    return hmac.digest(bytes(root), b"sqlalchemy-cmk/root-check/v1", "sha256")


def index_value(key: bytes, version: int, bits: int, msg: bytes) -> bytes:
    """A stored index value: header, then the MAC truncated to ``bits``."""
    n = (bits + 7) // 8
    tag = bytearray(hmac.digest(key, msg, hashlib.sha256)[:n])
    spare = n * 8 - bits
    if spare:
        tag[-1] &= (0xFF << spare) & 0xFF
    return _HEADER.pack(FORMAT, version) + bytes(tag)


# -- storage ------------------------------------------------------------------------------------


class IndexValue(bytes):
    """An index value the hooks computed (internal); the index column binds only these."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<blind index value {len(self)} bytes>"


class BlindIndexType(sqltypes.TypeDecorator[bytes]):
    """The type of a blind index column: short binary, written only by sqlalchemy-cmk."""

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sqltypes.TypeEngine[Any]:
        return dialect.type_descriptor(select_dialect(dialect).index_storage(HEADER_SIZE + 32))

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        if type(value) is IndexValue:
            return bytes(value)
        from .errors import PlaintextWriteError

        raise PlaintextWriteError(
            "blind index columns are written by sqlalchemy-cmk's session hooks only: write the "
            "encrypted column through an installed session, and search it with Model.col == term"
        )

    def process_result_value(self, value: Any, dialect: Dialect) -> bytes | None:
        return None if value is None else bytes(value)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        impl = self.impl_instance.result_processor(dialect, coltype)

        def process(value: Any) -> bytes | None:
            if value is None:
                return None
            raw: Any = value if impl is None else impl(value)
            return bytes(raw)

        return process

    def bind_processor(self, dialect: Dialect) -> Any:
        # One flat function instead of TypeDecorator's chain (4.5 us a value, two values a
        # written row): drivers that take bytes get bytes, the rest the impl's wrapper.
        from .types import _BYTES_NATIVE

        if dialect.name not in _BYTES_NATIVE:
            return super().bind_processor(dialect)
        guard = self.process_bind_param

        def process(value: Any) -> Any:
            return bytes(value) if type(value) is IndexValue else guard(value, dialect)

        return process


#: Table of the tenants' wrapped root keys, and of the search indexes' states.
KEYS_TABLE = "cmk_tenant_keys"
STATES_TABLE = "cmk_search_indexes"


def search_tables(metadata: MetaData) -> tuple[Table, Table]:
    """Add the two tables searchable columns need to ``metadata`` (for ``create_all`` and
    Alembic autogenerate), or return them if already there.

    ``cmk_tenant_keys``: each tenant's root key, wrapped by its KMS (one row per tenant,
    purpose and version). ``cmk_search_indexes``: each index domain's state (building, ready,
    rotating, switched), which slot is read and which key versions and widths are written.
    """
    keys = metadata.tables.get(KEYS_TABLE)
    if keys is None:
        keys = Table(
            KEYS_TABLE,
            metadata,
            Column("tenant", ExactString(512), primary_key=True),
            Column("purpose", String(16), primary_key=True),
            Column("version", Integer, primary_key=True, autoincrement=False),
            Column("envelope", LargeBinary, nullable=False),
            # root_check(root key): proves an unwrapped root key is the one stored here
            Column("check_value", LargeBinary, nullable=False),
            Column("created_at", Timestamp(), nullable=False),
        )
    states = metadata.tables.get(STATES_TABLE)
    if states is None:
        states = Table(
            STATES_TABLE,
            metadata,
            Column("domain", ExactString(200), primary_key=True),
            Column("phase", String(16), nullable=False),
            Column("slot", Integer, nullable=False),
            Column("version", Integer, nullable=False),
            Column("bits", Integer, nullable=False),
            Column("other_version", Integer, nullable=True),
            Column("other_bits", Integer, nullable=True),
            Column("fingerprint", String(255), nullable=False),
            Column("updated_at", Timestamp(), nullable=False),
        )
    return keys, states
