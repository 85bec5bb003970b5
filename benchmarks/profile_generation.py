#!/usr/bin/env python
"""Where the time of exit-aware beam search goes, and what the lean decoder step changes.

Two modes:

    # a trained checkpoint on real batches: total time next to fairseq's generator, then cProfile
    python benchmarks/profile_generation.py DATA --path CKPT [--exit-threshold T | --fixed-exit K]
        [--exit-strategy S] [--exit-kv deferred|eager] [--decoder-step lean|fairseq]
        [--batches 4] [--batch-size 64] [--beam 5]

    # equality on a whole test set: fairseq's generator vs ours on both block steps (no profile)
    python benchmarks/profile_generation.py DATA --path CKPT --compare [--batches 0] [...]

    # token-level exits step by step: the deepest row of each step against the row mean, and where the
    # time of the step goes (straggler calls split into their parts), against --fixed-exit 1
    python benchmarks/profile_generation.py DATA --path CKPT --steps --exit-threshold 0.7,0.8,0.9 [--batch-size 1]
        [--max-sentences 300]

    # speed only: a model of the demo shape with random weights built here (no data, no checkpoint)
    python benchmarks/profile_generation.py --random-model [--batch-size 64] [--beam 5] [--threads 2]
        [--shape demo|w256 --vocab V] [--only speed|blocks|ops]

``--random-model`` prints (1) decoding tokens/s of fairseq's ``SequenceGenerator``, of ours at full
depth through fairseq's layers (``--decoder-step fairseq``, without and with ``--fixed-exit N``) and
through the lean step, and of uniformly random token exits on both steps, on the same batches, in
one process, with their ratios (the uniform rows emit different tokens: compare their times); (2) the cost of one
call of one decoder block against the number of rows that run it (the others exited: the copy
rule's keys/values still cover every row), before (fairseq's layer path) and after (lean step);
(3) the same with deferred keys/values, from the state token-level exits leave a block in (positions
skipped by every row, a beam reordering pending): every row catching up (before stop 27) against only
the running rows (the lean step's straggler path).
``--only ops`` instead: one pass of fairseq's generator and of ours (lean step) at full depth under
torch.profiler, the operators' self time by kind (matrix products, attention, log_softmax, beam search
selection, copies/indexing, …) and the wall time outside operators: where the remaining time goes.
Random weights: the hypotheses are meaningless, only the times are.

``--steps`` (a checkpoint with a token-level estimator): per threshold, the decoding steps' mean exit over
rows (what AE counts) and the mean over steps of the deepest row's exit. A step runs block n if any row
needs it, and when a block call costs about the same for 1 row as for all (dispatch-bound: batch 1, or
the per-call floor of straggler calls), its blocks cost the deepest row's depth: mean / deepest bounds the
efficiency of the blocks' share of the time of any lockstep beam search, whatever the per-call code. With
the rest of a step (beam search, embeddings, output projection: ``--fixed-exit 1`` minus one block, a block
being (``--fixed-exit N`` − ``--fixed-exit 1``) / (N − 1), per pass) the bound on the whole step is
(rest + block · mean) / (rest + block · deepest). Then the wall time of the pieces of the lean step (every
straggler call and its ``row_history``, ``keep_row_history``; the halting decisions; ``step_logits``) in a
second timed pass, and ATen operators per call under torch.profiler.
"""
import argparse
import collections
import contextlib
import cProfile
import functools
import pstats
import time
from typing import Dict

import fairseq_dat  # noqa: F401  (registers the plugin, lets fairseq checkpoints load)
import torch
from fairseq import checkpoint_utils, options, utils
from fairseq.data import Dictionary
from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks.translation import TranslationTask

from fairseq_dat.exit_policy import ExitPolicy
from fairseq_dat.sequence_generator import AdaptiveSequenceGenerator

# the demo model's shape (examples/multi30k_de_en): 3 encoder + 6 decoder blocks, width 128
DEMO_SHAPE = ["--encoder-layers", "3", "--decoder-layers", "6", "--encoder-embed-dim", "128",
              "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "512", "--decoder-ffn-embed-dim", "512",
              "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"]
