"""The one reader of destination specs, shared by every kind (private).

Each kind's ``check(spec)`` reads its fields through a :class:`Fields`, which refuses unknown
fields (a typo must not silently drop an option) and names the field at fault in every error.
A field that is absent or ``null`` takes its default, which the normal form then holds, unless
the field is read with ``emit_default=False``: a field added to a kind after its specs were
stored is read so, and stays out of the normal form until given, so the normal form of every
spec stored before (the key registry keeps it under a MAC) does not change. The fields several
kinds share (``url``, ``timeout``, ``ca_file``, ``max_batch``) have one method each, so an option
common to every kind is added, and its rules changed, in one place. No I/O, no secret resolved:
a secret field must hold a *reference*, checked for form only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from ..errors import ConfigurationError
from . import NetworkPolicy, check_secret_ref

#: The default and the largest per-send timeout, in seconds.
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 300.0


class Fields:
    """Reads one spec of ``kind``; :meth:`done` refuses whatever was not read.

    Args:
        spec: The spec (or, for :meth:`section`, one of its nested mappings).
        kind: The destination's kind, for messages.
        prefix: Prepended to field names in messages (``"signing."`` in a section).
    """

    def __init__(self, spec: Mapping[str, Any], kind: str, *, prefix: str = "") -> None:
        if not isinstance(spec, Mapping):
            raise ConfigurationError(f"a {kind} destination is a mapping")
        self.spec = spec
        self.kind = kind
        self.prefix = prefix
        # A section has no kind of its own.
        self.seen: set[str] = set() if prefix else {"kind"}
        self.out: dict[str, Any] = {} if prefix else {"kind": kind}
        self._sections: list[Fields] = []

    def what(self, name: str) -> str:
        """How messages name the field ``name``: ``"webhook destination field 'signing.alg'"``."""
        return f"{self.kind} destination field {self.prefix + name!r}"

    def _get(self, name: str, required: bool) -> Any:
        self.seen.add(name)
        value = self.spec.get(name)
        if value is None and required:
            raise ConfigurationError(f"{self.what(name)} is required")
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
            raise ConfigurationError(f"{self.what(name)} must be a non-empty string")
        if len(value) > max_len:
            raise ConfigurationError(f"{self.what(name)} is longer than {max_len} characters")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise ConfigurationError(f"{self.what(name)} has an invalid form")
        self.out[name] = value
        return value

    def choice(self, name: str, options: Collection[str], *, default: str | None = None) -> str:
        """One of ``options``, required unless there is a ``default`` (the message lists the
        options, never repeats the value given)."""
        value = self._get(name, default is None)
        if value is None:
            value = default
        if not isinstance(value, str) or value not in options:
            raise ConfigurationError(
                f"{self.what(name)} must be one of {', '.join(map(repr, sorted(options)))}"
            )
        self.out[name] = value
        return value

    def url(
        self, name: str, *, required: bool = False, default_path: str | None = None
    ) -> str | None:
        """An ``https://`` URL: printable ASCII, a host, no credentials, no ``#fragment``.

        The host is checked against no allowlist here (that, and its addresses, are the
        build's and each send's). ``default_path`` replaces an empty or ``/`` path.
        """
        value = self.string(name, required=required)
        if value is None:
            return None
        if not all("!" <= c <= "~" for c in value):
            # http.client refuses anything else in the request line (InvalidURL, or an
            # UnicodeEncodeError), as do the SDKs: the spec would check, then fail every send
            # as if the network did.
            raise ConfigurationError(
                f"{self.what(name)} must be printable ASCII without spaces (percent-encode the "
                "path and query, write an international host in punycode)"
            )
        parts = NetworkPolicy(allowed_hosts=None).check_url(value, what=self.what(name))
        if parts.fragment:
            raise ConfigurationError(f"{self.what(name)} must not have a #fragment")
        if default_path and parts.path in ("", "/"):
            value = parts._replace(path=default_path).geturl()
        self.out[name] = value
        return value

    def number(
        self,
        name: str,
        *,
        default: float,
        low: float,
        high: float,
        integer: bool = False,
        emit_default: bool = True,
    ) -> float:
        value = self._get(name, False)
        if value is None:
            if not emit_default:
                return float(default)
            value = default
        # An integer field takes a JSON integer only (never 100.0, nor true).
        ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not low <= value <= high:
            raise ConfigurationError(
                f"{self.what(name)} must be a{'n integer' if integer else ' number'} "
                f"from {low:g} to {high:g}"
            )
        self.out[name] = int(value) if integer else float(value)
        return float(value)

    def flag(self, name: str, *, default: bool = False, emit_default: bool = True) -> bool:
        value = self._get(name, False)
        if value is None:
            if not emit_default:
                return default
            value = default
        if not isinstance(value, bool):
            raise ConfigurationError(f"{self.what(name)} must be true or false")
        self.out[name] = value
        return value

    def mapping(self, name: str) -> dict[Any, Any]:
        """A mapping (``{}`` when absent) whose entries the kind checks itself; see
        :meth:`labels` and :meth:`section` for the usual ones."""
        value = self._get(name, False)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"{self.what(name)} must be a mapping")
        self.out[name] = dict(value)
        return dict(value)

    def labels(self, name: str) -> dict[str, str]:
        value = self.mapping(name)
        if not all(
            isinstance(k, str) and isinstance(v, str) and k and len(k) <= 63 and len(v) <= 1024
            for k, v in value.items()
        ):
            raise ConfigurationError(f"{self.what(name)} must map short strings to strings")
        return value

    def section(self, name: str, *, required: bool = False, example: str = "") -> Fields | None:
        """A nested mapping of named fields, read with the :class:`Fields` returned; this one's
        :meth:`done` refuses what the section did not read, and puts its result in this one's."""
        value = self._get(name, False)
        if value is None and not required:
            return None
        if not isinstance(value, Mapping):
            raise ConfigurationError(
                f"{self.what(name)} {'is required' if value is None else 'must be a mapping'}"
                + (f", e.g. {example}" if example else "")
            )
        section = Fields(value, self.kind, prefix=f"{self.prefix}{name}.")
        self.out[name] = section.out  # filled as the section is read
        self._sections.append(section)
        return section

    def secret_ref(self, name: str, *, required: bool = False) -> str | None:
        """A secret *reference* (``env:NAME``, ``file:/path``, ``<scheme>:...``), not a secret."""
        value = self._get(name, required)
        if value is None:
            return None
        ref = check_secret_ref(value, self.what(name))
        self.out[name] = ref
        return ref

    def file_path(self, name: str, *, required: bool = False) -> str | None:
        """A path to a file read when the sink is built (a CA bundle, a certificate)."""
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value.startswith("/") or "\n" in value:
            raise ConfigurationError(
                f"{self.what(name)} must be an absolute file path (never the PEM itself)"
            )
        self.out[name] = value
        return value

    def timeout(self) -> float:
        """``timeout``: seconds for one send, from 0.1 to 300 (default 10)."""
        return self.number("timeout", default=DEFAULT_TIMEOUT, low=0.1, high=MAX_TIMEOUT)

    def ca_file(self) -> str | None:
        """``ca_file``: a PEM bundle of the CAs to trust instead of the system's (a private CA)."""
        return self.file_path("ca_file")

    def max_batch(self, default: int, *, high: int | None = None) -> int:
        """``max_batch``: records per send, from 1 to ``high`` (default: ``default``)."""
        return int(
            self.number(
                "max_batch",
                default=default,
                low=1,
                high=default if high is None else high,
                integer=True,
            )
        )

    def done(self) -> dict[str, Any]:
        """The normal form, once every field (and every section's) was read.

        Raises:
            ConfigurationError: naming a field that was not read (an unknown field).
        """
        for section in self._sections:
            section.done()
        extra = sorted(set(self.spec) - self.seen, key=str)
        if extra:
            names = [self.prefix + str(k) for k in extra]
            secretish = [
                self.prefix + str(k)
                for k in extra
                if re.search(r"secret|password|token|key", str(k), re.I)
            ]
            if secretish:
                raise ConfigurationError(
                    f"{self.kind} destination field {secretish[0]!r} is not a field: secrets "
                    "are given as references in the fields the docs name, never inline"
                )
            raise ConfigurationError(
                f"{self.kind} destination has unknown field(s): {', '.join(map(repr, names))}"
            )
        return self.out
