"""The documentation stays true to the code: the CLI reference is generated
from the commands' own flags, and local links point at files that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    """docs/cli.md equals what docs/cli_reference.py makes from every
    console script's --helpfull (rerun the script after changing a flag)."""
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "cli_reference.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = (ROOT / "docs" / "cli.md").read_text()
    for command in ("tfdp-train", "tfdp-prepare", "tfdp-generate", "tfdp-eval",
                    "tfdp-launch", "tfdp-export", "tfdp-finetune", "tfdp-plan",
                    "tfdp-preflight", "tfdp-report"):
        assert f"\n## {command}\n" in text
    assert "--global_batch_size:" in text and "--preemption_grace_seconds:" in text


def test_local_links_resolve():
    for doc in (ROOT / "README.md", ROOT / "docs" / "guide.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
