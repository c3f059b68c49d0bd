"""A local AWS KMS for the tests: moto's server on loopback, made to enforce what AWS enforces.

moto 5.2 speaks the real KMS JSON API to boto3 (``ThreadedMotoServer``, in this process), but its
Encrypt and Decrypt ignore a disabled key, a key pending deletion and Deny statements of the key
policy. :class:`LocalKms` wraps moto's two handlers so that, as AWS does:

- a disabled key answers ``DisabledException``;
- a key pending deletion answers ``KMSInvalidStateException``;
- a key policy statement ``"Effect": "Deny"`` whose Action matches (``kms:Decrypt``,
  ``kms:*``...) answers ``AccessDeniedException`` (conditions on ``kms:EncryptionContext:<key>``
  with StringEquals / StringNotEquals are evaluated; any other condition counts as met, so
  the emulation errs on the side of denying);
- Decrypt whose KeyId is not the key of the ciphertext answers ``IncorrectKeyException``
  (moto says ``AccessDeniedException``).

It also records each Encrypt/Decrypt request as received (operation, KeyId, EncryptionContext),
and injects faults (``fail_next``) that travel over HTTP like AWS's own error responses.

The wrapping is tied to moto's internals (``KmsResponse``, its ciphertext blob header), hence
the pinned minor version, checked by a test.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from sqlalchemy_cmk.providers.aws import kms_client_config

#: The moto minor version whose internals the enforcement below relies on.
MOTO_MINOR = "5.2"
REGION = "us-east-1"
OTHER_REGION = "eu-west-1"
#: moto accepts any credentials; these static fake ones keep boto3 from looking for real ones.
FAKE_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
#: The environment the tests run in: no real credentials, no metadata service, no proxy.
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
UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@dataclass(frozen=True)
class KmsRequest:
    """One Encrypt or Decrypt request as the server received it."""

    operation: str
    key_id: str | None
    context: dict[str, str]


@dataclass(frozen=True)
class Fault:
    code: str
    status: int
    message: str


class LocalKms:
    """moto's KMS server on 127.0.0.1 (a free port), with the enforcement described above."""

    def __init__(self) -> None:
        self.requests: list[KmsRequest] = []
        self.enforce = True
        self._faults: dict[str, deque[Fault]] = {"Encrypt": deque(), "Decrypt": deque()}
        self._lock = threading.Lock()
        self._server: Any = None
        self._originals: dict[str, Any] = {}
        self.endpoint_url = ""
        self._werkzeug_level = logging.NOTSET
        self._sessions: dict[str, Any] = {}
        self._clients: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Start the server; RuntimeError if it is not serving within ``timeout`` seconds."""
        from moto.kms.responses import KmsResponse
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        self._patch(KmsResponse)
        # werkzeug logs every request at INFO to its own stderr handler: keep the output quiet.
        self._werkzeug_level = logging.getLogger("werkzeug").level
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        # start() waits for the server without a timeout: run it aside and bound the wait.
        starter = threading.Thread(target=server.start, daemon=True)
        starter.start()
        starter.join(timeout)
        if starter.is_alive():
            raise RuntimeError(f"moto's server did not start within {timeout} s")
        self._server = server
        host, port = server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        try:
            self.client().list_keys(Limit=1)
        except (BotoCoreError, ClientError) as exc:
            self.stop()
            raise RuntimeError(f"moto's server does not answer at {self.endpoint_url}") from exc

    def stop(self) -> None:
        from moto.kms.models import kms_backends
        from moto.kms.responses import KmsResponse

        if self._server is not None:
            self._server.stop()  # shuts the socket down and joins the server thread
            self._server = None
        for name, original in self._originals.items():
            setattr(KmsResponse, name, original)
        self._originals.clear()
        self._clients.clear()
        self._sessions.clear()
        kms_backends.reset()
        logging.getLogger("werkzeug").setLevel(self._werkzeug_level)

    # -- clients and keys ----------------------------------------------------------------------

    def session(self, region: str = REGION) -> Any:
        """A boto3 session with the fake static credentials (kept: making one is slow)."""
        with self._lock:
            if region not in self._sessions:
                self._sessions[region] = boto3.session.Session(
                    region_name=region, **FAKE_CREDENTIALS
                )
            return self._sessions[region]

    def client(self, region: str = REGION, **config: Any) -> Any:
        """A real boto3 KMS client for this server, with short timeouts and no SDK retry.

        Clients are kept per region and configuration (boto3 clients are thread-safe; making
        one takes a good part of a second).
        """
        key = (region, tuple(sorted(config.items())))
        session = self.session(region)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = session.client(
                    "kms",
                    region_name=region,
                    endpoint_url=self.endpoint_url,
                    config=kms_client_config(**config),
                )
            return self._clients[key]

    def create_key(self, region: str = REGION, alias: str | None = None) -> str:
        """Create a symmetric key; return its ARN (or the alias ARN when ``alias`` is given)."""
        client = self.client(region)
        meta = client.create_key(Description="sqlalchemy-cmk test key")["KeyMetadata"]
        if alias is None:
            return str(meta["Arn"])
        client.create_alias(AliasName=f"alias/{alias}", TargetKeyId=meta["KeyId"])
        return str(meta["Arn"]).split(":key/")[0] + f":alias/{alias}"

    def key_meta(self, ref_or_arn: str) -> tuple[Any, str]:
        """(A client for its region, the raw key id) behind an ``aws-kms://`` key reference.

        moto's DisableKey, EnableKey, PutKeyPolicy... want the raw key id (AWS also takes ARNs).
        """
        arn = ref_or_arn.removeprefix("aws-kms://")
        client = self.client(arn.split(":")[3])
        return client, str(client.describe_key(KeyId=arn)["KeyMetadata"]["KeyId"])

    def disable(self, ref: str) -> None:
        client, key_id = self.key_meta(ref)
        client.disable_key(KeyId=key_id)

    def enable(self, ref: str) -> None:
        client, key_id = self.key_meta(ref)
        client.enable_key(KeyId=key_id)

    # -- recording and faults ------------------------------------------------------------------

    def fail_next(self, operation: str, code: str, status: int = 400, message: str = "") -> None:
        """Make the next ``operation`` ("Encrypt" or "Decrypt") answer this AWS error."""
        with self._lock:
            self._faults[operation].append(Fault(code, status, message or code))

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            for queue in self._faults.values():
                queue.clear()
        self.enforce = True

    def of(self, operation: str) -> list[KmsRequest]:
        with self._lock:
            return [r for r in self.requests if r.operation == operation]

    # -- the enforcement -----------------------------------------------------------------------

    def _patch(self, response_cls: Any) -> None:
        for operation, name in (("Encrypt", "encrypt"), ("Decrypt", "decrypt")):
            original = getattr(response_cls, name)
            self._originals[name] = original

            def handler(resp: Any, _op: str = operation, _orig: Any = original) -> str:
                self._before(resp, _op)
                return str(_orig(resp))

            handler.__name__ = name
            setattr(response_cls, name, handler)

    def _before(self, resp: Any, operation: str) -> None:
        from moto.core.exceptions import JsonRESTError

        params = json.loads(resp.body)
        key_id = params.get("KeyId")
        context = params.get("EncryptionContext") or {}
        with self._lock:
            self.requests.append(KmsRequest(operation, key_id, dict(context)))
            fault = self._faults[operation].popleft() if self._faults[operation] else None
        if fault is not None:
            error = JsonRESTError(fault.code, fault.message)
            error.code = fault.status
            raise error
        if not self.enforce or not key_id:
            return
        backend = resp.kms_backend
        try:
            key = backend.keys[backend.any_id_to_key_id(key_id)]
        except Exception:
            return  # unknown key: moto's own handler answers NotFoundException
        action = f"kms:{operation}"
        if _policy_denies(key.policy, action, context):
            raise JsonRESTError(
                "AccessDeniedException",
                f"User: arn:aws:iam::{resp.current_account}:user/test is not authorized to "
                f"perform: {action} on resource: {key.arn} with an explicit deny in a "
                "resource-based policy",
            )
        if key.key_state == "Disabled":
            raise JsonRESTError("DisabledException", f"{key.arn} is disabled.")
        if key.key_state == "PendingDeletion":
            raise JsonRESTError("KMSInvalidStateException", f"{key.arn} is pending deletion.")
        if operation == "Decrypt":
            blob = resp._get_param("CiphertextBlob")
            try:
                from moto.kms.utils import _deserialize_ciphertext_blob

                blob_key = _deserialize_ciphertext_blob(blob).key_id
            except Exception:
                return  # moto answers InvalidCiphertextException
            if blob_key != key.id:
                raise JsonRESTError(
                    "IncorrectKeyException",
                    "The key ID in the request does not identify a KMS key that can perform "
                    "this operation.",
                )


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _policy_denies(policy_text: str, action: str, context: dict[str, str]) -> bool:
    try:
        policy = json.loads(policy_text)
    except (TypeError, ValueError):
        return False
    for statement in _as_list(policy.get("Statement", [])):
        if not isinstance(statement, dict) or statement.get("Effect") != "Deny":
            continue
        actions = [str(a) for a in _as_list(statement.get("Action", []))]
        if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions):
            continue
        if _conditions_hold(statement.get("Condition") or {}, context):
            return True
    return False


def _conditions_hold(conditions: dict[str, Any], context: dict[str, str]) -> bool:
    prefix = "kms:encryptioncontext:"
    for operator, tests in conditions.items():
        for condition_key, expected in tests.items():
            if operator not in ("StringEquals", "StringNotEquals") or not str(
                condition_key
            ).lower().startswith(prefix):
                continue  # not emulated: counts as met (deny rather than allow)
            actual = context.get(str(condition_key)[len(prefix) :])
            matches = actual is not None and actual in [str(v) for v in _as_list(expected)]
            if matches != (operator == "StringEquals"):
                return False
    return True


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SilentServer:
    """A loopback TCP server that accepts connections and never answers (a hung KMS)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._conns:
            conn.close()
        self._sock.close()
