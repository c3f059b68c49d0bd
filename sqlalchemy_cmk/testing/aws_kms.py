"""A local AWS KMS that refuses what AWS refuses, so your tests can prove revocation handling.

moto (5.2) speaks the real KMS JSON API to boto3 and the AWS CLI, but on its own its
``Encrypt`` and ``Decrypt`` keep working under a disabled key, a key pending deletion and a key
policy that denies the caller: a test of "the tenant revoked, the application must stop" passes
against it whatever the application does. :class:`LocalKms` runs moto's server on loopback
behind a small WSGI layer that, before moto sees an ``Encrypt``, ``Decrypt``,
``GenerateDataKey`` or ``GenerateDataKeyWithoutPlaintext`` request, answers as AWS does:

==========================================================  ==================================
the key, its policy or the request                          the answer (HTTP 400)
==========================================================  ==================================
a key policy ``Deny`` statement for the action and caller   ``AccessDeniedException``
                                                            ("... with an explicit deny ...")
no key policy ``Allow`` statement for the action and        ``AccessDeniedException``
caller (the implicit deny)                                  ("... because no resource-based
                                                            policy allows ...")
the key is disabled                                         ``DisabledException``
the key is pending deletion (or in any other unusable       ``KMSInvalidStateException``
state)
``Decrypt`` whose ``KeyId`` is not the key of the           ``IncorrectKeyException`` (moto
ciphertext                                                  alone says ``AccessDenied``)
an encryption context other than the one encrypted under    ``InvalidCiphertextException``
                                                            (moto itself)
==========================================================  ==================================

Key policies are evaluated as AWS documents it: an explicit ``Deny`` wins, then an ``Allow``
is needed. ``Action``/``NotAction`` match with wildcards (``kms:*``, ``kms:Decrypt``...);
``Principal`` is ``"*"``, an account id or ``arn:aws:iam::<account>:root`` (the account,
delegating to IAM: IAM itself is not emulated and counts as allowing callers of that account),
or a principal ARN (an assumed-role session matches its role's ARN). Conditions on
``kms:EncryptionContext:<key>``, ``kms:EncryptionContextKeys``, ``kms:CallerAccount``,
``aws:PrincipalArn``, ``aws:PrincipalAccount`` and ``aws:SecureTransport`` (true, as for every
request to AWS) are evaluated with the ``String*``, ``Bool`` and ``Null`` operators
(``...IfExists``, ``ForAllValues:``, ``ForAnyValue:``); any other condition cannot be decided
here, and counts as met in a ``Deny`` and as not met in an ``Allow``, so the server errs on the
side of refusing. Grants are not emulated. Every key lives in moto's default account,
``123456789012`` (``MOTO_ACCOUNT_ID`` changes it).

The caller is known by its access key id: :meth:`LocalKms.credentials` hands out fake static
credentials for a principal ARN of your choice (the application's role, say), and any other
access key is :data:`DEFAULT_PRINCIPAL`, a user of the account (allowed by the default key
policy). Requests are recorded (:attr:`LocalKms.requests`) and AWS errors can be injected
(:meth:`LocalKms.fail_next`), both in this process only.

In a test suite::

    from sqlalchemy_cmk.testing.aws_kms import LocalKms

    with LocalKms() as kms:                       # http://127.0.0.1:<free port>
        provider = AwsKmsProvider(kms.client())   # or from_session(endpoint_url=kms.endpoint_url)
        ref = "aws-kms://" + kms.create_key()
        ...
        kms.disable(ref)                          # the tenant revokes: DisableKey

From a shell or another language's test suite, on a port of your choice (0: any free one)::

    python -m sqlalchemy_cmk.testing.aws_kms --port 0
    # prints http://127.0.0.1:<port> on its first line, serves until SIGINT/SIGTERM;
    # manage keys with the KMS API itself: aws kms create-key --endpoint-url ...

moto keeps its keys in process-global state: servers started in one process share their keys
(each keeps its own recorded requests, faults and callers), and the last one to stop forgets
them. Needs the ``aws-testing`` extra (``pip install 'sqlalchemy-cmk[aws-testing]'``); the
layer reads moto internals (its key objects and ciphertext header), hence the pinned minor
version, :data:`MOTO_MINOR`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import FrameType, TracebackType
from typing import Any

from ._support import missing

_EXTRA_HINT = "install it with: pip install 'sqlalchemy-cmk[aws-testing]'"


# moto is imported when a server starts, not here: importing moto registers a (dormant) hook in
# botocore, and importing this module should change nothing.
_MISSING = missing(("boto3", "moto", "flask", "flask_cors", "werkzeug"))
if _MISSING:
    raise ImportError(
        f"the local AWS KMS server needs {', '.join(_MISSING)}; {_EXTRA_HINT}",
        name=_MISSING[0],
    )

import boto3  # type: ignore[import-untyped]  # noqa: E402

from ..providers.aws import kms_client_config  # noqa: E402

__all__ = [
    "ACCOUNT",
    "DEFAULT_PRINCIPAL",
    "FAKE_CREDENTIALS",
    "GUARD_ENV",
    "MOTO_MINOR",
    "REGION",
    "UNSET_ENV",
    "KmsRequest",
    "LocalKms",
    "main",
]

#: The moto minor version whose internals the enforcement reads; the extra pins it.
MOTO_MINOR = "5.2"
#: The region of :meth:`LocalKms.client` and :meth:`LocalKms.create_key` by default.
REGION = "us-east-1"
#: The account every key lives in: moto's default (``MOTO_ACCOUNT_ID`` overrides it).
ACCOUNT = "123456789012"
#: Who a request is from when its access key was not handed out by :meth:`LocalKms.credentials`
#: (with ``MOTO_ACCOUNT_ID`` set, a user of that account).
DEFAULT_PRINCIPAL = f"arn:aws:iam::{ACCOUNT}:user/test"
#: Static fake credentials (the server accepts any): keep boto3 from looking for real ones.
FAKE_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
#: An environment for a test process: fake credentials, no metadata service, no config files,
#: no proxy for loopback. Apply it (with :data:`UNSET_ENV` removed) before making clients.
GUARD_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
#: Variables that would send boto3 to real credentials.
UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")

# The operations checked, and the policy action each needs.
_ENFORCED = {
    "Encrypt": "kms:Encrypt",
    "Decrypt": "kms:Decrypt",
    "GenerateDataKey": "kms:GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext": "kms:GenerateDataKeyWithoutPlaintext",
}
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/[^/]+/([^/]+)/")
_RUNNING: list[LocalKms] = []  # the servers of this process (they share moto's state)
_RUNNING_LOCK = threading.Lock()
_SAVED_LOG_LEVEL = {"werkzeug": logging.NOTSET}  # restored when the last server stops


@dataclass(frozen=True)
class KmsRequest:
    """One checked request as the server received it (before any refusal)."""

    operation: str
    key_id: str | None
    context: dict[str, str]
    principal: str


@dataclass(frozen=True)
class _Refusal:
    status: int
    code: str
    message: str


class LocalKms:
    """moto's KMS server on loopback, refusing as AWS does (see the module docstring).

    Args:
        host: The address to listen on; loopback by default (the server has no authentication).
        port: The port; 0 picks a free one (see :attr:`endpoint_url` once started).

    Attributes:
        endpoint_url: ``http://<host>:<port>`` once started.
        requests: Every checked request received, oldest first (see :meth:`of`).
        enforce: Set to False to get moto's own, permissive behaviour (faults still apply).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.endpoint_url = ""
        self.requests: list[KmsRequest] = []
        self.enforce = True
        self._faults: dict[str, deque[_Refusal]] = {op: deque() for op in _ENFORCED}
        self._principals: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sessions: dict[tuple[str, str | None], Any] = {}
        self._clients: dict[tuple[str, str | None, tuple[tuple[str, Any], ...]], Any] = {}

    def __repr__(self) -> str:
        return f"LocalKms({self.endpoint_url or 'not started'})"

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Start serving; RuntimeError if it does not answer within ``timeout`` seconds."""
        if self._server is not None:
            raise RuntimeError("this LocalKms is already serving")
        with _RUNNING_LOCK:
            if not _RUNNING:
                # werkzeug logs every request at INFO to stderr: keep test output quiet.
                _SAVED_LOG_LEVEL["werkzeug"] = logging.getLogger("werkzeug").level
                logging.getLogger("werkzeug").setLevel(logging.WARNING)
            _RUNNING.append(self)
        try:
            self._serve(timeout)
        except BaseException:
            self._shutdown()
            raise

    def _serve(self, timeout: float) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app = _Enforcer(self, DomainDispatcherApplication(create_backend_app))
        # Bound here, so that a port in use is an OSError (werkzeug would print and exit).
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.create_server((self.host, self.port), family=family, backlog=64) as sock:
            self._server = make_server(
                self.host,
                self.port,
                app,
                threaded=True,
                request_handler=MotoRequestHandler,
                fd=sock.fileno(),  # werkzeug serves on a duplicate of it
            )
        host, port = self._server.server_address[:2]
        self.endpoint_url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sqlalchemy-cmk-local-kms", daemon=True
        )
        self._thread.start()
        from botocore.exceptions import (  # type: ignore[import-untyped]
            BotoCoreError,
            ClientError,
        )

        try:
            self.client(kms_deadline=timeout, read_timeout=timeout).list_keys(Limit=1)
        except (BotoCoreError, ClientError) as exc:
            raise RuntimeError(f"the local KMS does not answer at {self.endpoint_url}") from exc

    def stop(self) -> None:
        """Stop serving; the last server of the process to stop resets moto's KMS state."""
        if self._server is not None:
            self._shutdown()

    def _shutdown(self) -> None:
        from moto.kms.models import kms_backends

        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None
        self._clients.clear()
        self._sessions.clear()
        with _RUNNING_LOCK:
            if self in _RUNNING:
                _RUNNING.remove(self)
            if not _RUNNING:
                kms_backends.reset()
                logging.getLogger("werkzeug").setLevel(_SAVED_LOG_LEVEL["werkzeug"])

    def __enter__(self) -> LocalKms:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- callers and clients -------------------------------------------------------------------

    def credentials(self, principal: str) -> dict[str, str]:
        """Fake static credentials that the server takes as ``principal`` (an IAM ARN).

        Pass them to ``boto3.session.Session(**creds)`` or as ``AWS_ACCESS_KEY_ID`` /
        ``AWS_SECRET_ACCESS_KEY`` to another process; the same principal gets the same keys.
        """
        access_key = "AKIA" + uuid.uuid5(uuid.NAMESPACE_URL, principal).hex[:16].upper()
        with self._lock:
            self._principals[access_key] = principal
        return {"aws_access_key_id": access_key, "aws_secret_access_key": "testing"}

    def session(self, region: str = REGION, principal: str | None = None) -> Any:
        """A boto3 session with fake credentials (of ``principal``, or the default caller)."""
        creds = FAKE_CREDENTIALS if principal is None else self.credentials(principal)
        with self._lock:
            key = (region, principal)
            if key not in self._sessions:  # kept: making a session is slow
                self._sessions[key] = boto3.session.Session(region_name=region, **creds)
            return self._sessions[key]

    def client(self, region: str = REGION, principal: str | None = None, **config: Any) -> Any:
        """A boto3 KMS client for this server, with :func:`kms_client_config` (``**config``).

        Clients are kept per region, principal and configuration (they are thread-safe, and
        making one takes a good part of a second).
        """
        key = (region, principal, tuple(sorted(config.items())))
        session = self.session(region, principal)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = session.client(
                    "kms",
                    region_name=region,
                    endpoint_url=self.endpoint_url,
                    config=kms_client_config(**config),
                )
            return self._clients[key]

    # -- keys ----------------------------------------------------------------------------------

    def create_key(
        self,
        region: str = REGION,
        *,
        alias: str | None = None,
        policy: Mapping[str, Any] | None = None,
    ) -> str:
        """Create a symmetric key; return its ARN, or its alias ARN when ``alias`` is given.

        Args:
            region: The key's region.
            alias: An alias name (without ``alias/``) to create for the key.
            policy: A key policy; by default AWS's default, which allows the account (so every
                caller of the account).
        """
        client = self.client(region)
        extra = {} if policy is None else {"Policy": json.dumps(policy)}
        meta = client.create_key(Description="sqlalchemy-cmk test key", **extra)["KeyMetadata"]
        if alias is None:
            return str(meta["Arn"])
        client.create_alias(AliasName=f"alias/{alias}", TargetKeyId=meta["KeyId"])
        return str(meta["Arn"]).split(":key/")[0] + f":alias/{alias}"

    def key_meta(self, ref: str) -> tuple[Any, str]:
        """(A client of its region, the raw key id) behind a key ARN, alias ARN or
        ``aws-kms://`` reference."""
        arn = ref.removeprefix("aws-kms://")
        client = self.client(arn.split(":")[3])
        return client, str(client.describe_key(KeyId=arn)["KeyMetadata"]["KeyId"])

    def disable(self, ref: str) -> None:
        """``DisableKey``: what a tenant does to revoke."""
        client, key_id = self.key_meta(ref)
        client.disable_key(KeyId=key_id)

    def enable(self, ref: str) -> None:
        """``EnableKey``."""
        client, key_id = self.key_meta(ref)
        client.enable_key(KeyId=key_id)

    def schedule_deletion(self, ref: str, days: int = 7) -> None:
        """``ScheduleKeyDeletion``: the key is pending deletion (cancel to get it back)."""
        client, key_id = self.key_meta(ref)
        client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=days)

    def cancel_deletion(self, ref: str) -> None:
        """``CancelKeyDeletion``: as on AWS, the key is then disabled until enabled."""
        client, key_id = self.key_meta(ref)
        client.cancel_key_deletion(KeyId=key_id)

    def policy(self, ref: str) -> dict[str, Any]:
        """The key's policy (``GetKeyPolicy``), parsed."""
        client, key_id = self.key_meta(ref)
        policy = json.loads(client.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
        assert isinstance(policy, dict)
        return policy

    def put_policy(self, ref: str, policy: Mapping[str, Any]) -> None:
        """``PutKeyPolicy``."""
        client, key_id = self.key_meta(ref)
        client.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))

    def deny(
        self,
        ref: str,
        *,
        tenant: str | None = None,
        actions: Sequence[str] = ("kms:Encrypt", "kms:Decrypt"),
    ) -> None:
        """Add a ``Deny`` statement to the key's policy: for everyone, or for one ``tenant``
        (a condition on the ``tenant`` encryption context entry, as sqlalchemy-cmk sends)."""
        statement: dict[str, Any] = {
            "Sid": f"Deny{uuid.uuid4().hex[:8]}",
            "Effect": "Deny",
            "Principal": {"AWS": "*"},
            "Action": list(actions),
            "Resource": "*",
        }
        if tenant is not None:
            statement["Condition"] = {"StringEquals": {"kms:EncryptionContext:tenant": tenant}}
        policy = self.policy(ref)
        policy["Statement"] = [*_as_list(policy.get("Statement", [])), statement]
        self.put_policy(ref, policy)

    # -- recording and faults ------------------------------------------------------------------

    def fail_next(self, operation: str, code: str, status: int = 400, message: str = "") -> None:
        """Make the next ``operation`` (``"Encrypt"``, ``"Decrypt"``...) answer this AWS error,
        e.g. ``fail_next("Decrypt", "ThrottlingException")``; queued, one per call."""
        if operation not in self._faults:
            raise ValueError(f"faults apply to {sorted(self._faults)}, not {operation!r}")
        with self._lock:
            self._faults[operation].append(_Refusal(status, code, message or code))

    def clear(self) -> None:
        """Forget recorded requests and pending faults; enforcement on."""
        with self._lock:
            self.requests.clear()
            for queue in self._faults.values():
                queue.clear()
        self.enforce = True

    def of(self, operation: str) -> list[KmsRequest]:
        """The recorded requests of one operation."""
        with self._lock:
            return [r for r in self.requests if r.operation == operation]

    # -- the enforcement -----------------------------------------------------------------------

    def _check(self, operation: str, body: bytes, headers: Mapping[str, str]) -> _Refusal | None:
        """What AWS would answer instead of moto, or None to let moto answer."""
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            return None  # moto answers the malformed request
        if not isinstance(params, dict):
            return None
        key_id = params.get("KeyId") if isinstance(params.get("KeyId"), str) else None
        raw_context = params.get("EncryptionContext")
        context = (
            {str(k): str(v) for k, v in raw_context.items()}
            if isinstance(raw_context, dict)
            else {}
        )
        match = _CREDENTIAL.search(headers.get("authorization", ""))
        access_key, region = match.groups() if match else ("", REGION)
        # The account as moto picks it: its environment variable, its header, else its default.
        account = os.environ.get("MOTO_ACCOUNT_ID") or headers.get("x-moto-account-id") or ACCOUNT
        with self._lock:
            principal = self._principals.get(access_key, f"arn:aws:iam::{account}:user/test")
            self.requests.append(KmsRequest(operation, key_id, context, principal))
            fault = self._faults[operation].popleft() if self._faults[operation] else None
        if fault is not None:
            return fault
        if not self.enforce:
            return None
        key, blob_key_id = self._keys_of(account, region, key_id, params)
        if key is None:
            return None  # unknown key or ciphertext: moto answers (NotFound, InvalidCiphertext)
        action = _ENFORCED[operation]
        decision = _evaluate(key.policy, action, principal, context)
        if decision != "allow":
            reason = (
                "with an explicit deny in a resource-based policy"
                if decision == "deny"
                else f"because no resource-based policy allows the {action} action"
            )
            return _Refusal(
                400,
                "AccessDeniedException",
                f"User: {principal} is not authorized to perform: {action} on resource: "
                f"{key.arn} {reason}",
            )
        if key.key_state == "Disabled":
            return _Refusal(400, "DisabledException", f"{key.arn} is disabled.")
        if key.key_state == "PendingDeletion":
            return _Refusal(400, "KMSInvalidStateException", f"{key.arn} is pending deletion.")
        if key.key_state != "Enabled":
            return _Refusal(
                400, "KMSInvalidStateException", f"{key.arn} is in state {key.key_state}."
            )
        if operation == "Decrypt" and blob_key_id is None:
            # Not a ciphertext of any key here (moto alone would say AccessDenied).
            return _Refusal(400, "InvalidCiphertextException", "")
        if operation == "Decrypt" and blob_key_id != key.id:
            return _Refusal(
                400,
                "IncorrectKeyException",
                "The key ID in the request does not identify a CMK that can perform this "
                "operation.",
            )
        return None

    def _keys_of(
        self, account: str, region: str, key_id: str | None, params: Mapping[str, Any]
    ) -> tuple[Any, str | None]:
        """(The key the request is checked against or None, the ciphertext's key id or None)."""
        from moto.kms.models import kms_backends
        from moto.kms.utils import _deserialize_ciphertext_blob

        backend = kms_backends[account][region]
        blob_key_id = None
        blob = params.get("CiphertextBlob")
        if isinstance(blob, str):
            try:
                blob_key_id = _deserialize_ciphertext_blob(base64.b64decode(blob)).key_id
            except (binascii.Error, ValueError, TypeError, struct.error):
                blob_key_id = None  # not moto's format
            if blob_key_id not in backend.keys:
                blob_key_id = None  # names no key of this account and region
        if key_id is None:  # Decrypt may leave KeyId out: the ciphertext names the key
            return backend.keys.get(blob_key_id) if blob_key_id else None, blob_key_id
        try:
            return backend.keys[backend.any_id_to_key_id(key_id)], blob_key_id
        except Exception:  # moto raises several kinds for unknown ids and aliases
            return None, blob_key_id


