"""Exit-aware incremental decoding (Elbayad et al., 2020, §3 "inference"; the copy rule of §2.2.1 and
App. B at decoding time): one beam-search step in which every row (hypothesis) stops at its own block.

``AdaptiveTransformerDecoder`` mixes in :class:`ExitAwareDecoding`; the exit policy
(:mod:`fairseq_dat.exit_policy`, set by the exit-aware generator as ``decoder.exit_policy`` for one
batch) decides where each row exits. Rows that exited are not computed by deeper blocks; a deeper
block only receives the keys/values of their copied state (FS = 4 d² per skipped block, App. B).

Two implementations of a block step, chosen by ``--decoder-step`` (``policy.decoder_step``):

- ``lean`` (default): a torch-only step on the model's own weights (:class:`LeanBlockCache`,
  :func:`lean_block`): self-attention keys/values in preallocated per-block buffers written in place
  (fairseq's B x H x T x d layout, grown by doubling, reordered for the beam by one ``index_select``
  of the filled part), one query's attention as two batched matrix products, q/k/v as one
  projection by the three weights concatenated once per batch, source keys/values once per block and
  batch, ``torch.nn.functional.scaled_dot_product_attention`` on accelerators (two batched matrix
  products on a CPU: :func:`few_query_attention`), and a row-subset path that runs only
  the rows that have not exited and gathers only their caches;
- ``fairseq``: fairseq's own ``TransformerDecoderLayer`` calls and ``MultiheadAttention`` caches
  (bitwise fairseq's computation when every row runs a block), kept for comparison.

Keys/values of the blocks a row skipped (copy rule): with ``kv_mode`` "deferred" (default) a block
that no row reaches at a step is not touched; its keys/values for those positions are projected from
the recorded exit states when a later token runs it, and the beam reorderings it missed are composed
into one. On the lean step, when fewer than ``gather_ratio`` of the rows run a block (stragglers: a
few tokens sent deep while the others stopped), only those rows catch up: their cache rows read
through the block's pending beam order, their missing positions projected from their exit states,
and written back (:meth:`ExitAwareDecoding.lean_straggler_block`); the other rows' keys/values stay
deferred. "eager" appends them at every step.

fairseq internals this module relies on, and the only place in the package that does (re-check them
on a fairseq upgrade):

- ``MultiheadAttention._get_input_buffer`` / ``_set_input_buffer`` and the cache layout they hold:
  ``prev_key`` / ``prev_value`` B x H x T x d, ``prev_key_padding_mask`` B x T; the encoder attention
  keeps one source entry per sentence when its ``beam_size`` > 1 (set by ``SequenceGenerator``
  through ``set_beam_size``);
- ``MultiheadAttention._append_prev_key_padding_mask`` (the mask of the FirstCall source cache);
- ``MultiheadAttention.reorder_incremental_state`` and its rule for static (source) keys/values:
  nothing to do while the batch keeps its sentences, one entry per sentence otherwise;
- ``MultiheadAttention`` attributes ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``num_heads``,
  ``head_dim``, ``beam_size``, ``bias_k``, ``add_zero_attn``, ``encoder_decoder_attention``;
- ``TransformerDecoderLayerBase.forward``'s signature, and the attributes the lean step mirrors its
  forward with: ``self_attn``, ``encoder_attn``, ``self_attn_layer_norm``, ``encoder_attn_layer_norm``,
  ``final_layer_norm``, ``fc1``, ``fc2``, ``activation_fn``, ``normalize_before``; the variants it
  leaves to fairseq's path (:func:`lean_step_unsupported`): ``cross_self_attention``, ``attn_ln``,
  ``ffn_layernorm``, ``c_attn``, ``w_resid``, dropout kept at inference;
- ``TransformerDecoderBase.reorder_incremental_state_scripting`` (overridden here) and
  ``FairseqIncrementalState.get_incremental_state`` / ``set_incremental_state``.
"""
import contextlib
import math
import threading
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from fairseq.modules import MultiheadAttention

DECODER_STEPS = ("lean", "fairseq")  # the first is the default
KV_MODES = ("deferred", "eager")  # keys/values of the blocks every row skipped: when needed, or at once


def encoder_tensors(encoder_out):
    """fairseq's encoder output dict → (S x B x C states or None, B x S padding mask or None)."""
    enc = enc_mask = None
    if encoder_out is not None and len(encoder_out["encoder_out"]) > 0:
        enc = encoder_out["encoder_out"][0]
    if encoder_out is not None and len(encoder_out["encoder_padding_mask"]) > 0:
        enc_mask = encoder_out["encoder_padding_mask"][0]
    return enc, enc_mask


