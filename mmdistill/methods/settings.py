"""The settings of every method family, registered under `method.family=<family>`.

A method preset (conf/method/<name>.yaml) names its family; the family's settings class gives
the schema its keys, and the checks between keys that are each valid alone
(`check_together`). Light on purpose (no torch): the schema reads these before every job, and
importing this module registers every unit's settings (it imports the lower floors' too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmdistill import loggers as _loggers  # noqa: F401  (registers the loggers' settings)
from mmdistill.data import settings as _data  # noqa: F401  (registers the data floor's units)
from mmdistill.errors import UserError
from mmdistill.models import settings as _models  # noqa: F401  (registers the encoders')
from mmdistill.schema import LOSS_NAMES
from mmdistill.settings import (
    BOOL,
    COUNT,
    FRACTION,
    MAYBE_TEXT,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    TEXT,
    Choice,
    Float,
    Int,
    Rule,
    check_value,
    get,
    group,
    number,
    register,
    setting,
    settings,
    shown,
)
from mmdistill.training.settings import Experts

FAMILY = "method.family"


@register("method.", "verb", "distill")
@settings
class Preset:
    """What every method preset has: its label (results, tables, run folders) and the family
    of code it runs."""

    name: str = setting(TEXT)


def _bits(key: str, value: Any) -> None:
    """How a set stores its rows: float32, float16 or int8 codes (training.storage.ROWS)."""
    if isinstance(value, bool) or value not in (32, 16, 8):
        raise UserError(f"{key}={shown(value)} is not a valid choice; choose one of: 32, 16, 8")


BITS = Rule("custom", custom=_bits)


@register("method.", FAMILY, "herding")
@register("method.", FAMILY, "random")  # applied first: the families list in this order
@settings
class Coreset:
    """What every coreset has: how its real rows are stored (fewer bits, more pairs)."""

    bits: int = setting(BITS)


@register("method.", FAMILY, "kcenter")
@settings
class KCenter(Coreset):
    """K-center cover: where the greedy cover starts."""

    start: str = setting(Choice("random", "mean"))


@register("method.", FAMILY, "forgetting")
@settings
class Forgetting(Coreset):
    """Forgetting events counted over a student's epochs on all real pairs."""

    epochs: int = setting(COUNT)
    batch_size: int = setting(Int(2))


@settings
class Trajectory:
    """Trajectory matching (MTT-VL, TESLA) against expert trajectories."""

    gradient: str = setting(Choice("unroll", "first_order"))
    student_loss: str = setting(Choice(*LOSS_NAMES))
    similarity: str | None = setting(Choice("lowrank", "full", null=True))
    iterations: int = setting(Int(0))
    syn_steps: int = setting(COUNT)
    expert_epochs: int = setting(COUNT)
    max_start_epoch: int = setting(COUNT)
    batch_syn: int | None = setting(Int(2, null=True))
    lr_img: float = setting(POSITIVE)
    lr_txt: float = setting(POSITIVE)
    lr_lr: float = setting(NON_NEGATIVE)
    lr_teacher: float = setting(POSITIVE)
    momentum: float = setting(FRACTION)
    min_step_size: float | None = setting(Float(0, open_lo=True, null=True))
    merge_loss_branches: bool = setting(BOOL)
    inner_logit_scale: float | None = setting(Float(0, open_lo=True, null=True))
    init: str = setting(Choice("real", "noise"))
    eval_every: int = setting(Int(0))
    val_students: int = setting(COUNT)
    select: str = setting(Choice("best_val", "last"))
    checkpoint_every: int = setting(Int(0))
    buffer: str | None = setting(MAYBE_TEXT)
    lora: bool = setting(BOOL)
    blend_alpha: float | None = setting(Float(0, open_lo=True, null=True, optional=True))

    @staticmethod
    def check_together(tree: Mapping, pairs: Any) -> None:
        """The experts must be long enough for the epochs matched, and the budget must leave
        two synthetic pairs once a learned similarity that counts as one is taken out."""
        need = int(get(tree, "method.max_start_epoch")) - 1 + int(get(tree, "method.expert_epochs"))
        if int(get(tree, "expert.epochs")) < need:
            raise UserError(
                f"expert.epochs={get(tree, 'expert.epochs')} but method.max_start_epoch "
                f"{get(tree, 'method.max_start_epoch')} + method.expert_epochs "
                f"{get(tree, 'method.expert_epochs')} need {need}; raise expert.epochs or "
                "lower method.max_start_epoch"
            )
        counted = bool(get(tree, "method.count_similarity_in_budget", False))
        if pairs is not None and int(pairs) - counted < 2:
            raise UserError(
                f"budget.pairs={pairs} leaves {int(pairs) - counted} synthetic pair(s); "
                f"{get(tree, 'method.name')} needs at least 2: raise budget.pairs"
            )


