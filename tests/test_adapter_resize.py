"""lmerge resize (adapters/resize.py): a LoRA / LoCon re-truncated without its base, checked against the
exact SVD of each module's up @ down computed here, the loaders, the metadata and the registry."""
from __future__ import annotations

import json
import math

import pytest
import torch
from adapter_loading import assert_loads_everywhere, deltas
from adapter_samples import lora_tensors, modules_of, write_lokr, write_lora
from click.testing import CliRunner

from lineage.adapters.convert import convert
from lineage.adapters.reader import open_adapter
from lineage.adapters.resize import product_factors, resize
from lineage.cli import main as cli
from lineage.errors import LineageError
from lineage.graph.metadata import LINEAGE_RECORD_KEY
from lineage.io.safetensors import SafetensorsFile, save_file
from lineage.sdxl.synthetic import write_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("resize") / "base.safetensors", size="small")


@pytest.fixture(scope="module")
def lora32(base, tmp_path_factory):
    """An fp32 LoCon of rank 8 (alpha 4: scale 0.5) on every module, convolutions included."""
    path = tmp_path_factory.mktemp("resize-in") / "lora32.safetensors"
    save_file(lora_tensors(modules_of(base, conv=True), rank=8, alpha=4.0, dtype=torch.float32), path)
    return str(path)


def optimal(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The best rank-`rank` approximation of `delta` (exact SVD) and the share of ‖delta‖² it keeps."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return best, float(s[:rank].square().sum() / s.square().sum())


def test_product_factors_is_the_svd_of_the_product():
    g = torch.Generator().manual_seed(1)
    for out, r, inp in ((40, 6, 30), (5, 8, 12), (30, 8, 4)):  # rank below, above each side
        up, down = torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)
        f = product_factors(up, down)
        assert torch.allclose(f.singular.double(), torch.linalg.svdvals((up @ down).double())[:f.rank].float()
                              .double(), rtol=1e-5)
        assert torch.allclose(f.up @ f.down, up @ down, atol=1e-4)


def test_resize_to_the_same_rank_keeps_the_delta(lora32, tmp_path):
    out = resize(lora32, tmp_path / "same.safetensors", rank=8, record=False, progress=False)
    before, after = deltas(lora32), deltas(out.path)
    assert before.keys() == after.keys() and len(after) == 986 + 66
    for name, d in before.items():
        assert torch.allclose(after[name], d, rtol=1e-4, atol=1e-5 * float(d.abs().max())), name
    assert out.total_retained == pytest.approx(1.0, abs=1e-6) and out.clamped == 0
    assert all(m.relative_error < 1e-3 for m in out.modules)


def test_resize_to_k_is_the_optimal_truncation_with_its_retained_energy(lora32, tmp_path):
    out = resize(lora32, tmp_path / "r3.safetensors", rank=3, record=False, progress=False)
    before, after = deltas(lora32), deltas(out.path)
    by_name = {m.name: m for m in out.modules}
    for name, d in before.items():
        best, share = optimal(d, 3)
        assert torch.allclose(after[name].double(), best, atol=1e-4 * float(d.abs().max())), name
        assert by_name[name].rank == min(3, *d.shape)
        assert by_name[name].retained == pytest.approx(share, rel=1e-4), name
        assert by_name[name].relative_error == pytest.approx(math.sqrt(max(0.0, 1 - share)), rel=1e-3, abs=1e-5)
    total = sum(float(d.double().square().sum()) for d in before.values())
    kept = sum(float(after[n].double().square().sum()) for n in after)  # a truncation keeps exactly its σ²
    assert out.total_retained == pytest.approx(kept / total, rel=1e-4)
    with SafetensorsFile(out.path) as f:  # alpha / rank kept at the input's 0.5
        assert float(f.read("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha")) == 1.5
        assert f.read("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight").dtype == torch.float32
        meta = f.metadata
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"
    assert meta["modelspec.hash_sha256"] == "0x" + out.autov3 and meta["sshs_model_hash"] == out.autov3
    record = json.loads(meta[LINEAGE_RECORD_KEY])
    assert record["relation"] == "convert" and record["method"] == "resize" and record["rank"] == 3
    assert record["modules"]["lora_te1_text_model_encoder_layers_0_mlp_fc1"]["rank_in"] == 8


