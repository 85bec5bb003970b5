#!/usr/bin/env python
"""Training step time of multi-exit training against single-exit training, in one process.

One adaptive_transformer (default: 6+6 blocks, width 256, FFN 1024, 4 heads, one separate exit
classifier per decoder block, as in the issue) takes forward+backward steps on the same training
batches under each criterion:

- ``single exit``   fairseq's ``label_smoothed_cross_entropy`` on the same model (last exit only);
- ``aligned``       ``adaptive_label_smoothed_cross_entropy``, all N exits from one forward (§2.2);
- ``mixed M=…``     the same criterion with ``--exit-training mixed --mixed-samples M``;
- ``aligned, --autocast-bf16`` (with ``--autocast-bf16``) the aligned step's forward pass under the task's
  bfloat16 autocast (RESULT ``bf16_ratio`` = aligned time / this row's time);
- ``aligned, stacked heads`` (experiment, not in the package) all exits' logits from one
  ``torch.bmm`` and one loss call;
- ``aligned, fused linear+CE`` (experiment) each exit's projection and label-smoothed loss in one
  autograd function that computes the gradients chunk by chunk during the forward pass, so no
  tokens x vocabulary tensor is kept (the loss and gradients are checked against ``aligned``).

Step times are medians over ``--repeats`` interleaved passes of ``--steps`` steps (dropout seeded
per step, gradients zeroed before each step, then an Adam step with lr 0 unless --no-optimizer). A second table times the exit
heads alone (projection + loss, forward and backward, on fixed decoder states) to show how much of
the difference is the vocabulary projections.
"""
import argparse
import os
import platform
import shlex
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import fairseq_dat  # noqa: F401  (first: registers the plugin)
import torch
import torch.nn.functional as F
from fairseq import options, tasks, utils
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

from fairseq_dat.cli import quiet_root_logger
from fairseq_dat.criterions.adaptive_label_smoothed_cross_entropy import AdaptiveLabelSmoothedCrossEntropyCriterion
from fairseq_dat.modules.fused_exit_loss import fused_exit_loss
from fairseq_dat.precision import under_bf16_autocast

DEFAULT_ARCH = "adaptive_transformer_iwslt_de_en"
# the reduced reproduction's shape: 6+6 blocks, width 256 (encoder and decoder), FFN 1024, 4 heads
DEFAULT_ARCH_ARGS = "--encoder-embed-dim 256 --encoder-ffn-embed-dim 1024"
LABEL_SMOOTHING = 0.1
BF16_ROW = "aligned, --autocast-bf16"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="fairseq data-bin directory (e.g. data-bin/multi30k_de_en)")
    parser.add_argument("--steps", type=int, default=5, help="training batches per timed pass (default: 5)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes per criterion; median reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (default: 4096)")
    parser.add_argument("--subset", default="train", help="split the batches come from (default: train)")
    parser.add_argument("--arch", default=DEFAULT_ARCH, help=f"adaptive_transformer variant (default: {DEFAULT_ARCH})")
    parser.add_argument("--arch-args", default=DEFAULT_ARCH_ARGS,
                        help=f"adaptive_transformer model flags (default: {DEFAULT_ARCH_ARGS!r})")
    parser.add_argument("--mixed-samples", default="1,3,6", help="M values of mixed training (default: 1,3,6)")
    parser.add_argument("--no-experiments", action="store_true",
                        help="skip the fused-CE and stacked-heads experiment rows")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="time forward+backward only (default: forward+backward+Adam step)")
    parser.add_argument("--autocast-bf16", action="store_true",
                        help="add the row 'aligned, --autocast-bf16' (the aligned criterion under the task's bfloat16 "
                             "autocast, as fairseq-train --autocast-bf16 runs it) and bf16_ratio on RESULT")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile aligned and single-exit steps with torch.profiler")
    return parser.parse_args(argv)


