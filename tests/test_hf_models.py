"""hf-clip and hf-encoder backbones, and zero-shot heads checked against a hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import WordTokenizer, bert, clip, perturbed, save

from taskvec.compose import Composer
from taskvec.models import build_backbone
from taskvec.models.hf import (
    clip_zero_shot_head,
    encoder_text_encoder,
    load_clip,
    load_zero_shot_head,
    save_zero_shot_head,
    zero_shot_head,
)
from taskvec.vectors import TaskVector, parameter_blocks

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
CLASSES = ["cat", "dog", "red fox"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}", "{}"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    model = clip(0)
    return model, save(model, tmp_path_factory.mktemp("clip") / "clip")


def test_hf_clip_backbone_is_the_vision_tower(clip_dir):
    model, path = clip_dir
    backbone, spec = build_backbone("hf-clip", path=path)
    names = list(parameter_blocks(backbone))
    assert names and all(n.startswith(("vision_model.", "visual_projection.")) for n in names)
    assert spec.feature_dim == 24 and spec.resolution == 16
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        assert torch.allclose(backbone(pixels), expected, atol=1e-6)
    # a vector made from two CLIP directories composes on the backbone (text blocks simply not used)
    full = TaskVector.from_models(model, perturbed(model, 1), name="ft")
    vision_only = TaskVector({k: full[k] for k in names}, metadata={"name": "ft"})
    composer = Composer(backbone, [vision_only], "isotropic", init=1.0)
    with torch.no_grad():
        merged = composer.merge()
        assert torch.allclose(composer(pixels), merged(pixels), atol=1e-5)


def _hand_head(encode_one, scale):
    rows = []
    for name in CLASSES:
        embeddings = []
        for template in TEMPLATES:
            e = encode_one(template.format(name))
            embeddings.append(e / e.norm())
        mean = sum(embeddings) / len(embeddings)
        rows.append(mean / mean.norm())
    return torch.stack(rows), scale


def test_clip_zero_shot_head_equals_hand_computation(clip_dir, tmp_path):
    model, path = clip_dir
    tokenizer = WordTokenizer()
    head = clip_zero_shot_head(load_clip(path), tokenizer, CLASSES, TEMPLATES)

    def one(text):
        ids = torch.tensor([tokenizer.ids(text)])
        with torch.no_grad():
            return model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]

    weights, _ = _hand_head(one, None)
    assert torch.allclose(head.weight, weights, atol=1e-6)
    assert head.logit_scale == pytest.approx(float(torch.tensor(2.0).exp()))
    features = torch.randn(4, 24, generator=torch.Generator().manual_seed(1))
    hand_logits = head.logit_scale * F.normalize(features, dim=-1) @ weights.T
    assert torch.allclose(head(features), hand_logits, atol=1e-5)
    file = save_zero_shot_head(head, tmp_path / "head.safetensors", CLASSES, TEMPLATES)
    loaded, names, templates = load_zero_shot_head(file)
    assert names == CLASSES and templates == TEMPLATES
    assert torch.equal(loaded(features), head(features))


def test_hf_encoder_mean_pooling_and_head(tmp_path):
    model = bert(0)
    path = save(model, tmp_path / "enc")
    encoder, spec = build_backbone("hf-encoder", path=path)
    assert spec.feature_dim == 32
    assert set(parameter_blocks(encoder)) == set(parameter_blocks(model))  # the checkpoint's own names
    tokenizer = WordTokenizer()
    encode = encoder_text_encoder(encoder, tokenizer)

    def one(text):  # no padding at all: the mean over real tokens, by hand
        ids = torch.tensor([tokenizer.ids(text)])
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0]
        return hidden.mean(0)

    texts = ["a short one", "a much longer sentence than the other"]
    batched = encode(texts)  # padded batch: the mask must keep padding out of the mean
    for row, text in zip(batched, texts, strict=True):
        expected = one(text)
        assert torch.allclose(row, expected / expected.norm(), atol=1e-5)
    # task vectors made from encoder checkpoints compose on the backbone (its names are the checkpoint's)
    tuned = perturbed(model, 1)
    composer = Composer(encoder, [TaskVector.from_models(model, tuned, name="ft")], "isotropic", init=1.0)
    tokens = tokenizer(texts)
    with torch.no_grad():
        hidden = tuned(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        assert torch.allclose(composer(tokens["input_ids"], tokens["attention_mask"]), expected, atol=1e-5)
    head = zero_shot_head(encode, CLASSES, TEMPLATES, logit_scale=20.0)
    weights, _ = _hand_head(one, 20.0)
    assert torch.allclose(head.weight, weights, atol=1e-5)
    with pytest.raises(ValueError, match="'\\{\\}'"):
        zero_shot_head(encode, CLASSES, ["no slot"], 20.0)


def test_backbones_need_a_path():
    with pytest.raises(ValueError, match="path="):
        build_backbone("hf-clip")
