"""Exit-aware beam search: exactness at full depth, incremental == teacher-forced under the copy
rule, real per-row skipping, AE accounting, bad generation flags."""
import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from fairseq_dat.errors import ConfigError
from fairseq_dat.exit_policy import ExitStats, PlannedDepth, build_exit_policy
from fairseq_dat.sequence_generator import AdaptiveSequenceGenerator
from helpers import random_batch, tiny_model


def make_sample(dictionary, bsz=6, src_len=7, seed=0):
    net_input, target = random_batch(dictionary, bsz=bsz, src_len=src_len, seed=seed)
    return {"net_input": {"src_tokens": net_input["src_tokens"], "src_lengths": net_input["src_lengths"]},
            "id": torch.arange(bsz), "target": target}


def assert_same_hypotheses(ref, ours):
    assert len(ref) == len(ours)
    for ref_hypos, our_hypos in zip(ref, ours):
        assert len(ref_hypos) == len(our_hypos)
        for a, b in zip(ref_hypos, our_hypos):
            assert torch.equal(a["tokens"], b["tokens"])
            assert torch.equal(a["positional_scores"], b["positional_scores"])
            assert float(a["score"]) == float(b["score"])


@pytest.fixture(scope="module")
def model_and_dict():
    model, task, _ = tiny_model(extra=["--depth-estimator", "token-geometric"])
    return model, task.target_dictionary


@pytest.mark.parametrize("gen_kwargs", [
    {"beam_size": 1}, {"beam_size": 4}, {"beam_size": 5, "len_penalty": 0.5},
    {"beam_size": 3, "max_len_a": 1.2, "max_len_b": 3}, {"beam_size": 2, "max_len_b": 6, "normalize_scores": False},
])
@pytest.mark.parametrize("exit_kwargs", [{"fixed_exit": 3}, {"exit_threshold": "1.0"}, {}])
def test_full_depth_is_exactly_fairseqs_sequence_generator(model_and_dict, gen_kwargs, exit_kwargs):
    """--fixed-exit N, a threshold that never fires, and no flags all decode as fairseq does."""
    model, d = model_and_dict
    sample = make_sample(d)
    gen_kwargs = {"max_len_b": 12, **gen_kwargs}
    ref = SequenceGenerator([model], d, **gen_kwargs).generate([model], sample)
    gen = AdaptiveSequenceGenerator([model], d, **exit_kwargs, **gen_kwargs)
    ours = gen.generate([model], sample)
    assert_same_hypotheses(ref, ours)
    for hypos in ours:
        for h in hypos:
            assert h["exits"].tolist() == [3] * len(h["tokens"])
    assert gen.stats.average_exit == 3.0 and gen.stats.compute_average_exit == 3.0


def test_full_depth_exact_with_prefix_tokens_and_batch_one(model_and_dict):
    model, d = model_and_dict
    sample = make_sample(d)
    prefix = sample["target"][:, :2]
    ref = SequenceGenerator([model], d, beam_size=3, max_len_b=10).generate([model], sample, prefix_tokens=prefix)
    ours = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=10, fixed_exit=3).generate(
        [model], sample, prefix_tokens=prefix)
    assert_same_hypotheses(ref, ours)
    one = make_sample(d, bsz=1)
    assert_same_hypotheses(SequenceGenerator([model], d, beam_size=4).generate([model], one),
                           AdaptiveSequenceGenerator([model], d, beam_size=4, fixed_exit=3).generate([model], one))


