"""Data-parallel training on fairseq's own engine: CPU, gloo, two ``fairseq-train`` processes, one per
rank (``--distributed-no-spawn``, ``--ddp-backend legacy_ddp``, a TCP rendezvous on localhost).

- Aligned training and the estimator stage are deterministic without dropout, so 2 ranks × batch B
  must log the same per-update losses as 1 process with ``--update-freq 2`` on the same data and
  seed: fairseq gives rank r the batches r, r+2, … and ``--update-freq 2`` groups batches (2k, 2k+1),
  so both see the same two batches per update.
- Mixed training draws exits from torch's RNG, which fairseq reseeds per update (``seed + update``)
  on every rank, while ``--update-freq 2`` continues the stream into the second batch: the draws
  differ, so only termination (no rank waits forever on an exit head the other rank did not use)
  and a sane trajectory are checked.

On CPU, stock fairseq 0.12 cannot use ``--ddp-backend pytorch_ddp`` (it passes ``device_ids=[0]`` to
torch's DistributedDataParallel, models/distributed_fairseq_model.py) nor infer ranks under
``torchrun`` (``rank % torch.cuda.device_count()``, distributed/utils.py): hence the flags below.
"""
import math
import subprocess
import time

import pytest

from cli_helpers import BIN, check_ok, free_port, losses, run_tool, tool_env, train_args, train_log

DDP = ("--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--distributed-world-size", "2",
       "--distributed-no-spawn", "--device-id", "0")
ESTIMATOR = ("--depth-estimator", "token-geometric", "--exit-loss-alpha", "1")
LOG_ROUNDING = 1.5e-3  # fairseq logs losses with 3 decimals


def train_two_ranks(args, timeout=150):
    """Both ranks of one run; returns their outputs. A hang (a rank waiting in a collective) fails
    the test after ``timeout`` seconds instead of blocking the suite."""
    port = free_port()
    procs = [subprocess.Popen([str(BIN / "fairseq-train"), *map(str, args), *DDP,
                               "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-rank", str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tool_env())
             for r in (0, 1)]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = "\n---\n".join((p.communicate()[0] or "")[-1500:] for p in procs)
        pytest.fail(f"2-rank training did not finish within {timeout} s (hung?)\n{tails}")
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}\n{out[-3000:]}"
    assert "initialized host" in outputs[1] and "as rank 1" in outputs[1], outputs[1][-2000:]
    return outputs


@pytest.mark.parametrize("stage,extra", [("aligned", ()), ("estimator", ESTIMATOR)])
def test_two_ranks_equal_one_process_with_update_freq_2(corpus, tmp_path, stage, extra):
    updates = 5
    common = (*extra, "--dropout", "0", "--no-save")
    rank0, _ = train_two_ranks(train_args(corpus, tmp_path / "ddp", *common, max_update=updates))
    single = check_ok(run_tool("fairseq-train", *train_args(corpus, tmp_path / "uf2", *common, "--update-freq", "2",
                                                            max_update=updates)))
    ddp_log, uf2_log = train_log(rank0), train_log(single.stdout + single.stderr)
    assert sorted(ddp_log) == sorted(uf2_log) == list(range(1, updates + 1))
    keys = ["loss", "nll_loss", "loss_exit1", "loss_exit2", "loss_exit3"] + (["exit_loss"] if extra else [])
    for key in keys:
        for u in range(1, updates + 1):
            assert abs(ddp_log[u][key] - uf2_log[u][key]) <= LOG_ROUNDING, (stage, key, u, ddp_log[u], uf2_log[u])
    for u in range(1, updates + 1):  # both batches of each pair counted once: same words and sentences
        assert ddp_log[u]["wpb"] == uf2_log[u]["wpb"] and ddp_log[u]["bsz"] == uf2_log[u]["bsz"]
    assert ddp_log[updates]["loss"] < ddp_log[1]["loss"]


def test_mixed_training_on_two_ranks_terminates_and_learns(corpus, tmp_path):
    rank0, _ = train_two_ranks(train_args(corpus, tmp_path / "ddp", "--exit-training", "mixed", "--mixed-samples",
                                          "3", "--no-save", max_update=8))
    trajectory = losses(train_log(rank0))
    assert list(trajectory) == list(range(1, 9))
    values = list(trajectory.values())
    assert all(math.isfinite(v) for v in values)
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 0.1, values
