"""Database fixtures: SQLite always, PostgreSQL from wherever one can be had.

PostgreSQL, in order: ``SQLALCHEMY_CMK_TEST_POSTGRES_URL`` (a server URL; the tests create and
drop their own database on it), else a testcontainers container when a Docker daemon answers,
else the local server at 127.0.0.1:5432 (user postgres). With ``CI`` set, a PostgreSQL that
cannot be reached fails the run instead of skipping its tests.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import OperationalError

LOCAL_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DIALECTS = ["sqlite", "postgresql"]


def _docker_postgres() -> tuple[str, object] | None:
    """Start a PostgreSQL container when a Docker daemon answers; None when none does."""
    # Only ask Docker when one could be there: a failed docker.from_env() leaks a socket.
    if not (os.environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock")):
        return None
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
    except Exception:
        return None
    try:
        from testcontainers.community.postgres import PostgresContainer  # type: ignore
    except ImportError:
        with warnings.catch_warnings():  # the old module path warns it is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.postgres import PostgresContainer  # type: ignore
    container = PostgresContainer("postgres:16-alpine", driver="psycopg")
    container.start()
    return container.get_connection_url(), container


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A URL of a PostgreSQL server (its maintenance database), or skip (fail under CI)."""
    url = os.environ.get("SQLALCHEMY_CMK_TEST_POSTGRES_URL")
    container = None
    if not url:
        found = _docker_postgres()
        if found is not None:
            url, container = found
        else:
            url = LOCAL_PG
    try:
        eng = create_engine(url)
        with eng.connect() as conn:
            conn.execute(text("select 1"))
        eng.dispose()
    except OperationalError as exc:
        msg = f"PostgreSQL unreachable at {make_url(url).render_as_string()}: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: PostgreSQL tests must run)")
        pytest.skip(msg)
    yield url
    if container is not None:
        container.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh database for this test run, dropped at the end."""
    name = f"cmk_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=DIALECTS)
def engine(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Engine]:
    """An engine on each dialect, with an empty schema per test."""
    if request.param == "sqlite":
        eng = create_engine(f"sqlite:///{tmp_path}/test.db")  # a file: threads share it
    else:
        eng = create_engine(request.getfixturevalue("postgres_url"))
        schema = f"t_{uuid.uuid4().hex[:10]}"
        with eng.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        eng.dispose()
        eng = create_engine(
            request.getfixturevalue("postgres_url"),
            connect_args={"options": f"-csearch_path={schema}"},
        )
    yield eng
    eng.dispose()
