"""Hugging Face model directories as checkpoints: single, sharded, .bin; and the bad inputs, by name."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import bert, perturbed, save

from taskvec.cli import main
from taskvec.hf.checkpoints import config_differences, open_weights
from taskvec.io import CheckpointError, load_state_dict
from taskvec.vectors import TaskVector

# peft and transformers 5 warn about their own deprecated internals on every model built or loaded.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base = bert(0)
    ft = perturbed(base, 1)
    return {
        "base": base, "ft": ft,
        "base_dir": save(base, root / "base", shard="20KB"),
        "ft_dir": save(ft, root / "ft"),
        "root": root,
    }


def test_sharded_directory_loads_every_tensor(dirs):
    assert len(list(dirs["base_dir"].glob("model-*-of-*.safetensors"))) > 1
    assert (dirs["base_dir"] / "model.safetensors.index.json").is_file()
    loaded = load_state_dict(dirs["base_dir"])
    expected = dirs["base"].state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    lazy = open_weights(dirs["base_dir"])
    assert lazy.shape("pooler.dense.weight") == (32, 32) and len(lazy) == len(expected)


def test_pytorch_model_bin_directory(dirs, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(dirs["base"].state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text((dirs["base_dir"] / "config.json").read_text())
    loaded = load_state_dict(folder)
    assert all(torch.equal(loaded[k], v) for k, v in dirs["base"].state_dict().items())


def test_vector_from_directories_equals_from_models(dirs, tmp_path):
    from_dirs = TaskVector.from_checkpoints(dirs["base_dir"], dirs["ft_dir"], name="ft")
    from_models = TaskVector.from_models(dirs["base"], dirs["ft"], name="ft")
    assert set(from_dirs.names) == set(from_models.names)
    for key in from_models.names:
        assert torch.equal(from_dirs[key], from_models[key]), key
    out = tmp_path / "tau.safetensors"
    assert main(["vector", "make", str(dirs["base_dir"]), str(dirs["ft_dir"]), "-o", str(out)]) == 0
    assert TaskVector.load(out).name == "ft"


def test_directory_without_weights_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=str(empty)):
        load_state_dict(empty)


def test_missing_shard_and_index_naming_missing_file(dirs, tmp_path):
    import shutil

    broken = tmp_path / "missing_shard"
    shutil.copytree(dirs["base_dir"], broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name) as info:
        load_state_dict(broken)
    assert str(broken) in str(info.value)

    renamed = tmp_path / "bad_index"
    shutil.copytree(dirs["base_dir"], renamed)
    index_path = renamed / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-nowhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-nowhere.safetensors"):
        load_state_dict(renamed)


def test_truncated_shard_is_named(dirs, tmp_path):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(dirs["base_dir"], cut)
    shard = sorted(cut.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=shard.name):
        load_state_dict(cut)


def test_config_mismatch_names_the_fields(dirs, tmp_path):
    other = save(perturbed(bert(0, hidden_act="relu"), 2), tmp_path / "relu")
    with pytest.raises(CheckpointError, match="hidden_act") as info:
        TaskVector.from_checkpoints(dirs["base_dir"], other)
    assert str(other) in str(info.value)
    assert main(["vector", "make", str(dirs["base_dir"]), str(other), "-o", str(tmp_path / "t.safetensors")]) == 2
    assert not (tmp_path / "t.safetensors").exists()


def test_config_differences_ignores_bookkeeping():
    a = {"hidden_size": 32, "transformers_version": "4", "hidden_dropout_prob": 0.1, "sub": {"layers": 2}}
    b = {"hidden_size": 32, "transformers_version": "5", "hidden_dropout_prob": 0.0, "sub": {"layers": 3}}
    assert config_differences(a, b) == ["sub.layers (2 vs 3)"]
