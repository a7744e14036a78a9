"""The public API: what `import taskvec` offers, that it stays light, and that the package is typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import taskvec

SRC = Path(taskvec.__file__).parent


def test_every_exported_name_resolves_to_its_defining_object():
    import importlib

    for name in taskvec.__all__:
        value = getattr(taskvec, name)
        assert value is not None, name
        module = taskvec._LAZY.get(name)
        if module is not None:  # the lazy names are the very objects of their modules
            assert value is getattr(importlib.import_module(module), name), name
    assert set(taskvec._LAZY) <= set(taskvec.__all__)
    assert set(dir(taskvec)) >= set(taskvec.__all__)


def test_the_expected_families_are_exported():
    expected = {
        # merging and the registry
        "task_arithmetic", "ties_merge", "dare", "dare_merge", "alpha_search", "merge", "get_method", "list_methods",
        # objectives
        "cross_entropy", "multitask_cross_entropy", "negation", "entropy", "sar", "simclr", "ufm", "nt_xent",
        # heads
        "LinearHead", "TipAdapter", "LPPlusPlus", "fit_linear_head", "prototype_head",
        # variational
        "VariationalComposer", "VariationalConfig", "elbo_loss",
        # errors
        "BaseMismatchError", "CheckpointError", "MergeParameterError", "UnknownMethodError",
        "UnsupportedModuleError", "PretrainedWeightsError",
    }
    assert expected <= set(taskvec.__all__)
    for name in expected:
        if name.endswith("Error"):
            assert issubclass(getattr(taskvec, name), Exception), name


def test_unknown_attribute_is_an_attribute_error():
    try:
        taskvec.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_import_stays_light():
    """`import taskvec` loads neither the heads, the variational package, the recipes nor matplotlib."""
    code = (
        "import sys, taskvec; "
        "heavy = [m for m in ('taskvec.heads', 'taskvec.variational', 'taskvec.recipes', 'taskvec.objectives', "
        "'matplotlib', 'sklearn') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_package_is_marked_typed_and_ships_the_marker():
    assert (SRC / "py.typed").is_file()
    pyproject = (SRC.parent.parent / "pyproject.toml").read_text()
    assert 'taskvec = ["py.typed"]' in pyproject
