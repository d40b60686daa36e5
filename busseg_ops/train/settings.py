"""Settings fields: each is a `busseg train` flag, and declares its help, choices and range beside
its default, so that the config, the methods' groups and the command line read them from one place."""

from __future__ import annotations

import dataclasses
import math

from .errors import UserError


def setting(
    default,
    help: str,
    choices=None,
    *,
    section: str | None = None,
    at_least=None,
    at_most=None,
    within: str | None = None,
    positive: bool = False,
    non_negative: bool = False,
):
    """A settings field. `section`: the help section of a top-level field (a group's fields are in
    its own). `at_most`: (bound, why). `within`: an interval such as "[0, 1)" or "(0, 100]"."""
    meta = dict(help=help, choices=choices, section=section, at_least=at_least, at_most=at_most)
    meta.update(within=_interval(within) if within else None, positive=positive, non_negative=non_negative)
    return dataclasses.field(default=default, metadata=meta)


def _interval(text: str):
    low, high = (float(v) for v in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]", text


def flag(name: str) -> str:
    """The command-line flag of a setting."""
    return "--" + name.replace("_", "-")


def check(obj) -> None:
    """The choices and ranges the fields of settings object `obj` declare; the error names the flag."""
    for f in dataclasses.fields(obj):
        m, v = f.metadata, getattr(obj, f.name)
        if "help" not in m or v is None:  # a group of settings, or an unset optional value
            continue
        name = flag(f.name)
        if m["choices"] and v not in m["choices"]:
            raise UserError(f"{name} {v!r}: expected one of {', '.join(map(str, m['choices']))}")
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{name} {v}: must be a finite number")
        if m["at_least"] is not None and v < m["at_least"]:
            raise UserError(f"{name} {v}: must be at least {m['at_least']}")
        if m["at_most"] is not None and v > m["at_most"][0]:
            raise UserError(f"{name} {v}: must be at most {m['at_most'][0]} ({m['at_most'][1]})")
        if m["within"]:
            low, high, closed_low, closed_high, text = m["within"]
            if not ((low <= v if closed_low else low < v) and (v <= high if closed_high else v < high)):
                raise UserError(f"{name} {v}: must be in {text}")
        if m["positive"] and not v > 0:
            raise UserError(f"{name} {v}: must be positive")
        if m["non_negative"] and v < 0:
            raise UserError(f"{name} {v}: must not be negative")
