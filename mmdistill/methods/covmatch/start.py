"""Where CovMatch's synthetic pairs start, and how its texts read back as real captions."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdistill.errors import UserError
from mmdistill.methods.base import DistillContext
from mmdistill.methods.coresets import herding, joint_features, kcenter
from mmdistill.models.encoders import Encoder, Tokens
from mmdistill.models.student import is_text_features
from mmdistill.training.features import RealSplit

# Where the synthetic pairs start (`method.init`), besides random real pairs: a coreset of the
# joint (image, text) trunk features, so the matching starts from pairs that already cover them.
INITS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "herding": lambda x, k, gen: herding(x, k),
    "kcenter": lambda x, k, gen: kcenter(x, k, int(torch.randint(len(x), (1,), generator=gen))),
}


def init_synthetic(
    ctx: DistillContext, gen: torch.Generator, n: int, init: str, pool: Tensor | None = None
) -> dict[str, Tensor]:
    """Real pairs of `pool` (the clean pool, when given; else every pair): random ones, or
    the herding / k-center coreset that `method.init` names; pixels or image features,
    token embeddings or text features."""
    train, enc = ctx.train, ctx.encoder
    if pool is not None and len(pool) < n:
        raise UserError(
            f"the clean pool holds {len(pool)} pairs, fewer than the {n} to distil; "
            "lower method.robust.threshold or set method.robust.clean_init=false"
        )
    cand = torch.arange(train.n_pairs) if pool is None else pool
    if len(cand) < n:
        raise UserError(
            f"{n} synthetic pairs to start from {len(cand)} real ones; lower budget.pairs "
            "(a factorised or int8 set: raise method.rank or set method.bits=32, which "
            "fit fewer pairs)"
        )
    if init == "random":
        idx = cand[torch.randperm(len(cand), generator=gen)[:n]]
    else:
        idx = cand[INITS[init](joint_features(ctx)[cand], n, gen)]
    out = {"images": train.images[train.caption_image[idx]].float().clone(), "source": idx}
    if _token_text(train):
        _check_embeddable(enc)
        with torch.no_grad():
            out["texts"] = enc.text_trunk.embed_tokens(train.texts[idx]).float().clone()
        out["text_mask"] = train.text_mask[idx].clone()
    else:
        out["texts"] = train.texts[idx].float().clone()
    return out


def _token_text(train: RealSplit) -> bool:
    return not is_text_features(train.texts)


def _check_embeddable(enc: Encoder) -> None:
    """Token-space text needs a text trunk that reads token-embedding sequences."""
    try:
        with torch.no_grad():
            enc.text_trunk.embed_tokens(torch.zeros(1, 1, dtype=torch.long))
    except NotImplementedError:
        raise UserError(
            f"encoder {enc.name}'s text trunk cannot read token embeddings, so CovMatch cannot "
            "train it; set encoder.train_text_trunk=false (feature-space text)"
        ) from None


@torch.no_grad()
def nearest_captions(
    enc: Encoder, train: RealSplit, texts: Tensor, mask: Tensor | None, device: str
) -> list[int]:
    """Each synthetic text read back as the real training caption nearest by cosine.

    Token-embedding texts are compared through the encoder's shared text trunk (the same trunk
    embeds the real captions); feature texts directly with the real caption features.
    """
    if mask is None:
        syn, real = texts, train.texts.float()
    else:
        trunk = enc.text_trunk.to(device)
        syn = torch.cat(
            [
                trunk(texts[s : s + 256].to(device), mask[s : s + 256].to(device)).cpu()
                for s in range(0, len(texts), 256)
            ]
        )
        real = torch.cat(
            [
                enc.encode_texts(
                    Tokens(
                        train.texts[s : s + 256].to(device), train.text_mask[s : s + 256].to(device)
                    )
                ).cpu()
                for s in range(0, train.n_pairs, 256)
            ]
        )
    sim = F.normalize(syn.float(), dim=-1) @ F.normalize(real.float(), dim=-1).T
    return sim.argmax(1).tolist()
