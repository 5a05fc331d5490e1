"""Shared fixtures: generated SDXL checkpoints (real key names, reduced widths), the CLI, an isolated registry."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from lineage.cli import main
from lineage.sdxl.synthetic import write_base, write_child


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, str]:
    """base -> child (epsilon fine-tune) -> vchild (v-pred fine-tune of child), at the tiny size."""
    d = tmp_path_factory.mktemp("family")
    base = write_base(d / "base.safetensors", size="tiny", seed=0)
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


@pytest.fixture(autouse=True)
def isolated_registry(tmp_path_factory, monkeypatch):
    """Every test (and every process it starts) records into its own registry, never the user's."""
    home = tmp_path_factory.mktemp("lineage-home")
    monkeypatch.setenv("LINEAGE_HOME", str(home))
    return home / "registry.sqlite"


@pytest.fixture
def tiny(tmp_path):
    """Factory for tiny safetensors files (a few hundred bytes) that detect as an SDXL checkpoint or,
    with lora=True, a kohya SDXL LoRA; `seed` makes the tensor data (and so the AutoV3) differ."""
    import torch

    from lineage.io.safetensors import save_file

    def make(name: str, seed: int, metadata: dict[str, str] | None = None, lora: bool = False) -> str:
        g = torch.Generator().manual_seed(seed)
        if lora:
            key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
            tensors = {f"{key}.lora_down.weight": torch.randn(4, 8, generator=g),
                       f"{key}.lora_up.weight": torch.randn(8, 4, generator=g)}
        else:
            tensors = {"model.diffusion_model.label_emb.0.0.weight": torch.randn(4, 4, generator=g)}
        path = tmp_path / name
        save_file(tensors, path, metadata)
        return str(path)

    return make


@pytest.fixture(scope="session")
def trio(tmp_path_factory) -> dict[str, str]:
    """A base and two independent fine-tunes of it (for 2- and 3-model merges), at the tiny size."""
    d = tmp_path_factory.mktemp("trio")
    base = write_base(d / "base.safetensors", size="tiny", seed=10)
    return {"base": base,
            "x": write_child(base, d / "x.safetensors", seed=11),
            "y": write_child(base, d / "y.safetensors", seed=12)}


@pytest.fixture(scope="session")
def small_pair(tmp_path_factory) -> dict[str, str]:
    """A base and a fine-tune at the small size (59 MB each), for tests that need an output larger than
    a few of the writer's 16 MiB blocks."""
    d = tmp_path_factory.mktemp("small_pair")
    base = write_base(d / "base.safetensors", size="small", seed=20)
    return {"base": base, "x": write_child(base, d / "x.safetensors", seed=21)}
