"""fairseq checkpoints unpickle in fairseq's checkpoint loading only.

A fairseq checkpoint is a full pickle (an ``argparse.Namespace``, omegaconf configs, optimizer
history), which torch >= 2.6 refuses by default (``torch.load(..., weights_only=True)``), and fairseq
0.12 calls ``torch.load`` without ``weights_only``. Rather than turning the safe default off for the
whole process, :func:`allow_fairseq_checkpoints` wraps the two fairseq functions that read checkpoint
pickles so that only inside them ``torch.load`` defaults to ``weights_only=False``:

- ``fairseq.checkpoint_utils.load_checkpoint_to_cpu``: every checkpoint read by ``fairseq-train``
  (``--restore-file``, ``--finetune-from-model``), ``fairseq-generate``/``fairseq-interactive``
  (``--path``), the hub interface and this plugin (``--init-from-transformer``, the CLI tools);
- ``fairseq.distributed.utils.broadcast_object``: how ``Trainer.load_checkpoint`` hands the
  checkpoint rank 0 read to the other ranks (they ``torch.load`` it from the broadcast bytes).

Both are looked up as module attributes at call time (``checkpoint_utils.load_checkpoint_to_cpu``,
``distributed_utils.broadcast_object``), so the wrappers take effect for fairseq's own callers.
A ``torch.load`` anywhere else keeps torch's default. Inside the wrappers torch's documented switch,
the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable, is set and then restored, unless the
user forces safe loading (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), which is then left to refuse.
"""
import contextlib
import functools
import os

from fairseq import checkpoint_utils
from fairseq.distributed import utils as distributed_utils

FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def full_unpickling():
    """``torch.load`` without ``weights_only`` unpickles fully inside the block; the environment is
    restored on exit (also on error)."""
    if os.environ.get(FORCE_WEIGHTS_ONLY, "0").lower() in ("1", "y", "yes", "true"):
        yield  # the user asked for safe loading everywhere: torch refuses the checkpoint itself
        return
    previous = os.environ.get(FORCE_NO_WEIGHTS_ONLY)
    os.environ[FORCE_NO_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[FORCE_NO_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_NO_WEIGHTS_ONLY] = previous


def _unpickling_fully(function):
    if getattr(function, "_fairseq_dat_full_unpickling", False):
        return function

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with full_unpickling():
            return function(*args, **kwargs)

    wrapper._fairseq_dat_full_unpickling = True
    return wrapper


def allow_fairseq_checkpoints():
    """Wrap fairseq's checkpoint readers (idempotent; called when the plugin is imported)."""
    checkpoint_utils.load_checkpoint_to_cpu = _unpickling_fully(checkpoint_utils.load_checkpoint_to_cpu)
    distributed_utils.broadcast_object = _unpickling_fully(distributed_utils.broadcast_object)