def test_rank_modes_and_budgets_follow_extractions_rules(lora32, tmp_path):
    energy = resize(lora32, tmp_path / "e.safetensors", rank_mode="energy", rank_param=0.9, record=False,
                    progress=False)
    spectra = {n: torch.linalg.svdvals(d.double()) for n, d in deltas(lora32).items()}
    for m in energy.modules:
        s2 = spectra[m.name].square()
        share = (s2.cumsum(0) / s2.sum()).tolist()
        assert m.rank == next(i + 1 for i, v in enumerate(share) if v >= 0.9 * (1 - 1e-12)), m.name
        assert m.retained >= 0.9 - 1e-6
    budget = 1_200_000  # rank 1 everywhere takes 358,816 parameters at the small size, rank 8 about 2.9M
    sized = resize(lora32, tmp_path / "p.safetensors", params=budget, record=False, progress=False)
    assert sized.params <= budget and sized.params > 0.9 * budget
    with SafetensorsFile(sized.path) as f:
        assert f.metadata["ss_network_dim"] == "Dynamic"
    smaller = resize(lora32, tmp_path / "s.safetensors", size="3MB", record=False, progress=False)
    assert 700_000 < smaller.params <= 750_000  # fp32: 4 bytes a parameter
    assert smaller.total_error > sized.total_error


def test_a_rank_larger_than_the_modules_is_clamped_and_counted(lora32, tmp_path):
    out = resize(lora32, tmp_path / "big.safetensors", rank=64, record=False, progress=False)
    assert {m.rank for m in out.modules} == {8} and out.clamped == len(out.modules)
    result = CliRunner().invoke(cli, ["resize", lora32, "-o", str(tmp_path / "big2.safetensors"), "--rank", "64",
                                      "--no-record"])
    assert result.exit_code == 0 and "hold fewer ranks than asked" in result.stderr


def test_differing_alpha_ratios_are_folded_into_the_factors(base, tmp_path):
    values = lora_tensors(modules_of(base), rank=4, alpha=2.0, dtype=torch.float32)
    values["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"] = torch.tensor(1.0)
    save_file(values, tmp_path / "odd.safetensors")
    out = resize(tmp_path / "odd.safetensors", tmp_path / "o.safetensors", rank=4, record=False, progress=False)
    assert out.alphas_folded and out.alpha_ratio == 1.0
    before, after = deltas(str(tmp_path / "odd.safetensors")), deltas(out.path)
    for name, d in before.items():
        assert torch.allclose(after[name], d, atol=1e-5 * float(d.abs().max())), name
    adapter = open_adapter(out.path)
    assert {m.alpha / m.rank for m in adapter.modules.values()} == {1.0}


