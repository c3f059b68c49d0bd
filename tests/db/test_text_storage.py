"""Text storage and the dual-read mode used while a text column is encrypted in place."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, String, Text, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    DecryptionError,
    EncryptedMixin,
    EncryptedType,
    tenant_context,
)
from sqlalchemy_cmk.testing import FakeKeyProvider


class Base(DeclarativeBase):
    pass


class Person(EncryptedMixin, Base):
    __tablename__ = "ts_people"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str | None] = mapped_column(
        EncryptedType(Text, storage="text", allow_plaintext=True)
    )


class StrictBase(DeclarativeBase):
    pass


class StrictPerson(EncryptedMixin, StrictBase):
    __tablename__ = "ts_people"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str | None] = mapped_column(EncryptedType(Text, storage="text"))


@pytest.fixture
def sessions(engine: Engine) -> Iterator[sessionmaker]:  # type: ignore[type-arg]
    Base.metadata.create_all(engine)
    maker = sessionmaker(engine)
    cmk = CMK(FakeKeyProvider(), tenant_keys={"acme": "fake://acme"}, audit_sinks=[])
    cmk.install(maker)
    yield maker


def raw(engine: Engine) -> dict[int, str | None]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT id, name FROM ts_people")).all())  # type: ignore[arg-type]


def test_text_storage_round_trip_and_marker(engine: Engine, sessions: sessionmaker) -> None:  # type: ignore[type-arg]
    with tenant_context("acme"), sessions() as s:
        s.add(Person(id=1, tenant_id="acme", name="Ada Lovelace"))
        s.commit()
    stored = raw(engine)[1]
    assert stored is not None and stored.startswith("cmk:") and "Ada" not in stored
    with tenant_context("acme"), sessions() as s:
        assert s.get(Person, 1).name == "Ada Lovelace"  # type: ignore[union-attr]


def test_a_text_value_past_64_kib_round_trips_exactly(
    engine: Engine,
    sessions: sessionmaker,  # type: ignore[type-arg]
) -> None:
    # MySQL's TEXT stops at 65,535 bytes; base64 makes the stored value a third longer still.
    name = "Ada Lovelace " * 6_000
    with tenant_context("acme"), sessions() as s:
        s.add(Person(id=1, tenant_id="acme", name=name))
        s.commit()
    stored = raw(engine)[1]
    # (Not "Ada": three given letters turn up by chance in 100,000 of base64.)
    assert stored is not None and len(stored) > 65_535 and "Lovelace" not in stored
    with tenant_context("acme"), sessions() as s:
        assert s.get(Person, 1).name == name  # type: ignore[union-attr]


def test_dual_read_returns_plaintext_rows_and_encrypts_on_write(
    engine: Engine,
    sessions: sessionmaker,  # type: ignore[type-arg]
) -> None:
    with engine.begin() as conn:  # rows from before the migration: plaintext, no EDEK
        conn.execute(
            text("INSERT INTO ts_people (id, tenant_id, name) VALUES (1, 'acme', 'Old One')")
        )
        conn.execute(
            text("INSERT INTO ts_people (id, tenant_id, name) VALUES (2, 'acme', 'Old Two')")
        )
    with tenant_context("acme"), sessions() as s:
        people = s.scalars(select(Person).order_by(Person.id)).all()
        assert [p.name for p in people] == ["Old One", "Old Two"]
        people[0].name = "New One"  # a write during the migration is encrypted
        s.commit()
    stored = raw(engine)
    assert stored[1] is not None and stored[1].startswith("cmk:")
    assert stored[2] == "Old Two"  # untouched rows stay as they were until the backfill
    with tenant_context("acme"), sessions() as s:
        assert [p.name for p in s.scalars(select(Person).order_by(Person.id))] == [
            "New One",
            "Old Two",
        ]


def test_without_dual_read_a_plaintext_row_fails_closed(
    engine: Engine,
    sessions: sessionmaker,  # type: ignore[type-arg]
) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO ts_people (id, tenant_id, name) VALUES (1, 'acme', 'x')"))
    strict = sessionmaker(engine)
    CMK(FakeKeyProvider(), tenant_keys={"acme": "fake://acme"}, audit_sinks=[]).install(strict)
    with tenant_context("acme"), strict() as s, pytest.raises(DecryptionError):
        s.scalars(select(StrictPerson)).all()


def test_malformed_text_value_is_a_decryption_error(
    engine: Engine,
    sessions: sessionmaker,  # type: ignore[type-arg]
) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO ts_people (id, tenant_id, name) VALUES (1, 'acme', 'cmk:!!')")
        )
    with tenant_context("acme"), sessions() as s, pytest.raises(DecryptionError):
        s.scalars(select(Person)).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"storage": "blob"},
        {"allow_plaintext": True},  # binary storage cannot tell plaintext from ciphertext
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        EncryptedType(String, **kwargs)  # type: ignore[arg-type]
