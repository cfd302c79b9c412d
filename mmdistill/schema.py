"""The typed schema of every job config, checked before any work starts.

Each key a job reads has a rule: a type (whole number, number, true/false, text, one of a few
choices, a list), a range, and whether null is allowed. Which rules apply follows the config's
own group choices (dataset reader, encoder builder, method, noise), so `method.rho` is a key of
CovMatch and an unknown key everywhere else. `check(cfg, verb)` walks the composed config
once: an unknown key, a value of the wrong type or out of range, a missing required value or
two settings that contradict each other fail with one line that names the key and the fix
("did you mean ...?" for a typo). It imports neither torch nor any model code, so it costs
milliseconds before every job.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmdistill.errors import UserError

# Student losses by name; tests/test_bad_input.py checks this against training.losses.LOSSES.
LOSS_NAMES = ("infonce", "soft_infonce", "wbce")
TRAJECTORY_METHODS = ("mtt", "mtt_lora", "tesla", "lors", "repblend", "mdw")
# Methods that count a learned similarity as one pair of the budget, and CovMatch variants.
SIMILARITY_IN_BUDGET = ("lors", "repblend")
COVMATCH_METHODS = ("covmatch", "covmatch_robust", "covmatch_lowrank", "covmatch_int8")
# How `evaluate encoder=<other>` may resize distilled pixels (training/transfer.py).
TRANSFER_RESIZE = ("bicubic", "bilinear")
# Whether it keeps texts that both text trunks read alike (auto) or decodes them all.
TRANSFER_TEXTS = ("auto", "decode")
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


def _shown(value: Any) -> str:
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


def _number(value: Any, whole: bool = False) -> float | None:
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
        number = _number(value)
        if number is None or not math.isfinite(number):
            what = "a whole number" if rule.kind == "int" else "a finite number"
            raise UserError(
                f"{key}={_shown(value)} is not {what}{words}; e.g. {_example(key, rule)}"
            )
        text_not_int = isinstance(value, str) and _number(value, whole=True) is None
        if rule.kind == "int" and (number != int(number) or text_not_int):
            raise UserError(
                f"{key}={_shown(value)} is not a whole number; pairs, steps and counts are "
                f"whole (e.g. {key}={math.floor(number)})"
            )
        low = rule.lo is not None and (number <= rule.lo if rule.open_lo else number < rule.lo)
        high = rule.hi is not None and (number >= rule.hi if rule.open_hi else number > rule.hi)
        if low or high:
            raise UserError(
                f"{key}={_shown(value)} is out of range: it must be {_range_text(rule)}"
            )
    elif rule.kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{key}={_shown(value)} must be true or false")
    elif rule.kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{key}={_shown(value)} must be non-empty text")
    elif rule.kind == "choice":
        if value not in rule.choices:
            raise UserError(
                f"{key}={_shown(value)} is not a valid choice; choose one of: "
                f"{', '.join(rule.choices)}"
            )
    elif rule.kind == "list":
        _check_list(key, rule, value)
    elif rule.kind == "custom" and rule.custom is not None:
        rule.custom(key, value)


def _check_list(key: str, rule: Rule, value: Any) -> None:
    if not isinstance(value, list):
        raise UserError(f"{key}={_shown(value)} must be a list, e.g. {key}=[...]")
    if rule.lengths and len(value) not in rule.lengths:
        sizes = " or ".join(str(n) for n in rule.lengths)
        raise UserError(f"{key}={value} must have {sizes} entries, not {len(value)}")
    if rule.item is not None:
        for i, item in enumerate(value):
            check_value(f"{key}[{i}]", rule.item, item)


# ----------------------------------------------------------------------------- special keys


def _device(key: str, value: Any) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise UserError(f"{key}={_shown(value)}: unknown device; choose auto, cpu, cuda or cuda:N")


def _split_sizes(last_may_be_null: bool) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if not isinstance(value, list) or len(value) not in ((2, 3) if last_may_be_null else (3,)):
            raise UserError(
                f"{key}={_shown(value)} must be [train, val, test] image counts, e.g. "
                f"{key}=[700,100,200]"
            )
        for i, size in enumerate(value):
            if size is None and last_may_be_null and i == 2:
                continue
            check_value(f"{key}[{i}]", Int(0), size)

    return check


def _hf_splits(key: str, value: Any) -> None:
    if not isinstance(value, Mapping) or set(value) - {"train", "val", "test"}:
        raise UserError(
            f"{key} must map train/val/test to hub split names, e.g. {key}.val=validation"
        )
    for name, split in value.items():
        check_value(f"{key}.{name}", TEXT, split)


def _by_budget(key: str, value: Any) -> None:
    """CovMatch's per-budget table: {pairs: {rho, lambda, steps, syn_batch}}."""
    row_rules = {
        "rho": NON_NEGATIVE,
        "lambda": NON_NEGATIVE,
        "steps": Int(0),
        "syn_batch": Int(2, words=("all",)),
    }
    if not isinstance(value, Mapping) or not value:
        raise UserError(f"{key} must map budgets to {{rho, lambda, steps, syn_batch}} rows")
    for budget, row in value.items():
        check_value(f"{key} budget", COUNT, budget)
        if not isinstance(row, Mapping) or set(row) != set(row_rules):
            raise UserError(f"{key}.{budget} must set exactly {', '.join(row_rules)}")
        for name, rule in row_rules.items():
            check_value(f"{key}.{budget}.{name}", rule, row[name])


