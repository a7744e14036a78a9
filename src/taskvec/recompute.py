"""Module-by-module composition with recomputation: a composer step without a whole composed copy.

Why: :meth:`Composer.forward` composes every block up front and hands the composed weights to
``functional_call``; autograd then keeps each of them (a Linear saves its weight for the input gradient)
until the backward pass reaches it. For a large base (CLIP ViT-B/32: 88M parameters, 334 MiB in fp32)
that is a second copy of the network next to the base and the bank. Here each module's blocks are
composed by a forward pre-hook just before the module runs and swapped back out after it; the tensors
autograd saves are replaced by a recipe (``saved_tensors_hooks``), and the block is composed again
when the backward pass needs it. The coefficient gradient flows through the same composition node as in
the standard path, so outputs and gradients are the same; the price is one more read of the module's
bank rows per step.

Only modules whose own ``forward`` uses their blocks can be composed this way; a block read by some
other module (a parent reading a child's weight, tied weights) would silently keep theta_0. So while the
network runs, every composed block outside its module's forward is a storage-free stand-in that raises
RecomputeError on any use but reading its shape, dtype or device: such a read fails loudly, at no memory cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.weak import WeakTensorKeyDictionary

if TYPE_CHECKING:
    from taskvec.compose import Composer

__all__ = ["RecomputeError", "recomposed_forward"]


class RecomputeError(RuntimeError):
    """The network uses a composed block outside its own module's forward: recomputation cannot apply."""


class _Recipe:
    """What autograd keeps instead of a composed block: how to compose it again."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Tensor]) -> None:
        self.make = make


class _ViewRecipe:
    """A saved view of a composed block: the block's recipe and the view's geometry."""

    __slots__ = ("offset", "recipe", "shape", "stride")

    def __init__(self, recipe: _Recipe, shape: tuple, stride: tuple, offset: int) -> None:
        self.recipe, self.shape, self.stride, self.offset = recipe, shape, stride, offset


def _by_module(composer: Composer) -> dict[str, list]:
    groups: dict[str, list] = {}
    for entry in composer.fused_entries() or []:
        prefix = entry[0].rpartition(".")[0]
        groups.setdefault(prefix, []).append(entry)
    return groups


def recomposed_forward(composer: Composer, coefficients: Tensor, args: tuple, kwargs: dict) -> Any:
    """``composer``'s forward with module-by-module composition (see the module docstring)."""
    base = composer.base
    params = dict(base.named_parameters())
    groups = _by_module(composer)
    composed_index = WeakTensorKeyDictionary()  # composed block -> its recipe
    open_swaps: list[list] = []
    frozen = coefficients.detach()

    def recipe(entry: tuple) -> _Recipe:
        def make() -> Tensor:  # this block alone: its module's other blocks are saved (or not) on their own
            with torch.no_grad():
                return composer.compose_entries(frozen, [entry], params)[0]

        return _Recipe(make)

    def pre_hook(prefix: str, entries: list) -> Callable:
        def hook(module: nn.Module, _inputs: tuple) -> None:
            composed = composer.compose_entries(coefficients, entries, params)
            names = {}
            for entry, tensor in zip(entries, composed, strict=True):
                made = composed_index[tensor] = recipe(entry)
                if tensor._base is not None:  # the block is a view of a flat sum: views of it point there
                    composed_index[tensor._base] = made
                names[entry[0][len(prefix) + 1 :] if prefix else entry[0]] = tensor
            swap = _reparametrize_module(module, names)
            swap.__enter__()
            open_swaps.append([module, swap])

        return hook

    def post_hook(module: nn.Module, _inputs: tuple, _output: Any) -> None:
        for i in range(len(open_swaps) - 1, -1, -1):  # the innermost open swap of this module
            if open_swaps[i][0] is module:
                open_swaps.pop(i)[1].__exit__(None, None, None)
                return

    def pack(tensor: Tensor) -> Any:
        made = composed_index.get(tensor)
        if made is not None:
            return made
        base_tensor = tensor._base  # a view of a block (a Linear saves its weight transposed) holds it too
        made = None if base_tensor is None else composed_index.get(base_tensor)
        if made is None:
            return tensor
        return _ViewRecipe(made, tuple(tensor.shape), tuple(tensor.stride()), int(tensor.storage_offset()))

    def unpack(saved: Any) -> Tensor:
        if isinstance(saved, _ViewRecipe):
            return saved.recipe.make().as_strided(saved.shape, saved.stride, saved.offset)
        return saved.make() if isinstance(saved, _Recipe) else saved

    handles = []
    for prefix, entries in groups.items():
        module = base.get_submodule(prefix)
        handles.append(module.register_forward_pre_hook(pre_hook(prefix, entries)))
        handles.append(module.register_forward_hook(post_hook))
    # Outside its module's forward every composed block is an _Absent stand-in (no storage): other readers fail.
    absent: dict[str, Tensor] = {entry[0]: _Absent.of(entry[0], params[entry[0]])
                                 for entries in groups.values() for entry in entries}
    try:
        with _reparametrize_module(base, absent), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            output = base(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        while open_swaps:  # an exception inside a module: restore its parameters
            open_swaps.pop()[1].__exit__(None, None, None)
    return output


class _Absent(Tensor):
    """A composed block's stand-in outside its module's forward: shape, dtype and device are the real
    parameter's; any computation with it raises :class:`RecomputeError`."""

    _block: str
    _real: Tensor
    _PROPERTIES = ("shape", "dtype", "device", "ndim", "requires_grad")
    _ALLOWED = frozenset([getattr(Tensor, attr).__get__ for attr in _PROPERTIES]
                         + [Tensor.size, Tensor.dim, Tensor.is_floating_point, Tensor.numel])

    @staticmethod
    def of(block: str, real: Tensor) -> _Absent:
        stand_in = Tensor._make_subclass(_Absent, torch.empty(real.shape, dtype=real.dtype, device="meta"))
        stand_in._block, stand_in._real = block, real
        return stand_in

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._ALLOWED:
            real_args = [a._real if isinstance(a, _Absent) else a for a in args]
            with torch._C.DisableTorchFunctionSubclass():
                return func(*real_args, **(kwargs or {}))
        names = [a._block for a in args if isinstance(a, _Absent)]
        raise RecomputeError(
            f"composed block(s) {names} are used outside their own module's forward (by "
            f"{getattr(func, '__name__', func)}: a parent reads a child's weight, or weights are tied), where "
            "module-by-module composition cannot reach them; use Composer(recompute=False)"
        )
