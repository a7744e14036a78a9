"""How coefficients map onto parameter blocks.

One layout serves every granularity: each block owns a set of coefficient columns (one per part), and
each element of the block belongs to exactly one part. Isotropic, layer and block (aTLAS) scaling use
one part per block; aTLAS x K splits *every* block, biases and norm scales included, into K parts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("isotropic", "layer", "block")
PARTITIONS = ("rows", "random")


@dataclass(frozen=True)
class Granularity:
    """What one coefficient covers.

    ``kind``: ``isotropic`` (one per task vector), ``layer`` (blocks grouped by module prefix),
    ``block`` (one per parameter tensor: aTLAS). ``parts`` > 1 splits each block into that many parts
    (aTLAS x K), either contiguous ``rows`` of the flattened tensor or a fixed ``random`` partition.
    """

    kind: str = "block"
    parts: int = 1
    partition: str = "rows"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"granularity kind {self.kind!r} is not one of {KINDS}")
        if self.parts < 1:
            raise ValueError(f"granularity parts must be >= 1, got {self.parts}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition {self.partition!r} is not one of {PARTITIONS}")
        if self.parts > 1 and self.kind != "block":
            raise ValueError("parts > 1 (aTLAS x K) splits blocks; use kind='block'")

    @classmethod
    def parse(cls, spec: str | Granularity) -> Granularity:
        """Read ``isotropic``, ``layer``, ``block``, ``x4`` / ``block-x4`` or ``x4-random``."""
        if isinstance(spec, Granularity):
            return spec
        text = spec.strip().lower()
        if text in KINDS:
            return cls(kind=text)
        match = re.fullmatch(r"(?:block-)?x(\d+)(?:-(rows|random))?", text)
        if match:
            return cls(kind="block", parts=int(match.group(1)), partition=match.group(2) or "rows")
        raise ValueError(
            f"unknown granularity {spec!r}: use isotropic, layer, block, xK (e.g. x4) or xK-random"
        )

    def __str__(self) -> str:
        if self.parts == 1:
            return self.kind
        return f"x{self.parts}" + ("-random" if self.partition == "random" else "")


def module_prefix(block_name: str) -> str:
    return block_name.rsplit(".", 1)[0] if "." in block_name else ""


@dataclass
class BlockParts:
    """The coefficient columns of one block and which part each element falls in."""

    columns: Tensor                 # (K,) long: coefficient columns owned by this block
    sizes: Tensor | None = None     # rows partition: (K,) element counts of the contiguous parts
    index: Tensor | None = None     # random partition: (numel,) part of each element

    @property
    def parts(self) -> int:
        return int(self.columns.numel())


class Layout:
    """The coefficient columns of a set of blocks under a granularity."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], granularity: Granularity | str) -> None:
        self.granularity = Granularity.parse(granularity)
        self.block_names = list(shapes)
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.labels: list[str] = []
        self.blocks: dict[str, BlockParts] = {}
        gran = self.granularity
        if gran.kind == "isotropic":
            self.labels = ["all"]
            for name in self.block_names:
                self.blocks[name] = BlockParts(columns=torch.zeros(1, dtype=torch.long))
        elif gran.kind == "layer":
            prefixes: dict[str, int] = {}
            for name in self.block_names:
                column = prefixes.setdefault(module_prefix(name), len(prefixes))
                self.blocks[name] = BlockParts(columns=torch.tensor([column]))
            self.labels = list(prefixes)
        else:
            for position, name in enumerate(self.block_names):
                numel = math.prod(self.shapes[name])
                parts = min(gran.parts, numel)
                start = len(self.labels)
                columns = torch.arange(start, start + parts)
                if parts == 1:
                    self.blocks[name] = BlockParts(columns=columns)
                    self.labels.append(name)
                    continue
                self.labels.extend(f"{name}[{k}/{parts}]" for k in range(parts))
                if gran.partition == "rows":
                    base, extra = divmod(numel, parts)
                    sizes = torch.tensor([base + (1 if k < extra else 0) for k in range(parts)])
                    self.blocks[name] = BlockParts(columns=columns, sizes=sizes)
                else:
                    generator = torch.Generator().manual_seed(gran.seed * 100_003 + position)
                    index = torch.randperm(numel, generator=generator) % parts
                    self.blocks[name] = BlockParts(columns=columns, index=index)

    @property
    def num_columns(self) -> int:
        return len(self.labels)

    def block_coefficients(self, coefficients: Tensor) -> Tensor:
        """(n, B): each block's mean coefficient per vector, for tables and heatmaps."""
        return torch.stack(
            [coefficients[..., self.blocks[name].columns].mean(-1) for name in self.block_names], dim=-1
        )