@pytest.mark.parametrize("kv_mode", ["deferred", "eager"])
@pytest.mark.parametrize("gather_ratio", [0.0, 0.5, 1.0])
def test_incremental_equals_teacher_forced_at_every_exit_pattern(model_and_dict, gather_ratio, kv_mode):
    """Step-by-step decoding with given exits = one teacher-forced pass with the same exits and the
    copy rule, at every block; gather_ratio 0 forces the masked path, 1 the gathered sub-batch;
    deferred keys/values, once materialized, equal the eager ones and the full pass's."""
    model, d = model_and_dict
    dec = model.decoder
    net_input, target = random_batch(d, bsz=6, tgt_len=7, seed=1)
    enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    prev = net_input["prev_output_tokens"]
    gen = torch.Generator().manual_seed(11)
    patterns = [torch.randint(1, 4, target.shape, generator=gen) for _ in range(4)]
    patterns += [torch.full(target.shape, n) for n in (1, 2, 3)]
    with torch.no_grad():
        for exits in patterns:
            full, _ = model.decoder(prev, encoder_out=enc, exits=exits)
            states, _ = dec.teacher_forced_block_states(prev, enc, exits)
            state, steps = {}, []
            for t in range(prev.size(1)):
                out, extra = dec.forward_incremental_with_exits(prev[:, : t + 1], enc, state, exits,
                                                                gather_ratio=gather_ratio, kv_mode=kv_mode)
                assert torch.equal(extra["exits"], exits[:, t])
                steps.append(out)
            real = prev.ne(d.pad())  # outputs at padded inputs are never used
            torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-5)
            # every block's cached keys equal the keys the teacher-forced pass computes from its input
            dec.materialize_all_pending_kv(state)
            for n, layer in enumerate(dec.layers):
                block_input = states[n - 1] if n > 0 else dec.embed_target(prev)[0]
                keys = layer.self_attn.k_proj(block_input)  # T x B x C
                cached = layer.self_attn._get_input_buffer(state)["prev_key"]  # B x H x T x d
                cached = cached.permute(2, 0, 1, 3).reshape(keys.shape)
                torch.testing.assert_close(cached[real.t()], keys[real.t()], rtol=1e-4, atol=1e-5)
            assert torch.equal(dec.exit_history(state), exits)


def test_beam_reordering_carries_the_exit_history(model_and_dict):
    model, d = model_and_dict
    gen = AdaptiveSequenceGenerator([model], d, beam_size=4, max_len_b=10, exit_threshold="0.5")
    hypos = gen.generate([model], make_sample(d))
    # replay each best hypothesis teacher-forced with its own exits: the generator's scores follow
    net_input = make_sample(d)["net_input"]
    enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    for i, sent in enumerate(hypos):
        best = sent[0]
        toks = best["tokens"].unsqueeze(0)
        prev = torch.cat([torch.tensor([[d.eos()]]), toks[:, :-1]], dim=1)
        enc_i = model.encoder.reorder_encoder_out(enc, torch.tensor([i]))
        with torch.no_grad():
            logits, _ = model.decoder(prev, encoder_out=enc_i, exits=best["exits"].unsqueeze(0))
        lprobs = torch.log_softmax(logits.float(), -1).gather(-1, toks.unsqueeze(-1)).squeeze(-1).squeeze(0)
        torch.testing.assert_close(lprobs, best["positional_scores"], rtol=1e-4, atol=1e-4)


