"""Library pieces the test-time adaptation recipe is made of, each against a hand-computed oracle: config
validation from field metadata, per-method statistics and their cells, the normalisation baseline's label,
scores from logits, seeded subsets, the index sampler, label-free model selection, coefficient summaries."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from conftest import make_base, perturbed
from torch import nn

from taskvec.batching import index_loader, seeded_subset
from taskvec.compose import Composer
from taskvec.data import ImageSet
from taskvec.evaluate import logit_scores, prediction_spread
from taskvec.experiment import check_fields, format_mean_se, mean_se, summarize_by_method
from taskvec.norm_tuning import norm_label
from taskvec.objectives import unlabelled_selection
from taskvec.vectors import TaskVector
from taskvec.workflow import coefficient_summary


@dataclass
class Toy:
    kinds: tuple[str, ...] = field(default=("a",), metadata={"help": "h", "choices": ["a", "b"]})
    mode: str = field(default="x", metadata={"help": "h", "choices": ["x", "y"]})
    steps: int = field(default=1, metadata={"help": "h", "min": 1})
    cap: int | None = field(default=None, metadata={"help": "h", "min": 2})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "h", "min_items": 1})

    def __post_init__(self) -> None:
        check_fields(self)


def test_check_fields_names_the_field_and_the_value():
    Toy(kinds=("a", "b"), mode="y", steps=3, cap=None)
    for kwargs, message in [({"kinds": ("a", "c")}, r"Toy.kinds: \('a', 'c'\) is not a non-empty subset"),
                            ({"kinds": ()}, "Toy.kinds"), ({"mode": "z"}, "Toy.mode: 'z' is not one of"),
                            ({"steps": 0}, "Toy.steps must be >= 1; got 0"), ({"cap": 1}, "Toy.cap must be >= 2"),
                            ({"seeds": ()}, "Toy.seeds needs at least 1")]:
        with pytest.raises(ValueError, match=message):
            Toy(**kwargs)


def test_summarize_by_method_and_cells():
    records = [{"target": t, "method": "m", "seed": s, "acc": v}
               for (t, s), v in {("p", 0): 0.5, ("p", 1): 0.7, ("q", 0): 0.9, ("q", 1): 0.6}.items()]
    out = summarize_by_method(records, ["acc"])["acc"]["m"]
    assert (out["p"]["mean"], out["p"]["se"]) == pytest.approx(mean_se([0.5, 0.7]))
    assert (out["average"]["mean"], out["average"]["se"]) == pytest.approx((0.675, 0.025))  # seeds: .7 and .65
    assert format_mean_se(out["average"]) == "67.5 ± 2.5"
    assert format_mean_se({"mean": 0.01, "se": float("nan")}, sign="+") == "+1.0"
    assert format_mean_se(None) == "" and format_mean_se({"mean": None, "se": None}) == ""


def test_norm_label_says_which_affines_are_tuned():
    assert norm_label(make_base()) == "BN+LN affine"  # the conftest net has both
    assert norm_label(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))) == "LN affine"
    assert norm_label(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))) == "BN affine"
    with pytest.raises(ValueError, match="no normalisation layer"):
        norm_label(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False)))


def test_logit_scores_and_prediction_spread():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    split = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]))
    # predictions 0 0 0 1: accuracy 3/4; recall of class 0 = 1, of class 1 = 1/2
    assert logit_scores(logits, split) == {"acc": 0.75, "balanced_acc": 0.75}
    split = ImageSet(split.images, torch.tensor([0, 0, 0, 1]))
    assert logit_scores(logits, split) == {"acc": 1.0, "balanced_acc": 1.0}
    spread = prediction_spread(logits)
    mean = torch.tensor([2.0, 0.0]).softmax(0) * 0.75 + torch.tensor([0.0, 2.0]).softmax(0) * 0.25
    assert spread["classes_predicted"] == 2
    assert spread["marginal_entropy"] == pytest.approx(float(-(mean * mean.log()).sum()) / math.log(2))


def test_seeded_subset_and_index_loader():
    split = ImageSet(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone(),
                     torch.arange(10))
    assert seeded_subset(split, None, 0) is split and seeded_subset(split, 10, 0) is split
    picked = seeded_subset(split, 4, 3)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:4].sort().values
    assert torch.equal(picked.labels, expected) and torch.equal(seeded_subset(split, 4, 3).labels, expected)
    taken = []
    loader = index_loader(7, 3, lambda idx: taken.append(idx) or idx.float())
    sizes = [len(x) for x in loader.epoch(torch.Generator().manual_seed(0))]
    assert sizes == [3, 4] and len(loader) == 2  # the trailing single input joins the last batch
    assert sorted(torch.cat(taken).tolist()) == list(range(7))


def test_unlabelled_selection_scores_the_fixed_seed_pass_and_leaves_the_global_rng():
    batches = [torch.tensor([1.0, 2.0]), torch.tensor([4.0])]
    seen = []

    def loss_fn(model, batch):
        seen.append(torch.rand(1).item())  # an augmentation's draw from the global generator
        return model(batch).mean()

    evaluate = unlabelled_selection(loss_fn, lambda generator: iter(batches), seed=5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model = nn.Identity()
    assert evaluate(model) == pytest.approx(-(1.5 + 4.0) / 2)
    assert torch.equal(torch.get_rng_state(), state)
    first, seen[:] = list(seen), []
    evaluate(model)
    assert seen == first  # every candidate is scored on the same draws


def test_coefficient_summary():
    base = make_base()
    vectors = [TaskVector.from_models(base, perturbed(base, s), name=f"t{s}") for s in (1, 2)]
    composer = Composer(base, vectors, "block", init=0.0)
    with torch.no_grad():
        composer.coefficients[0].fill_(0.5)
        composer.coefficients[1].copy_(torch.linspace(-1, 0.25, composer.coefficients.shape[1]))
    summary = coefficient_summary(composer)
    assert summary["mean_coefficient_per_vector"] == pytest.approx({"t1": 0.5, "t2": -0.375})
    assert summary["max_abs_coefficient"] == pytest.approx(1.0)
