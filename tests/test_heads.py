from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taskvec.heads import (
    LinearHead,
    LPPlusPlus,
    TipAdapter,
    accuracy,
    extract_features,
    fit_linear_head,
    prototype_head,
    tip_adapter_search,
)
from taskvec.io import CheckpointError
from taskvec.objectives import cross_entropy
from taskvec.train import Loader, TrainConfig, fit


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny full-batch problems: one intra-op thread avoids oversubscription on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clusters(n: int = 300, classes: int = 5, dim: int = 32, spread: float = 0.3, seed: int = 0):
    """Gaussian clusters around random directions: linearly separable for small ``spread``."""
    generator = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)), dim=-1) * 3
    labels = torch.arange(n) % classes
    features = centers[labels] + spread * torch.randn(n, dim, generator=generator)
    return features, labels


def _weak_head(classes: int = 5, dim: int = 32, noise: float = 2.0) -> LinearHead:
    """A head that is right on part of the data: true directions plus heavy noise."""
    centers = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)), dim=-1)
    weight = centers + noise * torch.randn(classes, dim, generator=torch.Generator().manual_seed(5)) / dim**0.5
    return LinearHead.from_weights(weight, torch.zeros(classes), logit_scale=5.0).freeze()


def test_extract_features_eval_no_grad_and_restores_mode():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.9))
    backbone.train()
    x = torch.randn(10, 4)
    features, labels = extract_features(backbone, [(x[:6], torch.arange(6)), (x[6:], torch.arange(4))])
    assert backbone.training  # mode restored
    with torch.no_grad():
        expected = backbone[0](x)  # dropout inactive in eval
    assert torch.allclose(features, expected) and not features.requires_grad
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    unlabelled, none = extract_features(backbone, [x])
    assert none is None and unlabelled.shape == (10, 6)
    with pytest.raises(ValueError, match="no batches"):
        extract_features(backbone, [])


@pytest.mark.parametrize(("optimizer", "lr", "normalize"), [("lbfgs", 1.0, True), ("lbfgs", 1.0, False),
                                                            ("adam", 0.05, True)])
def test_linear_head_separates_clusters(optimizer, lr, normalize):
    features, labels = _clusters()
    held_out, held_labels = _clusters(seed=1)
    head = fit_linear_head(features, labels, 5, normalize=normalize, optimizer=optimizer, lr=lr, epochs=100)
    assert accuracy(head(features), labels) == 1.0
    assert accuracy(head(held_out), held_labels) >= 0.98
    assert not any(p.requires_grad for p in head.parameters())


def test_linear_head_errors_name_the_value():
    features, labels = _clusters(20)
    with pytest.raises(ValueError, match=r"\[0, 4\].*num_classes=3"):
        fit_linear_head(features, labels, 3)
    with pytest.raises(ValueError, match=r"\(20,\)"):
        fit_linear_head(features, labels[:5], 5)
    with pytest.raises(ValueError, match="optimizer"):
        fit_linear_head(features, labels, 5, optimizer="sgd")  # type: ignore[arg-type]


def test_prototype_head_on_clusters():
    features, labels = _clusters()
    head = prototype_head(features, labels)
    assert head.num_classes == 5 and head.normalize
    assert torch.allclose(head.weight.norm(dim=-1), torch.ones(5))
    held_out, held_labels = _clusters(seed=1)
    assert accuracy(head(held_out), held_labels) == 1.0
    with pytest.raises(ValueError, match=r"classes \[5\] have no sample"):
        prototype_head(features, labels, 6)


def test_linear_head_save_load_round_trip(tmp_path):
    features, labels = _clusters(50)
    head = fit_linear_head(features, labels, 5, logit_scale=3.0, epochs=20)
    path = head.save(tmp_path / "head.safetensors", metadata={"task": "clusters"})
    loaded = LinearHead.load(path)
    assert (loaded.feature_dim, loaded.num_classes, loaded.normalize, loaded.logit_scale) == (32, 5, True, 3.0)
    assert torch.equal(loaded(features), head(features))
    raw = LinearHead(8, 3, normalize=False, bias=False)
    raw_loaded = LinearHead.load(raw.save(tmp_path / "raw.safetensors"))
    assert raw_loaded.linear.bias is None and not raw_loaded.normalize
    assert loaded.freeze() is loaded and not any(p.requires_grad for p in loaded.parameters())
    from taskvec.io import atomic_save_safetensors

    atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a taskvec linear head"):
        LinearHead.load(tmp_path / "other.safetensors")


def test_tip_adapter_alpha_zero_is_the_base_head():
    features, labels = _clusters(40)
    base = _weak_head()
    adapter = TipAdapter(features, labels, base, alpha=0.0, beta=5.0)
    assert torch.equal(adapter(features), base(features))


