"""The one student trainer: every place that trains a student on pairs goes through it.

Evaluation students (`protocol`), experts (`experts`), MDW's dual-track scorers, the forgetting
coreset's student and CovMatch's online student differ only in

* their **recipe**: optimizer, learning rates (a number, or the pair set's learned step sizes),
  weight decay, schedule;
* how they **draw batches** (`Batches`): a reshuffled stream (`cycle`), epochs (`epoch`, with or
  without the last partial batch) or independent draws (`fresh`);
* the **loss of a batch** (a hook: the set's own loss, dual-track selection, soft targets) and
  what happens **after a step** (a hook: checkpoint selection, trajectory snapshots).

Everything else is this loop: one divergence check, read from the device every
`check_every` steps (a host sync per step would idle a GPU), then zero-grad, backward,
scheduled learning rates and the optimizer step. An optional `on_log` hook receives the loss and
learning rate every `log_every` steps (the run's curves); reading the loss is a host sync, so
it happens on those steps only, and it draws nothing, so logging never changes a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from mmdistill.errors import UserError
from mmdistill.models.student import Student
from mmdistill.training.losses import LOSSES
from mmdistill.training.pairs import PairSet
from mmdistill.training.precision import autocast

# eval.lr values that read the set's distilled step sizes: each branch its own (LoRS), or the
# image step size for both branches (MTT-VL's evaluation).
LEARNED = {"learned": None, "learned_image": "image"}
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "multistep", "none")

BatchLoss = Callable[[Student, Tensor], Tensor]
LogHook = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class Recipe:
    """How a student's parameters move: optimizer, learning rates, weight decay, schedule.

    `lr` applies to heads and `trunk_lr` to trainable trunks; either may be "learned" (each
    branch at the set's step size) or "learned_image" (the image step size for both).
    """

    optimizer: str = "adamw"
    lr: float | str = 1e-3
    trunk_lr: float | str = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "none"

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> Recipe:
        """From a config node with these keys (eval, method.online); absent keys default."""
        get = cfg.get

        def rate(key: str, default: float) -> float | str:
            value = get(key, default)
            return str(value) if str(value) in LEARNED else float(value)

        recipe = cls(
            optimizer=str(get("optimizer", cls.optimizer)),
            lr=rate("lr", cls.lr),
            trunk_lr=rate("trunk_lr", cls.trunk_lr),
            weight_decay=float(get("weight_decay", cls.weight_decay)),
            momentum=float(get("momentum", cls.momentum)),
            schedule=str(get("schedule", cls.schedule)),
        )
        recipe.check()
        return recipe

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose adamw or sgd")
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"unknown schedule {self.schedule!r}; choose cosine, multistep (x0.1 half-way) "
                "or none"
            )

    def without_schedule(self) -> Recipe:
        return replace(self, schedule="none")

    @property
    def learned(self) -> bool:
        return str(self.lr) in LEARNED

    def param_groups(self, student: Student, pairs: PairSet | None = None) -> list[dict]:
        """Heads and trunks per branch, each at its learning rate."""
        if self.learned and not (pairs is not None and pairs.step_sizes):
            raise UserError(
                f"eval.lr={self.lr} but this pair set has no learned step sizes; "
                "use a number (eval.lr=1e-3)"
            )
        groups = []
        for branch, modules in (
            ("image", (student.image_trunk, student.image_head)),
            ("text", (student.text_trunk, student.text_head)),
        ):
            for part, module in zip(("trunk", "head"), modules, strict=True):
                if module is None:
                    continue
                params = [p for p in module.parameters() if p.requires_grad]
                if not params:
                    continue
                if self.learned:
                    assert pairs is not None
                    lr = float(pairs.step_sizes[LEARNED[str(self.lr)] or branch])
                else:
                    lr = float(self.trunk_lr if part == "trunk" else self.lr)
                groups.append({"params": params, "lr": lr, "name": f"{branch}_{part}"})
        return groups

    def optimizer_for(
        self, student: Student, pairs: PairSet | None = None
    ) -> torch.optim.Optimizer:
        groups = self.param_groups(student, pairs)
        if self.optimizer == "adamw":
            # The fused kernel is about 3x faster than the per-tensor loop on CPU's small heads.
            fused = all(p.is_floating_point() for g in groups for p in g["params"])
            return torch.optim.AdamW(groups, weight_decay=self.weight_decay, fused=fused)
        return torch.optim.SGD(groups, momentum=self.momentum, weight_decay=self.weight_decay)

    def lr_factor(self, step: int, total: int) -> float:
        """The schedule's multiplier of every base learning rate at `step` of `total`."""
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
        if self.schedule == "multistep":  # the papers' x0.1 at the half-way point
            return 0.1 if step >= total // 2 else 1.0
        return 1.0


class Batches:
    """Pair indices for a student's steps, from a seeded generator.

    * `cycle`: one shuffled pass at a time, reshuffled when fewer than `size` remain, so no
      pair appears twice in a batch (evaluation students, CovMatch's real batches).
    * `epoch`: `epochs()` yields whole shuffled passes; the last partial batch is kept when it
      holds at least `min_last` pairs (experts: 2, a contrastive batch's minimum), or dropped
      (`min_last=None`: the forgetting student, whose events need full batches).
    * `fresh`: every batch an independent draw of `size` distinct pairs (dual-track scorers).

    `pool` restricts the draws to those pair indices (a scorer's training folds). The draws
    come from a CPU generator (the same on every device); each pass is moved to `device` once,
    so the indices of every step already live where the data do.
    """

    def __init__(
        self,
        n: int,
        size: int,
        gen: torch.Generator,
        order: str = "cycle",
        pool: Tensor | None = None,
        min_last: int | None = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        if order not in ("cycle", "epoch", "fresh"):
            raise ValueError(f"unknown batch order {order!r}")
        self.device = torch.device(device)
        self.pool = None if pool is None else pool.to(self.device)
        self.n = n if pool is None else len(pool)
        self.size, self.gen, self.kind, self.min_last = size, gen, order, min_last
        self.order, self.pos = None, 0
        if order == "cycle":
            self.order = self._perm()

    def _perm(self) -> Tensor:
        return torch.randperm(self.n, generator=self.gen).to(self.device)

    def _of(self, local: Tensor) -> Tensor:
        return local if self.pool is None else self.pool[local]

    def next(self) -> Tensor:
        if self.kind == "fresh":
            return self._of(self._perm()[: self.size])
        if self.kind != "cycle":
            raise ValueError("epoch batches come from epochs()")
        if self.pos + self.size > self.n:
            self.order, self.pos = self._perm(), 0
        self.pos += self.size
        return self._of(self.order[self.pos - self.size : self.pos])

    def epochs(self, count: int) -> Iterator[list[Tensor]]:
        """`count` passes over the pairs, each a list of batches."""
        for _ in range(count):
            order = self._perm()
            stop = self.n if self.min_last is not None else self.n - self.size + 1
            batches = [order[s : s + self.size] for s in range(0, stop, self.size)]
            if self.min_last is not None:
                batches = [b for b in batches if len(b) >= self.min_last]
            yield [self._of(b) for b in batches]


def pair_loss(pairs: PairSet, loss: str, device: str) -> BatchLoss:
    """The usual batch loss: the named student loss of a batch against its targets."""
    loss_fn = LOSSES.get(loss)

    def batch_loss(student: Student, idx: Tensor) -> Tensor:
        images, texts, mask, targets = pairs.batch(idx, device)
        return loss_fn(student.logits(images, texts, mask), targets)

    return batch_loss


class FiniteCheck:
    """Watches losses (and gradients) for NaN / inf without a host sync per step: bad steps
    are flagged on the device and the flag is read every `every` steps (every step on CPU,
    where reading costs nothing), then `on_bad(value, step)` reports the first bad one."""

    def __init__(self, every: int, on_bad: Callable[[float, int], None]) -> None:
        self.every = max(1, every)
        self.on_bad = on_bad
        self._bad: Tensor | None = None  # any bad step since the last read
        self._step: Tensor | None = None  # the first bad step
        self._value: Tensor | None = None  # its loss

    def watch(self, step: int, loss: Tensor, *others: Tensor) -> None:
        """Flag `step` if its loss or any of `others` is not finite; read every `every`."""
        loss = loss.detach()
        bad = ~torch.isfinite(loss)
        for t in others:
            bad = bad | ~torch.isfinite(t.detach()).all()
        if self.every == 1:
            if bool(bad):
                self.on_bad(float(loss), step)
            return
        if self._bad is None:
            self._bad, self._step, self._value = bad, torch.where(bad, step, -1), loss.clone()
        else:
            new = bad & ~self._bad
            self._step = torch.where(new, step, self._step)
            self._value = torch.where(new, loss, self._value)
            self._bad = self._bad | bad
        if (step + 1) % self.every == 0:
            self.flush()

    def flush(self) -> None:
        """Report now if any step since the last read was bad (one host sync)."""
        if self._bad is not None and bool(self._bad):
            self.on_bad(float(self._value), int(self._step))
        self._bad = None


def default_check_every(device: torch.device | str) -> int:
    """Every step on CPU; every 25 on a GPU, so kernels queue without waiting on the host."""
    return 1 if torch.device(device).type == "cpu" else 25


def default_log_every(total_steps: int) -> int:
    """About 50 points per curve when the length is known; every 10 steps otherwise."""
    return max(1, total_steps // 50) if total_steps > 0 else 10


class Trainer:
    """Steps one student: loss hook, divergence check, optimizer step at the scheduled rate.

    `what` and `hint` make the divergence message: "<what> loss became nan at step 12;
    <hint>" (see `FiniteCheck` for when it is read).
    """

    def __init__(
        self,
        student: Student,
        recipe: Recipe,
        batch_loss: BatchLoss,
        total_steps: int = 0,
        pairs: PairSet | None = None,
        what: str = "student",
        hint: str = "lower the learning rate",
        check_every: int | None = None,
        on_log: LogHook | None = None,
        log_every: int | None = None,
    ) -> None:
        self.student = student
        self.recipe = recipe
        self.opt = recipe.optimizer_for(student, pairs)
        self.schedule = None
        if recipe.schedule != "none":
            total = total_steps
            self.schedule = torch.optim.lr_scheduler.LambdaLR(
                self.opt, lambda step: recipe.lr_factor(step, total)
            )
        self.batch_loss = batch_loss
        self.total = total_steps
        self.what, self.hint = what, hint
        device = next((p.device for p in student.parameters()), torch.device("cpu"))
        self.check = FiniteCheck(check_every or default_check_every(device), self._raise)
        self.step_count = 0
        self.on_log = on_log
        self.log_every = log_every or default_log_every(total_steps)

    def step(self, idx: Tensor) -> Tensor:
        """One optimizer step on the pairs `idx`; returns the batch loss (detached)."""
        step = self.step_count
        self.student.train()
        with autocast():
            loss = self.batch_loss(self.student, idx).float()
        self.check.watch(step, loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step_count += 1
        if self.on_log is not None and (
            self.step_count % self.log_every == 0 or self.step_count == self.total
        ):
            # One learning rate shows the schedule (it scales every group alike): the heads'.
            groups = self.opt.param_groups
            lr = next(
                (g["lr"] for g in groups if str(g.get("name", "")).endswith("head")),
                groups[0]["lr"],
            )
            self.on_log({"step": self.step_count, "loss": loss.detach().item(), "lr": lr})
        if self.schedule is not None:  # the next step's rate: base x lr_factor(step + 1)
            self.schedule.step()
        return loss.detach()

    def flush(self) -> None:
        """Raise now if any step since the last check diverged."""
        self.check.flush()

    def _raise(self, value: float, step: int) -> None:
        raise UserError(f"{self.what} loss became {value} at step {step}; {self.hint}")

    def run(
        self,
        batches: Batches,
        steps: int,
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        """`steps` steps on stream batches; `after_step(step)` runs after each (1-based)."""
        for _ in range(steps):
            self.step(batches.next())
            if after_step is not None:
                after_step(self.step_count)
        self.flush()

    def run_epochs(
        self,
        batches: Batches,
        epochs: int,
        after_epoch: Callable[[int], None] | None = None,
    ) -> None:
        """`epochs` passes; `after_epoch(epoch)` runs after each (1-based)."""
        for epoch, batch_list in enumerate(batches.epochs(epochs), start=1):
            for idx in batch_list:
                self.step(idx)
            self.flush()
            if after_epoch is not None:
                after_epoch(epoch)
