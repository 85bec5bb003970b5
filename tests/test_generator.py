"""Exit-aware beam search: exactness at full depth, incremental == teacher-forced under the copy
rule, real per-row skipping, AE accounting, bad generation flags."""
import pytest
import torch
import torch.nn.functional as F
from fairseq.sequence_generator import SequenceGenerator

from fairseq_dat.errors import ConfigError
from fairseq_dat.exit_policy import ExitStats, PlannedDepth, build_exit_policy
from fairseq_dat.modules.depth_estimators import geometric_halts, masked_mean_over_source
from fairseq_dat.modules.exit_aware_decoding import LeanBlockCache, LeanBufferPool
from fairseq_dat.sequence_generator import AdaptiveSequenceGenerator
from helpers import incremental_step, materialize_all_pending_kv, random_batch, tiny_model

STEPS = ["lean", "fairseq"]  # --decoder-step: every equivalence test runs on both block steps


def make_sample(dictionary, bsz=6, src_len=7, seed=0):
    net_input, target = random_batch(dictionary, bsz=bsz, src_len=src_len, seed=seed)
    return {"net_input": {"src_tokens": net_input["src_tokens"], "src_lengths": net_input["src_lengths"]},
            "id": torch.arange(bsz), "target": target}


def assert_same_hypotheses(ref, ours, bitwise=True):
    """Token ids equal for every hypothesis of every sentence; scores equal (``bitwise``: fairseq's
    layer path) or within 1e-4 (the lean step: another attention kernel, same weights)."""
    assert len(ref) == len(ours)
    for ref_hypos, our_hypos in zip(ref, ours):
        assert len(ref_hypos) == len(our_hypos)
        for a, b in zip(ref_hypos, our_hypos):
            assert torch.equal(a["tokens"], b["tokens"])
            if bitwise:
                assert torch.equal(a["positional_scores"], b["positional_scores"])
                assert float(a["score"]) == float(b["score"])
            else:
                torch.testing.assert_close(a["positional_scores"], b["positional_scores"], rtol=0, atol=1e-4)
                assert float(a["score"]) == pytest.approx(float(b["score"]), abs=1e-4)


@pytest.fixture(scope="module")
def model_and_dict():
    model, task, _ = tiny_model(extra=["--depth-estimator", "token-geometric"])
    return model, task.target_dictionary


@pytest.mark.parametrize("gen_kwargs", [
    {"beam_size": 1}, {"beam_size": 4}, {"beam_size": 5, "len_penalty": 0.5},
    {"beam_size": 3, "max_len_a": 1.2, "max_len_b": 3}, {"beam_size": 2, "max_len_b": 6, "normalize_scores": False},
])
@pytest.mark.parametrize("exit_kwargs", [{"fixed_exit": 3}, {"exit_threshold": "1.0"}, {}])
@pytest.mark.parametrize("step", STEPS)
def test_full_depth_is_exactly_fairseqs_sequence_generator(model_and_dict, gen_kwargs, exit_kwargs, step):
    """--fixed-exit N, a threshold that never fires, and no flags all decode as fairseq does:
    bitwise on fairseq's layer path, same tokens and scores within 1e-4 on the lean step."""
    model, d = model_and_dict
    sample = make_sample(d)
    gen_kwargs = {"max_len_b": 12, **gen_kwargs}
    ref = SequenceGenerator([model], d, **gen_kwargs).generate([model], sample)
    gen = AdaptiveSequenceGenerator([model], d, **exit_kwargs, **gen_kwargs, decoder_step=step)
    ours = gen.generate([model], sample)
    assert_same_hypotheses(ref, ours, bitwise=step == "fairseq")
    for hypos in ours:
        for h in hypos:
            assert h["exits"].tolist() == [3] * len(h["tokens"])
    assert gen.stats.average_exit == 3.0 and gen.stats.compute_average_exit == 3.0


@pytest.mark.parametrize("step", STEPS)
def test_full_depth_exact_with_prefix_tokens_and_batch_one(model_and_dict, step):
    model, d = model_and_dict
    sample = make_sample(d)
    prefix = sample["target"][:, :2]
    ref = SequenceGenerator([model], d, beam_size=3, max_len_b=10).generate([model], sample, prefix_tokens=prefix)
    ours = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=10, fixed_exit=3, decoder_step=step).generate(
        [model], sample, prefix_tokens=prefix)
    assert_same_hypotheses(ref, ours, bitwise=step == "fairseq")
    one = make_sample(d, bsz=1)
    assert_same_hypotheses(SequenceGenerator([model], d, beam_size=4).generate([model], one),
                           AdaptiveSequenceGenerator([model], d, beam_size=4, fixed_exit=3,
                                                     decoder_step=step).generate([model], one),
                           bitwise=step == "fairseq")