def _rank_by_budget(key: str, value: Any) -> None:
    """Low-rank CovMatch's rank per budget: {pairs: rank}."""
    if not isinstance(value, Mapping) or not value:
        raise UserError(f"{key} must map budgets (pairs) to ranks, e.g. {{100: 56}}")
    for budget, rank in value.items():
        check_value(f"{key} budget", COUNT, budget)
        check_value(f"{key}.{budget}", COUNT, rank)


def _bits(key: str, value: Any) -> None:
    """CovMatch's storage precision of the synthetic rows: float32 or int8."""
    if isinstance(value, bool) or value not in (32, 8):
        raise UserError(f"{key}={_shown(value)} is not a valid choice; choose one of: 32, 8")


# ----------------------------------------------------------------------------------- rules

COMMON = {
    "seed": Int(0),
    "device": Rule("custom", custom=_device),
    "threads": Int(1, null=True),
    "data_workers": Int(0, words=("auto",)),
    "precision": Choice("auto", "fp32", "tf32", "bf16"),
    "resume": MAYBE_TEXT,
    "run_name": TEXT,
    "paths.output_dir": TEXT,
    "paths.cache_dir": TEXT,
    "paths.data_dir": TEXT,
    "noise.name": Choice("none", "shuffle"),
    "noise.ratio": FRACTION,
    "eval.name": TEXT,
    "eval.students": COUNT,
    "eval.steps": COUNT,
    "eval.batch_size": Int(2),
    "eval.optimizer": Choice("adamw", "sgd"),
    "eval.lr": Float(0, open_lo=True, words=("learned", "learned_image")),
    "eval.trunk_lr": Float(0, open_lo=True, words=("learned", "learned_image")),
    "eval.weight_decay": NON_NEGATIVE,
    "eval.momentum": FRACTION,
    "eval.feature_dropout": FRACTION,
    "eval.schedule": Choice("cosine", "multistep", "none"),
    "eval.selection": Choice("final", "best_val", "best_test"),
    "eval.eval_every": COUNT,
    "eval.loss": Choice("auto", *LOSS_NAMES),
    "eval.workers": Int(1, words=("auto",), optional=True),
    "eval.together": Rule("bool", words=("auto",), optional=True),
    "eval.split": Choice("test", "val", optional=True),
}
NOISES = {"none": {}, "shuffle": {"noise.seed": Int(0)}}
DATASETS = {
    "shapes": {
        "dataset.seed": Int(0),
        "dataset.image_size": Int(8),
        "dataset.captions_per_image": COUNT,
        "dataset.split_sizes": Rule("custom", custom=_split_sizes(False)),
    },
    "flickr8k": {
        "dataset.root": MAYBE_TEXT,
        "dataset.captions_file": TEXT,
        "dataset.image_dir": TEXT,
        "dataset.split_sizes": Rule("custom", custom=_split_sizes(True)),
        "dataset.max_captions": MAX_CAPTIONS,
        "dataset.max_images": MAX_CAPTIONS,
    },
    "karpathy": {
        "dataset.annotations": TEXT,
        "dataset.image_root": TEXT,
        "dataset.restval_to_train": BOOL,
        "dataset.max_captions": MAX_CAPTIONS,
        "dataset.max_images": MAX_CAPTIONS,
    },
    "coco": {
        "dataset.train_annotations": TEXT,
        "dataset.val_annotations": TEXT,
        "dataset.train_images": TEXT,
        "dataset.val_images": TEXT,
        "dataset.test_annotations": Rule("str", null=True, optional=True),
        "dataset.test_images": Rule("str", null=True, optional=True),
        "dataset.test_size": COUNT,
        "dataset.max_captions": MAX_CAPTIONS,
        "dataset.max_images": MAX_CAPTIONS,
    },
    "hf": {
        "dataset.path": TEXT,
        "dataset.config_name": MAYBE_TEXT,
        "dataset.from_disk": BOOL,
        "dataset.image_column": TEXT,
        "dataset.caption_column": TEXT,
        "dataset.image_id_column": MAYBE_TEXT,
        "dataset.splits": Rule("custom", custom=_hf_splits),
        "dataset.revision": Rule("str", null=True, optional=True),
        "dataset.data_dir": Rule("str", null=True, optional=True),
        "dataset.data_files": Rule("any", optional=True),
        "dataset.max_captions": MAX_CAPTIONS,
        "dataset.max_images": MAX_CAPTIONS,
    },
}
HEADS = ("identity", "linear", "projection")
ENCODER_COMMON = {
    "encoder.name": TEXT,
    "encoder.model_config": TEXT,
    "encoder.pretrained": BOOL,
    "encoder.image_size": Int(8),
    "encoder.train_image_trunk": BOOL,
    "encoder.train_text_trunk": BOOL,
    "encoder.augment": BOOL,
    "encoder.temperature": POSITIVE,
    "encoder.head.image": Choice(*HEADS),
    "encoder.head.text": Choice(*HEADS),
    "encoder.head.dim": COUNT,
    "encoder.recipe.steps": COUNT,
    "encoder.recipe.batch_size": Int(2),
    "encoder.recipe.lr": POSITIVE,
    "encoder.recipe.trunk_lr": POSITIVE,
    "encoder.recipe.weight_decay": NON_NEGATIVE,
    "encoder.recipe.feature_dropout": FRACTION,
    "encoder.covmatch_lr.image": Float(0, open_lo=True, optional=True),
    "encoder.covmatch_lr.text": Float(0, open_lo=True, optional=True),
    "encoder.covmatch_steps": Int(1, optional=True),
    "encoder.trajectory_lr.image": Float(0, open_lo=True, optional=True),
    "encoder.trajectory_lr.text": Float(0, open_lo=True, optional=True),
    "encoder.trajectory_lr.step_size": Float(0, open_lo=True, optional=True),
    "encoder.seed": Int(0, optional=True),
}
NORMALISE = Rule("list", item=Float(), lengths=(3,))
ENCODERS: dict[str, dict[str, Rule]] = {
    "open_clip_scratch": {},
    "timm_hf": {
        "encoder.image_mean": NORMALISE,
        "encoder.image_std": Rule("list", item=POSITIVE, lengths=(3,)),
        "encoder.image_weights": MAYBE_TEXT,
        "encoder.text_model": TEXT,
        "encoder.tokenizer": Rule("str", null=True, optional=True),
        "encoder.text_weights": BOOL,
        "encoder.context_length": COUNT,
    },
    "open_clip_pretrained": {
        "encoder.weights": MAYBE_TEXT,
        "encoder.quick_gelu": BOOL,
        "encoder.context_length": COUNT,
        "encoder.image_mean": Rule("list", item=Float(), lengths=(3,), optional=True),
        "encoder.image_std": Rule("list", item=POSITIVE, lengths=(3,), optional=True),
    },
}
DATASET_COMMON = {"dataset.name": TEXT, "dataset.reader": Choice(*DATASETS)}
ENCODER_COMMON["encoder.builder"] = Choice(*ENCODERS)
EXPERT = {
    "expert.num_experts": COUNT,
    "expert.epochs": COUNT,
    "expert.lr": POSITIVE,
    "expert.momentum": FRACTION,
    "expert.batch_size": Int(2),
    "expert.seed": Int(0),
    "expert.index": Int(0, null=True),
    "expert.lora": BOOL,
    "expert.lora_rank": COUNT,
    "expert.lora_alpha": POSITIVE,
    "expert.lora_targets": Rule("list", item=TEXT),
}
MTT = {
    "method.gradient": Choice("unroll", "first_order"),
    "method.student_loss": Choice(*LOSS_NAMES),
    "method.similarity": Choice("lowrank", "full", null=True),
    "method.iterations": Int(0),
    "method.syn_steps": COUNT,
    "method.expert_epochs": COUNT,
    "method.max_start_epoch": COUNT,
    "method.batch_syn": Int(2, null=True),
    "method.lr_img": POSITIVE,
    "method.lr_txt": POSITIVE,
    "method.lr_lr": NON_NEGATIVE,
    "method.lr_teacher": POSITIVE,
    "method.momentum": FRACTION,
    "method.min_step_size": Float(0, open_lo=True, null=True),
    "method.merge_loss_branches": BOOL,
    "method.inner_logit_scale": Float(0, open_lo=True, null=True),
    "method.init": Choice("real", "noise"),
    "method.eval_every": Int(0),
    "method.val_students": COUNT,
    "method.select": Choice("best_val", "last"),
    "method.checkpoint_every": Int(0),
    "method.buffer": MAYBE_TEXT,
    "method.lora": BOOL,
    "method.blend_alpha": Float(0, open_lo=True, null=True, optional=True),
}
LORS = {
    "method.sim_rank": COUNT,
    "method.sim_alpha": POSITIVE,
    "method.lr_sim": NON_NEGATIVE,
    "method.count_similarity_in_budget": BOOL,
}
# Dual-track clean-pair detection (conf/detection/dual_track.yaml), under method.dual (MDW)
# and method.robust.dual (robust CovMatch).
DUAL = {
    "folds": Int(2),
    "rounds": COUNT,
    "scorer_steps": COUNT,
    "scorer_batch": Int(2),
    "scorer_lr": POSITIVE,
    "scorer_trunk_lr": POSITIVE,
    "scorer_weight_decay": NON_NEGATIVE,
    "scorer_dropout": FRACTION,
    "comp_weight": NON_NEGATIVE,
    "threshold": PROBABILITY,
    "select_threshold": PROBABILITY,
    "eval_batch": Int(2),
}
MDW = {
    "method.soft_matrix": BOOL,
    "method.correspondence_maps": BOOL,
    "method.dual_track": BOOL,
    "method.clean_init": BOOL,
    "method.lr_sim": NON_NEGATIVE,
    "method.p_offdiag_init": NON_NEGATIVE,
    "method.similarity_budget": Choice("storage", "one_pair", "none"),
    "method.max_matrix_memory": Float(0, 1, open_lo=True),
    "method.map_topk": COUNT,
    "method.map_gamma": NON_NEGATIVE,
    "method.map_every": COUNT,
    **{f"method.dual.{k}": rule for k, rule in DUAL.items()},
}
COVMATCH = {
    "method.by_budget": Rule("custom", custom=_by_budget),
    "method.rho": Float(0, words=("auto",)),
    "method.lambda": Float(0, words=("auto",)),
    "method.steps": Int(0, words=("auto",)),
    "method.syn_batch": Int(2, words=("auto", "all")),
    "method.lr": POSITIVE,
    "method.lr_text": POSITIVE,
    "method.momentum": FRACTION,
    "method.real_batch": Int(2),
    "method.real_stats": Choice("auto", "batch", "full"),
    "method.init": Choice("random", "herding", "kcenter"),
    "method.rank": Int(0, words=("auto",)),
    "method.rank_by_budget": Rule("custom", custom=_rank_by_budget, optional=True),
    "method.within": Float(0),
    "method.bits": Rule("custom", custom=_bits),
    "method.reset_every": COUNT,
    "method.reset_to": Choice("fresh", "initial"),
    "method.proj_dim": COUNT,
    "method.checkpoint_every": COUNT,
    "method.log_every": COUNT,
    "method.online.optimizer": Choice("adamw", "sgd"),
    "method.online.lr": POSITIVE,
    "method.online.trunk_lr": POSITIVE,
    "method.online.weight_decay": NON_NEGATIVE,
    "method.online.momentum": FRACTION,
    "method.robust.enabled": BOOL,
    "method.robust.weighting": Choice("soft", "hard"),
    "method.robust.threshold": PROBABILITY,
    "method.robust.rescale_rho": BOOL,
    "method.robust.clean_init": BOOL,
    **{f"method.robust.dual.{k}": rule for k, rule in DUAL.items()},
}
METHODS: dict[str, dict[str, Rule]] = {
    "random": {},
    "herding": {},
    "kcenter": {"method.start": Choice("random", "mean")},
    "forgetting": {"method.epochs": COUNT, "method.batch_size": Int(2)},
    "mtt": {**MTT, **EXPERT},
    "mtt_lora": {**MTT, **EXPERT},
    "tesla": {**MTT, **EXPERT},
    "lors": {**MTT, **LORS, **EXPERT},
    "repblend": {**MTT, **LORS, **EXPERT},
    "mdw": {**MTT, **MDW, **EXPERT},
    "covmatch": COVMATCH,
    "covmatch_robust": COVMATCH,
    "covmatch_lowrank": COVMATCH,
    "covmatch_int8": COVMATCH,
}
LOGGERS: dict[str, dict[str, Rule]] = {
    "none": {},
    "tensorboard": {"logger.dir": TEXT},
    "wandb": {"logger.online": BOOL, "logger.project": TEXT, "logger.entity": MAYBE_TEXT},
}
VERBS: dict[str, dict[str, Rule]] = {
    "distill": {
        "monitor.val_every": Int(0),
        "monitor.val_students": Int(1),
        "budget.pairs": Int(1, null=True),
        "budget.ratio": Float(0, 1, open_lo=True, null=True),
        "method.name": Choice(*METHODS),
    },
    "train": {},
    "evaluate": {
        "source": TEXT,
        "transfer.resize": Choice(*TRANSFER_RESIZE, null=True),
        "transfer.texts": Choice(*TRANSFER_TEXTS),
    },
    "buffer": EXPERT,
}


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


