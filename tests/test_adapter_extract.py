"""Extraction (adapters/extract.py, adapters/decompose.py): LoRA / LoCon / diff from a tiny generated
fine-tune and its base, checked against exact SVDs computed here, the loaders' key rules and the registry."""
from __future__ import annotations

import json
import math

import pytest
import torch
from adapter_loading import module_difference
from click.testing import CliRunner
from loader_rules import a1111_unloaded, comfyui_key_map, comfyui_unloaded

from lineage.adapters.decompose import RankRule, allocate, low_rank
from lineage.adapters.extract import extract
from lineage.adapters.modules import sdxl_modules
from lineage.adapters.reader import open_adapter
from lineage.cli import main as cli
from lineage.errors import LineageError
from lineage.graph.metadata import LINEAGE_RECORD_KEY
from lineage.io.safetensors import SafetensorsFile, read_header, save_file
from lineage.sdxl.synthetic import write_base, write_child


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract")
    base = write_base(d / "base.safetensors", size="tiny")
    tuned = write_child(base, d / "tuned.safetensors", rank=4)
    return base, tuned


def adapter_delta(path: str, module) -> torch.Tensor:
    with SafetensorsFile(path) as f:
        down = f.read(f"{module.name}.lora_down.weight").float().flatten(1)
        up = f.read(f"{module.name}.lora_up.weight").float().flatten(1)
        alpha = float(f.read(f"{module.name}.alpha"))
    return up @ down * (alpha / down.shape[0])


def optimal_error2(delta: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum())


@pytest.mark.parametrize("exact", [False, True])
def test_a_fixed_rank_lora_is_within_one_percent_of_the_optimal_error(pair, tmp_path, exact):
    base, tuned = pair
    out = tmp_path / "lora.safetensors"
    done = extract(base, tuned, out, rank=8, dtype="fp32", exact=exact, record=False, progress=False)
    modules = sdxl_modules(read_header(base)[0])
    assert len(modules) == 986 and len(done.modules) == 986
    got = optimal = total = 0.0
    for module in modules[::25]:  # a spread sample of modules, every component
        delta = module_difference(base, tuned, module)
        got += float((delta - adapter_delta(out, module)).double().square().sum())
        optimal += optimal_error2(delta, min(8, *delta.shape))
        total += float(delta.double().square().sum())
    assert got <= 1.01 ** 2 * optimal
    assert done.total_error == pytest.approx(math.sqrt(sum(m.norm2 * m.relative_error ** 2 for m in done.modules)
                                                       / sum(m.norm2 for m in done.modules)))
    metadata = read_header(out)[1]
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "8"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    record = json.loads(metadata[LINEAGE_RECORD_KEY])
    assert record["relation"] == "adapter" and record["svd"] == ("exact" if exact else "randomized")
    assert [i["autov3"] for i in record["inputs"]] == [done.base_autov3]  # the parent
    assert record["tuned"]["autov3"] == done.tuned_autov3
    assert len(record["modules"]) == 986


@pytest.mark.parametrize("exact", [False, True])
def test_each_exact_svd_gives_its_workspace_back(pair, tmp_path, monkeypatch, exact):
    """The exact path returns each module's SVD workspace to the kernel once the module is done (at full size
    the exact run's peak RSS grew with the modules analysed); the randomized path's small temporaries stay
    in the heap for the next module."""
    import lineage.adapters.extract as extract_module

    released = []
    monkeypatch.setattr(extract_module, "release_freed_memory", lambda: released.append(True))
    base, tuned = pair
    done = extract(base, tuned, tmp_path / "lora.safetensors", rank=4, components=["clip_l"], exact=exact,
                   record=False, progress=False)
    assert len(released) == (len(done.modules) if exact else 0) and done.modules


def test_extracted_files_load_with_every_key_in_comfyui_and_a1111(pair, tmp_path):
    base, tuned = pair
    header = read_header(base)[0]
    for kind in ("lora", "locon"):
        out = tmp_path / f"{kind}.safetensors"
        extract(base, tuned, out, type=kind, rank=4, conv_rank=2, record=False, progress=False)
        keys = set(read_header(out)[0])
        assert comfyui_unloaded(keys, comfyui_key_map(header, {})) == set()
        assert a1111_unloaded(keys, header) == set()
        assert {m.algorithm for m in open_adapter(out).modules.values()} == {"lora"}
    locon = read_header(tmp_path / "locon.safetensors")[0]
    spatial = [m for m in sdxl_modules(header, conv=True) if m.spatial]
    assert spatial and all(locon[f"{m.name}.lora_down.weight"].shape == (2, m.shape[1], 3, 3) for m in spatial)