@pytest.mark.parametrize("extra", [["--decoder-normalize-before"], ["--exit-classifiers", "shared"]])
def test_lean_step_equals_fairseq_on_pre_norm_and_shared_classifiers(extra):
    """Pre-norm blocks (one LayerNorm per exit) and one shared classifier: the lean step at full
    depth gives fairseq's hypotheses, and at mixed exits the fairseq-layer path's."""
    model, task, _ = tiny_model(extra=extra)
    d = task.target_dictionary
    sample = make_sample(d)
    ref = SequenceGenerator([model], d, beam_size=4, max_len_b=12).generate([model], sample)
    lean = AdaptiveSequenceGenerator([model], d, beam_size=4, max_len_b=12).generate([model], sample)
    assert_same_hypotheses(ref, lean, bitwise=False)
    runs = [AdaptiveSequenceGenerator([model], d, beam_size=4, max_len_b=10, exit_strategy="confidence",
                                      exit_threshold="0.15", decoder_step=step).generate([model], sample)
            for step in STEPS]
    assert_same_hypotheses(*runs, bitwise=False)
    exits = torch.cat([h["exits"] for sent in runs[0] for h in sent])
    assert exits.min() < exits.max()


@pytest.mark.parametrize("kv_mode", ["deferred", "eager"])
def test_lean_step_equals_fairseq_layers_at_random_exits(model_and_dict, kv_mode):
    """Uniform random exits (the same draws on both paths): same tokens and exits, scores within
    1e-4, also while the batch shrinks as sentences finish."""
    model, d = model_and_dict
    sample = make_sample(d, bsz=7)
    runs = []
    for step in STEPS:
        torch.manual_seed(3)
        gen = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=14, exit_strategy="uniform",
                                        exit_kv=kv_mode, decoder_step=step)
        runs.append(gen.generate([model], sample))
    assert_same_hypotheses(*runs, bitwise=False)
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            assert torch.equal(x["exits"], y["exits"])
    lengths = {len(sent[0]["tokens"]) for sent in runs[0]}
    assert len(lengths) > 1  # sentences finished at different steps


def test_lean_caches_grow_past_their_initial_capacity(model_and_dict, monkeypatch):
    """Buffers grown by doubling (from 2 positions here: 2, 4, 8) keep every position: step-by-step
    decoding without beam reordering (which would copy them into new buffers) equals the full
    pass, and beam search decodes as fairseq does."""
    model, d = model_and_dict
    monkeypatch.setattr(LeanBlockCache, "initial_capacity", 2)
    net_input, target = random_batch(d, bsz=4, tgt_len=7, seed=6)
    enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    prev, exits = net_input["prev_output_tokens"], torch.full(target.shape, 3)
    state, steps = {}, []
    with torch.no_grad():
        full, _ = model.decoder(prev, encoder_out=enc)
        for t in range(prev.size(1)):
            steps.append(incremental_step(model.decoder, prev[:, : t + 1], enc, state, exits, kv_mode="eager")[0])
    assert model.decoder.lean_caches(state)[0].k.size(2) == 8  # B x H x capacity x d
    real = prev.ne(d.pad())
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-5)
    # beam search: the generator's size hint (2 positions here) is outgrown, buffers double and are reordered
    monkeypatch.setattr(AdaptiveSequenceGenerator, "decoding_steps", lambda self, sample: 2)
    sample = make_sample(d)
    ref = SequenceGenerator([model], d, beam_size=3, max_len_b=12, min_len=9).generate([model], sample)
    ours = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=12, min_len=9).generate([model], sample)
    assert_same_hypotheses(ref, ours, bitwise=False)


def fresh_lean_pool() -> LeanBufferPool:
    """This thread's buffer pool replaced by an empty one (nothing recycled from earlier tests)."""
    LeanBufferPool._threads.pool = LeanBufferPool()
    return LeanBufferPool.for_this_thread()


