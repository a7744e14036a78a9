"""`taskvec merge`: a model directory transformers loads, whose outputs equal the composer's forward."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hf_tiny import bert, lora_adapter, perturbed, save
from transformers import AutoModel

from taskvec.cli import main
from taskvec.compose import Composer
from taskvec.hf.adapters import load_adapter
from taskvec.hf.export import dare_seed, merge_to_directory, streaming_thresholds
from taskvec.io import CheckpointError
from taskvec.merging import dare, magnitude_threshold, ties_merge
from taskvec.methods import merge
from taskvec.vectors import BaseMismatchError, TaskVector

# peft and transformers 5 warn about their own deprecated internals on every model built or loaded.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

IDS = torch.tensor([[2, 5, 9, 14, 3, 7], [4, 8, 1, 0, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    base = bert(0)
    base_dir = save(base, root / "base", shard="20KB")
    ft_dir = save(perturbed(base, 1), root / "ft_a")
    vec_b = TaskVector.from_models(base, perturbed(base, 2), name="b")
    vec_b_path = vec_b.save(root / "b.safetensors")
    lora_adapter(base, root / "adapter_c", r=4, lora_alpha=8, target_modules=["query", "value"])
    vectors = [
        TaskVector.from_checkpoints(base_dir, ft_dir, name="ft_a"),
        TaskVector.load(vec_b_path),
        load_adapter(root / "adapter_c", base_dir),
    ]
    return {"root": root, "base": base, "base_dir": base_dir, "paths": [ft_dir, vec_b_path, root / "adapter_c"],
            "vectors": vectors}


def _hidden(model, **kwargs):
    return model(input_ids=IDS, attention_mask=MASK, **kwargs).last_hidden_state


def _reload(out):
    return AutoModel.from_pretrained(out).eval()


def test_sum_merge_reloads_and_equals_composer(bank, tmp_path):
    out = tmp_path / "merged"
    merge_to_directory(bank["base_dir"], bank["paths"], out, method="sum", alpha=0.7, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    card = (out / "README.md").read_text()
    assert "sum" in card and "ft_a" in card and "adapter_c" in card and '"alpha": 0.7' in card
    composer = Composer(bank["base"], bank["vectors"], "isotropic", init=0.7)
    with torch.no_grad():
        expected = _hidden(composer)
        got = _hidden(_reload(out))
        changed = float((expected - _hidden(bank["base"])).abs().max())
    assert float((got - expected).abs().max()) <= 1e-5
    assert changed > 1e-3  # the merge did change the model


def test_learned_merge_equals_composer_and_refuses_other_vectors(bank, tmp_path):
    composer = Composer(bank["base"], bank["vectors"], "x3-random")
    with torch.no_grad():
        composer.coefficients.uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(0))
    coef = composer.save_coefficients(tmp_path / "coef.safetensors")
    out = tmp_path / "learned"
    assert main([
        "merge", str(bank["base_dir"]), *map(str, bank["paths"]), "--method", "learned", "--coefficients", str(coef),
        "-o", str(out),
    ]) == 0
    chunked = merge_to_directory(bank["base_dir"], bank["paths"], tmp_path / "chunked", method="learned",
                                 coefficients=coef, chunk_elements=37)
    with torch.no_grad():
        expected = _hidden(composer)
        assert float((_hidden(_reload(out)) - expected).abs().max()) <= 1e-5
        assert float((_hidden(_reload(chunked)) - expected).abs().max()) <= 1e-5
    with pytest.raises(CheckpointError, match="learned for vectors"):
        merge_to_directory(bank["base_dir"], bank["paths"][::-1], tmp_path / "x", method="learned", coefficients=coef)
    assert not (tmp_path / "x").exists()


def test_ties_and_dare_match_the_library(bank, tmp_path):
    dense = bank["vectors"][:2]
    expected_thresholds = [magnitude_threshold(v, 0.3) for v in bank["vectors"]]
    order = list(bank["base"].state_dict())
    whole = streaming_thresholds([_as_source(v) for v in bank["vectors"]], order, 0.3)
    assert whole == expected_thresholds  # exact: the k-th largest magnitude itself
    # in small row chunks a LoRA product B[rows] @ A may round differently from B @ A in the last bit
    chunked = streaming_thresholds([_as_source(v) for v in bank["vectors"]], order, 0.3, chunk_elements=40)
    assert chunked[:2] == expected_thresholds[:2]
    assert chunked[2] == pytest.approx(expected_thresholds[2], rel=1e-6)
    params = {k: v.detach() for k, v in bank["base"].named_parameters()}
    for method, expected, kwargs in (
        ("ties", ties_merge(dense, density=0.3, alpha=0.8), {"density": 0.3}),
        ("dare", sum((_dare_per_block(v, i) for i, v in enumerate(dense)), 0) * 0.8, {"drop_rate": 0.5, "seed": 3}),
    ):
        # each method takes only the parameters the registry declares for it
        out = merge_to_directory(bank["base_dir"], bank["paths"][:2], tmp_path / method, method=method, alpha=0.8,
                                 chunk_elements=50, **kwargs)  # many row chunks
        merged = _reload(out).state_dict()
        worst = max(float((merged[k] - params[k] - expected[k]).abs().max()) for k in expected.names)
        assert worst <= 1e-6, method


def _dare_per_block(vector, index):
    """The library's DARE, one block at a time, each block with the generator the merge documents."""
    out = {}
    for name in vector.names:
        block = TaskVector({name: vector[name]}, metadata=vector.metadata)
        out[name] = dare(block, 0.5, torch.Generator().manual_seed(dare_seed(3, index, name)))[name]
    return TaskVector(out, metadata=vector.metadata)