class _Enforcer:
    """WSGI layer in front of moto's app: checked KMS requests may be answered here."""

    def __init__(self, owner: LocalKms, app: Any) -> None:
        self._owner = owner
        self._app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        service, _, operation = str(environ.get("HTTP_X_AMZ_TARGET", "")).partition(".")
        if service != "TrentService" or operation not in _ENFORCED:
            return self._app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        environ["wsgi.input"] = io.BytesIO(body)  # moto reads it again
        headers = {
            "authorization": str(environ.get("HTTP_AUTHORIZATION", "")),
            "x-moto-account-id": str(environ.get("HTTP_X_MOTO_ACCOUNT_ID", "")),
        }
        refusal = self._owner._check(operation, body, headers)
        if refusal is None:
            return self._app(environ, start_response)
        payload = json.dumps({"__type": refusal.code, "message": refusal.message}).encode()
        try:
            phrase = HTTPStatus(refusal.status).phrase
        except ValueError:
            phrase = "Error"
        start_response(
            f"{refusal.status} {phrase}",
            [
                ("Content-Type", "application/x-amz-json-1.1"),
                ("Content-Length", str(len(payload))),
                ("x-amzn-RequestId", str(uuid.uuid4())),
            ],
        )
        return [payload]


# -- key policy evaluation -----------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _wildcard(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    """IAM wildcards: ``*`` any run, ``?`` one character; nothing else is special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return (
        re.fullmatch(regex, value, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)
        is not None
    )


