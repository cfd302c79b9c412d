"""Typed settings: each configurable unit declares its keys once, as a frozen dataclass.

A field carries its schema rule (type, range, choices, the words a number also takes, whether
null is allowed), so one declaration gives both the schema's dotted-key rule table (`rules`)
and the typed, cast object the code receives (`from_cfg`). The units live next to the code
that uses them, in light modules that import no torch, and register here (`register`) under
the group choice that selects them (`dataset.reader=shapes`, `method.family=covmatch`, ...);
this floor holds only the mechanism and the table, so the schema stays on the core floor while
the units stay on theirs. A key that is a Python keyword (`lambda`) is a field with an alias
(`setting(rule, key="lambda")`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from mmdistill.errors import UserError

MISSING = "???"


@dataclass(frozen=True)
class Rule:
    """What one key accepts. `words` are the strings a numeric key also takes ("auto")."""

    kind: str  # int | float | bool | str | choice | list | any | custom
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    choices: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    null: bool = False
    optional: bool = False  # the key may be absent
    item: Rule | None = None  # list items
    lengths: tuple[int, ...] = ()  # allowed list lengths
    custom: Callable[[str, Any], None] | None = None  # kind custom: raises UserError

    @property
    def leaf(self) -> bool:
        """Whether the value is checked whole (lists, free-form maps) instead of per key."""
        return self.kind in ("list", "any", "custom")


def Int(lo: float | None = None, hi: float | None = None, **kw: Any) -> Rule:  # noqa: N802
    return Rule("int", lo=lo, hi=hi, **kw)


def Float(lo: float | None = None, hi: float | None = None, **kw: Any) -> Rule:  # noqa: N802
    return Rule("float", lo=lo, hi=hi, **kw)


def Choice(*choices: str, **kw: Any) -> Rule:  # noqa: N802
    return Rule("choice", choices=choices, **kw)


BOOL = Rule("bool")
TEXT = Rule("str")
MAYBE_TEXT = Rule("str", null=True)
POSITIVE = Float(0, open_lo=True)
NON_NEGATIVE = Float(0)
FRACTION = Float(0, 1, open_hi=True)  # [0, 1): dropout, momentum
PROBABILITY = Float(0, 1, open_lo=True, open_hi=True)
COUNT = Int(1)
MAX_CAPTIONS = Int(1, null=True)


def shown(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def _range_text(rule: Rule) -> str:
    lo, hi = rule.lo, rule.hi
    if lo is not None and hi is not None:
        return f"in {'(' if rule.open_lo else '['}{lo:g}, {hi:g}{')' if rule.open_hi else ']'}"
    if lo is not None:
        if rule.open_lo:
            return "positive" if lo == 0 else f"greater than {lo:g}"
        return "0 or more" if lo == 0 else f"at least {lo:g}"
    return f"{'below' if rule.open_hi else 'at most'} {hi:g}"


def _example(key: str, rule: Rule) -> str:
    if rule.kind == "int":
        return f"{key}={int(rule.lo) + (1 if rule.open_lo else 0) if rule.lo is not None else 1}"
    if rule.kind == "float":
        return f"{key}={0.5 if rule.hi is not None and rule.hi <= 1 else 1.0}"
    return f"{key}=..."


def number(value: Any, whole: bool = False) -> float | None:
    """A YAML/override number (not a bool); text counts when int() / float() reads it, as the
    jobs convert values that way."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(int(value) if whole else float(value))
        except ValueError:
            return None
    return None


def check_value(key: str, rule: Rule, value: Any) -> None:
    """Raise a one-line UserError when `value` breaks `rule`."""
    if value is None:
        if rule.null or rule.kind == "any":
            return
        raise UserError(f"{key} must be set, not null; e.g. {_example(key, rule)}")
    if isinstance(value, str) and value in rule.words:
        return
    words = f" or {' / '.join(rule.words)}" if rule.words else ""
    if rule.kind in ("int", "float"):
        num = number(value)
        if num is None or not math.isfinite(num):
            what = "a whole number" if rule.kind == "int" else "a finite number"
            raise UserError(
                f"{key}={shown(value)} is not {what}{words}; e.g. {_example(key, rule)}"
            )
        text_not_int = isinstance(value, str) and number(value, whole=True) is None
        if rule.kind == "int" and (num != int(num) or text_not_int):
            raise UserError(
                f"{key}={shown(value)} is not a whole number; pairs, steps and counts are "
                f"whole (e.g. {key}={math.floor(num)})"
            )
        low = rule.lo is not None and (num <= rule.lo if rule.open_lo else num < rule.lo)
        high = rule.hi is not None and (num >= rule.hi if rule.open_hi else num > rule.hi)
        if low or high:
            raise UserError(f"{key}={shown(value)} is out of range: it must be {_range_text(rule)}")
    elif rule.kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{key}={shown(value)} must be true or false")
    elif rule.kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{key}={shown(value)} must be non-empty text")
    elif rule.kind == "choice":
        if value not in rule.choices:
            raise UserError(
                f"{key}={shown(value)} is not a valid choice; choose one of: "
                f"{', '.join(rule.choices)}"
            )
    elif rule.kind == "list":
        _check_list(key, rule, value)
    elif rule.kind == "custom" and rule.custom is not None:
        rule.custom(key, value)


