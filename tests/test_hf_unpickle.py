"""`taskvec convert`: old torch.save(module) pickles read by a restricted unpickler that runs nothing."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from taskvec.cli import main
from taskvec.hf.unpickle import StandIn, UnsafePickleError, extract_state_dict, restricted_load


def _fake_open_clip_module():
    """A module named like open_clip's, defined here and removed again: loading must not import it."""
    module = types.ModuleType("fake_open_clip.model")

    class VisualTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 2, bias=False)
            self.ln_post = nn.LayerNorm(4)
            self.proj = nn.Parameter(torch.randn(4, 3))
            self.register_buffer("attn_mask", torch.ones(2, 2))
            self.register_buffer("scratch", torch.zeros(3), persistent=False)

    class ImageEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.visual = VisualTower()
            self.model.logit_scale = nn.Parameter(torch.tensor(4.6))
            self.cache_dir = None
            self.train_preprocess = module.preprocess  # a module-level function, as open_clip's transforms

    def preprocess(image):
        raise AssertionError("must never be called")

    for obj in (VisualTower, ImageEncoder, preprocess):
        obj.__module__, obj.__qualname__ = module.__name__, obj.__name__
        setattr(module, obj.__name__, obj)
    return module


def test_pickled_module_is_rebuilt_without_importing_it(tmp_path):
    module = _fake_open_clip_module()
    parent = types.ModuleType("fake_open_clip")
    parent.model = module
    sys.modules["fake_open_clip"], sys.modules[module.__name__] = parent, module
    try:
        torch.manual_seed(0)
        encoder = module.ImageEncoder()
        with torch.no_grad():
            encoder.model.visual.conv1.weight.mul_(3)  # a stored view of a bigger storage would be fine too
        torch.save(encoder, tmp_path / "old.pt")
        expected = encoder.state_dict()
    finally:
        del sys.modules[module.__name__], sys.modules["fake_open_clip"]
    obj = restricted_load(tmp_path / "old.pt")
    assert isinstance(obj, StandIn) and "ImageEncoder" in repr(obj)
    tensors = extract_state_dict(obj)
    assert list(tensors) == list(expected)  # names and order of state_dict(); the non-persistent buffer left out
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key
    out = tmp_path / "new.safetensors"
    assert main(["convert", str(tmp_path / "old.pt"), "-o", str(out), "--strip-prefix", "model."]) == 0
    converted = load_file(str(out))
    assert set(converted) == {k.removeprefix("model.") for k in expected}
    assert torch.equal(converted["visual.proj"], expected["model.visual.proj"])


def test_plain_state_dict_pickle(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3)[:, 1:], "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "sd.pt")
    tensors = extract_state_dict(restricted_load(tmp_path / "sd.pt"))
    assert torch.equal(tensors["a"], state["a"]) and tensors["b"].dtype == torch.bfloat16


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch /tmp/taskvec-never')",))


@pytest.mark.parametrize("payload", ["system", "eval", "inside-module"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = {"system": _Evil(str(marker)), "eval": _EvalEvil()}.get(payload)
    if payload == "inside-module":
        layer = nn.Linear(2, 2)
        layer.hook = _Evil(str(marker))
        evil = layer
    torch.save(evil, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match="refused"):
        restricted_load(tmp_path / "evil.pt")
    assert main(["convert", str(tmp_path / "evil.pt"), "-o", str(tmp_path / "out.safetensors")]) == 2
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_unknown_function_becomes_inert(tmp_path):
    """A third-party global the unpickler does not know is a stand-in: calling it records, runs nothing."""
    buffer = io.BytesIO()
    buffer.write(b"\x80\x02cevilpkg.tools\nrun_me\nX\x05\x00\x00\x00helloq\x00\x85R.")
    archive = tmp_path / "odd.pt"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("odd/data.pkl", buffer.getvalue())
    obj = restricted_load(archive)
    assert isinstance(obj, StandIn) and obj.args == ("hello",)
    assert "evilpkg" not in sys.modules


def test_not_an_archive_is_named(tmp_path):
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(Exception, match="raw.pt"):
        restricted_load(path)
