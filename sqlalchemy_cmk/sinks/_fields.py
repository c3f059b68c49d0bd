"""Spec checks shared by the syslog and cloud sinks (private).

Each ``check(spec)`` reads its fields through a :class:`Fields`, which refuses unknown fields
(a typo must not silently drop an option) and names the field at fault in every error. No I/O,
no secret resolved: a secret field must hold a *reference*, checked for form only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError
from . import check_secret_ref

#: The default and the largest per-send timeout, in seconds.
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 300.0


class Fields:
    """Reads one spec of ``kind``; :meth:`done` refuses whatever was not read."""

    def __init__(self, spec: Mapping[str, Any], kind: str) -> None:
        if not isinstance(spec, Mapping):
            raise ConfigurationError(f"a {kind} destination is a mapping")
        self.spec = spec
        self.kind = kind
        self.seen = {"kind"}
        self.out: dict[str, Any] = {"kind": kind}

    def _field(self, name: str) -> str:
        return f"{self.kind} destination field {name!r}"

    def _get(self, name: str, required: bool) -> Any:
        self.seen.add(name)
        value = self.spec.get(name)
        if value is None and required:
            raise ConfigurationError(f"{self._field(name)} is required")
        return value

    def string(
        self,
        name: str,
        *,
        required: bool = False,
        default: str | None = None,
        pattern: str | None = None,
        max_len: int = 1024,
    ) -> str | None:
        value = self._get(name, required)
        if value is None:
            value = default
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{self._field(name)} must be a non-empty string")
        if len(value) > max_len:
            raise ConfigurationError(f"{self._field(name)} is longer than {max_len} characters")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise ConfigurationError(f"{self._field(name)} has an invalid form")
        self.out[name] = value
        return value

    def number(
        self, name: str, *, default: float, low: float, high: float, integer: bool = False
    ) -> float:
        value = self._get(name, False)
        if value is None:
            value = default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if integer:
            ok = ok and float(value).is_integer()
        if not ok or not math.isfinite(value) or not low <= value <= high:
            raise ConfigurationError(
                f"{self._field(name)} must be a{'n integer' if integer else ' number'} "
                f"from {low:g} to {high:g}"
            )
        self.out[name] = int(value) if integer else float(value)
        return float(value)

    def flag(self, name: str, *, default: bool = False) -> bool:
        value = self._get(name, False)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise ConfigurationError(f"{self._field(name)} must be true or false")
        self.out[name] = value
        return value

    def labels(self, name: str) -> dict[str, str]:
        value = self._get(name, False)
        if value is None:
            value = {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and k and len(k) <= 63 and len(v) <= 1024
            for k, v in value.items()
        ):
            raise ConfigurationError(f"{self._field(name)} must map short strings to strings")
        self.out[name] = dict(value)
        return dict(value)

    def secret_ref(self, name: str, *, required: bool = False) -> str | None:
        """A secret *reference* (``env:NAME``, ``file:/path``, ``<scheme>:...``), not a secret."""
        value = self._get(name, required)
        if value is None:
            return None
        ref = check_secret_ref(value, self._field(name))
        self.out[name] = ref
        return ref

    def file_path(self, name: str, *, required: bool = False) -> str | None:
        """A path to a file read when the sink is built (a CA bundle, a certificate)."""
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value.startswith("/") or "\n" in value:
            raise ConfigurationError(
                f"{self._field(name)} must be an absolute file path (never the PEM itself)"
            )
        self.out[name] = value
        return value

    def timeout(self) -> float:
        return self.number("timeout", default=DEFAULT_TIMEOUT, low=0.1, high=MAX_TIMEOUT)

    def done(self) -> dict[str, Any]:
        extra = sorted(set(self.spec) - self.seen)
        if extra:
            secretish = [k for k in extra if re.search(r"secret|password|token|key", k, re.I)]
            if secretish:
                raise ConfigurationError(
                    f"{self.kind} destination field {secretish[0]!r} is not a field: secrets "
                    "are given as references in the fields the docs name, never inline"
                )
            raise ConfigurationError(
                f"{self.kind} destination has unknown field(s): {', '.join(map(repr, extra))}"
            )
        return self.out
