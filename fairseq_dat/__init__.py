"""fairseq-dat: the Depth-Adaptive Transformer (Elbayad, Gu, Grave, Auli; ICLR 2020) as a fairseq plugin.

Importing this package (``--user-dir fairseq_dat`` or ``import fairseq_dat``) registers:
- the model ``adaptive_transformer`` and its architectures (``models/adaptive_transformer.py``),
- the criterion ``adaptive_label_smoothed_cross_entropy`` (``criterions/``),
- the task ``adaptive_translation`` with the exit-aware generator (``tasks/``, ``sequence_generator.py``).
"""
import os

# torch >= 2.6 loads checkpoints with weights_only=True, which rejects the argparse.Namespace that
# fairseq pickles into every checkpoint. Must be set before fairseq loads any checkpoint.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

from .errors import install_excepthook  # noqa: E402

install_excepthook()

from . import models, criterions, tasks  # noqa: E402,F401  (registration side effects)

__version__ = "0.1.0"
