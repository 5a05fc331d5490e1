"""benchmarks/bench_extract.py end to end at the tiny size: every run measured, errors compared with the optimum."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench(tmp_path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/bench_extract.py", "--size", "tiny", "--dir",
                           str(tmp_path / "bench"), *options], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_extraction_benchmark_measures_every_tool_at_the_tiny_size(tmp_path):
    result = bench(tmp_path, "--rank", "4", "--skip-mecha")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                          for line in out.splitlines() if line.startswith("| "))}
    randomized, exact = rows["lineage, randomized SVD"], rows["lineage, exact SVD (the optimum)"]
    assert exact[-1] == "1.0000x"  # the optimum compared with itself
    # Both paths store rank 4 of every module: the same parameter count, an error close to the optimum.
    assert randomized[4] == exact[4] and int(exact[4].replace(",", "")) > 0
    assert 1.0 <= float(randomized[-1].rstrip("x")) < 1.05
    kohya = next(cells for name, cells in rows.items() if name.startswith("kohya's algorithm, sampled"))
    assert float(kohya[-1].rstrip("x")) >= 1.0  # its clamp never beats the truncated SVD
    assert re.search(r"kohya's algorithm timed on \d+ modules \(1 per distinct shape", out)
    assert re.search(r"targets \(randomized LoRA\): >= 20x faster .*; <= 1.01x the optimal error: 1\.0\d{3}x", out)
    assert not (tmp_path / "bench").exists()  # the generated inputs are deleted without --keep


def test_an_unknown_adapter_type_fails_in_one_line_before_any_work(tmp_path):
    result = bench(tmp_path, "--types", "lora,nosuchtype")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"bench_extract: unknown adapter type(s) nosuchtype: this lineage extracts {', '.join(_types())}"]
    assert not (tmp_path / "bench").exists()


def _types() -> tuple[str, ...]:
    from lineage.adapters.extract import TYPES

    return TYPES