def test_generator_recycles_lean_buffers_across_batches(model_and_dict):
    """The lean step's key/value buffers go back to the thread's pool after each batch and serve the next
    one (no fresh multi-megabyte allocation per block and batch on a CPU), also for another generator:
    the same batch decoded again allocates nothing new, and buffers still holding another batch's
    values change no hypothesis (full depth, and uniform exits with their row-subset and deferred paths)."""
    model, d = model_and_dict
    first, second = make_sample(d, bsz=6, seed=0), make_sample(d, bsz=5, src_len=9, seed=3)
    for kwargs in ({}, {"exit_strategy": "uniform"}):
        def fresh(sample):  # an empty pool: nothing recycled
            fresh_lean_pool()
            torch.manual_seed(0)
            return AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=12, **kwargs).generate([model], sample)
        ref_first, ref_second = fresh(first), fresh(second)
        pool = fresh_lean_pool()
        gen = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=12, **kwargs)
        torch.manual_seed(0)
        gen.generate([model], first)
        assert gen.lean_pool is pool and not pool.lent and pool.free  # every buffer of the batch came back
        buffers = {t.data_ptr() for t in pool.free}
        torch.manual_seed(0)
        assert_same_hypotheses(ref_first, gen.generate([model], first))
        assert {t.data_ptr() for t in pool.free} == buffers  # the same batch again: no new buffer
        torch.manual_seed(0)
        assert_same_hypotheses(ref_second, gen.generate([model], second))
        torch.manual_seed(0)
        other = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=12, **kwargs)
        assert_same_hypotheses(ref_first, other.generate([model], first))


def test_lean_buffer_pool_is_shared_per_thread_and_holds_one_batch(model_and_dict):
    """Every generator of a thread decodes with the same pool (54 generators of one benchmark process,
    each with its own pool, ran out of 24 GiB), and a batch's end releases the buffers it did not use:
    the pool holds one batch's buffers, not every buffer any earlier batch needed."""
    model, d = model_and_dict
    pool = fresh_lean_pool()
    gens = [AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=20) for _ in range(3)]
    assert all(g.lean_pool is pool for g in gens)
    for g in gens:
        g.generate([model], make_sample(d, bsz=6, src_len=9, seed=1))
    assert pool.held() == fresh_generation_held(model, d)
    pool, like = fresh_lean_pool(), torch.zeros(1)
    big = [pool.empty((1000,), like, torch.float32) for _ in range(3)]
    pool.reclaim()
    small = pool.empty((10,), like, torch.float32)  # the next batch needs one buffer
    assert small.data_ptr() in {b.data_ptr() for b in big}  # recycled
    pool.reclaim()
    assert pool.held() == 1000 and not pool.lent  # the two it did not use are gone


def fresh_generation_held(model, d) -> int:
    pool = fresh_lean_pool()
    AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=20).generate([model], make_sample(d, bsz=6, src_len=9, seed=1))
    held = pool.held()
    fresh_lean_pool()
    return held


def test_padded_target_positions_are_masked_on_both_steps(model_and_dict):
    """A padding token inside the target prefix (fairseq masks it as a key for every later query): the
    lean step equals fairseq's layers step by step (not the teacher-forced pass: fairseq's incremental
    positions count the padding, its full pass does not)."""
    model, d = model_and_dict
    net_input, target = random_batch(d, bsz=4, tgt_len=7, seed=7)
    prev = net_input["prev_output_tokens"].clone()
    prev[2, 3] = d.pad()
    enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    exits = torch.randint(1, 4, target.shape, generator=torch.Generator().manual_seed(2))
    real = prev.ne(d.pad())
    outputs = []
    with torch.no_grad():
        for step in STEPS:
            state, steps = {}, []
            for t in range(prev.size(1)):
                steps.append(incremental_step(model.decoder, prev[:, : t + 1], enc, state, exits, kv_mode="eager",
                                              decoder_step=step)[0])
            outputs.append(torch.cat(steps, 1)[real])
    torch.testing.assert_close(*outputs, rtol=1e-4, atol=1e-5)


