from . import adaptive_transformer  # noqa: F401
