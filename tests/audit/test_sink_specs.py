"""Every destination kind's ``check`` reads its spec through the one reader (``sinks._fields``).

These tests search the kinds instead of listing cases per kind: the fields a kind reads are
found by watching its reader, then each is given a value of every JSON type, and the kind must
take at most one of those types and refuse the others with a ``ConfigurationError`` that names
the field. A spec with a field nobody reads is refused, naming it. And the normal form of a full
spec of each kind is pinned as the key registry stores it (canonical JSON, under the row's MAC):
a change there would change stored rows.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

import pytest

from sqlalchemy_cmk.errors import ConfigurationError
from sqlalchemy_cmk.sinks import _KINDS, check_destination
from sqlalchemy_cmk.sinks._fields import Fields

# The smallest valid spec of each kind: its required fields.
MINIMAL: dict[str, dict[str, Any]] = {
    "webhook": {
        "url": "https://siem.example/hook",
        "signing": {"alg": "hmac-sha256", "key": "env:HOOK_KEY"},
    },
    "splunk_hec": {"url": "https://hec.example:8088", "token": "env:HEC_TOKEN"},
    "otlp_http": {"url": "https://otel.example:4318"},
    "syslog_tls": {"host": "collector.example"},
    "cloudwatch": {"region": "eu-west-1", "log_group": "cmk", "log_stream": "acme"},
    "gcp_logging": {"project": "acme-audit"},
    "azure_monitor": {
        "endpoint": "https://acme.ingest.monitor.azure.com",
        "rule_id": "dcr-" + "0" * 32,
        "stream_name": "Custom-CmkAudit",
    },
}

# One value of each JSON type (two numbers: an integer field must refuse a fraction).
CANDIDATES: list[Any] = ["x", 7, 7.5, True, ["x"], {"x": "y"}]


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _spec(kind: str) -> dict[str, Any]:
    return {"kind": kind, **copy.deepcopy(MINIMAL[kind])}


def _set(spec: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    at = out
    for name in path[:-1]:
        at = at[name]
    at[path[-1]] = value
    return out


def _get(spec: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        spec = spec[name]
    return spec


def _names(message: str, path: tuple[str, ...]) -> bool:
    # 'signing.alg' for a section's field; 'headers.X' names a mapping's entry, so its field.
    return re.search(rf"'{re.escape('.'.join(path))}[.']", message) is not None


def _fields_read(kind: str, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The path of every field ``kind``'s check reads from its minimal spec (present or not)."""
    read: list[tuple[str, ...]] = []
    done = Fields.done

    def watching(self: Fields) -> dict[str, Any]:
        prefix = tuple(self.prefix.split(".")[:-1])
        read.extend((*prefix, name) for name in sorted(self.seen) if prefix or name != "kind")
        return done(self)

    with monkeypatch.context() as m:
        m.setattr(Fields, "done", watching)
        check_destination(_spec(kind))
    return read