# the reduced IWSLT shape of examples/multi30k_de_en/reproduce_cpu.sh (6+6 blocks, width 256, FFN 1024)
W256_SHAPE = ["--encoder-layers", "6", "--decoder-layers", "6", "--encoder-embed-dim", "256",
              "--decoder-embed-dim", "256", "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
              "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"]
SHAPES = {"demo": DEMO_SHAPE, "w256": W256_SHAPE}
ROWS = (1, 2, 8, 64, 320)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?")
    p.add_argument("--path")
    p.add_argument("--random-model", action="store_true", help="demo-shape model with random weights (speed only)")
    p.add_argument("--vocab", type=int, default=3000, help="--random-model: dictionary size")
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo",
                   help="--random-model: the demo's 3+6 x 128 or the reduced IWSLT 6+6 x 256 (use --vocab 7872)")
    p.add_argument("--src-len", type=int, default=14, help="--random-model: source length")
    p.add_argument("--tgt-len", type=int, default=16, help="--random-model: decoding steps (min = max length)")
    p.add_argument("--subset", default="test")
    p.add_argument("--exit-threshold", default=None)
    p.add_argument("--exit-strategy", default="auto")
    p.add_argument("--fixed-exit", type=int, default=None)
    p.add_argument("--exit-kv", default="deferred", choices=("deferred", "eager"))
    p.add_argument("--decoder-step", default="lean", choices=("lean", "fairseq"))
    p.add_argument("--batches", type=int, default=4, help="checkpoint: the first this many batches (0: all)")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="checkpoint: instead of --batches, the first N sentences of the subset by id, batched by length "
                        "(the sentences benchmarks/generation_speed.py --max-sentences N decodes)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per generator (best is kept)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--only", choices=("speed", "blocks", "ops"),
                   help="--random-model: one report (ops: the torch.profiler breakdown, not run by default)")
    p.add_argument("--compare", action="store_true",
                   help="checkpoint: compare hypotheses instead of profiling: fairseq's SequenceGenerator vs "
                        "ours at full depth on both --decoder-step paths, and lean vs fairseq layers under the "
                        "exit flags given (--batches 0: the whole subset)")
    p.add_argument("--steps", action="store_true",
                   help="checkpoint: per --exit-threshold (comma-separated), the deepest row of each decoding step "
                        "against the row mean (the lockstep bound on efficiency) and the time of the step's pieces")
    args = p.parse_args()
    if not args.random_model and (args.data is None or args.path is None):
        p.error("DATA and --path are required unless --random-model")
    if args.steps:
        try:
            [float(t) for t in (args.exit_threshold or "").split(",")]
        except ValueError:
            p.error(f"--steps needs --exit-threshold as comma-separated numbers, got {args.exit_threshold!r}")
    return args


# ---- a random demo-shape model ---------------------------------------------------------------------


def random_model(vocab: int, shape=DEMO_SHAPE):
    torch.manual_seed(1)
    d = Dictionary()
    for i in range(vocab - d.nspecial):
        d.add_symbol(f"w{i}")
    d.finalize(padding_factor=1)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/dev/null", "--task", "translation", "--arch",
                                                "adaptive_transformer", *shape])
    task = TranslationTask(args, d, d)
    return task.build_model(args).eval(), d


