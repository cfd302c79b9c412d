"""MDW (Dang et al., 2025, "Multi-Modal Dataset Distillation in the Wild"): noisy pairs in,
clean distilled pairs out. Only the abstract and a review are public, so this is our reading of
them (design/reference/covmatch-mdw-spec.md section 2); every component is a switch.

Base: TESLA trajectory matching (`mmdistill.methods.trajectory`, first-order gradient, learnable
step sizes), subclassed; the settings not listed here are TESLA's (conf/method/mdw.yaml).

* `soft_matrix` - a learnable soft correspondence matrix P over the distilled pairs: a full
  N x N matrix (`similarity.FullSimilarity`, trained with `lr_sim`) starting at the identity,
  off-diagonal entries at `p_offdiag_init` (1e-4) because the loss clamps P at 0 and a clamp
  passes no gradient to an entry sitting exactly at 0. The student loss is `soft_infonce`:
  cross-entropy in both directions against P's rows / columns, clamped at 0 and normalised
  (spec 2.2C's reading); an entry pushed below 0 is an exact 0 from then on. P is saved with
  the set and used by every evaluation student. Its storage counts against the budget
  (`similarity_budget: storage`: N + ceil(N^2 / floats per pair) <= budget.pairs; `one_pair`
  as LoRS counts its low-rank S; `none`). Off: identity targets and InfoNCE.
* `correspondence_maps` - correspondence-enhanced optimisation, pixel space only. Each
  iteration, a copy of the student at the expert's start parameters computes, for every
  synthetic image i and each of its top-`map_topk` texts j under P, a Grad-CAM map of the
  cosine similarity h(V_i, T_j): weights = spatial mean of dh/dA, map = ReLU(sum_c w_c A_c),
  scaled to [0, 1], up-sampled to the image size. A is the last spatial activation of the
  image trunk: the patch tokens entering a ViT's last block (a class-token ViT sends no
  gradient to the patch tokens of its last output; the tiny open_clip encoder has no conv
  feature map) or a conv net's last feature map before pooling (timm trunks: the output of
  `forward_features`; never the 1 x 1 output of a global pool); a trunk with neither uses the
  input-gradient saliency |dh/dV|. The maps are averaged with P's (clamped) weights into W_i,
  and the image gradient becomes (map_gamma + W_i) * grad before the optimiser step. In
  feature space there is no spatial map and the term is off (recorded in the set's meta).
* `dual_track` - the experts are trained by dual-track collaborative learning
  (`mdw_dual_track`: cross-fitted two-track GMM split of per-pair losses, co-teaching,
  complementary contrastive loss), cached under their own buffer key, and report clean-pair
  detection precision / recall against the run's noise mask (`noise.safetensors`); the scores
  go to the run folder (`detection.json`, meta.json) and the set's meta. Off: ordinary experts
  (the ones TESLA / LoRS use). `clean_init` (on with dual_track): the synthetic pairs start
  from random pairs of the dual-track clean set instead of random training pairs, about half
  of which are mismatched at ratio 0.5.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn

from mmdistill import io
from mmdistill.errors import UserError
from mmdistill.methods.base import DistillContext, expert_source
from mmdistill.methods.mdw_dual_track import DualTrackSettings, robust_buffer
from mmdistill.methods.trajectory import Synthetic, TrajectoryMatching
from mmdistill.models.student import SpatialMap
from mmdistill.training.experts import Buffer
from mmdistill.training.pairs import PairSet

log = logging.getLogger(__name__)
BUDGETS = ("storage", "one_pair", "none")
# Copies of P alive while distilling: the matrix, its gradient, momentum, the pre-step copy,
# the best-on-val copy and the checkpoint's.
MATRIX_COPIES = 6


class MDW(TrajectoryMatching):
    """TESLA + soft correspondence P + correspondence maps + dual-track experts."""

    def __init__(self, cfg: DictConfig) -> None:
        self.soft_matrix = bool(cfg.soft_matrix)
        self.maps = bool(cfg.correspondence_maps)
        self.dual_track = bool(cfg.dual_track)
        self.clean_init = bool(cfg.clean_init) and self.dual_track
        self.similarity_budget = str(cfg.similarity_budget)
        if self.similarity_budget not in BUDGETS:
            raise UserError(
                f"unknown method.similarity_budget {self.similarity_budget!r}; choose one of: "
                f"{', '.join(BUDGETS)}"
            )
        base = cfg.copy()
        with open_dict(base):
            base.similarity = "full" if self.soft_matrix else None
            base.student_loss = str(cfg.student_loss) if self.soft_matrix else "infonce"
        super().__init__(base)
        self.map_topk = int(cfg.map_topk)
        self.map_gamma = float(cfg.map_gamma)
        self.map_every = max(1, int(cfg.map_every))
        self._pair_floats = 1
        self._clean: Tensor | None = None
        self._robust: Buffer | None = None  # the dual-track experts, once built
        self._cam_student: nn.Module | None = None
        self._weights: Tensor | None = None
        self._calls = 0

    # ---------------------------------------------------------------------------- budget

    def budget(self, pairs: int) -> int:
        """Pairs left once P's storage is paid for (see similarity_budget)."""
        if not self.soft_matrix or self.similarity_budget == "none":
            return pairs
        if self.similarity_budget == "one_pair":
            return pairs - 1
        n = pairs
        while n > 1 and n + math.ceil(n * n / self._pair_floats) > pairs:
            n -= 1
        return n

    def _check_memory(self, ctx: DistillContext, n: int) -> None:
        """Stop with one line when P (and its copies) would not fit in free memory."""
        if not self.soft_matrix:
            return
        need = MATRIX_COPIES * n * n * 4
        if str(ctx.device).startswith("cuda"):
            free = torch.cuda.mem_get_info(torch.device(ctx.device))[0]
        else:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if need > float(self.cfg.max_matrix_memory) * free:
            raise UserError(
                f"budget.pairs={ctx.pairs} gives a {n} x {n} soft correspondence matrix that "
                f"needs {need / 2**30:.1f} GiB ({MATRIX_COPIES} copies while distilling), more "
                f"than {self.cfg.max_matrix_memory} of the {free / 2**30:.1f} GiB free on "
                f"{ctx.device}; lower budget.pairs or set method.soft_matrix=false"
            )

    # ----------------------------------------------------------------------------- setup

    def _init_data(self, ctx: DistillContext, n: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Random pairs of the dual-track clean set (random training pairs without it)."""
        if self._clean is None or not self.clean_init or str(self.cfg.init) != "real":
            return super()._init_data(ctx, n)
        gen = torch.Generator().manual_seed(ctx.seed)
        pool = torch.nonzero(self._clean).flatten()
        if len(pool) < n:
            raise UserError(
                f"the dual-track clean set holds {len(pool)} pairs, fewer than the {n} to "
                "distil; lower method.dual.select_threshold or set method.clean_init=false"
            )
        real = ctx.train.pairset(pool[torch.randperm(len(pool), generator=gen)[:n]])
        texts = real.texts
        if not texts.is_floating_point():  # token ids -> token embeddings of the frozen table
            with torch.no_grad():
                texts = ctx.encoder.text_trunk.embed_tokens(texts).float()
        return real.images.float(), texts, real.text_mask

    def _synthetic(self, ctx: DistillContext, n: int) -> Synthetic:
        """P = I, except that off-diagonal entries start at `p_offdiag_init` (> 0): the soft
        loss clamps P at 0, and a clamp passes no gradient to an entry sitting exactly there."""
        syn = super()._synthetic(ctx, n)
        if syn.similarity is not None:
            eps = float(self.cfg.p_offdiag_init)
            with torch.no_grad():
                syn.similarity.matrix.add_(eps * (1 - torch.eye(n, device=ctx.device)))
        return syn

    def _buffer(self, ctx: DistillContext) -> Buffer:
        """The dual-track experts when `dual_track` is on, else the ordinary buffer."""
        return self._robust if self._robust is not None else super()._buffer(ctx)

    # ------------------------------------------------------------- correspondence maps

    def grad_unroll(self, embed, layout, syn: Synthetic, start, target, batches) -> Tensor:
        loss = super().grad_unroll(embed, layout, syn, start, target, batches)
        self._modulate(embed, layout, syn, start)
        return loss

    def grad_first_order(self, embed, layout, syn: Synthetic, start, target, batches) -> Tensor:
        loss = super().grad_first_order(embed, layout, syn, start, target, batches)
        self._modulate(embed, layout, syn, start)
        return loss

    def _modulate(self, embed: nn.Module, layout, syn: Synthetic, start: Tensor) -> None:
        """Scale each synthetic image's gradient by (gamma + W), W its correspondence map."""
        if not self.maps or syn.images.dim() != 4 or syn.images.grad is None:
            return
        if self._weights is None or self._calls % self.map_every == 0:
            if self._cam_student is None:
                self._cam_student = copy.deepcopy(embed.student).eval()
            layout.load_into(self._cam_student, start)
            n = syn.images.shape[0]
            with torch.no_grad():
                p = (
                    syn.similarity(torch.arange(n, device=syn.images.device))
                    if syn.similarity is not None
                    else torch.eye(n, device=syn.images.device)
                )
            self._weights = correspondence_maps(
                self._cam_student,
                syn.images.detach(),
                syn.texts.detach(),
                syn.mask,
                p,
                self.map_topk,
            )
        self._calls += 1
        syn.images.grad.mul_(self.map_gamma + self._weights)

    # --------------------------------------------------------------------------- the run

    def distill(self, ctx: DistillContext) -> PairSet:
        self._pair_floats = ctx.train.images[0].numel() + ctx.train.texts[0].numel()
        if ctx.train.text_mask is not None:  # token text is stored as [L, E] embeddings
            self._pair_floats = ctx.train.images[0].numel() + ctx.train.texts.shape[1] * int(
                ctx.encoder.text_trunk.token_dim
            )
        n = self.budget(ctx.pairs)
        self._check_memory(ctx, n)
        info: dict[str, Any] = {
            "soft_matrix": self.soft_matrix,
            "similarity_budget": self.similarity_budget if self.soft_matrix else None,
            "correspondence_maps": self.maps
            if ctx.encoder.image_space == "pixel"
            else "off (feature space)",
            "dual_track": self.dual_track,
            "clean_init": self.clean_init,
        }
        if self.maps and ctx.encoder.image_space != "pixel":
            log.info("mdw: correspondence maps are off in feature space (no spatial map)")
        if not self.dual_track:
            pairs = super().distill(ctx)
        else:
            dual = DualTrackSettings.from_cfg(self.cfg.dual)
            mask = ctx.noise_mask
            true_clean = None
            if mask is not None and len(mask.pair_clean) == ctx.train.n_pairs:
                true_clean = mask.pair_clean
            rb = robust_buffer(expert_source(ctx), dual, true_clean)
            self._clean = rb.clean
            detection = {
                "clean_set": rb.scores,
                "against_noise_mask": true_clean is not None,
                "history": rb.detection.history,
                "buffer": str(rb.buffer.path),
            }
            io.write_json(ctx.run.path / "detection.json", detection)
            ctx.run.set(detection=rb.scores)
            log.info(
                "mdw: dual-track clean set %s",
                ", ".join(f"{k} {v:.3f}" for k, v in rb.scores.items()),
            )
            info["detection"] = rb.scores
            self._robust = rb.buffer
            pairs = super().distill(ctx)
        pairs.meta["mdw"] = info
        return pairs


# -------------------------------------------------------------------------- Grad-CAM maps


class _Activation:
    """Captures the image trunk's last spatial activation: the map a trunk marks with
    `SpatialMap` (timm conv nets: the output of `forward_features`), ViT patch tokens, or the
    last 4-D activation larger than 1 x 1 (a global pool's `C x 1 x 1` output is no map)."""

    def __init__(self, trunk: nn.Module) -> None:
        self.raw: Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self.handles = []
        visual = getattr(trunk, "visual", None)
        marked = [m for m in trunk.modules() if isinstance(m, SpatialMap)]
        if marked:
            self.handles.append(marked[-1].register_forward_hook(self._keep_spatial))
        elif visual is not None and hasattr(visual, "transformer") and hasattr(visual, "grid_size"):
            # The last block's input: a class-token ViT pools only token 0 of the last output,
            # so the patch tokens there get no gradient; one block earlier they do.
            self.grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
            last = visual.transformer.resblocks[-1]
            self.handles.append(last.register_forward_hook(self._keep_input))
        else:
            for m in trunk.modules():
                if not list(m.children()):
                    self.handles.append(m.register_forward_hook(self._keep_spatial))

    def _keep_input(self, module: nn.Module, inputs: Any, out: Tensor) -> None:
        self.raw = inputs[0]

    def _keep_spatial(self, module: nn.Module, inputs: Any, out: Any) -> None:
        if isinstance(out, Tensor) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1:
            self.raw = out

    def as_map(self, x: Tensor) -> Tensor:
        """The captured tensor (or its gradient) as `[N, C, h, w]`."""
        if self.grid is None:
            return x
        gh, gw = self.grid
        tokens = x[:, -gh * gw :]
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def correspondence_maps(
    student: nn.Module, images: Tensor, texts: Tensor, mask: Tensor | None, p: Tensor, k: int
) -> Tensor:
    """W `[N, 1, H, W]` in [0, 1]: P-weighted Grad-CAM maps of image i's top-k texts under P."""
    n = images.shape[0]
    k = max(1, min(k, n))
    weights, top = p.detach().clamp(min=0).topk(k, dim=1)
    total = weights.sum(dim=1, keepdim=True)
    uniform = torch.full_like(weights, 1 / k)
    weights = torch.where(total > 0, weights / total.clamp(min=1e-12), uniform)
    capture = _Activation(student.image_trunk)
    images = images.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            zi = student.encode_image(images)
            with torch.no_grad():
                zt = student.encode_text(texts, mask)
            sims = zi @ zt.T
            maps = torch.zeros(n, 1, *images.shape[-2:], device=images.device)
            for r in range(k):
                h = sims.gather(1, top[:, r : r + 1]).sum()
                if capture.raw is not None:
                    (g,) = torch.autograd.grad(h, capture.raw, retain_graph=True)
                    act, grad = capture.as_map(capture.raw.detach()), capture.as_map(g)
                    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True))
                else:  # no spatial activation: input-gradient saliency
                    (g,) = torch.autograd.grad(h, images, retain_graph=True)
                    cam = g.abs().sum(1, keepdim=True)
                cam = F.interpolate(
                    cam, size=images.shape[-2:], mode="bilinear", align_corners=False
                )
                cam = cam / cam.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)
                maps += weights[:, r, None, None, None] * cam
    finally:
        capture.close()
    return maps.detach()
