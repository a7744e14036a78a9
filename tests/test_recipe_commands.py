"""The parameter-efficiency recipes' commands are generated from their config classes: every documented
field is an option, --suite/--bank-root pick the suite, and the command hands run(config, suite=...) a
validated config (a spy stands in for the long run)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import pytest

from taskvec.cli import build_parser, main

RECIPES = {"precision": ("precision", "PrecisionConfig", "run_precision"),
           "gradient-free": ("gradient_free", "GradientFreeConfig", "run_gradient_free"),
           "selection": ("selection", "SelectionConfig", "run_selection"),
           "subspace": ("subspace", "SubspaceConfig", "run_subspace"),
           "lora": ("lora", "LoraConfig", "run_lora"),
           "peft": ("peft", "PeftConfig", "run_peft")}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions if "run" in a.choices).choices["run"]
    return next(a for a in run._subparsers._group_actions if name in a.choices).choices[name]


@pytest.mark.parametrize("name", RECIPES)
def test_every_documented_field_is_an_option(name):
    module, config_name, _ = RECIPES[name]
    config_class = getattr(importlib.import_module(f"taskvec.recipes.{module}"), config_name)
    destinations = {a.dest for a in _subparser(name)._actions}
    documented = {f.name for f in dataclasses.fields(config_class) if "help" in f.metadata}
    assert documented and documented <= destinations
    assert {"suite", "bank_root"} <= destinations


@pytest.mark.parametrize("name", RECIPES)
def test_the_command_runs_the_recipe_on_the_named_suite(name, tmp_path, monkeypatch, capsys):
    module_name, config_name, run_name = RECIPES[name]
    module = importlib.import_module(f"taskvec.recipes.{module_name}")
    seen = {}

    def spy(config, *, suite):
        seen.update(config=config, suite=suite)
        return {"table": "TABLE", "files": {"json": "a.json", "markdown": "a.md"}}

    monkeypatch.setattr(module, run_name, spy)
    assert main(["run", name, "--suite", "text", "--bank-root", str(tmp_path / "bank"), "--out",
                 str(tmp_path / "out")]) == 0
    assert isinstance(seen["config"], getattr(module, config_name))
    assert str(seen["config"].out) == str(tmp_path / "out")
    assert seen["suite"].name == "text" and seen["suite"].bank.root == tmp_path / "bank"
    assert "TABLE" in capsys.readouterr().out
