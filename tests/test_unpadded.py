"""The unpadded BERT forward against transformers' own padded forward (the oracle), in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hf_tiny import bert, gpt2, perturbed
from torch.func import functional_call

import taskvec.models.hf as hf_module
from taskvec.compose import Composer
from taskvec.models.hf import HFTextEncoder
from taskvec.models.unpadded import batch_first_activations, supports_unpadded, unpadded_mean_pool
from taskvec.vectors import TaskVector


def _batch(seed: int = 0, batch: int = 5, length: int = 11, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (batch, length), generator=generator)
    lengths = torch.tensor([length, 1, 3, 7, 2])[:batch]  # one full row, one single-token row
    columns = torch.arange(length)
    mask = (columns >= length - lengths[:, None]) if left else (columns < lengths[:, None])
    return ids * mask, mask.long()  # padding id 0


def _stock_pool(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def test_unpadded_pool_and_gradients_equal_the_padded_forward():
    for left in (False, True):
        model = bert(0).double()
        ids, mask = _batch(left=left)
        probe = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        results = []
        for pool in (_stock_pool, unpadded_mean_pool):
            model.zero_grad(set_to_none=True)
            out = pool(model, ids, mask)
            (out @ probe).pow(2).sum().backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            results.append((out.detach(), grads))
        (expected, expected_grads), (got, got_grads) = results
        assert torch.allclose(got, expected, atol=1e-10), (got - expected).abs().max()
        # the pooler is unused by a mean pool; every other parameter gets a gradient on both paths
        assert set(got_grads) == set(expected_grads) and not any(k.startswith("pooler") for k in got_grads)
        for name, grad in expected_grads.items():
            assert torch.allclose(got_grads[name], grad, atol=1e-10), name


def test_encoder_takes_the_unpadded_path_only_where_it_is_exact(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return unpadded_mean_pool(*args, **kwargs)

    monkeypatch.setattr(hf_module, "unpadded_mean_pool", counting)
    model = bert(0).double()
    encoder = HFTextEncoder(model)
    ids, mask = _batch()
    expected = F.normalize(_stock_pool(model, ids, mask), dim=-1)
    with torch.no_grad():
        assert torch.allclose(encoder(ids, mask), expected, atol=1e-10) and len(calls) == 1
        encoder(ids, torch.ones_like(mask))  # nothing to skip: the stock forward
        encoder(ids, mask, output_attentions=True)  # extra outputs asked for: stock
        with batch_first_activations():  # per-sample hooks need (B, L, ...) activations: stock
            assert torch.allclose(encoder(ids, mask), expected, atol=1e-10)
        encoder.unpadded = False
        assert torch.allclose(encoder(ids, mask), expected, atol=1e-10)
        encoder.unpadded = True
        model.set_attn_implementation("eager")  # what linearised (jvp) models use: stock
        assert not supports_unpadded(model)
        assert torch.allclose(encoder(ids, mask), expected, atol=1e-10)
    assert len(calls) == 1
    assert not supports_unpadded(gpt2(0))
    assert not supports_unpadded(bert(0, position_embedding_type="relative_key"))


def test_composed_encoder_swaps_parameters_into_the_unpadded_path():
    model = bert(0).double()
    tuned = perturbed(model, 1)
    vector = TaskVector.from_models(model, tuned, name="ft")
    ids, mask = _batch(seed=3)
    composer = Composer(HFTextEncoder(model), [vector], "block", init=0.7)
    out = composer(ids, mask)
    expected_model = perturbed(model, 1)
    with torch.no_grad():
        for (name, param), base in zip(expected_model.named_parameters(), model.parameters(), strict=True):
            param.copy_(base + 0.7 * (dict(tuned.named_parameters())[name] - base))
    expected = F.normalize(_stock_pool(expected_model, ids, mask), dim=-1)
    assert torch.allclose(out, expected, atol=1e-9)
    out.sum().backward()  # the coefficients get gradients through the unpadded path
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in composer.parameters() if p.requires_grad)
    # functional_call on the wrapper: the swapped-in weights are the ones used
    encoder = HFTextEncoder(model)
    swapped = {name: p.detach() for name, p in HFTextEncoder(expected_model).named_parameters()}
    with torch.no_grad():
        assert torch.allclose(functional_call(encoder, swapped, (ids, mask)), expected, atol=1e-9)