def _as_source(vector):
    from taskvec.hf.export import _Source

    return _Source(vector.name, vector.name, "x", dict(vector.shapes), vector=vector)


def test_cli_flags_go_through_the_registry(bank, tmp_path):
    """--majority exists because the registry declares it; the registry's in-memory TIES is the oracle."""
    dense = bank["vectors"][:2]
    expected = merge("ties", dense, density=0.4, alpha=0.7, majority="frequency")
    by_mass = merge("ties", dense, density=0.4, alpha=0.7)
    assert any(not torch.equal(expected[k], by_mass[k]) for k in expected.names)  # the flag must matter
    out = tmp_path / "ties"
    args = ["--method", "ties", "--density", "0.4", "--alpha", "0.7", "--majority", "frequency", "-o", str(out)]
    assert main(["merge", str(bank["base_dir"]), *map(str, bank["paths"][:2]), *args]) == 0
    merged = _reload(out).state_dict()
    params = {k: v.detach() for k, v in bank["base"].named_parameters()}
    assert max(float((merged[k] - params[k] - expected[k]).abs().max()) for k in expected.names) <= 1e-6
    assert '"majority": "frequency"' in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--method", "nope"], ["'nope'", "sum, ties, dare, dare_ties, learned"]),
        (["--method", "ties", "--density", "2"], ["'ties'", "'density'", "(0, 1]", "2.0"]),
        (["--method", "ties", "--density", "lots"], ["'density'", "'lots'"]),
        (["--method", "dare", "--seed", "-1"], ["'seed'", "-1"]),
        (["--method", "ties", "--majority", "most"], ["'majority'", "total, frequency", "'most'"]),
        (["--method", "sum", "--density", "0.5"], ["'sum'", "no parameter 'density'", "alpha"]),
        (["--method", "learned", "--alpha", "2"], ["'learned'", "alpha"]),
        (["--method", "sum", "--coefficients", "c.pt"], ["'learned'", "'sum'"]),
    ],
)
def test_cli_bad_method_or_parameter_is_one_line(bank, tmp_path, capsys, args, named):
    out = tmp_path / "out"
    assert main(["merge", str(bank["base_dir"]), str(bank["paths"][1]), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert all(part in err for part in named), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("method: nope\n", ["'nope'"]),
        ("method: ties\ndensity: 0\n", ["'density'", "(0, 1]"]),
        ("method: dare\ndrop_rate: 1.0\n", ["'drop_rate'", "[0, 1)"]),
        ("method: dare\nseed: 1.5\n", ["'seed'", "1.5"]),
        ("method: sum\nmajority: total\n", ["'sum'", "no parameter 'majority'"]),
        ("speed: 3\n", ["unknown keys ['speed']"]),
    ],
)
def test_config_bad_method_or_parameter_is_one_line(bank, tmp_path, capsys, body, named):
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {bank['base_dir']}\nvectors: [{bank['paths'][1]}]\noutput: out\n{body}")
    assert main(["merge", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(config) in err and all(part in err for part in named), err
    assert not (tmp_path / "out").exists()


def test_config_parameters_reach_the_merge(bank, tmp_path):
    """A parameter read from the file equals the same parameter given to the library."""
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {bank['base_dir']}\nvectors: [{bank['paths'][1]}]\noutput: out\n"
                      "method: ties\ndensity: 0.5\nmajority: frequency\nalpha: 2\n")
    assert main(["merge", "--config", str(config)]) == 0
    direct = merge_to_directory(bank["base_dir"], [bank["paths"][1]], tmp_path / "direct", method="ties",
                                density=0.5, majority="frequency", alpha=2.0)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (direct / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="no parameter 'density'"):
        merge_to_directory(bank["base_dir"], [bank["paths"][1]], tmp_path / "x", method="dare", density=0.5)


def test_list_methods_prints_the_registry(capsys):
    from taskvec.methods import list_methods

    assert main(["merge", "--list-methods"]) == 0
    out = capsys.readouterr().out
    for method in list_methods():
        assert method.reference in out
        for param in method.params:
            assert f"  {param.name} ({param.kind.__name__}, default {param.default!r}, {param.range_text()})" in out
    assert "learned:" in out


def test_dare_ties_runs_and_is_seeded(bank, tmp_path):
    a = merge_to_directory(bank["base_dir"], bank["paths"], tmp_path / "a", method="dare_ties", drop_rate=0.5, seed=1)
    b = merge_to_directory(bank["base_dir"], bank["paths"], tmp_path / "b", method="dare_ties", drop_rate=0.5, seed=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_merge_from_yaml_and_json_config(bank, tmp_path):
    root = bank["root"]
    shutil.copy(bank["paths"][1], tmp_path / "b.safetensors")
    (tmp_path / "merge.yaml").write_text(
        f"base: {bank['base_dir']}\nvectors:\n  - b.safetensors\n  - {bank['paths'][0]}\nmethod: sum\nalpha: 0.5\n"
        "output: out_yaml\n"
    )
    assert main(["merge", "--config", str(tmp_path / "merge.yaml")]) == 0
    spec = {"base": str(bank["base_dir"]), "vectors": [str(bank["paths"][1]), str(bank["paths"][0])],
            "alpha": 0.5, "output": str(tmp_path / "out_json")}
    (tmp_path / "merge.json").write_text(json.dumps(spec))
    assert main(["merge", "--config", str(tmp_path / "merge.json")]) == 0
    first = _reload(tmp_path / "out_yaml").state_dict()
    second = _reload(tmp_path / "out_json").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert root.exists()


def test_output_directory_rules(bank, tmp_path, capsys):
    base_dir, paths = bank["base_dir"], [str(p) for p in bank["paths"][:1]]
    out = tmp_path / "out"
    assert main(["merge", str(base_dir), *paths, "-o", str(out)]) == 0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["merge", str(base_dir), *paths, "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and str(out) in capsys.readouterr().err + str(out)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # untouched
    assert main(["merge", str(base_dir), *paths, "-o", str(out), "--alpha", "0.5", "--force"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp
    for bad in (base_dir, base_dir / "inside", bank["paths"][0]):
        assert main(["merge", str(base_dir), *paths, "-o", str(bad), "--force"]) == 2
        assert "overlaps the input" in capsys.readouterr().err
    assert not (base_dir / "inside").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_parent_is_named(bank, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="not writable"):
            merge_to_directory(bank["base_dir"], bank["paths"][:1], locked / "out")
    finally:
        locked.chmod(0o700)


def test_failure_midway_leaves_nothing(bank, tmp_path):
    bad = TaskVector({k: v.clone() for k, v in bank["vectors"][1].tensors.items()}, metadata={"name": "nan"})
    last = bad.names[-1]
    bad.tensors[last][0] = float("nan")
    with pytest.raises(ValueError, match=last):
        merge_to_directory(bank["base_dir"], [bad], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_vector_from_another_base_is_refused(bank, tmp_path):
    other = bert(5)
    vector = TaskVector.from_models(other, perturbed(other, 1), name="other")
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        merge_to_directory(bank["base_dir"], [vector], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_under_a_file_is_named(bank, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="a_file"):
        merge_to_directory(bank["base_dir"], bank["paths"][:1], blocker / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
