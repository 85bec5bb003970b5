#!/usr/bin/env python
"""Training step time of multi-exit training against single-exit training, in one process.

One adaptive_transformer (default: 6+6 blocks, width 256, FFN 1024, 4 heads, one separate exit
classifier per decoder block, as in the issue) takes forward+backward steps on the same training
batches under each criterion:

- ``single exit``   fairseq's ``label_smoothed_cross_entropy`` on the same model (last exit only);
- ``aligned``       ``adaptive_label_smoothed_cross_entropy``, all N exits from one forward (§2.2);
- ``mixed M=…``     the same criterion with ``--exit-training mixed --mixed-samples M``;
- ``aligned, fused CE`` (experiment, not in the package) the aligned loss with each exit's
  label-smoothed loss computed by ``F.cross_entropy(label_smoothing=…)`` on the logits, which is the
  same number as fairseq's ``label_smoothed_nll_loss`` on log-probabilities (checked here) without
  materializing the log-probabilities;
- ``aligned, stacked heads`` (experiment) the same with all exits' logits from one ``torch.bmm``.

Step times are medians over ``--repeats`` interleaved passes of ``--steps`` steps (dropout seeded
per step, gradients zeroed before each step, no optimizer update). A second table times the exit
heads alone (projection + loss, forward and backward, on fixed decoder states) to show how much of
the difference is the vocabulary projections.
"""
import argparse
import logging
import os
import platform
import shlex
import statistics
import time
from typing import Callable, Dict, List, Tuple

import fairseq_dat  # noqa: F401  (first: registers the plugin)
import torch
import torch.nn.functional as F
from fairseq import options, tasks, utils
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

from fairseq_dat.criterions.adaptive_label_smoothed_cross_entropy import AdaptiveLabelSmoothedCrossEntropyCriterion

DEFAULT_ARCH_ARGS = ("--encoder-layers 6 --decoder-layers 6 --encoder-embed-dim 256 --decoder-embed-dim 256 "
                     "--encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 --encoder-attention-heads 4 "
                     "--decoder-attention-heads 4 --dropout 0.1")
LABEL_SMOOTHING = 0.1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="fairseq data-bin directory (e.g. data-bin/multi30k_de_en)")
    parser.add_argument("--steps", type=int, default=5, help="training batches per timed pass (default: 5)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes per criterion; median reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (default: 4096)")
    parser.add_argument("--subset", default="train", help="split the batches come from (default: train)")
    parser.add_argument("--arch-args", default=DEFAULT_ARCH_ARGS,
                        help=f"adaptive_transformer model flags (default: {DEFAULT_ARCH_ARGS!r})")
    parser.add_argument("--mixed-samples", default="1,3,6", help="M values of mixed training (default: 1,3,6)")
    parser.add_argument("--no-experiments", action="store_true",
                        help="skip the fused-CE and stacked-heads experiment rows")
    return parser.parse_args(argv)


def machine_description(threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}; {os.cpu_count()} logical CPUs, {threads} threads; torch {torch.__version__}"


# ---- the model and its batches ------------------------------------------------------------------


def build_task_and_model(args):
    parser = options.get_training_parser()
    argv = [args.data, "--task", "adaptive_translation", "--arch", "adaptive_transformer", "--cpu",
            "--criterion", "adaptive_label_smoothed_cross_entropy", "--label-smoothing", str(LABEL_SMOOTHING),
            "--max-tokens", str(args.max_tokens), *shlex.split(args.arch_args)]
    model_args = options.parse_args_and_arch(parser, argv)
    task = tasks.setup_task(model_args)
    task.load_dataset(args.subset)
    model = task.build_model(model_args)
    return task, model


def load_batches(task, model, subset: str, max_tokens: int, steps: int) -> List[dict]:
    """The first ``steps`` training batches of epoch 1 (fairseq's shuffled order, seed 1)."""
    itr = task.get_batch_iterator(
        dataset=task.dataset(subset), max_tokens=max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True, seed=1, disable_iterator_cache=True,
    ).next_epoch_itr(shuffle=True)
    batches = []
    for batch in itr:
        batches.append(batch)
        if len(batches) == steps:
            break
    return batches


# ---- criteria -----------------------------------------------------------------------------------