def machine_description(threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
        isa = [x for x in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if x in flags]
        if isa:
            cpu += f" ({', '.join(isa)})"
    except (OSError, StopIteration):
        pass
    return (f"{cpu}; {os.cpu_count()} logical CPUs, {threads} threads (torch.get_num_threads()={torch.get_num_threads()}); "
            f"torch {torch.__version__}")


# ---- the model and its batches ------------------------------------------------------------------


def build_task_and_model(args):
    parser = options.get_training_parser()
    argv = [args.data, "--task", "adaptive_translation", "--arch", args.arch, "--cpu",
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


def label_smoothed_loss_from_logits(logits, target, eps: float, pad: int):
    """fairseq's ``label_smoothed_nll_loss`` (summed) from logits with ``F.cross_entropy``:
    (1 − ε − ε/(V−1))·nll + ε/(V−1)·Σ_v(−log p_v) is torch's label smoothing with ε' = ε·V/(V−1).
    Returns (loss, nll); the nll (for logging) carries no gradient."""
    vocab = logits.size(-1)
    loss = F.cross_entropy(logits, target, ignore_index=pad, reduction="sum", label_smoothing=eps * vocab / (vocab - 1))
    with torch.no_grad():
        keep = target.ne(pad)
        nll = (torch.logsumexp(logits[keep], -1) - logits[keep].gather(1, target[keep, None]).squeeze(1)).sum()
    return loss, nll


class StackedHeadsAligned(AdaptiveLabelSmoothedCrossEntropyCriterion):
    """Aligned training with every exit's logits from one batched matmul and one loss call."""

    def aligned_loss(self, model, sample, target, weights):
        decoder, net_input = model.decoder, sample["net_input"]
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        _, extra = decoder(net_input["prev_output_tokens"], encoder_out=encoder_out, features_only=True)
        n = decoder.num_layers
        feats = torch.stack([decoder.exit_features(s, i).reshape(-1, s.size(-1))
                             for i, s in enumerate(extra["exit_states"], start=1)])  # N x BT x C
        heads = torch.stack([decoder.exit_projection(i).weight for i in range(1, n + 1)])  # N x V x C
        logits = torch.bmm(feats, heads.transpose(1, 2))  # N x BT x V
        w = torch.tensor(weights, dtype=logits.dtype) / sum(weights)
        vocab = logits.size(-1)
        per_row = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1).repeat(n), reduction="none",
                                  ignore_index=self.padding_idx, label_smoothing=self.eps * vocab / (vocab - 1))
        loss = (per_row.view(n, -1).sum(1) * w).sum()
        with torch.no_grad():
            nll = sum(w[i] * label_smoothed_loss_from_logits(logits[i], target.reshape(-1), self.eps,
                                                              self.padding_idx)[1] for i in range(n))
        return loss, nll, {}


class CrossEntropyAligned(AdaptiveLabelSmoothedCrossEntropyCriterion):
    """Aligned training as the package does it, but each exit's loss from ``F.cross_entropy`` on the
    logits (torch's label smoothing, ε' = ε·V/(V−1)) instead of log_softmax → gather/sum
    (``label_smoothed_nll_loss``), whose backward materializes a zero-filled tokens x V gradient for
    the gather and adds it to the sum's: the candidate one-function change to the criterion."""

    def aligned_loss(self, model, sample, target, weights):
        decoder, net_input = model.decoder, sample["net_input"]
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        _, extra = decoder(net_input["prev_output_tokens"], encoder_out=encoder_out, features_only=True)
        total_w, t = sum(weights), target.reshape(-1)
        loss = nll_loss = 0.0
        for n, (state, w) in enumerate(zip(extra["exit_states"], weights), start=1):
            logits = decoder.exit_logits(state, n)
            logits = logits.reshape(-1, logits.size(-1))
            vocab = logits.size(-1)
            loss_n = F.cross_entropy(logits, t, ignore_index=self.padding_idx, reduction="sum",
                                     label_smoothing=self.eps * vocab / (vocab - 1))
            with torch.no_grad():  # nll for logging: one logsumexp pass, no tokens x V copy
                keep = t.ne(self.padding_idx)
                nll_n = ((torch.logsumexp(logits, -1) - logits.gather(1, t[:, None]).squeeze(1)) * keep).sum()
            loss = loss + (w / total_w) * loss_n
            nll_loss = nll_loss + (w / total_w) * nll_n
        return loss, nll_loss, {}


@dataclass
class TimedCriterion:
    """A row of the table: its criterion, whether it computes the aligned loss another way (checked
    against ``aligned`` before timing), and M for mixed training (its ``mixed_M<M>_ratio`` on RESULT)."""

    name: str
    criterion: object
    aligned_variant: bool = False
    mixed_samples: Optional[int] = None


