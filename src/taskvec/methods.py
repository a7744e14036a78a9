"""The merge-method registry: every data-free merge by name, with its declared parameters and paper.

Why a registry: the CLI, the recipes and the reports need the same list of methods, the same defaults
and the same validation; declaring each parameter once (type, default, valid range, help) gives all of
them one source, and lets one contract test suite run over every method (tests/test_merge_contract.py).

Use::

    from taskvec.methods import list_methods, get_method, merge
    merged = merge("ties", vectors, density=0.2, alpha=0.8)   # validated, then taskvec.merging.ties_merge
    for method in list_methods():
        print(method.name, method.reference, [p.name for p in method.params])

A new merge method goes into :mod:`taskvec.merging` (the function) and here (one :func:`register` call).
The learned compositions (aTLAS, AdaMerging, variational) are not data-free merges and are not listed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskvec.merging import dare_merge, task_arithmetic, ties_merge
from taskvec.vectors import AnyTaskVector, TaskVector

__all__ = [
    "MergeMethod",
    "MergeParameterError",
    "Param",
    "UnknownMethodError",
    "get_method",
    "list_methods",
    "merge",
    "method_names",
    "register",
]


class UnknownMethodError(KeyError):
    """A merge method name that is not registered (the message lists the registered ones)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MergeParameterError(ValueError):
    """A parameter a merge method does not declare, or a value outside its declared type or range."""


