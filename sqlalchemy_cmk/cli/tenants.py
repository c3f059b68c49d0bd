"""The registry commands (``tenants ...``) and ``check-tenant``.

The ``tenants`` commands take the database URL from ``--database-url`` or
``$SQLALCHEMY_CMK_DATABASE_URL``, the registry identity from ``--registry-id`` or
``$SQLALCHEMY_CMK_REGISTRY_ID``, and the registry secret (base64) only from
``$SQLALCHEMY_CMK_REGISTRY_SECRET``: a secret given as a flag would land in shell history and in
the process list. Stored values are printed escaped (:func:`._common._cell`), so a value cannot
forge a line of output.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError

from .._cmk import load_cmk
from ..delivery import TenantAudit
from ..errors import ConfigurationError
from ..registry_db import (
    DatabaseKeyRegistry,
    RegistryIntegrityError,
    TenantRecord,
    tenant_id_problem,
)
from ._common import (
    NEW_SECRET_ENV,
    REGISTRY_ID_ENV,
    SECRET_ENV,
    URL_ENV,
    UsageError,
    _app_path,
    _cell,
    _fail,
    _Parser,
    _print_table,
    _printable,
)


def add_parsers(commands: argparse._SubParsersAction[_Parser], as_json: _Parser) -> None:
    """Add ``tenants`` (with its actions) and ``check-tenant`` to ``commands``."""
    db = _Parser(add_help=False)
    db.add_argument(
        "--database-url", help=f"SQLAlchemy URL of the registry's database (default: ${URL_ENV})"
    )
    db.add_argument("--table", default="cmk_tenants", help="registry table (default: %(default)s)")
    db.add_argument("--schema", default=None, help="schema of the registry table")
    db.add_argument(
        "--registry-id",
        default=None,
        help=f"this deployment's registry identity, the application's registry_id= "
        f"(default: ${REGISTRY_ID_ENV})",
    )
    db.add_argument(
        "--allow-v1-macs",
        action="store_true",
        help="also accept rows MACed before registry_id existed (only during the upgrade)",
    )
    if_version = _Parser(add_help=False)
    if_version.add_argument(
        "--if-version",
        type=int,
        default=None,
        metavar="N",
        help="change only if the tenant's row is still at version N",
    )

    tenants = commands.add_parser("tenants", help="manage the tenant key registry")
    sub = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("init", parents=[db], help="create the registry table if it does not exist")
    p = sub.add_parser("add", parents=[db, as_json], help="add a tenant")
    p.add_argument("tenant")
    p.add_argument("--key", required=True, metavar="REF", help="primary key reference")
    p.add_argument(
        "--accept", action="append", default=[], metavar="REF", help="another accepted key"
    )
    p.add_argument(
        "--credential",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a credential reference (role ARN, client id, secret name), never a secret",
    )
    sub.add_parser("list", parents=[db, as_json], help="list tenants")
    p = sub.add_parser("show", parents=[db, as_json], help="show one tenant")
    p.add_argument("tenant")
    for name, help_ in [
        ("set-primary", "make REF the primary key (the old primary stays accepted)"),
        ("add-key", "accept REF for decryption"),
        ("remove-key", "stop accepting REF (never the primary)"),
    ]:
        p = sub.add_parser(name, parents=[db, as_json, if_version], help=help_)
        p.add_argument("tenant")
        p.add_argument("ref", metavar="REF")
    for name, help_ in [
        ("disable", "refuse the tenant's lookups"),
        ("enable", "serve the tenant's lookups again"),
    ]:
        p = sub.add_parser(name, parents=[db, as_json, if_version], help=help_)
        p.add_argument("tenant")
    p = sub.add_parser("verify", parents=[db, as_json], help="check every row's integrity")
    p.add_argument(
        "--expect",
        type=Path,
        metavar="SNAPSHOT",
        help="a saved `tenants list --json`: also refuse rows older than it, or missing",
    )
    sub.add_parser(
        "reseal",
        parents=[db],
        help=f"rotate the registry secret: re-MAC every row under ${NEW_SECRET_ENV}",
    )
    sub.add_parser(
        "upgrade-mac",
        parents=[db],
        help="re-MAC rows written before registry_id existed so that they bind it",
    )
    p = sub.add_parser(
        "audit", help="show, set or clear a tenant's own audit destinations (docs/audit.md)"
    )
    audit = p.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    p = audit.add_parser("show", parents=[db, as_json], help="show the tenant's destinations")
    p.add_argument("tenant")
    p = audit.add_parser(
        "set", parents=[db, as_json, if_version], help="set (replace) the tenant's destinations"
    )
    p.add_argument("tenant")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--destination",
        action="append",
        metavar="JSON",
        help='a destination spec, e.g. \'{"kind": "webhook", "url": "https://...", ...}\' '
        "(repeat for several); secrets as references (env:NAME, file:/path), never in clear",
    )
    source.add_argument(
        "--from-file",
        metavar="FILE",
        help="a JSON file ('-': stdin) holding the set-up as `tenants audit show --json` prints "
        'it, or its "audit" object',
    )
    p.add_argument(
        "--on-spool-failure",
        choices=["deny", "serve"],
        default=None,
        help="when an event cannot be spooled: refuse the access (deny, the default) or serve "
        "it and count the drop",
    )
    p.add_argument(
        "--max-events-per-second",
        type=_rate,
        default=None,
        metavar="N",
        help="ship at most N of the tenant's events per second (default: no limit)",
    )
    p = audit.add_parser(
        "clear",
        parents=[db, as_json, if_version],
        help="remove the tenant's destinations (its events go to the application's sinks only)",
    )
    p.add_argument("tenant")

    p = commands.add_parser(
        "check-tenant", parents=[as_json], help="prove a tenant's key works end to end"
    )
    p.add_argument("tenant")
    p.add_argument(
        "--cmk",
        required=True,
        metavar="MODULE:ATTRIBUTE",
        help="your CMK object (or a function returning it), e.g. myapp.crypto:cmk",
    )
    p.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="directory to import MODULE from (default: the current directory)",
    )


# -- tenants ---------------------------------------------------------------------------------


def _engine(args: argparse.Namespace) -> Engine:
    url = args.database_url or os.environ.get(URL_ENV)
    if not url:
        raise UsageError(f"no database URL: pass --database-url or set ${URL_ENV}")
    try:
        return create_engine(make_url(url))
    except (ArgumentError, ValueError) as exc:
        raise UsageError(f"invalid database URL: {exc}") from None
    except ImportError as exc:
        raise UsageError(f"the database driver is not installed: {exc}") from None


def _secret(variable: str = SECRET_ENV) -> bytes:
    raw = os.environ.get(variable)
    if not raw:
        raise UsageError(
            f"no registry secret: set ${variable} to the base64 of at least 32 random bytes"
            + (" (the same secret the application uses)" if variable == SECRET_ENV else "")
        )
    try:
        return base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"${variable} is not valid base64") from None


def _credentials(items: Sequence[str]) -> dict[str, str]:
    creds: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"--credential takes NAME=VALUE, got {item!r}")
        creds[name] = value
    return creds


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    return int(rate) if rate.is_integer() else rate


def _registry_id(args: argparse.Namespace) -> str:
    registry_id = args.registry_id or os.environ.get(REGISTRY_ID_ENV)
    if not registry_id:
        raise UsageError(
            f"no registry id: pass --registry-id or set ${REGISTRY_ID_ENV} to the registry_id= "
            "the application gives DatabaseKeyRegistry (e.g. prod-eu)"
        )
    problem = tenant_id_problem(registry_id)
    if problem is not None:
        raise UsageError(f"registry id {registry_id!r} is refused: {problem}")
    return registry_id


def run_tenants(args: argparse.Namespace, out: TextIO) -> int:
    secret = _secret()
    registry_id = _registry_id(args)
    engine = _engine(args)
    try:
        try:
            registry = DatabaseKeyRegistry(
                engine,
                secret,
                registry_id=registry_id,
                table_name=args.table,
                schema=args.schema,
                allow_v1_macs=args.allow_v1_macs,
                cache_ttl=0,
            )
        except ConfigurationError as exc:
            raise UsageError(f"${SECRET_ENV}: {exc}") from None
        return _TENANT_ACTIONS[args.action](registry, args, out)
    finally:
        engine.dispose()


def _init(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    registry.create_table()
    print(f"registry table {registry.table.fullname} is ready", file=out)
    return 0


def _add(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    rec = registry.add_tenant(
        args.tenant, args.key, accepted=args.accept, credentials=_credentials(args.credential)
    )
    return _print_record(rec, args, out, "added")


def _list(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    records = registry.list_tenants()
    if args.json:
        json.dump([r.to_dict() for r in records], out, indent=2)
        print(file=out)
        return 0
    rows = [
        [
            _cell(r.tenant),
            "disabled" if r.disabled else "enabled",
            str(r.version),
            _cell(r.primary),
            ", ".join(_cell(a) for a in r.accepted if a != r.primary) or "-",
            r.updated_at.strftime("%Y-%m-%d %H:%M:%SZ"),
        ]
        for r in records
    ]
    _print_table(["TENANT", "STATUS", "VERSION", "PRIMARY", "ALSO ACCEPTED", "UPDATED"], rows, out)
    return 0


def _show(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    return _print_record(registry.get(args.tenant), args, out, None)


def _change(
    method: Callable[..., TenantRecord], verb: str
) -> Callable[[DatabaseKeyRegistry, argparse.Namespace, TextIO], int]:
    def run(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
        positional = [args.tenant] + ([args.ref] if hasattr(args, "ref") else [])
        rec = method(registry, *positional, expected_version=args.if_version)
        return _print_record(rec, args, out, verb)

    return run


def _verify(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    expected: dict[str, int] | None = None
    if args.expect is not None:
        try:
            snapshot = json.loads(args.expect.read_text())
            expected = {str(item["tenant"]): int(item["version"]) for item in snapshot}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UsageError(
                f"--expect {args.expect}: not a `tenants list --json` snapshot ({exc})"
            ) from None
    problems = registry.verify(expected)
    if args.json:
        json.dump(
            {
                "ok": not problems,
                "problems": [{"tenant": p.tenant, "error": str(p)} for p in problems],
            },
            out,
            indent=2,
        )
        print(file=out)
    elif problems:
        for p in problems:
            tenant = "?" if p.tenant is None else _cell(p.tenant)
            print(f"TAMPERED {tenant}: {_printable(str(p))}", file=out)
        print(f"{len(problems)} bad row(s) in {registry.table.fullname}", file=out)
    else:
        print(f"all rows of {registry.table.fullname} verified", file=out)
    if problems:
        _fail(f"tenants verify failed: {len(problems)} bad row(s) in {registry.table.fullname}")
    return 1 if problems else 0


def _reseal(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    new_secret = _secret(NEW_SECRET_ENV)
    try:
        count = registry.reseal(new_secret)
    except ConfigurationError as exc:
        if isinstance(exc, RegistryIntegrityError):
            raise
        raise UsageError(f"${NEW_SECRET_ENV}: {exc}") from None
    print(
        f"{count} row(s) of {registry.table.fullname} resealed: restart every process with the "
        f"new secret in ${SECRET_ENV}",
        file=out,
    )
    return 0


def _upgrade_mac(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    count = registry.upgrade_macs()
    print(
        f"{count} row(s) of {registry.table.fullname} upgraded to MAC version 2 (registry id "
        f"{registry.registry_id!r}); every row now binds it: remove allow_v1_macs from the "
        "application's configuration",
        file=out,
    )
    return 0


# -- tenants audit ---------------------------------------------------------------------------


def _json_object(text: str, what: str) -> dict[str, Any]:
    # The message never quotes the text: it may hold the very secret the registry would refuse.
    try:
        doc = json.loads(text)
    except ValueError as exc:
        where = (
            f" ({exc.msg}, line {exc.lineno} column {exc.colno})"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise UsageError(f"{what} is not valid JSON{where}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{what} must be a JSON object")
    return doc


def _audit_document(args: argparse.Namespace) -> dict[str, Any]:
    """The set-up ``tenants audit set`` was given, as ``TenantAudit.from_dict`` takes it."""
    if args.from_file is not None:
        what = "--from-file " + ("(stdin)" if args.from_file == "-" else args.from_file)
        try:
            if args.from_file == "-":
                text = sys.stdin.read()
            else:
                text = Path(args.from_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{what}: cannot read it ({type(exc).__name__})") from None
        doc = _json_object(text, what)
        if "audit" in doc and "tenant" in doc:  # what `tenants audit show --json` prints
            if doc["tenant"] != args.tenant:
                # Another tenant's destinations would receive this tenant's events.
                raise UsageError(
                    f"{what} is the audit set-up of tenant {_cell(str(doc['tenant']))}, not "
                    f'{_cell(args.tenant)}: to reuse it, pass its "audit" object'
                )
            doc = doc["audit"]
            if not isinstance(doc, dict):
                raise UsageError(f"{what}: the tenant has no audit set-up to copy")
    else:
        doc = {
            "destinations": [
                _json_object(spec, f"--destination {i}")
                for i, spec in enumerate(args.destination, 1)
            ]
        }
    if args.on_spool_failure is not None:
        doc["on_spool_failure"] = args.on_spool_failure
    if args.max_events_per_second is not None:
        doc["max_events_per_second"] = args.max_events_per_second
    if not doc.get("destinations"):
        raise UsageError(
            "no destination given: pass --destination JSON (or --from-file); "
            "`tenants audit clear` removes them"
        )
    return doc


def _audit(registry: DatabaseKeyRegistry, args: argparse.Namespace, out: TextIO) -> int:
    if args.audit_action == "show":
        return _print_audit(registry.get(args.tenant), args, out, None)
    if args.audit_action == "clear":
        rec = registry.set_audit(args.tenant, None, expected_version=args.if_version)
        return _print_audit(rec, args, out, "audit destinations removed")
    # A spec that does not check is an invalid change (exit 1, naming the field), like a bad
    # key reference given to `tenants add`.
    audit = TenantAudit.from_dict(_audit_document(args))
    rec = registry.set_audit(args.tenant, audit, expected_version=args.if_version)
    return _print_audit(rec, args, out, "audit destinations set")


def _print_audit(rec: TenantRecord, args: argparse.Namespace, out: TextIO, verb: str | None) -> int:
    # The stored document, not a TenantAudit built from it: `show` must work where a kind's
    # extra is not installed, which is when the operator most needs to see it.
    doc = rec.to_dict()["audit"]
    if args.json:
        json.dump({"tenant": rec.tenant, "version": rec.version, "audit": doc}, out, indent=2)
        print(file=out)
        return 0
    head = f"tenant {_cell(rec.tenant)}" + (f": {verb}" if verb else "")
    print(f"{head} (version {rec.version})", file=out)
    if doc is None:
        print(
            "  no audit destinations of its own: its events go to the application's sinks only",
            file=out,
        )
        return 0
    rate = doc.get("max_events_per_second")
    print(f"  on spool failure:     {_cell(str(doc.get('on_spool_failure')))}", file=out)
    print(f"  max events/second:    {'no limit' if rate is None else rate}", file=out)
    for i, dest in enumerate(doc.get("destinations", ()), 1):
        spec = json.dumps(dest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        print(f"  destination {i}:{' ' * (9 - len(str(i)))}{_cell(spec)}", file=out)
    return 0


_TENANT_ACTIONS: dict[str, Callable[[DatabaseKeyRegistry, argparse.Namespace, TextIO], int]] = {
    "init": _init,
    "add": _add,
    "list": _list,
    "show": _show,
    "set-primary": _change(DatabaseKeyRegistry.set_primary, "primary set"),
    "add-key": _change(DatabaseKeyRegistry.add_key, "key added"),
    "remove-key": _change(DatabaseKeyRegistry.remove_key, "key removed"),
    "disable": _change(DatabaseKeyRegistry.disable, "disabled"),
    "enable": _change(DatabaseKeyRegistry.enable, "enabled"),
    "verify": _verify,
    "reseal": _reseal,
    "upgrade-mac": _upgrade_mac,
    "audit": _audit,
}


def _print_record(
    rec: TenantRecord, args: argparse.Namespace, out: TextIO, verb: str | None
) -> int:
    if args.json:
        json.dump(rec.to_dict(), out, indent=2)
        print(file=out)
        return 0
    print(
        f"tenant {_cell(rec.tenant)}" + (f": {verb} (version {rec.version})" if verb else ""),
        file=out,
    )
    others = [_cell(a) for a in rec.accepted if a != rec.primary]
    print(f"  status:        {'disabled' if rec.disabled else 'enabled'}", file=out)
    print(f"  primary:       {_cell(rec.primary)}", file=out)
    print(f"  also accepted: {', '.join(others) or '-'}", file=out)
    for name, value in sorted(rec.credentials.items()):
        print(f"  credential:    {_cell(name)}={_cell(value)}", file=out)
    audit = rec.to_dict()["audit"]
    if audit is not None:
        kinds = [_cell(str(d.get("kind"))) for d in audit.get("destinations", ())]
        print(f"  audit:         {', '.join(kinds) or '-'} (`tenants audit show`)", file=out)
    if verb is None:
        print(f"  version:       {rec.version} ({rec.updated_at.isoformat()})", file=out)
    return 0


# -- check-tenant ----------------------------------------------------------------------------


def _load_cmk(spec: str, app_dir: str) -> Any:
    path = _app_path(app_dir)
    try:
        return load_cmk(spec)
    except ConfigurationError as exc:
        raise UsageError(f"--cmk {spec}: {exc} (imported from {path})") from None


def run_check_tenant(args: argparse.Namespace, out: TextIO) -> int:
    cmk = _load_cmk(args.cmk, args.app_dir)
    result = cmk.check_tenant(args.tenant, actor="sqlalchemy-cmk check-tenant")
    if args.json:
        doc = {
            "tenant": result.tenant,
            "ok": result.ok,
            "key_ref": result.key_ref,
            "steps": [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in result.steps],
        }
        json.dump(doc, out, indent=2)
        print(file=out)
    else:
        print(str(result), file=out)
    if not result.ok:
        failed = next((step.name for step in result.steps if not step.ok), "a step")
        _fail(f"check-tenant {_cell(args.tenant)} failed at {failed}")
    return 0 if result.ok else 1
