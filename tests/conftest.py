"""Database fixtures: SQLite always; PostgreSQL and MariaDB from wherever one can be had.

Each server, in order: an environment variable holding a server URL
(``SQLALCHEMY_CMK_TEST_POSTGRES_URL``, ``SQLALCHEMY_CMK_TEST_MYSQL_URL``; the tests create and
drop their own databases on it), else a testcontainers container when a Docker daemon answers,
else the local server (PostgreSQL at 127.0.0.1:5432 as user postgres, MariaDB at
127.0.0.1:3306 as root without a password). With ``CI`` set, a server that cannot be reached
fails the run instead of skipping its tests.

``SQLALCHEMY_CMK_TEST_LEASE=1`` runs the suite with leased keys on (stored format version 2):
every ``CMK`` made in the test process without a ``lease_period`` argument gets ``lease_period =
cache_ttl`` (when that is a positive finite number), so the integrity tests written for
version 1 check version 2 too. Tests that count KMS calls per write window then fail by design.

``SQLALCHEMY_CMK_TEST_LAZY=1`` runs it with lazy decryption on: every ``CMK`` made without a
``lazy_decrypt`` argument gets ``lazy_decrypt=True``, so the integrity tests check values
decrypted on first access too. Tests that count decryptions or audit events at load (not at
access) then fail by design.
"""

from __future__ import annotations

import functools
import math
import os
import uuid
import warnings
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import OperationalError

if os.environ.get("SQLALCHEMY_CMK_TEST_LEASE") not in (None, "", "0"):

    @pytest.fixture(autouse=True)
    def _leases_on(monkeypatch: pytest.MonkeyPatch) -> None:
        from sqlalchemy_cmk import CMK

        original = CMK.__init__

        @functools.wraps(original)
        def init(self: CMK, *args: object, **kw: object) -> None:
            ttl = kw.get("cache_ttl", 60.0)
            if (
                "lease_period" not in kw  # an explicit None stays version 1
                and type(ttl) in (int, float)
                and math.isfinite(ttl)  # type: ignore[arg-type]
                and ttl > 0  # type: ignore[operator]
            ):
                kw["lease_period"] = ttl
            original(self, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(CMK, "__init__", init)


if os.environ.get("SQLALCHEMY_CMK_TEST_LAZY") not in (None, "", "0"):

    @pytest.fixture(autouse=True)
    def _lazy_on(monkeypatch: pytest.MonkeyPatch) -> None:
        from sqlalchemy_cmk import CMK

        original = CMK.__init__

        @functools.wraps(original)
        def init(self: CMK, *args: object, **kw: object) -> None:
            kw.setdefault("lazy_decrypt", True)
            original(self, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(CMK, "__init__", init)


LOCAL_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_MYSQL = "mysql+pymysql://root@127.0.0.1:3306/test"
DIALECTS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgresql),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]


def _docker_reachable() -> bool:
    """Whether a Docker daemon answers."""
    # Only ask Docker when one could be there: a failed docker.from_env() leaks a socket.
    if not (os.environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock")):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
    except Exception:
        return False
    return True


def _docker_postgres() -> tuple[str, object]:
    """Start a PostgreSQL container; its URL and the container."""
    try:
        from testcontainers.community.postgres import PostgresContainer  # type: ignore
    except ImportError:
        with warnings.catch_warnings():  # the old module path warns it is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.postgres import PostgresContainer  # type: ignore
    container = PostgresContainer("postgres:16-alpine", driver="psycopg")
    container.start()
    return container.get_connection_url(), container


def _docker_mariadb() -> tuple[str, object]:
    """Start a MariaDB container (the oldest with SKIP LOCKED); its URL and the container."""
    try:
        from testcontainers.community.mysql import MySqlContainer  # type: ignore
    except ImportError:
        with warnings.catch_warnings():  # the old module path warns it is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.mysql import MySqlContainer  # type: ignore
    # root: the tests create a database per test.
    container = MySqlContainer("mariadb:10.6", dialect="pymysql", username="root")
    container.start()
    return container.get_connection_url(), container


def _server_url(
    name: str, env: str, local: str, docker: Callable[[], tuple[str, object]]
) -> Iterator[str]:
    """Yield a reachable server URL (starting a container if need be), or skip (fail under CI)."""
    url = os.environ.get(env)
    container = None
    if not url:
        if _docker_reachable():
            url, container = docker()
        else:
            url = local
    try:
        eng = create_engine(url)
        with eng.connect() as conn:
            conn.execute(text("select 1"))
        eng.dispose()
    except OperationalError as exc:
        msg = f"{name} unreachable at {make_url(url).render_as_string()}: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(msg + f" (CI is set: {name} tests must run)")
        pytest.skip(msg)
    yield url
    if container is not None:
        container.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A URL of a PostgreSQL server (its maintenance database), or skip (fail under CI)."""
    yield from _server_url(
        "PostgreSQL", "SQLALCHEMY_CMK_TEST_POSTGRES_URL", LOCAL_PG, _docker_postgres
    )


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


@pytest.fixture(scope="session")
def mariadb_server_url() -> Iterator[str]:
    """A URL of a MariaDB (or MySQL) server whose user may create databases, or skip."""
    yield from _server_url("MariaDB", "SQLALCHEMY_CMK_TEST_MYSQL_URL", LOCAL_MYSQL, _docker_mariadb)


@pytest.fixture
def mariadb_url(mariadb_server_url: str) -> Iterator[str]:
    """A fresh, empty database for this test (MySQL's schemas are databases), dropped after."""
    name = f"cmk_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(mariadb_server_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    try:
        yield make_url(mariadb_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture(params=DIALECTS)
def engine(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Engine]:
    """An engine on each dialect, with an empty schema per test."""
    if request.param == "sqlite":
        eng = create_engine(f"sqlite:///{tmp_path}/test.db")  # a file: threads share it
    elif request.param == "mariadb":
        eng = create_engine(request.getfixturevalue("mariadb_url"))
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