class ExitAwareDecoding:
    """The incremental step of ``AdaptiveTransformerDecoder`` under an exit policy (mixin: uses the
    decoder's ``layers``, ``embed_target``, ``exit_logits``, ``logits_at_exits`` and ``exit_policy``)."""

    # rows per source sentence, consecutive (the exit-aware generator's beam size, set per batch): the
    # lean step then keeps one source key/value per sentence. fairseq's own ``set_beam_size`` does not
    # reach the decoder from ``SequenceGenerator`` (a TransformerModel has no ``set_beam_size``).
    beam_rows = 1
    # the most decoding steps of the current batch (set per batch by the exit-aware generator): the
    # lean step's key/value buffers start this long (None: LeanBlockCache.initial_capacity, doubling)
    lean_capacity: Optional[int] = None
    lean_pool: Optional["LeanBufferPool"] = None  # set by the generator for its batches

    def forward_incremental_with_exits(self, prev_output_tokens, encoder_out, incremental_state):
        """One decoding step where each row stops at its own block, decided by ``self.exit_policy``.
        Returns (B x 1 x V logits, extra) with ``extra["exits"]`` (B, 1-based)."""
        policy = self.exit_policy
        deferred = policy.kv_mode == "deferred"
        enc, enc_mask = encoder_tensors(encoder_out)
        x, pad_mask = self.embed_target(prev_output_tokens, incremental_state)
        lean = None
        if policy.decoder_step == "lean" and not self.training:  # the lean step has no dropout
            lean = self.lean_caches(incremental_state) or self.start_lean_caches(incremental_state)
        bsz, n_layers = x.size(1), self.num_layers
        plan = policy.plan_step(self, encoder_out, incremental_state, prev_output_tokens)
        if lean is not None and plan.get("prefix"):
            depth = plan["depth"]
            reach = rows_reaching(depth, n_layers)
            out = self.logits_of_depth_segments(self.depth_prefix_step(lean, x[0], reach, enc, enc_mask, pad_mask),
                                                reach)
            self.record_step_exits(incremental_state, depth)
            policy.count(depth)
            return out.unsqueeze(1), {"attn": [None], "inner_states": None, "exits": depth}
        step_exits = torch.full((bsz,), n_layers, dtype=torch.long, device=x.device)
        active = torch.arange(bsz, device=x.device)
        ready_logits: Dict[int, Tensor] = {}
        attn = None
        for n, layer in enumerate(self.layers, start=1):
            if deferred and active.numel() == 0:
                break  # blocks n..N: keys/values from the copied state when a later token needs them
            if lean is not None and deferred and active.numel() < policy.gather_ratio * bsz:
                x, block_attn = self.lean_straggler_block(n - 1, layer, x, active, enc, enc_mask, pad_mask,
                                                          incremental_state), None
            elif lean is not None:
                if deferred:
                    self.catch_up_block(n - 1, incremental_state)
                x, block_attn = self.lean_block_for_rows(lean[n - 1], layer, x, active, enc, enc_mask, pad_mask,
                                                         policy.gather_ratio, self.beam_rows), None
            else:
                if deferred:
                    self.catch_up_block(n - 1, incremental_state)
                x, block_attn = self.run_block_for_rows(layer, n, x, active, enc, enc_mask, incremental_state,
                                                        pad_mask, policy.gather_ratio)
            if n == n_layers:  # fairseq's alignment: the last block's source attention (None if skipped)
                attn = block_attn
            if n == n_layers or active.numel() == 0 or not policy.can_halt:
                continue
            stop, logits = policy.halt(self, n, x[0].index_select(0, active) if active.numel() < bsz else x[0],
                                       active, plan)
            if stop is not None and bool(stop.any()):
                rows = active[stop]
                step_exits[rows] = n
                if logits is not None:
                    ready_logits[n] = (rows, logits[stop])
                active = active[~stop]
        if policy.can_halt:
            out = self.step_logits(x[0], step_exits, ready_logits)
            self.record_step_exits(incremental_state, step_exits, x[0] if deferred else None)
        else:  # full depth: every row through C_N, no exit history to keep (the generator's default)
            out = self.exit_logits(x[0], n_layers)
        policy.count(step_exits)
        return out.unsqueeze(1), {"attn": [attn], "inner_states": None, "exits": step_exits}

    # ---- fairseq's layer path ------------------------------------------------------------------

    def run_block_for_rows(self, layer, n, x, active, enc, enc_mask, incremental_state, pad_mask,
                           gather_ratio: float = 0.5):
        """Block n for the rows in ``active`` (indices); the others keep their state (copy rule) and
        only get this block's self-attention keys/values appended from it.

        Three ways, chosen per call: all rows active → fairseq's layer call, unchanged (bitwise the
        stock computation); many rows active (≥ ``gather_ratio``) or the block's source keys/values
        not yet computed (the paper's FirstCall) → the layer on every row, exited rows' outputs
        discarded (their keys/values are already the copies'); few rows → the layer on a sub-batch
        gathered with its caches, and the exited rows' keys/values from one batched projection.
        """
        bsz, n_active = x.size(1), active.numel()
        last = n == self.num_layers
        if n_active == bsz:
            out, attn, _ = layer(x, enc, enc_mask, incremental_state, self_attn_padding_mask=pad_mask,
                                 need_attn=last, need_head_weights=last)
            return out, (attn.float().mean(dim=0) if attn is not None else None)
        if n_active == 0:
            k, v = self.copied_kv(layer, x.transpose(0, 1))
            self.append_kv(layer, incremental_state, layer.self_attn._get_input_buffer(incremental_state), k, v,
                           pad_mask)
            return x, None
        if n_active >= gather_ratio * bsz:
            out, _, _ = layer(x, enc, enc_mask, incremental_state, self_attn_padding_mask=pad_mask)
            return keep_exited_rows(out, x, active), None
        if layer.encoder_attn is not None and "prev_key" not in layer.encoder_attn._get_input_buffer(incremental_state):
            self.cache_source_kv(layer.encoder_attn, enc, enc_mask, incremental_state)
        return self.run_block_on_subbatch(layer, x, active, enc, enc_mask, incremental_state, pad_mask), None

    @staticmethod
    def cache_source_kv(attn, enc, enc_mask, incremental_state):
        """The paper's FirstCall (App. B) for a block that only a few rows reach: its source keys/values,
        computed and cached exactly as fairseq's encoder-decoder attention does on its first call (one
        per sentence when the generator set a beam size), without running the block on every row."""
        key, mask = per_sentence(enc, enc_mask, attn.beam_size)
        src_len, kv_bsz = key.shape[:2]
        mask = MultiheadAttention._append_prev_key_padding_mask(
            key_padding_mask=mask, prev_key_padding_mask=None, batch_size=kv_bsz, src_len=src_len, static_kv=True)
        key = key.transpose(0, 1)  # B x S x C; fairseq views the cache as (B*H) x S x d: contiguous
        attn._set_input_buffer(incremental_state, {"prev_key": split_heads(attn.k_proj(key), attn.num_heads).contiguous(),
                                                   "prev_value": split_heads(attn.v_proj(key), attn.num_heads).contiguous(),
                                                   "prev_key_padding_mask": mask})

    def run_block_on_subbatch(self, layer, x, active, enc, enc_mask, incremental_state, pad_mask):
        """Gather the active rows and their caches, run the layer, scatter its new keys/values back
        next to the exited rows' copied keys/values."""
        bsz = x.size(1)
        self_buf = layer.self_attn._get_input_buffer(incremental_state)
        sub_state: Dict[str, Dict[str, Optional[Tensor]]] = {}
        layer.self_attn._set_input_buffer(sub_state, _select_rows(self_buf, active))
        if layer.encoder_attn is not None:
            cross_buf = layer.encoder_attn._get_input_buffer(incremental_state)
            per_row = bsz // cross_buf["prev_key"].size(0)  # fairseq keeps one source K/V per sentence
            layer.encoder_attn._set_input_buffer(sub_state, _select_rows(cross_buf, active // per_row))
        sub_pad = pad_mask.index_select(0, active) if pad_mask is not None else None
        out, _, _ = layer(x.index_select(1, active), enc, enc_mask, sub_state, self_attn_padding_mask=sub_pad)
        # every row's new keys/values come from its block input (the copy, for exited rows), which is
        # also what the layer projected for the active ones: one batched projection serves all rows
        new_k, new_v = self.copied_kv(layer, x.transpose(0, 1))  # B x H x 1 x d, 4 d² per row
        self.append_kv(layer, incremental_state, self_buf, new_k, new_v, pad_mask)
        x = x.clone()
        x[:, active] = out
        return x

    @staticmethod
    def copied_kv(layer, h):
        """Keys/values of block ``layer`` for the states h (B x P x C) — what the block's
        self-attention would have cached for them (B x H x P x d); mirrors MultiheadAttention."""
        attn = layer.self_attn
        if layer.normalize_before:
            h = layer.self_attn_layer_norm(h)
        return split_heads(attn.k_proj(h), attn.num_heads), split_heads(attn.v_proj(h), attn.num_heads)

    @staticmethod
    def append_kv(layer, incremental_state, buf, k, v, new_pad: Optional[Tensor] = None):
        """Appends keys/values (B x H x P x d) to block ``layer``'s cache, and to its key padding mask
        (kept as fairseq's attention keeps it) ``new_pad`` (B x P, True at padding) or no padding."""
        old_len, steps = (buf["prev_key"].size(2) if "prev_key" in buf else 0), k.size(2)
        if "prev_key" in buf:
            k = torch.cat([buf["prev_key"], k], dim=2)
            v = torch.cat([buf["prev_value"], v], dim=2)
        else:  # fairseq views the cache as (B*H) x T x d
            k, v = k.contiguous(), v.contiguous()
        pad = buf.get("prev_key_padding_mask")
        if pad is not None or (new_pad is not None and bool(new_pad.any())):
            bsz = k.size(0)
            pad = pad if pad is not None else torch.zeros(bsz, old_len, dtype=torch.bool, device=k.device)
            new_pad = new_pad if new_pad is not None else torch.zeros(bsz, steps, dtype=torch.bool, device=k.device)
            pad = torch.cat([pad, new_pad.to(pad.dtype)], dim=1)
        new_buf = {"prev_key": k, "prev_value": v, "prev_key_padding_mask": pad}
        layer.self_attn._set_input_buffer(incremental_state, new_buf)

    # ---- the lean path -------------------------------------------------------------------------

    def lean_caches(self, incremental_state) -> Optional[List["LeanBlockCache"]]:
        """The lean step's per-block caches of this batch (None: fairseq's layer path)."""
        buf = self.get_incremental_state(incremental_state, "lean")
        return None if buf is None else buf["blocks"]

    def start_lean_caches(self, incremental_state) -> List["LeanBlockCache"]:
        """On a batch's first step: empty caches, the q/k/v weights concatenated once for the batch
        (so nothing can go stale across ``generate`` calls)."""
        blocks = [LeanBlockCache(layer, self.lean_capacity, self.lean_pool) for layer in self.layers]
        self.set_incremental_state(incremental_state, "lean", {"blocks": blocks})
        return blocks

    @staticmethod
    def lean_block_for_rows(cache: "LeanBlockCache", layer, x, active, enc, enc_mask, pad_mask,
                            gather_ratio: float = 0.5, beam_rows: int = 1):
        """As :meth:`run_block_for_rows`, on the lean step: all rows, or (≥ ``gather_ratio`` active)
        all rows with the exited rows' outputs discarded, or only the active rows (their caches
        gathered; the exited rows' keys/values projected from their copies). x: 1 x B x C."""
        bsz, n_active = x.size(1), active.numel()
        pad = pad_mask[:, -1] if pad_mask is not None else None
        if n_active == 0:
            cache.append_states(layer, x.transpose(0, 1), pad)
            return x
        if layer.encoder_attn is not None and cache.src_k is None and enc is not None:
            cache.cache_source(layer.encoder_attn, enc, enc_mask, beam_rows)
        if n_active == bsz:
            return lean_block(layer, cache, x[0], None, pad).unsqueeze(0)
        if n_active >= gather_ratio * bsz:
            return keep_exited_rows(lean_block(layer, cache, x[0], None, pad).unsqueeze(0), x, active)
        return lean_block(layer, cache, x[0], active, pad).unsqueeze(0)

    def lean_straggler_block(self, index: int, layer, x, active, enc, enc_mask, pad_mask, incremental_state):
        """Block index+1 on the lean step with deferred keys/values when fewer than ``gather_ratio`` of the
        rows run it (stragglers: token-level exits send a few tokens deep while the others stopped).
        Only those rows catch up: their cache rows gathered through the block's pending beam order, the
        positions they have no keys/values for projected from their recorded exit states (the copy
        rule, §2.2.1), this step's appended, and the result written back; the other rows' caches are
        neither reordered nor filled (they catch up when a step runs the block on most rows, or when
        they straggle themselves). Before this path a straggler step re-ordered and filled the block's
        cache for every row (demo model, τ 0.6: 2 tokens in 5,686 sent to exit 6 cost 40 % more time).
        x: 1 x B x C → 1 x B x C (the copy rule for the rows that did not run the block)."""
        cache = self.lean_caches(incremental_state)[index]
        pending = dict(self.get_incremental_state(incremental_state, "pending_order") or {})
        order = pending.get(str(index))  # current row -> cache row (None: the same row)
        pad = pad_mask[:, -1] if pad_mask is not None else None
        if layer.encoder_attn is not None and cache.src_k is None and enc is not None:
            cache.cache_source(layer.encoder_attn, enc, enc_mask, self.beam_rows)
        history = cache.row_history(layer, active, order, self.state_history(incremental_state), pad)
        y = lean_block(layer, cache, x[0], active, pad, history)
        pending[str(index)] = cache.keep_row_history(history, active, order, x.size(1))
        self.set_incremental_state(incremental_state, "pending_order", pending)
        return y.unsqueeze(0)

    def depth_prefix_step(self, lean: List["LeanBlockCache"], h: Tensor, reach: List[int], enc, enc_mask, pad_mask):
        """One step with sequence-level depths and the batch sorted deepest first (the generator's
        ``--exit-sequence-order depth``): the rows that reach block n are the leading ``rows_reaching``
        [n-1] rows, so block n runs on a slice of the states and its caches hold only those rows. A
        sentence never runs a block past its depth, so no keys/values are copied to the blocks it skips
        (the copy rule has no later token to serve). h: B x C block-1 inputs, reach: ``rows_reaching``
        → each row's final state."""
        pad = pad_mask[:, -1] if pad_mask is not None else None
        for layer, cache, rows in zip(self.layers, lean, reach):
            if rows == 0:
                break
            if layer.encoder_attn is not None and cache.src_k is None and enc is not None:
                cache.cache_source(layer.encoder_attn, enc[:, :rows],
                                   enc_mask[:rows] if enc_mask is not None else None, self.beam_rows)
            out = lean_block(layer, cache, h[:rows], None, pad[:rows] if pad is not None else None)
            h = out if rows == h.size(0) else torch.cat([out, h[rows:]])
        return h

    def logits_of_depth_segments(self, h: Tensor, reach: List[int]) -> Tensor:
        """B x C final states of the depth-sorted layout → B x V: the rows of depth n are the slice
        reach[n] : reach[n-1], each projected by exit n's classifier only."""
        bounds = reach + [0]
        segments = [self.exit_logits(h[bounds[n]:bounds[n - 1]], n)
                    for n in range(len(reach), 0, -1) if bounds[n] < bounds[n - 1]]
        return segments[0] if len(segments) == 1 else torch.cat(segments)

    def reorder_depth_prefixes(self, lean: List["LeanBlockCache"], incremental_state, new_order: Tensor):
        """Beam reordering of the depth-sorted layout: block n's caches take the leading rows of the
        new order that reach it (the search keeps a sentence's rows together and finished sentences
        leave without changing the order of the others, so those rows come from block n's rows)."""
        depth = self.get_incremental_state(incremental_state, "exits")["planned"].index_select(0, new_order)
        for cache, rows in zip(lean, rows_reaching(depth, self.num_layers)):
            cache.reorder(new_order[:rows])
            cache.reorder_source(new_order[:rows])

    # ---- deferred keys/values and beam reordering ----------------------------------------------

    def catch_up_block(self, index: int, incremental_state):
        """Before block ``index`` runs in deferred mode: the beam reorderings it missed (composed into
        one), then the keys/values of the positions every row skipped it at."""
        pending = self.get_incremental_state(incremental_state, "pending_order")
        if pending is not None and pending.get(str(index)) is not None:
            self.reorder_self_attention(index, incremental_state, pending[str(index)])
            pending[str(index)] = None
            self.set_incremental_state(incremental_state, "pending_order", pending)
        self.materialize_pending_kv(index, incremental_state)

    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        """fairseq's beam reordering, except on the exit-aware paths: the lean caches are reordered
        here, and with deferred keys/values each block's self-attention cache is reordered when the
        block next runs (the composed order, one index_select), so the caches of blocks no row
        reaches cost nothing per step."""
        policy = getattr(self, "exit_policy", None)
        lean = self.lean_caches(incremental_state)
        if lean is not None and getattr(policy, "sorted_depths", None) is not None:
            self.reorder_depth_prefixes(lean, incremental_state, new_order)
            self.reorder_incremental_state(incremental_state, new_order)
            return
        if policy is None or (policy.kv_mode != "deferred" and lean is None):
            return super().reorder_incremental_state_scripting(incremental_state, new_order)
        if policy.kv_mode == "deferred":
            self.defer_self_attention_reorder(incremental_state, new_order)
        for i, layer in enumerate(self.layers):
            if policy.kv_mode != "deferred":
                self.reorder_self_attention(i, incremental_state, new_order)
            if lean is not None:
                lean[i].reorder_source(new_order)
            elif layer.encoder_attn is not None:
                layer.encoder_attn.reorder_incremental_state(incremental_state, new_order)
        self.reorder_incremental_state(incremental_state, new_order)

    def defer_self_attention_reorder(self, incremental_state, new_order):
        pending = dict(self.get_incremental_state(incremental_state, "pending_order") or {})
        for i in range(len(self.layers)):
            key = str(i)
            if pending.get(key) is not None:
                pending[key] = pending[key].index_select(0, new_order)
            elif self.cached_positions(i, incremental_state) > 0:
                pending[key] = new_order
        self.set_incremental_state(incremental_state, "pending_order", pending)

    def reorder_self_attention(self, index: int, incremental_state, order: Tensor):
        lean = self.lean_caches(incremental_state)
        if lean is not None:
            lean[index].reorder(order)
        else:
            self.layers[index].self_attn.reorder_incremental_state(incremental_state, order)

    def cached_positions(self, index: int, incremental_state) -> int:
        """How many target positions block ``index``'s self-attention cache holds."""
        lean = self.lean_caches(incremental_state)
        if lean is not None:
            return lean[index].length
        buf = self.layers[index].self_attn._get_input_buffer(incremental_state)
        return buf["prev_key"].size(2) if "prev_key" in buf else 0

    def cached_self_attention_kv(self, index: int, incremental_state):
        """Block ``index``'s cached self-attention keys and values (B x H x T x d each), either path."""
        lean = self.lean_caches(incremental_state)
        if lean is not None:
            return lean[index].cached_kv()
        buf = self.layers[index].self_attn._get_input_buffer(incremental_state)
        return buf.get("prev_key"), buf.get("prev_value")

    def materialize_pending_kv(self, index: int, incremental_state):
        """Deferred copy rule: the positions this block was skipped at by every row get their keys/
        values now, in one projection of the recorded exit states (their block input, §2)."""
        states = self.state_history(incremental_state)
        if states is None:
            return
        layer, lean = self.layers[index], self.lean_caches(incremental_state)
        if lean is not None:  # rows that straggled through this block have more positions than the others
            lean[index].fill_from_states(layer, states)
            return
        done = self.cached_positions(index, incremental_state)
        if done < states.size(1):
            k, v = self.copied_kv(layer, states[:, done:])
            self.append_kv(layer, incremental_state, layer.self_attn._get_input_buffer(incremental_state), k, v)

    # ---- outputs and the exit history ----------------------------------------------------------

    def step_logits(self, h: Tensor, step_exits: Tensor, ready_logits) -> Tensor:
        """B x C final states → B x V logits: each row projected once, by its exit's classifier;
        rows whose logits the policy already computed (confidence thresholding) reuse them."""
        if not ready_logits:
            return self.logits_at_exits(h, step_exits)
        vocab = next(iter(ready_logits.values()))[1].size(-1)
        out = h.new_empty(h.size(0), vocab)
        done = torch.zeros_like(step_exits, dtype=torch.bool)
        for rows, logits in ready_logits.values():
            out[rows] = logits.to(out.dtype)
            done[rows] = True
        rest = (~done).nonzero().squeeze(1)
        if rest.numel():
            out[rest] = self.logits_at_exits(h.index_select(0, rest), step_exits[rest]).to(out.dtype)
        return out

    def record_step_exits(self, incremental_state, step_exits, final_states: Optional[Tensor] = None):
        """Appends this step's exits to the exit history (B x steps) kept in the incremental state,
        and with deferred keys/values its final states (B x steps x C: each row's exit state, the
        input of every block it skipped), so beam reordering carries both with the hypotheses."""
        buf = dict(self.get_incremental_state(incremental_state, "exits") or {})
        for key, new in (("history", step_exits.unsqueeze(1)),
                         ("states", final_states.unsqueeze(1) if final_states is not None else None)):
            if new is not None:
                buf[key] = new if buf.get(key) is None else torch.cat([buf[key], new], dim=1)
        self.set_incremental_state(incremental_state, "exits", buf)

    def exit_history(self, incremental_state) -> Optional[Tensor]:
        buf = self.get_incremental_state(incremental_state, "exits")
        return None if buf is None else buf.get("history")

    def state_history(self, incremental_state) -> Optional[Tensor]:
        buf = self.get_incremental_state(incremental_state, "exits")
        return None if buf is None else buf.get("states")

    def reorder_incremental_state(self, incremental_state, new_order):
        """Exit history and per-row planned depths follow the beam, like the K/V caches."""
        buf = self.get_incremental_state(incremental_state, "exits")
        if buf is not None:
            buf = {k: (v.index_select(0, new_order) if v is not None else None) for k, v in buf.items()}
            self.set_incremental_state(incremental_state, "exits", buf)


# ---- the lean block step ------------------------------------------------------------------------


def lean_step_unsupported(layer) -> Optional[str]:
    """Why the lean step cannot mirror this fairseq decoder layer (None: it can). Such models decode
    with ``--decoder-step fairseq``."""
    attentions = [layer.self_attn] + ([layer.encoder_attn] if layer.encoder_attn is not None else [])
    if getattr(layer, "cross_self_attention", False):
        return "--cross-self-attention"
    for name in ("attn_ln", "ffn_layernorm", "c_attn", "w_resid"):
        if getattr(layer, name, None) is not None:
            return f"NormFormer/scaled residuals ({name})"
    if any(a.bias_k is not None or a.add_zero_attn or not a.qkv_same_dim for a in attentions):
        return "attention with --add-bias-kv/--add-zero-attn or different key/value dimensions"
    if any(getattr(m, "apply_during_inference", False) for m in layer.modules()):
        return "dropout kept at inference (--retain-dropout)"
    return None


def rows_reaching(depth: Tensor, blocks: int) -> List[int]:
    """How many rows run each block 1..``blocks`` (depth: B, 1-based exit of each row)."""
    return (depth.unsqueeze(1) >= torch.arange(1, blocks + 1, device=depth.device)).sum(0).tolist()


def split_heads(t: Tensor, heads: int) -> Tensor:
    """B x P x C → B x H x P x d (fairseq's cache layout)."""
    bsz, steps, channels = t.shape
    return t.reshape(bsz, steps, heads, channels // heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """B x H x 1 x d → B x C."""
    return t.transpose(1, 2).reshape(t.size(0), -1)


def per_sentence(enc: Tensor, enc_mask: Optional[Tensor], beam_size: int):
    """S x (B*beam) x C encoder states → S x B x C, one per sentence, when the encoder attention has a
    beam size (the beam rows of a sentence share their source); as fairseq's attention does."""
    if beam_size > 1 and enc.size(1) % beam_size == 0:
        enc = enc.view(enc.size(0), -1, beam_size, enc.size(2))[:, :, 0, :]
        if enc_mask is not None:
            enc_mask = enc_mask.view(-1, beam_size, enc_mask.size(1))[:, 0, :]
    return enc, enc_mask


def keep_exited_rows(out: Tensor, x: Tensor, active: Tensor) -> Tensor:
    """T x B x C: ``out`` for the active rows, ``x`` (their copied state) for the others."""
    mask = torch.zeros(x.size(1), dtype=torch.bool, device=x.device)
    mask[active] = True
    return torch.where(mask.view(1, -1, 1), out, x)


class LeanBufferPool:
    """The lean step's key/value buffers, recycled across batches: on a CPU a fresh buffer of several
    megabytes per block and batch pays a page fault per 4 KiB page when first written (glibc returns
    large blocks to the system on free); recycling them made full-depth decoding of the 6+6 x 256 model
    about 6 % faster (the same effect as ``MALLOC_MMAP_THRESHOLD_`` raised). Buffers are flat tensors
    lent as views. One pool per thread (:meth:`for_this_thread`), shared by every generator of the
    thread (a batch is decoded to its end before the next starts); ``reclaim`` (the generator, after a
    batch) takes the batch's buffers back and drops the ones it did not use, so the pool holds at most
    one batch's buffers."""

    _threads = threading.local()

    def __init__(self):
        self.free: List[Tensor] = []
        self.lent: List[Tensor] = []
        self.used: List[Tensor] = []  # every buffer lent during the current batch

    @classmethod
    def for_this_thread(cls) -> "LeanBufferPool":
        pool = getattr(cls._threads, "pool", None)
        if pool is None:
            pool = cls._threads.pool = cls()
        return pool

    def empty(self, shape, like: Tensor, dtype: torch.dtype) -> Tensor:
        numel = math.prod(shape)
        fits = [i for i, t in enumerate(self.free) if t.dtype == dtype and t.device == like.device and t.numel() >= numel]
        if fits:
            flat = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        else:
            flat = like.new_empty(numel, dtype=dtype)
        self.lent.append(flat)
        if not any(flat is t for t in self.used):
            self.used.append(flat)
        return flat[:numel].view(shape)

    def give(self, *tensors: Tensor):
        """Buffers a cache no longer uses (their views may not be read again)."""
        for t in tensors:
            flat = t._base if t._base is not None else t
            for i, lent in enumerate(self.lent):
                if lent is flat:
                    self.free.append(self.lent.pop(i))
                    break

    def reclaim(self):
        """After a batch: its buffers are free again; buffers it did not use are released."""
        self.free, self.lent, self.used = self.used, [], []

    def held(self) -> int:
        """Elements held (free and lent)."""
        return sum(t.numel() for t in self.free + self.lent)


class LeanBlockCache:
    """One block's state for the lean step, for one batch: its self-attention keys/values in fairseq's
    layout (B x H x capacity x d, the first ``length`` positions filled, written in place and grown by
    doubling), so that a beam reordering copies each row's filled positions with one ``index_select``
    over rows into a spare buffer and the attention of one query per row is two batched matrix
    products on views of the cache; their padding mask (B x capacity, only once a padded target
    position occurred); its source keys/values (one per sentence under beam search, computed on the
    block's first call); and the concatenated q/k/v projection of its self-attention (a new tensor per
    batch: the model's weights are never copied into a parameter or kept across batches).

    Under ``--autocast-bf16`` the projections run in bfloat16 but the caches and both attentions stay
    float32 (autocast off): on this project's CPU a bfloat16 batched product of one query per head is
    slower than float32, and a float32 cache costs one cast when written instead of one per step."""

    initial_capacity = 16

    def __init__(self, layer, capacity: Optional[int] = None, pool: Optional[LeanBufferPool] = None):
        self.capacity = max(capacity or self.initial_capacity, 1)  # positions allocated on the first append
        self.pool = pool
        attn = layer.self_attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.w_qkv = torch.cat([p.weight for p in projections])  # 3C x C
        self.b_qkv = (torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.weight.size(0))
                                 for p in projections]) if any(p.bias is not None for p in projections) else None)
        device = self.w_qkv.device.type
        self.cache_dtype: Optional[torch.dtype] = None  # None: the projections' dtype
        self.linears = {name: (m.weight, m.bias) for name, m in block_linears(layer).items()}
        if torch.is_autocast_enabled(device):  # cast once per batch, not at every call as autocast does
            dtype = torch.get_autocast_dtype(device)  # (its cast cache is off under no_grad)
            self.w_qkv = self.w_qkv.to(dtype)
            self.b_qkv = self.b_qkv.to(dtype) if self.b_qkv is not None else None
            self.linears = {name: (w.to(dtype), b.to(dtype) if b is not None else None)
                            for name, (w, b) in self.linears.items()}
            self.cache_dtype = torch.float32
        self.k: Optional[Tensor] = None  # B x H x capacity x d
        self.v: Optional[Tensor] = None
        self.spare: Optional[tuple] = None  # buffers of k/v's shape that the next reorder writes into
        self.pad: Optional[Tensor] = None  # B x capacity, True at padded target positions
        self.length = 0
        # per cache row, positions filled (None: every row the first ``length``); rows differ once
        # stragglers kept their caught-up history (deferred keys/values, :meth:`keep_row_history`)
        self.valid: Optional[Tensor] = None
        self.src_k: Optional[Tensor] = None
        self.src_v: Optional[Tensor] = None
        self.src_mask: Optional[Tensor] = None  # sentences x 1 x 1 x S, True at padding
        self.rows_per_source = 1

    # ---- self-attention keys/values

    def linear(self, name: str, x: Tensor) -> Tensor:
        """The block's linear layer ``name`` (:func:`block_linears`) on the weights of this batch."""
        weight, bias = self.linears[name]
        return F.linear(x, weight, bias)

    def kv_projection(self, h: Tensor):
        """The key/value rows of the fused projection: (..., C) → keys, values (..., C) each."""
        c = h.size(-1)
        bias = self.b_qkv[c:] if self.b_qkv is not None else None
        return F.linear(h, self.w_qkv[c:], bias).split(c, dim=-1)

    def append(self, k: Tensor, v: Tensor, pad: Optional[Tensor] = None):
        """k, v: B x P x C (projected keys/values of the next P positions), written in place;
        pad: B (one position, True at padding) or None."""
        bsz, steps = k.size(0), k.size(1)
        self.reserve(k, bsz, self.length + steps)
        end = self.length + steps
        self.k[:, :, self.length:end] = k.view(bsz, steps, self.heads, self.head_dim).transpose(1, 2)
        self.v[:, :, self.length:end] = v.view(bsz, steps, self.heads, self.head_dim).transpose(1, 2)
        if pad is not None and self.pad is None and bool(pad.any()):
            self.pad = torch.zeros(bsz, self.k.size(2), dtype=torch.bool, device=k.device)
        if self.pad is not None:
            self.pad[:, self.length:end] = pad.unsqueeze(1) if pad is not None else False
        self.length = end

    def reserve(self, like: Tensor, bsz: int, needed: int):
        """Buffers for at least ``needed`` positions (of ``bsz`` rows when none exist yet)."""
        capacity = 0 if self.k is None else self.k.size(2)
        if needed <= capacity:
            return
        capacity = capacity or self.capacity
        while capacity < needed:
            capacity *= 2
        self.release(*(self.spare or ()))
        self.spare = None
        shape = (self.k.size(0) if self.k is not None else bsz, self.heads, capacity, self.head_dim)
        k, v = self.buffer(shape, like), self.buffer(shape, like)
        if self.length:
            k[:, :, :self.length] = self.k[:, :, :self.length]
            v[:, :, :self.length] = self.v[:, :, :self.length]
        if self.k is not None:
            self.release(self.k, self.v)
        self.k, self.v = k, v
        if self.pad is not None:
            self.pad = F.pad(self.pad, (0, capacity - self.pad.size(1)))

    def buffer(self, shape, like: Tensor) -> Tensor:
        """An uninitialized key/value buffer, from the generator's pool when there is one."""
        dtype = self.cache_dtype or like.dtype
        return self.pool.empty(shape, like, dtype) if self.pool is not None else like.new_empty(shape, dtype=dtype)

    def release(self, *buffers: Tensor):
        if self.pool is not None:
            self.pool.give(*buffers)

    def append_states(self, layer, states: Tensor, pad: Optional[Tensor] = None):
        """Keys/values of the copied states (B x P x C, block inputs of rows that skipped this block);
        pad: B (one position, True at padding) or None."""
        if layer.normalize_before:
            states = layer.self_attn_layer_norm(states)
        k, v = self.kv_projection(states)
        self.append(k, v, pad)

    def reorder(self, order: Tensor):
        """Beam reordering: the filled positions of the rows ``order`` picks, one ``index_select`` over
        rows per tensor into the spare buffers, which then swap with the current ones (double
        buffering: no allocation per step while the batch keeps its rows). Selecting whole rows
        (H chunks of T x d) took about 0.7x the time of the earlier time-major layout's selection
        along its second dimension (320 rows x 20 positions x 256, 2 threads: 676 against 989 us)."""
        if self.k is None:
            return
        shape = (order.numel(), self.heads, self.k.size(2), self.head_dim)
        if self.spare is None or self.spare[0].shape != shape:
            self.release(*(self.spare or ()))
            self.spare = (self.buffer(shape, self.k), self.buffer(shape, self.k))
        k, v = self.spare
        torch.index_select(self.k[:, :, :self.length], 0, order, out=k[:, :, :self.length])
        torch.index_select(self.v[:, :, :self.length], 0, order, out=v[:, :, :self.length])
        if self.k.shape == shape:
            self.spare = (self.k, self.v)
        else:
            self.release(self.k, self.v)
            self.spare = None
        self.k, self.v = k, v
        if self.pad is not None:
            pad = self.pad.new_zeros(order.numel(), self.pad.size(1))
            torch.index_select(self.pad[:, :self.length], 0, order, out=pad[:, :self.length])
            self.pad = pad
        if self.valid is not None:
            self.valid = self.valid.index_select(0, order)

    # ---- deferred keys/values: the copy rule's positions, filled from the recorded exit states

    def project_states(self, layer, states: Tensor):
        """Keys/values (r x H x P x d each, the caches' dtype) of copied states r x P x C."""
        if layer.normalize_before:
            states = layer.self_attn_layer_norm(states)
        k, v = self.kv_projection(states)
        dtype = self.cache_dtype or k.dtype
        return split_heads(k, self.heads).to(dtype), split_heads(v, self.heads).to(dtype)

    def fill_from_states(self, layer, states: Tensor):
        """Every row (the cache in the current beam order): the positions before states.size(1) it has
        no keys/values for get them from its recorded exit states (B x T x C), in one projection from
        the earliest such position; positions a row already holds (it ran the block there) are kept."""
        position = states.size(1)
        if self.valid is None:
            if self.length < position:
                self.append_states(layer, states[:, self.length:])
            return
        low = int(self.valid.min())
        if low < position:
            k, v = self.project_states(layer, states[:, low:])
            self.reserve(k, k.size(0), position)
            stale = torch.arange(low, position, device=k.device) >= self.valid.unsqueeze(1)  # B x P
            for cache, new in ((self.k, k), (self.v, v)):
                view = cache[:, :, low:position]
                view.copy_(torch.where(stale[:, None, :, None], new, view))
            if self.pad is not None:
                self.pad[:, low:position] &= ~stale
        self.length, self.valid = max(self.length, position), None

    def row_history(self, layer, rows: Tensor, order: Optional[Tensor], states: Optional[Tensor],
                    pad: Optional[Tensor]) -> "RowHistory":
        """The keys/values of the rows ``rows`` (current beam order) at every earlier position, and room
        for this step's: their cache rows (``order``: current row → cache row, the block's pending beam
        reorderings; None: the same row) where filled, the copy rule's projection of their recorded
        exit states (B x T x C) where not. pad: B (this position, True at padding) or None."""
        position, r = (states.size(1) if states is not None else 0), rows.numel()
        dtype = self.cache_dtype or self.w_qkv.dtype
        shape = (r, self.heads, position + 1, self.head_dim)
        k, v = self.w_qkv.new_empty(shape, dtype=dtype), self.w_qkv.new_empty(shape, dtype=dtype)
        mask = None
        cache_rows = order.index_select(0, rows) if order is not None else rows
        if position:
            filled = min(self.length, position)
            if filled:
                torch.index_select(self.k[:, :, :filled], 0, cache_rows, out=k[:, :, :filled])
                torch.index_select(self.v[:, :, :filled], 0, cache_rows, out=v[:, :, :filled])
            # positions each row holds: ``filled`` for all while no straggler wrote back since the last catch-up
            valid = self.valid.index_select(0, cache_rows) if self.valid is not None else None
            low = int(valid.min()) if valid is not None else filled
            if low < position:
                new_k, new_v = self.project_states(layer, states.index_select(0, rows)[:, low:])
                if valid is None:
                    k[:, :, low:position], v[:, :, low:position] = new_k, new_v
                else:
                    stale = (torch.arange(low, position, device=k.device) >= valid.unsqueeze(1))[:, None, :, None]
                    k[:, :, low:position] = torch.where(stale, new_k, k[:, :, low:position])
                    v[:, :, low:position] = torch.where(stale, new_v, v[:, :, low:position])
            if self.pad is not None and filled:
                mask = torch.zeros(r, position + 1, dtype=torch.bool, device=k.device)
                mask[:, :filled] = self.pad.index_select(0, cache_rows)[:, :filled]
                if valid is not None:
                    mask[:, :filled] &= torch.arange(filled, device=k.device) < valid.unsqueeze(1)
        if pad is not None and bool(pad.index_select(0, rows).any()):
            mask = mask if mask is not None else torch.zeros(r, position + 1, dtype=torch.bool, device=k.device)
            mask[:, position] = pad.index_select(0, rows)
        return RowHistory(k, v, mask, cache_rows)

    def attend_history(self, history: "RowHistory", q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v: r x C of this position for the rows of ``history`` (their keys/values written into
        it) → r x C."""
        r, last = q.size(0), history.k.size(2) - 1
        history.k[:, :, last] = k.view(r, self.heads, self.head_dim)
        history.v[:, :, last] = v.view(r, self.heads, self.head_dim)
        q = q.view(r, self.heads, 1, self.head_dim)
        mask = history.pad[:, None, None, :] if history.pad is not None else None
        with self.attention_precision(q.device.type):
            out = few_query_attention(q.to(history.k.dtype), history.k, history.v, mask)
        return out.reshape(r, -1)

    def keep_row_history(self, history: "RowHistory", rows: Tensor, order: Optional[Tensor], bsz: int) -> Tensor:
        """Writes the rows' history (this step's keys/values included) back, and returns the block's new
        pending order (current row → cache row; ``bsz`` current rows). A row writes in place when every
        current row reading its cache row is writing (the first of them; a beam's siblings share their
        parent's row), else into a cache row no current row reads (beam search pruned its hypothesis):
        there are always enough of those, as the cache has at least as many rows as the batch."""
        positions = history.k.size(2)
        self.reserve(history.k, bsz, positions)
        cache_rows = self.k.size(0)
        if self.valid is None:
            self.valid = torch.full((cache_rows,), self.length, dtype=torch.long, device=rows.device)
        order = order if order is not None else torch.arange(bsz, device=rows.device)
        targets = history.cache_rows
        refs = torch.bincount(order, minlength=cache_rows)
        writers = torch.bincount(targets, minlength=cache_rows)
        index = torch.arange(targets.numel(), device=targets.device)
        first = torch.full_like(refs, targets.numel()).scatter_reduce(0, targets, index, "amin")
        moves = ~((refs.index_select(0, targets) == writers.index_select(0, targets))
                  & (first.index_select(0, targets) == index))
        if bool(moves.any()):
            free = (refs == 0).nonzero().squeeze(1)
            need = int(moves.sum())
            if free.numel() < need:  # impossible while cache rows >= batch rows (pigeonhole)
                raise RuntimeError(f"lean cache: {need} rows to move, {free.numel()} free of {cache_rows}")
            targets = targets.clone()
            targets[moves] = free[:need]
            order = order.clone()
            order[rows[moves]] = targets[moves]
        self.k[:, :, :positions].index_copy_(0, targets, history.k)
        self.v[:, :, :positions].index_copy_(0, targets, history.v)
        self.valid.index_fill_(0, targets, positions)
        if history.pad is not None and self.pad is None:
            self.pad = torch.zeros(self.k.size(0), self.k.size(2), dtype=torch.bool, device=rows.device)
        if self.pad is not None:
            mask = history.pad if history.pad is not None else torch.zeros(
                rows.numel(), positions, dtype=torch.bool, device=rows.device)
            self.pad[:, :positions].index_copy_(0, targets, mask)
        self.length = max(self.length, positions)
        return order

    def attention_precision(self, device: str):
        """Both attentions run in the caches' dtype: autocast off when the caches are float32 under it."""
        return torch.autocast(device, enabled=False) if self.cache_dtype is not None else contextlib.nullcontext()

    def cached_kv(self):
        """The filled keys/values, fairseq's cache layout B x H x T x d (views)."""
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def attend(self, q: Tensor, rows: Optional[Tensor]) -> Tensor:
        """q: r x C queries of the rows ``rows`` (None: every row) → r x C."""
        k, v = self.cached_kv()  # B x H x T x d
        mask = self.pad[:, :self.length] if self.pad is not None else None  # B x T
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
            mask = mask.index_select(0, rows) if mask is not None else None
        q = q.view(q.size(0), self.heads, 1, self.head_dim)
        with self.attention_precision(q.device.type):
            out = few_query_attention(q.to(k.dtype), k, v, mask[:, None, None, :] if mask is not None else None)
        return out.reshape(q.size(0), -1)

    # ---- source keys/values (encoder-decoder attention)

    def cache_source(self, attn, enc: Tensor, enc_mask: Optional[Tensor], beam_rows: int = 1):
        """FirstCall (App. B): the block's source keys/values, once per batch, from the encoder
        output of the current rows (S x B x C, B x S padding mask), one per sentence when each
        sentence has ``beam_rows`` consecutive rows (or fairseq's attention has a beam size)."""
        rows = enc.size(1)
        enc, enc_mask = per_sentence(enc, enc_mask, max(attn.beam_size, beam_rows))
        enc = enc.transpose(0, 1)  # sentences x S x C
        # contiguous B x H x S x d: the attention kernel is much slower on the strided view
        dtype = self.cache_dtype
        self.src_k = split_heads(attn.k_proj(enc), attn.num_heads).to(dtype or enc.dtype).contiguous()
        self.src_v = split_heads(attn.v_proj(enc), attn.num_heads).to(dtype or enc.dtype).contiguous()
        if enc_mask is not None and bool(enc_mask.any()):
            self.src_mask = enc_mask[:, None, None, :]
        self.rows_per_source = rows // self.src_k.size(0)

    def reorder_source(self, order: Tensor):
        """fairseq's rule for static keys/values: unchanged while the batch keeps its sentences;
        when sentences finish, one entry per remaining sentence (or per row without beam)."""
        if self.src_k is None:
            return
        if self.src_k.size(0) * self.rows_per_source == order.numel():
            return
        if self.rows_per_source > 1:
            order = order.view(-1, self.rows_per_source)[:, 0] // self.rows_per_source
        self.src_k, self.src_v = self.src_k.index_select(0, order), self.src_v.index_select(0, order)
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, order)

    def attend_source(self, q: Tensor, rows: Optional[Tensor]) -> Tensor:
        """q: r x H x 1 x d → r x H x 1 x d. All rows under beam search: the beam rows of a sentence
        are the query positions of one attention over its source (fairseq's beamable attention)."""
        with self.attention_precision(q.device.type):
            return self.source_attention(q.to(self.src_k.dtype), rows)

    def source_attention(self, q: Tensor, rows: Optional[Tensor]) -> Tensor:
        per = self.rows_per_source
        if rows is None and per > 1:
            sentences = self.src_k.size(0)
            q = q.view(sentences, per, self.heads, self.head_dim).transpose(1, 2)  # sent x H x beam x d
            out = few_query_attention(q, self.src_k, self.src_v, self.src_mask)
            return out.transpose(1, 2).reshape(sentences * per, self.heads, 1, self.head_dim)
        k, v, mask = self.src_k, self.src_v, self.src_mask
        if rows is not None or per > 1:
            index = (rows if rows is not None else torch.arange(q.size(0), device=q.device)) // per
            k, v = k.index_select(0, index), v.index_select(0, index)
            mask = mask.index_select(0, index) if mask is not None else None
        return few_query_attention(q, k, v, mask)


