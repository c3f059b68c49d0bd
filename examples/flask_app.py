"""A Flask service of many tenants, each tenant's notes sealed under its own key.

The recipe (docs/frameworks.md explains each step):

* the tenant comes from the authenticated principal, never from the URL or the body;
* ``before_request`` opens ``tenant_context`` (with the actor and the request id, which go into
  every audit event) and ``teardown_request`` closes it: Flask runs both, and the view between
  them, in the same thread and context, and calls the teardown even when the view raises;
* the library's errors become HTTP answers: 403 when the tenant is revoked, 503 when its KMS is
  unavailable (``sqlalchemy_cmk.errors.http_status``).

Run: ``python examples/flask_app.py``, and try
``curl -H 'Authorization: Bearer token-ada' localhost:5000/notes``.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, g, jsonify, request
from sqlalchemy import Engine, String, Text, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_cmk import (
    CMK,
    CMKError,
    EncryptedMixin,
    EncryptedType,
    current_context,
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
    """Who is calling: what your authentication (Flask-Login, a JWT, an API key) establishes."""

    user: str
    tenant: str


# What a client may be told for each status; the full message (tenant, key reference, what to
# do) goes to the server log, since it is for the operator.
PUBLIC_DETAIL = {
    403: "this tenant's data is not accessible: its key access is revoked",
    409: "a concurrent change won; retry",
    422: "a value does not fit its field",
    503: "the tenant's key service is unavailable; retry later",
}


FIELDS = ("title", "body")


def note_json(row: Note) -> dict[str, Any]:
    return {"id": row.id, "title": row.title, "body": row.body}


def create_app(engine: Engine, cmk: CMK, tokens: Mapping[str, Principal]) -> Flask:
    """The service, on ``engine``, encrypting through ``cmk``.

    Args:
        engine: Where the notes live.
        cmk: The configured CMK; installed here on the app's own sessionmaker.
        tokens: Bearer token -> principal. Stands in for a real authentication scheme.
    """
    SessionLocal = sessionmaker(engine)
    cmk.install(SessionLocal)
    app = Flask(__name__)

    @app.before_request
    def open_tenant_context() -> tuple[Response, int] | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        who = tokens.get(token) if scheme.lower() == "bearer" else None
        if who is None:
            return jsonify(error="unknown bearer token"), 401
        scope = ExitStack()
        scope.enter_context(
            tenant_context(
                who.tenant,
                actor=who.user,
                request_id=request.headers.get("X-Request-ID") or uuid.uuid4().hex,
                source_ip=request.remote_addr,
            )
        )
        g.tenant_scope = scope
        return None

    @app.teardown_request
    def close_tenant_context(exc: BaseException | None) -> None:
        scope = g.pop("tenant_scope", None)
        if scope is not None:
            scope.close()

    @app.errorhandler(CMKError)
    def cmk_error(exc: CMKError) -> tuple[Response, int, dict[str, str]]:
        status = http_status(exc)
        if status == 500:
            log.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            return jsonify(error="internal error"), 500, {}
        log.warning("request refused (%s): %s: %s", status, type(exc).__name__, exc)
        headers = {"Retry-After": "5"} if status == 503 else {}
        return (
            jsonify(error=type(exc).__name__, detail=PUBLIC_DETAIL.get(status, "request refused")),
            status,
            headers,
        )

    def tenant() -> str | None:
        ctx = current_context()
        return None if ctx is None else ctx.tenant_id

    @app.post("/notes")
    def create_note() -> tuple[Response, int]:
        data = request.get_json(silent=True)
        if not (isinstance(data, dict) and all(isinstance(data.get(k), str) for k in FIELDS)):
            abort(400)
        with SessionLocal() as db:
            row = Note(title=data["title"], body=data["body"])  # tenant_id from the context
            db.add(row)
            db.flush()  # encrypts, and assigns the id
            out = note_json(row)
            db.commit()
        return jsonify(out), 201

    @app.get("/notes/<int:note_id>")
    def read_note(note_id: int) -> Response:
        with SessionLocal() as db:
            # Filter by tenant: another tenant's note is "not found", as if it did not exist.
            row = db.scalar(select(Note).where(Note.id == note_id, Note.tenant_id == tenant()))
            if row is None:
                abort(404)
            return jsonify(note_json(row))

    @app.get("/notes")
    def list_notes() -> Response:
        with SessionLocal() as db:
            rows = db.scalars(select(Note).where(Note.tenant_id == tenant()).order_by(Note.id))
            return jsonify([note_json(r) for r in rows])

    return app


def main() -> None:
    from sqlalchemy_cmk.providers.local import LocalKeyProvider

    logging.basicConfig(level=logging.INFO)  # shows the audit events: one JSON line per key use
    workdir = Path(tempfile.mkdtemp(prefix="sqlalchemy-cmk-flask-"))
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
    create_app(engine, cmk, tokens).run(host="127.0.0.1", port=5000)


if __name__ == "__main__":
    main()