def test_a_diff_is_the_exact_difference(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "diff.safetensors"
    extract(base, tuned, out, type="diff", dtype="fp32", record=False, progress=False)
    with SafetensorsFile(out) as f:
        for module in sdxl_modules(read_header(base)[0])[::40]:
            stored = f.read(f"{module.name}.diff").float().reshape(module.shape[0], -1)
            assert torch.equal(stored, module_difference(base, tuned, module))


def test_rank_modes_keep_what_they_promise():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 8, generator=g) @ torch.randn(8, 48, generator=g) + 0.01 * torch.randn(64, 48, generator=g)
    factors = low_rank(delta, 32, exact=True)
    s = torch.linalg.svdvals(delta.double())
    energy = RankRule("energy", 0.9, 32).rank(factors)
    assert float(s[:energy].square().sum()) >= 0.9 * float(s.square().sum()) > float(s[:energy - 1].square().sum())
    assert RankRule("ratio", 0.5, 32).rank(factors) == int((s >= 0.5 * s[0]).sum())
    assert RankRule("threshold", float(s[3]), 32).rank(factors) == 4
    quantile = RankRule("quantile", 0.5, 32).rank(factors)
    assert float(s[:quantile].sum()) >= 0.5 * float(s.sum()) > float(s[:quantile - 1].sum())
    assert RankRule("fixed", 100, 100).rank(factors) == 32  # never more than were computed
    with pytest.raises(LineageError, match="--exact"):
        RankRule("quantile", 0.5, 32).rank(low_rank(delta, 16))
    with pytest.raises(LineageError, match=r"\(0, 1\]"):
        RankRule("energy", 1.5, 32)


def test_the_randomized_path_is_close_to_the_exact_one_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(640, 640, generator=g))
    v, _ = torch.linalg.qr(torch.randn(320, 320, generator=g))
    s = torch.logspace(0, -3, 320)
    delta = (u[:, :320] * s) @ v.T
    fast, exact = low_rank(delta, 32, generator=g), low_rank(delta, 32, exact=True)
    assert fast.residual2(32) <= 1.01 ** 2 * exact.residual2(32)
    up, down = fast.split(32)
    measured = float((delta - up @ down).double().square().sum())
    assert measured == pytest.approx(fast.residual2(32), rel=1e-3)  # the reported error is the real one


def test_a_global_budget_beats_one_rank_for_all_at_equal_size():
    g = torch.Generator().manual_seed(2)
    factors = {}
    for i, decay in enumerate((0.5, 0.9, 0.99)):  # fast to slow decaying spectra
        s = decay ** torch.arange(40, dtype=torch.float32)
        q1, _ = torch.linalg.qr(torch.randn(80, 40, generator=g))
        q2, _ = torch.linalg.qr(torch.randn(60, 40, generator=g))
        factors[f"m{i}"] = low_rank((q1 * s) @ q2.T, 40, exact=True)
    costs = {name: 140 for name in factors}
    uniform = {name: 10 for name in factors}
    budget = sum(costs[n] * uniform[n] for n in factors)
    ranks = allocate(factors, costs, budget)
    assert sum(costs[n] * ranks[n] for n in factors) <= budget
    assert ranks["m0"] < 10 < ranks["m2"]
    assert sum(f.residual2(ranks[n]) for n, f in factors.items()) < sum(f.residual2(10) for f in factors.values())
    with pytest.raises(LineageError, match="rank 1 of every changed module"):
        allocate(factors, costs, 100)


