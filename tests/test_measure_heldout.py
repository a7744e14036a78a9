"""The cost meters (peak resident memory with a reset high-water mark, median step time) and the held-out
target wiring (leave-one-out sources, the suite's own few-shot pool), against hand-made oracles."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from taskvec.data import ImageSet
from taskvec.heldout import HeldOutSetup, HeldOutTarget
from taskvec.measure import peak_memory, rss_mib, time_step


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_peak_memory_sees_an_allocation_and_resets_between_stretches():
    with peak_memory() as first:
        big = torch.ones(50 * 2**20)  # 200 MiB, touched
        del big
    assert first.reset and first.added_mib >= 150
    with peak_memory() as second:  # the 200 MiB are gone: only a reset high-water mark can show 50 MiB
        small = torch.ones(12 * 2**20)
        del small
    assert 40 <= second.added_mib < 120, second
    current, peak = rss_mib()
    assert 0 < current <= peak


def test_time_step_is_the_median_after_warmup_and_leaves_no_gradient():
    ticks = iter([0.0, 10.0, 10.0, 12.0, 12.0, 13.0, 13.0, 18.0])  # warm-up 10 s, then 2, 1, 5 s
    model = nn.Linear(3, 1)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return m(batch[0]).pow(2).mean()

    seconds = time_step(model, loss_fn, (torch.ones(4, 3), None), repeats=3, warmup=1, clock=lambda: next(ticks))
    assert seconds == 2.0 and len(calls) == 4
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="repeats"):
        time_step(model, loss_fn, (torch.ones(1, 3), None), repeats=0)


def _split(value: int, n: int = 8) -> ImageSet:
    return ImageSet(torch.full((n, 1, 2, 2), value, dtype=torch.uint8), torch.arange(n) % 2)


class _Suite:
    """The parts of a suite the held-out wiring touches; ``pool`` picks its few-shot split."""

    name = "fake"
    tasks = ("a", "b", "c")

    def __init__(self, pool: str) -> None:
        self.built: list[str] = []
        self.pool = pool

    def few_shot_pool(self, task):
        return getattr(task, self.pool)

    def build(self, tasks):
        self.built = list(tasks)

    def backbone(self):
        return nn.Identity()

    def head(self, task):
        return nn.Identity()

    def splits(self, task):
        return SimpleNamespace(train=_split(1), val=_split(2), test=_split(3))

    def vectors(self, tasks):
        return list(tasks)


def test_held_out_target_leaves_the_target_out_and_draws_from_the_suites_pool():
    suite = _Suite(pool="train")
    ctx = HeldOutTarget(suite, "b")
    assert ctx.sources == ["a", "c"] and ctx.vectors() == ["a", "c"] and suite.built == ["a", "c", "b"]
    train, val = ctx.shots(2, 0)
    assert (train.images == 1).all() and (val.images == 1).all()  # the suite's rule: its training split
    other, _ = HeldOutTarget(_Suite(pool="val"), "b").shots(2, 0)
    assert (other.images == 2).all()  # a suite whose rule is the validation split
    assert HeldOutTarget(suite).target == "c"  # '' = the suite's last task
    with pytest.raises(ValueError, match="'z' is not a task"):
        HeldOutTarget(suite, "z")
    with pytest.raises(ValueError, match="none is left"):
        HeldOutTarget(suite, "a", sources=["a"])


def test_held_out_setup_checks_fields_and_builds_the_schedule():
    schedule = HeldOutSetup(epochs=3, lr=0.5, augmentation="none").schedule(7)
    assert (schedule.epochs, schedule.lr, schedule.seed, schedule.augmentation) == (3, 0.5, 7, None)
    for bad, match in (({"seeds": ()}, "seeds"), ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"),
                       ({"augmentation": "heavy"}, "heavy")):
        with pytest.raises(ValueError, match=match):
            HeldOutSetup(**bad)