def _account_of(principal: str) -> str:
    parts = principal.split(":")
    return parts[4] if len(parts) > 5 else ""


def _principal_matches(value: Any, principal: str) -> bool:
    """Whether one ``Principal`` entry names the caller (see the module docstring)."""
    if not isinstance(value, str):
        return False
    account = _account_of(principal)
    if value == "*" or value == principal:
        return True
    if re.fullmatch(r"\d{12}", value):
        return value == account
    root = re.fullmatch(r"arn:aws[a-z-]*:iam::(\d{12}):root", value)
    if root:
        return root.group(1) == account
    session = re.fullmatch(r"arn:(aws[a-z-]*):sts::(\d{12}):assumed-role/([^/]+)/.+", principal)
    return bool(
        session
        and re.fullmatch(
            rf"arn:{session.group(1)}:iam::{session.group(2)}:role/(?:.+/)?"
            + re.escape(session.group(3)),
            value,
        )
    )


def _names_caller(block: Any, principal: str) -> bool:
    if block == "*":
        return True
    if not isinstance(block, dict):
        return False
    return any(_principal_matches(v, principal) for v in _as_list(block.get("AWS", [])))


def _statement_applies(statement: dict[str, Any], action: str, principal: str) -> bool:
    if "NotAction" in statement:
        patterns = [str(a) for a in _as_list(statement["NotAction"])]
        acts = not any(_wildcard(p, action, ignore_case=True) for p in patterns)
    else:
        patterns = [str(a) for a in _as_list(statement.get("Action", []))]
        acts = any(_wildcard(p, action, ignore_case=True) for p in patterns)
    if not acts:
        return False
    if "NotPrincipal" in statement:
        return not _names_caller(statement["NotPrincipal"], principal)
    return _names_caller(statement.get("Principal"), principal)


