"""The error tree: as drawn in errors.py, not wrapped by SQLAlchemy, with structured attributes."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
from sqlalchemy.exc import DontWrapMixin

import sqlalchemy_cmk
from sqlalchemy_cmk import errors

ERROR_NAMES = [name for name in errors.__all__ if name.endswith("Error")]
ALL = [getattr(errors, name) for name in ERROR_NAMES]


def drawn_tree() -> dict[str, str | None]:
    """Class name -> parent name, read from the tree drawn in the errors module docstring."""
    doc = errors.__doc__ or ""
    block = doc.split("The tree::", 1)[1].split("\n\n", 2)[1]
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        m = re.search(r"(\w+Error)\b", line)
        assert m, line
        depth = m.start()
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[m.group(1)] = stack[-1][1] if stack else None
        stack.append((depth, m.group(1)))
    return parents


def test_the_drawn_tree_is_read_correctly():
    tree = drawn_tree()
    assert tree["CMKError"] is None
    assert tree["TenantNotConfiguredError"] == "ConfigurationError"
    assert tree["KMSUnavailableError"] == "KeyAccessError"
    assert tree["InvalidValueError"] == "CMKError"


def test_hierarchy_is_as_drawn():
    tree = drawn_tree()
    assert set(tree) == set(ERROR_NAMES)
    assert set(errors.__all__) - set(ERROR_NAMES) == {"http_status"}
    for name, parent in tree.items():
        cls = getattr(errors, name)
        if parent is None:
            assert cls.__bases__ == (DontWrapMixin, Exception)
        else:
            assert cls.__bases__ == (getattr(errors, parent),), name


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_error_is_a_cmk_error_and_not_wrapped_by_sqlalchemy(cls: type[Exception]):
    assert issubclass(cls, errors.CMKError)
    assert issubclass(cls, DontWrapMixin)
    assert issubclass(cls, Exception)
    assert getattr(sqlalchemy_cmk, cls.__name__) is cls  # exported at the top level


def make(cls: type[errors.CMKError], **kw: str | None) -> errors.CMKError:
    if cls is errors.TenantMismatchError:
        return cls("msg", row_tenant="globex", **kw)  # type: ignore[call-arg]
    return cls("msg", **kw)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_attributes_default_to_none(cls: type[errors.CMKError]):
    err = make(cls)
    assert str(err) == "msg"
    for attr in ("tenant", "key_ref", "provider", "table", "column"):
        assert getattr(err, attr) is None


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_attributes_are_set(cls: type[errors.CMKError]):
    err = make(cls, tenant="acme", key_ref="local://acme", provider="local", table="t", column="c")
    assert (err.tenant, err.key_ref, err.provider, err.table, err.column) == (
        "acme",
        "local://acme",
        "local",
        "t",
        "c",
    )
    assert err.args == ("msg",)


def test_tenant_mismatch_names_both_tenants():
    err = errors.TenantMismatchError("msg", row_tenant="globex", tenant="acme", table="t")
    assert (err.tenant, err.row_tenant, err.table) == ("acme", "globex", "t")
    with pytest.raises(TypeError):
        errors.TenantMismatchError("msg")  # type: ignore[call-arg]


def test_kms_unavailable_is_retryable_by_default():
    assert errors.KMSUnavailableError("x").retryable is True
    err = errors.KMSUnavailableError("x")
    err.retryable = False
    assert errors.KMSUnavailableError("y").retryable is True  # per instance, not per class


def test_catching_the_root_catches_everything():
    for cls in ALL:
        with pytest.raises(errors.CMKError):
            raise make(cls)


@pytest.mark.parametrize(
    "cls",
    ALL,
    ids=lambda c: c.__name__,
)
def test_errors_survive_pickle_and_copy(cls: type[errors.CMKError]):
    # Errors cross process boundaries (multiprocessing, task queues) and get copied by loggers.
    err = make(cls, tenant="acme", key_ref="local://acme")
    for clone in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert type(clone) is cls
        assert str(clone) == "msg"
        assert (clone.tenant, clone.key_ref) == ("acme", "local://acme")


# -- HTTP status ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.TenantRevokedError("revoked"), 403),
        (errors.KeyAccessDeniedError("denied"), 403),
        (errors.KMSUnavailableError("down"), 503),
        (errors.RegistryConflictError("raced"), 409),
        (errors.InvalidValueError("too long"), 422),
        # The application's own bugs and misconfiguration: the client can do nothing about them.
        (errors.TenantNotConfiguredError("no key reference"), 500),
        (errors.KeyNotFoundError("wrong ARN"), 500),
        (errors.KeyAccessError("odd answer"), 500),
        (errors.NoTenantError("no tenant"), 500),
        (errors.TenantMismatchError("mismatch", row_tenant="globex"), 500),
        (errors.DecryptionError("tampered"), 500),
        (errors.AuditError("sink down"), 500),
        (errors.ConfigurationError("misused"), 500),
        (RuntimeError("not ours"), 500),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_http_status(exc: BaseException, status: int):
    assert errors.http_status(exc) == status


def test_a_revoked_tenant_is_still_a_tenant_not_configured():
    # Code written before TenantRevokedError existed catches it as it did.
    assert issubclass(errors.TenantRevokedError, errors.TenantNotConfiguredError)