class CountingLayer(torch.nn.Module):
    """Wraps a decoder block and records how many rows each call computes."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.rows = []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, x, *args, **kwargs):
        self.rows.append(x.size(1))
        return self.layer(x, *args, **kwargs)


def test_blocks_run_only_for_rows_that_have_not_exited(model_and_dict):
    model, d = model_and_dict
    dec = model.decoder
    originals = list(dec.layers)
    counters = [CountingLayer(layer) for layer in originals]
    dec.layers = torch.nn.ModuleList(counters)
    try:
        net_input, target = random_batch(d, bsz=8, tgt_len=5, seed=2)
        enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        exits = torch.full(target.shape, 3)
        exits[:6] = 1  # 6 of 8 rows exit at block 1 at every step
        state = {}
        with torch.no_grad():
            for t in range(target.size(1)):
                dec.forward_incremental_with_exits(net_input["prev_output_tokens"][:, : t + 1], enc, state, exits,
                                                   gather_ratio=0.5)
    finally:
        dec.layers = torch.nn.ModuleList(originals)
    assert counters[0].rows == [8] * 5  # block 1: every row
    # blocks 2 and 3: only the 2 rows, also at their first call (the source keys/values are cached
    # without running the block on every row)
    assert counters[1].rows == [2] * 5 and counters[2].rows == [2] * 5


@pytest.mark.parametrize("beam", [1, 2])
def test_first_call_source_keys_values_equal_fairseqs(model_and_dict, beam):
    """cache_source_kv stores exactly the encoder-attention cache fairseq's layer stores on its first
    call (padded sources; per sentence when the attention has a beam size)."""
    model, d = model_and_dict
    layer = model.decoder.layers[1]
    net_input, _ = random_batch(d, bsz=3, tgt_len=4, seed=5)
    with torch.no_grad():
        enc_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        enc_out = model.encoder.reorder_encoder_out(enc_out, torch.arange(3).repeat_interleave(beam))
        enc, enc_mask = enc_out["encoder_out"][0], enc_out["encoder_padding_mask"][0]
        assert enc_mask.any()  # the batch has padded sources
        x = torch.randn(1, 3 * beam, enc.size(2))
        layer.encoder_attn.set_beam_size(beam)
        try:
            stock, ours = {}, {}
            layer(x, enc, enc_mask, stock)
            model.decoder.cache_source_kv(layer.encoder_attn, enc, enc_mask, ours)
        finally:
            layer.encoder_attn.set_beam_size(1)
    a, b = layer.encoder_attn._get_input_buffer(stock), layer.encoder_attn._get_input_buffer(ours)
    assert a["prev_key"].size(0) == 3  # one per sentence whatever the beam
    for key in ("prev_key", "prev_value", "prev_key_padding_mask"):
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_deferred_keys_values_skip_blocks_no_row_reaches(model_and_dict):
    """Deferred copy rule: while every row exits at block 1, blocks 2..N hold no cache at all; the
    first step a row runs block 3, the pending positions get their keys/values in one projection."""
    model, d = model_and_dict
    dec = model.decoder
    net_input, target = random_batch(d, bsz=4, tgt_len=6, seed=3)
    enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    exits = torch.ones(target.shape, dtype=torch.long)
    exits[1, 4] = 3  # one row runs block 3 at step 5
    state = {}
    with torch.no_grad():
        for t in range(target.size(1)):
            dec.forward_incremental_with_exits(net_input["prev_output_tokens"][:, : t + 1], enc, state, exits,
                                               kv_mode="deferred")
            lengths = [len(layer.self_attn._get_input_buffer(state).get("prev_key", ())) and
                       layer.self_attn._get_input_buffer(state)["prev_key"].size(2) for layer in dec.layers]
            assert lengths == ([t + 1, 0, 0] if t < 4 else [t + 1, 5, 5]), (t, lengths)


def test_no_row_runs_a_block_when_all_exit_early(model_and_dict):
    model, d = model_and_dict
    dec = model.decoder
    originals = list(dec.layers)
    counters = [CountingLayer(layer) for layer in originals]
    dec.layers = torch.nn.ModuleList(counters)
    try:
        gen = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=6, fixed_exit=1)
        hypos = gen.generate([model], make_sample(d))
    finally:
        dec.layers = torch.nn.ModuleList(originals)
    assert counters[1].rows == [] and counters[2].rows == []
    assert gen.stats.average_exit == 1.0
    assert all(h["exits"].eq(1).all() for sent in hypos for h in sent)


def test_deferred_and_eager_keys_values_decode_identically(model_and_dict):
    """Deferring the skipped blocks' keys/values (and their beam reorderings) changes no hypothesis,
    score or exit against computing them at every step."""
    model, d = model_and_dict
    sample = make_sample(d)
    runs = [AdaptiveSequenceGenerator([model], d, beam_size=4, max_len_b=10, exit_strategy="confidence",
                                      exit_threshold="0.3", exit_kv=mode).generate([model], sample)
            for mode in ("deferred", "eager")]
    for a, b in zip(*runs):  # scores within float tolerance: one projection over P positions vs P
        for x, y in zip(a, b):
            assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["exits"], y["exits"])
            torch.testing.assert_close(x["positional_scores"], y["positional_scores"], rtol=1e-5, atol=1e-5)
    exits = torch.cat([h["exits"] for sent in runs[0] for h in sent])
    assert exits.min() < exits.max()  # a real mix of exits, so blocks were skipped and caught up


class DepthPerStep(PlannedDepth):
    """Every row exits at ``depths[step]`` (the last value repeats)."""

    def __init__(self, depths, **kwargs):
        super().__init__(**kwargs)
        self.depths = depths

    def plan_step(self, decoder, encoder_out, incremental_state, prev_output_tokens):
        depth = self.depths[min(prev_output_tokens.size(1) - 1, len(self.depths) - 1)]
        return {"depth": torch.full((prev_output_tokens.size(0),), depth, dtype=torch.long)}


def test_blocks_skipped_for_several_steps_catch_up_with_the_beam(model_and_dict):
    """Blocks 2-3 hold a cache after step 2, are skipped by every row for three steps of beam
    reordering, then run again: their caches must follow the composed reorderings exactly as if
    they had been reordered (and fed the copied keys/values) at every step."""
    model, d = model_and_dict
    sample = make_sample(d)
    runs = []
    for mode in ("deferred", "eager"):
        gen = AdaptiveSequenceGenerator([model], d, beam_size=4, max_len_b=10, min_len=8, fixed_exit=1)
        gen.policy = DepthPerStep([3, 3, 1, 1, 1, 3], kv_mode=mode, stats=gen.stats)
        runs.append(gen.generate([model], sample))
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            assert torch.equal(x["tokens"], y["tokens"])
            torch.testing.assert_close(x["positional_scores"], y["positional_scores"], rtol=1e-5, atol=1e-5)


def test_uniform_exits_are_random_seeded_and_bounded(model_and_dict):
    """--exit-strategy uniform (Table 1's Uniform column): every exit 1..N occurs, the same seed
    gives the same hypotheses, and a threshold with it is refused."""
    model, d = model_and_dict
    sample = make_sample(d)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        gen = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=10, min_len=6, exit_strategy="uniform")
        runs.append(gen.generate([model], sample))
    exits = torch.cat([h["exits"] for sent in runs[0] for h in sent])
    assert set(exits.tolist()) == {1, 2, 3}
    assert_same_hypotheses(*runs)
    with pytest.raises(ConfigError, match="--exit-threshold"):
        AdaptiveSequenceGenerator([model], d, exit_strategy="uniform", exit_threshold="0.5")


def test_reference_oracle_exits_where_an_exit_predicts_the_reference(model_and_dict):
    """--exit-strategy oracle: with exit 1's own greedy output as the reference, greedy decoding
    exits at block 1 everywhere and reproduces it; with random references, every token that
    exited before the last block is the reference token at its position."""
    model, d = model_and_dict
    sample = make_sample(d)
    exit1 = AdaptiveSequenceGenerator([model], d, beam_size=1, max_len_b=8, fixed_exit=1).generate([model], sample)
    ref = torch.full((len(exit1), max(len(h[0]["tokens"]) for h in exit1)), d.pad())
    for i, hypos in enumerate(exit1):
        ref[i, : len(hypos[0]["tokens"])] = hypos[0]["tokens"]
    oracle = AdaptiveSequenceGenerator([model], d, beam_size=1, max_len_b=8, exit_strategy="oracle")
    out = oracle.generate([model], dict(sample, target=ref))
    for mine, theirs in zip(out, exit1):  # the final EOS may be forced by --max-len-b, not predicted
        assert torch.equal(mine[0]["tokens"], theirs[0]["tokens"]) and mine[0]["exits"][:-1].eq(1).all()
    out = oracle.generate([model], sample)  # random references
    for i, hypos in enumerate(out):
        tokens, exits = hypos[0]["tokens"], hypos[0]["exits"]
        early = exits < 3
        gold = sample["target"][i, : len(tokens)]
        assert torch.equal(tokens[: len(gold)][early[: len(gold)]], gold[early[: len(gold)]])
        assert exits[len(gold):].eq(3).all()
    with pytest.raises(ConfigError, match="reference"):
        oracle.generate([model], {k: v for k, v in sample.items() if k != "target"})


def test_average_exit_accounting(model_and_dict):
    model, d = model_and_dict
    gen = AdaptiveSequenceGenerator([model], d, beam_size=2, max_len_b=8, exit_threshold="0.5")
    hypos = gen.generate([model], make_sample(d))
    best_exits = torch.cat([sent[0]["exits"] for sent in hypos])
    assert gen.stats.token_hist.sum() == best_exits.numel()
    assert gen.stats.average_exit == pytest.approx(best_exits.float().mean().item())
    assert 1.0 <= gen.stats.compute_average_exit <= 3.0
    assert gen.stats.summary().startswith(f"AE={best_exits.float().mean().item():.4f} ")


def test_exit_stats_histograms():
    stats = ExitStats(4)
    stats.add_hypothesis(torch.tensor([1, 1, 4]))
    stats.add_rows(torch.tensor([1, 2, 3, 4, 4]))
    assert stats.average_exit == 2.0 and stats.compute_average_exit == pytest.approx(14 / 5)
    assert "exits=[2,0,0,1]" in stats.summary()


@pytest.mark.parametrize("kwargs, flag", [
    ({"fixed_exit": 0}, "--fixed-exit"), ({"fixed_exit": 4}, "--fixed-exit"),
    ({"exit_threshold": "nan"}, "--exit-threshold"), ({"exit_threshold": "1.5"}, "--exit-threshold"),
    ({"exit_threshold": "-0.1"}, "--exit-threshold"), ({"exit_threshold": "0.1,0.2,0.3"}, "--exit-threshold"),
    ({"exit_strategy": "bogus"}, "--exit-strategy"), ({"exit_strategy": "confidence"}, "--exit-threshold"),
    ({"exit_strategy": "fixed"}, "--fixed-exit"), ({"exit_gather_ratio": 2.0}, "--exit-gather-ratio"), ({"exit_kv": "lazy"}, "--exit-kv"),
])
def test_bad_generation_flags_fail_before_decoding(model_and_dict, kwargs, flag):
    model, d = model_and_dict
    with pytest.raises(ConfigError, match=flag):
        AdaptiveSequenceGenerator([model], d, beam_size=2, **kwargs)


def test_estimator_strategy_needs_an_estimator():
    model, task, _ = tiny_model()
    with pytest.raises(ConfigError, match="--exit-threshold"):
        AdaptiveSequenceGenerator([model], task.target_dictionary, exit_threshold="0.5")
    with pytest.raises(ConfigError, match="--depth-estimator"):
        AdaptiveSequenceGenerator([model], task.target_dictionary, exit_strategy="estimator")
    # confidence works on any adaptive checkpoint
    gen = AdaptiveSequenceGenerator([model], task.target_dictionary, exit_strategy="confidence",
                                    exit_threshold="0.2", beam_size=2, max_len_b=5)
    gen.generate([model], make_sample(task.target_dictionary))
    assert gen.stats.token_hist.sum() > 0


def test_another_architecture_is_refused(model_and_dict):
    from helpers import parse_model_args, tiny_task
    _, d = model_and_dict
    args = parse_model_args("transformer_tiny")
    stock = tiny_task(d, args).build_model(args)
    with pytest.raises(ConfigError, match="adaptive_transformer"):
        build_exit_policy(stock.decoder, "fixed", fixed_exit=1)


@pytest.mark.parametrize("estimator", ["sequence", "token-multinomial", "sequence-poisson-binomial",
                                       "token-poisson-binomial", "token-geometric"])
def test_every_estimator_decodes_and_sequence_level_is_one_depth_per_sentence(estimator):
    model, task, _ = tiny_model(extra=["--depth-estimator", estimator])
    d = task.target_dictionary
    gen = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=8, exit_threshold="0.5")
    hypos = gen.generate([model], make_sample(d))
    for sent in hypos:
        for h in sent:
            assert h["exits"].min() >= 1 and h["exits"].max() <= 3
        if model.decoder.depth_estimator.level == "sequence":
            depths = {int(e) for h in sent for e in h["exits"]}
            assert len(depths) == 1  # one depth per source sentence, shared by its whole beam
