"""lmerge lora-merge (adapters/lora_merge.py): several LoRAs as one, exactly (stacked factors) or re-truncated,
checked against the sum of the inputs' deltas (adapters/delta.py) and exact SVDs computed here."""
from __future__ import annotations

import json

import pytest
import torch
from adapter_loading import assert_loads_everywhere, deltas
from adapter_samples import lora_tensors, modules_of, write_lokr, write_lora
from click.testing import CliRunner

from lineage.adapters.convert import convert
from lineage.adapters.lora_merge import lora_merge
from lineage.adapters.reader import open_adapter
from lineage.cli import main as cli
from lineage.graph.metadata import LINEAGE_RECORD_KEY
from lineage.io.safetensors import SafetensorsFile, save_file
from lineage.sdxl.synthetic import write_base


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base; A: an fp32 LoCon of rank 4 (alpha 2) on every module; B: a rank-3 LoRA (alpha 6) on the
    default modules, in PEFT's dialect."""
    d = tmp_path_factory.mktemp("lora-merge")
    base = write_base(d / "base.safetensors", size="tiny")
    a = d / "a.safetensors"
    save_file(lora_tensors(modules_of(base, conv=True), rank=4, alpha=2.0, dtype=torch.float32, seed=1), a)
    save_file(lora_tensors(modules_of(base), rank=3, alpha=6.0, dtype=torch.float32, seed=2), d / "b_kohya.safetensors")
    b = convert(d / "b_kohya.safetensors", d / "b_peft.safetensors", to="peft", record=False).path
    return base, str(a), b


def summed(parts):
    total = {}
    for path, weight in parts:
        for name, d in deltas(path).items():
            total[name] = total.get(name, 0) + weight * d
    return total


def test_concatenation_is_the_weighted_sum_of_the_deltas(family, tmp_path):
    base, a, b = family
    out = lora_merge([(a, 0.7), (b, -1.5)], tmp_path / "ab.safetensors", record=False, progress=False)
    expected, got = summed([(a, 0.7), (b, -1.5)]), deltas(out.path)
    assert got.keys() == expected.keys() and len(got) == 986 + 66  # modules of only A are kept
    for name, d in expected.items():
        assert torch.allclose(got[name], d, atol=1e-5 * float(d.abs().max())), name
    ranks = {m.name: m.rank for m in out.modules}
    assert ranks["lora_te1_text_model_encoder_layers_0_mlp_fc1"] == 7 and out.exact and out.total_error == 0
    conv = next(m for m in modules_of(base, conv=True) if m.spatial).name
    assert ranks[conv] == 4
    adapter = open_adapter(out.path)
    assert adapter.dialect == "kohya" and all(m.alpha == m.rank for m in adapter.modules.values())
    norm2 = {m.name: m.norm2 for m in out.modules}
    for name, d in expected.items():
        assert norm2[name] == pytest.approx(float(d.double().square().sum()), rel=1e-4), name
    with SafetensorsFile(out.path) as f:
        record = json.loads(f.metadata[LINEAGE_RECORD_KEY])
        assert f.metadata["ss_network_dim"] == "Dynamic"
    assert record["relation"] == "merge" and record["weights"] == [0.7, -1.5] and record["mode"] == "concatenate"
    assert [i["name"] for i in record["inputs"]] == ["a.safetensors", "b_peft.safetensors"]
    assert_loads_everywhere(base, out.path)


def test_merge_to_a_rank_is_the_optimal_truncation_of_the_sum(family, tmp_path):
    base, a, b = family
    out = lora_merge([a, b], tmp_path / "r3.safetensors", rank=3, dialect="peft", record=False, progress=False)
    expected, got = summed([(a, 1.0), (b, 1.0)]), deltas(out.path)
    by_name = {m.name: m for m in out.modules}
    for name, d in expected.items():
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        k = min(3, *d.shape)
        assert torch.allclose(got[name].double(), (u[:, :k] * s[:k]) @ vh[:k], atol=1e-4 * float(d.abs().max()))
        assert by_name[name].retained == pytest.approx(float(s[:k].square().sum() / s.square().sum()), rel=1e-4)
    assert open_adapter(out.path).dialect == "peft" and not out.exact
    assert_loads_everywhere(base, out.path)


def test_the_merge_is_recorded_with_both_parents_and_their_weights(family, tmp_path):
    from lineage.graph.registry import using_registry

    _, a, b = family
    out = lora_merge([(a, 1.0), (b, 0.5)], tmp_path / "rec.safetensors", progress=False)
    assert out.node and out.record_error is None
    with using_registry(None) as reg:
        edges = {e[0]: e[2] for e in reg.graph().in_edges(out.node, data=True)}
        assert {reg.resolve(a), reg.resolve(b)} == set(edges)
        assert {d["relation"] for d in edges.values()} == {"merge"}
        assert edges[reg.resolve(b)]["weight"] == 0.5


def test_cli_concatenates_and_truncates(family, tmp_path):
    _, a, b = family
    result = CliRunner().invoke(cli, ["lora-merge", f"{a}:0.5", b, "-o", str(tmp_path / "c.safetensors"),
                                      "--no-record"])
    assert result.exit_code == 0, result.output
    assert "concatenated" in result.stdout
    as_json = CliRunner().invoke(cli, ["lora-merge", a, b, "-o", str(tmp_path / "j.safetensors"), "--rank-mode",
                                       "energy", "--rank-param", "0.8", "--json", "--no-record"])
    report = json.loads(as_json.stdout)
    assert report["exact"] is False and all(m["retained"] >= 0.8 - 1e-6 for m in report["modules"] if m["rank"])
    assert set(report) == {"path", "autov3", "dialect", "exact", "params", "total_retained", "total_relative_error",
                           "clamped", "node", "record_error", "modules"}
    table = CliRunner().invoke(cli, ["lora-merge", a, b, "-o", str(tmp_path / "t.safetensors"), "--rank", "2",
                                     "--no-record"])
    assert max(len(line) for line in table.stdout.splitlines()[1:]) <= 80


def test_bad_inputs_are_one_line_errors_naming_the_file_and_write_nothing(family, tmp_path):
    base, a, b = family
    lokr = write_lokr(tmp_path / "lokr.safetensors", modules_of(base))
    out = tmp_path / "never.safetensors"
    for inputs, message, named in (([a, lokr], "is lokr", lokr), ([a, base], "is a checkpoint", base),
                                   ([a, str(tmp_path / "missing.safetensors")], "no such file", "missing"),
                                   ([a], "at least two", None)):
        result = CliRunner().invoke(cli, ["lora-merge", *inputs, "-o", str(out)])
        assert result.exit_code != 0 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and (named is None or named in result.output)
    other = write_base(tmp_path / "small.safetensors", size="small")
    wide = write_lora(tmp_path / "wide.safetensors", modules_of(other), rank=2)
    result = CliRunner().invoke(cli, ["lora-merge", a, wide, "-o", str(out)])
    assert result.exit_code != 0 and "wide.safetensors" in result.output, result.output
    assert not out.exists()
