"""A destination kind for tests/test_registry_audit.py only: the real kinds are built on other
branches, and the registry's tests need one whose ``check`` behaves like theirs (no I/O, every
field named in its errors, secrets as references) without depending on any of them.

The tests register it as kind ``"collector"`` by patching ``sqlalchemy_cmk.sinks._KINDS`` for
the test's duration. ``build`` makes a sink that keeps what it is sent, in memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy_cmk.errors import ConfigurationError
from sqlalchemy_cmk.sinks import NetworkPolicy, Record, SinkEnv

KIND = "collector"
_REF = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*|file:/\S+|[a-z][a-z0-9+.-]*:\S+")
# "name": check_destination takes it off before calling a kind once every kind takes one; until
# then this kind accepts it itself, so the tests run either way.
_FIELDS = {"kind", "url", "token", "labels", "timeout", "name"}


def _field(name: str) -> str:
    return f"{KIND} destination field {name!r}"


def check(spec: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise ConfigurationError(f"{_field(unknown[0])} is unknown")
    url = spec.get("url")
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"{_field('url')} is required")
    NetworkPolicy().check_url(url, what=_field("url"))
    out: dict[str, Any] = {"kind": KIND, "url": url}
    if isinstance(spec.get("name"), str):
        out["name"] = spec["name"]
    token = spec.get("token")
    if token is not None:
        if not isinstance(token, str) or not _REF.fullmatch(token) or "-----BEGIN" in token:
            raise ConfigurationError(
                f"{_field('token')} must be a secret reference (env:NAME, file:/path), never "
                "the secret itself"
            )
        out["token"] = token
    labels = spec.get("labels")
    if labels is not None:
        if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ConfigurationError(f"{_field('labels')} must map strings to strings")
        out["labels"] = dict(labels)
    timeout = spec.get("timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 300:
        raise ConfigurationError(f"{_field('timeout')} must be a number from 0 to 300")
    out["timeout"] = timeout
    return out


class CollectorSink:
    kind = KIND
    max_batch = 100

    def __init__(self) -> None:
        self.sent: list[Record] = []

    def send(self, records: Sequence[Record]) -> None:
        self.sent.extend(records)

    def close(self) -> None:
        pass


def build(spec: Mapping[str, Any], env: SinkEnv) -> CollectorSink:
    return CollectorSink()