class RowHistory:
    """The self-attention keys/values (r x H x T+1 x d each) and padding (r x T+1, True at padding, or
    None) of a few rows at every position up to this step's (the last, written by the block), and the
    cache rows they were read from (:meth:`LeanBlockCache.row_history`)."""

    def __init__(self, k: Tensor, v: Tensor, pad: Optional[Tensor], cache_rows: Tensor):
        self.k, self.v, self.pad, self.cache_rows = k, v, pad, cache_rows


def few_query_attention(q: Tensor, k: Tensor, v: Tensor, pad: Optional[Tensor]) -> Tensor:
    """softmax(q kᵀ / √d) v over the keys not masked, for a few queries per (row or sentence, head): the
    decoder's self-attention (one query per row over its cached positions) and the source attention
    (a sentence's beam rows over its source). q ... x Q x d, k/v ... x S x d, pad broadcastable to
    ... x Q x S, True at padded keys. ``scaled_dot_product_attention`` on an accelerator; on a CPU two
    batched matrix products, as fairseq's attention computes it: on this VM's CPU SDPA's kernel took
    about 2.3x as long for beam-size queries with 2 threads (64 sentences x 4 heads x 5 queries x 14
    source positions: 562-673 us against 245-290 us) and about as long with 1 thread (296-452 us against
    454-468 us); for one query (320 rows x 4 heads x 20 positions, 2 threads) 539 us against 728 us for
    SDPA's kernel and 1,069 us for the elementwise products over the earlier time-major cache."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~pad if pad is not None else None)
    scores = torch.matmul(q * q.size(-1) ** -0.5, k.transpose(-1, -2))
    if pad is not None:
        scores = scores.masked_fill(pad, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def block_linears(layer) -> Dict[str, torch.nn.Linear]:
    """The linear layers of a decoder block that the lean step calls once per step (q/k/v: fused)."""
    linears = {"self_out": layer.self_attn.out_proj, "fc1": layer.fc1, "fc2": layer.fc2}
    if layer.encoder_attn is not None:
        linears.update(cross_q=layer.encoder_attn.q_proj, cross_out=layer.encoder_attn.out_proj)
    return linears


def lean_block(layer, cache: LeanBlockCache, x: Tensor, rows: Optional[Tensor], pad: Optional[Tensor],
               history: Optional["RowHistory"] = None) -> Tensor:
    """One decoder block for one target position on the layer's own weights, mirroring
    ``TransformerDecoderLayerBase.forward`` in inference (post-norm or pre-norm).

    x: B x C block inputs; rows: the rows that run the block (None: all) → B x C, the block output
    for those rows and x (the copy rule) for the others. Without ``history`` the new keys/values of
    every row are appended to the cache (for exited rows, computed from their copied state); with it
    (:meth:`LeanBlockCache.row_history`, deferred keys/values) only the rows' own, to their history."""
    pre, c = layer.normalize_before, x.size(-1)
    if history is not None:
        residual = x.index_select(0, rows)
        h = layer.self_attn_layer_norm(residual) if pre else residual
        q, k, v = F.linear(h, cache.w_qkv, cache.b_qkv).split(c, dim=-1)
        attended = cache.attend_history(history, q, k, v)
    else:
        h = layer.self_attn_layer_norm(x) if pre else x
        if rows is None:
            q, k, v = F.linear(h, cache.w_qkv, cache.b_qkv).split(c, dim=-1)
            residual = x
        else:
            k, v = cache.kv_projection(h)  # every row: copies' keys/values for the exited ones
            q = F.linear(h.index_select(0, rows), cache.w_qkv[:c],
                         cache.b_qkv[:c] if cache.b_qkv is not None else None)
            residual = x.index_select(0, rows)
        cache.append(k.unsqueeze(1), v.unsqueeze(1), pad)
        attended = cache.attend(q, rows)
    y = residual + cache.linear("self_out", attended)
    if not pre:
        y = layer.self_attn_layer_norm(y)
    if layer.encoder_attn is not None and cache.src_k is not None:
        cross = layer.encoder_attn
        residual = y
        h = layer.encoder_attn_layer_norm(y) if pre else y
        q = split_heads(cache.linear("cross_q", h).unsqueeze(1), cross.num_heads)
        y = residual + cache.linear("cross_out", merge_heads(cache.attend_source(q, rows)))
        if not pre:
            y = layer.encoder_attn_layer_norm(y)
    residual = y
    h = layer.final_layer_norm(y) if pre else y
    y = residual + cache.linear("fc2", layer.activation_fn(cache.linear("fc1", h)))
    if not pre:
        y = layer.final_layer_norm(y)
    return y if rows is None else x.index_copy(0, rows, y)


def _select_rows(buf: Dict[str, Optional[Tensor]], rows: Tensor) -> Dict[str, Optional[Tensor]]:
    return {k: (v.index_select(0, rows) if v is not None else None) for k, v in buf.items()}