def criteria(task, mixed_samples: List[int], experiments: bool, autocast: bool = False) -> List[TimedCriterion]:
    out = [TimedCriterion("single exit", LabelSmoothedCrossEntropyCriterion(task, False, LABEL_SMOOTHING)),
           TimedCriterion("aligned", AdaptiveLabelSmoothedCrossEntropyCriterion(task, False, LABEL_SMOOTHING)),
           TimedCriterion("aligned, --exit-loss-impl autograd", AdaptiveLabelSmoothedCrossEntropyCriterion(
               task, False, LABEL_SMOOTHING, exit_loss_impl="autograd"), aligned_variant=True)]
    for m in mixed_samples:
        out.append(TimedCriterion(f"mixed M={m}", AdaptiveLabelSmoothedCrossEntropyCriterion(
            task, False, LABEL_SMOOTHING, exit_training="mixed", mixed_samples=m), mixed_samples=m))
    if experiments:
        out += [TimedCriterion("aligned, stacked heads", StackedHeadsAligned(task, False, LABEL_SMOOTHING), True),
                TimedCriterion("aligned, F.cross_entropy", CrossEntropyAligned(task, False, LABEL_SMOOTHING), True)]
    if autocast:
        out.append(TimedCriterion(BF16_ROW, under_bf16_autocast(AdaptiveLabelSmoothedCrossEntropyCriterion(
            task, False, LABEL_SMOOTHING))))
    return out


def check_same_loss(model, batch, reference, candidates: Dict[str, object]):
    """The experiments compute the aligned loss and its gradients (dropout off): say so, or warn."""
    model.eval()

    def loss_and_grads(criterion):
        model.zero_grad(set_to_none=True)
        loss, _, _ = criterion(model, batch)
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads(reference)
    for name, criterion in candidates.items():
        loss, grads = loss_and_grads(criterion)
        rel = abs(loss - ref_loss) / abs(ref_loss)
        # relative to the whole gradient: some gradients are exactly zero in theory (attention key
        # biases) and pure rounding noise in practice, so a per-parameter ratio is meaningless for them
        diff = sum(float((grads[k] - g).norm()) ** 2 for k, g in ref_grads.items()) ** 0.5
        grad_rel = diff / sum(float(g.norm()) ** 2 for g in ref_grads.values()) ** 0.5
        ok = rel < 1e-4 and grad_rel < 1e-3 and grads.keys() == ref_grads.keys()
        print(f"check: {name}: loss {loss:.4f} vs aligned {ref_loss:.4f} (rel. diff {rel:.1e}), "
              f"gradient rel. diff {grad_rel:.1e}" + ("" if ok else "  WARNING: differs"))
    model.zero_grad(set_to_none=True)
    model.train()


# ---- timing -------------------------------------------------------------------------------------


def make_optimizer(model):
    """Adam as fairseq's translation recipes use it, with lr 0: the step does all its arithmetic
    (moments, bias correction, the parameter update) but leaves the weights unchanged, so every
    criterion is timed on the same model. Parameters without a gradient (the exit classifiers
    1..N-1 under single-exit training) are skipped, as they would not exist in a single-exit model."""
    return torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-8, foreach=False)


def train_steps(model, criterion, batches, optimizer=None) -> float:
    """Seconds for forward+backward(+optimizer step) over ``batches`` (dropout reseeded per step)."""
    elapsed = 0.0
    for i, batch in enumerate(batches):
        torch.manual_seed(i)
        model.zero_grad(set_to_none=True)
        begin = time.perf_counter()
        loss, _, _ = criterion(model, batch)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        elapsed += time.perf_counter() - begin
    return elapsed


def interleaved_medians(named: Dict[str, Callable[..., float]], repeats: int,
                        warmups: Dict[str, Callable[[], float]] = None) -> Dict[str, float]:
    """Warm each up once (``warmups`` if given, else a full pass), then ``repeats`` passes in
    alternating order; median seconds per name."""
    for name, fn in named.items():
        (warmups or named)[name]()
    times: Dict[str, List[float]] = {name: [] for name in named}
    names = list(named)
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            times[name].append(named[name]())
    interleaved_medians.last_times = times  # every pass, for the spread column
    return {name: statistics.median(t) for name, t in times.items()}


