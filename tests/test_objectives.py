from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_bank, make_base
from torch import nn

from taskvec.compose import Composer
from taskvec.objectives import (
    cross_entropy,
    default_trusted_k,
    entropy,
    multitask_cross_entropy,
    negation,
    nt_xent,
    sar,
    sharpness_aware,
    simclr,
    softmax_entropy,
    trusted_set,
    trusted_targets,
    ufm_loss,
)
from taskvec.train import Loader, TrainConfig, fit


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny full-batch problems: one intra-op thread avoids oversubscription on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Table(nn.Module):
    """A 'model' whose output for sample i is a free row of logits: objectives seen row by row."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(logits.clone())

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.table[index]


def _head(classes: int = 4, seed: int = 0, scale: float = 3.0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(5, classes)
    with torch.no_grad():
        head.weight.mul_(scale)
    return head


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _composer() -> Composer:
    base = make_base()
    return Composer(base, make_bank(base), "block", init=0.3)


# ----------------------------------------------------------------------------------------------
# Entropy (Tent) and SAR
# ----------------------------------------------------------------------------------------------


def test_entropy_of_uniform_is_log_c_and_gradient_sharpens():
    for classes in (2, 7):
        assert torch.allclose(softmax_entropy(torch.zeros(3, classes)), torch.full((3,), math.log(classes)))
    model = Table(torch.tensor([[0.3, 0.1, -0.2, 0.0]]))
    loss = entropy()(model, torch.tensor([0]))
    loss.backward()
    stepped = model.table.detach() - 0.5 * model.table.grad
    assert softmax_entropy(stepped) < softmax_entropy(model.table.detach())
    assert stepped.softmax(-1).max() > model.table.detach().softmax(-1).max()
    assert model.table.grad[0, 0] < 0  # the leading class is pushed up


def test_sar_filters_unreliable_samples():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.05], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    model = Table(logits)
    index = torch.arange(4)
    margin = 0.4 * math.log(3)
    ent = softmax_entropy(logits)
    assert (ent < margin).tolist() == [True, False, True, False]
    loss = sar(e_margin=None, rho=0.0)(model, index)  # default margin 0.4 ln C; rho=0: no perturbation
    assert torch.allclose(loss, ent[[0, 2]].mean())
    loss.backward()
    assert model.table.grad[[1, 3]].abs().sum() == 0  # high-entropy samples contribute no gradient
    assert model.table.grad[[0, 2]].abs().sum() > 0
    # With SAM: the second pass is also restricted to the reliable samples.
    model.table.grad = None
    sar(rho=0.05)(model, index).backward()
    assert model.table.grad[[1, 3]].abs().sum() == 0
    # No reliable sample at all: a zero loss that changes nothing.
    flat = Table(torch.zeros(2, 3))
    none = sar()(flat, torch.arange(2))
    none.backward()
    assert float(none.detach()) == 0.0 and flat.table.grad.abs().sum() == 0


def test_sharpness_aware_gradient_is_taken_at_the_perturbed_point():
    composer, head, x, rho = _composer(), _head(), _images(), 0.05
    theta = composer.coefficients.detach().clone()

    def plain_at(coefficients: torch.Tensor) -> torch.Tensor:
        leaf = coefficients.clone().requires_grad_(True)
        value = softmax_entropy(head(composer(x, coefficients=leaf))).mean()
        return torch.autograd.grad(value, leaf)[0]

    g_plain = plain_at(theta)
    g_expected = plain_at(theta + rho * g_plain / g_plain.norm())

    loss = sharpness_aware(entropy(head), rho)(composer, x)
    loss.backward()
    g_sam = composer.coefficients.grad.clone()
    assert torch.equal(composer.coefficients.detach(), theta)  # the parameters never moved
    assert torch.allclose(g_sam, g_expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(g_sam, g_plain, rtol=1e-3, atol=1e-6)

    # SAR with a margin that keeps every sample is exactly SAM on the entropy.
    composer.coefficients.grad = None
    sar(head, e_margin=10.0, rho=rho)(composer, x).backward()
    assert torch.allclose(composer.coefficients.grad, g_sam, rtol=1e-5, atol=1e-8)

    # Through fit with plain SGD, one step: theta - lr * g_sam, exactly where the optimizer puts it.
    composer.coefficients.grad = None
    fit(
        composer,
        sharpness_aware(entropy(head), rho),
        Loader(lambda generator: [x], steps=1),
        TrainConfig(epochs=1, lr=0.1, max_grad_norm=None, warmup_fraction=0.0, progress=False),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    assert torch.allclose(composer.coefficients.detach(), theta - 0.1 * g_sam, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Supervised: CE, multi-task CE, negation
# ----------------------------------------------------------------------------------------------


def test_multitask_cross_entropy_batch_forms_agree():
    composer = _composer()
    heads = {"a": _head(3, 1), "b": _head(4, 2)}
    xa, xb = _images(6, 1), _images(5, 2)
    ya, yb = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([3, 2, 1, 0, 3])
    with torch.no_grad():
        expected = F.cross_entropy(heads["a"](composer(xa)), ya) + F.cross_entropy(heads["b"](composer(xb)), yb)
        loss_fn = multitask_cross_entropy(heads)
        forms = [
            [(xa, ya, "a"), (xb, yb, "b")],
            [(xa, ya, 0), (xb, yb, torch.tensor(1))],
            [(xa, ya), (xb, yb)],
            {"a": (xa, ya), "b": (xb, yb)},
        ]
        for form in forms:
            assert torch.allclose(loss_fn(composer, form), expected, atol=1e-6)
        # One mixed batch whose samples carry per-sample task indices: labels are per task.
        mixed = (torch.cat([xa, xb]), torch.cat([ya, yb]), torch.tensor([0] * 6 + [1] * 5))
        assert torch.allclose(loss_fn(composer, mixed), expected, atol=1e-6)
        single = loss_fn(composer, (xa, ya, "a"))
        assert torch.allclose(single, F.cross_entropy(heads["a"](composer(xa)), ya), atol=1e-6)
    assert not any(p.requires_grad for h in heads.values() for p in h.parameters())  # heads frozen
    with pytest.raises(KeyError, match="'c'"):
        loss_fn(composer, (xa, ya, "c"))
    with pytest.raises(IndexError, match="task index 5"):
        loss_fn(composer, (xa, ya, 5))


def test_negation_sign_and_bound():
    classes = 4
    target_rows = torch.zeros(3, classes)
    target_rows[:, 0] = 2.0  # the target samples (label 0) are classified correctly
    control_rows = torch.eye(classes)[:2] * 3.0
    model = Table(torch.cat([target_rows, control_rows]))
    batch = ((torch.arange(3), torch.zeros(3, dtype=torch.long)), (torch.tensor([3, 4]), torch.tensor([0, 1])))
    ce_t = F.cross_entropy(target_rows, torch.zeros(3, dtype=torch.long))
    ce_c = F.cross_entropy(control_rows, torch.tensor([0, 1]))

    plain = negation(None, None, bound="none")(model, batch)
    assert torch.allclose(plain, -ce_t + ce_c)
    clamped = negation(None, None)(model, batch)
    assert torch.allclose(clamped, -ce_t + ce_c)  # below tau = ln C the clamp changes nothing
    clamped.backward()
    assert (model.table.grad[:3, 0] > 0).all()  # descent lowers the true-class logit: the sign is right
    assert (model.table.grad[3:].abs().sum()) > 0

    # Forgotten target samples (true-class probability < 1/C): bounded value, no more push.
    with torch.no_grad():
        model.table[:3] = torch.tensor([-50.0, 50.0, 0.0, 0.0])
    model.table.grad = None
    forgotten = negation(None, None)(model, batch)
    assert torch.allclose(forgotten, torch.tensor(-math.log(classes)) + ce_c)
    forgotten.backward()
    assert model.table.grad[:3].abs().sum() == 0
    assert negation(None, None, bound="none")(model, batch) < -90  # the plain form is unbounded
    # Uniform bound: CE to the uniform distribution, minimised (= ln C) by a flat target prediction.
    with torch.no_grad():
        model.table[:3] = 0.0
    assert torch.allclose(negation(None, None, bound="uniform")(model, batch), math.log(classes) + ce_c)
    with pytest.raises(ValueError, match="bound"):
        negation(None, None, bound="soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="-1"):
        negation(None, None, tau=-1.0)


# ----------------------------------------------------------------------------------------------
# SimCLR
# ----------------------------------------------------------------------------------------------


def test_nt_xent_exact_values():
    # Two orthonormal pairs, identical views, T = 1/2: each anchor sees its partner at cosine 1 and two
    # others at cosine 0, so every term is -log(e^2 / (e^2 + 2)).
    z = torch.eye(2)
    expected = math.log(math.exp(2.0) + 2.0) - 2.0
    assert nt_xent(z, z, 0.5).item() == pytest.approx(expected, rel=1e-6)
    # Arbitrary embeddings against the direct loop; scale-invariant (cosine similarity).
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    for temperature in (0.1, 0.5, 2.0):
        expected_loop = _oracle_nt_xent(z1, z2, temperature)
        assert nt_xent(z1, z2, temperature).double().item() == pytest.approx(expected_loop.item(), rel=1e-5)
        assert nt_xent(3 * z1, 0.5 * z2, temperature).item() == pytest.approx(expected_loop.item(), rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        nt_xent(z1, z1[:2])
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(z1[:1], z2[:1])


# ----------------------------------------------------------------------------------------------
# UFM
# ----------------------------------------------------------------------------------------------


def test_trusted_set_takes_the_k_most_confident_per_class():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(60, 3, generator=generator) * 2
    indices, labels = trusted_set(logits, 5)
    probs = logits.softmax(-1)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert len(set(indices.tolist())) == 15
    for c in range(3):
        mine = indices[labels == c]
        predicted_c = torch.nonzero(probs.argmax(-1) == c).flatten()
        best = predicted_c[probs[predicted_c, c].argsort(descending=True)[:5]]
        assert sorted(mine.tolist()) == sorted(best.tolist())
    targets = trusted_targets(logits, 5)
    assert (targets >= 0).sum() == 15 and torch.equal(targets[indices], labels)
    assert default_trusted_k(10_000, 10) == 100 and default_trusted_k(300, 10) == 3 and default_trusted_k(5, 10) == 1


def test_trusted_set_tops_up_a_rarely_predicted_class():
    logits = torch.zeros(8, 2)
    logits[:, 0] = torch.arange(8, dtype=torch.float32)  # class 0 predicted for samples 1..7
    logits[0, 1] = 1.0  # sample 0 predicted as class 1, the only one
    indices, labels = trusted_set(logits, 3)
    assert indices[labels == 0].tolist() == [7, 6, 5]
    assert indices[labels == 1].tolist() == [0, 1, 2]  # sample 0, then the least class-0-confident free ones
    with pytest.raises(ValueError, match="k_per_class=5"):
        trusted_set(logits, 5)


def test_ufm_loss_semantics():
    weak = torch.tensor([[9.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.2, 0.0]])
    strong = torch.zeros(3, 3, requires_grad=True)
    # Only sample 0 is confident enough: its weak prediction labels the strong view.
    loss = ufm_loss(weak, strong, None, threshold=0.99)
    assert torch.allclose(loss, F.cross_entropy(strong[:1], weak[:1].softmax(-1)))
    # Sample 2 is trusted with label 2: always kept, with its fixed label.
    loss = ufm_loss(weak, strong, torch.tensor([-1, -1, 2]), threshold=0.99)
    expected = (F.cross_entropy(strong[0:1], weak[:1].softmax(-1)) + F.cross_entropy(strong[2:3], torch.tensor([2])))
    assert torch.allclose(loss, expected / 2)
    loss.backward()
    assert strong.grad[1].abs().sum() == 0  # unconfident, untrusted sample ignored
    # No kept sample: zero loss, still differentiable.
    nothing = ufm_loss(torch.zeros(2, 3), strong[:2], None)
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad


# ----------------------------------------------------------------------------------------------
# Every objective against an independent hand computation, through a composer
# ----------------------------------------------------------------------------------------------
# The oracles below are written from the papers' definitions with explicit loops over samples, exp/log
# instead of log_softmax/cross_entropy, and no code shared with taskvec.objectives. Each takes the
# coefficients as a leaf, so the same oracle also gives the expected gradient.


def _softmax_row(row: torch.Tensor) -> torch.Tensor:
    e = torch.exp(row - row.max())
    return e / e.sum()


def _ce_row(row: torch.Tensor, label: int) -> torch.Tensor:
    return -torch.log(_softmax_row(row)[label])


def _entropy_row(row: torch.Tensor) -> torch.Tensor:
    p = _softmax_row(row)
    return -(p * torch.log(p)).sum()


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).sum() / len(values)


def _oracle_ce(logits, y):
    return _mean([_ce_row(logits[i], int(y[i])) for i in range(len(y))])


def _oracle_entropy(logits):
    return _mean([_entropy_row(logits[i]) for i in range(logits.shape[0])])


def _oracle_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Direct loop: anchor k, partner (k + N) mod 2N, denominator over every j != k."""
    n = z1.shape[0]
    z = torch.cat([z1, z2]).double()
    losses = []
    for k in range(2 * n):
        partner = (k + n) % (2 * n)
        cos = [torch.dot(z[k], z[j]) / (z[k].norm() * z[j].norm()) for j in range(2 * n)]
        denominator = sum(torch.exp(cos[j] / temperature) for j in range(2 * n) if j != k)
        losses.append(-torch.log(torch.exp(cos[partner] / temperature) / denominator))
    return _mean(losses)


