"""``--task adaptive_translation``: fairseq's translation task with the exit-aware generator.

Generation flags live in the task config, so ``fairseq-generate``/``fairseq-interactive`` accept
them with ``--task adaptive_translation`` and the hub interface takes them as keyword arguments
(``model.translate(sentence, exit_threshold=0.5)``). After decoding, the run's exit summary
(``AE=…``) is printed once, after fairseq's own BLEU line.
"""
import atexit
import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

from fairseq import utils
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .. import checks
from ..exit_policy import STRATEGIES
from ..exit_summary import ExitSummary
from ..precision import under_bf16_autocast
from ..sequence_generator import AdaptiveSequenceGenerator

logger = logging.getLogger(__name__)


@dataclass
class AdaptiveTranslationConfig(TranslationConfig):
    exit_threshold: Optional[str] = field(default=None, metadata={
        "help": "T in [0, 1], one value or N-1 comma-separated per-block values. With the checkpoint's "
                "depth estimator: token-geometric halts at the first block n with halting probability "
                "chi_n > T_n; multinomial and Poisson-binomial estimators exit at the first n whose "
                "cumulative q(1..n) >= T (one value). With --exit-strategy confidence: exit at the first "
                "block whose classifier's top probability > T_n. Unset: full depth"})
    exit_strategy: str = field(default="auto", metadata={
        "help": f"exit rule, one of {', '.join(STRATEGIES)}. auto: fixed if --fixed-exit, the trained "
                "estimator (or confidence for checkpoints trained with --depth-estimator confidence) if "
                "--exit-threshold, else full depth; uniform: every token exits at a block drawn uniformly from 1..N "
                "(Table 1's Uniform column; seeded by --seed); oracle (analysis, needs references): exit at the first "
                "block whose prediction is the reference token, else the last"})
    fixed_exit: Optional[int] = field(default=None, metadata={
        "help": "every token exits at block N (1-based); N = the number of decoder layers is full depth "
                "through the exit-aware path"})
    print_exits: bool = field(default=False, metadata={
        "help": "print an E-<id> line per hypothesis with the exit block of each token"})
    exit_gather_ratio: float = field(default=0.5, metadata={
        "help": "when fewer than this fraction of the beam rows still run a block, the block runs on a "
                "gathered sub-batch (lean step with deferred keys/values: only those rows' keys/values are "
                "caught up, the others' caches are left as they are); otherwise on all rows with the exited "
                "rows' outputs discarded"})
    exit_kv: str = field(default="deferred", metadata={
        "help": "keys/values of a block that every beam row skipped at a step (copy rule, paper section 2): "
                "deferred = computed from the copied states only when a later token runs that block "
                "(one projection for all pending positions, never for blocks no later token reaches); "
                "eager = appended at every step"})
    exit_sequence_order: str = field(default="depth", metadata={
        "help": "sequence-level estimators on the lean step: depth = the sentences of a batch are decoded "
                "deepest first (their depths decided before the first step), so the rows that reach block n "
                "are the batch's leading rows and each block runs on a slice, keeping keys/values only for "
                "them; batch = fairseq's order, each block's rows gathered from the batch"})
    decoder_step: str = field(default="lean", metadata={
        "help": "how the decoder runs a block for one target position: lean = a torch-only step on the same "
                "weights (self-attention keys/values in preallocated buffers written in place, fused q/k/v, "
                "source keys/values once per block, scaled_dot_product_attention (two batched matrix products on a "
                "CPU), only the rows that have not "
                "exited); fairseq = fairseq's own decoder layers and caches (full depth without exit flags: "
                "fairseq's decoder unchanged)"})
    autocast_bf16: bool = field(default=False, metadata={
        "help": "forward passes (training, validation, generation) under torch.autocast with bfloat16 on the "
                "model's device: float32 weights, gradients and optimizer state, matrix products in bfloat16, "
                "log-probabilities and beam scores in float32, no loss scaling. On CPUs with AMX or "
                "AVX512-BF16 a 6+6 x 256 aligned training step is about 1.6x faster; fairseq's own --bf16 "
                "casts the whole model and needs a TPU"})