def random_batches(d: Dictionary, n: int, bsz: int, src_len: int):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        src = torch.randint(d.nspecial, len(d), (bsz, src_len), generator=g)
        lengths = torch.randint(src_len // 2, src_len + 1, (bsz,), generator=g)
        for i, length in enumerate(lengths.tolist()):  # left padding, as fairseq's LanguagePairDataset
            src[i, : src_len - length] = d.pad()
        src[:, -1] = d.eos()
        batches.append({"id": torch.arange(bsz), "net_input": {"src_tokens": src, "src_lengths": lengths}})
    return batches


def timed_round_robin(generators, model, batches, repeats: int):
    """Best of ``repeats`` passes of each generator, the generators taking turns (so that a change
    of machine load hits all of them): [(seconds, output tokens of the best hypotheses)]."""
    best, tokens = [float("inf")] * len(generators), [0] * len(generators)
    with torch.no_grad():
        for gen in generators:
            gen.generate([model], batches[0])  # warm-up
        for _ in range(repeats):
            for i, gen in enumerate(generators):
                start = time.perf_counter()
                hypos = [gen.generate([model], b) for b in batches]
                best[i] = min(best[i], time.perf_counter() - start)
                tokens[i] = sum(len(sent[0]["tokens"]) for batch in hypos for sent in batch)
    return list(zip(best, tokens))


def generation_speed(model, d, batches, args):
    n = model.decoder.num_layers
    search = {"beam_size": args.beam, "max_len_a": 0, "max_len_b": args.tgt_len, "min_len": args.tgt_len}
    rows = [("fairseq SequenceGenerator", SequenceGenerator([model], d, **search)),
            ("ours, --decoder-step fairseq (fairseq's decoder)",
             AdaptiveSequenceGenerator([model], d, decoder_step="fairseq", **search)),
            (f"ours, --decoder-step fairseq --fixed-exit {n}",
             AdaptiveSequenceGenerator([model], d, decoder_step="fairseq", fixed_exit=n, **search)),
            ("ours, --decoder-step lean (default)", AdaptiveSequenceGenerator([model], d, **search)),
            # token-level exits drawn uniformly from 1..N (Table 1's Uniform column): mixed depths per step
            ("ours, --exit-strategy uniform, --decoder-step fairseq",
             AdaptiveSequenceGenerator([model], d, decoder_step="fairseq", exit_strategy="uniform", **search)),
            ("ours, --exit-strategy uniform, --decoder-step lean",
             AdaptiveSequenceGenerator([model], d, exit_strategy="uniform", **search))]
    times = timed_round_robin([gen for _, gen in rows], model, batches, args.repeats)
    results = [(name, seconds, tokens) for (name, _), (seconds, tokens) in zip(rows, times)]
    base = results[0][1]
    print(f"\n== decoding, full depth: {len(batches)} batches x {args.batch_size} sentences, beam {args.beam}, "
          f"{args.tgt_len} steps, {torch.get_num_threads()} threads")
    print(f"{'generator':56} {'seconds':>8} {'tokens/s':>9} {'vs fairseq':>10}")
    for name, seconds, tokens in results:
        print(f"{name:56} {seconds:8.3f} {tokens / seconds:9.1f} {base / seconds:9.2f}x")
    return results


# ---- one block call against the rows that run it ---------------------------------------------------


def block_call_costs(model, d, args, cache_len: int = 12, block: int = 3, calls: int = 40):
    """Seconds per call of decoder block ``block`` (1-based) for r of B = batch x beam rows, with a
    self-attention cache of ``cache_len`` positions left as decoding leaves it (filled, then
    reordered for the beam), on both block steps, the two taking turns call by call."""
    dec = model.decoder
    bsz = args.batch_size * args.beam
    batch = random_batches(d, 1, args.batch_size, args.src_len)[0]["net_input"]
    with torch.no_grad():
        enc_out = model.encoder(batch["src_tokens"], src_lengths=batch["src_lengths"])
        enc_out = model.encoder.reorder_encoder_out(enc_out, torch.arange(args.batch_size).repeat_interleave(args.beam))
    enc, enc_mask = enc_out["encoder_out"][0], enc_out["encoder_padding_mask"][0]
    layer = dec.layers[block - 1]
    x = torch.randn(1, bsz, dec.embed_dim)
    everyone = torch.arange(bsz)
    policies = {step: ExitPolicy(decoder_step=step, kv_mode="eager") for step in ("fairseq", "lean")}
    states = {step: {} for step in policies}  # as in decoding: fairseq's layers keep one source K/V per row

    def call(step, rows):
        dec.exit_policy = policies[step]
        state = states[step]
        if step == "lean":
            caches = dec.lean_caches(state) or dec.start_lean_caches(state)
            dec.lean_block_for_rows(caches[block - 1], layer, x, rows, enc, enc_mask, None, 0.5, args.beam)
        else:
            dec.run_block_for_rows(layer, block, x, rows, enc, enc_mask, state, None)

    with torch.no_grad():
        for step in policies:  # a cache as decoding leaves it: cache_len positions, then a beam reordering
            for _ in range(cache_len):
                call(step, everyone)
            dec.exit_policy = policies[step]
            dec.reorder_incremental_state_scripting(states[step], everyone)
        saved = {k: dict(v) for k, v in states["fairseq"].items()}
        g = torch.Generator().manual_seed(0)
        costs = {}
        for r in ROWS:
            active = torch.randperm(bsz, generator=g)[:r].sort().values
            times = {step: [] for step in policies}
            for _ in range(calls):
                for step in policies:
                    cache = dec.lean_caches(states["lean"])[block - 1]
                    length = cache.length
                    start = time.perf_counter()
                    call(step, active)
                    times[step].append(time.perf_counter() - start)
                    cache.length = length  # the next call writes the same position again
                    states["fairseq"].clear()
                    states["fairseq"].update({k: dict(v) for k, v in saved.items()})
            for step in policies:
                costs[(step, r)] = sorted(times[step])[len(times[step]) // 2]
    dec.exit_policy = None
    print(f"\n== one call of decoder block {block} of {dec.num_layers} against the rows that run it "
          f"({bsz} rows in the batch, {cache_len} cached positions; median of {calls} calls, ms)")
    print(f"{'rows':>6} {'fairseq layers':>15} {'lean':>8} {'lean/fairseq':>13} "
          f"{'fairseq vs 320':>15} {'lean vs 320':>12}")
    for r in ROWS:
        f, lean = costs[("fairseq", r)], costs[("lean", r)]
        print(f"{r:6d} {1e3 * f:15.3f} {1e3 * lean:8.3f} {lean / f:13.2f} {f / costs[('fairseq', ROWS[-1])]:15.2f} "
              f"{lean / costs[('lean', ROWS[-1])]:12.2f}")
    return costs


def deferred_call_costs(model, d, args, cache_len: int = 12, skipped: int = 3, block: int = 3, calls: int = 40):
    """Seconds per call of decoder block ``block`` with deferred keys/values (the lean step) for r of
    B = batch x beam rows, from the state token-level exits leave it in: its cache filled up to
    ``cache_len - skipped`` positions, the last ``skipped`` positions skipped by every row (their
    keys/values still to come from the recorded exit states) and one beam reordering not yet applied.
    "every row catches up" (the path before stop 27 for every r): the block's cache re-ordered and filled
    for all rows, then the block on the r rows (below half of them: as a sub-batch); "straggler path"
    (r below ``--exit-gather-ratio`` 0.5 of the rows): only those rows' history read, filled and written
    back. The cache is restored before every call, outside the timing."""
    dec = model.decoder
    bsz, beam = args.batch_size * args.beam, args.beam
    batch = random_batches(d, 1, args.batch_size, args.src_len)[0]["net_input"]
    with torch.no_grad():
        enc_out = model.encoder(batch["src_tokens"], src_lengths=batch["src_lengths"])
        enc_out = model.encoder.reorder_encoder_out(enc_out, torch.arange(args.batch_size).repeat_interleave(beam))
    enc, enc_mask = enc_out["encoder_out"][0], enc_out["encoder_padding_mask"][0]
    layer, index = dec.layers[block - 1], block - 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, bsz, dec.embed_dim, generator=g)
    everyone = torch.arange(bsz)
    dec.exit_policy = ExitPolicy(decoder_step="lean", kv_mode="deferred")
    dec.beam_rows = beam
    state = {}
    with torch.no_grad():
        cache = dec.start_lean_caches(state)[index]
        for _ in range(cache_len - skipped):
            dec.lean_block_for_rows(cache, layer, x, everyone, enc, enc_mask, None, 0.5, beam)
        for _ in range(cache_len):
            dec.record_step_exits(state, torch.ones(bsz, dtype=torch.long), torch.randn(bsz, dec.embed_dim, generator=g))
        # a beam reordering: each sentence's rows continue from rows of the same sentence
        order = everyone // beam * beam + torch.randint(0, beam, (bsz,), generator=g)
        saved = (cache.k.clone(), cache.v.clone(), cache.length)

        def restore():
            cache.k, cache.v, cache.length = saved[0].clone(), saved[1].clone(), saved[2]
            cache.valid, cache.spare, cache.pad = None, None, None
            dec.set_incremental_state(state, "pending_order", {str(index): order})

        def every_row(rows):
            dec.catch_up_block(index, state)
            dec.lean_block_for_rows(cache, layer, x, rows, enc, enc_mask, None, 0.5, beam)

        def stragglers(rows):
            dec.lean_straggler_block(index, layer, x, rows, enc, enc_mask, None, state)

        paths = {"every row catches up": every_row, "straggler path": stragglers}
        costs = {}
        for r in ROWS:
            active = torch.randperm(bsz, generator=g)[:r].sort().values
            for name, run in paths.items():
                if name == "straggler path" and r >= 0.5 * bsz:
                    continue
                times = []
                for _ in range(calls):
                    restore()
                    start = time.perf_counter()
                    run(active)
                    times.append(time.perf_counter() - start)
                costs[(name, r)] = sorted(times)[len(times) // 2]
    dec.exit_policy, dec.beam_rows = None, 1
    print(f"\n== one call of decoder block {block} of {dec.num_layers} with deferred keys/values (lean step) against "
          f"the rows that run it ({bsz} rows, {cache_len} positions of which {skipped} skipped by every row, a beam "
          f"reordering pending; median of {calls} calls, ms)")
    print(f"{'rows':>6} {'every row catches up':>21} {'straggler path':>15} {'ratio':>6} {'straggler vs 320':>17}")
    full = costs[("every row catches up", ROWS[-1])]
    for r in ROWS:
        before, after = costs[("every row catches up", r)], costs.get(("straggler path", r))
        cells = (f"{1e3 * after:15.3f} {after / before:6.2f} {after / full:17.2f}" if after is not None
                 else f"{'(all rows)':>15} {'':>6} {'':>17}")
        print(f"{r:6d} {1e3 * before:21.3f} {cells}")
    return costs


def random_model_report(args):
    model, d = random_model(args.vocab, SHAPES[args.shape])
    batches = random_batches(d, args.batches, args.batch_size, args.src_len)
    if args.only == "ops":
        return op_breakdown(model, d, batches, args)
    if args.only != "blocks":
        generation_speed(model, d, batches, args)
    if args.only != "speed":
        block_call_costs(model, d, args)
        deferred_call_costs(model, d, args)


# ---- where the remaining time goes: torch.profiler, operators by kind ------------------------------

#: operator kinds, by the aten name of the operator whose *self* time is counted (no double counting of
#: nested calls): the first kind whose prefix matches wins
OP_KINDS = (
    ("matrix products (linear layers, output projection)", ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")),
    ("attention kernels", ("aten::_scaled_dot_product", "aten::_softmax", "aten::softmax")),
    ("log_softmax over the vocabulary", ("aten::_log_softmax",)),
    ("layer norm, activation, residual adds", ("aten::native_layer_norm", "aten::relu", "aten::add", "aten::gelu")),
    ("beam search selection (topk, sort, div, fmod)", ("aten::topk", "aten::sort", "aten::div", "aten::fmod",
                                                      "aten::remainder", "aten::floor_divide")),
    ("copies, concatenation, indexing", ("aten::copy_", "aten::cat", "aten::index", "aten::gather", "aten::scatter",
                                         "aten::masked", "aten::where", "aten::clone", "aten::_index_put",
                                         "aten::index_put", "aten::fill_", "aten::zero_")),
)


def op_kind(name: str) -> str:
    for kind, prefixes in OP_KINDS:
        if name.startswith(prefixes):
            return kind
    return "other operators"


def op_breakdown(model, d, batches, args):
    """One pass of fairseq's SequenceGenerator and of ours (lean step) at full depth under torch.profiler:
    the self time of the operators by kind, and the rest of the wall time (Python: fairseq's beam search
    bookkeeping, module calls, our step's control flow), so the remaining gap to a faster generator is
    measured, not guessed."""
    from torch.profiler import ProfilerActivity, profile

    search = {"beam_size": args.beam, "max_len_a": 0, "max_len_b": args.tgt_len, "min_len": args.tgt_len}
    generators = [("fairseq", SequenceGenerator([model], d, **search)),
                  ("ours (lean)", AdaptiveSequenceGenerator([model], d, **search))]
    columns = {}
    with torch.no_grad():
        for name, gen in generators:
            gen.generate([model], batches[0])  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for batch in batches:
                    gen.generate([model], batch)
                wall = time.perf_counter() - start
            kinds = {}
            for event in prof.key_averages():
                kinds[op_kind(event.key)] = kinds.get(op_kind(event.key), 0.0) + event.self_cpu_time_total / 1e6
            kinds["outside operators (Python)"] = wall - sum(kinds.values())
            columns[name] = (wall, kinds)
    print(f"\n== torch.profiler, full depth: {len(batches)} batches x {args.batch_size} sentences, beam {args.beam}, "
          f"{args.tgt_len} steps, {torch.get_num_threads()} threads (profiled wall time; the profiler adds overhead)")
    names = [name for name, _ in generators]
    print(f"{'kind':52} " + " ".join(f"{n + ' s':>14} {'share':>6}" for n in names) + f" {'ours/fairseq':>12}")
    order = [kind for kind, _ in OP_KINDS] + ["other operators", "outside operators (Python)"]
    for kind in order:
        cells = [columns[n][1].get(kind, 0.0) for n in names]
        print(f"{kind:52} " + " ".join(f"{c:14.3f} {c / columns[n][0]:6.1%}" for c, n in zip(cells, names))
              + f" {cells[1] / cells[0] if cells[0] else float('nan'):12.2f}")
    walls = [columns[n][0] for n in names]
    print(f"{'total (wall)':52} " + " ".join(f"{w:14.3f} {1:6.1%}" for w in walls) + f" {walls[1] / walls[0]:12.2f}")


# ---- a checkpoint on real batches ----------------------------------------------------------------


def timed_pass(gen, model, batches) -> float:
    """Seconds for one generator to decode every batch (no gradients)."""
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            gen.generate([model], batch)
    return time.perf_counter() - start


def checkpoint_report(args):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides={"data": args.data})
    model = models[0].eval()
    task.load_dataset(args.subset)
    if args.max_sentences:  # the sentences generation_speed.py --max-sentences decodes
        from fairseq_dat.cli.generate_like import generate_batches
        batches = generate_batches(task, [model], task.dataset(args.subset), args.batch_size, first_n=args.max_sentences)
    else:
        itr = task.get_batch_iterator(task.dataset(args.subset), max_sentences=args.batch_size,
                                      max_positions=utils.resolve_max_positions(task.max_positions(),
                                                                                model.max_positions()),
                                      ).next_epoch_itr(shuffle=False)
        batches = [b for _, b in zip(range(args.batches), itr)] if args.batches > 0 else list(itr)
    d = task.target_dictionary
    if args.compare:
        return compare_hypotheses(model, d, batches, args)
    if args.steps:
        return step_report(model, d, batches, args)
    stock = SequenceGenerator([model], d, beam_size=args.beam)
    ours = AdaptiveSequenceGenerator([model], d, beam_size=args.beam, exit_strategy=args.exit_strategy,
                                     exit_threshold=args.exit_threshold, fixed_exit=args.fixed_exit,
                                     exit_kv=args.exit_kv, decoder_step=args.decoder_step)

    def run(gen):
        return timed_pass(gen, model, batches)

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


def compare_hypotheses(model, d, batches, args):
    """Token ids of every hypothesis (all beams) equal, and the largest score difference."""
    def decode(gen):
        with torch.no_grad():
            return [hypo for b in batches for hypo in gen.generate([model], b)]

    exit_flags = {"exit_strategy": args.exit_strategy, "exit_threshold": args.exit_threshold,
                  "fixed_exit": args.fixed_exit, "exit_kv": args.exit_kv}
    full = decode(SequenceGenerator([model], d, beam_size=args.beam))
    runs = [("fairseq SequenceGenerator", "ours, --decoder-step " + step, full,
             decode(AdaptiveSequenceGenerator([model], d, beam_size=args.beam, decoder_step=step)))
            for step in ("fairseq", "lean")]
    if any(v is not None and v != "auto" for v in exit_flags.values()):
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in exit_flags.items() if v is not None)
        fairseq_layers, lean = (decode(AdaptiveSequenceGenerator([model], d, beam_size=args.beam, decoder_step=step,
                                                                 **exit_flags)) for step in ("fairseq", "lean"))
        runs.append((f"{flags}, --decoder-step fairseq", "--decoder-step lean", fairseq_layers, lean))
    for name_a, name_b, a, b in runs:
        sentences = len(a)
        same = sum(all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(ha, hb)) and len(ha) == len(hb)
                   for ha, hb in zip(a, b))
        diff = max(float((x["positional_scores"] - y["positional_scores"]).abs().max())
                   for ha, hb in zip(a, b) for x, y in zip(ha, hb) if torch.equal(x["tokens"], y["tokens"]))
        exits = ""
        if "exits" in a[0][0] and "exits" in b[0][0]:
            exits = f", exits equal in {sum(torch.equal(ha[0]['exits'], hb[0]['exits']) for ha, hb in zip(a, b))}"
        print(f"{name_a} vs {name_b}: {same}/{sentences} sentences with every beam hypothesis's tokens equal"
              f"{exits}; largest positional score difference {diff:.2e}")


