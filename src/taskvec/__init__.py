"""taskvec: compose task vectors with learned anisotropic scaling (aTLAS) and its relatives."""

from taskvec.compose import Composer
from taskvec.granularity import Granularity
from taskvec.linearize import LinearizedModel
from taskvec.train import Loader, TrainConfig, fit
from taskvec.vectors import LoraTaskVector, TaskVector, load_task_vector

__version__ = "0.1.0"

__all__ = [
    "Composer",
    "Granularity",
    "LinearizedModel",
    "Loader",
    "LoraTaskVector",
    "TaskVector",
    "TrainConfig",
    "fit",
    "load_task_vector",
]
