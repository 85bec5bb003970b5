"""The anytime decoder of the Depth-Adaptive Transformer (Elbayad et al., ICLR 2020, §2).

A fairseq ``TransformerModel`` whose decoder can emit a prediction after any of its N blocks:
an output classifier C_n sits after every block n (§2.1, p(y_{t+1} | h_t^n) = softmax(W_n h_t^n)).

Conventions used throughout the package:
- exits are **1-based** block numbers (1..N), as in the paper's average exit (AE);
- "exit state" h^n is the output of block n, passed through the final layer norm the block stack
  would have had (pre-norm architectures get one LayerNorm per exit) and ``project_out_dim``;
- the **copy rule** (§2.2.1, App. B): when token t exits at block n < N, its block-n state is
  copied to blocks n+1..N, so later tokens' self-attention at those blocks reads keys/values
  computed from the copy by each block's own k/v projections.

Called the standard fairseq way, the model returns the last exit's logits, so fairseq's own
generator, scorer and hub interface work unchanged. ``extra["exit_states"]`` holds the N exit
states (B x T x C) for the multi-exit criterion; ``extra["depth_log_q"]`` the depth estimator's
log-probabilities (see :mod:`fairseq_dat.modules.depth_estimators`).
"""
import logging
import math
from typing import List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from fairseq import checkpoint_utils
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerModel,
    base_architecture,
)
from fairseq.models.transformer.transformer_legacy import transformer_wmt_en_de_big
from fairseq.modules import LayerNorm

from ..checks import check_embedding_sizes
from ..errors import ConfigError
from ..modules.depth_estimators import DEPTH_ESTIMATORS, build_depth_estimator
from ..modules.exit_aware_decoding import ExitAwareDecoding, encoder_tensors

logger = logging.getLogger(__name__)

EXIT_CLASSIFIERS = ("separate", "shared")
ESTIMATOR_CHOICES = ("none", "confidence") + tuple(DEPTH_ESTIMATORS)
# parameter-name prefixes that a checkpoint of a plain transformer (or a stage-1 model) may lack
ADAPTIVE_PARAM_PREFIXES = ("decoder.exit_projections.", "decoder.exit_layer_norms.", "decoder.depth_estimator.")


def scale_gradient(x: Tensor, gamma: float) -> Tensor:
    """SCALE_GRADIENT(x, γ) = γx + (1−γ)·stopgrad(x) (paper, Appendix A): identity forward,
    gradient multiplied by γ backward."""
    return gamma * x + (1.0 - gamma) * x.detach()


def scale_learning_rate(module: nn.Module, factor: float) -> None:
    """Make every ``nn.Linear`` of ``module`` learn ``factor`` times faster under Adam, with the same
    function at initialization: its stored weight and bias are divided by ``factor`` and its output is
    multiplied by it. Adam moves each stored parameter by about lr per update whatever the scale of its
    gradient, so the layer's effective parameters move ``factor`` × lr (the "equalized learning rate"
    reparametrization of Karras et al., 2018). Used for ``--estimator-lr-multiplier``: the depth estimator
    is new in stage 2 while the trunk continues at a small lr (§3 trains both jointly)."""
    if factor == 1.0:
        return
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            with torch.no_grad():
                layer.weight.div_(factor)
                if layer.bias is not None:
                    layer.bias.div_(factor)
            layer.register_forward_hook(lambda _layer, _inputs, out, c=factor: out * c)


