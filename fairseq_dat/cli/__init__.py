"""Command-line tools around fairseq-generate: threshold search, result tables, exit analysis,
checkpoint averaging. Each module's ``__main__`` block is ``run_main(main)``."""
import logging

from ..errors import install_excepthook


def quiet_root_logger():
    """Back to WARNING on the root logger: importing fairseq leaves it at DEBUG with a stderr handler,
    and loading a checkpoint through hydra sets it again, so fairseq's INFO chatter would drown the
    tools' tables. Call at the start of ``main`` and after loading a checkpoint."""
    logging.getLogger().setLevel(logging.WARNING)


def run_main(main):
    """A tool's entry point: a :class:`~fairseq_dat.errors.ConfigError` ends the run as one line
    ``<prog>: error: …`` (exit status 1) instead of a traceback."""
    install_excepthook()
    main()
