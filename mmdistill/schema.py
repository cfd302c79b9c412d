"""The typed schema of every job config, checked before any work starts.

Each key a job reads has a rule: a type (whole number, number, true/false, text, one of a few
choices, a list), a range, and whether null is allowed. The rules are not written here: each
configurable unit declares its keys once, as a frozen settings dataclass next to its code
(`mmdistill/settings.py` has the mechanism), and registers it under the group choice that
selects it. Which rules apply follows the config's own choices (verb, dataset reader, encoder
builder, noise, method family, logger), so `method.rho` is a key of the CovMatch family and
an unknown key everywhere else. `check(cfg, verb)` walks the composed config once: an unknown
key, a value of the wrong type or out of range, a missing required value or two settings that
contradict each other fail with one line that names the key and the fix ("did you mean ...?"
for a typo). It imports neither torch nor any model code, so it costs milliseconds before
every job. The units register when `mmdistill.methods.settings` is imported (the CLI does).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmdistill import settings as units
from mmdistill.errors import UserError
from mmdistill.settings import (
    MAYBE_TEXT,
    MISSING,
    TEXT,
    Choice,
    Int,
    Rule,
    check_value,
    get,
    group,
    register,
    setting,
    settings,
    shown,
)

# Student losses by name; tests/test_bad_input.py checks this against training.losses.LOSSES.
LOSS_NAMES = ("infonce", "soft_infonce", "wbce")
# The keys whose value picks more rules, in the order they are checked (their errors first);
# the method family applies to distill jobs only.
SELECTORS = ("dataset.reader", "encoder.builder", "noise.name", "method.family", "logger.name")


def _device(key: str, value: Any) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise UserError(f"{key}={shown(value)}: unknown device; choose auto, cpu, cuda or cuda:N")


@settings
class Paths:
    """Where runs, caches and data live."""

    output_dir: str = setting(TEXT)
    cache_dir: str = setting(TEXT)
    data_dir: str = setting(TEXT)


@settings
class Limits:
    """Caps for dry runs (debug=tiny): any preset runs its code path in seconds."""

    method_steps: int | None = setting(Int(1, null=True))
    experts: int | None = setting(Int(1, null=True))
    expert_epochs: int | None = setting(Int(1, null=True))


@register("")
@settings
class Job:
    """What every job config has: its seed, device, threads and run folder."""

    seed: int = setting(Int(0))
    device: str = setting(Rule("custom", custom=_device))
    threads: int | None = setting(Int(1, null=True))
    data_workers: int | str = setting(Int(0, words=("auto",)))
    precision: str = setting(Choice("auto", "fp32", "tf32", "bf16"))
    resume: str | None = setting(MAYBE_TEXT)
    run_name: str = setting(TEXT)
    paths: Paths = group(Paths)
    limits: Limits = group(Limits)


def _loaded() -> None:
    if not units.choices("method.family"):
        raise RuntimeError(
            "the settings units are not registered: import mmdistill.methods.settings before "
            "schema.check (the CLI does)"
        )


def table(selector: str = "", choice: str = "") -> dict[str, Rule]:
    """The rule table of one group choice (`table("method.family", "covmatch")`); the keys
    every config has for no arguments."""
    _loaded()
    return units.unit_rules(selector, choice)


# --------------------------------------------------------------------------------- walking


def flatten(tree: Mapping, rules: Mapping[str, Rule], prefix: str = "") -> Iterator[tuple]:
    """(dotted key, value) of every leaf; a key whose rule is a leaf rule is not descended."""
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        rule = rules.get(key)
        if isinstance(v, Mapping) and v and (rule is None or not rule.leaf):
            yield from flatten(v, rules, key)
        else:
            yield key, v


def rules_for(tree: Mapping, verb: str) -> dict[str, Rule]:
    """The rules a composed config is checked against: its verb's and its group choices'."""
    rules: dict[str, Rule] = {**table(), "verb": Choice(verb)}
    rules.update(table("verb", verb))
    for selector in SELECTORS:
        if selector == "method.family" and verb != "distill":
            continue
        rules[selector] = Choice(*units.choices(selector))
        rules.update(table(selector, str(get(tree, selector))))
    return rules


def suggest(key: str, known: list[str]) -> str:
    """' (did you mean X?)' for the closest known key, or ''."""
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], 1, 0.6)
    if close:
        return f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
    close = difflib.get_close_matches(key, known, 1, 0.6)
    return f"; did you mean {close[0]}?" if close else ""


def unknown_key(key: str, known: list[str], verb: str) -> UserError:
    return UserError(
        f"unknown key {key} for `mmdistill {verb}` with this config{suggest(key, known)} "
        f"(`mmdistill {verb} --cfg job` lists every key)"
    )


def resolved(cfg: DictConfig) -> dict:
    """The config with every interpolation resolved; a broken one, or a required value left
    unset (`???`), is a one-line error."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key in sorted(k for k, v in flatten(raw, {}) if v == MISSING):
        if key == "source":
            raise UserError("evaluate needs source=<distill run folder>")
        raise UserError(f"{key} is required: set {key}=...")
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "a value"
        first = str(err).splitlines()[0]
        raise UserError(f"cannot resolve {key}: {first}") from None


def check(cfg: DictConfig | Mapping, verb: str) -> None:
    """Refuse, in one line, a job config any of whose keys is unknown, mistyped, out of
    range, missing or in conflict with another."""
    tree = resolved(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    rules = rules_for(tree, verb)
    # The keys that choose the other rules come first, so their errors read first.
    for key in (
        "verb",
        "dataset.reader",
        "encoder.builder",
        "noise.name",
        "method.family",
        "logger.name",
    ):
        if key in rules:
            check_value(key, rules[key], get(tree, key))
    known = sorted(rules)
    # Keys set directly before those copied from them (`${...}`): an error names the key
    # the user set, not one that repeats it.
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else tree
    copied = {k for k, v in flatten(raw, rules) if isinstance(v, str) and "${" in v}
    for key, value in sorted(flatten(tree, rules), key=lambda kv: kv[0] in copied):
        rule = rules.get(key)
        if rule is None:
            raise unknown_key(key, known, verb)
        check_value(key, rule, value)
    for key, rule in rules.items():
        if not rule.optional and get(tree, key, MISSING) is MISSING:
            raise UserError(f"{key} is missing from the config; set {key}=...")
    _check_together(tree, verb)


def _check_together(tree: Mapping, verb: str) -> None:
    """Settings that are each valid but contradict each other: the budget's, then the method
    family's own (its settings class's `check_together`)."""
    if verb != "distill":
        return
    pairs, ratio = get(tree, "budget.pairs"), get(tree, "budget.ratio")
    if pairs is not None and ratio is not None:
        raise UserError(
            f"budget.pairs={pairs} and budget.ratio={ratio} are both set; give one of them"
        )
    if pairs is None and ratio is None:
        raise UserError("set budget.pairs (e.g. budget.pairs=100) or budget.ratio (e.g. 0.003)")
    family = units.unit("method.family", str(get(tree, "method.family")))
    together = getattr(family, "check_together", None)
    if together is not None:
        together(tree, pairs)