@register_model("adaptive_transformer")
class AdaptiveTransformerModel(TransformerModel):
    """Transformer with an exit classifier after every decoder block and an optional depth
    estimator (paper §2–3). See the module docstring for conventions."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--exit-classifiers", choices=EXIT_CLASSIFIERS,
                            help="one output classifier per decoder block (separate, the paper's IWSLT "
                                 "setting) or one shared by all blocks (shared, WMT; tied to the decoder "
                                 "embeddings when --share-decoder-input-output-embed is set) (§2.1)")
        parser.add_argument("--depth-estimator", choices=ESTIMATOR_CHOICES,
                            help="how many blocks to run (§3): sequence (Seq-multinomial), "
                                 "token-multinomial, token-geometric (geometric-like halting), "
                                 "sequence-poisson-binomial, token-poisson-binomial, confidence "
                                 "(no parameters: max-probability thresholding) or none")
        parser.add_argument("--separate-halting", action="store_true",
                            help="token-geometric: one halting vector per block instead of one shared")
        parser.add_argument("--detach-estimator", action="store_true",
                            help="stop the depth-estimator loss at the estimator's inputs (the paper "
                                 "back-propagates it into encoder and decoder: default off)")
        parser.add_argument("--init-from-transformer", metavar="PATH",
                            help="initialize the trunk from a checkpoint of fairseq's stock transformer "
                                 "of the same dimensions; new exit classifiers start as copies of its "
                                 "output projection")
        parser.add_argument("--freeze-trunk", action="store_true",
                            help="train only the exit classifiers and the depth estimator (the frozen trunk runs "
                                 "without dropout, as at inference)")
        parser.add_argument("--estimator-lr-multiplier", type=float, default=10.0, metavar="C",
                            help="the depth estimator learns C times faster than --lr (its linear layers store "
                                 "weights / C and multiply their outputs by C: same function, C x the Adam "
                                 "step), so a stage 2 at the trunk's small lr still trains the new estimator; "
                                 "1 = the plain parametrization (checkpoints from before this flag)")
        parser.add_argument("--train-estimator-only", action="store_true",
                            help="stage 2 on a frozen stage-1 model: train only the depth estimator (trunk "
                                 "and exit classifiers keep their values and run without dropout, so the estimator "
                                 "learns from the states and oracles that decoding sees); pair with --lr-scheduler "
                                 "fixed (§3: the paper instead back-propagates the exit loss into the whole model, "
                                 "the default)")

    @classmethod
    def build_model(cls, args, task):
        adaptive_base_architecture(args)
        model = super().build_model(args, task)
        model.decoder.build_exits(args)
        if getattr(args, "init_from_transformer", None):
            model.init_trunk_from(args.init_from_transformer)
        if getattr(args, "train_estimator_only", False):
            model.freeze_trunk(prefixes=("decoder.depth_estimator.",))
        elif getattr(args, "freeze_trunk", False):
            model.freeze_trunk()
        return model

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(cfg)
        return AdaptiveTransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)

    def forward(self, src_tokens, src_lengths, prev_output_tokens, return_all_hiddens: bool = True,
                features_only: bool = False, alignment_layer: Optional[int] = None,
                alignment_heads: Optional[int] = None, exits: Optional[Tensor] = None,
                grad_scale: Optional[float] = None):
        """As ``TransformerModel.forward``. ``exits`` runs the decoder teacher-forced with a given exit
        per token and the copy rule (mixed training, §2.2): B x T (1-based), or M x B x T for M exit
        samples of the same batch, decoded as one batch of M·B rows (the encoder runs once; the
        output's rows are sample-major). ``grad_scale``: SCALE_GRADIENT between blocks (Appendix A).
        Every training forward of the criterion comes through here, so that a DistributedDataParallel
        wrapper sees it and all-reduces the gradients."""
        encoder_out = self.encoder(src_tokens, src_lengths=src_lengths, return_all_hiddens=return_all_hiddens)
        if exits is not None and exits.dim() == 3:
            samples, bsz = exits.shape[:2]
            rows = torch.arange(bsz, device=src_tokens.device).repeat(samples)
            encoder_out = self.encoder.reorder_encoder_out(encoder_out, rows)
            prev_output_tokens = prev_output_tokens.repeat(samples, 1)
            src_lengths = src_lengths.repeat(samples) if src_lengths is not None else None
            exits = exits.reshape(samples * bsz, -1)
        return self.decoder(prev_output_tokens, encoder_out=encoder_out, features_only=features_only,
                            alignment_layer=alignment_layer, alignment_heads=alignment_heads,
                            src_lengths=src_lengths, exits=exits, grad_scale=grad_scale)

    # ---- loading checkpoints that lack the adaptive parameters -----------------------------

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Loads a full adaptive checkpoint as usual. A checkpoint without exit classifiers or depth
        estimator (fairseq's stock transformer, or a stage-1 model for the estimator stage, e.g. via
        ``--finetune-from-model``) keeps this model's fresh values for the missing parameters, and a
        log line names them."""
        check_embedding_sizes(self, state_dict)  # other dictionaries: ConfigError naming the dict file
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict and k.startswith(ADAPTIVE_PARAM_PREFIXES)]
        if missing:
            state_dict = dict(state_dict)
            trunk_head = state_dict.get("decoder.output_projection.weight")
            for key in missing:
                state_dict[key] = own[key]
                if key.startswith("decoder.exit_projections.") and trunk_head is not None:
                    state_dict[key] = trunk_head.clone()
            logger.info("adaptive_transformer: %d parameter tensors not in the checkpoint were newly "
                        "initialized: %s", len(missing), ", ".join(missing))
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def init_trunk_from(self, path: str):
        """``--init-from-transformer``: load a stock ``transformer`` checkpoint into the trunk."""
        try:
            state = checkpoint_utils.load_checkpoint_to_cpu(path)
        except (OSError, FileNotFoundError) as err:
            raise ConfigError(f"--init-from-transformer: cannot read checkpoint {path}: {err}") from err
        try:
            self.load_state_dict(state["model"], strict=True)
        except ConfigError as err:
            raise ConfigError(f"--init-from-transformer {path}: {err}") from None
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise ConfigError(f"--init-from-transformer: {path} does not match this architecture "
                             f"({first[1].strip() if len(first) > 1 else first[0]})") from err
        logger.info("adaptive_transformer: trunk initialized from %s", path)

    def freeze_trunk(self, prefixes=ADAPTIVE_PARAM_PREFIXES):
        """``--freeze-trunk``: only exit classifiers and depth estimator keep requires_grad;
        ``--train-estimator-only``: only the depth estimator."""
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith(prefixes)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if trainable == 0:
            raise ConfigError("--train-estimator-only needs --depth-estimator (a model with a depth estimator)")
        self.frozen_modules = outermost_frozen_modules(self)
        logger.info("adaptive_transformer: trunk frozen (no dropout), %d trainable parameters (%s)", trainable,
                    ", ".join(prefixes))

    def train(self, mode: bool = True):
        """With a frozen trunk (``--freeze-trunk`` / ``--train-estimator-only``) every module without a trained
        parameter stays in inference mode (no dropout): dropout there would only add noise to the states
        the estimator reads and to the oracle it is trained against (measured on Multi30k: with dropout the
        training oracle's average exit is 2.90 against 2.33 on valid for Seq-LL, λ = 1), and the frozen modules
        learn nothing from it."""
        super().train(mode)
        if mode:  # attention dropout follows MultiheadAttention.training, so whole modules go to eval
            for module in getattr(self, "frozen_modules", ()):
                module.eval()
        return self


