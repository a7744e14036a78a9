"""Sample-specific composition without one model per sample.

Each sample s has its own coefficients c_s (n_vectors, n_columns). Two exact ways to run the batch:

* :class:`VmapRunner` -- ``torch.func.vmap`` over ``Composer.forward(x_s, coefficients=c_s)``: generic
  (any module, linearised composers, LoRA banks); per-sample weights are materialised inside vmap,
  ``chunk_size`` samples at a time, so memory is bounded by ``chunk_size`` copies of the composed blocks.
* :class:`LinearRunner` -- every block enters the network linearly, so
  ``W_s x = W_0 x + sum_j c_sj (T_j x)``: forward hooks on the base's Linear / Conv / LayerNorm /
  GroupNorm / Embedding modules add the per-sample correction to the module's output (an embedding's
  is a lookup of the rows the tokens select, so a transformer's vocabulary is never composed per
  sample: what makes per-sample composition affordable for text encoders); a frozen BatchNorm runs, for
  the call, as its per-sample affine map. The cost of a correction is one extra product per basis tensor
  T_j (a task vector restricted to one coefficient column) on the samples that use it. Where a Linear or
  Conv uses its weight for many positions per sample (large maps, long token sequences) and in every
  depthwise convolution, composing each sample's weight is cheaper: the module then runs once with
  per-sample weights (a batched product, or a convolution whose groups are the samples). Any other owner
  of a composed block is refused with the module's type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_map

from taskvec.compose import Composer
from taskvec.models.unpadded import batch_first_activations


class UnsupportedModuleError(TypeError):
    """A composed block lives in a module the linearity runner cannot correct exactly."""


def _check_coefficients(composer: Composer, x: Tensor, coefficients: Tensor) -> None:
    expected = (x.shape[0], composer.num_vectors, composer.layout.num_columns)
    if tuple(coefficients.shape) != expected:
        raise ValueError(
            f"per-sample coefficients have shape {tuple(coefficients.shape)}; expected {expected} "
            "(batch, n_vectors, n_columns)"
        )


def check_frozen_norms(model: nn.Module) -> None:
    """Per-sample composition needs normalisation statistics that do not mix samples of a batch."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            raise ValueError(
                f"{type(module).__name__} '{name}' uses batch statistics (training mode or no running "
                "stats); per-sample composition needs it in eval mode with running statistics "
                "(Composer(base_eval=True))"
            )


class VmapRunner:
    """vmap over ``Composer.forward`` with per-sample coefficients, ``chunk_size`` samples per slice."""

    def __init__(self, composer: Composer, chunk_size: int | None = 8) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.composer = composer
        self.chunk_size = chunk_size

    def __call__(self, x: Tensor, coefficients: Tensor) -> Tensor:
        _check_coefficients(self.composer, x, coefficients)
        check_frozen_norms(self.composer.base)
        composer = self.composer

        def one(sample: Tensor, coefficient: Tensor):
            out = composer(sample.unsqueeze(0), coefficients=coefficient)
            return tree_map(lambda t: t.squeeze(0), out)

        return vmap(one, in_dims=(0, 0), chunk_size=self.chunk_size)(x, coefficients)


# ----------------------------------------------------------------------------------------------
# Linearity runner
# ----------------------------------------------------------------------------------------------


@dataclass
class _Basis:
    """Non-zero basis tensors of one block and the flat coefficient index (i * C + column) of each."""

    tensors: Tensor  # (m, *block shape), contiguous: tensors[j] is one component, ready for a product
    index: Tensor  # (m,) long
    columns: list[int]  # ``index`` as a list: per-call decisions read it without a tensor operation
    joined: Tensor | None = None  # Linear / Conv weights as (out, m * in, *kernel), made on first dense use

    def fused(self) -> Tensor:
        """Linear / Conv weight components side by side along the input dim: one product for all m (cached)."""
        if self.joined is None:
            stack = self.tensors
            self.joined = stack.transpose(0, 1).reshape(stack.shape[1], -1, *stack.shape[3:]).contiguous()
        return self.joined


_SUPPORTED: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.Embedding,
)


def _supported_kind(module: nn.Module) -> str | None:
    """The kind of correction for ``module``, or None when its forward is not the stock one."""
    for cls, kind in (
        (nn.Linear, "linear"),
        (nn.Conv1d, "conv"),
        (nn.Conv2d, "conv"),
        (nn.Conv3d, "conv"),
        (nn.LayerNorm, "layer_norm"),
        (nn.GroupNorm, "group_norm"),
        (nn.modules.batchnorm._BatchNorm, "batch_norm"),
        (nn.Embedding, "embedding"),
    ):
        if isinstance(module, cls):
            if kind == "embedding" and getattr(module, "max_norm", None) is not None:
                return None  # max_norm renormalises looked-up rows: not linear in the weight
            stock = type(module).forward is cls.forward or (
                kind == "batch_norm" and type(module).forward is nn.modules.batchnorm._BatchNorm.forward
            )
            return kind if stock and "forward" not in vars(module) else None  # not replaced on the instance
    return None


