"""Batches and BLEU exactly as ``fairseq-generate`` makes them, for tools that decode in-process
(``threshold_search``, ``benchmarks/generation_speed.py``).

- :func:`generate_batches`: the batches of ``fairseq-generate --gen-subset S --batch-size B
  --max-tokens M --seed s`` in its order (``task.get_batch_iterator``, ``next_epoch_itr(shuffle=False)``);
  ``first_n`` keeps the sentences with id < n (:class:`FirstSentences`), batched as fairseq batches
  them, which is not fairseq-generate's ``--max-sentences`` (an alias of ``--batch-size``).
- :class:`GenerateBleu`: fairseq's BLEU scorer fed as ``fairseq_cli/generate.py`` feeds it with
  ``--remove-bpe``/``--post-process`` (no ``--bpe``/``--tokenizer``, no ``--replace-unk``), so its
  ``result_string()`` is the text after ``BLEU4 = `` in fairseq-generate's last line.
"""
import copy
from typing import Iterable, List, Optional

import torch
from fairseq import utils
from fairseq.data import BaseWrapperDataset
from fairseq.scoring import bleu


class FirstSentences(BaseWrapperDataset):
    """The sentences of ``dataset`` with id < ``n``, in the order and batches fairseq gives them."""

    def __init__(self, dataset, n: int):
        super().__init__(dataset)
        self.n = min(n, len(dataset))

    def __len__(self):
        return self.n

    @property
    def sizes(self):
        return self.dataset.sizes[: self.n]

    def ordered_indices(self):
        order = self.dataset.ordered_indices()
        return order[order < self.n]


def generate_batches(task, models, dataset, batch_size: Optional[int] = None, max_tokens: Optional[int] = None,
                     first_n: Optional[int] = None, seed: int = 1) -> List[dict]:
    """fairseq-generate's batches of ``dataset`` (``task.dataset(subset)``), materialized. Every split
    but the training one is batched with the multiple 1 (``adaptive_translation``: fairseq's default
    8 drops the last ``len % 8`` sentences). Inputs over the models' max positions raise, as
    fairseq-generate does without ``--skip-invalid-size-inputs-valid-test``."""
    if first_n is not None:
        dataset = FirstSentences(dataset, first_n)
    itr = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in models]),
        ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=seed, disable_iterator_cache=True,
    ).next_epoch_itr(shuffle=False)
    return [batch for batch in itr if "net_input" in batch]


class GenerateBleu:
    """Tokenized BLEU of best hypotheses against references, as fairseq-generate computes it.

    The scorer works on a copy of the target dictionary: generate.py's ``encode_line(...,
    add_if_not_exist=True)`` adds unseen words to the dictionary it is given, and the copy keeps the
    model's dictionary (and its size) unchanged. Ids only need to be consistent within the scorer,
    so the BLEU is the same."""

    def __init__(self, tgt_dict, post_process: Optional[str], symbols_to_strip: Optional[Iterable[int]] = None):
        self.dict = copy.deepcopy(tgt_dict)
        self.post_process = post_process
        # fairseq_cli.generate.get_symbols_to_strip_from_output: the generator's, else its EOS
        self.strip = set(symbols_to_strip) if symbols_to_strip is not None else {tgt_dict.eos()}
        self.scorer = bleu.Scorer(bleu.BleuConfig(pad=tgt_dict.pad(), eos=tgt_dict.eos(), unk=tgt_dict.unk()))

    @classmethod
    def for_generator(cls, generator, tgt_dict, post_process: Optional[str]) -> "GenerateBleu":
        return cls(tgt_dict, post_process, getattr(generator, "symbols_to_strip_from_output", {generator.eos}))

    def add(self, target_tokens: torch.Tensor, hypo_tokens: torch.Tensor):
        """One sentence: its reference ids (padding stripped) and the best hypothesis' ids."""
        target_tokens = target_tokens.int().cpu()
        target_str = self.dict.string(target_tokens, self.post_process, escape_unk=True,
                                      extra_symbols_to_ignore=self.strip)
        hypo_tokens, hypo_str, _ = utils.post_process_prediction(
            hypo_tokens=hypo_tokens.int().cpu(), src_str="", alignment=None, align_dict=None, tgt_dict=self.dict,
            remove_bpe=self.post_process, extra_symbols_to_ignore=self.strip)
        if self.post_process is not None:
            target_tokens = self.dict.encode_line(target_str, add_if_not_exist=True)
            hypo_tokens = self.dict.encode_line(hypo_str, add_if_not_exist=True)
        self.scorer.add(target_tokens, hypo_tokens)

    def add_batch(self, sample, hypos):
        """The best hypothesis of every sentence of a decoded batch."""
        for i in range(sample["id"].numel()):
            self.add(utils.strip_pad(sample["target"][i, :], self.dict.pad()), hypos[i][0]["tokens"])

    def score(self) -> float:
        return self.scorer.score()

    def result_string(self) -> str:
        return self.scorer.result_string()
