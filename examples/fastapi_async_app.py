"""The FastAPI notes service of ``fastapi_app.py`` on async SQLAlchemy: ``AsyncSession``.

What changes from the sync recipe (docs/frameworks.md, "FastAPI with AsyncSession"):

* ``cmk.install`` goes on the app's ``async_sessionmaker`` (before it makes any session);
* every endpoint is ``async def`` and awaits the session: no thread pool;
* the tenant context is opened the same way, in an ``async def`` dependency with ``yield``; the
  endpoint runs in the request's task, which sees it;
* a KMS call (a wrap on the first write of a tenant, an unwrap on a cold read) runs on a
  thread of the library's and is *awaited* on the event loop: other requests carry on while
  the tenant's KMS answers. The ORM's own work (building and encrypting rows, decrypting
  loaded ones) runs on the loop, as the rest of the ORM does under ``AsyncSession``.

Run: ``pip install "sqlalchemy-cmk[asyncio]" fastapi uvicorn aiosqlite`` (the extra brings greenlet,
which SQLAlchemy's asyncio needs) then ``python examples/fastapi_async_app.py``, and
try ``curl -H 'Authorization: Bearer token-ada' localhost:8000/notes``.
"""

# No `from __future__ import annotations`: FastAPI reads the dependencies from the annotations.
import logging
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import String, Text, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_cmk import (
    CMK,
    CMKError,
    EncryptedMixin,
    EncryptedType,
    TenantContext,
    tenant_column,
    tenant_context,
)
from sqlalchemy_cmk.errors import http_status

log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class Note(EncryptedMixin, Base):  # EncryptedMixin adds the companion column cmk_edek
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = tenant_column()  # plaintext, filled from the context, checked
    title: Mapped[str] = mapped_column(String(200))  # not secret: plaintext, for listings
    body: Mapped[str] = mapped_column(EncryptedType(Text))


@dataclass(frozen=True)
class Principal:
    """Who is calling: what your authentication (OAuth2, JWT, session cookie) establishes."""

    user: str
    tenant: str


class NoteIn(BaseModel):
    title: str
    body: str


class NoteOut(BaseModel):
    id: int
    title: str
    body: str


# What a client may be told for each status; the full message goes to the server log.
PUBLIC_DETAIL = {
    403: "this tenant's data is not accessible: its key access is revoked",
    409: "a concurrent change won; retry",
    422: "a value does not fit its field",
    503: "the tenant's key service is unavailable; retry later",
}


def create_app(engine: AsyncEngine, cmk: CMK, tokens: Mapping[str, Principal]) -> FastAPI:
    """The service, on ``engine``, encrypting through ``cmk``.

    Args:
        engine: Where the notes live (an async engine: aiosqlite, asyncpg, psycopg_async).
        cmk: The configured CMK; installed here on the app's own async_sessionmaker.
        tokens: Bearer token -> principal. Stands in for a real authentication scheme.
    """
    # expire_on_commit=False: an expired attribute would be loaded on access, which an
    # AsyncSession can only do when awaited.
    SessionLocal = async_sessionmaker(engine, expire_on_commit=False)
    cmk.install(SessionLocal)
    app = FastAPI(title="notes (async)")

    async def principal(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = tokens.get(token) if scheme.lower() == "bearer" else None
        if found is None:
            raise HTTPException(401, "unknown bearer token", headers={"WWW-Authenticate": "Bearer"})
        return found

    # `async def`, as in the sync recipe: a sync dependency's code runs in worker threads.
    async def tenant_scope(
        request: Request, who: Annotated[Principal, Depends(principal)]
    ) -> AsyncIterator[TenantContext]:
        with tenant_context(
            who.tenant,
            actor=who.user,
            request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
            source_ip=request.client.host if request.client else None,
        ) as ctx:
            yield ctx

    async def session(
        _: Annotated[TenantContext, Depends(tenant_scope)],
    ) -> AsyncIterator[AsyncSession]:
        async with SessionLocal() as s:
            yield s

    Scope = Annotated[TenantContext, Depends(tenant_scope)]
    DB = Annotated[AsyncSession, Depends(session)]

    @app.exception_handler(CMKError)
    async def cmk_error(request: Request, exc: CMKError) -> JSONResponse:
        status = http_status(exc)
        if status == 500:
            log.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            return JSONResponse({"error": "internal error"}, status_code=500)
        log.warning("request refused (%s): %s: %s", status, type(exc).__name__, exc)
        return JSONResponse(
            {"error": type(exc).__name__, "detail": PUBLIC_DETAIL.get(status, "request refused")},
            status_code=status,
            headers={"Retry-After": "5"} if status == 503 else None,
        )

    @app.post("/notes", status_code=201)
    async def create_note(note: NoteIn, db: DB) -> NoteOut:
        row = Note(title=note.title, body=note.body)  # tenant_id comes from the context
        db.add(row)
        await db.flush()  # encrypts (a KMS wrap, awaited, on a tenant's first write), assigns id
        out = NoteOut(id=row.id, title=row.title, body=row.body)
        await db.commit()
        return out

    @app.get("/notes/{note_id}")
    async def read_note(note_id: int, ctx: Scope, db: DB) -> NoteOut:
        # Filter by tenant: another tenant's note is "not found", as if it did not exist.
        row = await db.scalar(
            select(Note).where(Note.id == note_id, Note.tenant_id == ctx.tenant_id)
        )
        if row is None:
            raise HTTPException(404, "no such note")
        return NoteOut(id=row.id, title=row.title, body=row.body)

    @app.get("/notes")
    async def list_notes(ctx: Scope, db: DB) -> list[NoteOut]:
        rows = await db.scalars(
            select(Note).where(Note.tenant_id == ctx.tenant_id).order_by(Note.id)
        )
        return [NoteOut(id=r.id, title=r.title, body=r.body) for r in rows]

    return app


def main() -> None:
    import uvicorn  # not a dependency of the library: `pip install uvicorn`
    from sqlalchemy.ext.asyncio import create_async_engine

    from sqlalchemy_cmk.providers.local import LocalKeyProvider

    logging.basicConfig(level=logging.INFO)  # shows the audit events: one JSON line per key use
    workdir = Path(tempfile.mkdtemp(prefix="sqlalchemy-cmk-fastapi-async-"))
    tenants = ["acme", "globex", "initech"]
    keyfile = LocalKeyProvider.generate_key_file(workdir / "keys.json", tenants)
    db = workdir / "notes.sqlite"
    # The schema through a sync engine, once: simpler than run_sync at start-up.
    from sqlalchemy import create_engine

    sync_engine = create_engine(f"sqlite:///{db}")
    Base.metadata.create_all(sync_engine)
    sync_engine.dispose()
    engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
    cmk = CMK(LocalKeyProvider.from_file(keyfile), tenant_keys={t: f"local://{t}" for t in tenants})
    tokens = {
        "token-ada": Principal("ada", "acme"),
        "token-grace": Principal("grace", "globex"),
        "token-ken": Principal("ken", "initech"),
    }
    uvicorn.run(create_app(engine, cmk, tokens), host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
