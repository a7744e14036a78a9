"""Build :class:`Task` objects: fetch (or find in the cache) -> decode once -> fixed seeded splits."""

from __future__ import annotations

import hashlib
from pathlib import Path

from taskvec.data.registry import DATASETS
from taskvec.data.sources import RawData, duplicate_groups, list_image_folder, read_image_folder
from taskvec.data.splits import SplitSizes, resolve_size, stratified_split
from taskvec.data.store import load_decoded, save_decoded
from taskvec.data.types import ImageSet, Task
from taskvec.fetch import cache_dir

__all__ = ["available_tasks", "decoded_path", "image_folder", "load_raw", "load_task", "split_task"]

FOLDER_SIZES = SplitSizes(train=0.6, val=0.2, test=None)


def available_tasks() -> list[str]:
    """Names accepted by :func:`load_task`."""
    return list(DATASETS)


def decoded_path(name: str) -> Path:
    """Where the decoded safetensors copy of a dataset lives in the cache."""
    return cache_dir() / "decoded" / f"{name}.safetensors"


def load_raw(name: str, *, fetch: bool = True) -> RawData:
    """All pools of a registered dataset, decoded once and then read from the cache."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    path = decoded_path(name)
    raw = load_decoded(path, spec.key)
    if raw is None:
        raw = spec.read(spec.fetch(fetch)).check(f"{name} ({spec.source})")
        raw.groups = duplicate_groups(raw.pools)
        save_decoded(path, raw, spec.key)
    return raw


def _usable(raw: RawData, pool: str) -> int:
    """Samples of ``pool`` that may be drawn (copies of official test images excluded)."""
    grp = raw.groups.get(pool)
    return int((grp >= 0).sum()) if grp is not None else raw.pools[pool][1].numel()


def split_task(name: str, raw: RawData, sizes: SplitSizes, seed: int) -> Task:
    """Draw stratified, disjoint train / val / test splits from the pools of ``raw`` under ``seed``.

    Pools ``train`` + ``test``: train and val from ``train``, test from ``test``. Pool ``all``: all three.
    """
    pools = set(raw.pools)
    if pools == {"train", "test"}:
        (tr_im, tr_lab), (te_im, te_lab) = raw.pools["train"], raw.pools["test"]
        n = _usable(raw, "train")
        ntr = resolve_size(sizes.train, n, what=f"{name} train", remaining=n)
        if sizes.val is None:
            raise ValueError(f"{name}: val size must be given (it is drawn from the official train set)")
        nva = resolve_size(sizes.val, n, what=f"{name} val", remaining=n - ntr)
        m = _usable(raw, "test")
        nte = resolve_size(sizes.test, m, what=f"{name} test", remaining=m)
        itr, iva = stratified_split(tr_lab, [ntr, nva], seed, raw.groups.get("train"))
        (ite,) = stratified_split(te_lab, [nte], seed, raw.groups.get("test"))
        pool_tr, pool_te = ImageSet(tr_im, tr_lab), ImageSet(te_im, te_lab)
        return Task(name, list(raw.classes), pool_tr.subset(itr), pool_tr.subset(iva), pool_te.subset(ite))
    if pools == {"all"}:
        im, lab = raw.pools["all"]
        n = _usable(raw, "all")
        ntr = resolve_size(sizes.train, n, what=f"{name} train", remaining=n)
        nva = resolve_size(sizes.val, n, what=f"{name} val", remaining=n - ntr)
        nte = resolve_size(sizes.test, n, what=f"{name} test", remaining=n - ntr - nva)
        itr, iva, ite = stratified_split(lab, [ntr, nva, nte], seed, raw.groups.get("all"))
        pool = ImageSet(im, lab)
        return Task(name, list(raw.classes), pool.subset(itr), pool.subset(iva), pool.subset(ite))
    raise ValueError(f"{name}: unsupported pools {sorted(pools)} (expected train+test or all)")


def load_task(name: str, *, seed: int = 0, sizes: SplitSizes | None = None, fetch: bool = True) -> Task:
    """A registered dataset with fixed seeded splits (default sizes: see :mod:`taskvec.data`).

    ``fetch=False`` never downloads: it uses the decoded cache or an already fetched archive, and raises
    :class:`taskvec.fetch.FetchError` (with the command to get the data by hand) otherwise.
    """
    raw = load_raw(name, fetch=fetch)
    return split_task(name, raw, sizes or DATASETS[name].sizes, seed)


def _folder_key(classes: list[str], files: list[tuple[Path, int]], root: Path, size: int | None) -> str:
    h = hashlib.sha256(f"size={size}\n{classes}\n".encode())
    for p, label in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def image_folder(
    path: Path | str,
    *,
    seed: int = 0,
    sizes: SplitSizes | None = None,
    size: int | None = None,
    cache: bool = True,
) -> Task:
    """A user's ``path/<class>/<image>`` folder as a :class:`Task` (classes = sorted sub-folder names).

    Images must share one size unless ``size`` is given (shorter side resized, then centre-cropped).
    Default split 60 / 20 / 20 %, stratified. The decode is cached, keyed on the files' names, sizes and
    modification times, so an edited folder is decoded again.
    """
    root = Path(path).expanduser().resolve()
    classes, files = list_image_folder(root)
    key = _folder_key(classes, files, root, size)
    cache_path = cache_dir() / "decoded" / f"folder-{key[:20]}.safetensors"
    raw = load_decoded(cache_path, key) if cache else None
    if raw is None:
        raw = read_image_folder(root, size)
        raw.groups = duplicate_groups(raw.pools)
        if cache:
            save_decoded(cache_path, raw, key)
    return split_task(root.name, raw, sizes or FOLDER_SIZES, seed)
