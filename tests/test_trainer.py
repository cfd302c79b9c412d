"""The one student trainer: batch orders, the divergence check, schedules and recipes."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from mmdistill.errors import UserError
from mmdistill.models.student import Student
from mmdistill.training.trainer import Batches, Recipe, Trainer


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cycle_batches_never_repeat_a_pair_and_reshuffle_when_short() -> None:
    b = Batches(10, 4, gen())
    first, second, third = b.next(), b.next(), b.next()  # 8 of 10 used, then a new pass
    assert len(set(first.tolist()) | set(second.tolist())) == 8
    assert len(set(third.tolist())) == 4
    assert b.pos == 4


def test_epoch_batches_keep_or_drop_the_last_partial_batch() -> None:
    keep = next(Batches(11, 4, gen(), order="epoch", min_last=2).epochs(1))
    assert [len(x) for x in keep] == [4, 4, 3]
    assert sorted(torch.cat(keep).tolist()) == list(range(11))
    tiny = next(Batches(9, 4, gen(), order="epoch", min_last=2).epochs(1))
    assert [len(x) for x in tiny] == [4, 4]  # a last batch of one pair has no negatives
    drop = next(Batches(11, 4, gen(), order="epoch", min_last=None).epochs(1))
    assert [len(x) for x in drop] == [4, 4]


def test_fresh_batches_draw_inside_their_pool() -> None:
    pool = torch.tensor([3, 5, 7, 11, 13])
    b = Batches(100, 3, gen(), order="fresh", pool=pool)
    for _ in range(20):
        idx = b.next()
        assert len(set(idx.tolist())) == 3 and set(idx.tolist()) <= set(pool.tolist())


def tiny_student() -> Student:
    torch.manual_seed(0)
    return Student(image_head=nn.Linear(4, 3), text_head=nn.Linear(4, 3))


def loss_going_nan_at(step: int):
    """A batch loss that is finite until `step` (0-based), then NaN."""
    calls = []

    def batch_loss(student: Student, idx: Tensor) -> Tensor:
        calls.append(1)
        x = torch.randn(len(idx), 4)
        loss = student.logits(x, x).logsumexp(1).mean()
        return loss * float("nan") if len(calls) > step else loss

    return batch_loss


def test_divergence_is_one_line_naming_the_step_and_the_fix() -> None:
    trainer = Trainer(tiny_student(), Recipe(), loss_going_nan_at(3), what="expert 2", hint="fix")
    b = Batches(8, 4, gen())
    with pytest.raises(UserError, match=r"^expert 2 loss became nan at step 3; fix$"):
        trainer.run(b, 10)
    assert trainer.step_count == 3  # it stopped before stepping on the NaN


def test_a_deferred_check_still_names_the_first_bad_step() -> None:
    """With check_every > 1 (the GPU setting) the flag is read later, but the message names the
    step where the loss first went bad, and nothing diverged is returned as finished."""
    trainer = Trainer(tiny_student(), Recipe(), loss_going_nan_at(5), check_every=4, hint="fix")
    with pytest.raises(UserError, match="at step 5; fix"):
        trainer.run(Batches(8, 4, gen()), 30)
    assert trainer.step_count == 7  # read with the loss of step 7 (every 4th), before its step


def test_schedules() -> None:
    cosine = Recipe(schedule="cosine")
    assert cosine.lr_factor(0, 100) == 1.0 and cosine.lr_factor(50, 100) == pytest.approx(0.5)
    multi = Recipe(schedule="multistep")
    assert [multi.lr_factor(s, 10) for s in (0, 4, 5, 9)] == [1.0, 1.0, 0.1, 0.1]
    assert Recipe().lr_factor(7, 10) == 1.0


def test_the_schedule_sets_each_group_before_the_step() -> None:
    student = tiny_student()
    trainer = Trainer(
        student,
        Recipe(optimizer="sgd", lr=0.5, schedule="multistep"),
        loss_going_nan_at(99),
        total_steps=4,
    )
    b = Batches(8, 4, gen())
    seen = []  # the step size each step is taken with (LambdaLR moves on after the step)
    for _ in range(4):
        seen.append(trainer.opt.param_groups[0]["lr"])
        trainer.step(b.next())
    assert seen == [0.5, 0.5, pytest.approx(0.05), pytest.approx(0.05)]


@pytest.mark.parametrize(
    ("key", "value", "match"), [("optimizer", "lbfgs", "optimizer"), ("schedule", "step", "sch")]
)
def test_recipe_errors_are_one_line(key: str, value: str, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        Recipe.from_cfg(OmegaConf.create({key: value}))
    assert "\n" not in str(err.value)
