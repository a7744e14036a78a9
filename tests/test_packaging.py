"""The install keeps the one torch build: every pip install in the Makefile goes through constraints.txt."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.strip().lower()] = version.strip()
    return pins


def test_constraints_pin_the_installed_torch():
    pins = _pins()
    assert "torch" in pins
    assert torch.__version__.split("+")[0] == pins["torch"]


def test_every_resolving_pip_install_in_the_makefile_is_constrained():
    installs = [
        shlex.split(line.strip())
        for line in (ROOT / "Makefile").read_text().splitlines()
        if re.search(r"\bpip install\b", line) and not line.lstrip().startswith("#")
    ]
    assert installs, "the Makefile installs nothing?"
    resolving = [words for words in installs if "--no-deps" not in words and words[-2:] != ["--upgrade", "pip"]]
    assert any("-e" in words for words in resolving)  # the project itself, with its dependencies
    for words in resolving:
        assert "constraints.txt" in words and words[words.index("constraints.txt") - 1] == "-c", words
