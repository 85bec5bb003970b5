from . import adaptive_translation  # noqa: F401
