"""The FastAPI (sync and AsyncSession) and Flask examples, end to end through each framework's
test client.

Three tenants on SQLite and PostgreSQL: each sees only its notes, the database holds no
plaintext, audit events carry the actor and the request id, a revoked tenant gets 403 for
reads and writes, a KMS outage 503; and FastAPI's sync ``yield`` dependency, which cannot carry
the tenant to the endpoint, fails with a ``ConfigurationError`` that names the working recipe.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import Engine, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    ConfigurationError,
    EncryptedMixin,
    EncryptedType,
    NoTenantError,
    current_context,
    tenant_context,
)
from sqlalchemy_cmk.testing import FakeKeyProvider, MemoryAuditSink

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 package and warns once, at import, when it finds httpx.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi import Depends, FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import StreamingResponse
    from fastapi.testclient import TestClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TENANTS = ("acme", "globex", "initech")


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (not a package) once."""
    module_name = f"_example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pydantic look their module up
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def body_of(response: Any) -> Any:
    """The JSON body: a method on httpx's responses, a property on Werkzeug's."""
    return response.json() if callable(response.json) else response.json


@dataclass
class Service:
    framework: str
    client: Any
    engine: Engine
    cmk: CMK
    kms: FakeKeyProvider
    audit: MemoryAuditSink

    @staticmethod
    def auth(tenant: str, request_id: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer token-{tenant}"}
        if request_id is not None:
            headers["X-Request-ID"] = request_id
        return headers

    def post(self, tenant: str, title: str, body: str, request_id: str | None = None) -> Any:
        return self.client.post(
            "/notes", json={"title": title, "body": body}, headers=self.auth(tenant, request_id)
        )

    def get(self, tenant: str, path: str) -> Any:
        return self.client.get(path, headers=self.auth(tenant))

    def raw_rows(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text("SELECT id, tenant_id, title, body FROM notes")))


def async_engine_like(engine: Engine) -> Any:
    """An async engine on the database (and PostgreSQL schema) of the test's sync ``engine``."""
    from sqlalchemy.ext.asyncio import create_async_engine

    url = engine.url
    if url.get_backend_name() == "sqlite":
        return create_async_engine(url.set(drivername="sqlite+aiosqlite"))
    if url.get_backend_name() != "postgresql":
        # aiomysql 0.3.2, the async driver for PyMySQL, fails on bytes with PyMySQL 1.2.
        pytest.skip("no working async MySQL driver among the test dependencies")
    with engine.connect() as conn:
        search_path = conn.execute(text("SHOW search_path")).scalar_one()
    return create_async_engine(
        url.set(drivername="postgresql+psycopg_async"),
        connect_args={"options": f"-csearch_path={search_path}"},
    )


@pytest.fixture(params=["fastapi", "fastapi_async", "flask"])
def service(request: pytest.FixtureRequest, engine: Engine) -> Iterator[Service]:
    example = load_example(f"{request.param}_app")
    example.Base.metadata.create_all(engine)
    kms = FakeKeyProvider()
    audit = MemoryAuditSink()
    # One attempt per KMS call: an outage fails the request at once instead of retrying for
    # kms_deadline.
    cmk = CMK(
        kms,
        tenant_keys={t: f"fake://{t}" for t in TENANTS},
        audit_sinks=[audit],
        retry_attempts=1,
    )
    tokens = {f"token-{t}": example.Principal(f"user-{t}", t) for t in TENANTS}
    if request.param == "fastapi_async":
        app_engine = async_engine_like(engine)
        app = example.create_app(app_engine, cmk, tokens)
        with TestClient(app, raise_server_exceptions=True) as client:
            yield Service(request.param, client, engine, cmk, kms, audit)
            # On the client's event loop, which its connections belong to.
            client.portal.call(app_engine.dispose)
    elif request.param == "fastapi":
        app = example.create_app(engine, cmk, tokens)
        with TestClient(app, raise_server_exceptions=True) as client:
            yield Service(request.param, client, engine, cmk, kms, audit)
    else:
        app = example.create_app(engine, cmk, tokens)
        app.config["TESTING"] = True  # exceptions the app does not handle reach the test
        yield Service(request.param, app.test_client(), engine, cmk, kms, audit)
    assert current_context() is None  # nothing leaked into the test's own context


def seed(service: Service) -> dict[str, list[int]]:
    """Two notes per tenant; returns the ids per tenant."""
    ids: dict[str, list[int]] = {}
    for tenant in TENANTS:
        for i in range(2):
            r = service.post(tenant, f"{tenant} note {i}", f"secret of {tenant} #{i}")
            assert r.status_code == 201, body_of(r)
            ids.setdefault(tenant, []).append(body_of(r)["id"])
    return ids