POINTWISE_GEMM_PIXELS = 16  # single-threaded, 1x1 convs on at most this many pixels run as one GEMM


def _pointwise(module: nn.Module, x: Tensor) -> bool:
    """True where a plain 1x1 Conv2d (stride 1, no padding, one group) on a CPU sub-batch is best run as
    one GEMM over all its samples and pixels.

    Why (measured on MobileNetV2's shapes, sub-batches of ~7 samples): single-threaded, PyTorch runs such
    a convolution as one skinny GEMM per sample, which on maps of a few pixels reads the weight once per
    sample and ran ~7x slower than one GEMM; on larger maps it was faster than the GEMM. With more threads
    it uses oneDNN, and one GEMM was as fast or faster at every size.
    """
    if not (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.dilation == (1, 1) and module.groups == 1 and module.padding in ((0, 0), "valid")
            and x.dim() == 4 and x.device.type == "cpu"):
        return False
    return torch.get_num_threads() > 1 or x.shape[2] * x.shape[3] <= POINTWISE_GEMM_PIXELS


def _pointwise_gemm(x: Tensor, weight: Tensor) -> Tensor:
    """conv2d(x, weight) for a 1x1 ``weight`` (out, in, 1, 1) as one (out, in) x (in, batch * pixels) product."""
    batch, channels, height, width = x.shape
    flat = x.transpose(0, 1).reshape(channels, batch * height * width)
    return (weight.view(weight.shape[0], channels) @ flat).view(-1, batch, height, width).transpose(0, 1)


def _depthwise(module: nn.Module) -> bool:
    """A Conv2d with one group per input channel and zero padding: its weights are tiny next to its activations."""
    return (isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
            and module.padding_mode == "zeros")


def _check_batch_first(module: nn.Module, x: Tensor, batch: int) -> None:
    if x.shape[0] != batch:
        raise ValueError(
            f"{type(module).__name__} received input with leading dim {x.shape[0]}, expected the batch "
            f"size {batch}: the linearity runner needs batch-first activations (use method='vmap')"
        )


