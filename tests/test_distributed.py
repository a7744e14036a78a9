"""torchrun / DDP semantics of fit (issue 13): 2 gloo ranks on CPU equal one process on the union batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from taskvec import distributed
from taskvec.io import load_torch_checked

WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    import torch.nn.functional as F
    from torch import nn
    from taskvec import distributed
    from taskvec.compose import Composer
    from taskvec.train import Loader, TrainConfig, fit
    from taskvec.vectors import TaskVector

    out, tag, crash_after = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    resume, per_rank = sys.argv[4] == "1", sys.argv[5] == "1"
    torch.set_num_threads(1)
    distributed.init()
    rank = distributed.rank()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    bank = [TaskVector({k: torch.randn(v.shape, generator=g) * 0.3 for k, v in base.named_parameters()},
                       metadata={"name": f"t{i}"}) for i in range(3)]
    composer = Composer(base, bank, "block", init=0.1)
    if rank == 1:  # a different start on rank 1: fit must broadcast rank 0's state
        with torch.no_grad():
            composer.coefficients.add_(1.0)
    x = torch.randn(32, 6, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)

    def make(generator):
        order = torch.randperm(32, generator=generator)
        for i in range(0, 32, 8):
            yield x[order[i:i + 8]], y[order[i:i + 8]]

    steps = [0]

    def loss_fn(model, batch):
        steps[0] += 1
        if crash_after and steps[0] > crash_after:
            raise RuntimeError("simulated crash")
        return F.cross_entropy(model(batch[0]), batch[1])

    checkpoint = out / (f"ckpt_{tag}_rank{rank}.pt" if per_rank else f"ckpt_{tag}.pt")
    config = TrainConfig(epochs=3, lr=0.05, progress=False, checkpoint=checkpoint, resume=resume, max_grad_norm=0.5)
    result = fit(composer, loss_fn, Loader(make, 4), config)
    torch.save({"coefficients": composer.coefficients.detach(), "losses": [r.loss for r in result.history]},
               out / f"final_{tag}_rank{rank}.pt")
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


def _run(tmp_path: Path, ranks: int, tag: str, crash_after: int = 0, resume: bool = False,
         per_rank: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [str(script), str(tmp_path), tag, str(crash_after), "1" if resume else "0", "1" if per_rank else "0"]
    if ranks == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600, check=False)


def _final(tmp_path: Path, tag: str, rank: int) -> dict:
    return torch.load(tmp_path / f"final_{tag}_rank{rank}.pt", weights_only=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_ranks_equal_one_process_and_only_rank0_writes(tmp_path):
    single = _run(tmp_path, 1, "single", per_rank=True)
    assert single.returncode == 0, single.stderr[-3000:]
    pair = _run(tmp_path, 2, "pair", per_rank=True)
    assert pair.returncode == 0, pair.stderr[-3000:]
    reference = _final(tmp_path, "single", 0)
    for rank in (0, 1):
        got = _final(tmp_path, "pair", rank)
        assert torch.allclose(got["coefficients"], reference["coefficients"], atol=1e-5, rtol=0)
        assert got["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert not torch.equal(reference["coefficients"], torch.full_like(reference["coefficients"], 0.1))  # it trained
    # fit wrote its checkpoint on rank 0 only.
    assert (tmp_path / "ckpt_pair_rank0.pt").is_file()
    assert not (tmp_path / "ckpt_pair_rank1.pt").exists()

    # Resume: crash both ranks in epoch 2 (after 4 + 2 steps), then resume from rank 0's epoch-1 checkpoint.
    crashed = _run(tmp_path, 2, "resume", crash_after=6)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    saved = load_torch_checked(tmp_path / "ckpt_resume.pt")
    assert saved["epoch"] == 1
    resumed = _run(tmp_path, 2, "resume", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        got = _final(tmp_path, "resume", rank)
        assert torch.allclose(got["coefficients"], reference["coefficients"], atol=1e-5, rtol=0)


def test_shard_batch_splits_nested_batches_and_refuses_tiny_ones():
    batch = {"x": torch.arange(8).reshape(4, 2), "pair": (torch.arange(4), "label")}
    first = distributed.shard_batch(batch, 0, 2)
    second = distributed.shard_batch(batch, 1, 2)
    assert torch.equal(torch.cat([first["x"], second["x"]]), batch["x"])
    assert torch.equal(second["pair"][0], torch.tensor([2, 3])) and second["pair"][1] == "label"
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        distributed.shard_batch(torch.zeros(3), 0, 4)


def test_outside_a_process_group_everything_is_a_no_op():
    assert not distributed.active() and distributed.rank() == 0 and distributed.is_writer()
    batches = [torch.ones(4)]
    assert list(distributed.shard(batches)) == batches
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.full((2,), 3.0)
    distributed.average_gradients([param])
    assert torch.equal(param.grad, torch.full((2,), 3.0))
    assert distributed.all_mean(2.5) == 2.5
