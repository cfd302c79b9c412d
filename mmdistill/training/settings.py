"""The settings of the training floor's units: the evaluation protocol (`eval.*`), the expert
trajectories (`expert.*`), the budget, the distill run's val monitor and the transfer of a
distilled set to another encoder.

Light on purpose (no torch): the schema reads these rules before every job.
"""

from __future__ import annotations

from mmdistill.schema import LOSS_NAMES
from mmdistill.settings import (
    BOOL,
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    TEXT,
    Choice,
    Float,
    Int,
    Rule,
    register,
    setting,
    settings,
)

# A learning rate that may also be the set's learned step sizes.
LEARNED_RATE = Float(0, open_lo=True, words=("learned", "learned_image"))
# How `evaluate encoder=<other>` may resize distilled pixels (training/transfer.py).
TRANSFER_RESIZE = ("bicubic", "bilinear")
# Whether it keeps texts that both text trunks read alike (auto) or decodes them all.
TRANSFER_TEXTS = ("auto", "decode")


@register("eval.")
@settings
class Protocol:
    """The evaluation protocol: K fresh students, their recipe, checkpoint selection."""

    name: str = setting(TEXT)
    students: int = setting(COUNT)
    steps: int = setting(COUNT)
    batch_size: int = setting(Int(2))
    optimizer: str = setting(Choice("adamw", "sgd"))
    lr: float | str = setting(LEARNED_RATE)
    trunk_lr: float | str = setting(LEARNED_RATE)
    weight_decay: float = setting(NON_NEGATIVE)
    momentum: float = setting(FRACTION)
    feature_dropout: float = setting(FRACTION)
    schedule: str = setting(Choice("cosine", "multistep", "none"))
    selection: str = setting(Choice("final", "best_val", "best_test"))
    eval_every: int = setting(COUNT)
    loss: str = setting(Choice("auto", *LOSS_NAMES))
    workers: int | str | None = setting(Int(1, words=("auto",), optional=True))
    together: bool | str | None = setting(Rule("bool", words=("auto",), optional=True))
    split: str | None = setting(Choice("test", "val", optional=True))


@register("expert.", "verb", "buffer")
@settings
class Experts:
    """The expert trajectories trajectory matching reads (and `mmdistill buffer` writes)."""

    num_experts: int = setting(COUNT)
    epochs: int = setting(COUNT)
    lr: float = setting(POSITIVE)
    momentum: float = setting(FRACTION)
    batch_size: int = setting(Int(2))
    seed: int = setting(Int(0))
    index: int | None = setting(Int(0, null=True))
    lora: bool = setting(BOOL)
    lora_rank: int = setting(COUNT)
    lora_alpha: float = setting(POSITIVE)
    lora_targets: list = setting(Rule("list", item=TEXT))


@register("monitor.", "verb", "distill")
@settings
class Monitor:
    """Val checks of a distill run's set while it is made."""

    val_every: int = setting(Int(0))
    val_students: int = setting(Int(1))


@register("budget.", "verb", "distill")
@settings
class Budget:
    """The size of the distilled set: a pair count or a fraction of the real pairs."""

    pairs: int | None = setting(Int(1, null=True))
    ratio: float | None = setting(Float(0, 1, open_lo=True, null=True))


@register("", "verb", "evaluate")
@settings
class Source:
    """The run folder `mmdistill evaluate` reads the set from."""

    source: str = setting(TEXT)


@register("transfer.", "verb", "evaluate")
@settings
class Transfer:
    """How a set distilled with one encoder is read by another."""

    resize: str | None = setting(Choice(*TRANSFER_RESIZE, null=True))
    texts: str = setting(Choice(*TRANSFER_TEXTS))