def _request_values(key: str, context: Mapping[str, str], principal: str) -> list[str] | None:
    """The request's values for a condition key; None for a key not emulated."""
    lowered = key.lower()
    prefix = "kms:encryptioncontext:"
    if lowered.startswith(prefix):
        entry = context.get(key[len(prefix) :])
        return [] if entry is None else [entry]
    if lowered == "kms:encryptioncontextkeys":
        return list(context)
    if lowered in ("kms:calleraccount", "aws:principalaccount"):
        return [_account_of(principal)]
    if lowered == "aws:principalarn":
        return [principal]
    if lowered == "aws:securetransport":
        return ["true"]  # AWS KMS endpoints take HTTPS only: true for every real request
    return None


# operator (lower case, without qualifiers) -> (ignore case, wildcards, negated)
_OPERATORS = {
    "bool": (True, False, False),
    "stringequals": (False, False, False),
    "stringnotequals": (False, False, True),
    "stringequalsignorecase": (True, False, False),
    "stringnotequalsignorecase": (True, False, True),
    "stringlike": (False, True, False),
    "stringnotlike": (False, True, True),
}


def _condition(operator: str, key: str, expected: Any, values: list[str] | None) -> bool | None:
    """One condition test: True or False, or None when it cannot be decided here."""
    op = operator.lower()
    qualifier = ""
    for q in ("forallvalues:", "foranyvalue:"):
        if op.startswith(q):
            qualifier, op = q, op[len(q) :]
    if_exists = op.endswith("ifexists")
    op = op.removesuffix("ifexists")
    if op == "null" and values is not None and not qualifier:
        # "Null": "true" holds when the key is absent from the request, "false" when present.
        wanted = [str(e).lower() for e in _as_list(expected)]
        return ("true" if not values else "false") in wanted
    if op not in _OPERATORS or values is None:
        return None
    ignore_case, wildcards, negated = _OPERATORS[op]
    patterns = [str(e) for e in _as_list(expected)]

    def hit(value: str) -> bool:
        if wildcards:
            return any(_wildcard(p, value, ignore_case=ignore_case) for p in patterns)
        if ignore_case:
            return value.lower() in [p.lower() for p in patterns]
        return value in patterns

    if qualifier == "forallvalues:":
        return all(hit(v) != negated for v in values)
    if qualifier == "foranyvalue:":
        return any(hit(v) != negated for v in values)
    if not values:  # the key is absent from the request
        return if_exists or negated
    return all(not hit(v) for v in values) if negated else any(hit(v) for v in values)