# ---- token-level exits step by step (--steps) ---------------------------------------------------------


def lockstep_bound(steps, per_step: float = 0.0, per_block: float = 1.0):
    """steps: (deepest exit, mean exit, rows) per decoding step → (row-mean exit, mean deepest exit per step,
    share of steps with a row past block 1, bound). A lockstep step costs ``per_step`` (what does not depend on
    depth: beam search, embeddings, the output projection) plus ``per_block`` for every block its deepest row
    needs, when a block call costs the same whatever number of rows runs it; an ideal step pays blocks for the
    row mean. bound = (per_step + per_block · mean) / (per_step + per_block · deepest), averaged over steps; with
    the defaults (no per-step cost) mean / deepest, the bound on the blocks' share of the time."""
    rows = sum(r for _, _, r in steps)
    mean = sum(m * r for _, m, r in steps) / rows
    deepest = sum(d for d, _, _ in steps) / len(steps)
    bound = (per_step + per_block * mean) / (per_step + per_block * deepest)
    return mean, deepest, sum(d > 1 for d, _, _ in steps) / len(steps), bound


@contextlib.contextmanager
def wrapped_methods(targets, wrapper):
    """Each (owner class, method name) of ``targets`` replaced by ``wrapper(fn, "Owner.name")`` while the block
    runs; restored after."""
    saved = [(owner, name, vars(owner)[name]) for owner, name in targets]
    for owner, name, fn in saved:
        setattr(owner, name, functools.wraps(fn)(wrapper(fn, f"{owner.__name__}.{name}")))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def timed_methods(targets, totals: collections.Counter, counts: collections.Counter):
    """Wall time and calls of each (owner class, method name) while the block runs."""
    def timing(fn, label):
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[label] += time.perf_counter() - start
                counts[label] += 1
        return timed
    return wrapped_methods(targets, timing)


