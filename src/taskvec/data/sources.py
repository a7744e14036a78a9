"""Readers for the raw formats the registry packages ship, each returning uint8 (N, C, H, W) tensors.

Why readers of raw files rather than the packages' own loaders: those loaders pull heavy dependencies
(TensorFlow for animal-mnist) or are JavaScript; reading the files directly needs only numpy and PIL,
and lets the tests build tiny fixtures in the very same formats.

Every reader returns a :class:`RawData`: named pools of (images, labels) plus class names. A pool is an
official split of the source (``train`` / ``test`` for MNIST-like sets) or ``all`` when the source has
none; :mod:`taskvec.data.tasks` draws the train / val / test splits from the pools.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "EMOJI_CATEGORIES",
    "IMAGE_SUFFIXES",
    "RawData",
    "decode_image",
    "duplicate_groups",
    "read_animal_pickles",
    "read_digits",
    "read_emoji",
    "read_idx",
    "read_idx_pair",
    "read_image_folder",
]

EMOJI_CATEGORIES: tuple[str, ...] = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
"""The 9 emoji categories used as labels, in Unicode's order (the "Component" swatches are left out)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class RawData:
    """Decoded source data: pools name -> (uint8 images (N, C, H, W), int64 labels (N,)), class names."""

    pools: dict[str, tuple[torch.Tensor, torch.Tensor]]
    classes: list[str]
    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per pool, int64 (N,): index of the first identical image in the pool (its own index if unique),
    or -1 for an image that also occurs in the ``test`` pool. Filled by :func:`duplicate_groups`."""

    def check(self, what: str) -> RawData:
        """Validate dtypes, shapes and label range; ``what`` names the source in the error."""
        for pool, (im, lab) in self.pools.items():
            if im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] not in (1, 3):
                raise ValueError(f"{what} pool {pool!r}: images must be uint8 NCHW, got {im.dtype} {tuple(im.shape)}")
            if lab.dtype != torch.int64 or lab.shape != (im.shape[0],):
                raise ValueError(f"{what} pool {pool!r}: {tuple(lab.shape)} labels for {im.shape[0]} images")
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= len(self.classes)):
                raise ValueError(
                    f"{what} pool {pool!r}: labels span [{int(lab.min())}, {int(lab.max())}] "
                    f"but there are {len(self.classes)} classes"
                )
            grp = self.groups.get(pool)
            if grp is not None and (grp.dtype != torch.int64 or grp.shape != lab.shape):
                raise ValueError(f"{what} pool {pool!r}: groups must be int64 {tuple(lab.shape)}")
        return self


def duplicate_groups(pools: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Find exact duplicate images, so that splits can keep every copy of an image on one side.

    Why: Animal-MNIST holds 284 pairs of identical images and the emoji sets a few identical drawings
    (Twitter draws several territories' flags as one flag); without this, a test image could have an
    exact copy in train. Images of the ``test`` pool are seen first: a copy of one in another pool is
    marked -1 (never used), so an official test set stays untouched.
    """
    seen_test: set[bytes] = set()
    out: dict[str, torch.Tensor] = {}
    for pool in sorted(pools, key=lambda p: p != "test"):
        flat = pools[pool][0].flatten(1).numpy()
        first: dict[bytes, int] = {}
        grp = np.empty(flat.shape[0], dtype=np.int64)
        for i, row in enumerate(flat):
            key = row.tobytes()
            grp[i] = -1 if key in seen_test else first.setdefault(key, i)
        if pool == "test":
            seen_test = set(first)
        out[pool] = torch.from_numpy(grp)
    return out


# --------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped, detected by its magic bytes) into a numpy array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header says shape {dims} ({expected} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"missing IDX file {stem}[.gz] in {folder}")