def _check_list(key: str, rule: Rule, value: Any) -> None:
    if not isinstance(value, list):
        raise UserError(f"{key}={shown(value)} must be a list, e.g. {key}=[...]")
    if rule.lengths and len(value) not in rule.lengths:
        sizes = " or ".join(str(n) for n in rule.lengths)
        raise UserError(f"{key}={value} must have {sizes} entries, not {len(value)}")
    if rule.item is not None:
        for i, item in enumerate(value):
            check_value(f"{key}[{i}]", rule.item, item)


def get(tree: Mapping, key: str, default: Any = None) -> Any:
    """The value at a dotted key of a nested mapping, or `default`."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


# ------------------------------------------------------------------------------ dataclasses

S = TypeVar("S")
# Decorator for a unit's settings: frozen (code cannot change what the schema checked) and
# keyword-only (fields carry no defaults but the optional ones, in any order).
settings = dataclass(frozen=True, kw_only=True)


@settings
class NoKeys:
    """A choice that brings no keys of its own (noise=none, method=random)."""


def setting(rule: Rule, key: str | None = None) -> Any:
    """A field checked by `rule`; `key` is the config key where it is not the field's name.
    An optional key (`rule.optional`) that is absent reads as None."""
    default = None if rule.optional else dataclasses.MISSING
    return dataclasses.field(default=default, metadata={"rule": rule, "key": key})


def group(cls: type, key: str | None = None) -> Any:
    """A field holding a nested unit: its keys sit under this field's key."""
    return dataclasses.field(metadata={"settings": cls, "key": key})


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def rules(cls: type, prefix: str = "") -> dict[str, Rule]:
    """The dotted-key rule table of a settings dataclass, every key under `prefix`."""
    out: dict[str, Rule] = {}
    for f in dataclasses.fields(cls):
        key = prefix + _key(f)
        if "settings" in f.metadata:
            out.update(rules(f.metadata["settings"], key + "."))
        else:
            out[key] = f.metadata["rule"]
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def cast(rule: Rule, value: Any) -> Any:
    """A checked value as the type its rule names: '3' -> 3 for a whole number, 1 -> 1.0 for
    a number; the words a number also takes ("auto") and null stay as they are."""
    if value is None or (isinstance(value, str) and value in rule.words):
        return value
    if rule.kind == "int":
        return int(value)
    if rule.kind == "float":
        return float(value)
    if rule.kind == "list":
        return [cast(rule.item, v) for v in value] if rule.item is not None else list(value)
    return value


def from_cfg(cls: type[S], cfg: Mapping | DictConfig | None, prefix: str = "") -> S:
    """The typed instance of `cls` read from a config node, each value checked against its
    rule (the same one-line errors as the schema) and cast; `prefix` names the node's keys in
    those errors (`method.`). Keys the class does not declare are left to the schema, which
    refuses unknown ones before any job starts."""
    node = cfg if cfg is not None else {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = _key(f)
        key = prefix + name
        if "settings" in f.metadata:
            values[f.name] = from_cfg(f.metadata["settings"], node.get(name), key + ".")
            continue
        rule: Rule = f.metadata["rule"]
        if name not in node:
            if rule.optional:
                values[f.name] = None
                continue
            raise UserError(f"{key} is missing from the config; set {key}=...")
        value = _plain(node[name])
        check_value(key, rule, value)
        values[f.name] = cast(rule, value)
    return cls(**values)


# ------------------------------------------------------------------------------ registration

# selector key ("" for the units every config has) -> its choice -> the units it brings, each
# a settings class and the prefix of its keys. Filled by the light `settings` modules of the
# floors above as they are imported (`mmdistill.methods.settings` imports them all).
UNITS: dict[str, dict[str, list[tuple[type, str]]]] = {}


def register(prefix: str, selector: str = "", choice: str = "") -> Callable[[type], type]:
    """Class decorator: `cls`'s keys, under `prefix`, apply to configs whose `selector` key
    is `choice` (every config when no selector is given)."""

    def add(cls: type) -> type:
        units = UNITS.setdefault(selector, {}).setdefault(choice, [])
        if (cls, prefix) not in units:
            units.append((cls, prefix))
        return cls

    return add


def choices(selector: str) -> tuple[str, ...]:
    """The registered choices of a selector key, in registration order."""
    return tuple(UNITS.get(selector, {}))


def unit_rules(selector: str, choice: str) -> dict[str, Rule]:
    """The rules the units registered for `selector=choice` bring ({} for none)."""
    out: dict[str, Rule] = {}
    for cls, prefix in UNITS.get(selector, {}).get(choice, []):
        out.update(rules(cls, prefix))
    return out


def unit(selector: str, choice: str) -> type | None:
    """The first settings class registered for `selector=choice` (a method family's own)."""
    units = UNITS.get(selector, {}).get(choice, [])
    return units[0][0] if units else None