def test_each_tenant_sees_only_its_own_notes(service: Service) -> None:
    ids = seed(service)
    for tenant in TENANTS:
        r = service.get(tenant, "/notes")  # FastAPI: an async route
        assert r.status_code == 200
        assert body_of(r) == [
            {
                "id": ids[tenant][i],
                "title": f"{tenant} note {i}",
                "body": f"secret of {tenant} #{i}",
            }
            for i in range(2)
        ]
        r = service.get(tenant, f"/notes/{ids[tenant][1]}")  # FastAPI: a sync route
        assert r.status_code == 200
        assert body_of(r)["body"] == f"secret of {tenant} #1"
        # Another tenant's note does not exist for this one.
        other = ids["globex" if tenant == "acme" else "acme"][0]
        assert service.get(tenant, f"/notes/{other}").status_code == 404


def test_the_database_holds_ciphertext_and_the_principals_tenant(service: Service) -> None:
    seed(service)
    rows = service.raw_rows()
    assert len(rows) == 6
    for row in rows:
        stored = bytes(row.body)
        assert b"secret of" not in stored
        assert row.tenant_id in TENANTS and row.title.startswith(row.tenant_id)


def test_audit_events_carry_the_actor_and_the_request_id(service: Service) -> None:
    r = service.post("acme", "t", "hello", request_id="req-123")
    assert r.status_code == 201
    written = [e for e in service.audit.events if e.request_id == "req-123"]
    assert {e.operation for e in written} >= {"wrap", "encrypt"}
    assert all(e.tenant == "acme" and e.actor == "user-acme" for e in written)
    assert all(e.source_ip for e in written)

    service.audit.events.clear()
    assert service.get("globex", "/notes").status_code == 200  # no notes: no key used
    assert service.post("globex", "t", "hi").status_code == 201
    assert service.post("globex", "t", "hi").status_code == 201
    generated = {e.request_id for e in service.audit.of("encrypt")}
    assert len(generated) == 2 and None not in generated  # one id per request, made up
    assert {e.actor for e in service.audit.events} == {"user-globex"}


