"""Exit k of the anytime decoder as fairseq's stock ``transformer`` (Elbayad et al., ICLR 2020, §2.1).

With every token leaving at block k, the adaptive model computes exactly what a plain transformer
with the same encoder, decoder blocks 1..k and exit k's classifier C_k (and, in pre-norm models,
exit k's layer norm) as output layer computes. That model is what CTranslate2 serves per depth
(:mod:`fairseq_dat.ctranslate2`) and what ``benchmarks/generation_speed.py`` times as the limit of
decoding at average exit k.
"""
import copy
from typing import Optional

import torch.nn as nn
from fairseq.models.transformer import TransformerModel

from .models.adaptive_transformer import ADAPTIVE_PARAM_PREFIXES


def stock_args(model_args, decoder_layers: Optional[int] = None):
    """The checkpoint's model args as a stock ``transformer`` (plain translation task, no plugin),
    optionally with fewer decoder blocks."""
    args = copy.deepcopy(model_args)
    args.arch = args._name = "transformer"
    args.task = "translation"
    args.user_dir = None
    args.criterion = "label_smoothed_cross_entropy"
    if decoder_layers is not None:
        args.decoder_layers = decoder_layers
    return args


def truncated_stock_model(adaptive, model_args, task, k: int) -> TransformerModel:
    """fairseq's stock ``TransformerModel`` with the adaptive model's encoder, its first k decoder
    blocks, and exit k (its layer norm and classifier) as output layer; k = N is the full model.
    Returns the model in eval mode."""
    decoder = adaptive.decoder
    model = TransformerModel.build_model(stock_args(model_args, k), task)
    state = {key: value for key, value in adaptive.state_dict().items()
             if not key.startswith(ADAPTIVE_PARAM_PREFIXES)
             and not (key.startswith("decoder.layers.") and int(key.split(".")[2]) >= k)}
    model.load_state_dict(state, strict=True)
    if k < decoder.num_layers:  # exit k's head; a fresh module, so tied input embeddings stay untouched
        head = decoder.exit_projection(k)
        proj = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        proj.load_state_dict(head.state_dict())
        model.decoder.output_projection = proj
        if model.decoder.layer_norm is not None:
            model.decoder.layer_norm = copy.deepcopy(decoder.exit_layer_norms[k - 1])
    return model.eval()
