"""The control rule of task negation (aTLAS, after Ilharco et al.): forgetting a target counts only
while a control task keeps at least 95% of the pre-trained model's control accuracy."""

from __future__ import annotations

ROUNDING = 1e-6


def control_kept(control_acc: float, reference_acc: float, fraction: float = 0.95) -> bool:
    """The control condition of task negation: control accuracy >= ``fraction`` x the pre-trained's.

    Accuracies arrive as float32 means, so the comparison allows 1e-6 of rounding (72/100 against
    0.9 x 80/100 must pass); accuracies over fewer than 10^5 samples differ by at least 1e-5, so the
    slack never changes a real decision.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction!r}")
    return control_acc >= fraction * reference_acc - ROUNDING


def negation_score(target_acc: float, control_acc: float, reference_acc: float, fraction: float = 0.95) -> float:
    """One number, higher is better, for model selection under the 95% rule.

    A state that keeps the control scores ``1 - target_acc`` (in [0, 1]: the lower the target
    accuracy the better); one that does not scores ``control_acc - 2`` (in [-2, -1]), below every
    state that keeps it, so the selection picks the lowest target accuracy among states that satisfy
    the rule, and falls back to the best control only if none does.
    """
    if control_kept(control_acc, reference_acc, fraction):
        return 1.0 - target_acc
    return control_acc - 2.0


def default_control(target: str, control: str, fallback: str) -> str:
    """The control task for ``target``: ``control``, or ``fallback`` when the target is the control."""
    if control == fallback:
        raise ValueError(f"control and fallback control must differ; both are {control!r}")
    return fallback if target == control else control
