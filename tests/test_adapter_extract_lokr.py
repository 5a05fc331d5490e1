"""LoKr extraction (adapters/kronecker.py, adapters/extract.py): the nearest Kronecker product checked
against Van Loan's optimum and a brute-force search, a planted Kronecker fine-tune recovered exactly,
LyCORIS' own modules rebuilding the same delta from our file, `apply` giving base + delta, the LoRA of
equal size in the report, and bad options refused in one line."""
from __future__ import annotations

import json
import math

import pytest
import torch
from adapter_loading import lycoris_network, module_difference
from adapter_samples import modules_of
from click.testing import CliRunner

from lineage.adapters.apply import apply
from lineage.adapters.decompose import RankRule
from lineage.adapters.delta import module_delta
from lineage.adapters.extract import extract
from lineage.adapters.kronecker import KroneckerShape, factorization, lokr_factors, nearest_kronecker, rearrange
from lineage.adapters.reader import open_adapter
from lineage.cli import main as cli
from lineage.errors import LineageError
from lineage.graph.metadata import LINEAGE_RECORD_KEY
from lineage.io.safetensors import SafetensorsFile, read_header, save_file
from lineage.sdxl.synthetic import write_base, write_child


def stored_delta(path: str, module) -> torch.Tensor:
    """The module's delta as our reader and delta code rebuild it from the file (scale included)."""
    adapter = open_adapter(path)
    entry = adapter.modules[module.name]
    with SafetensorsFile(path) as f:
        tensors = {role: f.read(key) for role, key in entry.keys.items() if role != "alpha"}
        alpha = float(f.read(entry.keys["alpha"])) if "alpha" in entry.keys else None
    return module_delta("lokr", tensors, alpha, module.shape).reshape(module.shape[0], -1)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny base, a low-rank fine-tune of it, and a fine-tune whose every LoKr module changes by an
    exact Kronecker product of the most-square split (stored in fp32, so the difference is that product)."""
    d = tmp_path_factory.mktemp("lokr")
    base = write_base(d / "base.safetensors", size="tiny")
    tuned = write_child(base, d / "tuned.safetensors", rank=4)
    g = torch.Generator().manual_seed(3)
    with SafetensorsFile(base) as f:
        tensors = {k: f.read(k).float() for k in f.keys()}
    for m in modules_of(base, conv=True):
        split = KroneckerShape.of(m.shape)
        planted = torch.kron(torch.randn(*split.w1, generator=g), torch.randn(*split.w2, generator=g)) * 0.01
        rows = slice(*m.rows) if m.rows else slice(None)
        tensors[m.key][rows] += planted.reshape(m.shape)
    planted_path = d / "planted.safetensors"
    save_file(tensors, planted_path)
    return base, tuned, str(planted_path)


@pytest.mark.parametrize("factor", [-1, 1, 2, 4, 8, 16, 3, 5])
def test_factorization_is_lycoris(factor):
    from lycoris.functional.general import factorization as lycoris_factorization

    for dim in (1, 7, 12, 96, 128, 250, 320, 360, 512, 1024, 1280, 2816):
        if factor != -1 and dim % factor:
            with pytest.raises(LineageError, match=f"--factor {factor} does not divide the dimension {dim}"):
                factorization(dim, factor)
        else:
            assert factorization(dim, factor) == lycoris_factorization(dim, factor), dim


def test_rearranging_turns_a_kronecker_product_into_rank_one():
    g = torch.Generator().manual_seed(0)
    split = KroneckerShape(a=3, b=4, c=2, d=5, kernel=1)
    w1, w2 = torch.randn(3, 2, generator=g), torch.randn(4, 5, generator=g)
    rearranged = rearrange(torch.kron(w1, w2), split)
    torch.testing.assert_close(rearranged, w1.reshape(-1, 1) @ w2.reshape(1, -1))
    assert torch.linalg.matrix_rank(rearranged) == 1


@pytest.mark.parametrize("kron_rank", [1, 2, 3])
def test_the_nearest_kronecker_sum_is_van_loans_optimum(kron_rank):
    """Its squared error is the tail of R(Δ)'s singular values, the error measured matches it, and no
    local search from random starts finds a better sum of as many Kronecker products."""
    g = torch.Generator().manual_seed(kron_rank)
    split = KroneckerShape(a=2, b=3, c=3, d=2, kernel=1)
    delta = torch.randn(6, 6, generator=g, dtype=torch.float64).float()
    found = nearest_kronecker(delta, split, kron_rank, exact=True)
    tail = float(torch.linalg.svdvals(rearrange(delta, split).double())[kron_rank:].square().sum())
    assert found.residual2 == pytest.approx(tail, rel=1e-4)
    assert float((delta - found.matrix()).double().square().sum()) == pytest.approx(tail, rel=1e-4, abs=1e-6)
    best_searched = math.inf
    for start in range(8):  # gradient descent on the factors themselves, from random starts
        torch.manual_seed(start)
        w1 = torch.randn(kron_rank, *split.w1, dtype=torch.float64, requires_grad=True)
        w2 = torch.randn(kron_rank, *split.w2, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS([w1, w2], max_iter=500, line_search_fn="strong_wolfe")

        def loss():
            optimiser.zero_grad()
            value = (delta.double() - sum(torch.kron(p, q) for p, q in zip(w1, w2))).square().sum()
            value.backward()
            return value
        optimiser.step(loss)
        best_searched = min(best_searched, float(loss().detach()))
    assert best_searched >= tail * (1 - 1e-5)
    assert best_searched == pytest.approx(tail, rel=1e-3)  # the search does reach it: the bound is tight


def test_a_low_rank_w2_error_is_exact_and_falls_with_rank():
    g = torch.Generator().manual_seed(4)
    split = KroneckerShape(a=4, b=16, c=4, d=12, kernel=1)
    delta = torch.randn(64, 48, generator=g)
    errors = []
    for rank in (1, 2, 4):
        found = lokr_factors(delta, split, RankRule("fixed", rank, rank), exact=True)
        assert found.w2_rank == rank and found.params == 16 + rank * (16 + 12)
        up, down = found.w2_factors.split(rank)
        measured = float((delta - torch.kron(found.w1, up @ down)).double().square().sum())
        assert found.residual2 == pytest.approx(measured, rel=1e-4)
        errors.append(found.residual2)
    assert errors[0] > errors[1] > errors[2]
    full = lokr_factors(delta, split, RankRule("fixed", 12, 12), exact=True)  # no saving: w2 stays full
    assert full.w2_rank is None and full.params == 16 + 16 * 12


def test_a_planted_kronecker_fine_tune_is_recovered_exactly(family, tmp_path):
    base, _, planted = family
    out = tmp_path / "planted-lokr.safetensors"
    done = extract(base, planted, out, type="lokr", dtype="fp32", record=False, progress=False)
    assert len(done.modules) == len(modules_of(base, conv=True)) and all(m.rank > 0 for m in done.modules)
    # The reported error is ‖Δ‖² − σ₁² of fp32 singular values: exact to about √(fp32 ε) of ‖Δ‖.
    assert done.total_error < 1e-3
    assert max(m.relative_error for m in done.modules) < 2e-3
    for m in modules_of(base, conv=True)[::30]:  # what the file holds is the planted product to fp32 rounding
        delta = module_difference(base, planted, m)
        assert float((stored_delta(str(out), m) - delta).norm() / delta.norm()) < 1e-4


@pytest.mark.parametrize("rank", [None, 2])
def test_lycoris_rebuilds_the_delta_we_report(family, tmp_path, rank):
    """LyCORIS' own modules, built from our file, give a delta whose distance to the true difference is
    the error we report, for linear layers and 1x1 and 3x3 convolutions (w2 holding the kernel)."""
    base, tuned, _ = family
    out = tmp_path / "lokr.safetensors"
    done = extract(base, tuned, out, type="lokr", rank=rank, dtype="fp32", record=False, progress=False)
    network, weights = lycoris_network(base, str(out))
    lycoris = {m.lora_name: m for m in network.unet_loras + network.text_encoder_loras}
    modules = modules_of(base, conv=True)
    kinds = {"linear": [m for m in modules if len(m.shape) == 2][::80],
             "conv1x1": [m for m in modules if m.shape[2:] == (1, 1)][:3],
             "conv3x3": [m for m in modules if m.spatial][:3]}
    assert all(kinds.values())
    reported = {m.name: m for m in done.modules}
    factored = []
    for kind, chosen in kinds.items():
        for m in chosen:
            diff = lycoris[m.name].get_diff_weight()[0].detach().reshape(m.shape[0], -1).float()
            torch.testing.assert_close(diff, stored_delta(str(out), m), rtol=1e-4, atol=1e-6)
            delta = module_difference(base, tuned, m)
            error = float((delta - diff).norm() / delta.norm())
            assert error == pytest.approx(reported[m.name].relative_error, rel=1e-3), (kind, m.name)
            if f"{m.name}.lokr_w2_b" not in weights:  # w2 whole: what LyCORIS expects at this rank
                assert rank is None or rank >= max(m.shape[0] // reported[m.name].w1_shape[0],
                                                   m.shape[1] // reported[m.name].w1_shape[1]) / 2, m.name
                assert weights[f"{m.name}.lokr_w2"].shape[2:] == m.shape[2:]  # w2 (b, d, kh, kw) holds the kernel
            else:
                stored = weights[f"{m.name}.lokr_w2_b"]
                factored.append(m.name)
                assert weights[f"{m.name}.alpha"] == rank and stored.shape[0] == rank
                assert stored.shape[1] == math.prod(m.shape[1:]) // reported[m.name].w1_shape[1]
    assert rank is None or factored  # some modules are wide enough for a factored w2


def test_apply_of_the_extracted_lokr_gives_base_plus_delta(family, tmp_path):
    base, _, planted = family
    lokr = tmp_path / "lokr.safetensors"
    extract(base, planted, lokr, type="lokr", dtype="fp32", record=False, progress=False)
    patched = tmp_path / "patched.safetensors"
    apply(base, [str(lokr)], patched, record=False, progress=False)
    with SafetensorsFile(patched) as p, SafetensorsFile(planted) as t, SafetensorsFile(base) as b:
        for m in modules_of(base, conv=True)[::50]:
            got, want = p.read(m.key).float(), t.read(m.key).float()
            assert p.info(m.key).dtype == b.info(m.key).dtype
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=0, atol=scale * 2 ** -10)  # fp16 rounding of the output
            assert not torch.equal(got, b.read(m.key).float())


def test_a_given_factor_splits_every_module_at_it(family, tmp_path):
    from lycoris.functional.general import factorization as lycoris_factorization

    base, tuned, _ = family
    square = extract(base, tuned, tmp_path / "square.safetensors", type="lokr", record=False, progress=False)
    two = extract(base, tuned, tmp_path / "two.safetensors", type="lokr", factor=2, record=False, progress=False)
    modules = {m.name: m for m in modules_of(base, conv=True)}
    for chosen, factor in ((square, -1), (two, 2)):
        for r in chosen.modules:
            shape = modules[r.name].shape
            (a, b), (c, d) = (lycoris_factorization(n, factor) for n in shape[:2])
            assert r.w1_shape == (a, c) and r.w2_shape == (b, d * math.prod(shape[2:]))
    assert all(r.w1_shape[0] <= 2 for r in two.modules)
    assert square.params < two.params
    args = json.loads(read_header(tmp_path / "two.safetensors")[1]["ss_network_args"])
    assert args == {"algo": "lokr", "factor": "2", "full_matrix": "True"}


def test_the_lora_of_equal_size_is_the_optimal_lora_at_that_parameter_count(family, tmp_path):
    base, tuned, _ = family
    done = extract(base, tuned, tmp_path / "f2.safetensors", type="lokr", factor=2, exact=True, record=False,
                   progress=False)
    modules = {m.name: m for m in modules_of(base, conv=True)}
    checked = 0
    for r in done.modules[::40]:
        m = modules[r.name]
        cost = m.shape[0] + math.prod(m.shape[1:])
        assert r.lora_rank == min(r.params // cost, m.shape[0], math.prod(m.shape[1:]))
        delta = module_difference(base, tuned, m).double()
        s = torch.linalg.svdvals(delta)
        optimal = float((s[r.lora_rank:].square().sum() / s.square().sum()).sqrt())
        assert r.lora_error == pytest.approx(optimal, rel=1e-3, abs=1e-5)  # fp32 singular values
        checked += r.lora_rank > 0
    assert checked  # some modules afford a LoRA of rank >= 1 at the LoKr's size
    assert 0 < done.lora_error < 1


def test_the_cli_reports_lokr_beside_lora_and_records_it(family, tmp_path, monkeypatch):
    base, tuned, _ = family
    monkeypatch.setenv("LINEAGE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["extract", base, tuned, "-o", "k.safetensors", "--type", "lokr", "--rank", "2"])
    assert result.exit_code == 0, result.output
    assert "a LoRA of equal size" in result.stdout and "LoKr is better in" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    metadata = read_header(tmp_path / "k.safetensors")[1]
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lokr", "factor": "-1"}
    assert metadata["modelspec.architecture"].endswith("/lycoris")
    record = json.loads(metadata[LINEAGE_RECORD_KEY])
    assert record["type"] == "lokr" and record["factor"] == -1 and record["rank"] == 2
    assert 0 < record["total_relative_error"] and 0 < record["lora_equal_params_relative_error"]
    assert all("lora_error" in m for m in record["modules"].values())
    as_json = CliRunner().invoke(cli, ["extract", base, tuned, "-o", "j.safetensors", "--type", "lokr", "--json",
                                       "--no-record"])
    report = json.loads(as_json.output)
    assert report["type"] == "lokr" and 0 < report["lora_equal_params_relative_error"] <= 1
    assert all(m["w1_shape"] and m["lora_rank"] is not None for m in report["modules"])
    from lineage.graph.registry import using_registry

    with using_registry(None) as reg:
        node = reg.resolve(str(tmp_path / "k.safetensors"))
        parents = reg.graph().in_edges(node, data=True)
        assert [d["relation"] for _, _, d in parents] == ["adapter"]
        assert reg.graph().nodes[node]  # the record holds the errors


@pytest.mark.parametrize(("args", "message"), [
    (["--type", "lokr", "--factor", "7"], "--factor 7 does not divide"),
    (["--type", "lokr", "--factor", "0"], "--factor must be -1"),
    (["--type", "lokr", "--kron-rank", "0"], "--kron-rank must be at least 1"),
    (["--type", "lokr", "--kron-rank", "2"], "one Kronecker product per module"),
    (["--type", "lora", "--factor", "2"], "--factor applies to --type lokr only"),
    (["--type", "locon", "--kron-rank", "2"], "--kron-rank applies to --type lokr only"),
    (["--type", "lokr", "--size", "1MB"], "--size and --params apply to lora and locon"),
])
def test_bad_lokr_options_are_one_line_errors(family, tmp_path, args, message):
    base, tuned, _ = family
    result = CliRunner().invoke(cli, ["extract", base, tuned, "-o", str(tmp_path / "x.safetensors"), "--no-record",
                                      *args])
    assert result.exit_code != 0
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