def labelled_methods(targets):
    """Each (owner class, method name) runs inside ``torch.profiler.record_function("Owner.name")``."""
    def labelling(fn, label):
        def labelled(*a, **k):
            with torch.profiler.record_function(label):
                return fn(*a, **k)
        return labelled
    return wrapped_methods(targets, labelling)


def operators_per_call(decode, targets) -> Dict[str, float]:
    """Mean number of top-level ATen operators (not counting those called inside another) per call of
    each method of ``targets`` during one ``decode()`` under torch.profiler: the dispatch count a call pays."""
    with torch.no_grad(), labelled_methods(targets), torch.profiler.profile() as prof:
        decode()
    events = prof.events()
    ops = sorted((e for e in events if e.name.startswith("aten::")), key=lambda e: e.time_range.start)
    result, calls = collections.Counter(), collections.Counter()
    for label in (e for e in events if e.name in {f"{o.__name__}.{n}" for o, n in targets}):
        start, end = label.time_range.start, label.time_range.end
        covered = -1
        for op in ops:
            if op.thread != label.thread or op.time_range.start < start or op.time_range.end > end:
                continue
            if op.time_range.start >= covered:  # not inside the previous top-level operator
                result[label.name] += 1
                covered = op.time_range.end
        calls[label.name] += 1
    return {name: result[name] / calls[name] for name in calls}