def read_idx_pair(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``<prefix>-images-idx3-ubyte[.gz]`` and ``<prefix>-labels-idx1-ubyte[.gz]`` from ``folder``."""
    folder = Path(folder)
    img_path, lab_path = _find(folder, f"{prefix}-images-idx3-ubyte"), _find(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 (N, H, W) images, got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{lab_path}: {labels.shape[0]} labels for {images.shape[0]} images in {img_path}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------------------------------
# Animal-MNIST: two gzipped pickles of numpy arrays


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild plain numpy arrays and nothing else (no code runs from the file)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def _load_np_pickle(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: cannot read gzipped numpy pickle ({e})") from e
    if not isinstance(obj, np.ndarray):
        raise ValueError(f"{path}: expected a numpy array, got {type(obj).__name__}")
    return obj


def read_animal_pickles(data_path: Path, label_path: Path, classes: list[str]) -> RawData:
    """Animal-MNIST: ``animal_data_version_3.gz`` (uint8 N x 28 x 28) and its int labels."""
    images, labels = _load_np_pickle(Path(data_path)), _load_np_pickle(Path(label_path))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{data_path}: expected uint8 (N, H, W), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{label_path}: {labels.shape} labels for {images.shape[0]} images in {data_path}")
    im = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    return RawData({"all": (im, torch.from_numpy(labels.astype(np.int64)))}, classes).check(str(data_path))


# --------------------------------------------------------------------------------------------------
# sklearn digits


def read_digits() -> RawData:
    """scikit-learn's bundled 8x8 digits (values 0..16) rescaled to uint8 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    im = torch.from_numpy(images).unsqueeze(1)
    lab = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    return RawData({"all": (im, lab)}, [str(i) for i in range(10)]).check("sklearn digits")


# --------------------------------------------------------------------------------------------------
# PNG / JPEG images (emoji, image folders)


def decode_image(path: Path, size: int | None = None, *, gray: bool = False) -> np.ndarray:
    """Decode an image to uint8 (C, H, W): RGB (C=3) or grayscale (C=1), transparency composited on white.

    ``size`` resizes (shorter side to ``size``, then a centre crop) so images of mixed sizes can stack.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            im = im.convert("RGBA" if has_alpha else ("L" if gray else "RGB"))
            if has_alpha:
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im).convert("L" if gray else "RGB")
            elif gray and im.mode != "L":
                im = im.convert("L")
            if size is not None:
                w, h = im.size
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def read_emoji(package_dir: Path, style: str, resolution: int = 64) -> RawData:
    """An emoji-datasource-<style> package: ``emoji.json`` + ``img/<style>/<resolution>/*.png``.

    One image per base emoji (skin-tone variants are left out: they are near-duplicates of their base
    and would leak between splits); labels are the 9 categories of :data:`EMOJI_CATEGORIES`. The order
    follows ``emoji.json``, identical across styles, so styles share split indices under one seed.
    """
    package_dir = Path(package_dir)
    meta_path = package_dir / "emoji.json"
    try:
        entries = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: cannot read emoji metadata ({e})") from e
    img_dir = package_dir / "img" / style / str(resolution)
    cat_index = {c: i for i, c in enumerate(EMOJI_CATEGORIES)}
    images, labels = [], []
    for i, e in enumerate(entries):
        try:
            cat, fname = e["category"], e["image"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{meta_path}: entry {i} lacks key {err}") from err
        if cat not in cat_index or not e.get(f"has_img_{style}", True):
            continue
        path = img_dir / fname
        if not path.is_file():
            raise FileNotFoundError(f"{meta_path} lists {fname!r} (entry {i}) but {path} does not exist")
        arr = decode_image(path)
        if arr.shape != (3, resolution, resolution):
            raise ValueError(f"{path}: expected a {resolution}x{resolution} image, got {arr.shape[1:]}")
        images.append(arr)
        labels.append(cat_index[cat])
    if not images:
        raise ValueError(f"{meta_path}: no emoji with images under {img_dir}")
    im = torch.from_numpy(np.stack(images))
    return RawData({"all": (im, torch.tensor(labels, dtype=torch.int64))}, list(EMOJI_CATEGORIES)).check(
        str(package_dir)
    )


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folder names) and (file, label) pairs of an image-folder tree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    files = []
    for label, c in enumerate(classes):
        found = sorted(
            p
            for p in (root / c).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not found:
            raise ValueError(f"image folder class {c!r} ({root / c}) has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, label) for p in found]
    return classes, files


def read_image_folder(root: Path, size: int | None = None) -> RawData:
    """A user's ``root/<class>/<image>`` tree. Grayscale if every image is, else RGB.

    Without ``size`` all images must share one size (the error names two that differ).
    """
    from PIL import Image

    classes, files = list_image_folder(root)
    gray = True
    for p, _ in files:
        with Image.open(p) as im:
            if im.mode not in ("L", "1", "I;16", "I", "LA"):
                gray = False
                break
    arrays = [decode_image(p, size, gray=gray) for p, _ in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        other = next(i for i, a in enumerate(arrays) if a.shape != first)
        raise ValueError(
            f"image folder {root}: images differ in size ({files[0][0]} is {first[1]}x{first[2]}, "
            f"{files[other][0]} is {arrays[other].shape[1]}x{arrays[other].shape[2]}); pass size=N to resize"
        )
    im = torch.from_numpy(np.stack(arrays))
    lab = torch.tensor([lab for _, lab in files], dtype=torch.int64)
    return RawData({"all": (im, lab)}, classes).check(str(root))
