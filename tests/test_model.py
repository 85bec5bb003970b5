"""The anytime decoder (paper §2): standard forward, exits, the copy rule, loading checkpoints."""
import argparse

import pytest
import torch
from fairseq.models.transformer import TransformerModel

from fairseq_dat.models.adaptive_transformer import adaptive_transformer_iwslt_de_en
from helpers import parse_model_args, random_batch, tiny_model, tiny_task


def test_standard_forward_equals_fairseq_transformer_with_copied_weights():
    model, task, _ = tiny_model()
    args = parse_model_args("transformer", ["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                                            "--encoder-layers", "2", "--encoder-attention-heads", "2",
                                            "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
                                            "--decoder-layers", "3", "--decoder-attention-heads", "2"])
    stock = tiny_task(task.target_dictionary, args).build_model(args).eval()
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("decoder.exit_") for k in unexpected)
    net_input, _ = random_batch(task.target_dictionary)
    ours, _ = model(**net_input)
    theirs, _ = stock(**net_input)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_extra_carries_every_exit_and_last_exit_is_the_output():
    model, task, _ = tiny_model()
    net_input, _ = random_batch(task.target_dictionary)
    logits, extra = model(**net_input)
    states = extra["exit_states"]
    assert len(states) == model.decoder.num_layers == 3
    torch.testing.assert_close(model.decoder.exit_logits(states[-1], 3), logits)
    # separate classifiers: exits 1 and 2 have their own projections
    assert model.decoder.exit_projection(1) is not model.decoder.exit_projection(2)
    assert model.decoder.exit_projection(3) is model.decoder.output_projection


def test_shared_classifiers_use_one_matrix_tied_to_embeddings():
    model, _, _ = tiny_model(extra=["--exit-classifiers", "shared", "--share-decoder-input-output-embed"])
    dec = model.decoder
    assert len(dec.exit_projections) == 0
    assert dec.exit_projection(1).weight is dec.embed_tokens.weight


def test_pre_norm_gets_one_layer_norm_per_exit():
    model, _, _ = tiny_model(extra=["--decoder-normalize-before"])
    assert len(model.decoder.exit_layer_norms) == 2 and model.decoder.layer_norm is not None


def test_teacher_forced_all_exits_at_n_equals_standard_forward():
    model, task, _ = tiny_model()
    net_input, target = random_batch(task.target_dictionary)
    logits, _ = model(**net_input)
    exits = torch.full(target.shape, 3)
    forced, _ = model(**net_input, exits=exits)
    torch.testing.assert_close(forced, logits, rtol=1e-5, atol=1e-5)


def test_copy_rule_state_read_above_an_exit_is_the_copy():
    """Token 2 of sentence 0 exits at block 1: blocks 2 and 3 must see its block-1 state."""
    model, task, _ = tiny_model()
    dec = model.decoder
    net_input, target = random_batch(task.target_dictionary, pad_some=False)
    enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    exits = torch.full(target.shape, 3)
    exits[0, 2] = 1
    states, _ = dec.teacher_forced_block_states(net_input["prev_output_tokens"], enc, exits)
    # T x B x C; the copied state is unchanged across blocks 1..3
    torch.testing.assert_close(states[1][2, 0], states[0][2, 0], rtol=0, atol=0)
    torch.testing.assert_close(states[2][2, 0], states[0][2, 0], rtol=0, atol=0)
    # block 2 reads position 2 from its input (the block-1 state) either way; block 3 reads the copy
    # instead of the block-2 state, so a later token's block-3 output changes
    full, _ = dec.teacher_forced_block_states(net_input["prev_output_tokens"], enc, None)
    torch.testing.assert_close(states[1][3, 0], full[1][3, 0], rtol=0, atol=0)
    assert not torch.allclose(states[2][3, 0], full[2][3, 0])
    # positions before the exit are unaffected (causality)
    torch.testing.assert_close(states[2][:2, 0], full[2][:2, 0], rtol=0, atol=0)
    # the copy is what block 3's keys/values are computed from: recompute block 3 by hand on an input
    # where position 2 holds the block-1 state
    block3_input = full[1].clone()
    block3_input[2, 0] = states[0][2, 0]
    out, _, _ = dec.layers[2](block3_input, enc["encoder_out"][0], enc["encoder_padding_mask"][0], None,
                              self_attn_mask=dec.buffered_future_mask(block3_input))
    torch.testing.assert_close(states[2][3, 0], out[3, 0])


