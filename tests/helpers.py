"""Tiny real fairseq models for tests: fairseq's own Dictionary, argument parser, task and model
classes, random weights, fixed seeds (as fairseq's tests/test_sequence_generator.py)."""
import importlib.util
import os

import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.tasks.translation import TranslationTask

import fairseq_dat  # noqa: F401  (registers the plugin)
from fairseq_dat.models.adaptive_transformer import AdaptiveTransformerModel


def tiny_dictionary(size=24):
    d = Dictionary()
    for i in range(size):
        d.add_symbol(f"w{i}")
    d.finalize(padding_factor=1)
    return d


def parse_model_args(arch="adaptive_transformer_tiny", extra=()):
    parser = options.get_training_parser()
    argv = ["/dev/null", "--task", "translation", "--arch", arch, "--dropout", "0.0",
            "--attention-dropout", "0.0", "--activation-dropout", "0.0", *extra]
    return options.parse_args_and_arch(parser, argv)


def tiny_task(dictionary=None, args=None):
    d = dictionary or tiny_dictionary()
    args = args or parse_model_args()
    return TranslationTask(args, d, d)


def tiny_model(arch="adaptive_transformer_tiny", extra=(), seed=1, dictionary=None):
    torch.manual_seed(seed)
    args = parse_model_args(arch, extra)
    task = tiny_task(dictionary, args)
    model = task.build_model(args)
    model.eval()
    return model, task, args


def random_batch(dictionary, bsz=4, src_len=7, tgt_len=6, seed=0, pad_some=True):
    """src/target token batches with real padding (left-pad source, right-pad target)."""
    g = torch.Generator().manual_seed(seed)
    nspecial = dictionary.nspecial
    src = torch.randint(nspecial, len(dictionary), (bsz, src_len), generator=g)
    src[:, -1] = dictionary.eos()
    src_lengths = torch.full((bsz,), src_len)
    if pad_some and bsz > 1:
        src[0, :2] = dictionary.pad()  # left padding, as fairseq's LanguagePairDataset
        src_lengths[0] = src_len - 2
    tgt = torch.randint(nspecial, len(dictionary), (bsz, tgt_len), generator=g)
    tgt[:, -1] = dictionary.eos()
    if pad_some and bsz > 1:
        tgt[1, -2] = dictionary.eos()
        tgt[1, -1] = dictionary.pad()
    prev = torch.cat([torch.full((bsz, 1), dictionary.eos()), tgt[:, :-1]], dim=1)
    if pad_some and bsz > 1:
        prev[1, -1] = dictionary.pad()
    return {"src_tokens": src, "src_lengths": src_lengths, "prev_output_tokens": prev}, tgt


# ---- exit-aware decoding driven by given exits (tests of the copy rule) --------------------------


def forced_exits_policy(exits, **kwargs):
    """An exit policy with given exits (B x T, or B for every step), for tests of the copy rule;
    kwargs: gather_ratio, kv_mode, decoder_step."""
    from fairseq_dat.exit_policy import PlannedDepth

    class ForcedExits(PlannedDepth):
        def plan_step(self, decoder, encoder_out, incremental_state, prev_output_tokens):
            step = prev_output_tokens.size(1) - 1
            return {"depth": exits if exits.dim() == 1 else exits[:, step]}

    return ForcedExits(**kwargs)


def incremental_step(decoder, prev_output_tokens, encoder_out, incremental_state, exits, **kwargs):
    """One exit-aware decoding step with the given exits (kwargs as ``forced_exits_policy``)."""
    decoder.exit_policy = forced_exits_policy(exits, **kwargs)
    try:
        return decoder(prev_output_tokens, encoder_out=encoder_out, incremental_state=incremental_state)
    finally:
        decoder.exit_policy = None


def materialize_all_pending_kv(decoder, incremental_state):
    """Every block's self-attention cache complete and in beam order (to compare with a full pass)."""
    for index in range(len(decoder.layers)):
        decoder.catch_up_block(index, incremental_state)


def load_benchmark(name):
    """A script of benchmarks/ as a module (they are not a package), e.g. ``load_benchmark("generation_speed")``."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
