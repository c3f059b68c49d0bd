"""The ``sqlalchemy-cmk`` command: manage the tenant key registry, check a tenant's key.

Usage::

    sqlalchemy-cmk tenants init
    sqlalchemy-cmk tenants add TENANT --key REF [--accept REF ...] [--credential NAME=VALUE ...]
    sqlalchemy-cmk tenants list [--json]
    sqlalchemy-cmk tenants show TENANT [--json]
    sqlalchemy-cmk tenants set-primary TENANT REF [--if-version N]
    sqlalchemy-cmk tenants add-key TENANT REF [--if-version N]
    sqlalchemy-cmk tenants remove-key TENANT REF [--if-version N]
    sqlalchemy-cmk tenants disable TENANT [--if-version N]
    sqlalchemy-cmk tenants enable TENANT [--if-version N]
    sqlalchemy-cmk tenants verify [--expect SNAPSHOT.json] [--json]
    sqlalchemy-cmk tenants reseal        (new secret from $SQLALCHEMY_CMK_NEW_REGISTRY_SECRET)
    sqlalchemy-cmk check-tenant TENANT --cmk module:attribute [--app-dir DIR] [--json]

The ``tenants`` commands take the database URL from ``--database-url`` or the environment
variable ``SQLALCHEMY_CMK_DATABASE_URL``, and the registry secret (base64) only from the
environment variable ``SQLALCHEMY_CMK_REGISTRY_SECRET``: a secret given as a command-line flag
would land in shell history and in the process list.

Exit status: 0 success; 1 the operation failed (a tampered row, a failed check, a conflict, an
invalid change); 2 the command was invoked or configured wrongly (missing URL or secret, an
unimportable ``--cmk``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from .errors import CMKError, ConfigurationError
from .registry_db import DatabaseKeyRegistry, RegistryIntegrityError, TenantRecord

__all__ = ["main"]

URL_ENV = "SQLALCHEMY_CMK_DATABASE_URL"
SECRET_ENV = "SQLALCHEMY_CMK_REGISTRY_SECRET"  # noqa: S105 (the variable's name, not a secret)
NEW_SECRET_ENV = "SQLALCHEMY_CMK_NEW_REGISTRY_SECRET"  # noqa: S105


class UsageError(Exception):
    """The command was invoked or configured wrongly: exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqlalchemy-cmk",
        description="Manage sqlalchemy-cmk's tenant key registry and check tenants' keys.",
        epilog=f"The registry secret is read from ${SECRET_ENV} (base64), never from a flag.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = argparse.ArgumentParser(add_help=False)
    db.add_argument(
        "--database-url", help=f"SQLAlchemy URL of the registry's database (default: ${URL_ENV})"
    )
    db.add_argument("--table", default="cmk_tenants", help="registry table (default: %(default)s)")
    db.add_argument("--schema", default=None, help="schema of the registry table")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for machines")
    if_version = argparse.ArgumentParser(add_help=False)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage errors (status 2)
        return exc.code if isinstance(exc.code, int) else 2
    out = sys.stdout
    try:
        if args.command == "check-tenant":
            return _check_tenant(args, out)
        return _tenants(args, out)
    except UsageError as exc:
        print(f"sqlalchemy-cmk: error: {exc}", file=sys.stderr)
        return 2
    except CMKError as exc:
        print(f"sqlalchemy-cmk: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except DBAPIError as exc:
        print(
            f"sqlalchemy-cmk: database error: {exc.orig}\n(is the URL right, and has "
            "`sqlalchemy-cmk tenants init` created the table?)",
            file=sys.stderr,
        )
        return 1


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


def _tenants(args: argparse.Namespace, out: TextIO) -> int:
    secret = _secret()
    engine = _engine(args)
    try:
        try:
            registry = DatabaseKeyRegistry(
                engine, secret, table_name=args.table, schema=args.schema, cache_ttl=0
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
            r.tenant,
            "disabled" if r.disabled else "enabled",
            str(r.version),
            r.primary,
            ", ".join(a for a in r.accepted if a != r.primary) or "-",
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
            print(f"TAMPERED {p.tenant}: {p}", file=out)
        print(f"{len(problems)} bad row(s) in {registry.table.fullname}", file=out)
    else:
        print(f"all rows of {registry.table.fullname} verified", file=out)
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
}


def _print_record(
    rec: TenantRecord, args: argparse.Namespace, out: TextIO, verb: str | None
) -> int:
    if args.json:
        json.dump(rec.to_dict(), out, indent=2)
        print(file=out)
        return 0
    print(f"tenant {rec.tenant}" + (f": {verb} (version {rec.version})" if verb else ""), file=out)
    others = [a for a in rec.accepted if a != rec.primary]
    print(f"  status:        {'disabled' if rec.disabled else 'enabled'}", file=out)
    print(f"  primary:       {rec.primary}", file=out)
    print(f"  also accepted: {', '.join(others) or '-'}", file=out)
    for name, value in sorted(rec.credentials.items()):
        print(f"  credential:    {name}={value}", file=out)
    if verb is None:
        print(f"  version:       {rec.version} ({rec.updated_at.isoformat()})", file=out)
    return 0


def _print_table(header: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


# -- check-tenant ----------------------------------------------------------------------------


def _load_cmk(spec: str, app_dir: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--cmk takes MODULE:ATTRIBUTE, e.g. myapp.crypto:cmk; got {spec!r}")
    path = str(Path(app_dir).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)  # a console script's sys.path does not hold the current directory
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} (from {path}): {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{module_name!r} has no attribute {attr!r}") from None
    if not hasattr(obj, "check_tenant") and callable(obj):
        obj = obj()  # a factory that builds the CMK
    if not callable(getattr(obj, "check_tenant", None)):
        raise UsageError(f"{spec} is not a CMK object (it has no check_tenant method)")
    return obj


def _check_tenant(args: argparse.Namespace, out: TextIO) -> int:
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
    return 0 if result.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
