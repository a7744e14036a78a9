"""Sparse (gated) per-sample composition and the auto runner (issue 13): same predictions as vmap."""

from __future__ import annotations

import copy

import pytest
import torch
from synthetic import tiny_vit_bank
from torch.func import functional_call

from taskvec.compose import Composer
from taskvec.variational import VariationalComposer, VariationalConfig
from taskvec.variational.persample import AutoRunner, LinearRunner, UnsupportedModuleError, VmapRunner, make_runner
from taskvec.vectors import TaskVector


def _per_sample_oracle(
    composer: Composer, vectors: list[TaskVector], x: torch.Tensor, coefficients: torch.Tensor
) -> torch.Tensor:
    """Independent: write each sample's weights out by hand and run the base on that sample alone."""
    rows = []
    base_params = dict(composer.base.named_parameters())
    for s in range(x.shape[0]):
        weights = {}
        for name in composer.block_names:
            column = int(composer.layout.blocks[name].columns[0])
            delta = sum(coefficients[s, i, column] * vectors[i][name] for i in range(len(vectors)))
            weights[name] = base_params[name].detach() + delta
        rows.append(functional_call(composer.base, weights, (x[s : s + 1],)))
    return torch.cat(rows)


def _gated(batch: int, n: int, columns: int, kept: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, n, columns, generator=generator)
    keep = torch.rand(batch, n, columns, generator=generator) < kept
    return torch.where(keep, mu, torch.zeros_like(mu))


@pytest.mark.parametrize("kept", [0.0, 0.1, 0.3])
def test_sparse_linear_runner_equals_vmap_and_oracle(base, bank, images, kept):
    composer = Composer(base, bank, "block")
    coefficients = _gated(images.shape[0], len(bank), composer.layout.num_columns, kept, seed=int(kept * 10))
    expected = _per_sample_oracle(composer, bank, images, coefficients)
    sparse = LinearRunner(composer, sparse=True)
    dense = LinearRunner(composer, sparse=False)
    with torch.no_grad():
        got = sparse(images, coefficients)
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(dense(images, coefficients), expected, atol=1e-5)
        assert torch.allclose(VmapRunner(composer, 2)(images, coefficients), expected, atol=1e-5)


def test_sparse_runner_on_tiny_vit_linear_layers():
    vit, bank, blocks = tiny_vit_bank(3)
    composer = Composer(vit, bank, "block", blocks=blocks)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    coefficients = _gated(5, 3, composer.layout.num_columns, 0.15, seed=7)
    with torch.no_grad():
        expected = VmapRunner(composer, None)(x, coefficients)
        assert torch.allclose(LinearRunner(composer, sparse=True)(x, coefficients), expected, atol=1e-5)


def test_auto_runner_uses_sparse_hooks_without_grad_and_vmap_with_grad(base, bank, images, monkeypatch):
    composer = Composer(base, bank, "block")
    runner = make_runner(composer, "auto", 4)
    assert isinstance(runner, AutoRunner) and runner.linear is not None
    calls: list[str] = []
    for name, part in (("linear", runner.linear), ("vmap", runner.vmap)):
        original = type(part).__call__
        monkeypatch.setattr(part, "__class__", type(f"Spy{name}", (type(part),), {
            "__call__": lambda self, *a, _n=name, _o=original, **k: (calls.append(_n), _o(self, *a, **k))[1]
        }))
    coefficients = _gated(images.shape[0], len(bank), composer.layout.num_columns, 0.1, seed=3)
    with torch.no_grad():
        inferred = runner(images, coefficients)
    assert calls[-1] == "linear"
    trained = runner(images, coefficients.clone().requires_grad_(True))
    assert calls[-1] == "vmap"
    assert torch.allclose(inferred, trained.detach(), atol=1e-5)


