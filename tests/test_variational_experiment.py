"""Per-sample composition through embeddings and text encoders, the multi-task ELBO over parts of unequal
shape, and the suite-driven steps of taskvec.variational.experiment (gated evaluation, test subsets),
each against an independent oracle: one composed model per sample, or the whole split in one batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from taskvec.compose import Composer
from taskvec.data.text import TextSet
from taskvec.train import Loader
from taskvec.variational import (
    LinearRunner,
    MultitaskELBOLoss,
    UnsupportedModuleError,
    VariationalComposer,
    VariationalConfig,
    VmapRunner,
    spike_slab_kl,
)
from taskvec.variational.experiment import gated_logits, gated_scores, probe_batch, seeded_subset
from taskvec.vectors import TaskVector


class Tokens(nn.Module):
    """Token + shared position embeddings (position ids of batch 1, as BERT's), a LayerNorm, a Linear."""

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__()
        self.words = nn.Embedding(20, 6, max_norm=max_norm)
        self.positions = nn.Embedding(8, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 4)
        self.feature_dim = 4

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[-1]).unsqueeze(0)
        return self.out(self.norm(self.words(ids) + self.positions(positions))).mean(-2)


def _vectors(base: nn.Module, n: int = 2) -> list[TaskVector]:
    out = []
    for i in range(n):
        generator = torch.Generator().manual_seed(10 + i)
        tuned = {k: v + 0.2 * torch.randn(v.shape, generator=generator) for k, v in base.state_dict().items()}
        out.append(TaskVector.from_state_dicts(base.state_dict(), tuned, name=f"v{i}"))
    return out


