"""One-line errors for bad flags and files.

Every user-facing check in the plugin raises :class:`ConfigError` (a ``ValueError``), whose message
names the flag or file and the valid values. When one reaches the top of a command-line run
(``fairseq-train``, ``fairseq-generate`` …) it is printed as ``<prog>: error: <message>`` with
exit status 1, instead of a traceback from inside fairseq.
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


def install_excepthook():
    if not getattr(sys.excepthook, "_fairseq_dat", False):
        sys.excepthook = _print_config_errors(sys.excepthook)
        sys.excepthook._fairseq_dat = True