def test_variational_auto_predictions_equal_vmap(base, bank, images):
    composer = Composer(base, bank, "block", init=0.2)
    torch.manual_seed(0)
    models = {}
    for method in ("vmap", "auto"):
        model = VariationalComposer(composer, feature_dim=5, config=VariationalConfig(method=method, hidden=(16,)))
        if method == "vmap":
            with torch.no_grad():
                model.inference.out.weight.normal_(0.0, 1.0)
            state = copy.deepcopy(model.inference.state_dict())
        else:
            model.inference.load_state_dict(state)
        models[method] = model.eval()
    with torch.no_grad():
        a, b = models["vmap"](images), models["auto"](images)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_sparse_runners_with_batchnorm_statistics_in_and_out_of_place(base, bank, images):
    """A frozen BatchNorm runs as one per-sample multiply-add on its input built from the running mean and
    variance: non-trivial statistics make that fold visible; with and without autograd, sparse and dense,
    it equals the hand-written per-sample oracle."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        base.bn.running_mean.copy_(torch.randn(8, generator=generator))
        base.bn.running_var.copy_(torch.rand(8, generator=generator) + 0.5)
    composer = Composer(base, bank, "block")
    coefficients = _gated(images.shape[0], len(bank), composer.layout.num_columns, 0.3, seed=12)
    expected = _per_sample_oracle(composer, bank, images, coefficients)
    for sparse in (True, False):
        runner = LinearRunner(composer, sparse=sparse)
        with torch.no_grad():
            assert torch.allclose(runner(images, coefficients), expected, atol=1e-5), sparse
        leaf = coefficients.clone().requires_grad_(True)
        out = runner(images, leaf)
        assert torch.allclose(out.detach(), expected, atol=1e-5), sparse
        out.square().sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


class _Pointwise(torch.nn.Module):
    """A stride-4 stem down to 2x2 maps, a 1x1 expansion, a BatchNorm, a depthwise conv with a channel
    multiplier and bias, a stride-2 depthwise conv in another padding mode, and a 1x1 projection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.expand = torch.nn.Conv2d(6, 12, 1)
        self.bn = torch.nn.BatchNorm2d(12, affine=True)
        self.depthwise = torch.nn.Conv2d(12, 24, 3, padding=1, groups=12)
        self.reflected = torch.nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, padding_mode="reflect")
        self.project = torch.nn.Conv2d(24, 4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(torch.relu(self.bn(self.expand(self.stem(x)))))
        return self.project(self.reflected(x)).flatten(1)


def _random_statistics(bn: torch.nn.modules.batchnorm._BatchNorm, generator: torch.Generator) -> None:
    """Running statistics and affine parameters far from the identity, so a BatchNorm fold that drops one shows."""
    width = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(width, generator=generator))
        bn.running_var.copy_(torch.rand(width, generator=generator) + 0.5)
        bn.weight.copy_(torch.rand(width, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(width, generator=generator))


def _noisy_bank(base: torch.nn.Module, generator: torch.Generator, scale: float, prefix: str) -> list[TaskVector]:
    """Three task vectors: seeded noise of ``scale`` on every parameter of ``base``."""
    bank = []
    for i in range(3):
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            for param in tuned.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * scale)
        bank.append(TaskVector.from_models(base, tuned, name=f"{prefix}{i}"))
    return bank


def _pointwise_bank(seed: int = 0) -> tuple[torch.nn.Module, list[TaskVector]]:
    torch.manual_seed(seed)
    base = _Pointwise().eval()
    generator = torch.Generator().manual_seed(seed + 1)
    _random_statistics(base.bn, generator)
    return base, _noisy_bank(base, generator, 0.2, "p")


def _assert_gradients_match_vmap(runner, composer: Composer, x: torch.Tensor, coefficients: torch.Tensor,
                                 expected: torch.Tensor | None = None) -> None:
    """With autograd: the runner's output (against ``expected`` when given) and coefficient gradients against vmap's."""
    leaf = coefficients.clone().requires_grad_(True)
    out = runner(x, leaf)
    if expected is not None:
        assert torch.allclose(out.detach(), expected, atol=1e-5)
    out.square().sum().backward()
    reference = coefficients.clone().requires_grad_(True)
    VmapRunner(composer, None)(x, reference).square().sum().backward()
    assert torch.allclose(leaf.grad, reference.grad, atol=1e-4)


def _spy_sample_weights(monkeypatch) -> list[torch.nn.Module]:
    """The modules that run with per-sample weights, in call order."""
    calls: list[torch.nn.Module] = []
    original = LinearRunner._sample_weights_product
    monkeypatch.setattr(LinearRunner, "_sample_weights_product",
                        staticmethod(lambda module, *a: calls.append(module) or original(module, *a)))
    return calls