def head_costs(model, batch, fused: bool) -> Tuple[Callable, Callable]:
    """Projection + label-smoothed loss only (forward and backward) on fixed decoder states, for the
    last exit and for all N; ``fused`` uses the package's ``fused_exit_loss`` (``--exit-loss-impl
    fused``) instead of projection → log_softmax → ``label_smoothed_nll_loss``."""
    decoder = model.decoder
    with torch.no_grad():
        enc = model.encoder(batch["net_input"]["src_tokens"], src_lengths=batch["net_input"]["src_lengths"])
        _, extra = decoder(batch["net_input"]["prev_output_tokens"], encoder_out=enc, features_only=True)
    states = [s.detach().requires_grad_(True) for s in extra["exit_states"]]
    target = batch["target"].reshape(-1)
    ref = AdaptiveLabelSmoothedCrossEntropyCriterion  # for its smoothed_loss / exit_lprobs
    crit = ref.__new__(ref)
    crit.eps, crit.padding_idx = LABEL_SMOOTHING, decoder.dictionary.pad()

    def head_loss(n):
        if fused:
            return fused_exit_loss(decoder.exit_features(states[n - 1], n), decoder.exit_projection(n), target,
                                   LABEL_SMOOTHING, crit.padding_idx)[0]
        return crit.smoothed_loss(crit.exit_lprobs(decoder, states[n - 1], n), target)[0]

    def heads(exits: List[int]) -> Callable[[], float]:
        def run():
            model.zero_grad(set_to_none=True)
            begin = time.perf_counter()
            loss = sum(head_loss(n) for n in exits) / len(exits)
            loss.backward()
            return time.perf_counter() - begin
        return run

    n = decoder.num_layers
    return heads([n]), heads(list(range(1, n + 1)))