@settings
class LearnedSimilarity(Trajectory):
    """LoRS (and RepBlend): trajectory matching plus a learned low-rank target similarity,
    which may count as one pair of the budget."""

    sim_rank: int = setting(COUNT)
    sim_alpha: float = setting(POSITIVE)
    lr_sim: float = setting(NON_NEGATIVE)
    count_similarity_in_budget: bool = setting(BOOL)


@settings
class DualTrack:
    """Dual-track clean-pair detection (conf/detection/dual_track.yaml), under method.dual
    (MDW) and method.robust.dual (robust CovMatch)."""

    folds: int = setting(Int(2))
    rounds: int = setting(COUNT)
    scorer_steps: int = setting(COUNT)
    scorer_batch: int = setting(Int(2))
    scorer_lr: float = setting(POSITIVE)
    scorer_trunk_lr: float = setting(POSITIVE)
    scorer_weight_decay: float = setting(NON_NEGATIVE)
    scorer_dropout: float = setting(FRACTION)
    comp_weight: float = setting(NON_NEGATIVE)
    threshold: float = setting(PROBABILITY)
    select_threshold: float = setting(PROBABILITY)
    eval_batch: int = setting(Int(2))


@settings
class Wild(Trajectory):
    """MDW: TESLA with a soft correspondence matrix, correspondence maps and dual-track
    robust experts, each a switch."""

    soft_matrix: bool = setting(BOOL)
    correspondence_maps: bool = setting(BOOL)
    dual_track: bool = setting(BOOL)
    clean_init: bool = setting(BOOL)
    lr_sim: float = setting(NON_NEGATIVE)
    p_offdiag_init: float = setting(NON_NEGATIVE)
    similarity_budget: str = setting(Choice("storage", "one_pair", "none"))
    max_matrix_memory: float = setting(Float(0, 1, open_lo=True))
    map_topk: int = setting(COUNT)
    map_gamma: float = setting(NON_NEGATIVE)
    map_every: int = setting(COUNT)
    dual: DualTrack = group(DualTrack)


for _family, _cls in (("trajectory", Trajectory), ("lors", LearnedSimilarity), ("mdw", Wild)):
    register("method.", FAMILY, _family)(_cls)
    register("expert.", FAMILY, _family)(Experts)


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


@settings
class Online:
    """CovMatch's online student: its contrastive step between synthetic updates."""

    optimizer: str = setting(Choice("adamw", "sgd"))
    lr: float = setting(POSITIVE)
    trunk_lr: float = setting(POSITIVE)
    weight_decay: float = setting(NON_NEGATIVE)
    momentum: float = setting(FRACTION)


@settings
class Robust:
    """Noise-robust CovMatch: real statistics weighted by each pair's clean probability."""

    enabled: bool = setting(BOOL)
    weighting: str = setting(Choice("soft", "hard"))
    threshold: float = setting(PROBABILITY)
    rescale_rho: bool = setting(BOOL)
    clean_init: bool = setting(BOOL)
    dual: DualTrack = group(DualTrack)


@register("method.", FAMILY, "covmatch")
@settings
class CovMatch:
    """CovMatch and its variants (robust, low-rank, int8): covariance and mean matching."""

    by_budget: dict = setting(Rule("custom", custom=_by_budget))
    rho: float | str = setting(Float(0, words=("auto",)))
    lam: float | str = setting(Float(0, words=("auto",)), key="lambda")
    steps: int | str = setting(Int(0, words=("auto",)))
    syn_batch: int | str = setting(Int(2, words=("auto", "all")))
    lr: float = setting(POSITIVE)
    lr_text: float = setting(POSITIVE)
    momentum: float = setting(FRACTION)
    real_batch: int = setting(Int(2))
    real_stats: str = setting(Choice("auto", "batch", "full"))
    init: str = setting(Choice("random", "herding", "kcenter"))
    rank: int | str = setting(Int(0, words=("auto",)))
    rank_by_budget: dict | None = setting(Rule("custom", custom=_rank_by_budget, optional=True))
    within: float = setting(Float(0))
    bits: int = setting(BITS)
    reset_every: int = setting(COUNT)
    reset_to: str = setting(Choice("fresh", "initial"))
    proj_dim: int = setting(COUNT)
    checkpoint_every: int = setting(COUNT)
    log_every: int = setting(COUNT)
    online: Online = group(Online)
    robust: Robust = group(Robust)

    @staticmethod
    def check_together(tree: Mapping, pairs: Any) -> None:
        """Checkpoints fall on online-model resets, and a fixed synthetic batch fits the
        budget."""
        every, reset = get(tree, "method.checkpoint_every"), get(tree, "method.reset_every")
        if int(every) % int(reset):
            raise UserError(
                f"method.checkpoint_every={every} must be a multiple of method.reset_every="
                f"{reset} (checkpoints fall on online-model resets)"
            )
        syn_batch = get(tree, "method.syn_batch")
        fixed = number(syn_batch)
        if pairs is not None and fixed is not None and fixed > number(pairs):
            raise UserError(
                f"method.syn_batch={syn_batch} is larger than the budget ({pairs} pairs); "
                "lower it or set method.syn_batch=all"
            )