def _sam_point(value_at, theta: torch.Tensor, rho: float) -> torch.Tensor:
    """theta + rho * g / ||g|| with g the gradient of value_at at theta, detached (SAM's ascent)."""
    leaf = theta.detach().clone().requires_grad_(True)
    g = torch.autograd.grad(value_at(leaf), leaf)[0]
    return theta + (rho * g / g.norm()).detach()


class _Views:
    """A deterministic augmentation: the k-th call adds the k-th seeded noise (reset to replay)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(self.calls))


def _oracle_cases(composer: Composer):
    """name -> (loss_fn, batch, oracle(coefficients) -> value), and the augmentation to replay.
    Heads are fixed seeded linears; the oracles run ``composer`` at explicit coefficients."""

    def _composer_at(coefficients: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return composer(xs, coefficients=coefficients)

    head = _head()
    heads = {"a": _head(4, 1), "b": _head(3, 2)}
    x, x2 = _images(12, 3), _images(10, 4)
    y = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(0))
    y3 = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(1))
    views = _Views()

    def ce(c, xs=x, ys=y, h=head):
        return _oracle_ce(h(_composer_at(c, xs)), ys)

    def multitask(c):
        return ce(c, x, y, heads["a"]) + ce(c, x2, y3, heads["b"])

    def negation_clamped(c):
        target = heads["a"](_composer_at(c, x))
        terms = [torch.clamp(_ce_row(target[i], int(y[i])), max=math.log(4)) for i in range(len(y))]
        return -_mean(terms) + ce(c, x2, y3, heads["b"])

    def entropy_value(c):
        return _oracle_entropy(head(_composer_at(c, x)))

    def reliable_entropy(c, margin):
        logits = head(_composer_at(c, x))
        kept = [_entropy_row(logits[i]) for i in range(len(x)) if float(_entropy_row(logits[i]).detach()) < margin]
        return _mean(kept)

    margin = _sar_margin(composer, head, x)

    def sar_value(c):
        # First pass: reliable samples at theta; SAM step on their mean entropy; second pass: the same
        # samples at the perturbed point, kept again if still below the margin.
        logits = head(_composer_at(c, x))
        first = [i for i in range(len(x)) if float(_entropy_row(logits[i]).detach()) < margin]
        moved = head(_composer_at(_sam_point(lambda leaf: reliable_entropy(leaf, margin), c, 0.05), x))
        second = [_entropy_row(moved[i]) for i in first if float(_entropy_row(moved[i]).detach()) < margin]
        return _mean(second)

    def simclr_value(c):
        views.calls = 0
        v1, v2 = views(x), views(x)
        return _oracle_nt_xent(head(_composer_at(c, v1)), head(_composer_at(c, v2)), 0.5).float()

    def sam_ce(c):
        return ce(_sam_point(ce, c, 0.05))

    return {
        "cross_entropy": (cross_entropy(head), (x, y), ce),
        "multitask": (multitask_cross_entropy(heads), [(x, y, "a"), (x2, y3, "b")], multitask),
        "negation": (negation(heads["a"], heads["b"]), ((x, y), (x2, y3)), negation_clamped),
        "entropy": (entropy(head), x, entropy_value),
        "sar_no_sam": (sar(head, e_margin=margin, rho=0.0), (x, y), lambda c: reliable_entropy(c, margin)),
        "sar": (sar(head, e_margin=margin, rho=0.05), (x, y), sar_value),
        "simclr": (simclr(head, views), x, simclr_value),
        "sam_cross_entropy": (sharpness_aware(cross_entropy(head), 0.05), (x, y), sam_ce),
    }, views


def _sar_margin(composer: Composer, head: nn.Module, x: torch.Tensor) -> float:
    """A margin between the smallest and largest entropies at the start, so SAR's filter really filters."""
    with torch.no_grad():
        values = softmax_entropy(head(composer(x))).sort().values
    # Halfway between the two middle entropies: no sample sits on the margin, where float rounding in
    # one forward path or another would decide whether it counts as reliable.
    middle = len(values) // 2
    return float((values[middle - 1] + values[middle]) / 2)


