"""Early, one-line checks of data directories, dictionaries, checkpoints and precision flags.

Each function raises :class:`~fairseq_dat.errors.ConfigError` naming the flag or file, where fairseq
itself would fail later with a traceback (or, for ``--exit-weights``, after writing ``crash.pt``).
Called from ``AdaptiveTranslationTask`` (data, dictionaries, training flags, input sizes) and from
``AdaptiveTransformerModel.load_state_dict`` (dictionary sizes of a checkpoint).
"""
import importlib.util
import os

from fairseq import utils
from fairseq.data import data_utils

from .errors import ConfigError


def check_data_dir(cfg):
    """The task's data directory exists and holds fairseq-preprocess output (before fairseq's
    ``setup_task`` lists it or infers the language pair)."""
    paths = utils.split_paths(cfg.data) if cfg.data else []
    if not paths:
        raise ConfigError("no data directory given: pass the directory written by fairseq-preprocess")
    data = paths[0]
    if not os.path.isdir(data):
        raise ConfigError(f"data directory {data} does not exist")
    if (cfg.source_lang is None or cfg.target_lang is None) and data_utils.infer_language_pair(data)[0] is None:
        raise ConfigError(f"data directory {data} has no binarized data (no SPLIT.SRC-TGT.LANG.idx files "
                          "written by fairseq-preprocess); binarize the corpus with fairseq-preprocess, or "
                          "give --source-lang and --target-lang")


def check_dictionary_file(filename):
    if not os.path.isfile(filename):
        raise ConfigError(f"dictionary {filename} not found (fairseq-preprocess writes dict.LANG.txt into the "
                          "data directory; check the directory and --source-lang/--target-lang)")


def dataset_not_found(split, data, src, tgt):
    prefix = os.path.join(data, f"{split}.{src}-{tgt}.{src}")
    return ConfigError(f"no binarized '{split}' split in {data} (expected {prefix}.bin/.idx from "
                       "fairseq-preprocess); binarize it, or name another split (--train-subset, --valid-subset, "
                       "--gen-subset)")


def inputs_too_long(dataset, indices, max_positions):
    """The message for inputs longer than the model's positions (fairseq raises a bare Exception)."""
    _, ignored = dataset.filter_indices_by_size(indices, max_positions)
    size = dataset.size(int(ignored[0])) if len(ignored) else None  # (source, target) lengths
    size = tuple(int(s) for s in size) if isinstance(size, tuple) else size
    limit = tuple(max_positions) if isinstance(max_positions, (tuple, list)) else max_positions
    return ConfigError(f"{len(ignored)} input(s) longer than max_positions={limit} (the first has size {size}): "
                       "pass --skip-invalid-size-inputs-valid-test to skip them, or raise "
                       "--max-source-positions/--max-target-positions")


def check_precision_flags(args):
    """``--bf16`` (and ``--memory-efficient-bf16``) in this fairseq imply ``--tpu`` and crash without
    torch_xla (``utils.get_tpu_device``), on CPU and GPU alike."""
    bf16 = getattr(args, "bf16", False) or getattr(args, "memory_efficient_bf16", False)
    if bf16 or getattr(args, "tpu", False):
        if importlib.util.find_spec("torch_xla") is None:
            flag = "--bf16" if bf16 else "--tpu"
            raise ConfigError(f"{flag} needs a TPU: fairseq's bf16 path runs through torch_xla, which is not "
                              "installed; train with --autocast-bf16 on CPU or use --fp16 on a GPU")
    if getattr(args, "autocast_bf16", False):
        for name in ("fp16", "memory_efficient_fp16", "amp"):
            if getattr(args, name, False):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"--autocast-bf16 and {flag} both choose a precision: use one of them")


def check_training_flags(args, model):
    """Flags that need the built model: ``--exit-weights`` against its number of exits."""
    adaptive = hasattr(getattr(model, "decoder", None), "exit_logits")
    if adaptive and getattr(args, "criterion", None) == "adaptive_label_smoothed_cross_entropy":
        from .criterions.adaptive_label_smoothed_cross_entropy import resolve_exit_weights
        resolve_exit_weights(getattr(args, "exit_weights", "uniform") or "uniform", model.decoder.num_layers)


def check_embedding_sizes(model, state_dict):
    """A checkpoint whose embeddings do not fit this model's dictionaries: name the dictionary file
    (set by ``AdaptiveTranslationTask.load_dictionary``) instead of a size-mismatch traceback."""
    for side, which in (("encoder", "source"), ("decoder", "target")):
        module, key = getattr(model, side, None), f"{side}.embed_tokens.weight"
        if module is None or key not in state_dict or getattr(module, "embed_tokens", None) is None:
            continue
        ckpt_n, own_n = state_dict[key].size(0), module.embed_tokens.weight.size(0)
        if ckpt_n != own_n:
            name = getattr(getattr(module, "dictionary", None), "filename", None) or f"the {which} dictionary"
            raise ConfigError(f"{name} has {own_n} entries but the checkpoint was trained with a {which} "
                              f"dictionary of {ckpt_n}: use the data directory (dict.*.txt) the model was "
                              "trained with")
