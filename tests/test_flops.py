"""The Appendix-B FLOPs model against a hand computation.

Dimensions: N = 2 blocks, d = 2, d_f = 3, d_e = 5, V = 7; one sentence with |x| = 3 and two output
tokens exiting at blocks 1 then 2.

  FC(t=1, FirstCall) = 12·4 + 4·3·2 + 4·1·2 + 4·3·2 + 4·3·2·5 = 48 + 24 + 8 + 24 + 120 = 224
  FC(t=2)            = 48 + 24 + 16 + 24                       = 112
  FC(t=2, FirstCall) = 112 + 120                               = 232
  FS = 4·4 = 16;  output projection 2·7·2 = 28

  token-geometric: t=1: 224 + 16 + 2·2·1 + 28 = 272;  t=2: 112 + 232 + 2·2·2 + 28 = 380  → 652
  baseline [2, 2]: t=1: 224 + 224 + 28 = 476;         t=2: 112 + 112 + 28 = 252       → 728
  confidence:      t=1: 224 + 16 + 2·1·7·2 = 268;     t=2: 112 + 232 + 2·2·7·2 = 400  → 668
  sequence:        t=1: 224 + 16 + 2·2·2 + 28 = 276;  t=2: 112 + 232 + 28 = 372       → 648
  token-multinomial: t=1: 276;                         t=2: 112 + 232 + 8 + 28 = 380 → 656
"""
import pytest

from fairseq_dat.flops import DecoderDims, decoder_flops, exit_rule, flops_per_token
from fairseq_dat.modules.depth_estimators import build_depth_estimator
from helpers import tiny_model

DIMS = DecoderDims(num_layers=2, embed_dim=2, ffn_dim=3, encoder_dim=5, vocab=7)


@pytest.mark.parametrize("estimator, exits, expected", [
    ("token-geometric", [1, 2], 652),
    ("none", [2, 2], 728),
    ("confidence", [1, 2], 668),
    ("sequence", [1, 2], 648),
    ("token-multinomial", [1, 2], 656),
])
def test_sentence_flops_match_hand_computation(estimator, exits, expected):
    assert decoder_flops(DIMS, exits, src_len=3, estimator=estimator) == expected


def test_flops_per_token_averages_over_all_tokens():
    # the sentence above (652 over 2 tokens) and a one-token sentence exiting at 1 with |x| = 1:
    # FC = 48 + 24 + 8 + 8 + 4·1·2·5 = 128, + FS 16 + FP 4 + projection 28 = 176
    assert flops_per_token(DIMS, [([1, 2], 3), ([1], 1)], "token-geometric") == pytest.approx((652 + 176) / 3)


def test_bad_exit_and_rule_are_rejected():
    with pytest.raises(ValueError, match="outside 1..2"):
        decoder_flops(DIMS, [3], src_len=3)
    with pytest.raises(ValueError, match="unknown exit rule"):
        decoder_flops(DIMS, [1], src_len=3, estimator="oracle")


@pytest.mark.parametrize("estimator, rule", [
    ("sequence", "sequence"), ("sequence-poisson-binomial", "sequence"), ("token-multinomial", "token-multinomial"),
    ("token-poisson-binomial", "token-multinomial"), ("token-geometric", "token-geometric")])
def test_every_trained_estimator_has_an_exit_rule(estimator, rule):
    name = build_depth_estimator(estimator, input_dim=4, num_exits=3).name  # the names checkpoints carry
    assert exit_rule("estimator", name) == rule
    assert decoder_flops(DIMS, [1, 2], src_len=3, estimator=exit_rule("estimator", name)) > 0


def test_exit_rule_of_settings_without_an_estimator():
    assert exit_rule("confidence") == "confidence"
    assert [exit_rule(s) for s in ("full", "fixed", "uniform")] == ["none"] * 3
    with pytest.raises(ValueError, match="no exit-prediction cost for depth estimator None"):
        exit_rule("estimator", None)


def test_dims_read_from_a_real_model():
    model, task, _ = tiny_model()  # adaptive_transformer_tiny: 3 decoder blocks, width 32, FFN 64
    dims = DecoderDims.of_model(model)
    assert dims == DecoderDims(num_layers=3, embed_dim=32, ffn_dim=64, encoder_dim=32,
                               vocab=len(task.target_dictionary))