def test_lean_step_keeps_no_copy_of_the_weights():
    """The lean step reads the model's own parameters: no new parameter or buffer, and weights
    changed between two generate() calls are the ones the second call uses."""
    model, task, _ = tiny_model(seed=4)
    d = task.target_dictionary
    sample = make_sample(d)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    gen = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=10)
    gen.generate([model], sample)
    assert [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()] == names
    with torch.no_grad():
        for layer in model.decoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.mul_(1.7)
    ref = SequenceGenerator([model], d, beam_size=3, max_len_b=10).generate([model], sample)
    assert_same_hypotheses(ref, gen.generate([model], sample), bitwise=False)


def test_lean_step_falls_back_to_fairseq_layers_it_does_not_mirror():
    model, task, _ = tiny_model(extra=["--cross-self-attention"])
    gen = AdaptiveSequenceGenerator([model], task.target_dictionary, beam_size=2, fixed_exit=2)
    assert gen.policy.decoder_step == "fairseq"
    with pytest.raises(ConfigError, match="--decoder-step"):
        AdaptiveSequenceGenerator([model], task.target_dictionary, decoder_step="fast")


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("kv_mode", ["deferred", "eager"])
@pytest.mark.parametrize("gather_ratio", [0.0, 0.5, 1.0])
def test_incremental_equals_teacher_forced_at_every_exit_pattern(model_and_dict, gather_ratio, kv_mode, step):
    """Step-by-step decoding with given exits = one teacher-forced pass (fairseq's layers) with the same
    exits and the copy rule, at every block, on both block steps; gather_ratio 0 forces the masked
    path, 1 the gathered sub-batch; deferred keys/values, once materialized, equal the eager ones and
    the full pass's."""
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
                out, extra = incremental_step(dec, prev[:, : t + 1], enc, state, exits, gather_ratio=gather_ratio,
                                              kv_mode=kv_mode, decoder_step=step)
                assert torch.equal(extra["exits"], exits[:, t])
                steps.append(out)
            real = prev.ne(d.pad())  # outputs at padded inputs are never used
            torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-5)
            # every block's cached keys equal the keys the teacher-forced pass computes from its input
            materialize_all_pending_kv(dec, state)
            for n, layer in enumerate(dec.layers):
                block_input = states[n - 1] if n > 0 else dec.embed_target(prev)[0]
                keys = layer.self_attn.k_proj(block_input)  # T x B x C
                cached = dec.cached_self_attention_kv(n, state)[0]  # B x H x T x d
                cached = cached.permute(2, 0, 1, 3).reshape(keys.shape)
                torch.testing.assert_close(cached[real.t()], keys[real.t()], rtol=1e-4, atol=1e-5)
            assert torch.equal(dec.exit_history(state), exits)


@pytest.mark.parametrize("step", STEPS)
def test_beam_reordering_carries_the_exit_history(model_and_dict, step):
    """Each best hypothesis replayed teacher-forced with its own exits gives the generator's scores,
    and its exits are where the Tok-geometric rule (``geometric_halts``, χ^n > 0.5) stops on the
    replayed states: the generator's decisions are the tested decision function's."""
    model, d = model_and_dict
    gen = AdaptiveSequenceGenerator([model], d, beam_size=4, max_len_b=10, exit_threshold="0.5", decoder_step=step)
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
        with torch.no_grad():
            states, _ = model.decoder.teacher_forced_block_states(prev, enc_i, best["exits"].unsqueeze(0))
        for t, exit_t in enumerate(best["exits"].tolist()):
            halts = [bool(geometric_halts(model.decoder.depth_estimator.halting_prob(states[n - 1][t, 0], n - 1), 0.5))
                     for n in range(1, exit_t + 1 if exit_t < 3 else 3)]
            assert halts == [False] * (exit_t - 1) + ([True] if exit_t < 3 else []), (i, t, exit_t, halts)


