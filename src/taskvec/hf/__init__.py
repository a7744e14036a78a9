"""Hugging Face formats: model directories in and out, PEFT LoRA adapters, old pickled checkpoints.

Why a package of its own: these are file formats, not maths; the task-vector, composer and merging
modules stay format-free and this package translates at the edges.
"""

from taskvec.hf.adapters import AdapterError, load_adapter
from taskvec.hf.checkpoints import (
    ModelWeights,
    check_same_architecture,
    config_differences,
    is_adapter_dir,
    load_model_state_dict,
    open_weights,
)
from taskvec.hf.export import merge_to_directory
from taskvec.hf.unpickle import UnsafePickleError, convert_pickle, restricted_load

__all__ = [
    "AdapterError",
    "ModelWeights",
    "UnsafePickleError",
    "check_same_architecture",
    "config_differences",
    "convert_pickle",
    "is_adapter_dir",
    "load_adapter",
    "load_model_state_dict",
    "merge_to_directory",
    "open_weights",
    "restricted_load",
]
