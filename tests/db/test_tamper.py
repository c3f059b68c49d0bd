"""Tampering with stored bytes: every change an attacker with write access can make is caught.

Each check rewrites raw bytes through a plain connection (as a DBA or an SQL injection would),
then loads the row through an installed session in the tenant's context. The load must raise a
typed error (never return garbage), the error must not carry plaintext, key bytes or ciphertext,
and touching the attribute again must raise again (never hand out an ``EncryptedValue`` or
``None``).

Companion layout (``sqlalchemy_cmk/_format.py``), for tenant ``acme`` under ``fake://acme``::

    0 version | 1..16 row id | 17..18 len | 19..22 "acme" | 23 len | 24..27 "fake"
    | 28..29 len | 30..40 "fake://acme" | 41..42 len | 43.. wrapped key (60 bytes from the fake)
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest
from sqlalchemy import Engine, String, inspect, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    CMKError,
    DecryptionError,
    EncryptedMixin,
    EncryptedType,
    TenantMismatchError,
    TenantNotConfiguredError,
    cross_tenant_context,
    tenant_context,
)
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink


class Base(DeclarativeBase):
    pass


class Secret(EncryptedMixin, Base):
    __tablename__ = "tamper_secrets"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(50))
    a: Mapped[str | None] = mapped_column(EncryptedType(String))
    b: Mapped[str | None] = mapped_column(EncryptedType(String))


ACME, GLOBEX = "acme", "globex"
# Distinctive plaintexts: none of them can occur by chance in an error message.
SEED = {
    1: (ACME, "pt:Zq7a1", "pt:Zq7b1"),
    2: (ACME, "pt:Zq7a2", "pt:Zq7b2"),
    3: (GLOBEX, "pt:Zq7a3", "pt:Zq7b3"),
}
TENANT_OF = {row_id: tenant for row_id, (tenant, _, _) in SEED.items()}


class RecordingKMS(FakeKeyProvider):
    """The fake KMS, also remembering every data key it saw, to look for them in messages."""

    def __init__(self) -> None:
        super().__init__()
        self.data_keys: list[bytes] = []

    def wrap_key(self, key_ref: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
        self.data_keys.append(bytes(data_key))
        return super().wrap_key(key_ref, data_key, context)

    def unwrap_key(self, key_ref: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        key = super().unwrap_key(key_ref, wrapped, context)
        self.data_keys.append(bytes(key))
        return key


@dataclass
class Env:
    engine: Engine
    session: sessionmaker[Session]
    cmk: CMK
    kms: RecordingKMS
    audit: MemoryAuditSink
    originals: dict[int, dict[str, bytes]] = field(default_factory=dict)


@pytest.fixture
def env(engine: Engine) -> Iterator[Env]:
    Base.metadata.create_all(engine)
    kms = RecordingKMS()
    audit = MemoryAuditSink()
    cmk = CMK(kms, tenant_keys={ACME: "fake://acme", GLOBEX: "fake://globex"}, audit_sinks=[audit])
    factory = sessionmaker(engine)
    cmk.install(factory)
    for row_id, (tenant, a, b) in SEED.items():
        with tenant_context(tenant), factory() as s:
            s.add(Secret(id=row_id, tenant_id=tenant, a=a, b=b))
            s.commit()
    e = Env(engine, factory, cmk, kms, audit)
    e.originals = {row_id: raw_row(engine, row_id) for row_id in SEED}
    yield e
    cmk.uninstall(factory)


# -- helpers -------------------------------------------------------------------------------------


def raw_row(engine: Engine, row_id: int) -> dict[str, bytes]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT a, b, cmk_edek FROM tamper_secrets WHERE id = :id"), {"id": row_id}
        ).one()
    assert None not in row  # every seeded value and companion is stored
    return {k: bytes(v) for k, v in row._mapping.items()}


def raw_write(engine: Engine, row_id: int, **columns: bytes | None) -> None:
    """UPDATE through a plain connection: no hooks, no checks, as an attacker would."""
    assert set(columns) <= {"a", "b", "cmk_edek"}
    sets = ", ".join(f"{c} = :{c}" for c in columns)
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE tamper_secrets SET {sets} WHERE id = :id"), {**columns, "id": row_id}
        )


def flip(data: bytes, pos: int, mask: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1 :]


def _forms(secret: bytes | str) -> list[str]:
    if isinstance(secret, str):
        return [secret]
    return [secret.hex(), repr(secret)[2:-1], base64.b64encode(secret).decode()]


def assert_discreet(exc: BaseException, env: Env, *extra: bytes) -> None:
    """No plaintext, data key or ciphertext anywhere in the error or its chain."""
    secrets: list[bytes | str] = [v for _, a, b in SEED.values() for v in (a, b)]
    secrets += env.kms.data_keys
    secrets += [v for row in env.originals.values() for v in row.values()]
    secrets += [x for x in extra if len(x) >= 8]
    assert env.kms.data_keys, "no data key recorded: the check would be vacuous"
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        shown = f"{e}\n{e!r}\n{e.args!r}\n{vars(e)!r}"
        for secret in secrets:
            for form in _forms(secret):
                assert form not in shown, f"{type(e).__name__} reveals a secret: {shown}"
        e = e.__cause__ or e.__context__


def expect_load_error(
    env: Env,
    row_id: int,
    expected: type[CMKError],
    *,
    cross_tenant: bool = False,
    extra: tuple[bytes, ...] = (),
) -> CMKError:
    """Load the row; assert the exact error, its discretion, and that it sticks on re-access."""
    ctx = (
        cross_tenant_context(actor="tamper-test")
        if cross_tenant
        else tenant_context(TENANT_OF[row_id])
    )
    with ctx, env.session() as s:
        with pytest.raises(CMKError) as info:
            s.get(Secret, row_id)
        assert type(info.value) is expected, f"got {type(info.value).__name__}: {info.value}"
        assert_discreet(info.value, env, *extra)
        objs = [o for o in s.identity_map.values() if isinstance(o, Secret)]
        assert len(objs) == 1
        obj = objs[0]
        for attr in ("a", "b"):
            # Never left holding ciphertext (or a None standing in for it).
            assert attr not in inspect(obj).dict
            with pytest.raises(CMKError) as again:
                getattr(obj, attr)
            assert type(again.value) is expected
            assert attr not in inspect(obj).dict
    return info.value


def load(env: Env, row_id: int) -> tuple[str | None, str | None]:
    with tenant_context(TENANT_OF[row_id]), env.session() as s:
        obj = s.get(Secret, row_id)
        assert obj is not None
        return obj.a, obj.b


def restore(env: Env, row_id: int) -> None:
    raw_write(env.engine, row_id, **env.originals[row_id])
    assert load(env, row_id) == SEED[row_id][1:]


# -- the stored value ----------------------------------------------------------------------------


def test_untampered_rows_load(env: Env) -> None:
    for row_id in SEED:
        assert load(env, row_id) == SEED[row_id][1:]


@pytest.mark.parametrize("mask", [0x01, 0x80], ids=["low-bit", "high-bit"])
def test_flipping_any_byte_of_a_value_raises_decryption_error(env: Env, mask: int) -> None:
    value = env.originals[1]["a"]
    assert len(value) == 1 + 12 + 1 + len(SEED[1][1]) + 16  # version, nonce, tag+text, GCM tag
    for pos in range(len(value)):
        tampered = flip(value, pos, mask)
        raw_write(env.engine, 1, a=tampered)
        expect_load_error(env, 1, DecryptionError, extra=(tampered,))
    restore(env, 1)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda v: v[:-1], id="drop-last-byte"),
        pytest.param(lambda v: v[:-16], id="drop-gcm-tag"),
        pytest.param(lambda v: v[:29], id="below-minimum-length"),
        pytest.param(lambda v: v[:1], id="version-only"),
        pytest.param(lambda v: b"", id="empty"),
        pytest.param(lambda v: v + b"\x00", id="append-zero"),
        pytest.param(lambda v: v + v[-1:], id="append-copy-of-last"),
        pytest.param(lambda v: v[:13] + v[14:] + v[13:14], id="rotate-ciphertext"),
    ],
)
def test_truncated_or_extended_value_raises_decryption_error(env: Env, change: object) -> None:
    tampered = change(env.originals[1]["a"])  # type: ignore[operator]
    raw_write(env.engine, 1, a=tampered)
    expect_load_error(env, 1, DecryptionError, extra=(tampered,))
    restore(env, 1)


# -- the companion -------------------------------------------------------------------------------


def companion_regions(edek: bytes) -> dict[str, range]:
    """Byte ranges of each companion field, checked against the bytes actually stored."""
    regions = {
        "version": range(0, 1),
        "row_id": range(1, 17),
        "tenant_len": range(17, 19),
        "tenant": range(19, 23),
        "provider_len": range(23, 24),
        "provider": range(24, 28),
        "key_ref_len": range(28, 30),
        "key_ref_scheme": range(30, 37),  # "fake://": must match the provider field
        "key_ref": range(37, 41),
        "wrapped_len": range(41, 43),
        "wrapped": range(43, len(edek)),
    }
    assert edek[0] == 1
    assert edek[17:19] == (4).to_bytes(2, "big") and edek[19:23] == b"acme"
    assert edek[23] == 4 and edek[24:28] == b"fake"
    assert edek[28:30] == (11).to_bytes(2, "big") and edek[30:41] == b"fake://acme"
    assert int.from_bytes(edek[41:43], "big") == len(edek) - 43 == 60
    assert sum(len(r) for r in regions.values()) == len(edek)
    return regions


# What a flipped companion byte raises, by region and by flip. Flipping the low bit of an ASCII
# letter gives another ASCII letter, so the envelope still parses and names another tenant
# (TenantMismatchError, checked before any unwrap) or another key reference
# (TenantNotConfiguredError: a row may not point at a key that is not one of its tenant's);
# flipping the high bit makes the text invalid UTF-8/ASCII, so the envelope fails to parse.
# The row id is only bound through the AAD and the wrapped key only through the KMS, so both
# fail authentication. Every other field is a length or the version: parse failures.
EXPECTED_COMPANION_ERRORS: dict[int, dict[str, type[CMKError]]] = {
    0x01: {
        "version": DecryptionError,
        "row_id": DecryptionError,
        "tenant_len": DecryptionError,
        "tenant": TenantMismatchError,
        "provider_len": DecryptionError,
        "provider": DecryptionError,  # no longer the key reference's scheme: malformed
        "key_ref_len": DecryptionError,
        "key_ref_scheme": DecryptionError,
        "key_ref": TenantNotConfiguredError,
        "wrapped_len": DecryptionError,
        "wrapped": DecryptionError,
    },
    0x80: {
        "version": DecryptionError,
        "row_id": DecryptionError,
        "tenant_len": DecryptionError,
        "tenant": DecryptionError,
        "provider_len": DecryptionError,
        "provider": DecryptionError,
        "key_ref_len": DecryptionError,
        "key_ref_scheme": DecryptionError,
        "key_ref": DecryptionError,
        "wrapped_len": DecryptionError,
        "wrapped": DecryptionError,
    },
}


@pytest.mark.parametrize("mask", [0x01, 0x80], ids=["low-bit", "high-bit"])
def test_flipping_any_byte_of_the_companion_fails_closed(env: Env, mask: int) -> None:
    edek = env.originals[1]["cmk_edek"]
    expected = EXPECTED_COMPANION_ERRORS[mask]
    for region, positions in companion_regions(edek).items():
        for pos in positions:
            tampered = flip(edek, pos, mask)
            raw_write(env.engine, 1, cmk_edek=tampered)
            unwraps = env.kms.unwrap_count
            expect_load_error(env, 1, expected[region], extra=(tampered,))
            if region in ("tenant", "key_ref", "key_ref_scheme", "provider"):
                # Refused on what the envelope says, before asking the KMS.
                assert env.kms.unwrap_count == unwraps
    restore(env, 1)


def test_flipped_provider_scheme_raises_decryption_error(env: Env) -> None:
    edek = env.originals[1]["cmk_edek"]
    raw_write(env.engine, 1, cmk_edek=flip(edek, 24, 0x01))  # "fake" -> "gake"
    with tenant_context(ACME), env.session() as s, pytest.raises(CMKError) as info:
        s.get(Secret, 1)
    assert type(info.value) is DecryptionError  # today: ConfigurationError


def test_tenant_byte_flip_in_cross_tenant_context_names_an_unconfigured_tenant(env: Env) -> None:
    # Without a context tenant to compare with, the altered tenant is simply not configured.
    edek = env.originals[1]["cmk_edek"]
    for pos in range(19, 23):
        raw_write(env.engine, 1, cmk_edek=flip(edek, pos, 0x01))
        expect_load_error(env, 1, TenantNotConfiguredError, cross_tenant=True)
    restore(env, 1)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda v: v[:-1], id="drop-last-byte"),
        pytest.param(lambda v: v[:24], id="below-minimum-length"),
        pytest.param(lambda v: v[:17], id="row-id-only"),
        pytest.param(lambda v: b"", id="empty"),
        pytest.param(lambda v: v + b"\x00", id="append-zero"),
        pytest.param(lambda v: bytes([2]) + v[1:], id="future-version"),
        pytest.param(lambda v: None, id="null"),
    ],
)
def test_truncated_extended_or_nulled_companion_raises_decryption_error(
    env: Env, change: object
) -> None:
    tampered = change(env.originals[1]["cmk_edek"])  # type: ignore[operator]
    raw_write(env.engine, 1, cmk_edek=tampered)
    expect_load_error(env, 1, DecryptionError, extra=(tampered or b"",))
    restore(env, 1)


# -- moving values around ------------------------------------------------------------------------


def test_values_swapped_between_two_rows_raise_decryption_error(env: Env) -> None:
    one, two = env.originals[1], env.originals[2]
    raw_write(env.engine, 1, a=two["a"])
    raw_write(env.engine, 2, a=one["a"])
    expect_load_error(env, 1, DecryptionError)
    expect_load_error(env, 2, DecryptionError)


def test_values_swapped_between_two_columns_raise_decryption_error(env: Env) -> None:
    one = env.originals[1]
    raw_write(env.engine, 1, a=one["b"], b=one["a"])
    expect_load_error(env, 1, DecryptionError)


def test_one_column_copied_over_the_other_raises_decryption_error(env: Env) -> None:
    raw_write(env.engine, 1, b=env.originals[1]["a"])
    expect_load_error(env, 1, DecryptionError)


def test_companions_swapped_between_rows_raise_decryption_error(env: Env) -> None:
    # Same tenant, same write window: the envelopes (so the keys) are equal, the row ids differ.
    one, two = env.originals[1], env.originals[2]
    assert one["cmk_edek"][17:] == two["cmk_edek"][17:]
    raw_write(env.engine, 1, cmk_edek=two["cmk_edek"])
    raw_write(env.engine, 2, cmk_edek=one["cmk_edek"])
    expect_load_error(env, 1, DecryptionError)
    expect_load_error(env, 2, DecryptionError)


def test_value_of_tenant_a_copied_into_tenant_b_row_raises_decryption_error(env: Env) -> None:
    raw_write(env.engine, 3, a=env.originals[1]["a"])  # B's companion kept: B's key, B's AAD
    expect_load_error(env, 3, DecryptionError)
    expect_load_error(env, 3, DecryptionError, cross_tenant=True)


def test_row_of_tenant_a_copied_into_tenant_b_row_raises_tenant_mismatch(env: Env) -> None:
    # Values and companion copied together: the companion says acme, the context says globex.
    env.cmk.forget_tenant()
    env.kms.reset_counts()
    raw_write(env.engine, 3, **env.originals[1])
    exc = expect_load_error(env, 3, TenantMismatchError)
    assert (exc.row_tenant, exc.tenant) == (ACME, GLOBEX)  # type: ignore[attr-defined]
    assert env.kms.unwrap_count == 0  # refused before asking acme's KMS


def test_companion_of_tenant_a_on_tenant_b_row_raises_tenant_mismatch(env: Env) -> None:
    env.cmk.forget_tenant()
    env.kms.reset_counts()
    raw_write(env.engine, 3, cmk_edek=env.originals[1]["cmk_edek"])
    expect_load_error(env, 3, TenantMismatchError)
    assert env.kms.unwrap_count == 0
    # Read without a context tenant to compare with, B's values fail under A's key and AAD.
    expect_load_error(env, 3, DecryptionError, cross_tenant=True)


def test_whole_row_copy_across_tenants_reads_as_the_source_tenant_in_cross_tenant_context(
    env: Env,
) -> None:
    """Documented limit: a row's owner is the tenant in its envelope, not its tenant_id column.

    A's values and companion copied together into B's row (tenant_id still 'globex') decrypt
    as A's data when no context tenant is there to compare with; see the threat model on
    whole-row replay in docs/design.md.
    """
    raw_write(env.engine, 3, **env.originals[1])
    with cross_tenant_context(actor="tamper-test"), env.session() as s:
        obj = s.get(Secret, 3)
        assert obj is not None
        assert (obj.tenant_id, obj.a, obj.b) == (GLOBEX, *SEED[1][1:])


def test_whole_row_replay_within_a_tenant_is_not_detected(env: Env) -> None:
    """Documented limit (docs/design.md, threat model): values and companion moved together
    keep their row id, so they authenticate in any row of the same table and tenant."""
    raw_write(env.engine, 2, **env.originals[1])
    assert load(env, 2) == SEED[1][1:]


def test_row_under_a_key_the_tenant_does_not_have_raises_tenant_not_configured(
    env: Env,
) -> None:
    # Someone who can write the database points a row of acme at another key of the same KMS
    # (here: written by a second application configured with that key).
    other = CMK(env.kms, tenant_keys={ACME: "fake://attacker"}, audit_sinks=[])
    other_factory = sessionmaker(env.engine)
    other.install(other_factory)
    with tenant_context(ACME), other_factory() as s:
        s.add(Secret(id=9, tenant_id=ACME, a="pt:Zq7a9", b="pt:Zq7b9"))
        s.commit()
    raw_write(env.engine, 1, **raw_row(env.engine, 9))
    env.kms.reset_counts()
    exc = expect_load_error(env, 1, TenantNotConfiguredError)
    assert exc.key_ref == "fake://attacker"
    assert env.kms.unwrap_count == 0


def test_row_of_an_unconfigured_tenant(env: Env) -> None:
    other = CMK(env.kms, tenant_keys={"initech": "fake://initech"}, audit_sinks=[])
    other_factory = sessionmaker(env.engine)
    other.install(other_factory)
    with tenant_context("initech"), other_factory() as s:
        s.add(Secret(id=9, tenant_id="initech", a="pt:Zq7a9", b="pt:Zq7b9"))
        s.commit()
    raw_write(env.engine, 1, **raw_row(env.engine, 9))
    env.kms.reset_counts()
    # In acme's context it is another tenant's row; in a cross-tenant read, an unknown tenant.
    expect_load_error(env, 1, TenantMismatchError)
    expect_load_error(env, 1, TenantNotConfiguredError, cross_tenant=True)
    assert env.kms.unwrap_count == 0
