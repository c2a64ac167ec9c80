"""Dataset recipes: where a corpus's documents come from.

`source_files(spec)` turns a `--data`/`--input` value into the list of files
to tokenize: `stdlib` (the default corpus, this interpreter's standard
library sources, found at run time so nothing is copied or downloaded) or
comma-separated files, globs and directories. tfdp/prepare.py turns the
files into token shards.

This folder installs as the subpackage `tfdp.recipes` (setup.py's
package_dir), never as a top-level `data` package: imports between its own
modules are relative, so they do not depend on the folder's name.
"""

from .stdlib import stdlib_files
from .text_files import expand_paths


def source_files(spec: str):
    """Files named by `spec`, in a fixed order; UserError if none exist."""
    if spec.strip() == "stdlib":
        return stdlib_files()
    return expand_paths(spec)
