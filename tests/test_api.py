"""The public Python API (tfdp/__init__.py): the README's example runs as
written, and `import tfdp` stays cheap."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_text

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The one ```python block of the README's "## Python API" section."""
    section = README.read_text(encoding="utf-8").split("\n## Python API", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section holds one example"
    return blocks[0]


def test_import_tfdp_does_not_load_tensorflow():
    code = ("import sys, tfdp; assert 'tensorflow' not in sys.modules; "
            "assert {'train', 'finetune', 'evaluate', 'Runner', 'Task'} <= set(dir(tfdp))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_unknown_names_are_attribute_errors():
    import tfdp
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        tfdp.trian  # noqa: B018


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    """As written, except the default corpus (this interpreter's standard
    library) is swapped for a small file, to keep the test short."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_text(400), encoding="utf-8")
    code = readme_example()
    assert 'data="stdlib"' in code
    code = code.replace('data="stdlib"', f"data={str(corpus)!r}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert re.search(r"^val loss \d+\.\d{3}, [\d,]+ tokens/s$", done.stdout, re.M), done.stdout
    metrics = json.loads((tmp_path / "runs" / "api" / "metrics.json").read_text())
    assert metrics["step"] == 20
    # The callback ran at both evaluations (steps 10 and 20), once each.
    lines = (tmp_path / "val_loss.txt").read_text().splitlines()
    assert [float(x) for x in lines] == pytest.approx(
        [h["val_loss"] for h in metrics["history"]], abs=1e-4)
    assert len(lines) == 2
    perplexity = float(done.stdout.strip().splitlines()[-1])
    assert 1.0 < perplexity < 257.0