def _conditions(block: Any, context: Mapping[str, str], principal: str) -> bool | None:
    """All of a statement's conditions: True, False, or None if one cannot be decided."""
    if not isinstance(block, dict):
        return None
    result: bool | None = True
    for operator, tests in block.items():
        if not isinstance(tests, dict):
            return None
        for key, expected in tests.items():
            outcome = _condition(
                str(operator), str(key), expected, _request_values(str(key), context, principal)
            )
            if outcome is False:
                return False
            if outcome is None:
                result = None
    return result


def _evaluate(policy_text: Any, action: str, principal: str, context: Mapping[str, str]) -> str:
    """``"deny"`` (an explicit Deny applies), ``"allow"``, or ``"implicit"`` (no Allow)."""
    try:
        policy = json.loads(policy_text)
    except (TypeError, ValueError):
        return "implicit"
    if not isinstance(policy, dict):
        return "implicit"
    allowed = False
    for statement in _as_list(policy.get("Statement", [])):
        if not isinstance(statement, dict) or not _statement_applies(statement, action, principal):
            continue
        met = _conditions(statement.get("Condition") or {}, context, principal)
        if statement.get("Effect") == "Deny" and met is not False:
            return "deny"
        if statement.get("Effect") == "Allow" and met is True:
            allowed = True
    return "allow" if allowed else "implicit"


# -- the command ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sqlalchemy_cmk.testing.aws_kms [--host H] [--port P]``.

    Prints the endpoint URL on the first line of standard output, then serves until SIGINT or
    SIGTERM; exit status 0 after a signal, 1 if the server cannot start.
    """
    parser = argparse.ArgumentParser(
        prog="python -m sqlalchemy_cmk.testing.aws_kms",
        description="A local AWS KMS (moto) that refuses disabled keys, keys pending deletion, "
        "denying key policies and wrong key ids as AWS does. For tests only.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port, 0 for a free one (default)")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = LocalKms(args.host, args.port)
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(server.endpoint_url, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
