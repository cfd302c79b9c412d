"""Trajectory matching: MTT-VL (full unroll), TESLA (first-order, constant memory), LoRS.

One outer iteration (Wu et al.; Xu et al.): pick an expert and a start epoch s, start a student
at the expert's theta*_s, take `syn_steps` SGD steps on synthetic mini-batches with learnable
per-branch step sizes, and match the result to theta*_{s+R}:

    L = sum_branch ||theta_hat - theta*_{s+R}||^2 / ||theta*_s - theta*_{s+R}||^2

(`merge_loss_branches`: one ratio of the summed distances). The matched vector is every
trainable student parameter (heads in feature space, trunks + heads in pixel space, LoRA
adapters + heads with `lora`), run through `torch.func.functional_call` from a flat vector.

* `gradient: unroll` (MTT-VL) back-propagates through all unrolled steps: memory grows with
  `syn_steps`.
* `gradient: first_order` (TESLA, as LoRS uses it) unrolls once without a graph to get
  theta_hat and G = sum_i g_i, then replays the steps, each time rebuilding only step i's graph
  and back-propagating its closed-form share  -alpha * dL/dtheta_hat . g_i;  the step sizes get
  -dL/dtheta_hat . G. Memory stays flat in `syn_steps`; the dependence of theta_i on earlier
  synthetic batches is dropped (so with one step it equals the unrolled gradient exactly).
* LoRS adds a learned target similarity S over the synthetic pairs (low-rank, S = I at start)
  and trains the inner student with the weighted BCE against S; S is saved with the set.

Synthetic data live where the student's trainable part reads them: frozen-trunk features in
feature space, pixels for a trained image trunk, token-embedding sequences `[N, L, E]` with a
fixed mask for a trained text trunk.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmdistill.errors import UserError
from mmdistill.methods.base import (
    DistillContext,
    expert_source,
    out_of_range,
    sane_bounds,
    val_r_mean,
)
from mmdistill.methods.loop import Diverged, OuterLoop, Schedule, Task
from mmdistill.methods.trajectory_set import Synthetic, _Embed
from mmdistill.models.lora import LoraSettings
from mmdistill.training.experts import Buffer, ParamLayout, build_student
from mmdistill.training.losses import LOSSES
from mmdistill.training.pairs import PairSet
from mmdistill.training.similarity import build_similarity
from mmdistill.training.trainer import FiniteCheck

log = logging.getLogger(__name__)
GRADIENTS = ("unroll", "first_order")
CHECKPOINT = "trajectory"


class _Matching(Task):
    """One trajectory-matching run inside the shared outer loop: what it carries between
    iterations, and its checkpoint."""

    checkpoint = CHECKPOINT

    def __init__(
        self,
        method: TrajectoryMatching,
        ctx: DistillContext,
        buffer: Buffer,
        experts: list[int],
        embed: _Embed,
        layout: ParamLayout,
        syn: Synthetic,
        meta: dict[str, Any],
    ) -> None:
        self.m, self.ctx, self.name = method, ctx, method.name
        self.buffer, self.experts, self.embed, self.layout = buffer, experts, embed, layout
        self.syn, self.meta = syn, meta
        self.total = ctx.steps(method.iterations)
        self.opt = method._optimizer(syn)
        self.gen = torch.Generator().manual_seed(ctx.seed)
        self.best: dict[str, Tensor] | None = None
        self.before: dict[str, Tensor] = {}  # the set before the current iteration
        self.last_loss: float | None = None
        self.state: dict[str, Any] = {
            "iteration": 0,
            "best_val": None,
            "best_iteration": None,
            "best_wall": None,
            "val_history": [],  # [iteration, val r_mean, seconds since the start]
            "loss_history": [],
            "seconds": 0.0,  # matching iterations only
            "wall": 0.0,  # iterations + val checks: the time a user waits
        }
        self.clock = time.perf_counter()

    def parameters(self) -> dict[str, Tensor]:
        return self.syn.tensors()

    def step(self, at: int, check: FiniteCheck) -> dict[str, Any] | None:
        it, state, total = at + 1, self.state, self.total
        t0 = time.perf_counter()
        loss = self.m._iteration(self.ctx, self, it)
        state["seconds"] += time.perf_counter() - t0
        state["iteration"] = it
        self.last_loss = loss
        if not (it % max(1, total // 100) == 0 or it == total):
            return None
        state["loss_history"].append([it, loss])
        return {
            "step": it,
            "wall": time.perf_counter() - self.clock,
            "loss": loss,
            "step_image": self.syn.step_image.item(),
            "step_text": self.syn.step_text.item(),
        }

    def needs_start_val(self, start: int) -> bool:
        return not self.state["val_history"]

    def validate(self, done: int) -> dict[str, Any] | None:
        state = self.state
        score = self.m._val_score(self.ctx, self.syn.pairset(self.m.loss_name, self.meta))
        wall = time.perf_counter() - self.clock
        state["val_history"].append([done, score, wall])
        if score is not None and (state["best_val"] is None or score > state["best_val"]):
            state.update(best_val=score, best_iteration=done, best_wall=wall)
            self.best = self.syn.snapshot()
        if self.last_loss is not None:
            shown = "diverged" if score is None else f"{score:.2f}"
            log.info("%s it %d: match %.4f, val r_mean %s", self.name, done, self.last_loss, shown)
        return None if score is None else {"step": done, "wall": wall, "val_r_mean": score}

    def saved_state(self, done: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        self.state["wall"] = time.perf_counter() - self.clock
        tensors = {f"syn.{k}": v for k, v in self.syn.snapshot().items()}
        if self.best is not None:
            tensors.update({f"best.{k}": v for k, v in self.best.items()})
        tensors["generator"] = self.gen.get_state()
        return tensors, self.state

    def load(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> int:
        self.state = state
        self.syn.restore(_prefixed(tensors, "syn."))
        self.best = _prefixed(tensors, "best.") or None
        self.gen.set_state(tensors["generator"])
        self.clock = time.perf_counter() - state["wall"]
        log.info("resuming from iteration %d", state["iteration"])
        return int(state["iteration"])

    def last_good(
        self, saved: tuple[dict[str, Tensor], dict] | None, step: int
    ) -> tuple[PairSet, int]:
        """The last checkpoint's set; before the first, the set before this iteration."""
        at = step - 1
        if saved is None:
            self.syn.restore(self.before)
        else:
            self.syn.restore(_prefixed(saved[0], "syn."))
            at = int(saved[1]["iteration"])
        return self.syn.pairset(self.m.loss_name, self.meta), at

    def stop_message(self, step: int, what: str, good: int, path: Path) -> str:
        m = self.m
        knob = "method.lr_txt" if "texts" in what else "method.lr_img"
        return (
            f"{m.name} stopped at iteration {step}: {what}; the last good set "
            f"(iteration {good}) is saved as {path}, marked partial; lower method.lr_img / "
            f"method.lr_txt (now {m.cfg.lr_img} / {m.cfg.lr_txt}) or method.lr_lr and "
            f"continue with resume={self.ctx.run.path} {knob}=..."
        )


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class TrajectoryMatching:
    """MTT-VL / TESLA / LoRS; which one is config (gradient, similarity, student_loss)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.name = str(cfg.name)
        self.gradient = str(cfg.gradient)
        if self.gradient not in GRADIENTS:
            raise UserError(
                f"unknown method.gradient {self.gradient!r}; choose one of: {', '.join(GRADIENTS)}"
            )
        self.loss_name = str(cfg.student_loss)
        self.loss_fn = LOSSES.get(self.loss_name)
        self.similarity_kind = cfg.get("similarity") or None
        blend_alpha = cfg.get("blend_alpha")
        self.blend_alpha = None if blend_alpha is None else float(blend_alpha)
        if self.blend_alpha is not None and self.blend_alpha <= 0:
            raise UserError(f"method.blend_alpha={blend_alpha} must be > 0 (RepBlend: 1.0)")
        self.iterations, self.eval_every = int(cfg.iterations), int(cfg.eval_every)
        self.checkpoint_every, self.select = int(cfg.checkpoint_every), str(cfg.select)
        self.syn_steps = int(cfg.syn_steps)
        self.expert_epochs = int(cfg.expert_epochs)
        self.max_start_epoch = int(cfg.max_start_epoch)
        if self.syn_steps < 1 or self.expert_epochs < 1 or self.max_start_epoch < 1:
            raise UserError("method.syn_steps, expert_epochs and max_start_epoch must be >= 1")

    # ---------------------------------------------------------------------------- setup

    def budget(self, pairs: int) -> int:
        """LoRS counts its similarity parameters as one pair of the budget (N-1 pairs)."""
        if self.similarity_kind and bool(self.cfg.get("count_similarity_in_budget", False)):
            return pairs - 1
        return pairs

    def _init_data(self, ctx: DistillContext, n: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Random real pairs (the papers' init), in the space the student's trainable part reads."""
        gen = torch.Generator().manual_seed(ctx.seed)
        idx = torch.randperm(ctx.train.n_pairs, generator=gen)[:n]
        real = ctx.train.pairset(idx)
        images, texts, mask = real.images.float(), real.texts, real.text_mask
        if not texts.is_floating_point():  # token ids -> token embeddings of the frozen table
            with torch.no_grad():
                texts = ctx.encoder.text_trunk.embed_tokens(texts).float()
        if str(self.cfg.init) == "noise":
            images = _noise_like(images, gen)
            texts = _noise_like(texts, gen)
        elif str(self.cfg.init) != "real":
            raise UserError(f"unknown method.init {self.cfg.init!r}; choose real or noise")
        return images, texts, mask

    def _experts(self, buf: Buffer, layout: ParamLayout, num_experts: int) -> list[int]:
        wanted = list(range(num_experts))
        need = self.max_start_epoch - 1 + self.expert_epochs
        for i in wanted:
            if buf.layout(i) != layout:
                raise UserError(
                    f"expert {i} in {buf.path} trained other parameters than this student "
                    "(different encoder or LoRA settings); rebuild the buffer"
                )
            if buf.epochs(i) < need:
                raise UserError(
                    f"expert {i} has {buf.epochs(i)} epochs but max_start_epoch "
                    f"{self.max_start_epoch} + expert_epochs {self.expert_epochs} need {need}; "
                    "raise expert.epochs or lower method.max_start_epoch"
                )
        return wanted

    # ------------------------------------------------------------------------ the math

    def _inner_loss(
        self, embed: _Embed, layout: ParamLayout, theta: Tensor, idx: Tensor, data: tuple
    ) -> Tensor:
        images, texts, mask, similarity = data
        params = {f"student.{k}": v for k, v in layout.unflatten(theta).items()}
        m = None if mask is None else mask[idx]
        batch_images, batch_texts = images[idx], texts[idx]
        if self.blend_alpha is not None:
            batch_images, batch_texts = blend(batch_images, batch_texts, self.blend_alpha)
        zi, zt = functional_call(embed, params, (batch_images, batch_texts, m))
        logits = self.logit_scale * zi @ zt.T
        targets = None if similarity is None else similarity(idx)
        return self.loss_fn(logits, targets)

    def _branch_terms(
        self, theta: Tensor, start: Tensor, target: Tensor, slices: dict[str, slice]
    ) -> list[tuple[slice, Tensor, Tensor]]:
        out = []
        for sl in slices.values():
            if sl.stop == sl.start:
                continue
            dist = (theta[sl] - target[sl]).pow(2).sum()
            norm = (start[sl] - target[sl]).pow(2).sum().clamp(min=1e-12)
            out.append((sl, dist, norm))
        return out

    def matching_loss(
        self, theta: Tensor, start: Tensor, target: Tensor, slices: dict[str, slice]
    ) -> Tensor:
        terms = self._branch_terms(theta, start, target, slices)
        if bool(self.cfg.merge_loss_branches):
            return sum(t[1] for t in terms) / sum(t[2] for t in terms)
        return sum(d / n for _, d, n in terms)

    def _matching_grad(self, theta: Tensor, start: Tensor, target: Tensor, slices) -> Tensor:
        """dL/dtheta_hat in closed form (no graph), for the first-order gradient."""
        coef = torch.zeros_like(theta)
        terms = self._branch_terms(theta, start, target, slices)
        total = sum(t[2] for t in terms)
        for sl, _, norm in terms:
            denom = total if bool(self.cfg.merge_loss_branches) else norm
            coef[sl] = 2 * (theta[sl] - target[sl]) / denom
        return coef

    def step_vector(self, syn: Synthetic, layout: ParamLayout) -> Tensor:
        n_img, n_txt = layout.branch_numel("image"), layout.branch_numel("text")
        return torch.cat([syn.step_image.expand(n_img), syn.step_text.expand(n_txt)])

    def grad_unroll(
        self, embed, layout, syn: Synthetic, start: Tensor, target: Tensor, batches
    ) -> Tensor:
        """MTT-VL: differentiate the matching loss through every unrolled step."""
        data = (syn.images, syn.texts, syn.mask, syn.similarity)
        steps = self.step_vector(syn, layout).to(start.device)
        theta = start.clone().requires_grad_(True)
        with _double_backward_attention():
            for idx in batches:
                loss = self._inner_loss(embed, layout, theta, idx, data)
                (g,) = torch.autograd.grad(loss, theta, create_graph=True)
                theta = theta - steps * g
        loss = self.matching_loss(theta, start, target, layout.branch_slices())
        if torch.isfinite(loss):
            torch.autograd.backward(loss, inputs=list(syn.tensors().values()))
        return loss.detach()

    def grad_first_order(
        self, embed, layout, syn: Synthetic, start: Tensor, target: Tensor, batches
    ) -> Tensor:
        """TESLA: constant memory in syn_steps; replays each step to push its share back."""
        slices = layout.branch_slices()
        steps = self.step_vector(syn, layout).detach().to(start.device)
        sim = syn.similarity
        frozen = (
            syn.images.detach(),
            syn.texts.detach(),
            syn.mask,
            None if sim is None else (lambda i: sim(i).detach()),
        )
        rng = _rng_state(start.device)  # replay identical dropout masks in the second pass
        theta, total = start.clone(), torch.zeros_like(start)
        # No double backward in this pass: a GPU may use its fused attention kernels here.
        with _first_pass_attention(start.device):
            for idx in batches:
                theta.requires_grad_(True)
                loss = self._inner_loss(embed, layout, theta, idx, frozen)
                (g,) = torch.autograd.grad(loss, theta)
                total += g
                theta = (theta - steps * g).detach()
        with torch.no_grad():
            loss = self.matching_loss(theta, start, target, slices)
            coef = self._matching_grad(theta, start, target, slices)
        if not torch.isfinite(loss):
            return loss
        _set_rng_state(start.device, rng)
        live = (syn.images, syn.texts, syn.mask, sim)
        inputs = [syn.images, syn.texts] + ([] if sim is None else list(sim.parameters()))
        theta = start.clone()
        back = -steps * coef
        with _double_backward_attention():
            for idx in batches:
                theta.requires_grad_(True)
                inner = self._inner_loss(embed, layout, theta, idx, live)
                (g,) = torch.autograd.grad(inner, theta, create_graph=True)
                torch.autograd.backward((back * g).sum(), inputs=inputs)
                theta = (theta - steps * g.detach()).detach()
        for name, step in (("image", syn.step_image), ("text", syn.step_text)):
            sl = slices[name]
            grad = -(coef[sl] * total[sl]).sum().to(step.device)
            step.grad = grad if step.grad is None else step.grad + grad
        return loss

    # --------------------------------------------------------------------------- the loop

    def _check(self, ctx: DistillContext, n: int) -> None:
        if n < 2:
            raise UserError(f"{self.name} needs at least 2 synthetic pairs; raise budget.pairs")
        if ctx.expert is None:
            raise UserError(f"{self.name} needs the expert settings (conf/expert); compose them")
        frozen = ctx.encoder.image_space == "feature" and ctx.encoder.text_space == "feature"
        if self.blend_alpha is not None and not frozen:
            raise UserError(
                f"{self.name} blends frozen-trunk features and matches only the projections, "
                f"but encoder {ctx.encoder.name} trains a trunk; set "
                "encoder.train_image_trunk=false encoder.train_text_trunk=false"
            )
        need = self.max_start_epoch - 1 + self.expert_epochs
        if int(ctx.expert.epochs) < need:
            raise UserError(
                f"expert.epochs={ctx.expert.epochs} but max_start_epoch "
                f"{self.max_start_epoch} + expert_epochs {self.expert_epochs} need {need}; "
                "raise expert.epochs or lower method.max_start_epoch"
            )

    def _buffer(self, ctx: DistillContext) -> Buffer:
        """The expert trajectories to match: the cached buffer for this data, encoder and
        expert settings, its missing experts trained first (MDW supplies its own)."""
        return expert_source(ctx).buffer(explicit=self.cfg.get("buffer"))

    def _synthetic(self, ctx: DistillContext, n: int) -> Synthetic:
        images, texts, mask = self._init_data(ctx, n)
        similarity, sim_args = None, {}
        if self.similarity_kind:
            sim_args = {"kind": str(self.similarity_kind), "n": n}
            if self.similarity_kind == "lowrank":
                sim_args.update(rank=int(self.cfg.sim_rank), alpha=float(self.cfg.sim_alpha))
            torch.manual_seed(ctx.seed)
            similarity = build_similarity(**sim_args).to(ctx.device)
        return Synthetic(
            images.to(ctx.device),
            texts.to(ctx.device),
            None if mask is None else mask.to(ctx.device),
            float(self.cfg.lr_teacher),
            similarity,
            sim_args,
        )

    def _optimizer(self, syn: Synthetic) -> torch.optim.Optimizer:
        """The papers' one SGD (momentum 0.5) with a learning rate per kind of tensor."""
        cfg = self.cfg
        groups = [
            {"params": [syn.images], "lr": float(cfg.lr_img)},
            {"params": [syn.texts], "lr": float(cfg.lr_txt)},
            {"params": [syn.step_image, syn.step_text], "lr": float(cfg.lr_lr)},
        ]
        if syn.similarity is not None:
            groups.append({"params": list(syn.similarity.parameters()), "lr": float(cfg.lr_sim)})
        return torch.optim.SGD(groups, lr=float(cfg.lr_img), momentum=float(cfg.momentum))

    def _iteration(self, ctx: DistillContext, loop: _Matching, it: int) -> float:
        """One outer step: draw expert, start epoch and batches, match, update, check."""
        syn, gen, n = loop.syn, loop.gen, len(loop.syn.texts)
        expert = loop.experts[int(torch.randint(len(loop.experts), (1,), generator=gen))]
        s = int(torch.randint(self.max_start_epoch, (1,), generator=gen))
        segment = loop.buffer.segment(expert, s, s + self.expert_epochs).to(ctx.device)
        start, target = segment[0], segment[-1]
        batch = min(int(self.cfg.batch_syn or n), n)
        batches = [
            torch.randperm(n, generator=gen)[:batch].to(ctx.device) for _ in range(self.syn_steps)
        ]
        loop.before = syn.snapshot()
        loop.opt.zero_grad(set_to_none=True)
        compute = self.grad_unroll if self.gradient == "unroll" else self.grad_first_order
        # On CPU every attention runs the math kernel, as it always has (bit-identical runs);
        # on a GPU only the passes that differentiate through a gradient need it.
        with _first_pass_attention(torch.device(ctx.device)):
            loss = compute(loop.embed, loop.layout, syn, start, target, batches)
        grads_ok = all(
            v.grad is None or bool(torch.isfinite(v.grad).all()) for v in syn.tensors().values()
        )
        if not torch.isfinite(loss) or not grads_ok:
            what = f"the matching loss or its gradient is not finite (loss {loss.item():.4g})"
            raise Diverged(it, what)
        loop.opt.step()
        min_step = self.cfg.get("min_step_size")
        if min_step is not None:
            with torch.no_grad():
                syn.step_image.clamp_(min=float(min_step))
                syn.step_text.clamp_(min=float(min_step))
        if not syn.finite():
            raise Diverged(it, "an update made the set not finite")
        far = out_of_range(self.bounds, images=syn.images, texts=syn.texts)
        if far:
            raise Diverged(it, far)
        return float(loss)

    def _run(self, ctx: DistillContext, n: int) -> _Matching:
        """The matching run of `n` pairs, its buffer found or built and its set started."""
        self.lora = LoraSettings.from_cfg(ctx.expert)
        buf = self._buffer(ctx)
        student = build_student(ctx.encoder, ctx.seed, self.lora).to(ctx.device).train()
        layout = ParamLayout.of(student)
        scale = self.cfg.get("inner_logit_scale")
        self.logit_scale = float(student.logit_scale if scale is None else scale)
        syn = self._synthetic(ctx, n)
        self.bounds = sane_bounds(images=syn.images, texts=syn.texts)
        meta = {
            "method": self.name,
            "gradient": self.gradient,
            "student_loss": self.loss_name,
            "syn_steps": self.syn_steps,
            "budget_pairs": ctx.pairs,
            "pairs": n,
            "similarity_counted_in_budget": n != ctx.pairs,
            "buffer": str(buf.path),
            "buffer_key": buf.key,
            "experts": int(ctx.expert.num_experts),
            "lora": None if self.lora is None else self.lora.as_dict(),
            "matched_parameters": layout.numel,
        }
        experts = self._experts(buf, layout, int(ctx.expert.num_experts))
        return _Matching(self, ctx, buf, experts, _Embed(student), layout, syn, meta)

    def distill(self, ctx: DistillContext) -> PairSet:
        n = self.budget(ctx.pairs)
        self._check(ctx, n)
        run = self._run(ctx, n)
        schedule = Schedule(run.total, self.checkpoint_every, self.eval_every, last_checkpoint=True)
        OuterLoop(ctx, run, run.opt, schedule).run()
        state, syn = run.state, run.syn
        state["wall"] = time.perf_counter() - run.clock
        selected = state["iteration"]
        if run.best is not None and self.select == "best_val":
            syn.restore(run.best)
            selected = state["best_iteration"]
        run.meta.update(
            iterations=state["iteration"],
            selected_iteration=selected,
            selection=self.select,
            best_val_r_mean=state["best_val"],
            seconds_to_best_val=state["best_wall"],
            seconds=state["wall"],
            val_history=state["val_history"],
            loss_history=state["loss_history"],
            seconds_per_iteration=state["seconds"] / max(state["iteration"], 1),
        )
        return syn.pairset(self.loss_name, run.meta)

    def _val_score(self, ctx: DistillContext, pairs: PairSet) -> float | None:
        """Mean val r_mean of `val_students` students trained on the current set."""
        return val_r_mean(ctx, pairs, int(self.cfg.val_students), self.name)


