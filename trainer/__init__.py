"""Command-line entry points (absl flags). The only place flags are defined or read.

Each module is thin: parse flags, build a `tfdp.config.Config` or plain
arguments, call the library, and turn a `tfdp.errors.UserError` into one
line on stderr with exit status 2 (trainer/cli.py).
"""
