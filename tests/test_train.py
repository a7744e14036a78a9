from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taskvec.compose import Composer
from taskvec.linearize import LinearizedModel
from taskvec.train import Loader, TrainConfig, fit


def _data(seed: int = 0, n: int = 48):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def _loader(x, y, batch: int = 12) -> Loader:
    def make(generator):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            noise = torch.randn(x[idx].shape, generator=generator) * 0.01  # augmentation uses the epoch generator
            yield x[idx] + noise, y[idx]

    return Loader(make, steps=(len(x) + batch - 1) // batch)


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _accuracy(x, y):
    def evaluate(model):
        return float((model(x).argmax(-1) == y).float().mean())

    return evaluate


def test_training_lowers_loss(base, bank):
    x, y = _data()
    composer = Composer(base, bank, "block")
    before = float(_ce(composer, (x, y)).detach())
    fit(composer, _ce, _loader(x, y), TrainConfig(epochs=6, lr=0.05, progress=False))
    assert float(_ce(composer, (x, y)).detach()) < before


def test_model_selection_restores_best_epoch(base, bank):
    x, y = _data()
    vx, vy = _data(1, 24)
    composer = Composer(base, bank, "block")
    scores = []

    def evaluate(model):
        scores.append(_accuracy(vx, vy)(model))
        return scores[-1]

    result = fit(composer, _ce, _loader(x, y), TrainConfig(epochs=5, lr=0.2, progress=False), evaluate=evaluate)
    assert result.best_metric == max(scores)
    assert result.best_epoch == scores.index(max(scores))  # epoch 0 is the untrained state
    assert _accuracy(vx, vy)(composer) == result.best_metric
    assert [record.epoch for record in result.history] == [0, 1, 2, 3, 4, 5]


def test_same_seed_same_result(base, bank):
    x, y = _data()
    runs = []
    for _ in range(2):
        composer = Composer(base, bank, "x2")
        fit(composer, _ce, _loader(x, y), TrainConfig(epochs=3, lr=0.05, seed=3, progress=False))
        runs.append(composer.coefficients.detach().clone())
    assert torch.equal(runs[0], runs[1])


class _KilledError(RuntimeError):
    pass


def test_resume_continues_to_the_same_result(tmp_path, base, bank):
    x, y = _data()
    vx, vy = _data(1, 24)
    config = dict(epochs=5, lr=0.05, seed=1, progress=False)

    uninterrupted = Composer(base, bank, "block")
    expected = fit(uninterrupted, _ce, _loader(x, y), TrainConfig(**config), evaluate=_accuracy(vx, vy))

    checkpoint = tmp_path / "run" / "state.pt"
    killed = Composer(base, bank, "block")
    calls = {"n": 0}

    def dies_in_epoch_three(model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * len(_loader(x, y)) + 2:
            raise _KilledError
        return _ce(model, batch)

    with pytest.raises(_KilledError):
        fit(killed, dies_in_epoch_three, _loader(x, y), TrainConfig(**config, checkpoint=checkpoint),
            evaluate=_accuracy(vx, vy))
    assert checkpoint.is_file()

    resumed = Composer(base, bank, "block")  # a fresh process: nothing but the checkpoint carries over
    result = fit(resumed, _ce, _loader(x, y), TrainConfig(**config, checkpoint=checkpoint, resume=True),
                 evaluate=_accuracy(vx, vy))
    assert torch.equal(resumed.coefficients, uninterrupted.coefficients)
    assert result.best_epoch == expected.best_epoch
    assert [r.loss for r in result.history][1:] == pytest.approx([r.loss for r in expected.history][1:], nan_ok=True)


def test_linearized_finetuning_gives_task_vector(base, images):
    x, y = _data()
    model = LinearizedModel(base)
    fit(model, _ce, _loader(x, y), TrainConfig(epochs=2, lr=0.01, progress=False))
    vector = model.task_vector(name="lin")
    assert vector.metadata["linearized"] == "true"
    assert vector.norm() > 0
    vector.check_base(base)
    composer = Composer(base, [vector], "isotropic", init=1.0, linearized=True)
    with torch.no_grad():
        assert torch.allclose(composer(images), model(images), atol=1e-5)


def test_nothing_to_train_is_an_error(base):
    frozen = base.requires_grad_(False)
    x, y = _data()
    with pytest.raises(ValueError, match="nothing to train"):
        fit(frozen, _ce, _loader(x, y), TrainConfig(epochs=1, progress=False))