class FusedCrossEntropyAligned(AdaptiveLabelSmoothedCrossEntropyCriterion):
    """Aligned training with each exit's loss from ``F.cross_entropy`` on the logits.

    fairseq's loss (1 − ε − ε/(V−1))·nll + ε/(V−1)·Σ_v(−log p_v) is torch's label smoothing
    (1 − ε')·nll + ε'/V·Σ_v(−log p_v) with ε' = ε·V/(V−1). The nll for logging is computed without
    gradient. Only valid without a depth estimator (the oracle needs the log-probabilities)."""

    def exit_lprobs(self, decoder, states, n):
        return decoder.exit_logits(states, n)  # logits: the loss below normalizes them itself

    def smoothed_loss(self, logits, target):
        logits, target = logits.view(-1, logits.size(-1)), target.reshape(-1)
        vocab = logits.size(-1)
        loss = F.cross_entropy(logits, target, ignore_index=self.padding_idx, reduction="sum",
                               label_smoothing=self.eps * vocab / (vocab - 1))
        with torch.no_grad():
            keep = target.ne(self.padding_idx)
            nll = (torch.logsumexp(logits[keep], dim=-1) - logits[keep].gather(1, target[keep, None]).squeeze(1)).sum()
        return loss, nll


class StackedHeadsAligned(FusedCrossEntropyAligned):
    """Aligned training with every exit's logits from one batched matmul and one fused loss."""

    def aligned_loss(self, model, sample, target, weights):
        decoder = model.decoder
        net_input = sample["net_input"]
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        _, extra = decoder(net_input["prev_output_tokens"], encoder_out=encoder_out, features_only=True)
        n = decoder.num_layers
        feats = torch.stack([decoder.exit_features(s, i).reshape(-1, s.size(-1))
                             for i, s in enumerate(extra["exit_states"], start=1)])  # N x BT x C
        heads = torch.stack([decoder.exit_projection(i).weight for i in range(1, n + 1)])  # N x V x C
        logits = torch.bmm(feats, heads.transpose(1, 2))  # N x BT x V
        scale = torch.tensor(weights, dtype=logits.dtype).repeat_interleave(feats.size(1)) / sum(weights)
        flat = logits.reshape(-1, logits.size(-1))
        tgt = target.reshape(-1).repeat(n)
        vocab = flat.size(-1)
        per_row = F.cross_entropy(flat, tgt, ignore_index=self.padding_idx, reduction="none",
                                  label_smoothing=self.eps * vocab / (vocab - 1))
        loss = (per_row * scale).sum()
        with torch.no_grad():
            keep = tgt.ne(self.padding_idx)
            nll = ((torch.logsumexp(flat[keep], -1) - flat[keep].gather(1, tgt[keep, None]).squeeze(1))
                   * scale[keep]).sum()
        return loss, nll, {}


def criteria(task, mixed_samples: List[int], experiments: bool) -> Dict[str, object]:
    out = {"single exit": LabelSmoothedCrossEntropyCriterion(task, False, LABEL_SMOOTHING),
           "aligned": AdaptiveLabelSmoothedCrossEntropyCriterion(task, False, LABEL_SMOOTHING)}
    for m in mixed_samples:
        out[f"mixed M={m}"] = AdaptiveLabelSmoothedCrossEntropyCriterion(
            task, False, LABEL_SMOOTHING, exit_training="mixed", mixed_samples=m)
    if experiments:
        out["aligned, fused CE"] = FusedCrossEntropyAligned(task, False, LABEL_SMOOTHING)
        out["aligned, stacked heads"] = StackedHeadsAligned(task, False, LABEL_SMOOTHING)
    return out


def check_same_loss(model, batch, reference, candidates: Dict[str, object]):
    """The experiments compute the aligned loss exactly (up to float rounding): say so, or warn."""
    model.eval()
    with torch.no_grad():
        ref, _, _ = reference(model, batch)
        for name, criterion in candidates.items():
            loss, _, _ = criterion(model, batch)
            rel = abs(float(loss) - float(ref)) / abs(float(ref))
            print(f"loss check: {name} = {float(loss):.4f} vs aligned {float(ref):.4f} (rel. diff {rel:.1e})"
                  + ("" if rel < 1e-4 else "  WARNING: differs"))
    model.train()


# ---- timing -------------------------------------------------------------------------------------


def train_steps(model, criterion, batches) -> float:
    """Seconds for forward+backward over ``batches`` (dropout reseeded per step)."""
    elapsed = 0.0
    for i, batch in enumerate(batches):
        torch.manual_seed(i)
        model.zero_grad(set_to_none=True)
        begin = time.perf_counter()
        loss, _, _ = criterion(model, batch)
        loss.backward()
        elapsed += time.perf_counter() - begin
    return elapsed