def step_report(model, d, batches, args):
    from fairseq_dat import exit_policy
    from fairseq_dat.modules.exit_aware_decoding import ExitAwareDecoding, LeanBlockCache

    def run(gen):
        return timed_pass(gen, model, batches)

    def generator(**flags):
        return AdaptiveSequenceGenerator([model], d, beam_size=args.beam, exit_kv=args.exit_kv,
                                         decoder_step=args.decoder_step, exit_strategy=args.exit_strategy, **flags)

    fixed, deepest_exit = generator(fixed_exit=1), model.decoder.num_layers
    full = generator(fixed_exit=deepest_exit)
    run(fixed), run(fixed), run(full)  # warm-up: the first passes of a process are slower
    t_fixed = min(run(fixed) for _ in range(args.repeats))
    t_full = min(run(full) for _ in range(args.repeats))
    # per pass: what a block adds (exit N against exit 1) and what the step costs without its blocks
    per_block = (t_full - t_fixed) / (deepest_exit - 1)
    per_step = t_fixed - per_block
    print(f"{len(batches)} batches of {args.batch_size} x beam {args.beam}: --fixed-exit 1 {t_fixed * 1000:.0f} ms, "
          f"--fixed-exit {deepest_exit} {t_full * 1000:.0f} ms: a block {per_block * 1000:.0f} ms per pass, the rest "
          f"of a step {per_step * 1000:.0f} ms")
    steps = []

    def counting(fn, label):  # each step's (deepest exit, mean exit, rows), as the step records its exits
        def counted(self, incremental_state, step_exits, final_states=None):
            steps.append((int(step_exits.max()), float(step_exits.float().mean()), step_exits.numel()))
            return fn(self, incremental_state, step_exits, final_states)
        return counted

    halts = [(c, "halt") for c in vars(exit_policy).values() if isinstance(c, type) and "halt" in vars(c)]
    pieces = [(ExitAwareDecoding, "lean_straggler_block"), (LeanBlockCache, "row_history"),
              (LeanBlockCache, "keep_row_history"), (ExitAwareDecoding, "step_logits"), *halts]
    for threshold in (args.exit_threshold or "").split(","):
        gen = generator(exit_threshold=float(threshold))
        run(gen)
        t_run = min(run(gen) for _ in range(args.repeats))
        steps.clear()
        totals, counts = collections.Counter(), collections.Counter()
        with timed_methods(pieces, totals, counts), wrapped_methods([(ExitAwareDecoding, "record_step_exits")],
                                                                    counting):
            t_timed = run(gen)
        mean, deepest, straggling, blocks_bound = lockstep_bound(steps)
        whole_bound = lockstep_bound(steps, per_step, per_block)[3]
        print(f"tau {threshold}: {t_run * 1000:.0f} ms ({t_run / t_fixed:.2f}x --fixed-exit 1); {len(steps)} steps, "
              f"row-mean exit {mean:.2f}, deepest exit per step {deepest:.2f}, steps with a row past block 1 "
              f"{100 * straggling:.0f}%; lockstep bound, blocks only (mean/deepest) {blocks_bound:.2f}, whole step "
              f"{whole_bound:.2f}")
        ops = operators_per_call(lambda: gen.generate([model], batches[0]), pieces[:3])
        for label in sorted(totals):
            per_call = f"; {ops[label]:.0f} operators per call (batch 1 of the pass)" if label in ops else ""
            print(f"    {label}: {totals[label] * 1000:.1f} ms in {counts[label]} calls "
                  f"({totals[label] / counts[label] * 1e6:.0f} us/call; {totals[label] / t_timed:.0%} of this pass"
                  f"{per_call})")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.random_model:
        random_model_report(args)
    else:
        checkpoint_report(args)


if __name__ == "__main__":
    main()
