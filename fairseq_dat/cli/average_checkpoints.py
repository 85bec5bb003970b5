"""Average the parameters of the last K checkpoints of a run (the paper's WMT evaluation, §4.1).

fairseq ships this as ``scripts/average_checkpoints.py``, which pip installs of fairseq do not
include; this is the same operation for the checkpoints ``fairseq-train`` writes::

    python -m fairseq_dat.cli.average_checkpoints RUN_DIR --last 10 --output RUN_DIR/checkpoint_avg10.pt
"""
import argparse
import os
import re

import torch

import fairseq_dat  # noqa: F401  (lets fairseq's checkpoint_utils unpickle checkpoints: checkpoint_loading.py)
from fairseq import checkpoint_utils

from . import run_main
from ..errors import ConfigError

PATTERNS = {"updates": re.compile(r"checkpoint_\d+_(\d+)\.pt$"), "epochs": re.compile(r"checkpoint(\d+)\.pt$")}


def last_checkpoints(run_dir: str, count: int, by: str):
    """The ``count`` newest numbered checkpoints in ``run_dir`` (by update or by epoch number)."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"checkpoint directory {run_dir} does not exist")
    pattern = PATTERNS[by]
    found = sorted(((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := pattern.search(name))),
                   reverse=True)
    if len(found) < count:
        raise ConfigError(f"--last {count}: {run_dir} has only {len(found)} checkpoints numbered by {by}")
    return [os.path.join(run_dir, name) for _, name in found[:count]]


def average(paths):
    """Mean of every floating-point parameter; other entries (and the config) from the newest."""
    newest = checkpoint_utils.load_checkpoint_to_cpu(paths[0])
    sums = {k: v.double().clone() if v.is_floating_point() else v for k, v in newest["model"].items()}
    for path in paths[1:]:
        model = checkpoint_utils.load_checkpoint_to_cpu(path)["model"]
        if model.keys() != sums.keys():
            raise ConfigError(f"{path} has other parameters than {paths[0]}: not checkpoints of one run")
        for key, value in model.items():
            if value.is_floating_point():
                sums[key] += value.double()
    newest["model"] = {k: (v / len(paths)).to(newest["model"][k].dtype) if v.is_floating_point() else v
                       for k, v in sums.items()}
    return newest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="directory with fairseq-train's checkpoints")
    parser.add_argument("--last", type=int, default=10, help="how many of the newest checkpoints to average")
    parser.add_argument("--by", choices=sorted(PATTERNS), default="updates",
                        help="numbered by update (--save-interval-updates) or by epoch")
    parser.add_argument("--output", required=True, help="where to write the averaged checkpoint")
    args = parser.parse_args(argv)
    paths = last_checkpoints(args.run_dir, args.last, args.by)
    torch.save(average(paths), args.output)
    print(f"averaged {len(paths)} checkpoints ({os.path.basename(paths[-1])} .. {os.path.basename(paths[0])}) "
          f"-> {args.output}")


if __name__ == "__main__":
    run_main(main)