@dataclass(frozen=True)
class Param:
    """One declared parameter of a merge method.

    ``kind`` is ``float``, ``int``, ``bool`` or ``str``. Numbers may carry bounds (``low``/``high``,
    exclusive when ``low_open``/``high_open``); strings may carry ``choices``.
    """

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None

    def range_text(self) -> str:
        """The valid values in words, e.g. ``(0, 1]`` or ``one of total, frequency``."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        if self.low is None and self.high is None:
            return f"any finite {self.kind.__name__}"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return ("(" if self.low_open or self.low is None else "[") + f"{low}, {high}" + (
            ")" if self.high_open or self.high is None else "]"
        )

    def validate(self, value: Any, method: str = "") -> Any:
        """``value`` converted to ``kind`` (an int is a valid float), or :class:`MergeParameterError`."""
        where = f"merge method {method!r}: parameter {self.name!r}" if method else f"parameter {self.name!r}"
        wrong = MergeParameterError(f"{where} must be {self.range_text()} ({self.kind.__name__}); got {value!r}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise wrong
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                raise wrong
            return value
        # Numbers: bool is an int in Python, but True as a density is a mistake, not a 1.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        if self.kind is int and not isinstance(value, int):
            raise wrong
        number = self.kind(value)
        if not math.isfinite(number):
            raise wrong
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            raise wrong
        if self.high is not None and (number >= self.high if self.high_open else number > self.high):
            raise wrong
        return number

    def parse(self, text: str, method: str = "") -> Any:
        """A command-line string converted and validated (``true``/``false`` for booleans)."""
        if self.kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                return self.validate(text, method)  # raises, naming the parameter
            return self.validate(lowered in ("true", "1", "yes"), method)
        if self.kind is str:
            return self.validate(text, method)
        try:
            value: Any = self.kind(text)
        except ValueError:
            value = text
        return self.validate(value, method)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge: ``function(vectors, **params) -> TaskVector`` plus what describes it."""

    name: str
    function: Callable[..., TaskVector]
    params: tuple[Param, ...]
    reference: str
    summary: str

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    @property
    def stochastic(self) -> bool:
        """Whether the result depends on a ``seed`` parameter."""
        return any(p.name == "seed" for p in self.params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise MergeParameterError(f"merge method {self.name!r} has no parameter {name!r}; its parameters: {known}")

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``params``, every value checked; unknown names are refused."""
        values = self.defaults
        for name, value in params.items():
            values[name] = self.param(name).validate(value, self.name)
        return values

    def __call__(self, vectors: Sequence[AnyTaskVector], **params: Any) -> TaskVector:
        values = self.validate(params)  # validate before any work
        return self.function(list(vectors), **values)

    def describe(self) -> str:
        """A few lines for ``--help`` or a report: summary, reference, one line per parameter."""
        lines = [f"{self.name}: {self.summary}", f"  reference: {self.reference}"]
        lines += [
            f"  {p.name} ({p.kind.__name__}, default {p.default!r}, {p.range_text()}): {p.help}" for p in self.params
        ]
        return "\n".join(lines)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method; a name can be registered once (no silent replacement)."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    names = [p.name for p in method.params]
    if len(set(names)) != len(names):
        raise ValueError(f"merge method {method.name!r} declares a parameter twice: {names}")
    for p in method.params:
        p.validate(p.default, method.name)  # a default outside its own range is a bug in the declaration
    _REGISTRY[method.name] = method
    return method


def list_methods() -> list[MergeMethod]:
    """Every registered method, in registration order."""
    return list(_REGISTRY.values())


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown merge method {name!r}; registered methods: {', '.join(_REGISTRY)}"
        ) from None


def merge(name: str, vectors: Sequence[AnyTaskVector], **params: Any) -> TaskVector:
    """Merge ``vectors`` with the method called ``name``; parameters are validated before any work."""
    return get_method(name)(vectors, **params)


# ----------------------------------------------------------------------------------------------
# The methods of taskvec.merging
# ----------------------------------------------------------------------------------------------

_ALPHA = Param("alpha", float, 1.0, "scale of the merged vector (applied as theta_0 + alpha-scaled merge)")
_MAJORITY = Param(
    "majority", str, "total", "sign election by summed mass (TIES) or by count of signs",
    choices=("total", "frequency"),
)
_DROP = Param(
    "drop_rate", float, 0.9, "probability of dropping each entry; survivors are scaled by 1/(1-p)",
    low=0.0, high=1.0, high_open=True,
)
_SEED = Param("seed", int, 0, "seed of the drop masks (one generator, vectors in order)", low=0)


def _ties(vectors: list[AnyTaskVector], *, density: float, alpha: float, majority: Any) -> TaskVector:
    return ties_merge(vectors, density=density, alpha=alpha, majority=majority)


def _dare(vectors: list[AnyTaskVector], *, drop_rate: float, alpha: float, seed: int) -> TaskVector:
    return dare_merge(vectors, drop_rate=drop_rate, alpha=alpha, seed=seed, ties=False)


def _dare_ties(
    vectors: list[AnyTaskVector], *, drop_rate: float, alpha: float, seed: int, majority: Any
) -> TaskVector:
    return dare_merge(vectors, drop_rate=drop_rate, alpha=alpha, seed=seed, ties=True, majority=majority)


register(MergeMethod(
    "sum", task_arithmetic, (_ALPHA,),
    "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
    "task arithmetic: alpha times the sum of the task vectors (a negative alpha negates)",
))
register(MergeMethod(
    "ties", _ties,
    (
        Param("density", float, 0.2, "fraction of each vector's largest magnitudes kept (over all its blocks)",
              low=0.0, high=1.0, low_open=True),
        _ALPHA,
        _MAJORITY,
    ),
    "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
    "trim each vector to its top magnitudes, elect a sign per entry, average the agreeing entries",
))
register(MergeMethod(
    "dare", _dare, (_DROP, _ALPHA, _SEED),
    "Yu et al., Language Models are Super Mario (DARE), ICML 2024",
    "drop entries at random and rescale the rest, then alpha times the sum",
))
register(MergeMethod(
    "dare_ties", _dare_ties, (_DROP, _ALPHA, _SEED, _MAJORITY),
    "Yu et al., ICML 2024 (DARE) with the sign election of Yadav et al., NeurIPS 2023 (TIES)",
    "DARE on every vector, then TIES sign election and disjoint mean (no trimming)",
))