def _per_sample(own: Tensor, basis: _Basis | None, flat: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, numel): a module's own parameter ``own`` plus each sample's composed delta (none without a basis)."""
    value = own.to(dtype).reshape(1, -1)
    if basis is None:
        return value.expand(flat.shape[0], -1)
    return torch.addmm(value, flat[:, basis.index].to(dtype), basis.tensors.flatten(1).to(dtype))


# Per sample and module: output positions x components the corrections would multiply, from which a Linear /
# Conv runs with per-sample weights instead (see _with_sample_weights).
PER_SAMPLE_WORK = 32
# Beyond a cache-sized buffer of per-sample weights for the batch, composing them is a memory-bound write of
# batch x weight that the corrections, which read each basis tensor once, never pay: up to PER_SAMPLE_BYTES the
# threshold above holds, up to LARGE_PER_SAMPLE_BYTES it is LARGE_PER_SAMPLE_WORK, beyond never (a ViT-B/32
# MLP weight at batch 64 would be 600 MB).
PER_SAMPLE_BYTES = 16 * 2**20
LARGE_PER_SAMPLE_BYTES = 64 * 2**20
LARGE_PER_SAMPLE_WORK = 128


def _positions(module: nn.Module, kind: str, x: Tensor) -> int:
    """Output positions per sample (pixels of a conv's map, tokens of a Linear): what one weight is used for."""
    if kind == "linear":
        return x[0].numel() // max(x.shape[-1], 1) if x.dim() >= 3 else 1
    count = x[0, 0].numel() if x.dim() >= 3 else 1
    for step in module.stride:
        count //= max(int(step), 1)
    return count


def _with_sample_weights(module: nn.Module, kind: str, x: Tensor, batch: int, components: float) -> bool:
    """True where a Linear / Conv is cheaper with every sample's own composed weights in one product than
    with the shared product plus corrections on ``components`` basis tensors per sample (on average).

    Why: composing one weight per sample costs about one weight-sized write per sample, the corrections
    ``components`` products per position. Measured on MobileNetV2's 1x1 convolutions (batch 64, 6 vectors,
    two threads): with the gate keeping 11% (0.66 components per sample), per-sample weights took 0.59-4.5 ms
    against 1.5-13.8 ms on maps of 64 pixels or more, on par or slower on 16 pixels (1.1 vs 1.1 ms; 3.1 vs
    2.1 ms) and ~10x slower on 4; with every component kept (dense corrections), the network ran faster
    with per-sample weights from 16 pixels. A depthwise convolution's weights are tiny next to its
    activations, so it takes them whenever it has a correction at all. Large weights need more work per
    sample to pay. ViT-small (65 tokens, batch 64, two threads), every component kept: 2.7-3.3x a merged
    pass with per-sample weights up to 64 MiB, 6.2-6.6x with none over 16 MiB, 3.1x with every size. The
    gate keeping 11%: 1.8-1.9x with none over 16 MiB, 2.7x when those up to 64 MiB took them at the
    small-weight threshold.
    """
    if x.shape[0] != batch or x.dim() < 2 or components == 0:
        return False
    size = batch * module.weight.numel() * x.element_size()
    if size > LARGE_PER_SAMPLE_BYTES:
        return False
    threshold = PER_SAMPLE_WORK if size <= PER_SAMPLE_BYTES else LARGE_PER_SAMPLE_WORK
    if kind == "conv":
        if module.padding_mode != "zeros" or x.dim() != module.weight.dim():
            return False
        if _depthwise(module):
            return True
    elif kind != "linear":
        return False
    return _positions(module, kind, x) * components >= threshold


def _matrix_product(module: nn.Module) -> bool:
    """A convolution that is a matrix product per sample: one group, 1 x ... x 1 kernel, stride 1, no padding."""
    padding = module.padding
    return (module.groups == 1 and all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
            and (padding in ("valid", "same") or all(p == 0 for p in padding)))


_CONVOLUTIONS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _lead(batch: int, tensor: Tensor, trailing: int) -> tuple[int, ...]:
    """View shape that puts ``batch`` first and broadcasts over the middle dims of ``tensor``."""
    return (batch,) + (1,) * (tensor.dim() - 1 - trailing)


@dataclass
class _BatchNormTable:
    """Every composed frozen BatchNorm of a network, stacked (padded to the widest), so that all their
    per-sample multipliers and offsets come from a handful of operations per call instead of ~10 each.

    Why: MobileNetV2 has 52 BatchNorms; their per-sample scale and shift cost ~0.1-0.2 ms each in small
    operations, against ~0.1-0.4 ms for the BatchNorm's own pass on small maps.
    """

    plan: dict[str, dict[str, _Basis]]  # the basis it was built from
    prefixes: list[str]
    channels: list[int]
    key: tuple | None  # (data pointer, version) of every statistic and parameter read: a change rebuilds it
    weight_basis: Tensor | None  # (modules, components, width); None when no BatchNorm weight is composed
    weight_index: Tensor  # (modules, components): flat coefficient index, or the appended zero column
    bias_basis: Tensor | None
    bias_index: Tensor
    gamma: Tensor  # (modules, 1, width)
    beta: Tensor
    mean: Tensor
    inv_std: Tensor

    @staticmethod
    def state(modules: list[nn.Module]) -> tuple | None:
        """What the table was built from, or None where it cannot be told (inference tensors keep no version)."""
        tensors = [t for m in modules for t in (m.running_mean, m.running_var, m.weight, m.bias) if t is not None]
        if any(t.is_inference() for t in tensors):
            return None
        return tuple((t.data_ptr(), t._version) for t in tensors)

    @classmethod
    @torch.no_grad()
    def build(cls, named: list[tuple[str, nn.Module]], plan: dict[str, dict[str, _Basis]], columns: int
              ) -> _BatchNormTable:
        modules = [module for _, module in named]
        channels = [int(module.running_mean.shape[0]) for module in modules]
        width = max(channels)
        like = modules[0].running_mean

        def bases(attr: str) -> tuple[Tensor | None, Tensor]:
            found = [plan[prefix].get(attr) for prefix, _ in named]
            if all(basis is None for basis in found):
                return None, torch.full((len(named), 1), columns, dtype=torch.long, device=like.device)
            height = max(basis.index.numel() for basis in found if basis is not None)
            index = torch.full((len(named), height), columns, dtype=torch.long, device=like.device)
            stack = torch.zeros(len(named), height, width, dtype=next(b for b in found if b is not None).tensors.dtype,
                                device=like.device)
            for k, basis in enumerate(found):
                if basis is not None:
                    count = basis.index.numel()
                    index[k, :count] = basis.index
                    stack[k, :count, : channels[k]] = basis.tensors.reshape(count, -1)
            return stack, index

        def column(values: list[Tensor | None], fill: float) -> Tensor:
            out = torch.full((len(named), 1, width), fill, dtype=like.dtype, device=like.device)
            for k, value in enumerate(values):
                if value is not None:
                    out[k, 0, : channels[k]] = value.detach()
            return out

        weight_basis, weight_index = bases("weight")
        bias_basis, bias_index = bases("bias")
        return cls(
            plan=plan, prefixes=[prefix for prefix, _ in named], channels=channels, key=cls.state(modules),
            weight_basis=weight_basis, weight_index=weight_index, bias_basis=bias_basis, bias_index=bias_index,
            gamma=column([m.weight for m in modules], 1.0), beta=column([m.bias for m in modules], 0.0),
            mean=column([m.running_mean for m in modules], 0.0),
            inv_std=column([torch.rsqrt(m.running_var + m.eps) for m in modules], 1.0),
        )

    def affines(self, flat: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """prefix -> (multiplier, offset), each (B, C): the BatchNorm is x * multiplier + offset per sample."""
        extended = F.pad(flat, (0, 1))  # the last column is the zero coefficient of padded components

        def composed(own: Tensor, basis: Tensor | None, index: Tensor) -> Tensor:
            if basis is None:
                return own
            weights = extended[:, index].to(basis.dtype).permute(1, 0, 2)  # (modules, B, components)
            return torch.baddbmm(own.to(basis.dtype), weights, basis)

        scale = composed(self.gamma, self.weight_basis, self.weight_index)
        multiplier = scale * self.inv_std.to(scale.dtype)
        shift = composed(self.beta, self.bias_basis, self.bias_index)
        offset = torch.addcmul(shift, multiplier, self.mean.to(multiplier.dtype), value=-1)
        batch = flat.shape[0]
        multiplier, offset = multiplier.expand(-1, batch, -1), offset.expand(-1, batch, -1)
        return {prefix: (multiplier[k, :, :c], offset[k, :, :c])
                for k, (prefix, c) in enumerate(zip(self.prefixes, self.channels, strict=True))}


class LinearRunner:
    """Per-sample composition by linearity: each module adds ``sum_j c_sj (T_j x)`` to its shared output, or
    runs with every sample's composed weights where that is cheaper (see :func:`_with_sample_weights`).

    Built once per composer; the basis (every vector restricted to every column of every block, all-zero
    entries dropped) is computed with ``Composer.block_delta`` on one-hot coefficients, so dense, LoRA
    and xK banks are all handled by the composer's own code. It costs about one bank of memory.
    """

    SPARSE_FROM = 0.5  # fraction of zero coefficients from which the sparse corrections are used

    def __init__(self, composer: Composer, sparse: bool = True) -> None:
        self.sparse = sparse
        if composer.linearized:
            raise UnsupportedModuleError(
                "the linearity runner needs a plain composer; a linearised one (linearized=True) is not "
                "linear in its blocks' inputs -- use method='vmap'"
            )
        self.composer = composer
        base = composer.base
        owners: dict[int, list[str]] = {}
        for name, param in base.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(name)
        params = dict(base.named_parameters())
        self.modules: dict[str, tuple[nn.Module, str, list[str]]] = {}
        problems: list[str] = []
        for block in composer.block_names:
            tied = owners.get(id(params[block]), [block])
            if len(tied) > 1:
                problems.append(f"block '{block}' is tied to {tied[1:]} (shared parameters)")
                continue
            prefix, _, attr = block.rpartition(".")
            module = base.get_submodule(prefix)
            kind = _supported_kind(module)
            if kind is None or attr not in ("weight", "bias"):
                problems.append(f"block '{block}' belongs to {type(module).__name__} '{prefix or '<root>'}'")
                continue
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                problems.append(f"block '{block}' belongs to {type(module).__name__} '{prefix}'")
                continue
            entry = self.modules.setdefault(prefix, (module, kind, []))
            entry[2].append(attr)
        if problems:
            raise UnsupportedModuleError(
                "the linearity runner handles Linear, Conv1d/2d/3d, LayerNorm, GroupNorm, BatchNorm "
                "(eval) and Embedding (without max_norm) called through their own forward; "
                + "; ".join(problems[:6])
                + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
                + ". Use method='vmap', or leave these blocks out of the composer (Composer(blocks=...))."
            )
        self._cache: dict[tuple[torch.device, torch.dtype], dict[str, dict[str, _Basis]]] = {}
        self._batch_norms: _BatchNormTable | None = None

    # -- the basis -----------------------------------------------------------------------------

    @torch.no_grad()
    def _build(self, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, _Basis]]:
        composer = self.composer
        n, columns = composer.num_vectors, composer.layout.num_columns
        plan: dict[str, dict[str, _Basis]] = {}
        for prefix, (_module, _kind, attrs) in self.modules.items():
            for attr in attrs:
                block = f"{prefix}.{attr}" if prefix else attr
                tensors, index = [], []
                for i in range(n):
                    for column in composer.layout.blocks[block].columns.tolist():
                        onehot = torch.zeros(n, columns, device=device)
                        onehot[i, column] = 1.0
                        delta = composer.block_delta(block, onehot)
                        if bool(delta.any()):
                            tensors.append(delta.to(dtype))
                            index.append(i * columns + column)
                if tensors:
                    basis = _Basis(torch.stack(tensors), torch.tensor(index, device=device), index)
                    plan.setdefault(prefix, {})[attr] = basis
        return plan

    def basis(self) -> dict[str, dict[str, _Basis]]:
        param = next(self.composer.base.parameters())
        key = (param.device, param.dtype)
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = self._build(*key)
        return self._cache[key]

    def _batch_norm_affines(self, plan: dict[str, dict[str, _Basis]], flat: Tensor
                            ) -> dict[str, tuple[Tensor, Tensor]]:
        """Every composed BatchNorm's per-sample (multiplier, offset), from a table rebuilt only when the
        basis, a running statistic or a BatchNorm parameter changed."""
        named = [(prefix, module) for prefix, (module, kind, _attrs) in self.modules.items()
                 if kind == "batch_norm" and prefix in plan]
        if not named:
            return {}
        table = self._batch_norms
        state = _BatchNormTable.state([module for _, module in named])
        if table is None or table.plan is not plan or state is None or table.key != state:
            table = self._batch_norms = _BatchNormTable.build(named, plan, flat.shape[1])
        return table.affines(flat)

    # -- the corrections -----------------------------------------------------------------------

    @staticmethod
    def _sparse_weight(
        module: nn.Module, kind: str, x: Tensor, weight: _Basis, c: Tensor, into: Tensor | None = None
    ) -> Tensor | None:
        """sum_j c_sj (T_j x_s) computed only for the (sample, basis) pairs with c_sj != 0, added to ``into``
        in place when given (inference: no new activation-sized tensor), else to a new tensor.

        Why: a gated posterior keeps ~10% of the components per sample, so most of the dense runner's
        products multiply by zero. Each basis tensor runs once on the sub-batch that uses it. The sub-batches
        of all components are gathered, scaled and added back in one operation each: with ~7 samples per
        sub-batch, per-operation costs, not arithmetic, set the time.
        """
        pairs = torch.nonzero(c.t() != 0)  # (component, sample), grouped by component
        if pairs.numel() == 0:
            return into
        components, rows = pairs[:, 0], pairs[:, 1]
        sub = x.index_select(0, rows)
        sub.mul_(c[rows, components].view(-1, *(1,) * (x.dim() - 1)))  # products are linear in their input
        pointwise = kind == "conv" and _pointwise(module, x)
        products, start = [], 0
        for j, count in enumerate(torch.bincount(components, minlength=c.shape[1]).tolist()):
            if count == 0:
                continue
            part, basis = sub[start:start + count], weight.tensors[j]
            start += count
            if kind == "linear":
                products.append(F.linear(part, basis))
            else:
                products.append(_pointwise_gemm(part, basis) if pointwise else module._conv_forward(part, basis, None))
        product = products[0] if len(products) == 1 else torch.cat(products)
        total = into
        if total is None:
            total = torch.zeros((x.shape[0], *product.shape[1:]), dtype=product.dtype, device=product.device)
        return total.index_add_(0, rows, product)

    @staticmethod
    def _embedding_correction(ids: Tensor, weight: _Basis, flat: Tensor) -> Tensor:
        """sum_j c_sj T_j[ids_s]: each basis table looked up at the sample's own tokens (zero columns
        skipped). Ids with a leading 1 (shared position ids) broadcast over the batch."""
        batch = flat.shape[0]
        if ids.shape[0] not in (1, batch):
            raise ValueError(f"Embedding received ids with leading dim {ids.shape[0]}, expected 1 or the batch "
                             f"size {batch} (use method='vmap')")
        c = flat[:, weight.index].to(weight.tensors.dtype)
        total = torch.zeros((), dtype=weight.tensors.dtype, device=weight.tensors.device)
        for j in torch.nonzero((c != 0).any(0)).flatten().tolist():
            looked = F.embedding(ids, weight.tensors[j])
            total = total + looked * c[:, j].view(batch, *(1,) * (looked.dim() - 1))
        return total

    @staticmethod
    def _corrected(
        module: nn.Module, kind: str, x: Tensor, output: Tensor, plan: dict[str, _Basis], flat: Tensor,
        sparse: bool = False,
    ) -> Tensor:
        """The module's output plus its per-sample correction; without autograd (inference, the gated case)
        the correction is added to the output in place: per-module copies of the activations, not the
        products, set the cost on CPU."""
        batch = flat.shape[0]
        if torch.is_grad_enabled() or kind == "embedding" or x.shape[0] != batch:
            return output + LinearRunner._correction(module, kind, x, plan, flat, sparse)
        weight, bias = plan.get("weight"), plan.get("bias")
        if sparse and weight is not None and kind in ("linear", "conv"):
            LinearRunner._sparse_weight(module, kind, x, weight, flat[:, weight.index].to(x.dtype), into=output)
            plan = {"bias": bias} if bias is not None else {}
            if not plan:
                return output
        return output.add_(LinearRunner._correction(module, kind, x, plan, flat, sparse))

    @staticmethod
    def _folded_batch_norm(module: nn.Module, x: Tensor, multiplier: Tensor, offset: Tensor) -> Tensor:
        """A frozen BatchNorm with each sample's composed scale and shift, as one pass over ``x``.

        Why: the BatchNorm's own pass followed by its per-sample correction reads and writes the
        activations three times; with running statistics the whole module is x * m_s + o_s, where
        m_s = (gamma_0 + dgamma_s) / std and o_s = beta_0 + dbeta_s - mean * m_s (``multiplier`` and
        ``offset``, (B, C), from :class:`_BatchNormTable`).
        """
        batch, channels = multiplier.shape
        _check_batch_first(module, x, batch)
        multiplier, offset = multiplier.to(x.dtype), offset.to(x.dtype)
        shape = (batch, channels, *(1,) * (x.dim() - 2))
        positions = x[0, 0].numel()
        if positions <= 4:  # tiny maps: one fused pass wins; on larger ones it ran ~2x slower than two
            return torch.addcmul(offset.view(shape), x, multiplier.view(shape))
        if positions >= 256 and x.is_contiguous():
            # Large maps: BatchNorm's own one-pass kernel over B x C channels with zero mean, unit variance and
            # no eps computes exactly x * m + o (0.61-2.6 ms against 1.0-3.6 ms for two passes; slower below).
            flat_channels = batch * channels
            ones = x.new_ones(flat_channels)
            return F.batch_norm(x.view(1, flat_channels, *x.shape[2:]), ones.new_zeros(flat_channels), ones,
                                multiplier.reshape(-1), offset.reshape(-1), False, 0.0, 0.0).view_as(x)
        return (x * multiplier.view(shape)).add_(offset.view(shape))

    @staticmethod
    def _sample_weights_product(module: nn.Module, kind: str, x: Tensor, plan: dict[str, _Basis],
                                flat: Tensor) -> Tensor:
        """A Linear / Conv run once over the batch with each sample's composed weights (and bias).

        Why: where a weight is used for many positions per sample, composing one weight per sample costs
        little next to the product, and the batch runs as one batched matrix product (a 1x1 convolution or
        a Linear on tokens) or one convolution whose groups are the samples (the batch viewed as one image
        of B x C channels), instead of the shared product plus one sub-batch product per kept component.
        """
        batch = flat.shape[0]
        _check_batch_first(module, x, batch)
        weights = _per_sample(module.weight, plan.get("weight"), flat, x.dtype)
        bias_basis = plan.get("bias")
        shifts = None
        if module.bias is not None or bias_basis is not None:
            own_bias = module.bias if module.bias is not None else x.new_zeros(module.weight.shape[0])
            shifts = _per_sample(own_bias, bias_basis, flat, x.dtype)
        out_features = module.weight.shape[0]
        if kind == "linear":
            tokens = x.reshape(batch, -1, x.shape[-1])
            matrices = weights.view(batch, out_features, -1).transpose(1, 2)
            out = (torch.bmm(tokens, matrices) if shifts is None
                   else torch.baddbmm(shifts.unsqueeze(1), tokens, matrices))
            return out.view(*x.shape[:-1], out_features)
        spatial = x.shape[2:]
        if _matrix_product(module):
            columns = x.reshape(batch, x.shape[1], -1)
            matrices = weights.view(batch, out_features, -1)
            out = (torch.bmm(matrices, columns) if shifts is None
                   else torch.baddbmm(shifts.unsqueeze(2), matrices, columns))
            return out.view(batch, out_features, *spatial)
        out = _CONVOLUTIONS[x.dim()](
            x.reshape(1, batch * x.shape[1], *spatial),
            weights.reshape(batch * out_features, *module.weight.shape[1:]),
            None if shifts is None else shifts.reshape(-1),
            module.stride, module.padding, module.dilation, batch * module.groups)
        return out.view(batch, out_features, *out.shape[2:])

    @staticmethod
    def _correction(
        module: nn.Module, kind: str, x: Tensor, plan: dict[str, _Basis], flat: Tensor, sparse: bool = False
    ) -> Tensor:
        batch = flat.shape[0]
        if kind == "embedding":
            return LinearRunner._embedding_correction(x, plan["weight"], flat)
        _check_batch_first(module, x, batch)
        weight, bias = plan.get("weight"), plan.get("bias")
        total: Tensor | None = None
        if sparse and weight is not None and kind in ("linear", "conv"):
            c = flat[:, weight.index].to(x.dtype)
            correction = LinearRunner._sparse_weight(module, kind, x, weight, c)
            if bias is not None:
                spatial = x.dim() - 2 if kind == "conv" else 0
                lead = (batch, -1, *(1,) * spatial) if kind == "conv" else (*_lead(batch, x, 1), -1)
                shift = (flat[:, bias.index].to(x.dtype) @ bias.tensors).view(*lead)
                correction = shift if correction is None else correction + shift
            if correction is None:  # nothing kept in this module for any sample
                correction = torch.zeros((), dtype=x.dtype, device=x.device)
            return correction
        if kind == "linear":
            if weight is not None:
                c = flat[:, weight.index].to(x.dtype)
                m = c.shape[1]
                scaled = x.unsqueeze(-2) * c.view(*_lead(batch, x, 1), m, 1)
                total = F.linear(scaled.flatten(-2), weight.fused())
            if bias is not None:
                shift = (flat[:, bias.index].to(x.dtype) @ bias.tensors).view(*_lead(batch, x, 1), -1)
                total = shift if total is None else total + shift
        elif kind == "conv":
            spatial = x.dim() - 2
            if weight is not None:
                c = flat[:, weight.index].to(x.dtype)
                m, groups = c.shape[1], module.groups
                per_group = x.shape[1] // groups
                scaled = x.view(batch, groups, 1, per_group, *x.shape[2:]) * c.view(
                    batch, 1, m, 1, *(1,) * spatial
                )
                total = module._conv_forward(scaled.reshape(batch, -1, *x.shape[2:]), weight.fused(), None)
            if bias is not None:
                shift = (flat[:, bias.index].to(x.dtype) @ bias.tensors).view(batch, -1, *(1,) * spatial)
                total = shift if total is None else total + shift
        else:
            if kind == "layer_norm":
                trailing = len(module.normalized_shape)
                normed = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
                shape = (*_lead(batch, x, trailing), *module.normalized_shape)
            else:
                normed = F.group_norm(x, module.num_groups, None, None, module.eps)
                shape = (batch, -1, *(1,) * (x.dim() - 2))
            if weight is not None:
                scale = flat[:, weight.index].to(x.dtype) @ weight.tensors.flatten(1)
                total = normed * scale.view(shape)
            if bias is not None:
                shift = (flat[:, bias.index].to(x.dtype) @ bias.tensors.flatten(1)).view(shape)
                total = shift if total is None else total + shift
        assert total is not None
        return total

    def __call__(self, x: Tensor, coefficients: Tensor, *args, **kwargs):
        composer = self.composer
        _check_coefficients(composer, x, coefficients)
        check_frozen_norms(composer.base)
        plan = self.basis()
        flat = coefficients.reshape(coefficients.shape[0], -1)
        fired: set[str] = set()
        # Skipping zero coefficients pays when most are zero (a gated posterior); a relaxed sample has none.
        # Not when the coefficients need a gradient: d out / d c_sj = T_j x_s is not zero where c_sj is.
        needs_grad = torch.is_grad_enabled() and coefficients.requires_grad
        sparse = self.sparse and not needs_grad and float((flat == 0).float().mean()) >= self.SPARSE_FROM
        # Non-zero coefficients per column, read once per call: each module's choice of path sums its columns.
        kept = (flat != 0).sum(0).tolist() if sparse else []

        def hook_for(prefix: str, module: nn.Module, kind: str) -> Callable:
            def hook(mod: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
                fired.add(prefix)
                return self._corrected(mod, kind, inputs[0], output, plan[prefix], flat, sparse)

            return hook

        affines = self._batch_norm_affines(plan, flat)

        def batch_norm_for(prefix: str, module: nn.Module) -> Callable:
            def forward(input: Tensor) -> Tensor:
                fired.add(prefix)
                return self._folded_batch_norm(module, input, *affines[prefix])

            return forward

        def product_for(prefix: str, module: nn.Module, kind: str) -> Callable:
            stock = type(module).forward
            weight = plan[prefix].get("weight")
            if weight is None:  # only the bias is composed: its correction is one broadcast add
                components = 0.0
            elif sparse:  # the corrections multiply only the kept components
                components = sum(kept[column] for column in weight.columns) / flat.shape[0]
            else:
                components = float(weight.index.numel())

            def forward(input: Tensor) -> Tensor:
                fired.add(prefix)
                if _with_sample_weights(module, kind, input, flat.shape[0], components):
                    return self._sample_weights_product(module, kind, input, plan[prefix], flat)
                return self._corrected(module, kind, input, stock(module, input), plan[prefix], flat, sparse)

            return forward

        handles, replaced = [], []
        try:
            for prefix, (module, kind, _attrs) in self.modules.items():
                if prefix not in plan:
                    continue
                # A frozen BatchNorm (its per-sample affine map), a Linear and a Conv (per-sample weights where
                # they pay, else the shared product plus corrections) run whole for this call; deleting the
                # instance attribute below restores the class's forward.
                if kind == "batch_norm":
                    module.forward = batch_norm_for(prefix, module)  # type: ignore[method-assign]
                    replaced.append(module)
                elif kind in ("linear", "conv"):
                    module.forward = product_for(prefix, module, kind)  # type: ignore[method-assign]
                    replaced.append(module)
                else:
                    handles.append(module.register_forward_hook(hook_for(prefix, module, kind)))
            with batch_first_activations():  # the hooks index activations by sample
                out = composer.base(x, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            for module in replaced:
                del module.forward
        missed = [prefix for prefix in plan if prefix not in fired]
        if missed:
            module = self.modules[missed[0]][0]
            raise UnsupportedModuleError(
                f"{type(module).__name__} '{missed[0]}' owns composed blocks but was not called through its "
                f"forward (its weights are used some other way, e.g. by a parent module); {len(missed)} such "
                "module(s). Use method='vmap'."
            )
        return out


DEFAULT_METHOD = "vmap"


class AutoRunner:
    """vmap with gradients (training on relaxed samples), the sparse linearity runner without (gated inference).

    Why: the gate zeroes ~90% of the coefficients, and then the sparse hooks do a tenth of the dense
    runner's extra products on the batched activations, while vmap still builds one full set of weights
    per sample. A relaxed spike-and-slab sample has no exact zeros; training stays on vmap, which the
    recorded variational results were trained with, although since the per-sample weights, depthwise and
    BatchNorm paths (results/variational_speed.md) the dense hooks train faster on MobileNetV2 (7.9-10.4x a
    merged pass against vmap's 14.4-20.7x, one and two threads). The linearity runner is used only where it
    applies and, once, after agreeing with vmap on two samples; otherwise everything runs on vmap.
    """

    def __init__(self, composer: Composer, chunk_size: int | None = 8) -> None:
        self.vmap = VmapRunner(composer, chunk_size)
        self.linear: LinearRunner | None = None
        self._verified = False
        if not composer.linearized:
            try:
                self.linear = LinearRunner(composer, sparse=True)
            except UnsupportedModuleError:
                self.linear = None

    @torch.no_grad()
    def _verify(self, x: Tensor) -> None:
        assert self.linear is not None
        probe = x[:2]
        composer = self.vmap.composer
        generator = torch.Generator().manual_seed(0)
        shape = (probe.shape[0], composer.num_vectors, composer.layout.num_columns)
        coefficients = torch.randn(shape, generator=generator).to(x.device)
        coefficients[coefficients.abs() < 0.8] = 0.0  # exercise the sparse path too
        reference = self.vmap(probe, coefficients)
        try:
            got = self.linear(probe, coefficients)
            agree = bool((got - reference).abs().max() <= 1e-4 * (float(reference.abs().max()) + 1.0))
        except UnsupportedModuleError:
            agree = False
        if not agree:
            self.linear = None
        self._verified = True

    def __call__(self, x: Tensor, coefficients: Tensor) -> Tensor:
        if self.linear is None or torch.is_grad_enabled():
            return self.vmap(x, coefficients)
        if not self._verified:
            self._verify(x)
            if self.linear is None:
                return self.vmap(x, coefficients)
        return self.linear(x, coefficients)


def make_runner(
    composer: Composer, method: str, chunk_size: int | None = 8
) -> VmapRunner | LinearRunner | AutoRunner:
    """``vmap``, ``linear`` (sparse hooks when most coefficients are zero), or ``auto`` (:class:`AutoRunner`).

    On CPU (benchmarks/variational_speed.py) with gated coefficients the sparse hooks win by far, which
    ``auto`` exploits by switching on whether gradients are needed; with dense coefficients (training)
    the dense hooks now also beat vmap on convolutional networks, but ``auto`` keeps vmap there (see
    :class:`AutoRunner`); pass ``linear`` to train through the hooks.
    """
    if method == "auto":
        return AutoRunner(composer, chunk_size)
    if method == "vmap":
        return VmapRunner(composer, chunk_size)
    if method == "linear":
        return LinearRunner(composer)
    raise ValueError(f"per-sample method {method!r} is not one of 'auto', 'linear', 'vmap'")
