import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")

from cli_helpers import adaptive_checkpoint, corpus, stock_checkpoint  # noqa: E402,F401  (session fixtures)