def test_pointwise_convs_on_small_maps_run_as_one_gemm_and_match_the_oracle(monkeypatch):
    from taskvec.variational import persample

    base, bank = _pointwise_bank()
    x = torch.randn(9, 3, 8, 8, generator=torch.Generator().manual_seed(2))  # 2x2 maps after the stem
    composer = Composer(base, bank, "block")
    coefficients = _gated(9, 3, composer.layout.num_columns, 0.4, seed=4)
    expected = _per_sample_oracle(composer, bank, x, coefficients)
    gemms = []
    original = persample._pointwise_gemm
    monkeypatch.setattr(persample, "_pointwise_gemm", lambda *a: gemms.append(1) or original(*a))
    runner = LinearRunner(composer, sparse=True)
    with torch.no_grad():
        assert torch.allclose(runner(x, coefficients), expected, atol=1e-5)
    assert gemms  # the 1x1 convs took the GEMM path
    _assert_gradients_match_vmap(runner, composer, x, coefficients, expected)


@pytest.mark.parametrize("sparse", [True, False])
def test_depthwise_convs_run_with_per_sample_kernels(sparse, monkeypatch):
    """Depthwise convs (channel multiplier 2, bias) run as one convolution with per-sample kernels; the
    reflect-padded one keeps the hooks. Outputs against the hand-written oracle, gradients against vmap."""
    from taskvec.variational import persample

    base, bank = _pointwise_bank(5)
    x = torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    composer = Composer(base, bank, "block")
    coefficients = _gated(7, 3, composer.layout.num_columns, 0.3, seed=10)
    expected = _per_sample_oracle(composer, bank, x, coefficients)
    calls = _spy_sample_weights(monkeypatch)
    runner = LinearRunner(composer, sparse=sparse)
    with torch.no_grad():
        assert torch.allclose(runner(x, coefficients), expected, atol=1e-5)
    assert calls == [composer.base.depthwise]
    assert persample._depthwise(composer.base.reflected) is False
    _assert_gradients_match_vmap(runner, composer, x, coefficients)


def test_batchnorm_fold_keeps_the_base_bias_and_restores_forward():
    base, bank = _pointwise_bank(3)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    composer = Composer(base, bank, "block", blocks=["bn.weight", "expand.weight"])  # bn.bias stays theta_0
    coefficients = _gated(5, 3, composer.layout.num_columns, 0.5, seed=8)
    expected = _per_sample_oracle(composer, bank, x, coefficients)
    runner = LinearRunner(composer, sparse=True)
    with torch.no_grad():
        assert torch.allclose(runner(x, coefficients), expected, atol=1e-5)
        bn = composer.base.bn
        assert "forward" not in vars(bn)
        with pytest.raises(ValueError, match="per-sample coefficients have shape"):
            runner(x, coefficients[:, :2])
        assert "forward" not in vars(bn)
        broken = _gated(5, 3, composer.layout.num_columns, 0.5, seed=8)
        original = composer.base.project.forward
        composer.base.project.forward = lambda t: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            runner(x, broken)
        assert "forward" not in vars(bn)  # restored although the pass failed
        composer.base.project.forward = original


def test_a_module_whose_forward_is_replaced_on_the_instance_is_refused():
    base, bank = _pointwise_bank(4)
    base.bn.forward = lambda t: t  # type: ignore[method-assign]
    composer = Composer(base, bank, "block", copy_base=False)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm2d 'bn'"):
        LinearRunner(composer)