class RowCounter:
    """Records how many rows each call of each decoder block computes (its final layer norm's input,
    a module call on either block step; the lean step calls the linear layers' weights directly)."""

    def __init__(self, decoder):
        self.rows = [[] for _ in decoder.layers]
        self.handles = [layer.final_layer_norm.register_forward_pre_hook(self.hook(i)) for i, layer in enumerate(decoder.layers)]

    def hook(self, index):
        def record(module, inputs):
            self.rows[index].append(inputs[0].numel() // inputs[0].size(-1))
        return record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("step", STEPS)
def test_blocks_run_only_for_rows_that_have_not_exited(model_and_dict, step):
    model, d = model_and_dict
    dec = model.decoder
    net_input, target = random_batch(d, bsz=8, tgt_len=5, seed=2)
    enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    exits = torch.full(target.shape, 3)
    exits[:6] = 1  # 6 of 8 rows exit at block 1 at every step
    state = {}
    with RowCounter(dec) as counter, torch.no_grad():
        for t in range(target.size(1)):
            incremental_step(dec, net_input["prev_output_tokens"][:, : t + 1], enc, state, exits, gather_ratio=0.5,
                             decoder_step=step)
    assert counter.rows[0] == [8] * 5  # block 1: every row
    # blocks 2 and 3: only the 2 rows, also at their first call (the source keys/values are cached
    # without running the block on every row)
    assert counter.rows[1] == [2] * 5 and counter.rows[2] == [2] * 5


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
    lean = LeanBlockCache(layer)  # the lean step's source keys/values: the same tensors
    layer.encoder_attn.set_beam_size(beam)
    try:
        lean.cache_source(layer.encoder_attn, enc, enc_mask)
    finally:
        layer.encoder_attn.set_beam_size(1)
    assert torch.equal(lean.src_k, a["prev_key"]) and torch.equal(lean.src_v, a["prev_value"])
    assert torch.equal(lean.src_mask[:, 0, 0], a["prev_key_padding_mask"]) and lean.rows_per_source == beam


@pytest.mark.parametrize("step", STEPS)
def test_deferred_keys_values_skip_blocks_no_row_reaches(model_and_dict, step):
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
            incremental_step(dec, net_input["prev_output_tokens"][:, : t + 1], enc, state, exits, kv_mode="deferred",
                             decoder_step=step)
            lengths = [dec.cached_positions(i, state) for i in range(len(dec.layers))]
            assert lengths == ([t + 1, 0, 0] if t < 4 else [t + 1, 5, 5]), (t, lengths)


@pytest.mark.parametrize("step", STEPS)
def test_no_row_runs_a_block_when_all_exit_early(model_and_dict, step):
    model, d = model_and_dict
    with RowCounter(model.decoder) as counter:
        gen = AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=6, fixed_exit=1, decoder_step=step)
        hypos = gen.generate([model], make_sample(d))
    assert counter.rows[0] and counter.rows[1] == [] and counter.rows[2] == []
    assert gen.stats.average_exit == 1.0
    assert all(h["exits"].eq(1).all() for sent in hypos for h in sent)


@pytest.mark.parametrize("step", STEPS)
def test_deferred_and_eager_keys_values_decode_identically(model_and_dict, step):
    """Deferring the skipped blocks' keys/values (and their beam reorderings) changes no hypothesis,
    score or exit against computing them at every step."""
    model, d = model_and_dict
    sample = make_sample(d)
    runs = [AdaptiveSequenceGenerator([model], d, beam_size=4, max_len_b=10, exit_strategy="confidence",
                                      exit_threshold="0.3", exit_kv=mode, decoder_step=step).generate([model], sample)
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


@pytest.mark.parametrize("step", STEPS)
def test_blocks_skipped_for_several_steps_catch_up_with_the_beam(model_and_dict, step):
    """Blocks 2-3 hold a cache after step 2, are skipped by every row for three steps of beam
    reordering, then run again: their caches must follow the composed reorderings exactly as if
    they had been reordered (and fed the copied keys/values) at every step."""
    model, d = model_and_dict
    sample = make_sample(d)
    runs = []
    for mode in ("deferred", "eager"):
        gen = AdaptiveSequenceGenerator([model], d, beam_size=4, max_len_b=10, min_len=8, fixed_exit=1)
        gen.policy = DepthPerStep([3, 3, 1, 1, 1, 3], kv_mode=mode, stats=gen.stats, decoder_step=step)
        runs.append(gen.generate([model], sample))
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            assert torch.equal(x["tokens"], y["tokens"])
            torch.testing.assert_close(x["positional_scores"], y["positional_scores"], rtol=1e-5, atol=1e-5)


class OneDeepRowPerStep(PlannedDepth):
    """Every row exits at block 1 but one per step (row ``step mod B``), which runs every block: the
    stragglers of token-level exits."""

    def plan_step(self, decoder, encoder_out, incremental_state, prev_output_tokens):
        bsz, step = prev_output_tokens.shape
        depth = torch.ones(bsz, dtype=torch.long)
        depth[(step - 1) % bsz] = decoder.num_layers
        return {"depth": depth}


def test_straggler_rows_catch_up_alone_and_decode_as_eager_keys_values(model_and_dict, monkeypatch):
    """Deferred keys/values on the lean step with one row per step sent through every block (fewer rows
    than ``gather_ratio``): only that row's history is caught up — the caches of blocks 2..N are never
    re-ordered for every row while the batch decodes — and hypotheses, scores and exits equal eager
    keys/values' (every row's keys/values at every block and step) on both block steps."""
    model, d = model_and_dict
    sample = make_sample(d)
    reordered = []  # the block (its fc1 weight) of every cache re-ordered for all rows
    reorder = LeanBlockCache.reorder

    def recording_reorder(cache, order):
        reordered.append(cache.linears["fc1"][0].data_ptr())
        return reorder(cache, order)

    monkeypatch.setattr(LeanBlockCache, "reorder", recording_reorder)
    runs = {}
    for mode, step in (("deferred", "lean"), ("eager", "lean"), ("eager", "fairseq")):
        reordered.clear()
        gen = AdaptiveSequenceGenerator([model], d, beam_size=4, max_len_b=10, min_len=8, fixed_exit=1)
        gen.policy = OneDeepRowPerStep(kv_mode=mode, stats=gen.stats, decoder_step=step)
        runs[mode, step] = gen.generate([model], sample)
        if mode == "deferred":
            assert set(reordered) == {model.decoder.layers[0].fc1.weight.data_ptr()}, len(reordered)
    reference = runs["eager", "fairseq"]
    for run in (runs["deferred", "lean"], runs["eager", "lean"]):
        for a, b in zip(run, reference):
            for x, y in zip(a, b):
                assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["exits"], y["exits"])
                torch.testing.assert_close(x["positional_scores"], y["positional_scores"], rtol=1e-4, atol=1e-4)
    exits = torch.cat([h["exits"] for sent in reference for h in sent])
    assert exits.min() == 1 and exits.max() == len(model.decoder.layers)


