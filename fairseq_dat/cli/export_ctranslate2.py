"""Export an ``adaptive_transformer`` checkpoint to CTranslate2: one engine model per exit, plus what
routing by sequence-level depth needs (Elbayad et al., ICLR 2020, §2.1 and §3.1)::

    python -m fairseq_dat.cli.export_ctranslate2 CKPT OUT_DIR [--exits all|1,2,…] [--quantization int8]
        [--data DIR] [--bpe-codes FILE]

Exit k becomes a stock fairseq ``transformer`` checkpoint (the encoder, decoder blocks 1..k, exit k's
classifier and layer norm as output layer; k = N: the model's own head), converted by CTranslate2's
own ``FairseqConverter`` into ``OUT_DIR/exit{k}``. The layout of OUT_DIR is in
:mod:`fairseq_dat.ctranslate2`; ``python -m fairseq_dat.cli.ct2_translate OUT_DIR`` serves it.
Only a sequence-level estimator (``--depth-estimator sequence`` or ``sequence-poisson-binomial``) can
route: other checkpoints export, and are served with ``--fixed-exit k``.
"""
import argparse
import logging
import os
import pickle

import fairseq_dat  # noqa: F401  (registers the plugin before the checkpoint is read)
from fairseq import checkpoint_utils
from fairseq.models import ARCH_MODEL_NAME_REGISTRY

from . import quiet_root_logger, run_main
from ..ctranslate2 import check_quantization, export, parse_exits
from ..errors import ConfigError

FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="adaptive_transformer checkpoint (fairseq-train's checkpoint_*.pt)")
    parser.add_argument("out_dir", help="output directory (exit{k}/, encoder/, estimator.pt, dictionaries, "
                                        "manifest.json)")
    parser.add_argument("--exits", default="all", help="exits to export: 'all' (default) or comma-separated "
                                                       "1-based block numbers, e.g. 1,2,6")
    parser.add_argument("--quantization", default="float32",
                        help="CTranslate2 weight type of the exit models: float32 (default), int8, int8_float32, "
                             "int16, float16, … (the routing encoder stays float32)")
    parser.add_argument("--data", default=None, help="directory with the checkpoint's dictionaries "
                                                     "(dict.SRC.txt, dict.TGT.txt); default: the one it was trained on")
    parser.add_argument("--source-lang", default=None, help="source language, if --data does not name it (no "
                                                              "binarized files there)")
    parser.add_argument("--target-lang", default=None, help="target language, likewise")
    parser.add_argument("--bpe-codes", default=None, help="BPE codes to ship with the models (copied into OUT_DIR)")
    return parser.parse_args(argv)


def read_checkpoint(path: str, overrides):
    """fairseq's ``load_checkpoint_to_cpu``. A fairseq checkpoint is a full pickle, which torch >= 2.6
    refuses by default: if it does, the documented switch is set for this one call only."""
    try:
        return checkpoint_utils.load_checkpoint_to_cpu(path, overrides)
    except pickle.UnpicklingError:
        previous = os.environ.get(FORCE_NO_WEIGHTS_ONLY)
        os.environ[FORCE_NO_WEIGHTS_ONLY] = "1"
        try:
            return checkpoint_utils.load_checkpoint_to_cpu(path, overrides)
        finally:
            if previous is None:
                del os.environ[FORCE_NO_WEIGHTS_ONLY]
            else:
                os.environ[FORCE_NO_WEIGHTS_ONLY] = previous


def load_adaptive_checkpoint(path: str, data=None, source_lang=None, target_lang=None):
    """(model, model args, task) of an adaptive_transformer checkpoint; ConfigError naming the file
    for a missing, unreadable or non-adaptive checkpoint, or a missing dictionary directory."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} not found")
    given = {"data": data, "source_lang": source_lang, "target_lang": target_lang}
    overrides = {k: v for k, v in given.items() if v} or None
    try:
        state = read_checkpoint(path, overrides)
    except Exception as err:  # torch/pickle raise many kinds for a file that is not a checkpoint
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot read checkpoint {path}: {first}") from None
    cfg = state.get("cfg")
    if cfg is None or "model" not in state:
        raise ConfigError(f"{path} is not a fairseq checkpoint (no model config or weights)")
    arch = getattr(cfg.model, "arch", None) or getattr(cfg.model, "_name", None)
    model_name = ARCH_MODEL_NAME_REGISTRY.get(arch, arch)
    if model_name != "adaptive_transformer":
        raise ConfigError(f"{path} is a '{model_name}' checkpoint, not adaptive_transformer: there are no exits to "
                          "export (a stock transformer converts with ct2-fairseq-converter directly)")
    data_dir = cfg.task.data
    if not data_dir or not os.path.isdir(data_dir):
        raise ConfigError(f"--data: the checkpoint's dictionary directory {data_dir!r} does not exist; pass --data "
                          "DIR holding its dict.SRC.txt and dict.TGT.txt")
    models, saved_cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides,
                                                                            state=state)
    return models[0].eval(), saved_cfg.model, task


def main(argv=None):
    args = parse_args(argv)
    quiet_root_logger()
    check_quantization(args.quantization)
    model, model_args, task = load_adaptive_checkpoint(args.checkpoint, args.data, args.source_lang, args.target_lang)
    quiet_root_logger()
    logging.getLogger("fairseq").setLevel(logging.WARNING)  # the converter sets fairseq's task up again per exit
    exits = parse_exits(args.exits, model.decoder.num_layers)
    manifest = export(model, model_args, task, args.out_dir, exits, args.quantization, source=args.checkpoint,
                      bpe_codes=args.bpe_codes)
    routing = ("routes by its sequence-level depth estimator" if manifest["router"] else
               f"no routing (estimator '{manifest['estimator']}'): serve with --fixed-exit k")
    print(f"exported exits {manifest['exits']} of {manifest['num_exits']} ({manifest['quantization']}) to "
          f"{args.out_dir}; {routing}")


if __name__ == "__main__":
    run_main(main)