def blend(images: Tensor, texts: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """RepBlend's representation blending: one lambda ~ Beta(alpha, alpha) and one permutation
    pi mix both modalities' frozen-trunk features, x -> lambda x + (1 - lambda) x[pi], so a
    blended image still pairs with the blended text of the same index; the target similarity
    is left as it is. Drawn from the global generator, so TESLA's replay redraws the same."""
    lam = torch.distributions.Beta(alpha, alpha).sample().to(images.device)
    perm = torch.randperm(images.shape[0]).to(images.device)
    return lam * images + (1 - lam) * images[perm], lam * texts + (1 - lam) * texts[perm]


def _double_backward_attention() -> contextlib.AbstractContextManager:
    """The math attention kernel: fused kernels have no second derivative, and a step that
    differentiates through a gradient (MTT's unroll, TESLA's replay) needs one."""
    return sdpa_kernel(SDPBackend.MATH)


def _first_pass_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """TESLA's graph-free first pass: any kernel on a GPU; on CPU still the math kernel, so the
    pass and its replay compute the same steps and CPU runs stay bit-identical."""
    return contextlib.nullcontext() if device.type == "cuda" else _double_backward_attention()


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _noise_like(x: Tensor, gen: torch.Generator) -> Tensor:
    """Gaussian noise with the per-dimension mean and std of the real rows."""
    mean, std = x.mean(dim=0, keepdim=True), x.std(dim=0, keepdim=True)
    return mean + std * torch.randn(x.shape, generator=gen)
