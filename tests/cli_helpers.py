"""Running fairseq's own command-line tools in tests: a small binarized corpus, tiny training runs,
fairseq's JSON training log, one-line errors.

Every run is a real ``fairseq-train``/``fairseq-generate``/``fairseq-interactive`` process of the
test's interpreter (the venv), with ``--user-dir fairseq_dat``, one thread, on CPU. The corpus is
the first few hundred Multi30k pairs of the staged data (word level, no BPE), binarized into a
temporary directory; tests skip, saying so, when the staged data is absent.
"""
import json
import lzma
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_DIR = REPO / "fairseq_dat"
BIN = Path(sys.executable).parent
SHARED = Path(os.environ.get("FAIRSEQ_DAT_SHARED", REPO.parent / "shared"))
MULTI30K = SHARED / "data" / "multi30k-de-en"

# adaptive_transformer_tiny's dimensions, spelled out for fairseq's stock --arch transformer
TINY_DIMS = ("--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-layers", "2",
             "--encoder-attention-heads", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
             "--decoder-layers", "3", "--decoder-attention-heads", "2")


def tool_env():
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_tool(name, *args, timeout=120, stdin=None, cwd=None):
    """One fairseq command; returns the CompletedProcess (stdout and stderr as text)."""
    cmd = [str(BIN / name), *map(str, args)]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=tool_env(),
                          cwd=cwd)


def check_ok(proc):
    assert proc.returncode == 0, (f"{proc.args[0]} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def assert_one_line_error(proc, *needles):
    """Exit status 1, no traceback, and a last stderr line ``<prog>: error: …`` holding every needle."""
    assert proc.returncode != 0, f"expected a failure, got exit 0\n{proc.stdout[-2000:]}"
    assert "Traceback" not in proc.stderr, f"traceback instead of a one-line error:\n{proc.stderr[-3000:]}"
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    prog = Path(proc.args[0]).name
    assert last.startswith(f"{prog}: error: "), f"last stderr line is not a one-line error: {last!r}"
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- data -----------------------------------------------------------------------------------

def build_corpus(dest: Path, n_train=300, n_valid=40, n_test=24):
    """The first pairs of Multi30k (tokenized, lowercased, word level) binarized by fairseq-preprocess
    with a joined dictionary into dest/bin; the text stays in dest/text. Returns dest/bin."""
    if not (MULTI30K / "train.de.xz").exists():
        pytest.skip(f"staged data not found: {MULTI30K} (set FAIRSEQ_DAT_SHARED to the shared/ folder)")
    text = dest / "text"
    text.mkdir(parents=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        for lang in ("de", "en"):
            with lzma.open(MULTI30K / f"{split}.{lang}.xz", "rt", encoding="utf-8") as f:
                lines = [next(f) for _ in range(n)]
            (text / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")
    out = dest / "bin"
    check_ok(run_tool("fairseq-preprocess", "--source-lang", "de", "--target-lang", "en",
                      "--trainpref", text / "train", "--validpref", text / "valid", "--testpref", text / "test",
                      "--destdir", out, "--joined-dictionary", "--workers", "1"))
    return out


# ---- training -------------------------------------------------------------------------------

def train_args(data, save_dir, *extra, max_update=6, seed=3, arch="adaptive_transformer_tiny",
               task="adaptive_translation", criterion="adaptive_label_smoothed_cross_entropy"):
    """A tiny, fast, fully logged fairseq-train command line (JSON log line per update)."""
    return [data, "--user-dir", USER_DIR, "--task", task, "--arch", arch, "--criterion", criterion,
            "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "0.002", "--max-tokens", "300",
            "--max-update", max_update, "--seed", seed, "--cpu", "--num-workers", "0",
            "--log-format", "json", "--log-interval", "1", "--disable-validation",
            "--save-dir", save_dir, "--no-epoch-checkpoints", *extra]


_INNER = re.compile(r"train_inner \| (\{.*\})\s*$")


def train_log(output: str):
    """fairseq's per-update JSON records (``--log-format json --log-interval 1``): {update: record}
    with numbers as floats."""
    records = {}
    for line in output.splitlines():
        m = _INNER.search(line)
        if m:
            rec = {k: float(v) if isinstance(v, str) and re.fullmatch(r"-?[\d.e+-]+|nan|inf", v) else v
                   for k, v in json.loads(m.group(1)).items()}
            records[int(rec["num_updates"])] = rec
    return records


def losses(records, key="loss"):
    return {u: r[key] for u, r in sorted(records.items())}


def hypotheses(output: str):
    """fairseq-generate's H- lines: {sentence id: (score, tokens)}."""
    hyps = {}
    for line in output.splitlines():
        if line.startswith("H-"):
            sid, score, toks = line.split("\t")
            hyps[int(sid[2:])] = (float(score), toks)
    return hyps


# ---- session fixtures (imported by conftest.py) ------------------------------------------------

@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """300/40/24 Multi30k pairs binarized with a joined dictionary (about 5 s)."""
    return build_corpus(tmp_path_factory.mktemp("multi30k_small"))


@pytest.fixture(scope="session")
def adaptive_checkpoint(corpus, tmp_path_factory):
    """A tiny adaptive_transformer (3 exits, token-geometric estimator) after 3 updates: still close
    to its random start, so its translations differ from sentence to sentence (a few dozen updates
    on 300 pairs collapse them to the most frequent words)."""
    save = tmp_path_factory.mktemp("adaptive_ckpt")
    check_ok(run_tool("fairseq-train", *train_args(corpus, save, "--depth-estimator", "token-geometric",
                                                   "--exit-loss-alpha", "1", max_update=3)))
    return save / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def stock_checkpoint(corpus, tmp_path_factory):
    """fairseq's stock --arch transformer with adaptive_transformer_tiny's dimensions, 4 updates."""
    save = tmp_path_factory.mktemp("stock_ckpt")
    check_ok(run_tool("fairseq-train", *train_args(corpus, save, *TINY_DIMS, max_update=4, arch="transformer",
                                                   task="translation", criterion="label_smoothed_cross_entropy")))
    return save / "checkpoint_last.pt"


def multi30k_bpe_text(tmp: Path) -> Path:
    """The Multi30k BPE text of examples/multi30k_de_en/prepare.sh: data-bin/multi30k_de_en.bpe when
    prepared, else built here from the staged data (first 2,000 training pairs) into tmp."""
    bpe = REPO / "data-bin" / "multi30k_de_en.bpe"
    if (bpe / "valid.en").exists():
        return bpe
    if not (MULTI30K / "train.de.xz").exists():
        pytest.skip(f"no Multi30k data: neither {bpe} nor {MULTI30K} exists (set FAIRSEQ_DAT_SHARED)")
    env = dict(tool_env(), LIMIT="2000")
    proc = subprocess.run(["bash", str(REPO / "examples/multi30k_de_en/prepare.sh"), str(SHARED / "data"),
                           str(tmp / "m30k")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "m30k.bpe"