def _per_sample(composer: Composer, x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """The oracle: one composed network per sample, through the composer's own forward."""
    return torch.cat([composer(x[i : i + 1], coefficients=coefficients[i]) for i in range(len(x))])


@pytest.mark.parametrize("zero_fraction", [0.0, 0.8])
def test_linear_runner_composes_embeddings_per_sample(zero_fraction):
    torch.manual_seed(0)
    base = Tokens().eval()
    composer = Composer(base, _vectors(base), "block")
    ids = torch.randint(0, 20, (5, 7), generator=torch.Generator().manual_seed(1))
    coefficients = torch.randn(5, 2, composer.layout.num_columns, generator=torch.Generator().manual_seed(2))
    coefficients[torch.rand(coefficients.shape, generator=torch.Generator().manual_seed(3)) < zero_fraction] = 0.0
    expected = _per_sample(composer, ids, coefficients)
    torch.testing.assert_close(LinearRunner(composer)(ids, coefficients), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(VmapRunner(composer, 2)(ids, coefficients), expected, atol=1e-5, rtol=1e-5)


def test_linear_runner_refuses_an_embedding_with_max_norm():
    base = Tokens(max_norm=1.0).eval()
    with pytest.raises(UnsupportedModuleError, match="block 'words.weight' belongs to Embedding 'words'"):
        LinearRunner(Composer(base, _vectors(base), "block"))


def test_text_encoder_runs_per_sample_under_vmap_and_hooks_with_padding():
    """A BERT with padded texts: vmap (the 4-D mask path) and the hooks equal one composed model per text."""
    pytest.importorskip("transformers")
    from hf_tiny import bert, perturbed

    from taskvec.suites.text import TextBackbone, pack

    inner = bert(vocab_size=40)
    base = TextBackbone(inner, 16).eval()
    vectors = [TaskVector.from_state_dicts(base.state_dict(), TextBackbone(perturbed(inner, s), 16).state_dict(),
                                           name=f"v{s}") for s in (1, 2)]
    composer = Composer(base, vectors, "block")
    ids = torch.randint(5, 40, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # a padded text
    x = pack(ids, mask)
    coefficients = torch.randn(3, 2, composer.layout.num_columns, generator=torch.Generator().manual_seed(4))
    expected = torch.cat([composer(pack(ids[i : i + 1, : 3 if i == 1 else 6], mask[i : i + 1, : 3 if i == 1 else 6]),
                                   coefficients=coefficients[i]) for i in range(3)])  # unpadded, one text at a time
    torch.testing.assert_close(VmapRunner(composer, 2)(x, coefficients), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(LinearRunner(composer)(x, coefficients), expected, atol=1e-5, rtol=1e-4)


def test_multitask_elbo_over_parts_of_unequal_shape_sums_the_per_part_elbos():
    torch.manual_seed(0)
    base = Tokens().eval()
    model = VariationalComposer(Composer(base, _vectors(base), "block"), config=VariationalConfig(hidden=(8,)))
    heads = [nn.Linear(4, 3), nn.Linear(4, 2)]
    parts = [(torch.randint(0, 20, (3, 5)), torch.randint(0, 3, (3,))),
             (torch.randint(0, 20, (4, 7)), torch.randint(0, 2, (4,)))]  # token batches padded differently
    loss = MultitaskELBOLoss(heads, num_train=10, kl_warmup_steps=4)
    loss.step = 2  # beta = 0.5 for both parts
    model.train()
    torch.manual_seed(1)
    got = loss(model, parts)
    torch.manual_seed(1)
    expected = 0.0
    for (x, y), head in zip(parts, heads, strict=True):
        output, posterior = model.forward_with_posterior(x, sample=True)
        kl = spike_slab_kl(*posterior, 0.5, 1.0).flatten(1).sum(1).mean()
        expected = expected + F.cross_entropy(head(output), y) + 0.5 * kl
    torch.testing.assert_close(got, expected)
    assert loss.step == 3 and loss.last["beta"] == 0.5  # one training call, one step


class _Split:
    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)


class _BatchedSuite:
    """Scores a split two samples at a time, as a suite batches it (the oracle runs it in one batch)."""

    def logits(self, model: nn.Module, head: nn.Module, split: _Split) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return torch.cat([head(model(split.images[i : i + 2])) for i in range(0, len(split), 2)])

    def loader(self, split: _Split, *, batch_size: int, augmentation=None, min_steps: int = 1) -> Loader:
        def make(generator: torch.Generator):
            order = torch.randperm(len(split), generator=generator)
            yield split.images[order[:batch_size]], split.labels[order[:batch_size]]

        return Loader(make, 1)


def test_gated_evaluation_through_a_suite_equals_one_batch():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).eval()
    model = VariationalComposer(Composer(base, _vectors(base), "block"), feature_dim=4,
                                config=VariationalConfig(hidden=(8,), uncertainty_threshold=float("inf")))
    with torch.no_grad():  # a posterior that keeps some components for some inputs only
        model.inference.out.weight.normal_(0, 2.0)
    split = _Split(torch.randn(7, 6), torch.randint(0, 3, (7,)))
    head = nn.Linear(4, 3)
    logits, kept = gated_logits(model, head, split, _BatchedSuite())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, head(model(split.images)))
        expected_kept = model.kept_fraction(model.features(split.images), per_block=True)
    torch.testing.assert_close(kept, expected_kept)
    assert 0.0 < float(kept.mean()) < 1.0
    scores, _ = gated_scores(model, head, split, _BatchedSuite())
    assert scores["acc"] == pytest.approx(float((logits.argmax(-1) == split.labels).float().mean()))
    assert probe_batch(_BatchedSuite(), split, 3).shape == (3, 6)


def test_seeded_subset_is_a_fixed_ordered_subset():
    split = TextSet([f"text {i}" for i in range(10)], torch.arange(10))
    assert seeded_subset(split, 0) is split and seeded_subset(split, 20) is split
    one, two = seeded_subset(split, 4), seeded_subset(split, 4)
    assert torch.equal(one.labels, two.labels) and len(one) == 4
    assert one.labels.tolist() == sorted(set(one.labels.tolist()))  # distinct samples, in split order
    assert one.texts == [f"text {i}" for i in one.labels.tolist()]
    with pytest.raises(ValueError, match="limit must be >= 0"):
        seeded_subset(split, -1)