@pytest.mark.parametrize(
    "name", ["cross_entropy", "multitask", "negation", "entropy", "sar_no_sam", "sar", "simclr", "sam_cross_entropy"]
)
def test_objective_value_and_gradient_match_a_hand_computation(name):
    composer = _composer()
    _random = torch.rand(composer.coefficients.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        composer.coefficients.copy_(0.6 * _random)
    cases, views = _oracle_cases(composer)
    loss_fn, batch, oracle = cases[name]
    theta = composer.coefficients.detach().clone()

    leaf = theta.clone().requires_grad_(True)
    expected = oracle(leaf)
    expected_grad = torch.autograd.grad(expected, leaf)[0]
    views.calls = 0
    got = loss_fn(composer, batch)
    got.backward()
    assert torch.allclose(got.detach(), expected.detach(), rtol=1e-5, atol=1e-6), (float(got), float(expected))
    assert torch.allclose(composer.coefficients.grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert float(expected_grad.abs().sum()) > 0  # the objective does reach the coefficients

    # One plain SGD step through fit lands exactly where the hand gradient says.
    composer.coefficients.grad = None
    views.calls = 0
    fit(composer, loss_fn, Loader(lambda generator: [batch], steps=1),
        TrainConfig(epochs=1, lr=0.1, max_grad_norm=None, warmup_fraction=0.0, progress=False),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.1))
    assert torch.allclose(composer.coefficients.detach(), theta - 0.1 * expected_grad, atol=1e-6)


def test_sar_oracle_case_really_filters():
    """The margin of the SAR cases above keeps some samples and drops others (else the filter is untested)."""
    composer = _composer()
    head, x = _head(), _images(12, 3)
    with torch.no_grad():
        values = softmax_entropy(head(composer(x)))
    kept = int((values < _sar_margin(composer, head, x)).sum())
    assert 0 < kept < len(x)


def _oracle_ufm_loss(weak, strong, targets, threshold, hard):
    """UFM (aTLAS's unsupervised FixMatch) per sample: target = one-hot trusted label, else the weak
    view's softmax (or its argmax one-hot); kept when the target's largest entry exceeds the
    threshold; loss = -sum_c target_c log softmax(strong)_c; mean over kept samples, 0 when none."""
    total, kept = torch.zeros((), dtype=torch.float64), 0
    classes = weak.shape[1]
    for i in range(weak.shape[0]):
        if targets is not None and int(targets[i]) >= 0:
            target = torch.zeros(classes, dtype=torch.float64)
            target[int(targets[i])] = 1.0
        else:
            target = _softmax_row(weak[i].double())
            if hard:
                one = torch.zeros(classes, dtype=torch.float64)
                one[int(target.argmax())] = 1.0
                target = one
        if float(target.max()) > threshold:
            total = total - (target * torch.log(_softmax_row(strong[i].double()))).sum()
            kept += 1
    return total / max(kept, 1)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.6, 0.95])
def test_ufm_loss_matches_a_per_sample_loop(threshold, hard):
    generator = torch.Generator().manual_seed(5)
    weak = torch.randn(20, 4, generator=generator) * 3
    strong = torch.randn(20, 4, generator=generator)
    targets = torch.full((20,), -1, dtype=torch.long)
    targets[[2, 7, 11]] = torch.tensor([3, 0, 1])
    for t in (None, targets):
        got = ufm_loss(weak, strong, t, threshold=threshold, hard=hard)
        expected = _oracle_ufm_loss(weak, strong, t, threshold, hard)
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6), (threshold, hard, t is None)
    # The cases above are not degenerate: some samples kept, and (above 0) some dropped.
    confidence = weak.softmax(-1).max(-1).values
    assert 0 < int((confidence > threshold).sum()) <= 20
