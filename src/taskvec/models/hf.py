"""Backbones from ``transformers``: ``hf-clip`` (CLIP's vision tower) and ``hf-encoder`` (a text encoder).

Why these shapes: a backbone's parameters are exactly what task vectors change. For CLIP that is the
vision tower and its projection (named as in ``CLIPModel``, so vectors made from CLIP directories apply);
the text tower stays outside the module, frozen, and only builds zero-shot heads. A text encoder is its
own text side: features are mean-pooled over the attention mask and L2-normalised (what
sentence-transformers computes for all-MiniLM-L6-v2), and its parameters keep ``AutoModel``'s names.

Zero-shot heads: per class, fill every template with the class name, encode, L2-normalise per template,
average, re-normalise; logits = scale * <normalised feature, class embedding>, with scale
``logit_scale.exp()`` for CLIP and :data:`ENCODER_LOGIT_SCALE` (declared, not learned) for an encoder.
Heads are :class:`~taskvec.heads.LinearHead` files whose metadata carry the class names and templates.

``transformers`` is imported only when one of these is built, so ``import taskvec`` stays light.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskvec.heads import LinearHead
from taskvec.io import CheckpointError, PathLike, read_safetensors_metadata

from .registry import BackboneSpec, register_backbone
from .unpadded import supports_unpadded, unpadded_allowed, unpadded_mean_pool
from .vit import CLIP_MEAN, CLIP_STD

__all__ = [
    "ENCODER_LOGIT_SCALE",
    "HFClipVision",
    "HFTextEncoder",
    "clip_text_encoder",
    "encoder_text_encoder",
    "load_clip",
    "load_text_encoder",
    "load_zero_shot_head",
    "quiet_transformers",
    "save_zero_shot_head",
    "zero_shot_head",
]

#: Logit scale of encoder zero-shot heads: cosine similarities live in [-1, 1]; 20 is the temperature
#: sentence-transformers trains its contrastive encoders with.
ENCODER_LOGIT_SCALE = 20.0
#: Default maximum token count for text backbones (their spec's ``resolution``).
TEXT_MAX_LENGTH = 128
ZERO_SHOT_KIND = "zero-shot"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and warnings while loading, restoring the user's settings."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------


class HFClipVision(nn.Module):
    """CLIP's image side: ``visual_projection(vision_model(pixels).pooler_output)``, unnormalised."""

    def __init__(self, clip: Any) -> None:  # a transformers CLIPModel
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.feature_dim = int(clip.config.projection_dim)
        self.default_resolution = int(clip.config.vision_config.image_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)


