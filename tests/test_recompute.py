"""Module-by-module composition with recomputation: same outputs and gradients, no whole composed copy."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from synthetic import tiny_vit_bank
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from taskvec.compose import Composer
from taskvec.recompute import RecomputeError
from taskvec.vectors import TaskVector


def _output_and_grad(composer: Composer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    composer.coefficients.grad = None
    out = composer(x)
    out.square().sum().backward()
    return out.detach(), composer.coefficients.grad.clone()


@pytest.mark.parametrize("granularity", ["block", "isotropic"])
def test_recompute_equals_the_standard_forward_on_a_cnn(base, bank, images, granularity):
    standard = Composer(base, bank, granularity, init=0.4)
    recomputed = Composer(base, bank, granularity, init=0.4, recompute=True)
    with torch.no_grad():
        noise = torch.randn(standard.coefficients.shape, generator=torch.Generator().manual_seed(3)) * 0.3
        standard.coefficients.add_(noise)
        recomputed.coefficients.add_(noise)
    expected, expected_grad = _output_and_grad(standard, images)
    got, got_grad = _output_and_grad(recomputed, images)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got_grad, expected_grad, atol=1e-6, rtol=1e-5)


def test_recompute_on_a_vit_with_root_owned_blocks():
    vit, bank, _blocks = tiny_vit_bank(2)
    tuned = copy.deepcopy(vit)
    with torch.no_grad():  # a vector that also moves the root's cls_token / pos_embed
        for param in tuned.parameters():
            param.add_(0.05)
    bank = [*bank, TaskVector.from_models(vit, tuned, name="all")]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected, expected_grad = _output_and_grad(Composer(vit, bank, "block", init=0.3), x)
    got, got_grad = _output_and_grad(Composer(vit, bank, "block", init=0.3, recompute=True), x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got_grad, expected_grad, atol=1e-5, rtol=1e-4)
    assert vit.cls_token.grad is None  # the caller's model is untouched


def _live_composed(composer: Composer, x: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(composed blocks made, whose memory is still held after the forward, output): each block's storage
    is tracked by a weak reference, so a view autograd saved (a Linear's transposed weight) counts too."""
    made: list[StorageWeakRef] = []
    original = composer.compose_entries

    def tracking(*args, **kwargs):
        out = original(*args, **kwargs)
        made.extend(StorageWeakRef(t.untyped_storage()) for t in out)
        return out

    composer.compose_entries = tracking  # type: ignore[method-assign]
    out = composer(x)
    alive = sum(not ref.expired() for ref in made)
    return len(made), alive, out


def test_recompute_keeps_no_composed_block_between_forward_and_backward(base, bank, images):
    recomputed = Composer(base, bank, "block", init=0.4, recompute=True)
    recomputed(images)  # the first call also runs the standard-path check
    made, alive, out = _live_composed(recomputed, images)
    assert made > 0 and alive == 0
    out.sum().backward()  # the backward pass composes the saved blocks again
    assert recomputed.coefficients.grad is not None and recomputed.coefficients.grad.abs().sum() > 0
    # the oracle: the standard path holds its composed blocks until the backward pass
    made, alive, out = _live_composed(Composer(base, bank, "block", init=0.4), images)
    assert alive > 0
    # Linear layers save a transposed view of their weight: the view must not keep the block alive either
    vit, vit_bank, blocks = tiny_vit_bank(2)
    composer = Composer(vit, vit_bank, "block", init=0.3, blocks=blocks, recompute=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    made, alive, out = _live_composed(composer, x)
    assert made > 0 and alive == 0
    out.square().sum().backward()
    expected, expected_grad = _output_and_grad(Composer(vit, vit_bank, "block", init=0.3, blocks=blocks), x)
    assert torch.allclose(out.detach(), expected, atol=1e-5)
    assert torch.allclose(composer.coefficients.grad, expected_grad, atol=1e-5, rtol=1e-4)


class _ParentReadsChild(nn.Module):
    def __init__(self, also_call_child: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.also_call_child = also_call_child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.also_call_child:
            x = self.fc(x)
        return F.linear(x, self.fc.weight)  # the child's weight used outside the child's forward


@pytest.mark.parametrize("also_call_child", [False, True])
def test_recompute_refuses_blocks_used_outside_their_module(also_call_child):
    torch.manual_seed(0)
    model = _ParentReadsChild(also_call_child)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.fc.weight.add_(1.0)
    composer = Composer(model, [TaskVector.from_models(model, tuned)], "block", init=0.5, recompute=True)
    with pytest.raises(RecomputeError, match="recompute=False"):
        composer(torch.randn(2, 4))
    assert torch.equal(composer.base.fc.weight, model.fc.weight)  # parameters restored after the error


def test_recompute_on_a_transformers_text_encoder_padded_and_not():
    """transformers reads parameters' dtype outside their modules (allowed); the unpadded and the stock
    forward both compose module by module."""
    from hf_tiny import bert, perturbed

    from taskvec.models.hf import HFTextEncoder

    model = bert(0)
    vector = TaskVector.from_models(model, perturbed(model, 1), name="ft")
    ids = torch.randint(1, 99, (3, 7), generator=torch.Generator().manual_seed(2))
    for mask in (torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2]), torch.ones(3, 7, dtype=torch.long)):
        outputs = []
        for recompute in (False, True):
            composer = Composer(HFTextEncoder(model), [vector], "block", init=0.6, recompute=recompute)
            out = composer(ids, mask)
            out.square().sum().backward()
            outputs.append((out.detach(), composer.coefficients.grad.clone()))
        (expected, expected_grad), (got, got_grad) = outputs
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(got_grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_recompute_with_a_bf16_bank_from_files(base, bank, images, tmp_path):
    """The memory path the ViT-B/32 benchmark takes: bf16 files, memory-mapped, base adopted."""
    paths = [vector.save(tmp_path / f"v{i}.safetensors", dtype=torch.bfloat16) for i, vector in enumerate(bank)]
    expected, expected_grad = _output_and_grad(Composer.from_files(copy.deepcopy(base), paths, "block", init=0.4),
                                               images)
    got, got_grad = _output_and_grad(
        Composer.from_files(copy.deepcopy(base), paths, "block", init=0.4, recompute=True), images)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got_grad, expected_grad, atol=1e-6, rtol=1e-5)
