"""The settings of the encoder builders: what every encoder config has (trunks, heads, the
tuned student recipe, the step sizes it suggests to the methods) and each builder's own keys.

Light on purpose (no torch): the schema reads these rules before every job.
"""

from __future__ import annotations

from mmdistill.settings import (
    BOOL,
    COUNT,
    FRACTION,
    MAYBE_TEXT,
    NON_NEGATIVE,
    POSITIVE,
    TEXT,
    Choice,
    Float,
    Int,
    NoKeys,
    Rule,
    group,
    register,
    setting,
    settings,
)

HEADS = ("identity", "linear", "projection")
OPTIONAL_RATE = Float(0, open_lo=True, optional=True)
NORMALISE = Rule("list", item=Float(), lengths=(3,))
SPREAD = Rule("list", item=POSITIVE, lengths=(3,))


@settings
class Heads:
    """The student's projection heads on each trunk, and their output size."""

    image: str = setting(Choice(*HEADS))
    text: str = setting(Choice(*HEADS))
    dim: int = setting(COUNT)


@settings
class Recipe:
    """The student-training recipe tuned for this encoder (eval configs read it)."""

    steps: int = setting(COUNT)
    batch_size: int = setting(Int(2))
    lr: float = setting(POSITIVE)
    trunk_lr: float = setting(POSITIVE)
    weight_decay: float = setting(NON_NEGATIVE)
    feature_dropout: float = setting(FRACTION)


@settings
class PairRates:
    """Synthetic image and text step sizes an encoder suggests to CovMatch (all optional)."""

    image: float | None = setting(OPTIONAL_RATE)
    text: float | None = setting(OPTIONAL_RATE)


@settings
class TrajectoryRates(PairRates):
    """... and to trajectory matching, with its learned step size's learning rate."""

    step_size: float | None = setting(OPTIONAL_RATE)


@register("encoder.")
@settings
class Encoder:
    """What every encoder config has."""

    name: str = setting(TEXT)
    model_config: str = setting(TEXT)
    pretrained: bool = setting(BOOL)
    image_size: int = setting(Int(8))
    train_image_trunk: bool = setting(BOOL)
    train_text_trunk: bool = setting(BOOL)
    augment: bool = setting(BOOL)
    temperature: float = setting(POSITIVE)
    head: Heads = group(Heads)
    recipe: Recipe = group(Recipe)
    covmatch_lr: PairRates = group(PairRates)
    covmatch_steps: int | None = setting(Int(1, optional=True))
    trajectory_lr: TrajectoryRates = group(TrajectoryRates)
    seed: int | None = setting(Int(0, optional=True))


register("encoder.", "encoder.builder", "open_clip_scratch")(NoKeys)


@register("encoder.", "encoder.builder", "timm_hf")
@settings
class TimmHF:
    """A timm image trunk and a Hugging Face text trunk."""

    image_mean: list = setting(NORMALISE)
    image_std: list = setting(SPREAD)
    image_weights: str | None = setting(MAYBE_TEXT)
    text_model: str = setting(TEXT)
    tokenizer: str | None = setting(Rule("str", null=True, optional=True))
    text_weights: bool = setting(BOOL)
    context_length: int = setting(COUNT)


@register("encoder.", "encoder.builder", "open_clip_pretrained")
@settings
class OpenClipPretrained:
    """A pretrained open_clip model."""

    weights: str | None = setting(MAYBE_TEXT)
    quick_gelu: bool = setting(BOOL)
    context_length: int = setting(COUNT)
    image_mean: list | None = setting(Rule("list", item=Float(), lengths=(3,), optional=True))
    image_std: list | None = setting(Rule("list", item=POSITIVE, lengths=(3,), optional=True))