def test_every_registered_kind_has_a_minimal_spec() -> None:
    assert set(MINIMAL) == set(_KINDS)
    for kind in MINIMAL:
        check_destination(_spec(kind))


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_each_field_takes_one_json_type_and_refuses_the_others_by_name(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _fields_read(kind, monkeypatch)
    # The reader saw every field the spec has (nested ones included), and the ones it can take.
    for name, value in MINIMAL[kind].items():
        assert (name,) in paths
        if isinstance(value, Mapping):
            assert {(name, k) for k in value} <= set(paths)
    assert {("timeout",), ("max_batch",)} <= set(paths)
    for path in paths:
        taken: dict[str, Any] = {}
        for value in CANDIDATES:
            spec = _set(_spec(kind), path, value)
            try:
                checked = check_destination(spec)
            except ConfigurationError as exc:
                assert _names(str(exc), path), (path, value, str(exc))
                continue
            # Taken: it is in the normal form, as a value of the type given (never dropped,
            # never coerced from another type).
            assert _json_type(_get(checked, path)) == _json_type(value), (path, value)
            taken[_json_type(value)] = value
        assert len(taken) <= 1, (path, taken)


@pytest.mark.parametrize("kind", sorted(_KINDS))
@pytest.mark.parametrize("unknown", ["colour", "api_token"])
def test_a_field_no_kind_reads_is_refused_by_name(kind: str, unknown: str) -> None:
    sections = [()] + [
        (name,) for name, value in MINIMAL[kind].items() if isinstance(value, Mapping)
    ]
    for section in sections:
        path = (*section, unknown)
        with pytest.raises(ConfigurationError) as info:
            check_destination(_set(_spec(kind), path, "x"))
        assert _names(str(info.value), path), str(info.value)


# A spec of each kind with every field set, and its normal form as the registry stores it.
FULL: dict[str, tuple[dict[str, Any], str]] = {
    "webhook": (
        {
            "kind": "webhook",
            "url": "https://siem.example/hook?x=1",
            "signing": {"alg": "ed25519", "private_key": "file:/etc/k.pem", "key_id": "acme-1"},
            "timeout": 5,
            "ca_file": "/etc/ca.pem",
            "max_batch": 100,
        },
        '{"ca_file":"/etc/ca.pem","kind":"webhook","max_batch":100,"signing":{"alg":"ed25519",'
        '"key_id":"acme-1","private_key":"file:/etc/k.pem"},"timeout":5.0,'
        '"url":"https://siem.example/hook?x=1"}',
    ),
    "splunk_hec": (
        {
            "kind": "splunk_hec",
            "url": "https://hec.example:8088/",
            "token": "env:HEC_TOKEN",
            "index": "cmk",
            "host": "app-1",
            "timeout": 2.5,
            "max_batch": 10,
        },
        '{"host":"app-1","index":"cmk","kind":"splunk_hec","max_batch":10,'
        '"source":"sqlalchemy-cmk","sourcetype":"sqlalchemy_cmk:audit","timeout":2.5,'
        '"token":"env:HEC_TOKEN","url":"https://hec.example:8088/services/collector/event"}',
    ),
    "otlp_http": (
        {
            "kind": "otlp_http",
            "url": "https://otel.example:4318",
            "headers": {"Authorization": "env:OTLP_AUTH"},
            "compression": "gzip",
            "name": "otel",
        },
        '{"compression":"gzip","headers":{"Authorization":"env:OTLP_AUTH"},"kind":"otlp_http",'
        '"max_batch":1000,"name":"otel","service_name":"sqlalchemy-cmk","timeout":10.0,'
        '"url":"https://otel.example:4318/v1/logs"}',
    ),
    "syslog_tls": (
        {"kind": "syslog_tls", "host": "c.example", "facility": "local0", "port": 6514},
        '{"facility":16,"handshake_probe":0.5,"host":"c.example","kind":"syslog_tls",'
        '"max_batch":500,"max_message_bytes":65536,"port":6514,"sd_id":"cmk@32473",'
        '"timeout":10.0}',
    ),
    "cloudwatch": (
        {**MINIMAL["cloudwatch"], "kind": "cloudwatch", "endpoint_url": "https://logs.example"},
        '{"create_stream":false,"endpoint_url":"https://logs.example","kind":"cloudwatch",'
        '"log_group":"cmk","log_stream":"acme","max_batch":1000,"region":"eu-west-1",'
        '"timeout":10.0}',
    ),
    "gcp_logging": (
        {**MINIMAL["gcp_logging"], "kind": "gcp_logging", "labels": {"env": "prod"}},
        '{"kind":"gcp_logging","labels":{"env":"prod"},"log_id":"sqlalchemy-cmk-audit",'
        '"max_batch":500,"payload":"text","project":"acme-audit","resource_labels":'
        '{"project_id":"acme-audit"},"resource_type":"global","timeout":10.0}',
    ),
    "azure_monitor": (
        {**MINIMAL["azure_monitor"], "kind": "azure_monitor", "endpoint": "https://a.example/"},
        '{"endpoint":"https://a.example","kind":"azure_monitor","max_batch":500,"rule_id":'
        '"dcr-00000000000000000000000000000000","stream_name":"Custom-CmkAudit",'
        '"timeout":10.0}',
    ),
}


def test_the_normal_form_of_each_kind_is_pinned() -> None:
    assert set(FULL) == set(_KINDS)
    for kind, (spec, stored) in FULL.items():
        checked = check_destination(spec)
        # As the registry writes it: sorted keys, no blanks (10.0 and 10 differ here).
        assert json.dumps(checked, sort_keys=True, separators=(",", ":")) == stored, kind
        assert check_destination(checked) == checked, kind


def _stored(spec: Mapping[str, Any]) -> str:
    return json.dumps(check_destination(spec), sort_keys=True, separators=(",", ":"))


def test_splunk_ack_fields_enter_the_normal_form_only_when_given() -> None:
    base = {"kind": "splunk_hec", **MINIMAL["splunk_hec"]}
    without = _stored(base)
    assert '"ack' not in without
    # Given, they are in it; with "ack", its timeout too (default 60 s).
    assert '"ack":true,"ack_timeout":60.0,' in _stored({**base, "ack": True})
    assert '"ack":true,"ack_timeout":5.0,' in _stored({**base, "ack": True, "ack_timeout": 5})
    assert '"ack":false,' in _stored({**base, "ack": False})
    assert json.loads(_stored({**base, "ack": None})) == json.loads(without)
    checked = check_destination({**base, "ack": True})
    assert check_destination(checked) == checked


def test_splunk_ack_timeout_is_bounded_and_needs_ack() -> None:
    base = {"kind": "splunk_hec", **MINIMAL["splunk_hec"], "ack": True}
    for value in (0, 0.5, 601, float("inf"), "60", True):
        with pytest.raises(
            ConfigurationError, match="'ack_timeout' must be a number from 1 to 600"
        ):
            check_destination({**base, "ack_timeout": value})
    for ack in (False, None):
        with pytest.raises(
            ConfigurationError, match="'ack_timeout' applies only with \"ack\": true"
        ):
            check_destination({**base, "ack": ack, "ack_timeout": 30})
    with pytest.raises(ConfigurationError, match="'ack' must be true or false"):
        check_destination({**base, "ack": "yes"})
