"""What ``import fairseq_dat`` changes in a process: fairseq's checkpoint loading may unpickle fairseq
checkpoints, and nothing else. torch's safe loading stays on for every other ``torch.load``, the
environment and ``sys.excepthook`` are untouched; the one-line ``ConfigError`` printing belongs to the
command-line runs (fairseq's console scripts with ``--user-dir``, the package's own tools).

Each check runs in a fresh interpreter, so that nothing imported by the test session hides a side
effect."""
import json
import subprocess
import sys
import textwrap

from cli_helpers import REPO, TINY_DIMS, tool_env, train_args, train_log
from test_distributed import train_two_ranks

PROBE = textwrap.dedent("""
    import json, os, pickle, sys
    import torch

    class Untrusted:  # any class outside torch's allowlist: what a malicious pickle would carry
        pass

    untrusted, checkpoint = sys.argv[1], sys.argv[2]
    torch.save(Untrusted(), untrusted)
    hook_before = sys.excepthook

    import fairseq_dat  # noqa: F401
    from fairseq import checkpoint_utils

    def refused():
        try:
            torch.load(untrusted)
        except pickle.UnpicklingError as err:
            return "Weights only load failed" in str(err)
        return False

    result = {"env_after_import": os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"),
              "hook_unchanged": sys.excepthook is hook_before,
              "refused_after_import": refused()}
    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    result.update(fairseq_loaded="decoder.exit_projections.0.weight" in state["model"],
                  env_after_fairseq_load=os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"),
                  refused_after_fairseq_load=refused())
    print(json.dumps(result))
""")


def test_import_keeps_torch_load_safe_and_fairseq_checkpoints_loadable(adaptive_checkpoint, tmp_path):
    env = tool_env()
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "untrusted.pt"), str(adaptive_checkpoint)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"env_after_import": None, "hook_unchanged": True, "refused_after_import": True,
                      "fairseq_loaded": True, "env_after_fairseq_load": None, "refused_after_fairseq_load": True}


def test_package_tools_print_config_errors_as_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fairseq_dat.cli.make_tables", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "R.md")], capture_output=True, text=True, env=tool_env(),
                          cwd=REPO, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"make_tables.py: error: RUN_DIR: {tmp_path / 'nowhere'} is not a directory"


def test_two_ranks_start_from_a_fairseq_checkpoint(corpus, stock_checkpoint, tmp_path):
    """Data-parallel fairseq-train with the plugin loaded: rank 0 reads ``--finetune-from-model`` and
    broadcasts it, rank 1 unpickles the broadcast bytes (``torch.load`` in fairseq's ``broadcast_object``),
    which is fairseq's checkpoint loading too."""
    args = train_args(corpus, tmp_path / "ft", *TINY_DIMS, "--finetune-from-model", stock_checkpoint, "--no-save",
                      max_update=2, arch="transformer", task="translation", criterion="label_smoothed_cross_entropy")
    rank0, rank1 = train_two_ranks(args)
    assert "Loaded checkpoint" in rank0 and sorted(train_log(rank0)) == [1, 2], rank0[-2000:]
    assert "Traceback" not in rank1, rank1[-2000:]
