"""fairseq-dat: the Depth-Adaptive Transformer (Elbayad, Gu, Grave, Auli; ICLR 2020) as a fairseq plugin.

Importing this package (``--user-dir fairseq_dat`` or ``import fairseq_dat``) registers:
- the model ``adaptive_transformer`` and its architectures (``models/adaptive_transformer.py``),
- the criterion ``adaptive_label_smoothed_cross_entropy`` (``criterions/``),
- the task ``adaptive_translation`` with the exit-aware generator (``tasks/``, ``sequence_generator.py``).

It also lets fairseq's own checkpoint loading unpickle fairseq checkpoints under torch >= 2.6
(``checkpoint_loading.py``: scoped to fairseq's loader, ``torch.load`` elsewhere stays safe), and, in
a fairseq command-line run only, prints a :class:`~fairseq_dat.errors.ConfigError` as one line
(``errors.py``). Nothing else in the process changes.
"""
from .checkpoint_loading import allow_fairseq_checkpoints
from .errors import install_excepthook, launched_by_fairseq_cli

allow_fairseq_checkpoints()
if launched_by_fairseq_cli():
    install_excepthook()

from . import models, criterions, tasks  # noqa: E402,F401  (registration side effects)

__version__ = "0.1.0"
