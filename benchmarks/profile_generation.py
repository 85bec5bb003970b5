#!/usr/bin/env python
"""Where the time of exit-aware beam search goes: cProfile (cumulative time per function) of one
decoding setting, next to fairseq's own generator on the same batches.

    python benchmarks/profile_generation.py DATA --path CKPT [--exit-threshold T | --fixed-exit K]
        [--exit-strategy S] [--exit-kv deferred|eager] [--batches 4] [--batch-size 64] [--beam 5]

Prints the total time of each generator, then the functions of the plugin and fairseq's search
with their cumulative seconds (share of our total), so the gap to the stock generator / the
truncated limit can be attributed (block calls by path, K/V materialization, exit decisions,
beam search bookkeeping).
"""
import argparse
import cProfile
import pstats
import time

import fairseq_dat  # noqa: F401  (registers the plugin, lets fairseq checkpoints load)
import torch
from fairseq import checkpoint_utils, utils
from fairseq.sequence_generator import SequenceGenerator

from fairseq_dat.sequence_generator import AdaptiveSequenceGenerator


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--path", required=True)
    p.add_argument("--subset", default="test")
    p.add_argument("--exit-threshold", default=None)
    p.add_argument("--exit-strategy", default="auto")
    p.add_argument("--fixed-exit", type=int, default=None)
    p.add_argument("--exit-kv", default="deferred", choices=("deferred", "eager"))
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=30)
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides={"data": args.data})
    model = models[0].eval()
    task.load_dataset(args.subset)
    itr = task.get_batch_iterator(task.dataset(args.subset), max_sentences=args.batch_size,
                                  max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
                                  ).next_epoch_itr(shuffle=False)
    batches = [b for _, b in zip(range(args.batches), itr)]
    d = task.target_dictionary
    stock = SequenceGenerator([model], d, beam_size=args.beam)
    ours = AdaptiveSequenceGenerator([model], d, beam_size=args.beam, exit_strategy=args.exit_strategy,
                                     exit_threshold=args.exit_threshold, fixed_exit=args.fixed_exit,
                                     exit_kv=args.exit_kv)

    def run(gen):
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                gen.generate([model], batch)
        return time.perf_counter() - start

    run(stock), run(ours)  # warm-up
    t_stock, t_ours = run(stock), run(ours)
    print(f"fairseq SequenceGenerator (full depth): {t_stock:.2f} s; ours: {t_ours:.2f} s "
          f"({t_stock / t_ours:.2f}x); {ours.stats.summary()}")
    profiler = cProfile.Profile()
    profiler.enable()
    run(ours)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = max(v[3] for v in stats.stats.values())
    rows = [(v[3], v[2], f"{k[0].split('site-packages/')[-1].split('/work/main/')[-1]}:{k[2]}", v[1])
            for k, v in stats.stats.items() if ("fairseq" in k[0]) or "torch/nn/modules" in k[0]]
    print(f"\n{'cumulative s':>12} {'self s':>8} {'share':>6} {'calls':>7}  function")
    for cum, own, name, calls in sorted(rows, reverse=True)[: args.top]:
        print(f"{cum:12.3f} {own:8.3f} {cum / total:6.1%} {calls:7d}  {name}")


if __name__ == "__main__":
    main()