def load_clip(path: PathLike | str, *, pretrained: bool = True, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A ``CLIPModel`` from a local directory or a hub name (``from_pretrained``), or random init from its
    config with ``pretrained=False``; eval mode, gradients off."""
    from transformers import CLIPConfig, CLIPModel

    with quiet_transformers():
        if pretrained:
            model = CLIPModel.from_pretrained(str(path), **kwargs)
        else:
            torch.manual_seed(seed)
            model = CLIPModel(CLIPConfig.from_pretrained(str(path)))
    return model.eval().requires_grad_(False)


def _hf_clip(*, pretrained: bool = True, path: PathLike | str | None = None, seed: int = 0, **kwargs: Any) -> nn.Module:
    if path is None:
        raise ValueError("backbone 'hf-clip' needs path=<a CLIP model directory or hub name>")
    vision = HFClipVision(load_clip(path, pretrained=pretrained, seed=seed, **kwargs))
    return vision.requires_grad_(True)


def clip_text_encoder(clip: Any, tokenizer: Callable[..., Any]) -> Callable[[list[str]], Tensor]:
    """texts -> CLIP text embeddings (projected, unnormalised) through the frozen text tower."""

    @torch.no_grad()
    def encode(texts: list[str]) -> Tensor:
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        return clip.text_projection(out.pooler_output)

    return encode


# ----------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------


class HFTextEncoder(nn.Module):
    """An ``AutoModel`` encoder as a sentence embedder: masked mean of the last hidden states, L2 norm.

    The inner model's submodules are registered under their own names, so parameter names equal the
    checkpoint's and task vectors made from encoder directories apply directly. For a BERT encoder with
    SDPA attention, padded batches run on their real tokens only (:mod:`taskvec.models.unpadded`; same
    outputs and gradients to float rounding); ``unpadded=False`` always runs the stock forward.
    """

    def __init__(self, model: Any, max_length: int = TEXT_MAX_LENGTH, *, unpadded: bool = True) -> None:
        super().__init__()
        direct = [name for name, _ in model.named_parameters(recurse=False)]
        if direct:
            raise ValueError(f"{type(model).__name__} has parameters outside submodules ({direct}); not supported")
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["_inner"] = model  # not registered: its children above are the same objects
        self.feature_dim = int(model.config.hidden_size)
        self.default_resolution = max_length
        self.unpadded = unpadded

    def _runs_unpadded(self, input_ids: Tensor, attention_mask: Tensor, kwargs: dict) -> bool:
        """Whether this batch takes the unpadded path: BERT + SDPA, no extra outputs asked for, not under
        vmap (data-dependent shapes), not inside ``batch_first_activations``, and some padding to skip."""
        batched = torch._C._functorch.is_batchedtensor
        return (self.unpadded and unpadded_allowed() and not kwargs
                and not batched(input_ids) and not batched(attention_mask)
                and supports_unpadded(self.__dict__["_inner"]) and not bool(attention_mask.all()))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._runs_unpadded(input_ids, attention_mask, kwargs):
            return F.normalize(unpadded_mean_pool(self.__dict__["_inner"], input_ids, attention_mask), dim=-1)
        inner_mask = attention_mask
        if torch._C._functorch.is_batchedtensor(attention_mask):
            # Under vmap (per-sample composition) transformers' mask builder branches on the mask's values,
            # which vmap cannot do; the equivalent (B, 1, 1, L) boolean mask is used as given.
            inner_mask = attention_mask[:, None, None, :].bool()
        hidden = self.__dict__["_inner"](input_ids=input_ids, attention_mask=inner_mask, **kwargs)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def load_text_encoder(
    path: PathLike | str, *, pretrained: bool = True, seed: int = 0, max_length: int = TEXT_MAX_LENGTH, **kwargs: Any
) -> HFTextEncoder:
    """An ``AutoModel`` text encoder from a local directory or a hub name, wrapped as :class:`HFTextEncoder`."""
    from transformers import AutoConfig, AutoModel

    with quiet_transformers():
        if pretrained:
            model = AutoModel.from_pretrained(str(path), **kwargs)
        else:
            torch.manual_seed(seed)
            model = AutoModel.from_config(AutoConfig.from_pretrained(str(path)))
    return HFTextEncoder(model.eval(), max_length)


def _hf_encoder(*, pretrained: bool = True, path: PathLike | str | None = None, **kwargs: Any) -> nn.Module:
    if path is None:
        raise ValueError("backbone 'hf-encoder' needs path=<a text encoder directory or hub name>")
    return load_text_encoder(path, pretrained=pretrained, **kwargs)


def encoder_text_encoder(
    encoder: HFTextEncoder, tokenizer: Callable[..., Any], max_length: int | None = None
) -> Callable[[list[str]], Tensor]:
    """texts -> sentence embeddings through ``encoder`` (use the frozen pre-trained one for heads)."""

    @torch.no_grad()
    def encode(texts: list[str]) -> Tensor:
        tokens = tokenizer(
            texts, padding=True, truncation=True, max_length=max_length or encoder.default_resolution,
            return_tensors="pt",
        )
        return encoder(tokens["input_ids"], tokens.get("attention_mask"))

    return encode


# ----------------------------------------------------------------------------------------------
# Zero-shot heads
# ----------------------------------------------------------------------------------------------


def zero_shot_head(
    encode: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    logit_scale: float,
) -> LinearHead:
    """A frozen cosine head from text alone: per class, the re-normalised mean of the L2-normalised
    embeddings of every template filled with its name (``"a photo of a {}."``)."""
    if not class_names or not templates:
        raise ValueError(
            f"a zero-shot head needs class names and templates; got {len(class_names)} and {len(templates)}"
        )
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates need a '{{}}' where the class name goes: {bad[:3]}")
    rows = []
    for name in class_names:
        embedded = F.normalize(encode([t.format(name) for t in templates]).to(torch.float32), dim=-1)
        rows.append(F.normalize(embedded.mean(0), dim=0))
    head = LinearHead.from_weights(torch.stack(rows), None, normalize=True, logit_scale=float(logit_scale))
    return head.freeze()


def clip_zero_shot_head(
    clip: Any, tokenizer: Callable[..., Any], class_names: Sequence[str], templates: Sequence[str]
) -> LinearHead:
    """CLIP's zero-shot head, scaled by the model's own ``logit_scale.exp()``."""
    scale = float(clip.logit_scale.detach().exp())
    return zero_shot_head(clip_text_encoder(clip, tokenizer), class_names, templates, scale)


def save_zero_shot_head(
    head: LinearHead, path: PathLike, class_names: Sequence[str], templates: Sequence[str], **extra: str
) -> PathLike:
    """A small safetensors file; class names and templates travel in its metadata."""
    if len(class_names) != head.num_classes:
        raise ValueError(f"{len(class_names)} class names for a head of {head.num_classes} classes")
    meta = {
        "kind": ZERO_SHOT_KIND, "class_names": json.dumps(list(class_names)), "templates": json.dumps(list(templates))
    }
    meta.update(extra)
    return head.save(path, meta)


def load_zero_shot_head(path: PathLike) -> tuple[LinearHead, list[str], list[str]]:
    """(head, class names, templates) from :func:`save_zero_shot_head`'s file."""
    meta = read_safetensors_metadata(path)
    if meta.get("kind") != ZERO_SHOT_KIND:
        raise CheckpointError(f"{path}: not a zero-shot head (kind {meta.get('kind')!r})")
    return LinearHead.load(path), json.loads(meta["class_names"]), json.loads(meta["templates"])


register_backbone(
    "hf-clip", _hf_clip, BackboneSpec(name="hf-clip", feature_dim=512, resolution=224, mean=CLIP_MEAN, std=CLIP_STD)
)
register_backbone(
    "hf-encoder",
    _hf_encoder,
    BackboneSpec(name="hf-encoder", feature_dim=384, resolution=TEXT_MAX_LENGTH, mean=(0.0, 0.0, 0.0),
                 std=(1.0, 1.0, 1.0)),
)