def test_straggler_history_is_written_where_no_other_row_reads_it(model_and_dict):
    """The write-back rule of the straggler path: a cache row read by running rows only is overwritten in
    place by the first of them, any other writer takes a cache row that no current row reads (a pruned
    hypothesis's), and rows that did not run keep reading what they read before."""
    model, _ = model_and_dict
    layer = model.decoder.layers[1]
    cache = LeanBlockCache(layer)
    heads, dim = cache.heads, cache.head_dim
    with torch.no_grad():  # 6 cache rows holding 2 positions, all filled
        cache.append(torch.randn(6, 2, heads * dim), torch.randn(6, 2, heads * dim))
    before = cache.k[:, :, :2].clone()
    # beam order since the cache was last in step: rows 0,1 read cache row 0; rows 2,3 row 2; rows 4,5 row 5
    order = torch.tensor([0, 0, 2, 2, 5, 5])
    running = torch.tensor([0, 1, 2])  # row 2 shares cache row 2 with row 3, which does not run
    states = torch.randn(6, 2, layer.self_attn.embed_dim)
    with torch.no_grad():
        history = cache.row_history(layer, running, order, states, None)
        history.k[:, :, 2] = 7.0  # this step's keys
        new_order = cache.keep_row_history(history, running, order, 6)
    assert new_order[0] == 0  # the first reader of cache row 0 writes in place (every reader of it runs)
    assert set(new_order[1:3].tolist()) == {1, 3}  # the others take rows nobody read (1 and 3 were pruned)
    assert new_order[3:].tolist() == [2, 5, 5]  # rows that did not run read what they read before
    assert torch.equal(cache.k[2, :, :2], before[2]) and torch.equal(cache.k[5, :, :2], before[5])
    for row in range(3):
        target = int(new_order[row])
        assert torch.equal(cache.k[target, :, :2], before[int(order[row])])  # its history, read through the order
        assert bool((cache.k[target, :, 2] == 7.0).all()) and int(cache.valid[target]) == 3
    assert cache.valid[[2, 4, 5]].tolist() == [2, 2, 2] and cache.length == 3


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


# ---- on the command line --------------------------------------------------------------------------


def cli_generate(data, path, *extra):
    from cli_helpers import run_tool
    return run_tool("fairseq-generate", data, "--user-dir", "fairseq_dat", "--task", "adaptive_translation",
                    "--path", path, "--cpu", "--beam", "3", "--batch-size", "8", "--max-len-b", "8", *extra)


