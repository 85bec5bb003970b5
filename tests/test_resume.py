"""Resuming mid-epoch from ``checkpoint_last.pt`` reproduces the uninterrupted run update by update.

The uninterrupted run saves at update K with ``--save-interval-updates K`` (mid-epoch: the epoch has
about 25 batches); its ``checkpoint_1_K.pt`` is what ``checkpoint_last.pt`` held at update K. A new
run in another directory resumes from it (model, optimizer, data iterator position, meters) and
trains to N. fairseq reseeds torch's RNG per update (``seed + update``), so dropout and the mixed
exit sampler (``torch.randint`` in the criterion) draw the same numbers whether or not the run was
interrupted; a sampler with its own generator, seeded once at start-up, would fail here. Mixed
training runs without dropout so that the sampler is the only source of randomness.
"""
import shutil

import pytest

from cli_helpers import check_ok, run_tool, train_args, train_log

K, N = 4, 8
MODES = {
    "aligned": (),
    "mixed": ("--exit-training", "mixed", "--mixed-samples", "2", "--dropout", "0"),
    "estimator": ("--depth-estimator", "token-geometric", "--exit-loss-alpha", "1"),
}
KEYS = {"aligned": ("loss", "nll_loss", "loss_exit1", "loss_exit3", "gnorm"),
        "mixed": ("loss", "nll_loss", "gnorm"),
        "estimator": ("loss", "nll_loss", "loss_exit2", "exit_loss", "exit_acc", "gnorm")}


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(corpus, tmp_path, mode):
    extra = (*MODES[mode], "--save-interval-updates", str(K))
    full = check_ok(run_tool("fairseq-train", *train_args(corpus, tmp_path / "full", *extra, max_update=N)))
    full_log = train_log(full.stdout + full.stderr)
    assert sorted(full_log) == list(range(1, N + 1))
    assert full_log[N]["update"] < 1.0, "the test needs K..N inside the first epoch"

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "full" / f"checkpoint_1_{K}.pt", resumed_dir / "checkpoint_last.pt")
    resumed = check_ok(run_tool("fairseq-train", *train_args(corpus, resumed_dir, *extra, max_update=N)))
    out = resumed.stdout + resumed.stderr
    assert f"(epoch 1 @ {K} updates)" in out, out[-3000:]
    resumed_log = train_log(out)
    assert sorted(resumed_log) == list(range(K + 1, N + 1))
    for u in range(K + 1, N + 1):
        assert resumed_log[u]["update"] == full_log[u]["update"]  # same position in the epoch
        for key in KEYS[mode]:
            assert resumed_log[u][key] == pytest.approx(full_log[u][key], abs=1e-3), (mode, key, u)
