"""The local AWS KMS shipped for users' tests (``sqlalchemy_cmk.testing.aws_kms``).

Each refusal is checked with plain boto3 calls, as a user's test would make them, against what
the AWS KMS API reference says the real service answers; then the command that starts the
server on a port, in its own process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

import sqlalchemy_cmk.testing.aws_kms as aws_kms_module
from sqlalchemy_cmk.testing.aws_kms import (
    ACCOUNT,
    FAKE_CREDENTIALS,
    GUARD_ENV,
    UNSET_ENV,
    LocalKms,
    _evaluate,
)

# The session's server, shared with the provider's tests.
from ._tenant_tools import doc_block
from .test_aws import kms, kms_server  # noqa: F401

CONTEXT = {"tenant": "acme", "data_label": "patient-notes"}
APP_ROLE = "arn:aws:iam::444455556666:role/app-cmk"
OWNER = {
    "Sid": "KeyOwner",
    "Effect": "Allow",
    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
    "Action": "kms:*",
    "Resource": "*",
}


def code_of(call: Any) -> tuple[str, str]:
    """(AWS error code, message) of a boto3 call that must fail."""
    with pytest.raises(ClientError) as info:
        call()
    error = info.value.response["Error"]
    return str(error["Code"]), str(error["Message"])


def encrypt(client: Any, arn: str, context: dict[str, str] = CONTEXT) -> bytes:
    blob = client.encrypt(KeyId=arn, Plaintext=b"k" * 32, EncryptionContext=context)
    return bytes(blob["CiphertextBlob"])


def decrypt(client: Any, arn: str | None, blob: bytes, context: dict[str, str] = CONTEXT) -> Any:
    extra = {} if arn is None else {"KeyId": arn}
    return lambda: client.decrypt(CiphertextBlob=blob, EncryptionContext=context, **extra)


# -- key state -----------------------------------------------------------------------------------


def test_a_disabled_key_refuses_encrypt_decrypt_and_generate(kms: LocalKms) -> None:  # noqa: F811
    client, arn = kms.client(), kms.create_key()
    blob = encrypt(client, arn)
    kms.disable(arn)
    assert code_of(lambda: encrypt(client, arn)) == ("DisabledException", f"{arn} is disabled.")
    assert code_of(decrypt(client, arn, blob))[0] == "DisabledException"
    # Decrypt without KeyId: the ciphertext names the key, and that key is checked.
    assert code_of(decrypt(client, None, blob))[0] == "DisabledException"
    assert code_of(lambda: client.generate_data_key(KeyId=arn, KeySpec="AES_256"))[0] == (
        "DisabledException"
    )
    kms.enable(arn)
    assert decrypt(client, arn, blob)()["Plaintext"] == b"k" * 32


def test_a_key_pending_deletion_refuses_until_cancelled_and_enabled(kms: LocalKms) -> None:  # noqa: F811
    client, arn = kms.client(), kms.create_key()
    blob = encrypt(client, arn)
    kms.schedule_deletion(arn)
    for call in (lambda: encrypt(client, arn), decrypt(client, arn, blob)):
        code, message = code_of(call)
        assert (code, message) == ("KMSInvalidStateException", f"{arn} is pending deletion.")
    kms.cancel_deletion(arn)  # as on AWS: disabled until enabled again
    assert code_of(decrypt(client, arn, blob))[0] == "DisabledException"
    kms.enable(arn)
    assert decrypt(client, arn, blob)()["Plaintext"] == b"k" * 32


# -- key policy ----------------------------------------------------------------------------------


def test_an_explicit_deny_wins_over_every_allow(kms: LocalKms) -> None:  # noqa: F811
    client, arn = kms.client(), kms.create_key()
    blob = encrypt(client, arn)
    kms.deny(arn, tenant="acme")  # only calls whose context names acme
    code, message = code_of(decrypt(client, arn, blob))
    assert code == "AccessDeniedException"
    assert "with an explicit deny in a resource-based policy" in message
    assert "kms:Decrypt" in message and arn in message
    encrypt(client, arn, {"tenant": "globex"})  # another tenant of the same key
    kms.deny(arn)  # everyone
    assert code_of(lambda: encrypt(client, arn, {"tenant": "globex"}))[0] == (
        "AccessDeniedException"
    )


def test_no_allow_for_the_caller_is_an_implicit_deny(kms: LocalKms) -> None:  # noqa: F811
    """AWS: no principal has any permission to a KMS key unless a key policy (or a grant, or an
    IAM policy the key policy enables) allows it. Plain moto allows."""
    only_app = {
        "Sid": "App",
        "Effect": "Allow",
        "Principal": {"AWS": APP_ROLE},
        "Action": ["kms:Encrypt", "kms:Decrypt"],
        "Resource": "*",
    }
    arn = kms.create_key(policy={"Version": "2012-10-17", "Statement": [only_app]})
    app = kms.client(principal=APP_ROLE)
    blob = encrypt(app, arn)
    assert decrypt(app, arn, blob)()["Plaintext"] == b"k" * 32
    # The default caller (a user of the key's own account) is named by no statement.
    code, message = code_of(decrypt(kms.client(), arn, blob))
    assert code == "AccessDeniedException"
    assert message == (
        f"User: arn:aws:iam::{ACCOUNT}:user/test is not authorized to perform: kms:Decrypt on "
        f"resource: {arn} because no resource-based policy allows the kms:Decrypt action"
    )
    # Another role of the application's account: not named either.
    other = kms.client(principal="arn:aws:iam::444455556666:role/other")
    assert code_of(lambda: encrypt(other, arn))[0] == "AccessDeniedException"
    # A session of the named role is the role.
    session = kms.client(principal="arn:aws:sts::444455556666:assumed-role/app-cmk/i-0abc")
    assert decrypt(session, arn, blob)()["Plaintext"] == b"k" * 32
    # An action the statement leaves out.
    assert code_of(lambda: app.generate_data_key(KeyId=arn, KeySpec="AES_256"))[0] == (
        "AccessDeniedException"
    )
    # Removing the statement from the policy is how a tenant revokes without disabling.
    kms.put_policy(arn, {"Version": "2012-10-17", "Statement": [OWNER]})
    assert code_of(decrypt(app, arn, blob))[0] == "AccessDeniedException"
    assert decrypt(kms.client(), arn, blob)()["Plaintext"] == b"k" * 32  # the owner's account


def test_an_allow_with_a_tenant_condition_admits_only_that_tenant(kms: LocalKms) -> None:  # noqa: F811
    statement = {
        "Effect": "Allow",
        "Principal": {"AWS": APP_ROLE},
        "Action": ["kms:Encrypt", "kms:Decrypt"],
        "Resource": "*",
        "Condition": {
            "StringEquals": {"kms:EncryptionContext:tenant": "acme"},
            "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["tenant", "data_label"]},
        },
    }
    arn = kms.create_key(policy={"Statement": [OWNER, statement]})
    app = kms.client(principal=APP_ROLE)
    encrypt(app, arn, {"tenant": "acme"})
    encrypt(app, arn, CONTEXT)
    for refused in ({"tenant": "globex"}, {}, {"tenant": "acme", "extra": "x"}):
        assert code_of(lambda c=refused: encrypt(app, arn, c))[0] == "AccessDeniedException"


@pytest.mark.parametrize(
    ("statements", "principal", "context", "expected"),
    [
        # principals
        ([{"Effect": "Allow", "Principal": "*", "Action": "kms:*"}], "u", {}, "allow"),
        ([{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*"}], "u", {}, "allow"),
        ([{"Effect": "Allow", "Principal": {"AWS": ACCOUNT}, "Action": "kms:*"}], "u", {}, "allow"),
        (
            [{"Effect": "Allow", "Principal": {"AWS": "111122223333"}, "Action": "kms:*"}],
            "u",
            {},
            "implicit",
        ),
        (
            [{"Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"}, "Action": "kms:*"}],
            "u",
            {},
            "implicit",
        ),
        (
            [{"Effect": "Allow", "NotPrincipal": {"AWS": APP_ROLE}, "Action": "kms:*"}],
            "u",
            {},
            "allow",
        ),
        # actions
        ([{"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt"}], "u", {}, "implicit"),
        ([{"Effect": "Allow", "Principal": "*", "Action": "KMS:encrypt"}], "u", {}, "allow"),
        ([{"Effect": "Allow", "Principal": "*", "Action": "kms:En*"}], "u", {}, "allow"),
        ([{"Effect": "Allow", "Principal": "*", "NotAction": "kms:Decrypt"}], "u", {}, "allow"),
        ([{"Effect": "Allow", "Principal": "*", "Action": "s3:*"}], "u", {}, "implicit"),
        # an explicit deny wins; an undecidable condition denies, and does not allow
        (
            [
                {"Effect": "Allow", "Principal": "*", "Action": "kms:*"},
                {"Effect": "Deny", "Principal": "*", "Action": "kms:Encrypt"},
            ],
            "u",
            {},
            "deny",
        ),
        (
            [
                {"Effect": "Allow", "Principal": "*", "Action": "kms:*"},
                {
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {"Bool": {"kms:ReEncryptOnSameKey": "true"}},
                },
            ],
            "u",
            {},
            "deny",
        ),
        (  # the usual "deny plain HTTP" statement: every request to AWS is HTTPS
            [
                {"Effect": "Allow", "Principal": "*", "Action": "kms:*"},
                {
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                },
            ],
            "u",
            {},
            "allow",
        ),
        (  # "Null": true when the context has no tenant entry
            [
                {"Effect": "Allow", "Principal": "*", "Action": "kms:*"},
                {
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {"Null": {"kms:EncryptionContext:tenant": "true"}},
                },
            ],
            "u",
            {},
            "deny",
        ),
        (
            [
                {"Effect": "Allow", "Principal": "*", "Action": "kms:*"},
                {
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {"Null": {"kms:EncryptionContext:tenant": "true"}},
                },
            ],
            "u",
            {"tenant": "acme"},
            "allow",
        ),
        (
            [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}},
                }
            ],
            "u",
            {},
            "implicit",
        ),
        # condition operators
        (
            [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {"StringLike": {"kms:EncryptionContext:tenant": "ac*"}},
                }
            ],
            "u",
            {"tenant": "acme"},
            "allow",
        ),
        (
            [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": "Acme"}},
                }
            ],
            "u",
            {"tenant": "acme"},
            "implicit",
        ),
        (
            [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {
                        "StringEqualsIgnoreCase": {"kms:EncryptionContext:tenant": "Acme"}
                    },
                }
            ],
            "u",
            {"tenant": "acme"},
            "allow",
        ),
        (
            [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {"StringEqualsIfExists": {"kms:EncryptionContext:tenant": "x"}},
                }
            ],
            "u",
            {},
            "allow",
        ),
        (
            [
                {
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {"StringNotEquals": {"kms:CallerAccount": ACCOUNT}},
                },
                {"Effect": "Allow", "Principal": "*", "Action": "kms:*"},
            ],
            "arn:aws:iam::444455556666:role/x",
            {},
            "deny",
        ),
        (
            [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Condition": {
                        "ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": "tenant"}
                    },
                }
            ],
            "u",
            {"tenant": "a", "other": "b"},
            "allow",
        ),
    ],
)
def test_policy_evaluation(
    statements: list[dict[str, Any]], principal: str, context: dict[str, str], expected: str
) -> None:
    caller = f"arn:aws:iam::{ACCOUNT}:user/test" if principal == "u" else principal
    policy = json.dumps({"Version": "2012-10-17", "Statement": statements})
    assert _evaluate(policy, "kms:Encrypt", caller, context) == expected


def test_an_unparsable_policy_allows_nothing() -> None:
    assert _evaluate("not json", "kms:Encrypt", "u", {}) == "implicit"
    assert _evaluate("[]", "kms:Encrypt", "u", {}) == "implicit"


# -- ciphertext and context ----------------------------------------------------------------------


def test_a_wrong_key_id_is_incorrect_key(kms: LocalKms) -> None:  # noqa: F811
    """AWS: "The KeyId in a Decrypt request ... must identify the same KMS key that was used to
    encrypt the ciphertext" (IncorrectKeyException); moto alone says AccessDeniedException."""
    client, arn, other = kms.client(), kms.create_key(), kms.create_key()
    blob = encrypt(client, arn)
    assert code_of(decrypt(client, other, blob))[0] == "IncorrectKeyException"
    # An alias of the right key is the right key.
    alias = kms.create_key(alias="right-one")
    blob = encrypt(client, alias)
    key_arn = client.describe_key(KeyId=alias)["KeyMetadata"]["Arn"]
    assert decrypt(client, key_arn, blob)()["Plaintext"] == b"k" * 32
    assert decrypt(client, None, blob)()["Plaintext"] == b"k" * 32