def phase_times(model, criterion, batches, optimizer) -> Dict[str, float]:
    """Median seconds per batch of the step's phases: criterion forward, backward, optimizer step."""
    out: Dict[str, List[float]] = {"forward": [], "backward": [], "optimizer": []}
    for i, batch in enumerate(batches):
        torch.manual_seed(i)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _, _ = criterion(model, batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if optimizer is not None:
            optimizer.step()
        t3 = time.perf_counter()
        out["forward"].append(t1 - t0)
        out["backward"].append(t2 - t1)
        out["optimizer"].append(t3 - t2)
    return {k: statistics.median(v) for k, v in out.items()}


def profile_step(model, criterion, batches, optimizer, vocab: int, top: int = 15):
    """torch.profiler over ``batches`` steps of ``criterion``; prints the top ops by self CPU time
    and a breakdown by phase (forward / backward / optimizer) × (vocabulary-sized ops: an input with
    a dimension equal to the vocabulary size, embeddings excluded / the rest)."""
    from torch.profiler import ProfilerActivity, profile

    train_steps(model, criterion, batches[:1], optimizer)  # warm
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_steps(model, criterion, batches, optimizer)
    events = prof.events()
    total = sum(e.self_cpu_time_total for e in events)

    def phase(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("Optimizer.step"):
                return "optimizer"
            if p.name.startswith("autograd::engine::evaluate_function"):
                return "backward"
            p = p.cpu_parent
        if e.name.startswith("Optimizer.step"):
            return "optimizer"
        if e.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        return "forward"

    def is_vocab(e):
        return "embedding" not in e.name and any(vocab in (shape or []) for shape in (e.input_shapes or []))

    table: Dict[Tuple[str, bool, str], List[float]] = {}
    for e in events:
        key = (phase(e), is_vocab(e), e.name)
        acc = table.setdefault(key, [0.0, 0])
        acc[0] += e.self_cpu_time_total
        acc[1] += 1
    print(f"\nprofile: {len(batches)} steps, total self CPU time {total / 1e3 / len(batches):.0f} ms/step "
          f"(profiler overhead included)")
    print(f"| phase | vocab-sized? | op | self CPU ms/step | share |\n|---|---|---|---:|---:|")
    for (ph, voc, name), (us, _) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {ph} | {'V' if voc else ''} | {name} | {us / 1e3 / len(batches):.1f} | {100 * us / total:.1f}% |")
    print("| phase | vocab-sized ops ms/step | other ms/step |\n|---|---:|---:|")
    for ph in ("forward", "backward", "optimizer"):
        v = sum(us for (p, voc, _), (us, _) in table.items() if p == ph and voc)
        o = sum(us for (p, voc, _), (us, _) in table.items() if p == ph and not voc)
        print(f"| {ph} | {v / 1e3 / len(batches):.0f} | {o / 1e3 / len(batches):.0f} |")
    return prof


def main(argv=None):
    args = parse_args(argv)
    quiet_root_logger()
    warnings.filterwarnings("ignore", message=".*(pin_memory|weights_only).*")
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
    print(f"model: {args.arch} {args.arch_args}; {params / 1e6:.1f}M parameters; decoder N={dec.num_layers} "
          f"width {dec.embed_dim}; vocabulary {len(task.target_dictionary)}; exit classifiers {dec.exit_classifiers}")
    print(f"batches: {len(batches)} x up to {args.max_tokens} tokens ({ntokens} target tokens); "
          f"{args.repeats} interleaved passes; step = forward+backward"
          + ("" if args.no_optimizer else "+Adam step"))

    timed = criteria(task, [int(m) for m in args.mixed_samples.split(",") if m.strip()], not args.no_experiments,
                     args.autocast_bf16)
    crits = {t.name: t.criterion for t in timed}
    experiments = {t.name: t.criterion for t in timed if t.aligned_variant}
    if experiments:
        check_same_loss(model, batches[0], crits["aligned"], experiments)

    optimizer = None if args.no_optimizer else make_optimizer(model)
    medians = interleaved_medians(
        {name: (lambda c=c: train_steps(model, c, batches, optimizer)) for name, c in crits.items()}, args.repeats,
        warmups={name: (lambda c=c: train_steps(model, c, batches[:1], optimizer)) for name, c in crits.items()})
    base = medians["single exit"]
    passes = interleaved_medians.last_times
    print("\n| criterion | ms/step (median) | min–max over passes | target tokens/s | ratio to single exit |"
          "\n|---|---:|---:|---:|---:|")
    for name, seconds in medians.items():
        lo, hi = (1000 * f(passes[name]) / len(batches) for f in (min, max))
        print(f"| {name} | {1000 * seconds / len(batches):.0f} | {lo:.0f}–{hi:.0f} | {ntokens / seconds:.0f} | "
              f"{seconds / base:.3f} |")

    n = dec.num_layers
    last_head, all_heads = head_costs(model, batches[0], fused=False)
    head_fns = {"last exit": last_head, f"all {n} exits": all_heads}
    if not args.no_experiments:
        fused_last, fused_all = head_costs(model, batches[0], fused=True)
        head_fns.update({"last exit, fused linear+CE": fused_last, f"all {n} exits, fused linear+CE": fused_all})
    heads = interleaved_medians(head_fns, max(args.repeats, 3))
    step_one = medians["aligned"] / len(batches)
    print(f"\nexit heads alone (projection + label-smoothed loss, forward+backward) on the first batch "
          f"({batches[0]['ntokens']} target tokens):\n| heads | ms |\n|---|---:|")
    for name, seconds in heads.items():
        print(f"| {name} | {1000 * seconds:.0f} |")
    print(f"(the aligned step averages {1000 * step_one:.0f} ms/step over all batches)")
    if args.profile:
        vocab = len(task.target_dictionary)
        print("\nphases (median ms per batch; criterion forward / backward / optimizer step):")
        print("| criterion | forward | backward | optimizer |\n|---|---:|---:|---:|")
        for name in ("single exit", "aligned"):
            ph = phase_times(model, crits[name], batches, optimizer)
            print(f"| {name} | {1000 * ph['forward']:.0f} | {1000 * ph['backward']:.0f} | {1000 * ph['optimizer']:.0f} |")
        for name in ("aligned", "single exit"):
            print(f"\n## torch.profiler, {name}")
            profile_step(model, crits[name], batches, optimizer, vocab)
    ratio = medians["aligned"] / base
    bf16 = f" bf16_ratio={medians['aligned'] / medians[BF16_ROW]:.4f}" if BF16_ROW in medians else ""
    print(f"\nRESULT aligned_ratio={ratio:.4f} " + " ".join(
        f"mixed_M{t.mixed_samples}_ratio={medians[t.name] / base:.4f}" for t in timed if t.mixed_samples) + bf16)


if __name__ == "__main__":
    main()