def outermost_frozen_modules(model: nn.Module) -> List[nn.Module]:
    """The largest submodules without a trainable parameter (found once when freezing; ``train()`` runs
    every update)."""
    found, names = [], []
    for name, module in model.named_modules():  # parents before children
        if not name or any(name.startswith(prefix + ".") for prefix in names):
            continue
        if not any(p.requires_grad for p in module.parameters()):
            found.append(module)
            names.append(name)
    return found


class AdaptiveTransformerDecoder(ExitAwareDecoding, TransformerDecoderBase):
    """``TransformerDecoderBase`` with an exit after every block.

    Training reuses fairseq's ``extract_features`` (its ``inner_states`` are every block's output).
    Only two paths need their own block loop: teacher forcing with a given exit per token
    (``exits``), and incremental decoding under an exit policy (set by the exit-aware generator
    as ``self.exit_policy``), which runs each block only for the rows that still need it (its own
    module, :mod:`fairseq_dat.modules.exit_aware_decoding`).
    """

    def build_exits(self, args):
        """Exit classifiers C_1..C_{N-1} (C_N is fairseq's ``output_projection``) and the depth
        estimator (§2.1, §3). Called once by ``AdaptiveTransformerModel.build_model``."""
        n = self.num_layers
        self.exit_classifiers = args.exit_classifiers
        self.exit_layer_norms = nn.ModuleList(
            [LayerNorm(self.embed_dim) for _ in range(n - 1)] if self.layer_norm is not None else [])
        self.exit_projections = nn.ModuleList()
        if args.exit_classifiers == "separate":
            if self.adaptive_softmax is not None:
                raise ConfigError("--exit-classifiers separate does not support --adaptive-softmax-cutoff")
            for _ in range(n - 1):
                proj = nn.Linear(self.output_embed_dim, len(self.dictionary), bias=False)
                nn.init.normal_(proj.weight, mean=0, std=self.output_embed_dim ** -0.5)
                self.exit_projections.append(proj)
        name = args.depth_estimator
        self.depth_estimator_name = name
        self.detach_estimator = bool(getattr(args, "detach_estimator", False))
        self.depth_estimator = None
        if name in DEPTH_ESTIMATORS:
            if n < 2:
                raise ConfigError(f"--depth-estimator {name} needs at least 2 decoder layers")
            input_dim = args.encoder_embed_dim if DEPTH_ESTIMATORS[name].inputs == "encoder" else self.embed_dim
            self.depth_estimator = build_depth_estimator(name, input_dim, n, args.separate_halting)
            multiplier = getattr(args, "estimator_lr_multiplier", 1.0)
            if not (multiplier > 0 and math.isfinite(multiplier)):
                raise ConfigError(f"--estimator-lr-multiplier must be a finite number > 0, got {multiplier}")
            scale_learning_rate(self.depth_estimator, float(multiplier))
        self.exit_policy = None

    # ---- exits -----------------------------------------------------------------------------

    def exit_features(self, state: Tensor, n: int) -> Tensor:
        """Block-n output (any layout, channels last) → the input of classifier C_n."""
        norm = self.layer_norm if n == self.num_layers else (
            self.exit_layer_norms[n - 1] if len(self.exit_layer_norms) else None)
        if norm is not None:
            state = norm(state)
        if self.project_out_dim is not None:
            state = self.project_out_dim(state)
        return state

    def exit_projection(self, n: int) -> nn.Module:
        if n == self.num_layers or self.exit_classifiers == "shared":
            return self.output_projection
        return self.exit_projections[n - 1]

    def exit_logits(self, state: Tensor, n: int) -> Tensor:
        """C_n(h^n): logits over the vocabulary from the raw block-n output."""
        return self.exit_projection(n)(self.exit_features(state, n))

    def logits_at_exits(self, states: Tensor, exits: Tensor) -> Tensor:
        """(..., C) final states with the copy rule applied, (...) 1-based exits → (..., V) logits,
        each position projected by its own exit's classifier (once per position)."""
        present, counts = torch.unique(exits, return_counts=True)
        if present.numel() == 1:
            return self.exit_logits(states, int(present[0]))
        # every position through the most frequent exit's classifier (no gather/scatter of the bulk of
        # the V-wide logits), then the other exits' positions overwritten
        common = int(present[counts.argmax()])
        out = self.exit_logits(states, common)
        for n in present.tolist():
            if n != common:
                where = exits == n
                out[where] = self.exit_logits(states[where], n).to(out.dtype)
        return out

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False,
                full_context_alignment=False, alignment_layer=None, alignment_heads=None,
                src_lengths=None, return_all_hiddens=False, exits: Optional[Tensor] = None,
                grad_scale: Optional[float] = None):
        """Standard contract: (last-exit logits B x T x V, extra). See the class docstring for
        ``exits``; ``grad_scale`` applies SCALE_GRADIENT between blocks (Appendix A)."""
        if incremental_state is not None and self.exit_policy is not None:
            return self.forward_incremental_with_exits(prev_output_tokens, encoder_out, incremental_state)
        if exits is not None or grad_scale is not None:
            states, pad_mask = self.teacher_forced_block_states(prev_output_tokens, encoder_out, exits, grad_scale)
            extra = {"attn": [None], "inner_states": None}
            if exits is not None:
                final = states[-1].transpose(0, 1)
                return self.logits_at_exits(final, exits), extra
            x = self.exit_features(states[-1], self.num_layers).transpose(0, 1)
            extra["exit_states"] = [s.transpose(0, 1) for s in states]
            extra["depth_log_q"] = self.depth_log_q(encoder_out, extra["exit_states"])
            return (x if features_only else self.output_layer(x)), extra
        x, extra = super().forward(prev_output_tokens, encoder_out=encoder_out, incremental_state=incremental_state,
                                   features_only=features_only, full_context_alignment=full_context_alignment,
                                   alignment_layer=alignment_layer, alignment_heads=alignment_heads)
        if incremental_state is None:
            extra["exit_states"] = [s.transpose(0, 1) for s in extra["inner_states"][1:]]
            extra["depth_log_q"] = self.depth_log_q(encoder_out, extra["exit_states"])
        return x, extra

    def depth_log_q(self, encoder_out, block_states: List[Tensor]) -> Optional[Tensor]:
        """log q over the N depths: B x N (sequence estimators) or B x T x N (token ones)."""
        if self.depth_estimator is None:
            return None
        enc, enc_mask = encoder_tensors(encoder_out)
        if self.detach_estimator:
            enc = enc.detach() if enc is not None else None
            block_states = [s.detach() for s in block_states]
        return self.depth_estimator.log_q_from(encoder_out=enc, encoder_padding_mask=enc_mask,
                                               block_states=block_states)

    def embed_target(self, prev_output_tokens, incremental_state=None):
        """Token + position embeddings, T x B x C, and the self-attention padding mask; mirrors the
        lines of ``TransformerDecoderBase.extract_features_scriptable`` before its block loop."""
        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        prev_output_tokens = prev_output_tokens.contiguous()
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x += positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x).transpose(0, 1)
        pad_mask = None
        if self.cross_self_attention or prev_output_tokens.eq(self.padding_idx).any():
            pad_mask = prev_output_tokens.eq(self.padding_idx)
        return x, pad_mask

    def teacher_forced_block_states(self, prev_output_tokens, encoder_out, exits=None, grad_scale=None):
        """All N block outputs (each T x B x C) under teacher forcing. With ``exits`` (B x T,
        1-based), the copy rule: after block n, positions with exit < n keep their previous state,
        so block n' > n computes its keys/values from the copy (§2.2, mixed training)."""
        enc, enc_mask = encoder_tensors(encoder_out)
        x, pad_mask = self.embed_target(prev_output_tokens)
        keep = exits.t().unsqueeze(-1) if exits is not None else None  # T x B x 1
        states = []
        for n, layer in enumerate(self.layers, start=1):
            if grad_scale is not None and n > 1:
                x = scale_gradient(x, grad_scale)
            out, _, _ = layer(x, enc, enc_mask, None, self_attn_mask=self.buffered_future_mask(x),
                              self_attn_padding_mask=pad_mask)
            x = out if keep is None else torch.where(keep >= n, out, x)
            states.append(x)
        return states, pad_mask