def test_tip_adapter_recovers_cached_labels():
    features, _ = _clusters(40)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(3))  # unrelated to the data
    base = _weak_head()
    adapter = TipAdapter(features, labels, base, alpha=100.0, beta=200.0)
    assert torch.equal(adapter(features).argmax(-1), labels)
    cache = adapter.cache_logits(features)
    assert torch.allclose(cache, F.one_hot(labels, 5).float(), atol=1e-3)  # each point matches only itself


def test_tip_adapter_search_and_finetuning():
    train, train_labels = _clusters(50, spread=1.0)
    val, val_labels = _clusters(100, spread=1.0, seed=1)
    base = _weak_head(noise=4.0)
    base_accuracy = accuracy(base(val), val_labels)
    adapter, table = tip_adapter_search(train, train_labels, base, val, val_labels)
    assert len(table) == 7 * 8
    best = max(score for _, _, score in table)
    assert accuracy(adapter(val), val_labels) == best >= base_accuracy
    assert adapter.alpha > 0 and best > base_accuracy
    assert not any(p.requires_grad for p in base.parameters())


def _tip_key_gradient(keys, features, labels, base_logits, alpha, beta):
    """d CE / d keys for logits = base + alpha * exp(-beta (1 - f' K^T)) V, by the chain rule by hand:
    G = (softmax - onehot) / N; dL/dE = alpha G V^T; dL/dA = beta E * dL/dE; dL/dK = (dL/dA)^T f'."""
    queries = features / features.norm(dim=-1, keepdim=True)
    values = F.one_hot(labels, 5).double()
    affinity = queries @ keys.T
    E = torch.exp(-beta * (1.0 - affinity))
    logits = base_logits + alpha * E @ values
    probs = torch.exp(logits - logits.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    G = (probs - F.one_hot(labels, 5).double()) / len(labels)
    dA = beta * E * (alpha * G @ values.T)
    return dA.T @ queries


def test_tip_adapter_f_step_is_the_hand_gradient_step():
    """Tip-Adapter-F trains the cache keys with the ordinary loop: one SGD step moves them by -lr times
    the chain-rule gradient of the cross-entropy, computed here by hand in float64."""
    train, train_labels = _clusters(50, spread=1.0)
    base = _weak_head(noise=4.0)
    alpha, beta, lr = 3.0, 5.5, 0.5
    tuned = TipAdapter(train, train_labels, base, alpha=alpha, beta=beta, trainable=True)
    keys = tuned.keys.detach().clone()
    assert torch.allclose(keys, F.normalize(train, dim=-1))  # the cache starts at the normalised features
    with torch.no_grad():
        base_logits = base(train).double()
    grad = _tip_key_gradient(keys.double(), train.double(), train_labels, base_logits, alpha, beta)
    assert float(grad.abs().max()) > 1e-4  # a real step
    fit(tuned, cross_entropy(None), Loader(lambda generator: [(train, train_labels)], steps=1),
        TrainConfig(epochs=1, lr=lr, max_grad_norm=None, warmup_fraction=0.0, progress=False),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=lr))
    assert torch.allclose(tuned.keys.detach().double(), keys.double() - lr * grad, atol=1e-6)
    assert [name for name, p in tuned.named_parameters() if p.requires_grad] == ["keys"]
    assert not any(p.requires_grad for p in base.parameters())


def test_lp_plus_plus_beats_or_matches_the_base_head():
    features, labels = _clusters(100, spread=1.0)
    base = _weak_head(noise=4.0)
    model = LPPlusPlus.fit(features, labels, base, iterations=150)
    assert accuracy(model(features), labels) >= accuracy(base(features), labels)
    assert accuracy(model(features), labels) >= 0.95
    losses = torch.tensor(model.train_losses)
    assert len(losses) == 151
    assert (losses[1:] <= losses[:-1] + 1e-6).all()  # 1/L steps never increase the loss
    held_out, held_labels = _clusters(200, spread=1.0, seed=1)
    assert accuracy(model(held_out), held_labels) >= accuracy(base(held_out), held_labels)
    # The blend is per class and starts from the base head: alpha moved, one value per class.
    assert model.alpha.shape == (5,) and not torch.equal(model.alpha, torch.ones(5))
    assert not any(p.requires_grad for p in model.parameters())
    start = LPPlusPlus.fit(features, labels, base, iterations=0)
    expected = F.normalize(features, dim=-1)[labels == 0].mean(0)
    assert torch.allclose(start.visual.weight[0], expected, atol=1e-6)  # prototype initialisation