def interleaved_medians(named: Dict[str, Callable[[], float]], repeats: int) -> Dict[str, float]:
    """Warm each up once, then ``repeats`` passes in alternating order; median seconds per name."""
    for fn in named.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in named}
    names = list(named)
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            times[name].append(named[name]())
    return {name: statistics.median(t) for name, t in times.items()}


def head_costs(model, criterion, batch) -> Tuple[Callable, Callable]:
    """Projection + loss only (forward and backward) on fixed decoder states: last exit vs all N."""
    decoder = model.decoder
    with torch.no_grad():
        enc = model.encoder(batch["net_input"]["src_tokens"], src_lengths=batch["net_input"]["src_lengths"])
        _, extra = decoder(batch["net_input"]["prev_output_tokens"], encoder_out=enc, features_only=True)
    states = [s.detach().requires_grad_(True) for s in extra["exit_states"]]
    target = batch["target"]
    n = decoder.num_layers

    def heads(exits: List[int], criterion) -> Callable[[], float]:
        def run():
            model.zero_grad(set_to_none=True)
            begin = time.perf_counter()
            loss = sum(criterion.smoothed_loss(criterion.exit_lprobs(decoder, states[i - 1], i), target)[0]
                       for i in exits) / len(exits)
            loss.backward()
            return time.perf_counter() - begin
        return run

    return heads([n], criterion), heads(list(range(1, n + 1)), criterion)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, force=True)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine_description(args.threads)}")
    load = os.getloadavg()
    print(f"load average before start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    task, model = build_task_and_model(args)
    model.train()
    batches = load_batches(task, model, args.subset, args.max_tokens, args.steps)
    ntokens = sum(b["ntokens"] for b in batches)
    dec = model.decoder
    params = sum(p.numel() for p in model.parameters())
    print(f"model: adaptive_transformer {args.arch_args}; {params / 1e6:.1f}M parameters; decoder N={dec.num_layers} "
          f"width {dec.embed_dim}; vocabulary {len(task.target_dictionary)}; exit classifiers {dec.exit_classifiers}")
    print(f"batches: {len(batches)} x up to {args.max_tokens} tokens ({ntokens} target tokens); "
          f"{args.repeats} interleaved passes")

    crits = criteria(task, [int(m) for m in args.mixed_samples.split(",") if m.strip()], not args.no_experiments)
    experiments = {k: v for k, v in crits.items() if k.startswith("aligned, ")}
    if experiments:
        check_same_loss(model, batches[0], crits["aligned"], experiments)

    medians = interleaved_medians({name: (lambda c=c: train_steps(model, c, batches)) for name, c in crits.items()},
                                  args.repeats)
    base = medians["single exit"]
    print("\n| criterion | ms/step | target tokens/s | ratio to single exit |\n|---|---:|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {1000 * seconds / len(batches):.0f} | {ntokens / seconds:.0f} | {seconds / base:.3f} |")

    last_head, all_heads = head_costs(model, crits["aligned"], batches[0])
    head_fns = {"last exit head": last_head, f"all {dec.num_layers} exit heads": all_heads}
    if "aligned, fused CE" in crits:
        fused_last, fused_all = head_costs(model, crits["aligned, fused CE"], batches[0])
        head_fns["last exit head, fused CE"] = fused_last
        head_fns[f"all {dec.num_layers} exit heads, fused CE"] = fused_all
    heads = interleaved_medians(head_fns, max(args.repeats, 3))
    step_one = medians["aligned"] / len(batches)
    print(f"\nexit heads alone (projection + label-smoothed loss, forward+backward) on the first batch "
          f"({batches[0]['ntokens']} target tokens):\n| heads | ms |\n|---|---:|")
    for name, seconds in heads.items():
        print(f"| {name} | {1000 * seconds:.0f} |")
    print(f"(the aligned step averages {1000 * step_one:.0f} ms/step over all batches)")
    ratio = medians["aligned"] / base
    print(f"\nRESULT aligned_ratio={ratio:.4f} " + " ".join(
        f"{name.replace(' ', '_').replace('=', '')}_ratio={medians[name] / base:.4f}"
        for name in medians if name.startswith("mixed")))


if __name__ == "__main__":
    main()
