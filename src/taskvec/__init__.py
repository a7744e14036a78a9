"""taskvec: compose task vectors with learned anisotropic scaling (aTLAS) and its relatives."""

from typing import TYPE_CHECKING

from taskvec.compose import Composer
from taskvec.granularity import Granularity
from taskvec.linearize import LinearizedModel
from taskvec.train import Loader, TrainConfig, fit
from taskvec.vectors import LoraTaskVector, TaskVector, load_task_vector

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from taskvec.heads import (
        LinearHead,
        LPPlusPlus,
        TipAdapter,
        accuracy,
        extract_features,
        fit_linear_head,
        prototype_head,
        tip_adapter_search,
    )
    from taskvec.io import CheckpointError
    from taskvec.merging import alpha_search, dare, dare_merge, magnitude_threshold, task_arithmetic, ties_merge
    from taskvec.methods import (
        MergeMethod,
        MergeParameterError,
        UnknownMethodError,
        get_method,
        list_methods,
        merge,
    )
    from taskvec.models import PretrainedUnavailableError, PretrainedWeightsError
    from taskvec.objectives import (
        cross_entropy,
        entropy,
        multitask_cross_entropy,
        negation,
        nt_xent,
        sar,
        sharpness_aware,
        simclr,
        softmax_entropy,
        trusted_set,
        trusted_targets,
        ufm,
        ufm_loss,
    )
    from taskvec.variational import UnsupportedModuleError, VariationalComposer, VariationalConfig, elbo_loss
    from taskvec.vectors import BaseMismatchError

__version__ = "0.1.0"

# The rest of the public API loads on first use (``taskvec.ties_merge``, ``from taskvec import sar``):
# `import taskvec` stays as light as the core it imports above. name -> defining module.
_LAZY = {
    # merging baselines and the method registry
    **dict.fromkeys(
        ["alpha_search", "dare", "dare_merge", "magnitude_threshold", "task_arithmetic", "ties_merge"],
        "taskvec.merging",
    ),
    **dict.fromkeys(
        ["MergeMethod", "MergeParameterError", "UnknownMethodError", "get_method", "list_methods", "merge"],
        "taskvec.methods",
    ),
    # objectives
    **dict.fromkeys(
        [
            "cross_entropy", "entropy", "multitask_cross_entropy", "negation", "nt_xent", "sar",
            "sharpness_aware", "simclr", "softmax_entropy", "trusted_set", "trusted_targets", "ufm", "ufm_loss",
        ],
        "taskvec.objectives",
    ),
    # heads
    **dict.fromkeys(
        [
            "LinearHead", "LPPlusPlus", "TipAdapter", "accuracy", "extract_features", "fit_linear_head",
            "prototype_head", "tip_adapter_search",
        ],
        "taskvec.heads",
    ),
    # the variational composer
    **dict.fromkeys(
        ["VariationalComposer", "VariationalConfig", "elbo_loss", "UnsupportedModuleError"], "taskvec.variational"
    ),
    # error types (the merge ones are above)
    "BaseMismatchError": "taskvec.vectors",
    "CheckpointError": "taskvec.io",
    "PretrainedWeightsError": "taskvec.models",
    "PretrainedUnavailableError": "taskvec.models",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'taskvec' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BaseMismatchError",
    "CheckpointError",
    "Composer",
    "Granularity",
    "LPPlusPlus",
    "LinearHead",
    "LinearizedModel",
    "Loader",
    "LoraTaskVector",
    "MergeMethod",
    "MergeParameterError",
    "PretrainedUnavailableError",
    "PretrainedWeightsError",
    "TaskVector",
    "TipAdapter",
    "TrainConfig",
    "UnknownMethodError",
    "UnsupportedModuleError",
    "VariationalComposer",
    "VariationalConfig",
    "accuracy",
    "alpha_search",
    "cross_entropy",
    "dare",
    "dare_merge",
    "elbo_loss",
    "entropy",
    "extract_features",
    "fit",
    "fit_linear_head",
    "get_method",
    "list_methods",
    "load_task_vector",
    "magnitude_threshold",
    "merge",
    "multitask_cross_entropy",
    "negation",
    "nt_xent",
    "prototype_head",
    "sar",
    "sharpness_aware",
    "simclr",
    "softmax_entropy",
    "task_arithmetic",
    "ties_merge",
    "tip_adapter_search",
    "trusted_set",
    "trusted_targets",
    "ufm",
    "ufm_loss",
]
