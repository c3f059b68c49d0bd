"""A FastAPI service of many tenants, each tenant's notes sealed under its own key.

The recipe (docs/frameworks.md explains each step):

* the tenant comes from the authenticated principal, never from the URL or the body;
* an ``async def`` dependency with ``yield`` opens ``tenant_context`` for the rest of the request,
  with the actor and the request id, which go into every audit event. It must be ``async def``:
  FastAPI runs a sync (``def``) dependency's code before and after ``yield`` in two threads, each
  in a copy of the request's context, so the tenant it set would never reach the endpoint (the
  library raises ``ConfigurationError`` when it sees that);
* sync endpoints (run in FastAPI's thread pool, which copies the request's context) and async
  endpoints both see the tenant; an async endpoint runs the blocking ``Session`` work through
  ``run_in_threadpool``, which carries the context into the thread;
* the library's errors become HTTP answers: 403 when the tenant is revoked, 503 when its KMS is
  unavailable (``sqlalchemy_cmk.errors.http_status``).

Run: ``pip install fastapi uvicorn`` then ``python examples/fastapi_app.py``, and try
``curl -H 'Authorization: Bearer token-ada' localhost:8000/notes``.
"""

# No `from __future__ import annotations` here: FastAPI reads the dependencies from the
# annotations, and those name functions local to create_app, which a string annotation cannot.
import logging
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import Engine, String, Text, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

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


# What a client may be told for each status; the full message (tenant, key reference, what to
# do) goes to the server log, since it is for the operator.
PUBLIC_DETAIL = {
    403: "this tenant's data is not accessible: its key access is revoked",
    409: "a concurrent change won; retry",
    422: "a value does not fit its field",
    503: "the tenant's key service is unavailable; retry later",
}


def create_app(engine: Engine, cmk: CMK, tokens: Mapping[str, Principal]) -> FastAPI:
    """The service, on ``engine``, encrypting through ``cmk``.

    Args:
        engine: Where the notes live.
        cmk: The configured CMK; installed here on the app's own sessionmaker.
        tokens: Bearer token -> principal. Stands in for a real authentication scheme.
    """
    SessionLocal = sessionmaker(engine)
    cmk.install(SessionLocal)
    app = FastAPI(title="notes")

    async def principal(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = tokens.get(token) if scheme.lower() == "bearer" else None
        if found is None:
            raise HTTPException(401, "unknown bearer token", headers={"WWW-Authenticate": "Bearer"})
        return found

    # `async def`, not `def`: see the module docstring. The `with` stays open until the response
    # is ready, so the endpoint and every dependency that depends on this one run inside it.
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

    # A sync dependency may hold the Session: it sets no context variable, and depending on
    # tenant_scope orders it inside the tenant's block.
    def session(_: Annotated[TenantContext, Depends(tenant_scope)]) -> Iterator[Session]:
        with SessionLocal() as s:
            yield s

    Scope = Annotated[TenantContext, Depends(tenant_scope)]
    DB = Annotated[Session, Depends(session)]

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
    def create_note(note: NoteIn, db: DB) -> NoteOut:  # sync: runs in the thread pool
        row = Note(title=note.title, body=note.body)  # tenant_id comes from the context
        db.add(row)
        db.flush()  # encrypts, and assigns the id
        out = NoteOut(id=row.id, title=row.title, body=row.body)
        db.commit()
        return out

    @app.get("/notes/{note_id}")
    def read_note(note_id: int, ctx: Scope, db: DB) -> NoteOut:
        # Filter by tenant: another tenant's note is "not found", as if it did not exist.
        row = db.scalar(select(Note).where(Note.id == note_id, Note.tenant_id == ctx.tenant_id))
        if row is None:
            raise HTTPException(404, "no such note")
        return NoteOut(id=row.id, title=row.title, body=row.body)

    @app.get("/notes")
    async def list_notes(ctx: Scope, db: DB) -> list[NoteOut]:  # async: blocking work in a thread
        def load() -> list[NoteOut]:
            rows = db.scalars(select(Note).where(Note.tenant_id == ctx.tenant_id).order_by(Note.id))
            return [NoteOut(id=r.id, title=r.title, body=r.body) for r in rows]

        return await run_in_threadpool(load)  # copies the context: the tenant goes along

    return app


def main() -> None:
    import uvicorn  # not a dependency of the library: `pip install uvicorn`

    from sqlalchemy_cmk.providers.local import LocalKeyProvider

    logging.basicConfig(level=logging.INFO)  # shows the audit events: one JSON line per key use
    workdir = Path(tempfile.mkdtemp(prefix="sqlalchemy-cmk-fastapi-"))
    tenants = ["acme", "globex", "initech"]
    keyfile = LocalKeyProvider.generate_key_file(workdir / "keys.json", tenants)
    engine = create_engine(f"sqlite:///{workdir / 'notes.sqlite'}")
    Base.metadata.create_all(engine)
    cmk = CMK(LocalKeyProvider.from_file(keyfile), tenant_keys={t: f"local://{t}" for t in tenants})
    tokens = {
        "token-ada": Principal("ada", "acme"),
        "token-grace": Principal("grace", "globex"),
        "token-ken": Principal("ken", "initech"),
    }
    uvicorn.run(create_app(engine, cmk, tokens), host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
