"""One-line errors for bad flags and files.

Every user-facing check in the plugin raises :class:`ConfigError` (a ``ValueError``), whose message
names the flag or file and the valid values. When one reaches the top of a command-line run it is
printed as ``<prog>: error: <message>`` with exit status 1, instead of a traceback from inside fairseq.

The hook that prints it (:func:`install_excepthook`) is only installed in command-line runs, never by
a plain ``import fairseq_dat`` in someone's program or notebook:

- fairseq's console scripts (``fairseq-train``, ``fairseq-generate``, ``fairseq-interactive`` …, or
  ``python -m fairseq_cli.X``) import the plugin through ``--user-dir``; the package's ``__init__``
  installs the hook when :func:`launched_by_fairseq_cli` says the process is one of them;
- the package's own tools (``python -m fairseq_dat.cli.*``) install it in their ``__main__`` block
  (:func:`fairseq_dat.cli.run_main`).
"""
import os
import sys


class ConfigError(ValueError):
    """A flag, file or checkpoint the plugin cannot work with; the message says which and why."""


def _print_config_errors(previous_hook):
    def hook(exc_type, exc, tb):
        if isinstance(exc, ConfigError):
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq"
            print(f"{prog}: error: {exc}", file=sys.stderr)
            sys.stderr.flush()
            return  # the interpreter then exits with status 1; buffered output is still flushed
        previous_hook(exc_type, exc, tb)
    return hook


def launched_by_fairseq_cli() -> bool:
    """True in a process started as a fairseq console script (``fairseq-*``, whose ``sys.argv[0]`` is
    the script) or as ``python -m fairseq_cli.<tool>``."""
    if sys.argv and sys.argv[0] and os.path.basename(sys.argv[0]).startswith("fairseq-"):
        return True
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return bool(spec is not None and (spec.name or "").startswith("fairseq_cli."))


def install_excepthook():
    """Print an uncaught :class:`ConfigError` as one ``<prog>: error: …`` line (other exceptions go
    to the previous hook). Idempotent."""
    if not getattr(sys.excepthook, "_fairseq_dat", False):
        sys.excepthook = _print_config_errors(sys.excepthook)
        sys.excepthook._fairseq_dat = True