def test_ensembles_are_refused_on_the_command_line(corpus, adaptive_checkpoint):
    """--path a.pt:b.pt: one line naming --path, instead of silently decoding with the first model."""
    from cli_helpers import assert_one_line_error
    proc = cli_generate(corpus, f"{adaptive_checkpoint}:{adaptive_checkpoint}")
    assert_one_line_error(proc, "--path", "ensembles are not supported by the exit-aware generator")
    assert "H-" not in proc.stdout


def test_decoder_step_flag_on_the_command_line(corpus, adaptive_checkpoint):
    """fairseq-generate --decoder-step lean (the default) and fairseq print the same hypotheses, at
    full depth (= fairseq's --task translation) and under the estimator."""
    from cli_helpers import check_ok, hypotheses, run_tool
    stock = hypotheses(check_ok(run_tool(
        "fairseq-generate", corpus, "--user-dir", "fairseq_dat", "--task", "translation", "--path",
        adaptive_checkpoint, "--cpu", "--beam", "3", "--batch-size", "8", "--max-len-b", "8")).stdout)
    for extra in ((), ("--exit-threshold", "0.5")):
        runs = [hypotheses(check_ok(cli_generate(corpus, adaptive_checkpoint, "--decoder-step", step, *extra)).stdout)
                for step in STEPS]
        assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 24
        for sid, (score, tokens) in runs[0].items():
            assert tokens == runs[1][sid][1] and score == pytest.approx(runs[1][sid][0], abs=1e-3)
            if not extra:
                assert tokens == stock[sid][1]
    bad = cli_generate(corpus, adaptive_checkpoint, "--decoder-step", "fast")
    assert bad.returncode != 0 and "--decoder-step" in bad.stderr


# ---- sequence-level depths, sentences decoded deepest first (--exit-sequence-order depth) ----------


@pytest.fixture(scope="module")
def sequence_model_and_dict():
    """A sequence-level estimator whose depths differ from sentence to sentence on ``make_sample(d,
    bsz=9, seed=4)``: the mean source states of a random model are nearly equal, so the estimator reads
    their deviations from the batch's mean, strongly; end-of-sentence made likelier (a random model
    rarely ends a hypothesis), so sentences finish at different steps."""
    model, task, _ = tiny_model(extra=["--depth-estimator", "sequence"])
    d = task.target_dictionary
    proj = model.decoder.depth_estimator.proj
    with torch.no_grad():
        enc = model.encoder(**make_sample(d, bsz=9, seed=4)["net_input"])
        pooled = masked_mean_over_source(enc["encoder_out"][0], enc["encoder_padding_mask"][0])
        torch.manual_seed(5)
        proj.weight.normal_(0, 50.0)
        proj.bias.copy_(-proj.weight @ pooled.mean(0))
        for weight in {id(p.weight): p.weight for p in map(model.decoder.exit_projection, (1, 2, 3))}.values():
            weight[d.eos()] *= 2
    return model, d


def sequence_runs(model, d, sample, beam, orders=("depth", "batch"), steps=("lean",), **kwargs):
    runs = {}
    for order in orders:
        for step in steps:
            gen = AdaptiveSequenceGenerator([model], d, beam_size=beam, max_len_b=14, exit_threshold="0.5",
                                            exit_sequence_order=order, decoder_step=step, **kwargs)
            runs[order, step] = gen.generate([model], sample)
    return runs


@pytest.mark.parametrize("beam", [1, 3])
def test_depth_sorted_decoding_equals_the_batch_order(sequence_model_and_dict, beam):
    """Decoding deepest first gives every sentence, in the caller's order, the hypotheses, scores and
    exits of the batch-order lean step and of fairseq's layers; the depths are neither all equal nor
    already sorted, and sentences finish at different steps (the batch shrinks)."""
    model, d = sequence_model_and_dict
    sample = make_sample(d, bsz=9, seed=4)
    runs = sequence_runs(model, d, sample, beam, steps=("lean", "fairseq"))
    ref = runs["batch", "fairseq"]
    depths = [int(sent[0]["exits"][0]) for sent in ref]
    assert len(set(depths)) == 3 and depths != sorted(depths, reverse=True)
    assert len({len(sent[0]["tokens"]) for sent in ref}) > 1
    for key in (("depth", "lean"), ("batch", "lean")):
        assert_same_hypotheses(ref, runs[key], bitwise=False)
        for a, b in zip(ref, runs[key]):
            for x, y in zip(a, b):
                assert torch.equal(x["exits"], y["exits"])