@register_task("adaptive_translation", dataclass=AdaptiveTranslationConfig)
class AdaptiveTranslationTask(TranslationTask):
    """Translation with depth-adaptive decoding (paper §3, inference)."""

    cfg: AdaptiveTranslationConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.generators = []
        self._summary_registered = False

    # ---- one-line errors for bad data, dictionaries and flags (fairseq_dat/checks.py) ---------

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        checks.check_data_dir(cfg)
        return super().setup_task(cfg, **kwargs)

    @classmethod
    def load_dictionary(cls, filename):
        checks.check_dictionary_file(filename)
        dictionary = super().load_dictionary(filename)
        dictionary.filename = filename  # named by checks.check_embedding_sizes
        return dictionary

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        try:
            return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        except FileNotFoundError:
            paths = utils.split_paths(self.cfg.data)  # the directory fairseq read, as in its load_dataset
            raise checks.dataset_not_found(split, paths[(epoch - 1) % len(paths)], self.cfg.source_lang,
                                           self.cfg.target_lang) from None

    def build_model(self, cfg, from_checkpoint=False):
        if not from_checkpoint:  # a checkpoint's stored flags are not this run's
            checks.check_precision_flags(cfg)
        model = super().build_model(cfg, from_checkpoint)
        if not from_checkpoint:
            checks.check_training_flags(cfg, model)
        return model

    # ---- --autocast-bf16 (mixed precision without fairseq's --bf16 / --amp) ----------------------

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        return super().train_step(sample, model, self.with_precision(criterion), optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        return super().valid_step(sample, model, self.with_precision(criterion))

    def with_precision(self, criterion):
        """The criterion as fairseq's steps call it, its forward pass under bf16 autocast with the flag
        (getattr: a task config saved in a checkpoint from before the flag has no such field)."""
        return under_bf16_autocast(criterion) if getattr(self.cfg, "autocast_bf16", False) else criterion

    def filter_indices_by_size(self, indices, dataset, max_positions=None, ignore_invalid_inputs=False):
        try:
            return super().filter_indices_by_size(indices, dataset, max_positions, ignore_invalid_inputs)
        except Exception as err:  # fairseq raises a bare Exception for inputs over max_positions
            if ignore_invalid_inputs or not str(err).startswith("Size of sample"):
                raise
            raise checks.inputs_too_long(dataset, indices, max_positions) from None

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, **kwargs):
        """fairseq 0.12's ``batch_by_size`` drops the last ``len % m`` sentences of a split when
        ``--required-batch-size-multiple`` m > 1 (default 8; facebookresearch/fairseq#5351):
        stock ``fairseq-generate`` scores 1,008 of Multi30k's 1,014 valid sentences and decodes
        nothing from a split of fewer than 8. Every split but the training one is therefore batched
        with a multiple of 1, so that validation and generation see every sentence."""
        if required_batch_size_multiple > 1 and not self.is_train_dataset(dataset):
            required_batch_size_multiple = 1
        return super().get_batch_iterator(dataset, max_tokens, max_sentences, max_positions, ignore_invalid_inputs,
                                          required_batch_size_multiple, **kwargs)

    def is_train_dataset(self, dataset) -> bool:
        return any(dataset is self.datasets.get(split) for split in self.cfg.train_subset.split(","))

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        prefix_allowed_tokens_fn=None):
        if seq_gen_cls is not None or getattr(args, "score_reference", False) or \
                getattr(args, "print_alignment", False) or getattr(args, "sampling", False):
            return super().build_generator(models, args, seq_gen_cls, extra_gen_cls_kwargs,
                                           prefix_allowed_tokens_fn)
        extra = dict(extra_gen_cls_kwargs or {})
        extra.update(self.exit_options(args))
        generator = super().build_generator(models, args, seq_gen_cls=AdaptiveSequenceGenerator,
                                            extra_gen_cls_kwargs=extra,
                                            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn)
        generator.nbest = getattr(args, "nbest", 1)
        self.generators.append(generator)
        return generator

    def exit_options(self, args):
        """Generation args (hub kwargs) override the task config (command-line flags)."""
        def pick(name):
            value = getattr(args, name, None)
            return value if value is not None else getattr(self.cfg, name, None)
        threshold = pick("exit_threshold")
        return {"exit_strategy": pick("exit_strategy") or "auto",
                "exit_threshold": str(threshold) if threshold is not None else None,
                "fixed_exit": pick("fixed_exit"), "exit_gather_ratio": pick("exit_gather_ratio"),
                "exit_kv": pick("exit_kv"), "decoder_step": pick("decoder_step"),
                "exit_sequence_order": pick("exit_sequence_order"), "autocast_bf16": bool(pick("autocast_bf16"))}

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        hypos = super().inference_step(generator, models, sample, prefix_tokens=prefix_tokens,
                                       constraints=constraints)
        if isinstance(generator, AdaptiveSequenceGenerator):
            if getattr(self.cfg, "print_exits", False):
                if "id" in sample:
                    print_exit_lines(sample, hypos, getattr(generator, "nbest", 1))
                elif not getattr(self, "_warned_no_ids", False):  # fairseq-interactive passes no sentence ids
                    logger.warning("--print-exits: this tool gives the task no sentence ids, so no E- lines; "
                                   "the exits are in each hypothesis' 'exits' (hub interface: generate())")
                    self._warned_no_ids = True
            self.register_summary()
        return hypos

    def register_summary(self):
        if not self._summary_registered:
            atexit.register(self.print_exit_summary)
            self._summary_registered = True

    def print_exit_summary(self):
        """One line per generator used: ``Adaptive exits (N=…): AE=…`` (fairseq_dat/exit_summary.py)."""
        for generator in self.generators:
            summary = ExitSummary.of_stats(generator.stats)
            if summary.tokens > 0:
                print(summary.line(), flush=True)


def print_exit_lines(sample, hypos, nbest):
    for i, sample_id in enumerate(sample["id"].tolist()):
        for hypo in hypos[i][:nbest]:
            print("E-{}\t{}".format(sample_id, " ".join(str(e) for e in hypo["exits"].tolist())))
    sys.stdout.flush()
