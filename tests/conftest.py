"""Tiny generated networks and banks: every core test runs in milliseconds on a CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskvec.vectors import TaskVector

# `make test` runs two pytest workers on two cores: one torch thread each avoids oversubscription.
torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Conv + BatchNorm + depthwise conv + LayerNorm + linear: every kind of block the composer meets."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = self.depthwise(x).mean(dim=(2, 3))
        return self.fc(self.norm(x))


def make_base(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        net.bn.running_mean.normal_(0, 0.1)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def perturbed(base: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """A stand-in for a fine-tuned model: the base plus seeded noise on every parameter."""
    finetuned = make_base(0)
    finetuned.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for param in finetuned.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return finetuned


def make_bank(base: nn.Module, n: int = 3) -> list[TaskVector]:
    return [TaskVector.from_models(base, perturbed(base, i), name=f"task{i}") for i in range(n)]


@pytest.fixture
def base() -> TinyNet:
    return make_base()


@pytest.fixture
def bank(base: TinyNet) -> list[TaskVector]:
    return make_bank(base)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(7))