def test_pointwise_gemm_with_more_threads_covers_larger_maps():
    from taskvec.variational import persample

    base, bank = _pointwise_bank(6)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # 8x8 maps after the stem
    composer = Composer(base, bank, "block")
    coefficients = _gated(6, 3, composer.layout.num_columns, 0.3, seed=5)
    expected = _per_sample_oracle(composer, bank, x, coefficients)
    maps = torch.zeros(6, 6, 8, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not persample._pointwise(composer.base.expand, maps)  # 64 pixels: the convolution, one thread
        torch.set_num_threads(2)
        assert persample._pointwise(composer.base.expand, maps)
        with torch.no_grad():
            assert torch.allclose(LinearRunner(composer, sparse=True)(x, coefficients), expected, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


class _Tokens(torch.nn.Module):
    """Linear layers on 96 tokens per sample around a LayerNorm, then a Conv1d over the tokens (stride 2)
    and a per-token Linear without a composed bias: the shapes where per-sample weights pay."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(5, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.mix = torch.nn.Conv1d(8, 6, 3, stride=2, padding=1)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.embed(x)))  # (B, 96, 8)
        h = self.mix(h.transpose(1, 2)).transpose(1, 2)  # (B, 48, 6)
        return self.out(h).flatten(1)


def _tokens_composer(seed: int, blocks: list[str] | None = None) -> tuple[Composer, list[TaskVector]]:
    torch.manual_seed(seed)
    base = _Tokens()
    bank = _noisy_bank(base, torch.Generator().manual_seed(seed + 1), 0.3, "k")
    return Composer(base, bank, "block", blocks=blocks), bank


@pytest.mark.parametrize("kept", [0.5, 1.0])
def test_linear_and_conv_on_many_positions_run_with_per_sample_weights(kept, monkeypatch):
    """Linears on 96 and 48 tokens and a strided Conv1d on 96 positions take the per-sample weights (one batched
    product, one convolution with the samples as groups); outputs equal the hand-written oracle, gradients
    vmap's, sparse and dense, gated and all kept."""
    composer, bank = _tokens_composer(0)
    x = torch.randn(6, 96, 5, generator=torch.Generator().manual_seed(1))
    coefficients = _gated(6, 3, composer.layout.num_columns, kept, seed=2)
    expected = _per_sample_oracle(composer, bank, x, coefficients)
    calls = _spy_sample_weights(monkeypatch)
    for sparse in (True, False):
        runner = LinearRunner(composer, sparse=sparse)
        calls.clear()
        with torch.no_grad():
            assert torch.allclose(runner(x, coefficients), expected, atol=1e-5), sparse
        base = composer.base
        assert {id(m) for m in calls} == {id(base.embed), id(base.mix), id(base.out)}, sparse
        _assert_gradients_match_vmap(runner, composer, x, coefficients, expected)


def test_per_sample_weights_keep_an_uncomposed_bias_and_skip_modules_with_nothing_kept(monkeypatch):
    """``out.bias`` stays theta_0 (not composed) and must still be added; a module whose kept components are
    all zero for the whole batch runs its shared product only."""
    composer, bank = _tokens_composer(3, blocks=["embed.weight", "mix.weight", "mix.bias", "out.weight"])
    x = torch.randn(4, 96, 5, generator=torch.Generator().manual_seed(4))
    coefficients = _gated(4, 3, composer.layout.num_columns, 0.5, seed=5)
    column = int(composer.layout.blocks["embed.weight"].columns[0])
    coefficients[:, :, column] = 0.0  # nothing kept for the embedding
    expected = _per_sample_oracle(composer, bank, x, coefficients)
    calls = _spy_sample_weights(monkeypatch)
    with torch.no_grad():
        assert torch.allclose(LinearRunner(composer, sparse=True)(x, coefficients), expected, atol=1e-5)
    assert composer.base.embed not in calls and composer.base.out in calls


def test_one_by_one_convs_on_large_maps_run_as_a_batched_product_and_small_ones_keep_the_corrections(monkeypatch):
    from taskvec.variational import persample

    base, bank = _pointwise_bank(7)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(8))  # 8x8 maps after the stem
    composer = Composer(base, bank, "block")
    coefficients = _gated(5, 3, composer.layout.num_columns, 0.3, seed=9)
    expected = _per_sample_oracle(composer, bank, x, coefficients)
    calls = _spy_sample_weights(monkeypatch)
    products = []
    bmm = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: products.append(1) or bmm(*a, **k))
    with torch.no_grad():
        assert torch.allclose(LinearRunner(composer, sparse=True)(x, coefficients), expected, atol=1e-5)
    net = composer.base
    assert net.stem in calls and net.expand in calls and net.depthwise in calls and products  # 64 pixels
    assert net.project not in calls  # 4x4 maps after the stride-2 conv, ~1 kept component: corrections
    maps = torch.zeros(5, 6, 4, 4)
    assert not persample._with_sample_weights(net.expand, "conv", maps, 5, 1.0)  # 16 positions x 1
    assert persample._with_sample_weights(net.expand, "conv", maps, 5, 2.0)
    assert not persample._with_sample_weights(net.expand, "conv", maps, 5, 0.0)
    assert not persample._with_sample_weights(net.reflected, "conv", torch.zeros(5, 24, 16, 16), 5, 3.0)
    monkeypatch.setattr(persample, "PER_SAMPLE_BYTES", 5 * 12 * 6 * 4 - 1)  # under 5 samples' expand weights
    assert not persample._with_sample_weights(net.expand, "conv", maps, 5, 2.0)  # large: 32 < 128 per sample
    assert persample._with_sample_weights(net.expand, "conv", maps, 5, 8.0)
    monkeypatch.setattr(persample, "LARGE_PER_SAMPLE_BYTES", 5 * 12 * 6 * 4 - 1)
    assert not persample._with_sample_weights(net.expand, "conv", maps, 5, 8.0)  # too large at any work
    calls.clear()
    with torch.no_grad():
        assert torch.allclose(LinearRunner(composer, sparse=True)(x, coefficients), expected, atol=1e-5)
    assert not calls  # every weight of this net is at least as large: all corrections


