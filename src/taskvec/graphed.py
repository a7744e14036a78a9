"""Composition replayed as CUDA graphs: one launch per pass instead of a few per block.

Why: on a GPU the fused composition is hundreds of small products (one per block forward, one per
block backward), each launched from Python. On an H100 the coefficient step stopped depending on the
bank size at all (1 to 64 vectors: the same 28 ms against a 15 ms fine-tuning step): the launches, not
the bank reads, set its cost. Capturing the forward composition and the backward contraction once and
replaying them removes that cost and leaves the bank reads.

What stays the same: the captured kernels are the eager path's own (:class:`~taskvec.compose._ComposeBlocks`),
so outputs and coefficient gradients are those of the eager path. What changes, and how it is kept safe:

* The composed blocks live in static buffers that every composition rewrites. When the coefficients
  are another tensor, or the same one changed in place since the last composition (its version moved),
  the replay also bumps the blocks' autograd version: a backward pass that still needs blocks composed
  from other coefficients raises (autograd's in-place check) instead of silently using the new values.
  Composing twice from unchanged coefficients (two views through one network) needs no bump and works.
* The graphs read the bank and the base at fixed addresses. Every call compares those addresses with the
  ones captured and captures again if any tensor moved (``.to()``, a reloaded buffer), so a replay never
  reads freed memory.
* The static buffers (one composed copy of the composed blocks and one for their gradients) stay
  allocated between steps: about twice the composed blocks' size more than the eager path at rest.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

if TYPE_CHECKING:
    from taskvec.compose import Composer

Outputs = tuple[Tensor, ...]


class EagerReplay:
    """Runs the function again and copies the results into the captured outputs.

    The stand-in for a CUDA graph where there is none (CPU): it keeps the static-buffer behaviour,
    so everything around the graph is exercised without a GPU.
    """

    def capture(self, function: Callable[[], Outputs]) -> Outputs:
        self._function = function
        self._outputs = function()
        return self._outputs

    def replay(self) -> None:
        # Through .data: a graph writes behind autograd's back, so the copy must not move versions either.
        torch._foreach_copy_([output.data for output in self._outputs], list(self._function()))


class CudaReplay:
    """A captured CUDA graph of the function (after warm-up on a side stream, as capture requires)."""

    WARMUP = 2

    def capture(self, function: Callable[[], Outputs]) -> Outputs:
        device = torch.cuda.current_device()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # cuBLAS handles and workspaces are created outside the capture
            for _ in range(self.WARMUP):
                function()
        torch.cuda.current_stream(device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            outputs = function()
        return outputs

    def replay(self) -> None:
        self._graph.replay()


def replay_for(device: torch.device) -> type[EagerReplay] | type[CudaReplay]:
    return CudaReplay if device.type == "cuda" else EagerReplay


class GraphedComposition:
    """The composer's fused composition (every block, forward and backward) as two replayable graphs.

    Call it with coefficients of the shape, dtype and device it was captured for; it returns the
    composed blocks in :meth:`Composer.fused_entries` order, differentiable with respect to the
    coefficients. ``replay`` picks the graph kind (CUDA graphs on a GPU, :class:`EagerReplay` elsewhere).
    """

    def __init__(self, composer: Composer, coefficients: Tensor,
                 replay: type[EagerReplay] | type[CudaReplay] | None = None) -> None:
        from taskvec.compose import _ComposeBlocks, entry_plan

        entries = composer.fused_entries()
        if entries is None:
            raise ValueError("graphed composition needs the fused path: no LoRA vectors, no linearisation, "
                             "dense blocks with one column each")
        self.composer = composer
        self.names = [name for name, *_ in entries]
        self.shape, self.dtype, self.device = coefficients.shape, coefficients.dtype, coefficients.device
        params = dict(composer.base.named_parameters())
        self._slots = self._read_slots(composer)
        self.addresses = self._addresses()
        bases = [params[name].detach() for name in self.names]
        plan = entry_plan(entries, self.device)
        self.coefficients = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.grads = tuple(torch.zeros_like(base) for base in bases)
        self._last: tuple[weakref.ref, int] | None = None  # the coefficients last composed and their version
        ctx = SimpleNamespace()

        def forward() -> Outputs:
            return _ComposeBlocks.forward(ctx, self.coefficients, plan, *bases)

        def backward() -> Outputs:
            return (_ComposeBlocks.backward(ctx, *self.grads)[0],)

        replayer = replay or replay_for(self.device)
        self._forward, self._backward = replayer(), replayer()
        with torch.no_grad():
            self.outputs = self._forward.capture(forward)
            (self.gradient,) = self._backward.capture(backward)

    def _read_slots(self, composer: Composer) -> list[tuple[dict, str]]:
        """(dict, key) of every tensor the graphs read: dense stacks, quantised stacks, the composed base blocks.

        Why slots: ``.to()`` and buffer assignment put new tensors into these dicts (or new data into the
        same Parameter), and reading them there costs microseconds per step, against a walk of the modules.
        """
        slots: list[tuple[dict, str]] = [(composer._bank._buffers, key) for key in composer._bank._buffers
                                         if key.startswith("dense_") and not key.startswith("dense_idx_")]
        slots += [(module._buffers, key) for module in composer.stacks.modules() for key in module._buffers]
        owners = dict(composer.base.named_modules())
        for name in self.names:
            owner, _, leaf = name.rpartition(".")
            slots.append((owners[owner]._parameters, leaf))
        return slots

    def _addresses(self) -> tuple[int, ...]:
        """Where every tensor the graphs read lives now."""
        return tuple(-1 if slot.get(key) is None else slot[key].data_ptr() for slot, key in self._slots)

    def matches(self, coefficients: Tensor) -> bool:
        """True where replaying reads live memory and fits ``coefficients``; False means capture again."""
        return (coefficients.shape == self.shape and coefficients.dtype == self.dtype
                and coefficients.device == self.device and self._addresses() == self.addresses)

    def compose(self, coefficients: Tensor) -> Outputs:
        with torch.no_grad():
            self.coefficients.copy_(coefficients)
            self._forward.replay()  # always: values written through .data or fused optimisers move no version
        if self._last is None or self._last[0]() is not coefficients or self._last[1] != coefficients._version:
            increment_version(list(self.outputs))  # blocks saved from other coefficients are stale now
            # A weak reference: a tensor that died (and whose memory a new one reuses) never compares equal.
            self._last = (weakref.ref(coefficients), coefficients._version)
        return self.outputs

    def contract(self, grads: Sequence[Tensor | None]) -> Tensor:
        with torch.no_grad():
            present = [(static, grad) for static, grad in zip(self.grads, grads, strict=True) if grad is not None]
            if present:
                torch._foreach_copy_([s for s, _ in present], [g for _, g in present])
            for static, grad in zip(self.grads, grads, strict=True):
                if grad is None:
                    static.zero_()
            self._backward.replay()
            return self.gradient.clone()  # the next replay overwrites the static one

    def __call__(self, coefficients: Tensor) -> Outputs:
        return _Replayed.apply(coefficients, self)

    def __deepcopy__(self, memo: dict) -> None:
        return None  # graphs point at this composer's memory; a copy captures its own


class _Replayed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coefficients: Tensor, graphed: GraphedComposition):  # type: ignore[override]
        ctx.graphed = graphed
        # detach(): a fresh tensor per call that shares the buffer's storage and version counter.
        return tuple(output.detach() for output in graphed.compose(coefficients))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        return ctx.graphed.contract(grads), None


def graphed_composition(composer: Composer, coefficients: Tensor,
                        current: GraphedComposition | None) -> GraphedComposition | None:
    """``current`` if it still fits, else a fresh capture; None (with a warning) if capture fails."""
    if current is not None and current.matches(coefficients):
        return current
    try:
        return GraphedComposition(composer, coefficients)
    except RuntimeError as error:  # e.g. an operation CUDA graphs cannot capture
        warnings.warn(f"CUDA-graph capture of the composition failed ({error}); composing eagerly",
                      RuntimeWarning, stacklevel=3)
        return None