def _get(tree: Mapping, key: str, default: Any = None) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def rules_for(tree: Mapping, verb: str) -> dict[str, Rule]:
    """The rules a composed config is checked against: its verb's and its group choices'."""
    rules: dict[str, Rule] = {**COMMON, "verb": Choice(verb)}
    rules.update(NOISES.get(str(_get(tree, "noise.name")), {}))
    rules.update(DATASET_COMMON)
    rules.update(DATASETS.get(str(_get(tree, "dataset.reader")), {}))
    rules.update(ENCODER_COMMON)
    rules.update(ENCODERS.get(str(_get(tree, "encoder.builder")), {}))
    rules["logger.name"] = Choice(*LOGGERS)
    rules.update(LOGGERS.get(str(_get(tree, "logger.name")), {}))
    rules.update(VERBS[verb])
    if verb == "distill":
        rules.update(METHODS.get(str(_get(tree, "method.name")), {}))
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
        "method.name",
        "logger.name",
    ):
        if key in rules:
            check_value(key, rules[key], _get(tree, key))
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
        if not rule.optional and _get(tree, key, MISSING) is MISSING:
            raise UserError(f"{key} is missing from the config; set {key}=...")
    _check_together(tree, verb)


def _check_together(tree: Mapping, verb: str) -> None:
    """Settings that are each valid but contradict each other."""
    if verb != "distill":
        return
    pairs, ratio = _get(tree, "budget.pairs"), _get(tree, "budget.ratio")
    if pairs is not None and ratio is not None:
        raise UserError(
            f"budget.pairs={pairs} and budget.ratio={ratio} are both set; give one of them"
        )
    if pairs is None and ratio is None:
        raise UserError("set budget.pairs (e.g. budget.pairs=100) or budget.ratio (e.g. 0.003)")
    method = str(_get(tree, "method.name"))
    if method in TRAJECTORY_METHODS:
        need = (
            int(_get(tree, "method.max_start_epoch")) - 1 + int(_get(tree, "method.expert_epochs"))
        )
        if int(_get(tree, "expert.epochs")) < need:
            raise UserError(
                f"expert.epochs={_get(tree, 'expert.epochs')} but method.max_start_epoch "
                f"{_get(tree, 'method.max_start_epoch')} + method.expert_epochs "
                f"{_get(tree, 'method.expert_epochs')} need {need}; raise expert.epochs or "
                "lower method.max_start_epoch"
            )
        counted = method in SIMILARITY_IN_BUDGET and bool(
            _get(tree, "method.count_similarity_in_budget")
        )
        if pairs is not None and int(pairs) - counted < 2:
            raise UserError(
                f"budget.pairs={pairs} leaves {int(pairs) - counted} synthetic pair(s); "
                f"{method} needs at least 2: raise budget.pairs"
            )
    if method in COVMATCH_METHODS:
        every, reset = _get(tree, "method.checkpoint_every"), _get(tree, "method.reset_every")
        if int(every) % int(reset):
            raise UserError(
                f"method.checkpoint_every={every} must be a multiple of method.reset_every="
                f"{reset} (checkpoints fall on online-model resets)"
            )
        syn_batch = _get(tree, "method.syn_batch")
        fixed = _number(syn_batch)
        if pairs is not None and fixed is not None and fixed > _number(pairs):
            raise UserError(
                f"method.syn_batch={syn_batch} is larger than the budget ({pairs} pairs); "
                "lower it or set method.syn_batch=all"
            )