def test_unknown_principal_gets_401(service: Service) -> None:
    r = service.client.get("/notes", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_malformed_note_is_refused_and_writes_nothing(service: Service) -> None:
    r = service.client.post("/notes", json={"title": 1}, headers=service.auth("acme"))
    assert r.status_code == (422 if service.framework.startswith("fastapi") else 400)
    assert service.raw_rows() == []


def test_tenant_revoked_by_the_operator_gets_403_for_reads_and_writes(service: Service) -> None:
    ids = seed(service)
    service.cmk.revoke("globex")
    for r in (
        service.get("globex", "/notes"),
        service.get("globex", f"/notes/{ids['globex'][0]}"),
        service.post("globex", "t", "must not be written"),
    ):
        assert r.status_code == 403
        assert body_of(r)["error"] == "TenantRevokedError"
        assert "globex" not in str(body_of(r))  # the details are for the server log
    assert len(service.raw_rows()) == 6  # the refused write wrote nothing
    assert service.get("acme", "/notes").status_code == 200  # the others carry on
    service.cmk.reinstate("globex")
    assert [n["body"] for n in body_of(service.get("globex", "/notes"))] == [
        "secret of globex #0",
        "secret of globex #1",
    ]


def test_tenant_revoking_its_key_in_its_kms_gets_403(service: Service) -> None:
    seed(service)
    service.kms.deny("fake://initech")
    service.cmk.forget_tenant("initech")  # else within cache_ttl
    for r in (service.get("initech", "/notes"), service.post("initech", "t", "no")):
        assert r.status_code == 403
        assert body_of(r)["error"] == "KeyAccessDeniedError"
    assert len(service.raw_rows()) == 6
    assert service.get("globex", "/notes").status_code == 200


def test_kms_outage_gets_503_and_writes_nothing(service: Service) -> None:
    seed(service)
    service.kms.inject("unavailable", count=None)
    service.cmk.forget_tenant()
    for r in (service.get("acme", "/notes"), service.post("acme", "t", "not now")):
        assert r.status_code == 503
        assert body_of(r)["error"] == "KMSUnavailableError"
        assert r.headers["Retry-After"] == "5"
    assert len(service.raw_rows()) == 6
    service.kms.heal()
    assert service.post("acme", "t", "now").status_code == 201
    assert len(body_of(service.get("acme", "/notes"))) == 3


# -- the sync `yield` dependency FastAPI cannot make work ----------------------------------------


class _Base(DeclarativeBase):
    pass


class _Secret(EncryptedMixin, _Base):
    __tablename__ = "secrets"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[str] = mapped_column(EncryptedType(String))


def sync_yield_app(endpoint: Callable[[], Any]) -> FastAPI:
    app = FastAPI()

    def tenant_scope() -> Iterator[None]:  # the shape of the bug: `def`, not `async def`
        with tenant_context("acme", actor="user-acme"):
            yield

    app.get("/", dependencies=[Depends(tenant_scope)])(endpoint)
    return app


def test_sync_yield_dependency_fails_with_the_recipe_not_index_error() -> None:
    seen: list[object] = []

    def endpoint() -> dict[str, str]:
        seen.append(current_context())
        return {}

    with TestClient(sync_yield_app(endpoint)) as client, pytest.raises(ConfigurationError) as info:
        client.get("/")
    assert seen == [None]  # the endpoint never had the tenant
    message = str(info.value)
    assert "async def" in message and "docs/frameworks.md" in message
    assert info.value.tenant == "acme"


def test_sync_yield_dependency_keeps_the_endpoint_error_chained(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    _Base.metadata.create_all(engine)
    SessionLocal = sessionmaker(engine)
    CMK(FakeKeyProvider(), tenant_keys={"acme": "fake://acme"}, audit_sinks=[]).install(
        SessionLocal
    )

    def endpoint() -> dict[str, str]:
        with SessionLocal() as s:
            s.add(_Secret(value="x"))
            s.commit()  # no tenant here: NoTenantError
        return {}

    with TestClient(sync_yield_app(endpoint)) as client, pytest.raises(ConfigurationError) as info:
        client.get("/")
    assert "NoTenantError raised inside the block is chained" in str(info.value)
    assert isinstance(info.value.__context__, NoTenantError)
    with engine.connect() as conn:
        assert conn.scalar(select(_Secret.id)) is None  # nothing written
    engine.dispose()


# -- the middleware recipe of docs/frameworks.md -------------------------------------------------


def test_http_middleware_carries_the_tenant_to_sync_and_async_endpoints(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    _Base.metadata.create_all(engine)
    SessionLocal = sessionmaker(engine)
    audit = MemoryAuditSink()
    CMK(
        FakeKeyProvider(), tenant_keys={t: f"fake://{t}" for t in TENANTS}, audit_sinks=[audit]
    ).install(SessionLocal)
    app = FastAPI()

    @app.middleware("http")
    async def tenant_scope(request: Request, call_next: Any) -> Any:
        tenant = request.headers["x-tenant"]  # stands in for the authenticated principal
        with tenant_context(tenant, actor=f"user-{tenant}", request_id=request.headers["x-id"]):
            return await call_next(request)

    def write_and_read() -> dict[str, Any]:
        ctx = current_context()
        assert ctx is not None
        with SessionLocal() as s:
            s.add(_Secret(value=f"of {ctx.tenant_id}"))
            s.commit()
            values = [x.value for x in s.scalars(select(_Secret).order_by(_Secret.id))]
        return {"tenant": ctx.tenant_id, "values": values}

    @app.post("/sync")
    def sync_endpoint() -> dict[str, Any]:
        return write_and_read()

    @app.post("/async")
    async def async_endpoint() -> dict[str, Any]:
        return await run_in_threadpool(write_and_read)

    with TestClient(app) as client:
        r = client.post("/sync", headers={"x-tenant": "acme", "x-id": "r1"})
        assert r.json() == {"tenant": "acme", "values": ["of acme"]}
        r = client.post("/async", headers={"x-tenant": "acme", "x-id": "r2"})
        assert r.json() == {"tenant": "acme", "values": ["of acme", "of acme"]}
    assert {(e.actor, e.request_id) for e in audit.of("encrypt")} == {
        ("user-acme", "r1"),
        ("user-acme", "r2"),
    }
    engine.dispose()


def test_streamed_response_opens_the_context_in_an_async_generator() -> None:
    app = FastAPI()

    def tenant() -> str:
        ctx = current_context()
        return "none" if ctx is None else str(ctx.tenant_id)

    @app.get("/async")
    def stream_async() -> StreamingResponse:
        async def chunks() -> AsyncIterator[str]:
            with tenant_context("acme"):
                for _ in range(3):
                    yield await run_in_threadpool(tenant) + "\n"  # blocking work: in a thread

        return StreamingResponse(chunks())

    @app.get("/sync")
    def stream_sync() -> StreamingResponse:
        def chunks() -> Iterator[str]:  # each step runs in a fresh copy of the context
            with tenant_context("acme"):
                for _ in range(3):
                    yield tenant() + "\n"

        return StreamingResponse(chunks())

    with TestClient(app) as client:
        assert client.get("/async").text == "acme\n" * 3
        with pytest.raises(ConfigurationError, match="another context"):
            client.get("/sync")
