"""`fit` over any iterable of batches, its schedules and its clamp, each checked against a hand-written loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import perturbed
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from taskvec.compose import Composer
from taskvec.train import TrainConfig, fit


class _KilledError(RuntimeError):
    pass


def _dataset(seed: int = 0, n: int = 40) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 5, (n,), generator=generator))


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _batches(n_batches: int = 4, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = _dataset(3, n_batches * size)
    return [data[i * size : (i + 1) * size] for i in range(n_batches)]


def _manual(base, bank, batches, epochs: int, lr_at, clamp=None) -> torch.Tensor:
    """The oracle: plain AdamW, the learning rate set by hand before every step, no clipping."""
    model = Composer(base, bank, "block")
    optimizer = torch.optim.AdamW([model.coefficients], lr=lr_at(0), weight_decay=0.0)
    step = 0
    for _ in range(epochs):
        for batch in batches:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad()
            _ce(model, batch).backward()
            optimizer.step()
            if clamp is not None:
                with torch.no_grad():
                    model.coefficients.clamp_(*clamp)
            step += 1
    return model.coefficients.detach()


def _fit(base, bank, batches, **config) -> torch.Tensor:
    model = Composer(base, bank, "block")
    fit(model, _ce, batches, TrainConfig(progress=False, max_grad_norm=None, **config))
    return model.coefficients.detach()


def test_constant_schedule_keeps_the_rate(base, bank):
    batches = _batches()
    got = _fit(base, bank, batches, epochs=3, lr=0.05, schedule="constant")
    expected = _manual(base, bank, batches, 3, lambda step: 0.05)
    assert torch.allclose(got, expected, atol=1e-6)
    cosine = _fit(base, bank, batches, epochs=3, lr=0.05, warmup_fraction=0.0)
    assert not torch.allclose(got, cosine, atol=1e-4)  # the schedule is what differs


def test_warmup_cosine_schedule_follows_its_formula(base, bank):
    batches = _batches()
    total, warmup = 3 * len(batches), 3  # int(12 * 0.25)

    def lr_at(step: int) -> float:
        if step < warmup:
            return 0.05 * (step + 1) / warmup
        return 0.05 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    got = _fit(base, bank, batches, epochs=3, lr=0.05, warmup_fraction=0.25)
    assert torch.allclose(got, _manual(base, bank, batches, 3, lr_at), atol=1e-6)


def test_clamp_projects_after_every_step(base, bank):
    batches = _batches()
    got = _fit(base, bank, batches, epochs=2, lr=0.5, schedule="constant", clamp=(-0.01, 0.02))
    assert got.min() >= -0.01 and got.max() <= 0.02
    assert torch.allclose(got, _manual(base, bank, batches, 2, lambda s: 0.5, clamp=(-0.01, 0.02)), atol=1e-6)
    assert ((got == 0.02) | (got == -0.01)).any()  # the bound was reached, so the clamp acted


def _dataloader(kind: str, data: TensorDataset) -> DataLoader:
    if kind == "shuffle":  # RandomSampler drawing from torch's global generator, reseeded by fit every epoch
        return DataLoader(data, batch_size=8, shuffle=True)
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(123))  # its own generator
    return DataLoader(data, batch_size=8, sampler=sampler)


@pytest.mark.parametrize("kind", ["shuffle", "own_generator"])
def test_dataloader_kill_and_resume_equals_uninterrupted(tmp_path, base, bank, kind):
    data = _dataset()
    config = dict(epochs=4, lr=0.05, seed=2, progress=False)
    uninterrupted = Composer(base, bank, "block")
    expected = fit(uninterrupted, _ce, _dataloader(kind, data), TrainConfig(**config))

    checkpoint = tmp_path / "state.pt"
    calls = {"n": 0}

    def dies_in_epoch_three(model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 5 + 3:
            raise _KilledError
        return _ce(model, batch)

    with pytest.raises(_KilledError):
        fit(Composer(base, bank, "block"), dies_in_epoch_three, _dataloader(kind, data),
            TrainConfig(**config, checkpoint=checkpoint))
    torch.manual_seed(999)  # a new process starts from another global RNG state
    resumed = Composer(base, bank, "block")
    result = fit(resumed, _ce, _dataloader(kind, data), TrainConfig(**config, checkpoint=checkpoint, resume=True))
    assert torch.equal(resumed.coefficients, uninterrupted.coefficients)
    assert [r.loss for r in result.history] == pytest.approx([r.loss for r in expected.history])

    # The order matters, so equality above is not vacuous: another seed shuffles otherwise.
    other = Composer(base, bank, "block")
    fit(other, _ce, _dataloader(kind, data), TrainConfig(**{**config, "seed": 3}))
    assert not torch.equal(other.coefficients, uninterrupted.coefficients)


def test_readme_five_lines_run_with_a_dataloader(tmp_path, base):
    from safetensors.torch import save_file

    from taskvec import Composer as PublicComposer
    from taskvec import TaskVector
    from taskvec import TrainConfig as PublicConfig
    from taskvec import fit as public_fit
    from taskvec.objectives import cross_entropy

    save_file(base.state_dict(), tmp_path / "base.safetensors")
    tasks = ["a", "b"]
    for i, t in enumerate(tasks):
        save_file(perturbed(base, i).state_dict(), tmp_path / f"ft_{t}.safetensors")
    head = torch.nn.Linear(5, 5)
    loader = DataLoader(_dataset(), batch_size=8, shuffle=True)
    x, y = _dataset(1, 16).tensors
    val_accuracy = lambda model: float((head(model(x)).argmax(-1) == y).float().mean())  # noqa: E731
    base_model = base

    vectors = [TaskVector.from_checkpoints(tmp_path / "base.safetensors", tmp_path / f"ft_{t}.safetensors", name=t)
               for t in tasks]
    composer = PublicComposer(base_model, vectors, "block")
    result = public_fit(composer, cross_entropy(head), loader, PublicConfig(epochs=2, lr=0.1, progress=False),
                        evaluate=val_accuracy)
    merged = composer.merge()
    assert [r.epoch for r in result.history] == [0, 1, 2] and isinstance(merged, torch.nn.Module)
    assert all(math.isfinite(r.loss) and r.metric is not None for r in result.history[1:])


def test_batches_without_len_or_reiteration_are_refused_clearly(base, bank):
    batches = _batches()
    with pytest.raises(TypeError, match="steps_per_epoch"):
        fit(Composer(base, bank, "block"), _ce, (b for b in batches), TrainConfig(progress=False))
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(Composer(base, bank, "block"), _ce, (b for b in batches),
            TrainConfig(progress=False, schedule="constant"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("schedule", "linear", "schedule"), ("epochs", -1, "epochs"), ("clamp", (1.0, 0.0), "clamp"),
     ("warmup_fraction", 1.5, "warmup_fraction"), ("steps_per_epoch", 0, "steps_per_epoch")],
)
def test_bad_train_config_fails_before_any_work(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})

