"""Linearised networks: f_lin(x; theta_0 + d) = f(x; theta_0) + J_theta f(x; theta_0) d.

Fine-tuning in this tangent space (Ortiz-Jimenez et al., 2023) gives task vectors that interfere
less when added. The Jacobian-vector product comes from :func:`torch.func.jvp`, so no Jacobian is
ever formed: one forward pass carries the tangent alongside.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from taskvec.vectors import TaskVector, fingerprint, parameter_blocks


class LinearizedModel(nn.Module):
    """The first-order expansion of ``base`` at its current weights.

    ``offsets`` (the d above) are trainable parameters when ``trainable=True``, which is how a task
    vector is fine-tuned in tangent space; :meth:`task_vector` returns them. The base is copied and
    frozen, so the caller's model is never modified.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        offsets: Mapping[str, Tensor] | None = None,
        blocks: Iterable[str] | None = None,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        self.base = copy.deepcopy(base)
        self.base.requires_grad_(False)
        self.base.eval()
        available = parameter_blocks(self.base)
        names = list(blocks) if blocks is not None else list(offsets or available)
        unknown = [name for name in names if name not in available]
        if unknown:
            raise KeyError(f"blocks not in the base model: {unknown[:5]}")
        self.block_names = names
        self.offsets = nn.ParameterList()
        for name in names:
            start = offsets[name].detach().clone() if offsets is not None else torch.zeros_like(available[name])
            self.offsets.append(nn.Parameter(start.to(available[name].dtype), requires_grad=trainable))

    def train(self, mode: bool = True) -> LinearizedModel:
        super().train(mode)
        self.base.eval()
        return self

    def forward(self, *args, **kwargs):
        params = dict(self.base.named_parameters())
        primals = {name: params[name] for name in self.block_names}
        tangents = {name: offset for name, offset in zip(self.block_names, self.offsets, strict=True)}

        def at(weights: dict[str, Tensor]):
            return functional_call(self.base, weights, args, kwargs, strict=False)

        output, change = jvp(at, (primals,), (tangents,))
        return output + change

    def task_vector(self, *, name: str = "", base_name: str = "", dtype: torch.dtype | None = None) -> TaskVector:
        """The learned offsets as a task vector on this base (marked ``linearized``)."""
        blocks = parameter_blocks(self.base)
        tensors = {
            n: o.detach().clone().to(dtype or o.dtype) for n, o in zip(self.block_names, self.offsets, strict=True)
        }
        meta = {
            "format": "1",
            "kind": "dense",
            "name": name,
            "base_name": base_name,
            "base_fingerprint": fingerprint({n: blocks[n] for n in self.block_names}),
            "linearized": "true",
        }
        return TaskVector(tensors, metadata=meta)