def test_the_encryption_context_is_bound(kms: LocalKms) -> None:  # noqa: F811
    client, arn = kms.client(), kms.create_key()
    blob = encrypt(client, arn)
    for wrong in ({}, {"tenant": "acme"}, {**CONTEXT, "data_label": "billing"}):
        assert code_of(decrypt(client, arn, blob, wrong))[0] == "InvalidCiphertextException"
    assert code_of(decrypt(client, arn, b"\x00" * 80))[0] == "InvalidCiphertextException"


def test_requests_are_recorded_with_their_caller_and_faults_injected(kms: LocalKms) -> None:  # noqa: F811
    arn = kms.create_key()
    role = f"arn:aws:iam::{ACCOUNT}:role/app"  # of the key's account: the default policy allows
    app = kms.client(principal=role)
    kms.clear()
    kms.fail_next("Encrypt", "ThrottlingException")
    assert code_of(lambda: encrypt(app, arn))[0] == "ThrottlingException"
    encrypt(app, arn)
    assert [(r.operation, r.key_id, r.context, r.principal) for r in kms.requests] == [
        ("Encrypt", arn, CONTEXT, role)
    ] * 2
    with pytest.raises(ValueError):
        kms.fail_next("ListKeys", "ThrottlingException")


def test_unknown_keys_are_moto_s_not_found(kms: LocalKms) -> None:  # noqa: F811
    missing = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"
    assert code_of(lambda: encrypt(kms.client(), missing))[0] == "NotFoundException"