def test_logits_at_exits_use_each_tokens_classifier():
    model, task, _ = tiny_model()
    dec = model.decoder
    net_input, target = random_batch(task.target_dictionary)
    exits = torch.randint(1, 4, target.shape, generator=torch.Generator().manual_seed(3))
    logits, _ = model(**net_input, exits=exits)
    enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    states, _ = dec.teacher_forced_block_states(net_input["prev_output_tokens"], enc, exits)
    final = states[-1].transpose(0, 1)
    for b in range(target.size(0)):
        for t in range(target.size(1)):
            n = int(exits[b, t])
            torch.testing.assert_close(logits[b, t], dec.exit_logits(final[b, t], n))


def test_different_encoder_and_decoder_widths_paper_iwslt_shape():
    model, task, args = tiny_model("adaptive_transformer_iwslt_de_en",
                                   extra=["--encoder-layers", "1", "--decoder-layers", "2"])
    assert args.encoder_embed_dim == 512 and args.decoder_embed_dim == 256
    assert args.decoder_ffn_embed_dim == 1024 and args.decoder_attention_heads == 4
    defaults = argparse.Namespace()
    adaptive_transformer_iwslt_de_en(defaults)
    assert defaults.dropout == 0.3 and defaults.exit_classifiers == "separate"
    assert not defaults.share_all_embeddings and not defaults.share_decoder_input_output_embed
    net_input, target = random_batch(task.target_dictionary)
    logits, extra = model(**net_input)
    assert logits.shape == target.shape + (len(task.target_dictionary),)
    assert len(model.decoder.exit_projections) == 1  # separate classifiers, untied


def test_wmt_big_arch_ties_everything():
    _, _, args = tiny_model("adaptive_transformer_wmt_en_fr_big",
                            extra=["--encoder-layers", "1", "--decoder-layers", "2", "--encoder-embed-dim", "64",
                                   "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "64",
                                   "--decoder-ffn-embed-dim", "64"])
    assert args.share_all_embeddings and args.exit_classifiers == "shared"
    assert args.encoder_attention_heads == 16


def test_stock_transformer_checkpoint_initializes_trunk(tmp_path, caplog):
    model, task, _ = tiny_model()
    args = parse_model_args("transformer", ["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                                            "--encoder-layers", "2", "--encoder-attention-heads", "2",
                                            "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
                                            "--decoder-layers", "3", "--decoder-attention-heads", "2"])
    torch.manual_seed(5)
    stock = tiny_task(task.target_dictionary, args).build_model(args)
    with caplog.at_level("INFO"):
        model.load_state_dict(stock.state_dict())
    assert "newly initialized" in caplog.text and "decoder.exit_projections.0.weight" in caplog.text
    torch.testing.assert_close(model.decoder.exit_projections[0].weight, stock.decoder.output_projection.weight)
    net_input, _ = random_batch(task.target_dictionary)
    torch.testing.assert_close(model(**net_input)[0], stock.eval()(**net_input)[0], rtol=0, atol=0)


def test_freeze_trunk_leaves_only_exits_trainable():
    model, _, _ = tiny_model(extra=["--freeze-trunk", "--depth-estimator", "token-geometric"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("decoder.exit_", "decoder.depth_estimator.")) for n in trainable)


@pytest.mark.parametrize("flag", ["--train-estimator-only", "--freeze-trunk"])
def test_a_frozen_trunk_trains_without_dropout(flag):
    """In training mode the frozen trunk's states (what the estimator reads, what the oracle is computed
    from) are the inference states; without the flag dropout makes them differ."""
    dropout = ["--dropout", "0.3", "--attention-dropout", "0.2", "--activation-dropout", "0.2"]
    states = {}
    for extra in ([flag], []):
        model, task, _ = tiny_model(extra=["--depth-estimator", "token-geometric", *dropout, *extra])
        net_input, _ = random_batch(task.target_dictionary)
        with torch.no_grad():
            inference = model.eval()(**net_input)[1]["exit_states"]
            training = model.train()(**net_input)[1]["exit_states"]
        assert model.training and model.decoder.depth_estimator.training
        states[bool(extra)] = all(torch.equal(a, b) for a, b in zip(inference, training))
    assert states == {True: True, False: False}
