"""Command-line tools around fairseq-generate: threshold search, result tables, exit analysis."""
