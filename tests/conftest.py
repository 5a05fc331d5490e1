"""Shared fixtures: small generated SDXL checkpoints (real key names, reduced widths)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from lineage.cli import main
from lineage.synthetic import write_base, write_child


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, str]:
    """base -> child (epsilon fine-tune) -> vchild (v-pred fine-tune of child)."""
    d = tmp_path_factory.mktemp("family")
    base = write_base(d / "base.safetensors", seed=0)
    child = write_child(base, d / "child.safetensors", seed=1)
    vchild = write_child(child, d / "vchild.safetensors", seed=2, prediction_type="v+ztsnr")
    return {"base": base, "child": child, "vchild": vchild}


@pytest.fixture
def lmerge():
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(main, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return run