def test_tucker_locon_is_resized_with_its_core_folded(base, tmp_path):
    path = write_lora(tmp_path / "tucker.safetensors", modules_of(base, conv=True), rank=4, alpha=4, mid=True,
                      metadata={"ss_network_args": '{"conv_dim": "4", "conv_alpha": "4", "use_tucker": "True"}'})
    out = resize(path, tmp_path / "t.safetensors", rank=4, record=False, progress=False)
    smaller = resize(path, tmp_path / "t2.safetensors", rank=2, record=False, progress=False)
    with SafetensorsFile(smaller.path) as f:
        assert json.loads(f.metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2", "use_tucker": "False"}
    before, after = deltas(path), deltas(out.path)
    for name, d in before.items():
        assert torch.allclose(after[name], d, rtol=2e-3, atol=2e-3 * float(d.abs().max())), name
    assert not any(k.endswith("lora_mid.weight") for k in open_adapter(out.path).tensors)


@pytest.mark.parametrize("dialect", ["kohya", "peft"])
def test_the_output_keeps_the_dialect_and_loads_everywhere(base, tmp_path, dialect):
    kohya = write_lora(tmp_path / "in.safetensors", modules_of(base, conv=True), rank=6, alpha=3)
    source = kohya if dialect == "kohya" else convert(kohya, tmp_path / "in_peft.safetensors", to="peft",
                                                      record=False).path
    out = resize(source, tmp_path / f"out_{dialect}.safetensors", rank=2, record=False, progress=False)
    adapter = open_adapter(out.path)
    assert adapter.dialect == dialect and out.dialect == dialect
    assert {m.alpha for m in adapter.modules.values()} == {1.0}  # alpha / rank 0.5 kept at rank 2
    with SafetensorsFile(out.path) as f:
        assert f.read(next(iter(adapter.modules.values())).keys["lora_up"]).dtype == torch.float16
    assert_loads_everywhere(base, out.path)


def test_the_resized_adapter_is_recorded_as_a_convert_of_its_input(lora32, tmp_path):
    from lineage.graph.registry import using_registry

    out = resize(lora32, tmp_path / "rec.safetensors", rank=2, progress=False)
    assert out.node is not None and out.record_error is None
    with using_registry(None) as reg:
        edges = list(reg.graph().in_edges(out.node, data=True))
        assert [(e[0], e[2]["relation"]) for e in edges] == [(reg.resolve(lora32), "convert")]
        assert edges[0][2]["params"]["method"] == "resize"


def test_cli_table_fits_80_columns_and_json_lists_every_module(lora32, tmp_path):
    result = CliRunner().invoke(cli, ["resize", lora32, "-o", str(tmp_path / "c.safetensors"), "--rank", "2",
                                      "--no-record"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("wrote ") and "retained" in lines[1]
    assert max(len(line) for line in lines[1:]) <= 80  # the table (the first line names the output)
    as_json = CliRunner().invoke(cli, ["resize", lora32, "-o", str(tmp_path / "j.safetensors"), "--rank-mode",
                                       "ratio", "--rank-param", "0.5", "--json", "--no-record"])
    report = json.loads(as_json.stdout)
    assert len(report["modules"]) == 986 + 66 and 0 < report["total_retained"] <= 1
    assert {"name", "rank_in", "rank", "retained", "relative_error"} <= set(report["modules"][0])
    assert set(report) == {"path", "autov3", "dialect", "params", "total_retained", "total_relative_error",
                           "alpha_ratio", "alphas_folded", "clamped", "node", "record_error", "modules"}


def test_bad_inputs_are_one_line_errors_naming_the_file_and_write_nothing(base, lora32, tmp_path):
    lokr = write_lokr(tmp_path / "lokr.safetensors", modules_of(base))
    dora = tmp_path / "dora.safetensors"
    values = lora_tensors(modules_of(base)[:1], rank=2)
    name = modules_of(base)[0].name
    values[f"{name}.dora_scale"] = torch.ones(1, modules_of(base)[0].shape[1], dtype=torch.float16)
    save_file(values, dora)
    out = tmp_path / "never.safetensors"
    cases = [(base, "is a checkpoint, not an adapter"), (lokr, "is lokr: only LoRA / LoCon modules"),
             (str(dora), "is DoRA"), (str(tmp_path / "missing.safetensors"), "no such file")]
    for source, message in cases:
        result = CliRunner().invoke(cli, ["resize", source, "-o", str(out), "--rank", "2"])
        assert result.exit_code != 0 and message in result.output and source in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    for options, message in ((["--rank", "0"], "at least 1"), ([], "give the new rank"),
                             (["--rank", "2", "--size", "1MB"], "not both"),
                             (["--rank-mode", "energy"], "needs --rank-param")):
        result = CliRunner().invoke(cli, ["resize", lora32, "-o", str(out), *options])
        assert result.exit_code != 0 and message in result.output, result.output
    with pytest.raises(LineageError, match="input"):
        resize(lora32, lora32, rank=2, record=False, progress=False)
    assert not out.exists()


def test_compat_finds_the_base_of_a_resized_extraction(base, tmp_path):
    """The `convert` edge makes the resized adapter a copy of its input for `lmerge compat`: it fits the
    base its input was extracted from."""
    from lineage.adapters.extract import extract
    from lineage.sdxl.synthetic import write_child

    tuned = write_child(base, tmp_path / "tuned.safetensors", rank=4)
    extracted = extract(base, tuned, tmp_path / "x.safetensors", rank=4, progress=False)
    resized = resize(extracted.path, tmp_path / "x_r2.safetensors", rank=2, progress=False)
    result = CliRunner().invoke(cli, ["compat", resized.path, base, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["relationship"] == "same-base"
