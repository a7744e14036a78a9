"""Composition replayed as graphs: the eager composer is the oracle.

On CPU the graphs are :class:`EagerReplay` stand-ins (composer.GRAPH_DEVICES is widened), which keep the
static-buffer behaviour that CUDA graphs have; the CUDA tests at the end run the real graphs where a GPU is.
"""

from __future__ import annotations

import copy
import warnings
import weakref

import pytest
import torch

from taskvec.compose import Composer
from taskvec.graphed import EagerReplay, GraphedComposition
from taskvec.vectors import LoraTaskVector

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(Composer, "GRAPH_DEVICES", ("cuda", "cpu"))


def _pair(base, bank, **kwargs) -> tuple[Composer, Composer]:
    return Composer(base, bank, init=0.3, **kwargs), Composer(base, bank, init=0.3, cuda_graphs=True, **kwargs)


def _train(composer: Composer, batches: list[torch.Tensor], autocast: bool = False) -> list[torch.Tensor]:
    """Losses of a few AdamW steps; the coefficients end where the steps took them."""
    optimizer = torch.optim.AdamW([composer.coefficients], lr=0.05)
    losses = []
    device = composer.coefficients.device.type
    for x in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = composer(x).float().square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _batches(images: torch.Tensor, count: int = 3) -> list[torch.Tensor]:
    return [images + 0.1 * i for i in range(count)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_training_follows_the_eager_composer(on_cpu, base, bank, images, dtype):
    bank = [vector.to(dtype) for vector in bank]
    eager, graphed = _pair(base, bank)
    expected = _train(eager, _batches(images))
    got = _train(graphed, _batches(images))
    assert isinstance(graphed._graphed, GraphedComposition)
    assert torch.equal(torch.stack(got), torch.stack(expected))
    assert torch.equal(graphed.coefficients, eager.coefficients)


def test_one_capture_serves_every_step(on_cpu, base, bank, images, monkeypatch):
    captures = []
    original = GraphedComposition.__init__

    def counting(self, *args, **kwargs):
        captures.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(GraphedComposition, "__init__", counting)
    _train(Composer(base, bank, init=0.3, cuda_graphs=True), _batches(images, 4))
    assert len(captures) == 1


def test_two_passes_from_the_same_coefficients_share_one_backward(on_cpu, base, bank, images):
    eager, graphed = _pair(base, bank)
    for composer in (eager, graphed):
        (composer(images).square().sum() + composer(images.flip(0)).sum()).backward()
    assert torch.equal(graphed.coefficients.grad, eager.coefficients.grad)


def test_blocks_from_other_coefficients_are_refused_not_reused(on_cpu, base, bank, images):
    graphed = Composer(base, bank, init=0.3, cuda_graphs=True)
    first = graphed(images, coefficients=graphed.coefficients * 2)
    second = graphed(images)  # rewrites the static blocks the first pass saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (first.sum() + second.sum()).backward()


def test_in_place_changes_of_the_coefficients_are_seen(on_cpu, base, bank, images):
    eager, graphed = _pair(base, bank)
    graphed(images)
    for composer in (eager, graphed):
        composer.coefficients.data.fill_(0.7)  # moves no version: the replay must still read the new values
    with torch.no_grad():
        assert torch.equal(graphed(images), eager(images))
        merged = graphed.merge()
    assert torch.equal(merged(images), eager.merge()(images))


def test_a_moved_bank_is_captured_again(on_cpu, base, bank, images):
    eager, graphed = _pair(base, bank)
    graphed(images)
    first = graphed._graphed
    for composer in (eager, graphed):  # the same new values at a new address in both
        composer._bank.dense_0 = composer._bank.dense_0 * 3
    with torch.no_grad():
        assert torch.equal(graphed(images), eager(images))
    assert graphed._graphed is not first


def test_a_copy_captures_its_own_graphs(on_cpu, base, bank, images):
    eager, graphed = _pair(base, bank)
    graphed(images)
    twin = copy.deepcopy(graphed)
    assert twin._graphed is None
    with torch.no_grad():
        twin.coefficients.fill_(0.9)
        eager.coefficients.fill_(0.9)
        assert torch.equal(twin(images), eager(images))
        assert torch.equal(graphed(images), Composer(base, bank, init=0.3)(images))  # the original is untouched


def test_a_failed_capture_warns_once_and_composes_eagerly(on_cpu, base, bank, images, monkeypatch):
    def refuse(self, function):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(EagerReplay, "capture", refuse)
    eager, graphed = _pair(base, bank)
    with pytest.warns(RuntimeWarning, match="not permitted when stream is capturing"):
        out = graphed(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed(images)
    assert torch.equal(out, eager(images))


def test_graphs_are_unused_on_devices_outside_graph_devices(base, bank, images):
    graphed = Composer(base, bank, init=0.3, cuda_graphs=True)
    graphed(images).sum().backward()
    assert graphed._graphed is None and graphed.coefficients.grad is not None


def test_graphs_refuse_what_they_cannot_replay(base, bank):
    with pytest.raises(ValueError, match="exclude each other"):
        Composer(base, bank, recompute=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="fused composition"):
        Composer(base, bank, linearized=True, cuda_graphs=True)
    weight = next(name for name, p in base.named_parameters() if p.ndim == 2)
    rows, columns = dict(base.named_parameters())[weight].shape
    lora = LoraTaskVector({weight: (torch.randn(2, columns), torch.randn(rows, 2))}, {weight: (rows, columns)})
    with pytest.raises(ValueError, match="fused composition"):
        Composer(base, [*bank, lora], cuda_graphs=True)


# -- real CUDA graphs ------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_graphs_follow_the_eager_composer(base, bank, images, dtype, autocast):
    """Outputs and coefficient gradients at several coefficient values, each set in place between replays.

    GPU kernels (cuDNN's convolution backward under autocast) need not be bitwise repeatable, so the
    comparison has a tolerance, and no optimiser that could amplify tiny differences runs in between."""
    bank = [vector.to(dtype) for vector in bank]
    eager, graphed = (c.cuda() for c in _pair(base, bank))
    x = images.cuda()
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        values = (torch.randn(eager.coefficients.shape, generator=generator) * 0.5).cuda()
        results = []
        for composer in (eager, graphed):
            with torch.no_grad():
                composer.coefficients.copy_(values)
            composer.coefficients.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = composer(x).float()
            out.square().mean().backward()
            results.append((out.detach(), composer.coefficients.grad.clone()))
        (expected, expected_grad), (got, got_grad) = results
        tolerance = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(got, expected, **tolerance)
        scale = expected_grad.abs().max()
        torch.testing.assert_close(got_grad / scale, expected_grad / scale, **tolerance)
    assert isinstance(graphed._graphed, GraphedComposition)
    assert type(graphed._graphed._forward).__name__ == "CudaReplay"


@cuda
def test_cuda_graphs_refuse_stale_blocks_and_recapture_after_a_move(base, bank, images):
    graphed = Composer(base, bank, init=0.3, cuda_graphs=True).cuda()
    x = images.cuda()
    first = graphed(x, coefficients=graphed.coefficients * 2)
    second = graphed(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (first.sum() + second.sum()).backward()
    captured = graphed._graphed
    graphed.double().float()  # every buffer reallocated
    eager = Composer(base, bank, init=0.3).cuda()
    with torch.no_grad():
        torch.testing.assert_close(graphed(x), eager(x))
    assert graphed._graphed is not captured


@cuda
def test_cuda_graph_gradient_matches_an_fp64_oracle(base, bank, images):
    graphed = Composer(base, bank, init=0.3, cuda_graphs=True).cuda()
    oracle = Composer(base, bank, init=0.3).double()
    x = images.cuda()
    graphed(x).square().mean().backward()
    oracle(images.double()).square().mean().backward()
    torch.testing.assert_close(graphed.coefficients.grad.double().cpu(), oracle.coefficients.grad,
                               rtol=1e-4, atol=1e-6)


def test_coefficients_composed_last_are_not_kept_alive(on_cpu, base, bank, images):
    graphed = Composer(base, bank, init=0.3, cuda_graphs=True)
    scaled = graphed.coefficients.detach() * 2
    reference = weakref.ref(scaled)
    with torch.no_grad():
        graphed(images, coefficients=scaled)
    del scaled
    assert reference() is None
