"""Fine-tuning LoRA adapters with the ``peft`` library, saved as PEFT adapter directories.

Why peft itself: an adapter saved by ``save_pretrained`` is what the rest of the ecosystem reads, and
taskvec imports such directories as :class:`~taskvec.vectors.LoraTaskVector` banks (the adapter import
lives in ``taskvec.hf``). This module only chooses the target modules, trains, and saves.

Targets (:func:`lora_target_modules`): ``attention`` (linear layers under an attention module),
``mlp`` (the other linear layers of the numbered transformer layers), ``both``, or ``conv1x1`` (the
pointwise convolutions of a CNN such as MobileNetV2, where most weights live); or an explicit list
of module names. Training runs :func:`taskvec.train.fit` on the adapter parameters only, by default
in eval mode, so normalisation statistics stay frozen and the adapter is a pure weight difference.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from taskvec.io import PathLike
from taskvec.train import Evaluate, Loader, LossFn, TrainConfig, TrainResult, fit
from taskvec.vectors import fingerprint, parameter_blocks

if TYPE_CHECKING:
    from peft import PeftModel

TARGET_SETS = ("auto", "attention", "mlp", "both", "conv1x1")
_ATTENTION = re.compile(r"^(attn|attention|self_attn|self_attention|selfattention|cross_attn|mha)$", re.IGNORECASE)
RECORD_FILE = "taskvec.json"


def _is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D is a linear layer with transposed weight; peft supports it
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_numbered_layer(name: str) -> bool:
    return any(part.isdigit() for part in name.split(".")[:-1])


def resolve_targets(model: nn.Module, targets: str) -> str:
    """``auto`` as the set that fits ``model``: ``both`` (attention + MLP) on a transformer, ``conv1x1``
    on a CNN without such layers; any other set is returned unchanged."""
    if targets != "auto":
        return targets
    for candidate in ("both", "conv1x1"):
        try:
            lora_target_modules(model, candidate)
        except ValueError:
            continue
        return candidate
    raise ValueError(f"LoRA targets 'auto': {type(model).__name__} has neither attention/MLP linear layers nor "
                     "1x1 convolutions; pass the module names explicitly")


def lora_target_modules(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the modules that get adapters (see the module docstring for the target sets)."""
    modules = dict(model.named_modules())
    if not isinstance(targets, str):
        names = list(targets)
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise KeyError(f"LoRA targets not in the model: {unknown[:5]}")
        return names
    if targets not in TARGET_SETS:
        raise ValueError(f"LoRA targets {targets!r}: use one of {TARGET_SETS} or a list of module names")
    targets = resolve_targets(model, targets)
    chosen = []
    for name, module in modules.items():
        if targets == "conv1x1":
            if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
                chosen.append(name)
            continue
        if not _is_linear(module):
            continue
        attention = any(_ATTENTION.match(part) for part in name.split(".")[:-1])
        mlp = not attention and _in_numbered_layer(name)
        if (targets in ("attention", "both") and attention) or (targets in ("mlp", "both") and mlp):
            chosen.append(name)
    if not chosen:
        linear = [n for n, m in modules.items() if _is_linear(m)][:5]
        raise ValueError(f"LoRA targets {targets!r} match no module of {type(model).__name__} "
                         f"(its linear layers start {linear}); pass the module names explicitly")
    return chosen


@dataclass
class LoraSpec:
    """The adapter: rank, alpha (scale = alpha / rank; default alpha = rank, so scale 1) and targets."""

    rank: int = 16
    alpha: float | None = None
    targets: str | list[str] = "both"
    dropout: float = 0.0
    seed: int = 0  # initialisation of the A factors

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def make_lora_model(model: nn.Module, spec: LoraSpec) -> PeftModel:
    """A peft ``PeftModel`` around a *copy* of ``model``; only the adapter factors are trainable."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, spec.targets)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,  # type: ignore[arg-type]  # peft takes floats
        target_modules=targets,
        lora_dropout=spec.dropout,
        bias="none",
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        return get_peft_model(copy.deepcopy(model), config)
    finally:
        torch.random.set_rng_state(state)


def adapter_parameter_count(peft_model: nn.Module) -> int:
    """Learnable numbers of the adapter (what a matched-parameter comparison counts)."""
    return sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)


def rank_for_budget(model: nn.Module, targets: str | Sequence[str], parameters: int) -> int:
    """The LoRA rank whose adapter on ``targets`` has the learnable count nearest ``parameters`` (at least 1):
    a rank-r adapter on a (out, in) weight learns r * (in + out) numbers."""
    modules = dict(model.named_modules())
    per_rank = 0
    for name in lora_target_modules(model, targets):
        weight = modules[name].weight
        per_rank += weight.shape[0] + weight[0].numel()
    return max(1, round(parameters / per_rank))


@dataclass
class LoraRun:
    """A trained adapter: the peft model, the spec, the resolved targets and the training record."""

    model: PeftModel
    spec: LoraSpec
    targets: list[str]
    result: TrainResult
    info: dict[str, Any] = field(default_factory=dict)


def train_lora(
    model: nn.Module,
    loss_fn: LossFn,
    loader: Loader,
    spec: LoraSpec,
    config: TrainConfig | None = None,
    *,
    evaluate: Evaluate | None = None,
) -> LoraRun:
    """Fine-tune a LoRA adapter on ``model`` (left untouched) to minimise ``loss_fn(model, batch)``.

    ``config`` defaults to eval-mode training (frozen normalisation statistics) at lr 1e-3.
    """
    config = config or TrainConfig(lr=1e-3, train_mode=False, progress=False, description="lora")
    peft_model = make_lora_model(model, spec)
    targets = lora_target_modules(model, spec.targets)
    result = fit(peft_model, loss_fn, loader, config, evaluate=evaluate)
    info = {"trainable": adapter_parameter_count(peft_model), "base_numel": sum(p.numel() for p in model.parameters())}
    return LoraRun(peft_model, spec, targets, result, info)


def save_adapter(run: LoraRun, directory: PathLike, base: nn.Module, *, name: str = "",
                 extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter with ``save_pretrained`` into a new ``directory`` (refuses a non-empty one).

    Beside peft's files, ``taskvec.json`` records the task name, spec, targets, the base fingerprint of
    the adapted blocks (so an import can refuse another base) and the training summary. The directory
    is written under a temporary name and renamed, so a reader never sees half an adapter.
    """
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target}: exists and is not an empty directory; refusing to overwrite an adapter")
    target.parent.mkdir(parents=True, exist_ok=True)
    blocks = parameter_blocks(base)
    adapted = [f"{module}.weight" for module in run.targets]
    missing = [b for b in adapted if b not in blocks]
    if missing:
        raise KeyError(f"base model lacks adapted blocks {missing[:5]}")
    record = {
        "name": name,
        "spec": asdict(run.spec),
        "targets": run.targets,
        "base_fingerprint": fingerprint({b: blocks[b] for b in adapted}),
        "fingerprint_blocks": adapted,
        "trainable": adapter_parameter_count(run.model),
        "train": run.result.to_dict(),
    }
    record.update(extra or {})
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        run.model.save_pretrained(str(tmp))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def merged_delta(base: nn.Module, adapter_dir: PathLike) -> dict[str, Tensor]:
    """``merge_and_unload(base + adapter) - base`` per changed block: peft's own reading of the adapter."""
    from peft import PeftModel

    original = parameter_blocks(base)
    wrapped: Any = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
    merged = wrapped.merge_and_unload()
    after = parameter_blocks(merged)
    return {name: (after[name] - original[name]).detach() for name in original
            if name in after and not torch.equal(after[name], original[name])}
