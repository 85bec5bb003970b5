"""Analytical decoder FLOPs of the Depth-Adaptive Transformer (Elbayad et al., 2020, Appendix B).

Per-token decoder FLOPs at batch size 1; non-linearities, norms and residuals are ignored, and the
encoder is not counted (as in the paper). With decoder width d, FFN width d_f, encoder width d_e,
vocabulary V, N blocks, source length |x| and 1-based target position t:

- a computed block:  FC(x, t) = 12 d² + 4 d_f d + 4 t d + 4 |x| d + 4 · FirstCall · |x| · d · d_e
  (self-attention k/v 4d², q 2d², scores 4td, out 2d²; cross-attention q 2d², scores 4|x|d,
  out 2d²; FFN 4 d d_f; the source keys/values once, the first time a block is entered);
- a skipped block:   FS = 4 d² (the copied state's keys and values, §2.2.1);
- exit prediction FP: sequence 2Nd once at t = 1; token-multinomial 2Nd; token-geometric 2 d q(t);
  confidence thresholding 2 q(t) V d, which already includes the output projection;
- the output projection 2 V d.

A token exiting at q(t) costs q(t)·FC + (N − q(t))·FS + FP + 2Vd; the full-depth baseline is
N·FC + 2Vd. ``decoder_flops`` sums a sentence, ``flops_per_token`` averages a corpus, and
``exit_rule`` names the FP rule of a decoding setting (every tool that counts FLOPs asks it).
"""
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

#: the exit rules the FLOPs model distinguishes (Appendix B), by their ``--depth-estimator`` names
ESTIMATOR_COSTS = ("none", "sequence", "token-multinomial", "token-geometric", "confidence")

#: the FP rule of each trained ``--depth-estimator``; the Poisson-binomial estimators (not in the
#: paper) project onto N values like their multinomial counterparts, so they cost the same
ESTIMATOR_RULES = {"sequence": "sequence", "sequence-poisson-binomial": "sequence",
                   "token-multinomial": "token-multinomial", "token-poisson-binomial": "token-multinomial",
                   "token-geometric": "token-geometric"}


def exit_rule(strategy: str, estimator: Optional[str] = None) -> str:
    """The FP rule of a decoding setting (``--exit-strategy``): ``confidence`` thresholding, the
    checkpoint's depth ``estimator`` for ``estimator``, and ``none`` for the settings that predict
    nothing (full depth, fixed or uniform exits)."""
    if strategy == "confidence":
        return "confidence"
    if strategy != "estimator":
        return "none"
    if estimator not in ESTIMATOR_RULES:
        raise ValueError(f"no exit-prediction cost for depth estimator {estimator!r}; expected one of "
                         f"{', '.join(ESTIMATOR_RULES)}")
    return ESTIMATOR_RULES[estimator]


@dataclass(frozen=True)
class DecoderDims:
    """The sizes the FLOPs model needs: N blocks, d_d, d_f, d_e and V."""

    num_layers: int
    embed_dim: int
    ffn_dim: int
    encoder_dim: int
    vocab: int

    @classmethod
    def of_model(cls, model) -> "DecoderDims":
        """Read the sizes of a fairseq encoder-decoder transformer (stock or adaptive)."""
        decoder = model.decoder
        layer = decoder.layers[0]
        return cls(num_layers=len(decoder.layers), embed_dim=decoder.embed_dim, ffn_dim=layer.fc1.out_features,
                   encoder_dim=model.encoder.embed_tokens.embedding_dim, vocab=len(decoder.dictionary))


def computed_block_flops(dims: DecoderDims, src_len: int, position: int, first_call: bool) -> int:
    """FC(x, t) of one block for the token at 1-based ``position``."""
    d = dims.embed_dim
    flops = 12 * d * d + 4 * dims.ffn_dim * d + 4 * position * d + 4 * src_len * d
    if first_call:
        flops += 4 * src_len * d * dims.encoder_dim
    return flops


def skipped_block_flops(dims: DecoderDims) -> int:
    """FS: the k and v projections of a copied state."""
    return 4 * dims.embed_dim * dims.embed_dim


def exit_prediction_flops(dims: DecoderDims, estimator: str, exit_block: int, position: int) -> int:
    """FP of one token that exits at ``exit_block`` (1-based) under the rule ``estimator``."""
    d, n = dims.embed_dim, dims.num_layers
    if estimator == "none":
        return 0
    if estimator == "sequence":
        return 2 * n * d if position == 1 else 0
    if estimator == "token-multinomial":
        return 2 * n * d
    if estimator == "token-geometric":
        return 2 * d * exit_block
    if estimator == "confidence":
        return 2 * exit_block * dims.vocab * d
    raise ValueError(f"unknown exit rule {estimator!r}; expected one of {', '.join(ESTIMATOR_COSTS)}")


def decoder_flops(dims: DecoderDims, exits: Sequence[int], src_len: int, estimator: str = "none") -> int:
    """Decoder FLOPs of one sentence whose t-th output token (t = 1..T, EOS included) exits at
    ``exits[t-1]`` (1-based blocks). ``estimator="none"`` with every exit at N is the baseline."""
    n = dims.num_layers
    entered = [False] * (n + 1)  # FirstCall per block
    projection = 2 * dims.vocab * dims.embed_dim
    total = 0
    for position, q in enumerate(exits, start=1):
        if not 1 <= q <= n:
            raise ValueError(f"exit {q} at position {position} is outside 1..{n}")
        for block in range(1, q + 1):
            total += computed_block_flops(dims, src_len, position, first_call=not entered[block])
            entered[block] = True
        total += (n - q) * skipped_block_flops(dims)
        total += exit_prediction_flops(dims, estimator, q, position)
        if estimator != "confidence":  # confidence's FP already includes the output projection
            total += projection
    return total


def flops_per_token(dims: DecoderDims, sentences: Iterable[Tuple[Sequence[int], int]],
                    estimator: str = "none") -> float:
    """Average decoder FLOPs per output token over ``(exits, src_len)`` pairs (one per sentence)."""
    total = tokens = 0
    for exits, src_len in sentences:
        total += decoder_flops(dims, exits, src_len, estimator)
        tokens += len(exits)
    return total / tokens if tokens else float("nan")