def test_batchnorm_fold_on_large_maps_runs_batchnorms_own_kernel(monkeypatch):
    """On maps of >= 256 pixels the per-sample scale and shift run through F.batch_norm over B x C channels
    with zero mean and unit variance: outputs equal the oracle, gradients vmap's."""
    base, bank = _pointwise_bank(8)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(10))  # 16x16 maps at the BatchNorm
    composer = Composer(base, bank, "block")
    coefficients = _gated(3, 3, composer.layout.num_columns, 0.5, seed=11)
    expected = _per_sample_oracle(composer, bank, x, coefficients)
    widths = []
    original = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm",
                        lambda t, *a, **k: widths.append(t.shape[1]) or original(t, *a, **k))
    runner = LinearRunner(composer, sparse=True)
    with torch.no_grad():
        assert torch.allclose(runner(x, coefficients), expected, atol=1e-5)
    assert widths == [3 * 12]
    _assert_gradients_match_vmap(runner, composer, x, coefficients)


class _TwoNorms(torch.nn.Module):
    """BatchNorms of two widths (6 and 12), so the stacked per-sample scale and shift are padded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(6)
        self.expand = torch.nn.Conv2d(6, 12, 1)
        self.bn2 = torch.nn.BatchNorm2d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.expand(torch.relu(self.bn1(self.conv(x))))).mean((2, 3))


def test_batchnorms_of_different_widths_with_partly_composed_parameters_and_changed_statistics():
    """bn1 composes only its bias, bn2 only its weight; then a running statistic changes in place between two
    calls, and the stacked table must follow it. Every output against the hand-written oracle."""
    torch.manual_seed(12)
    base = _TwoNorms().eval()
    generator = torch.Generator().manual_seed(13)
    for bn in (base.bn1, base.bn2):
        _random_statistics(bn, generator)
    bank = _noisy_bank(base, generator, 0.3, "b")
    composer = Composer(base, bank, "block", blocks=["conv.weight", "bn1.bias", "expand.weight", "bn2.weight"])
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(14))
    coefficients = _gated(4, 3, composer.layout.num_columns, 0.5, seed=15)
    runner = LinearRunner(composer, sparse=True)
    with torch.no_grad():
        assert torch.allclose(runner(x, coefficients), _per_sample_oracle(composer, bank, x, coefficients), atol=1e-5)
        composer.base.bn2.running_mean.add_(1.0)
        composer.base.bn1.running_var.mul_(2.0)
        changed = _per_sample_oracle(composer, bank, x, coefficients)
        assert torch.allclose(runner(x, coefficients), changed, atol=1e-5)


def test_batchnorm_table_follows_statistics_that_are_inference_tensors():
    """A network built under inference_mode has buffers without a version counter: the table is rebuilt on
    every call, so a statistic changed in place (inside inference_mode) still shows."""
    with torch.inference_mode():
        base, bank = _pointwise_bank(9)
        composer = Composer(base, bank, "block")
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(12))
        coefficients = _gated(4, 3, composer.layout.num_columns, 0.5, seed=13)
        runner = LinearRunner(composer, sparse=True)
        assert torch.allclose(runner(x, coefficients), _per_sample_oracle(composer, bank, x, coefficients), atol=1e-5)
        composer.base.bn.running_mean.add_(1.0)
        assert torch.allclose(runner(x, coefficients), _per_sample_oracle(composer, bank, x, coefficients), atol=1e-5)