def test_a_size_budget_is_kept_and_ranks_differ(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "sized.safetensors"
    done = extract(base, tuned, out, size="400KB", record=False, progress=False)
    assert done.params * 2 <= 400_000
    assert len({m.rank for m in done.modules}) > 1
    assert read_header(out)[1]["ss_network_dim"] == "Dynamic"
    with SafetensorsFile(out) as f:  # one alpha/rank ratio everywhere: alpha = rank
        for m in done.modules[::50]:
            assert float(f.read(f"{m.name}.alpha")) == f.info(f"{m.name}.lora_down.weight").shape[0]


def test_a_slightly_changed_text_encoder_is_kept_and_an_identical_one_reported(tmp_path):
    base = write_base(tmp_path / "base.safetensors", size="tiny")
    tuned = write_child(base, tmp_path / "tuned.safetensors", components=("unet",))
    small = write_child(base, tmp_path / "small.safetensors", strength=2e-4, noise=0.0)
    unchanged = extract(base, tuned, tmp_path / "a.safetensors", rank=2, record=False, progress=False)
    assert unchanged.components["clip_l"]["changed"] == 0 and unchanged.components["clip_g"]["changed"] == 0
    assert not any(k.startswith("lora_te") for k in read_header(tmp_path / "a.safetensors")[0])
    kept = extract(base, small, tmp_path / "b.safetensors", rank=2, record=False, progress=False)
    assert 0 < kept.components["clip_l"]["relative_change"] < 0.01  # kohya's absolute 0.01 test would drop it
    assert kept.components["clip_l"]["changed"] == 72
    assert sum(k.startswith("lora_te1_") for k in read_header(tmp_path / "b.safetensors")[0]) == 72 * 3


def test_bad_input_is_one_line_and_writes_nothing(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "out.safetensors"
    with pytest.raises(LineageError, match="both the base and the fine-tune"):
        extract(base, base, out, record=False, progress=False)
    with pytest.raises(LineageError):
        extract(base, tuned, tuned, record=False, progress=False)  # never onto an input
    small = write_base(tmp_path / "small.safetensors", size="small")
    with pytest.raises(LineageError, match="not a fine-tune of the same architecture"):
        extract(base, small, out, record=False, progress=False)
    lora = tmp_path / "lora.safetensors"
    extract(base, tuned, lora, rank=2, record=False, progress=False)
    with pytest.raises(LineageError, match="SDXL checkpoint is required"):
        extract(base, lora, out, record=False, progress=False)
    with SafetensorsFile(tuned) as f:
        tensors = {k: f.read(k) for k in f.keys()}
    key = sdxl_modules(read_header(base)[0])[5].key
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[7] = float("nan")
    broken = tmp_path / "nan.safetensors"
    save_file(tensors, broken)
    with pytest.raises(LineageError, match="NaN or Inf"):
        extract(base, broken, out, record=False, progress=False)
    with pytest.raises(LineageError, match="needs --rank-param"):
        extract(base, tuned, out, rank_mode="energy", record=False, progress=False)
    with pytest.raises(LineageError, match="cannot read the size"):
        extract(base, tuned, out, size="lots", record=False, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {"small.safetensors", "lora.safetensors", "nan.safetensors"}


def test_the_cli_reports_at_80_columns_and_records_an_adapter_node(pair, tmp_path, monkeypatch):
    base, tuned = pair
    monkeypatch.setenv("LINEAGE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # the report names the output as given: short here
    out = tmp_path / "cli.safetensors"
    result = CliRunner().invoke(cli, ["extract", base, tuned, "-o", "cli.safetensors", "--rank", "4"])
    assert result.exit_code == 0, result.output
    assert "total relative error" in result.output and "clip_g" in result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80  # the report (progress bars: stderr)
    as_json = CliRunner().invoke(cli, ["extract", base, tuned, "-o", str(tmp_path / "j.safetensors"), "--rank", "2",
                                       "--json", "--no-record"])
    report = json.loads(as_json.output)
    assert len(report["modules"]) == 986 and report["svd"] == "randomized" and report["node"] is None
    tree = CliRunner().invoke(cli, ["compat", str(out), base])
    assert tree.exit_code == 0, tree.output
    from lineage.graph.registry import using_registry

    with using_registry(None) as reg:
        node = reg.resolve(str(out))
        parents = reg.graph().in_edges(node, data=True)
        assert [d["relation"] for _, _, d in parents] == ["adapter"], list(parents)


def test_the_randomized_path_gives_the_same_file_every_time(pair, tmp_path):
    """Its random directions come from a seeded generator of its own, not torch's global one, which
    two worker threads would draw from in whatever order they run."""
    base, tuned = pair
    first, second = (extract(base, tuned, tmp_path / f"{n}.safetensors", rank=4, workers=2, record=False,
                             progress=False) for n in ("a", "b"))
    assert first.autov3 == second.autov3
