"""The README's registry and quantised-bank snippets run as written, on a tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import make_base, perturbed

from taskvec.quantize import QuantizedTaskVector
from taskvec.vectors import TaskVector, load_task_vector

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet(section: str) -> str:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1, f"README section {section!r} should hold one Python block"
    return blocks[0]


@pytest.fixture
def names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = make_base()
    vectors = [TaskVector.from_models(base, perturbed(base, i), name=f"t{i}") for i in (1, 2)]
    return {"base_model": base, "vectors": vectors, "vector": vectors[0]}


def test_merge_methods_snippet(names, capsys):
    exec(_snippet("Merge methods"), names)
    assert "reference: Yadav et al." in capsys.readouterr().out
    assert names["merged"].names == names["vectors"][0].names


def test_quantised_banks_snippet(names, tmp_path):
    exec(_snippet("Quantised banks"), names)
    loaded = load_task_vector(tmp_path / "tau-int8.safetensors")
    assert isinstance(loaded, QuantizedTaskVector) and str(loaded.scheme) == "int8-row"
    assert isinstance(names["merged"], torch.nn.Module)
