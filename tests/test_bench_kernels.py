"""benchmarks/bench_kernels.py measures only where CUDA is; elsewhere it says why in one line and succeeds."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_the_kernel_benchmark_skips_cleanly_without_cuda():
    result = subprocess.run([sys.executable, "benchmarks/bench_kernels.py"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"bench_kernels: skipped: no CUDA device (torch {torch.__version__})"]
    assert result.stderr == ""