def test_depth_sorted_blocks_run_only_the_rows_that_reach_them(sequence_model_and_dict):
    """Block n computes exactly the beam rows of the sentences whose depth is ≥ n, at every step (no
    row run and discarded, no copied keys/values: its caches hold those rows only)."""
    model, d = sequence_model_and_dict
    sample = make_sample(d, bsz=9, seed=4)
    beam = 3
    gen = AdaptiveSequenceGenerator([model], d, beam_size=beam, max_len_b=14, exit_threshold="0.5",
                                    exit_sequence_order="depth")
    with RowCounter(model.decoder) as counter:
        hypos = gen.generate([model], sample)
    depths = torch.tensor([int(sent[0]["exits"][0]) for sent in hypos])
    lengths = [max(len(h["tokens"]) for h in sent) for sent in hypos]
    first = [beam * int((depths >= n).sum()) for n in (1, 2, 3)]
    for n in range(3):
        assert counter.rows[n][0] == first[n]  # step 0: all beam rows of the sentences reaching block n+1
        assert all(rows <= first[n] and rows % beam == 0 for rows in counter.rows[n])
        # the block runs until the last sentence that reaches it finishes
        assert len(counter.rows[n]) == max(length for length, depth in zip(lengths, depths) if depth > n)


def test_depth_sorted_decoding_keeps_prefix_tokens_with_their_sentences(sequence_model_and_dict):
    model, d = sequence_model_and_dict
    sample = make_sample(d, bsz=9, seed=4)
    prefix = sample["target"][:, :2]
    runs = {order: AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=14, exit_threshold="0.5",
                                             exit_sequence_order=order).generate([model], sample, prefix_tokens=prefix)
            for order in ("depth", "batch")}
    assert_same_hypotheses(runs["batch"], runs["depth"], bitwise=False)
    for sent, pre in zip(runs["depth"], prefix):
        assert torch.equal(sent[0]["tokens"][:2], pre)
    assert torch.equal(sample["id"], torch.arange(9))  # the caller's sample is not reordered


def test_bad_sequence_order_names_its_flag(sequence_model_and_dict):
    model, d = sequence_model_and_dict
    with pytest.raises(ConfigError, match="--exit-sequence-order"):
        AdaptiveSequenceGenerator([model], d, exit_threshold="0.5", exit_sequence_order="sorted")


@pytest.mark.parametrize("exit_kwargs", [{}, {"fixed_exit": 2}, {"exit_strategy": "uniform", "exit_threshold": None},
                                         {"exit_threshold": "0.5"}])
def test_autocast_bf16_decodes_with_bf16_products_and_float32_scores(model_and_dict, exit_kwargs):
    """``--autocast-bf16``: every Linear of the step runs in bfloat16 (the lean step's fused q/k/v too), the beam
    search's scores stay float32, and the hypotheses are float32's up to bfloat16's rounding: the same tokens
    for most sentences, and where equal, scores within 0.05 nats."""
    model, d = model_and_dict
    sample = make_sample(d, bsz=8, seed=2)
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, i, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    qkv = []
    lean_linear = F.linear
    try:
        F.linear = lambda x, w, b=None: qkv.append(w.dtype) or lean_linear(x, w, b)
        runs = []
        for bf16 in (False, True):
            torch.manual_seed(0)  # the uniform exits' draws
            runs.append(AdaptiveSequenceGenerator([model], d, beam_size=3, max_len_b=10, autocast_bf16=bf16,
                                                  **exit_kwargs).generate([model], sample))
    finally:
        F.linear = lean_linear
        for h in hooks:
            h.remove()
    assert seen == {torch.float32, torch.bfloat16} and torch.bfloat16 in qkv
    same = 0
    for ref, ours in zip(*runs):
        assert ours[0]["score"].dtype == torch.float32 and ours[0]["positional_scores"].dtype == torch.float32
        if torch.equal(ref[0]["tokens"], ours[0]["tokens"]):
            same += 1
            assert abs(float(ref[0]["score"]) - float(ours[0]["score"])) < 0.05
    assert same >= 6, same