def test_servers_in_one_process_share_keys(kms: LocalKms) -> None:  # noqa: F811
    arn = kms.create_key()
    with LocalKms() as second:
        assert second.endpoint_url != kms.endpoint_url
        blob = encrypt(second.client(), arn)
        second.disable(arn)
    # The first server still runs, and still knows the key (the last to stop resets).
    assert code_of(decrypt(kms.client(), arn, blob))[0] == "DisabledException"


# -- the command ---------------------------------------------------------------------------------


def test_the_command_serves_on_a_port_until_terminated() -> None:
    # The command as docs/providers/aws.md gives it.
    (command,) = doc_block("aws.md", "sh", "sqlalchemy_cmk.testing.aws_kms").splitlines()
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "sqlalchemy_cmk.testing.aws_kms"]
    env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV} | GUARD_ENV
    proc = subprocess.Popen(
        [sys.executable, *argv[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and int(url.rsplit(":", 1)[1]) > 0
        # Another process, as an application's test suite would be: plain boto3 (or the CLI).
        client = boto3.client("kms", region_name="us-east-1", endpoint_url=url, **FAKE_CREDENTIALS)
        meta = client.create_key()["KeyMetadata"]
        arn = meta["Arn"]
        blob = encrypt(client, arn)
        client.disable_key(KeyId=meta["KeyId"])  # moto's DisableKey wants the key id
        assert code_of(decrypt(client, arn, blob))[0] == "DisabledException"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_the_command_reports_a_port_in_use(kms: LocalKms) -> None:  # noqa: F811
    port = kms.endpoint_url.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_cmk.testing.aws_kms", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "moto", None)  # None in sys.modules: "not installed"
    spec = importlib.util.spec_from_file_location(
        "sqlalchemy_cmk.testing._aws_kms_without_moto", aws_kms_module.__file__
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(
        ImportError, match=r"needs moto; .*pip install 'sqlalchemy-cmk\[aws-testing\]'"
    ):
        spec.loader.exec_module(module)


def test_the_extra_is_declared() -> None:
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["aws-testing"]
    assert any(req.startswith("moto>=5.2,<5.3") for req in extra)
    assert aws_kms_module.MOTO_MINOR == "5.2"
