"""Issue 14, one test per item: nothing silently wrong, nothing lost, arguments checked before work."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat

import pytest
import torch
from conftest import make_bank, make_base, perturbed
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from taskvec import cli
from taskvec.bank import Bank, BankEntryError, write_manifest
from taskvec.compose import Composer
from taskvec.granularity import Granularity
from taskvec.heads import LinearHead
from taskvec.io import CheckpointError, write_json
from taskvec.train import CheckpointCorruptError, Loader, TrainConfig, fit
from taskvec.variational import ELBOLoss, VariationalComposer, VariationalConfig, elbo_loss
from taskvec.variational.prior import SpikeSlab
from taskvec.vectors import LoraTaskVector, TaskVector


def _save_model(model: nn.Module, path) -> None:
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(path))


# -- coefficients: every identity entry is compared on load --------------------------------------


def test_coefficients_refuse_other_vector_order(tmp_path, base, bank):
    composer = Composer(base, bank, "block")
    with torch.no_grad():
        composer.coefficients.normal_()
    path = composer.save_coefficients(tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="vectors"):
        Composer(base, bank[::-1], "block").load_coefficients(path)
    # Same names, other values (e.g. a rebuilt bank): the fingerprints differ.
    renamed = [TaskVector({k: v * 2 for k, v in vec.tensors.items()}, metadata=vec.metadata) for vec in bank]
    with pytest.raises(CheckpointError, match="vector_fingerprints"):
        Composer(base, renamed, "block").load_coefficients(path)
    fresh = Composer(base, bank, "block")
    fresh.load_coefficients(path)
    assert torch.equal(fresh.coefficients, composer.coefficients)


def test_coefficients_refuse_other_partition_seed_linearisation_and_base(tmp_path, base, bank):
    seeded = Composer(base, bank, Granularity(kind="block", parts=2, partition="random", seed=0))
    path = seeded.save_coefficients(tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="partition_seed '0'.*'1'"):
        Composer(base, bank, Granularity(kind="block", parts=2, partition="random", seed=1)).load_coefficients(path)
    plain = Composer(base, bank, "block").save_coefficients(tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="linearized 'False'"):
        Composer(base, bank, "block", linearized=True).load_coefficients(plain)
    other_base = make_base(1)
    with pytest.raises(CheckpointError, match="base_fingerprint"):
        Composer(other_base, bank, "block", check_base=False).load_coefficients(plain)


# -- task vector arithmetic ----------------------------------------------------------------------


def test_arithmetic_refuses_broadcasting():
    a = TaskVector({"w": torch.ones(4, 1)}, metadata={"name": "a"})
    b = TaskVector({"w": torch.ones(4, 4)}, metadata={"name": "b"})
    for op in (lambda: a + b, lambda: a - b, lambda: a.dot(b), lambda: b + a, lambda: a.cosine(b)):
        with pytest.raises(ValueError, match=r"block 'w' has shape \(4, 1\) vs \(4, 4\)|\(4, 4\) vs \(4, 1\)"):
            op()


# -- stateful objectives resume exactly ----------------------------------------------------------


def _variational_run(composer, checkpoint=None, resume=False, kill_at=None):
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(4))
    calls = [0]

    class KilledError(Exception):
        pass

    def batches(generator):
        calls[0] += 1
        if calls[0] == kill_at:
            raise KilledError
        order = torch.randperm(32, generator=generator)
        for i in range(0, 32, 16):
            yield x[order[i : i + 16]], y[order[i : i + 16]]

    torch.manual_seed(0)
    model = VariationalComposer(composer, feature_dim=5, config=VariationalConfig(hidden=(8,)))
    loss = elbo_loss(None, num_train=32, kl_warmup_steps=8)
    config = TrainConfig(epochs=4, lr=1e-2, progress=False, checkpoint=checkpoint, resume=resume)
    with contextlib.suppress(KilledError):
        fit(model, loss, Loader(batches, 2), config)
    return model, loss


def test_elbo_warmup_counter_survives_kill_and_resume(tmp_path, base, bank):
    composer = Composer(base, bank, "block")
    whole, whole_loss = _variational_run(composer)
    _variational_run(composer, tmp_path / "state.pt", kill_at=3)  # killed as epoch 3 starts
    resumed, resumed_loss = _variational_run(composer, tmp_path / "state.pt", resume=True)
    assert whole_loss.step == resumed_loss.step == 8
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    loss = ELBOLoss(None, 10, 4)
    loss.load_state_dict({"step": 3})
    assert loss.state_dict() == {"step": 3} and loss.beta() == 0.75
    with pytest.raises(ValueError, match="non-negative integer 'step'"):
        loss.load_state_dict({"step": -1})


def test_corrupt_train_state_names_file_and_how_to_start_over(tmp_path):
    state = tmp_path / "train_state.pt"
    model = nn.Linear(2, 2)
    loader = Loader(lambda g: [torch.ones(1, 2)], 1)
    config = TrainConfig(epochs=2, progress=False, checkpoint=state, resume=True)
    fit(model, lambda m, b: m(b).sum(), loader, config)
    good = state.read_bytes()
    for bad in (b"", good[: len(good) // 2], b"\x80\x02garbage"):
        state.write_bytes(bad)
        with pytest.raises(CheckpointCorruptError, match=rf"{state}: .*delete {state}") as info:
            fit(model, lambda m, b: m(b).sum(), loader, config)
        assert "\n" not in str(info.value)
    state.unlink()  # the advice works: deleting it starts over
    assert fit(model, lambda m, b: m(b).sum(), loader, config).history


# -- variational: the per-sample ELBO by default, checked against Monte Carlo --------------------


def _log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + var.log() + (x - mean) ** 2 / var)


def test_kl_term_is_the_per_sample_elbo_by_default_and_matches_monte_carlo():
    """The KL that ELBOLoss adds per sample equals a Monte Carlo estimate of E_q[log q - log p] drawn
    with hard Bernoulli inclusions (an estimator independent of the closed form)."""
    assert ELBOLoss(None, 1152, 0).kl_normalizer == "sample"
    from taskvec.recipes.variational import VariationalRecipeConfig

    assert VariationalRecipeConfig().kl_normalizer == "sample" and VariationalRecipeConfig().kl_weight == 1.0

    generator = torch.Generator().manual_seed(0)
    shape = (2, 3, 4)
    post = SpikeSlab(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator) * 0.5 - 1,
                     torch.randn(shape, generator=generator))
    pi, s0 = 0.3, 1.5
    draws = 200_000
    p = post.inclusion.double()
    z = torch.rand((draws, *shape), generator=generator, dtype=torch.float64) < p
    lam = post.mu.double() + post.std.double() * torch.randn((draws, *shape), generator=generator, dtype=torch.float64)
    var, prior_var = post.std.double() ** 2, torch.tensor(s0**2, dtype=torch.float64)
    log_q = torch.where(z, p.log() + _log_normal(lam, post.mu.double(), var), (1 - p).log())
    log_p = torch.where(z, math.log(pi) + _log_normal(lam, torch.zeros(()), prior_var), math.log(1 - pi))
    mc = (log_q - log_p).sum((2, 3)).mean(0)  # per sample: sum over components, mean over draws
    se = (log_q - log_p).sum((2, 3)).std(0) / math.sqrt(draws)

    from taskvec.variational.prior import spike_slab_kl

    closed = spike_slab_kl(*post, pi, s0).flatten(1).sum(1).double()
    assert torch.all((closed - mc).abs() < 4 * se + 1e-3), (closed, mc, se)


def test_elbo_loss_equals_cross_entropy_plus_full_kl(base, bank):
    """With the defaults (beta=1, per-sample) the loss is CE + KL per sample, with no 1/N on the KL."""
    composer = Composer(base, bank, "block")
    model = VariationalComposer(composer, feature_dim=5, config=VariationalConfig(hidden=(8,)))
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(2))
    loss = ELBOLoss(None, num_train=1152, kl_warmup_steps=0)
    model.eval()
    torch.manual_seed(5)
    value = loss(model, (x, y))
    last = loss.last
    assert value.item() == pytest.approx(last["nll"] + last["kl"], rel=1e-5)
    dataset = ELBOLoss(None, num_train=1152, kl_warmup_steps=0, kl_normalizer="dataset")
    torch.manual_seed(5)
    assert dataset(model, (x, y)).item() == pytest.approx(last["nll"] + last["kl"] / 1152, rel=1e-5)


# -- cached derived files -------------------------------------------------------------------------


def test_decoded_dataset_with_flipped_pixels_is_decoded_again(tmp_path, capsys):
    from taskvec.data.sources import RawData
    from taskvec.data.store import load_decoded, save_decoded

    images = torch.randint(0, 255, (50, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = RawData({"train": (images, torch.arange(50) % 2)}, ["a", "b"], {})
    path = tmp_path / "d.safetensors"
    save_decoded(path, raw, "k")
    assert torch.equal(load_decoded(path, "k").pools["train"][0], images)
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + n])["train.images"]["data_offsets"]
    for i in range(1000):
        data[8 + n + start + (i * 37) % (end - start)] ^= 0x5A
    path.write_bytes(bytes(data))
    assert load_decoded(path, "k") is None
    assert "does not match its recorded sha256" in capsys.readouterr().err


def test_extracted_archive_file_edit_is_detected(tmp_path, capsys):
    from taskvec import fetch

    dest = tmp_path / "pypi" / "x-1"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "data.bin").write_bytes(b"a" * 100)
    (dest / fetch.MARKER).write_text(json.dumps({"sha256": "00", "files": fetch._file_hashes(dest)}))
    assert fetch._cache_hit(dest, "00")
    (dest / "sub" / "data.bin").write_bytes(b"b" * 100)
    fetch._VERIFIED.clear()
    assert not fetch._cache_hit(dest, "00")
    assert "data.bin does not match its recorded sha256" in capsys.readouterr().err


# -- bank entries -----------------------------------------------------------------------------------


def _bank_entry(root, task="t") -> Bank:
    entry = root / task
    entry.mkdir(parents=True)
    make_bank(make_base(), 1)[0].save(entry / "vector.safetensors")
    LinearHead(8, 5).save(entry / "head.safetensors")
    write_json(entry / "meta.json", {"task": task, "head_test_acc": 0.5, "finetuned_test_acc": 0.9,
                                     "epochs": 1, "seconds": 1.0, "classes": list("abcde")})
    write_manifest(entry)
    return Bank(root=root)


def test_truncated_bank_vector_is_not_a_complete_entry(tmp_path, capsys):
    bank = _bank_entry(tmp_path)
    assert bank.tasks() == ["t"] and bank.vector("t").norm() > 0
    vector = tmp_path / "t" / "vector.safetensors"
    data = vector.read_bytes()
    vector.write_bytes(data[: len(data) // 2])
    fresh = Bank(root=tmp_path)
    assert fresh.tasks() == [] and "vector.safetensors" in fresh.incomplete()["t"]
    with pytest.raises(BankEntryError, match=r"bank entry 't' is not usable: .*vector.safetensors.*truncated"):
        fresh.vector("t")
    assert cli.main(["bank", "list", "--root", str(tmp_path)]) == 0  # no traceback; says what is wrong
    out = capsys.readouterr().out
    assert "(empty)" in out and "incomplete: t: " in out and "truncated" in out


def test_bank_adopts_entries_from_before_manifests_only_if_they_load(tmp_path):
    bank = _bank_entry(tmp_path)
    (tmp_path / "t" / "manifest.json").unlink()
    assert Bank(root=tmp_path).tasks() == ["t"] and (tmp_path / "t" / "manifest.json").is_file()
    (tmp_path / "t" / "manifest.json").unlink()
    (tmp_path / "t" / "vector.safetensors").write_bytes(b"\0" * 20)
    assert Bank(root=tmp_path).tasks() == [] and not (tmp_path / "t" / "manifest.json").exists()
    del bank


# -- CLI: arguments before work, inputs never overwritten, one-line errors ------------------------


@pytest.fixture
def checkpoints(tmp_path):
    base = make_base()
    _save_model(base, tmp_path / "base.safetensors")
    _save_model(perturbed(base, 1), tmp_path / "ft.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def test_vector_make_never_writes_over_its_inputs(checkpoints, capsys):
    base, ft = checkpoints
    before = base.read_bytes()
    assert cli.main(["vector", "make", str(base), str(ft), "-o", str(base)]) == 2
    assert base.read_bytes() == before
    assert "would write over the input" in capsys.readouterr().err
    assert cli.main(["vector", "make", str(base), str(ft), "-o", str(ft), "--force"]) == 2  # not even with --force


def test_vector_make_refuses_existing_and_read_only_outputs(checkpoints, capsys):
    base, ft = checkpoints
    out = base.parent / "tau.safetensors"
    out.write_bytes(b"precious")
    assert cli.main(["vector", "make", str(base), str(ft), "-o", str(out)]) == 2
    assert out.read_bytes() == b"precious" and "--force" in capsys.readouterr().err
    out.chmod(0o444)
    assert cli.main(["vector", "make", str(base), str(ft), "-o", str(out), "--force"]) == 2
    assert out.read_bytes() == b"precious" and "read-only" in capsys.readouterr().err
    out.chmod(0o644)
    assert cli.main(["vector", "make", str(base), str(ft), "-o", str(out), "--force"]) == 0
    assert TaskVector.load(out).norm() > 0


def test_oserror_is_one_line_naming_the_path(checkpoints, capsys):
    base, ft = checkpoints
    blocker = base.parent / "file"
    blocker.write_text("x")
    assert cli.main(["vector", "make", str(base), str(ft), "-o", str(blocker / "tau.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(blocker) in err and err.count("\n") == 1
    assert cli.main(["vector", "make", str(base), str(ft), "-o", str(base.parent)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and err.count("\n") == 1

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(base.parent / "x"))

    import taskvec.vectors

    original = taskvec.vectors.TaskVector.save
    taskvec.vectors.TaskVector.save = denied
    try:
        assert cli.main(["vector", "make", str(base), str(ft), "-o", str(base.parent / "y.safetensors")]) == 2
    finally:
        taskvec.vectors.TaskVector.save = original
    err = capsys.readouterr().err
    assert err == f"taskvec: error: {base.parent / 'x'}: Permission denied\n"


def test_nan_blame_names_the_right_file(checkpoints, capsys):
    base, ft = checkpoints
    for victim, word in ((base, "base"), (ft, "fine-tuned")):
        tensors = {k: v.clone() for k, v in safe_open_all(victim).items()}
        tensors["fc.weight"][0, 0] = float("nan")
        bad = victim.with_name(f"nan_{victim.name}")
        save_file(tensors, str(bad))
        args = [str(bad), str(ft)] if victim == base else [str(base), str(bad)]
        assert cli.main(["vector", "make", *args, "-o", str(base.parent / f"tau_{word}.safetensors")]) == 2
        err = capsys.readouterr().err
        assert f"{word} checkpoint {bad}: block 'fc.weight' has 1 NaN/Inf" in err, err


def safe_open_all(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def test_vector_info_on_lora_and_malformed_metadata(tmp_path, capsys):
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    lora = LoraTaskVector({"fc.weight": (a, b)}, {"fc.weight": (5, 8)}, 0.5, metadata={"name": "l"})
    path = lora.save(tmp_path / "l.safetensors")
    assert cli.main(["vector", "info", str(path)]) == 0
    out = capsys.readouterr().out
    dense_norm = float(torch.linalg.norm(0.5 * b @ a))  # independent: the dense product's Frobenius norm
    assert f"norm: {dense_norm:.6g}" in out and "dtype=torch.float32" in out
    with safe_open(str(path), "pt") as handle:
        meta, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    meta.pop("taskvec_sha256"), meta.pop("taskvec_digest")  # as a file from before digests
    for key, value in (("scales", None), ("shapes", "{not json"), ("shapes", '{"fc.weight": "x"}')):
        edited = dict(meta)
        if value is None:
            del edited[key]
        else:
            edited[key] = value
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=edited)
        assert cli.main(["vector", "info", str(tmp_path / "bad.safetensors")]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "bad.safetensors") in err and f"'{key}'" in err, err


def test_dtype_bf16_reports_what_is_stored(checkpoints, capsys):
    base, ft = checkpoints
    out = base.parent / "bf.safetensors"
    assert cli.main(["vector", "make", str(base), str(ft), "-o", str(out), "--dtype", "bf16"]) == 0
    assert "dtype=torch.bfloat16" in capsys.readouterr().out
    assert TaskVector.load(out).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--shots", "0"], "--shots must be >= 1, got 0"),
        (["demo", "--target", "emoji_twiter"], "--target 'emoji_twiter' is not one of"),
        (["demo", "--head-from", "emoji_gogle"], "--head-from 'emoji_gogle' is not one of"),
        (["demo", "--epochs", "-1"], "--epochs must be >= 1, got -1"),
        (["--threads", "-3", "demo"], "--threads must be >= 1, got -3"),
        (["--threads", "0", "demo"], "--threads must be >= 1, got 0"),
        (["bank", "build", "--tasks", "mnist", "nmist"], "--tasks 'nmist' is not one of"),
        (["bank", "build", "--epochs", "0"], "--epochs must be >= 1"),
        (["bench", "step", "--vectors", "0"], "--vectors must be >= 1"),
        (["run", "fewshot", "--shots", "0"], "--shots must be >= 1"),
        (["run", "variational", "--targets", "typo"], "--targets 'typo' is not one of"),
    ],
)
def test_arguments_are_checked_before_any_work(argv, message, monkeypatch, capsys, tmp_path):
    import taskvec.bank
    import taskvec.recipes.demo

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(taskvec.recipes.demo, "run_demo", no_work)
    monkeypatch.setattr(taskvec.bank.Bank, "build", no_work)
    monkeypatch.setattr(taskvec.bank.Bank, "build_entry", no_work)
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_demo_checks_its_output_folder_first_and_saves_results_before_the_plot(tmp_path, monkeypatch, capsys):
    import taskvec.recipes.demo

    monkeypatch.setattr(taskvec.recipes.demo, "run_demo", lambda *a, **k: pytest.fail("work before the check"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", "--out", str(blocker / "out")]) == 2
    assert "not writable" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "demo.json").write_text("{}")
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err


def test_demo_saves_results_before_the_plot(tmp_path, monkeypatch):
    """A plot that cannot be written (full disk, no permission) no longer loses the measured results."""
    import synthetic

    import taskvec.recipes.demo
    from taskvec.bank import BankConfig
    from taskvec.recipes.demo import DemoConfig
    from taskvec.workflow import CoefficientSchedule

    config = BankConfig(backbone="tiny_cnn", resolution=16, epochs=1, min_steps=0, lr=3e-3, batch_size=16,
                        pretrained=False)
    bank = synthetic.built_bank(config, tmp_path / "bank", ("alpha", "gamma"))

    def no_plot(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "demo_coefficients.png"))

    monkeypatch.setattr(taskvec.recipes.demo, "plot_coefficients", no_plot)
    demo = DemoConfig(target="gamma", shots=2, out=tmp_path / "out", progress=False,
                      schedule=CoefficientSchedule(epochs=1, batch_size=8))
    with pytest.raises(PermissionError):
        taskvec.recipes.demo.run_demo(demo, bank=bank, tasks=("alpha", "gamma"))
    saved = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert [row["method"] for row in saved["rows"]][-1] == "aTLAS (block)"
    assert (tmp_path / "out" / "demo_coefficients.safetensors").is_file()


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "a.json", {})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        assert stat.S_IMODE(write_json(tmp_path / "b.json", {}).stat().st_mode) == 0o600
        (tmp_path / "a.json").chmod(0o664)  # an existing file keeps its mode
        assert stat.S_IMODE(write_json(tmp_path / "a.json", {"x": 1}).stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_malformed_head_metadata_and_records_are_named(tmp_path):
    from taskvec.experiment import RecordStore

    path = LinearHead(8, 5).save(tmp_path / "head.safetensors")
    with safe_open(str(path), "pt") as handle:
        meta, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    meta.pop("taskvec_sha256"), meta.pop("taskvec_digest")  # as a file from before digests
    del meta["num_classes"]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: metadata lacks the key 'num_classes'"):
        LinearHead.load(tmp_path / "bad.safetensors")
    # Records are an append-only log: a damaged line (a run killed mid-write) is named, and only its job reruns.
    records = tmp_path / "records.jsonl"
    good = RecordStore(records, "x")
    good.put("kept", {"acc": 0.5})
    with records.open("a") as handle:
        handle.write('{"fingerprint": "x", "job": "torn", "value": {"acc"\n')
    with pytest.warns(UserWarning, match=r"records.jsonl: line 2 is unreadable"):
        again = RecordStore(records, "x")
    assert again.get("kept") == {"acc": 0.5} and again.get("torn") is None
    assert RecordStore(records, "x", resume=False).get("kept") is None


def test_a_damaged_digest_key_is_not_taken_for_a_file_from_before_digests(tmp_path):
    """One flipped bit in the digest key's name must not turn a file into an 'old, unverified' one."""
    vector = TaskVector({"w": torch.ones(3)}, metadata={"name": "v"})
    path = vector.save(tmp_path / "v.safetensors")
    raw = path.read_bytes()
    at = raw.index(b"taskvec_sha256")
    for offset in (0, len("taskvec_sha25")):  # first and last character of the key's name
        damaged = bytearray(raw)
        damaged[at + offset] ^= 1
        (tmp_path / "bad.safetensors").write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=r"bad.safetensors: its digest entries are damaged"):
            TaskVector.load(tmp_path / "bad.safetensors")
