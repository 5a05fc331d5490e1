"""Every script in examples/ runs to completion, so the examples never rot."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
SLOW = {"demo.py"}  # `make demo`: a family of generated checkpoints, three merges, adapters, pictures


@pytest.mark.parametrize("script", [pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW else [])
                                    for p in EXAMPLES], ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    if script.name == "demo.py":  # read at 80 columns (a path is printed whole, and this one is pytest's)
        assert max(len(line) for line in r.stdout.replace(str(tmp_path.resolve()), "WORK").splitlines()) <= 80
    if script.name == "demo.py" and shutil.which("dot"):  # `make demo` writes the page and says where
        assert f"the family tree to explore in a browser: {(tmp_path / 'tree.html').resolve()}" in r.stdout
        assert (tmp_path / "tree.html").read_text().startswith("<!DOCTYPE html>")