# ---- architectures ------------------------------------------------------------------------------


@register_model_architecture("adaptive_transformer", "adaptive_transformer")
def adaptive_base_architecture(args):
    """fairseq's base transformer plus the adaptive defaults: separate exit classifiers (the paper's
    IWSLT choice), no depth estimator (stage 1)."""
    args.exit_classifiers = getattr(args, "exit_classifiers", None) or "separate"
    args.depth_estimator = getattr(args, "depth_estimator", None) or "none"
    args.separate_halting = getattr(args, "separate_halting", False)
    args.detach_estimator = getattr(args, "detach_estimator", False)
    args.init_from_transformer = getattr(args, "init_from_transformer", None)
    args.freeze_trunk = getattr(args, "freeze_trunk", False)
    args.train_estimator_only = getattr(args, "train_estimator_only", False)
    # 1.0, not the flag's default 10: checkpoints written before the flag existed stored plain weights
    args.estimator_lr_multiplier = getattr(args, "estimator_lr_multiplier", None) or 1.0
    base_architecture(args)


@register_model_architecture("adaptive_transformer", "adaptive_transformer_iwslt_de_en")
def adaptive_transformer_iwslt_de_en(args):
    """The paper's IWSLT14 model (§4.1): 6+6 blocks, encoder width 512, decoder width 256, FFN 1024,
    4 heads, dropout 0.3, untied embeddings, 6 separate exit classifiers."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 512)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = getattr(args, "encoder_layers", 6)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 256)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 1024)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 6)
    args.dropout = getattr(args, "dropout", 0.3)
    args.exit_classifiers = getattr(args, "exit_classifiers", None) or "separate"
    adaptive_base_architecture(args)


@register_model_architecture("adaptive_transformer", "adaptive_transformer_wmt_en_fr_big")
def adaptive_transformer_wmt_en_fr_big(args):
    """The paper's WMT14 En-Fr model: Transformer big, encoder/decoder embeddings and all exit
    classifiers tied (one shared matrix)."""
    args.share_all_embeddings = getattr(args, "share_all_embeddings", True)
    args.exit_classifiers = getattr(args, "exit_classifiers", None) or "shared"
    args.dropout = getattr(args, "dropout", 0.1)
    transformer_wmt_en_de_big(args)
    adaptive_base_architecture(args)


@register_model_architecture("adaptive_transformer", "adaptive_transformer_tiny")
def adaptive_transformer_tiny(args):
    """A few-thousand-parameter model for tests and smoke runs."""
    for name, value in (("encoder_embed_dim", 32), ("encoder_ffn_embed_dim", 64), ("encoder_layers", 2),
                        ("encoder_attention_heads", 2), ("decoder_embed_dim", 32),
                        ("decoder_ffn_embed_dim", 64), ("decoder_layers", 3), ("decoder_attention_heads", 2)):
        setattr(args, name, getattr(args, name, value))
    adaptive_base_architecture(args)
