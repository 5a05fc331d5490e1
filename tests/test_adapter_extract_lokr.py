"""LoKr extraction (adapters/kronecker.py, adapters/extract.py): the nearest Kronecker product checked
against Van Loan's optimum and a brute-force search, a planted Kronecker fine-tune recovered exactly,
LyCORIS' own modules rebuilding the same delta from our file, `apply` giving base + delta, the LoRA of
equal size in the report, and bad options refused in one line."""
from __future__ import annotations

import functools
import json
import math
import os

import pytest
import torch
from adapter_loading import lycoris_network, module_difference
from adapter_references import comfy_patch
from adapter_samples import modules_of
from click.testing import CliRunner

from lineage.adapters.apply import apply
from lineage.adapters.delta import module_delta
from lineage.adapters.extract import extract
from lineage.adapters.kronecker import KroneckerShape, factorization, kronecker_fit, nearest_kronecker, rearrange
from lineage.adapters.reader import open_adapter
from lineage.cli import main as cli
from lineage.errors import LineageError
from lineage.graph.metadata import LINEAGE_RECORD_KEY
from lineage.io.safetensors import SafetensorsFile, read_header, save_file
from lineage.sdxl.synthetic import write_base, write_child


@functools.lru_cache(maxsize=4)
def _read(path: str, stamp: tuple[int, int]):
    with SafetensorsFile(path) as f:
        return open_adapter(path), {key: f.read(key) for key in f.keys()}


def read_adapter(path: str):
    """(open_adapter(path), every tensor of the file), read once per written file: the helpers below look
    at many modules of one (tiny) file."""
    stat = os.stat(path)
    return _read(path, (stat.st_mtime_ns, stat.st_size))


def stored_delta(path: str, module) -> torch.Tensor:
    """The module's delta as our reader and delta code rebuild it from the file (scale included)."""
    adapter, stored = read_adapter(path)
    entry = adapter.modules[module.name]
    tensors = {role: stored[key] for role, key in entry.keys.items() if role != "alpha"}
    alpha = float(stored[entry.keys["alpha"]]) if "alpha" in entry.keys else None
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
    fit = kronecker_fit(delta, split, 12, exact=True)
    for rank in (1, 2, 4):
        found = fit.layout(rank)
        assert found.rank == rank and found.params == 16 + rank * (16 + 12)
        t = found.tensors
        measured = float((delta - torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])).double().square().sum())
        assert found.residual2 == pytest.approx(measured, rel=1e-4)
        errors.append(found.residual2)
    assert errors[0] > errors[1] > errors[2]
    full = fit.layout(12)  # no saving: w2 stays full
    assert full.rank is None and full.params == 16 + 16 * 12 and set(full.tensors) == {"lokr_w1", "lokr_w2"}


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
    (["--type", "lokr", "--kron-rank", "2"], "holds one Kronecker product kron(w1, w2) per module"),
    (["--type", "lokr", "--tucker"], "--tucker shapes a factored w2: give --rank or --rank-mode"),
    (["--type", "lokr", "--decompose-both", "--size", "1MB"], "--decompose-both goes with --rank or --rank-mode"),
    (["--type", "lokr", "--tucker", "--rank", "2", "--params", "9000"], "--tucker goes with --rank or --rank-mode"),
    (["--type", "locon", "--tucker"], "--tucker applies to --type lokr only"),
    (["--type", "lokr", "--params", "10"], "does not hold the smallest LoKr of the changed modules"),
    (["--type", "lora", "--factor", "2"], "--factor applies to --type lokr only"),
    (["--type", "locon", "--kron-rank", "2"], "--kron-rank applies to --type lokr only"),
])
def test_bad_lokr_options_are_one_line_errors(family, tmp_path, args, message):
    base, tuned, _ = family
    result = CliRunner().invoke(cli, ["extract", base, tuned, "-o", str(tmp_path / "x.safetensors"), "--no-record",
                                      *args])
    assert result.exit_code != 0
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def comfy_delta(path: str, module) -> torch.Tensor:
    """The module's delta as ComfyUI's LoKr rules (tests/adapter_references.py) rebuild it from the file."""
    adapter, stored = read_adapter(path)
    tensors = {role: stored[key] for role, key in adapter.modules[module.name].keys.items()}
    return comfy_patch(torch.zeros(module.shape), tensors, 1.0).reshape(module.shape[0], -1)


def tensor_bytes(path) -> int:
    """Bytes of every tensor of a safetensors file (alphas included), the header left out."""
    return sum(info.nbytes for info in read_header(path)[0].values())


def assert_lycoris_rebuilds(base: str, path: str, modules) -> None:
    """LyCORIS' own loader (create_network_from_weights, every key loaded) and ComfyUI's rules rebuild for
    `modules` the delta our reader and apply rebuild."""
    network, _ = lycoris_network(base, path)
    lycoris = {m.lora_name: m for m in network.unet_loras + network.text_encoder_loras}
    for m in modules:
        diff = lycoris[m.name].get_diff_weight()[0].detach().reshape(m.shape[0], -1).float()
        torch.testing.assert_close(diff, stored_delta(path, m), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(comfy_delta(path, m), stored_delta(path, m), rtol=1e-4, atol=1e-6)


def assert_apply_adds_the_stored_delta(base: str, path: str, tmp_path, modules) -> None:
    """`lmerge apply` of the file gives base + the delta rebuilt from the file's tensors, to the rounding of
    the checkpoint's dtype."""
    patched = tmp_path / "patched.safetensors"
    apply(base, [path], patched, record=False, progress=False)
    with SafetensorsFile(patched) as p, SafetensorsFile(base) as b:
        for m in modules:
            rows = slice(*m.rows) if m.rows else slice(None)
            weight = b.read(m.key).float()[rows].reshape(m.shape[0], -1)
            want = weight + stored_delta(path, m)
            got = p.read(m.key).float()[rows].reshape(m.shape[0], -1)
            torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) * 2 ** -10)
            assert not torch.equal(got, weight)
    patched.unlink()


def test_a_size_budget_fits_the_file_and_beats_a_uniform_rank(family, tmp_path):
    """--size for a LoKr: the written file's tensors (w1s and alphas included) fit the budget, the ranks
    differ between modules, and the total error is at most that of a uniform-rank LoKr of the same size;
    LyCORIS, our reader and apply rebuild the same delta."""
    base, tuned, _ = family
    modules = modules_of(base, conv=True)
    for rank in (2, 3):  # (the generated tiny model's w2 are small: LyCORIS takes a w2 pair up to rank 3)
        uniform_path = tmp_path / f"uniform{rank}.safetensors"
        uniform = extract(base, tuned, uniform_path, type="lokr", rank=rank, record=False, progress=False)
        size = tensor_bytes(uniform_path)
        budgeted_path = tmp_path / f"budget{rank}.safetensors"
        budgeted = extract(base, tuned, budgeted_path, type="lokr", size=f"{size}B", record=False, progress=False)
        assert tensor_bytes(budgeted_path) <= size
        assert budgeted.total_error <= uniform.total_error * (1 + 1e-6), rank
        assert len({m.w2_rank for m in budgeted.modules}) > 2  # one global allocation, not one rank for all
    record = json.loads(read_header(budgeted_path)[1][LINEAGE_RECORD_KEY])
    assert record["budget_params"] == size // 2
    cli_run = CliRunner().invoke(cli, ["extract", base, tuned, "-o", str(tmp_path / "cli.safetensors"), "--type",
                                       "lokr", "--size", f"{size}B", "--json", "--no-record"])
    assert cli_run.exit_code == 0, cli_run.output
    assert json.loads(cli_run.output)["params"] == budgeted.params
    # Every module's error is the one its stored tensors make, and loaders rebuild those tensors.
    chosen = [m for m in modules if budgeted.modules[modules.index(m)].w2_rank][::25]
    reported = {m.name: m for m in budgeted.modules}
    for m in chosen:
        delta = module_difference(base, tuned, m)
        error = float((delta - stored_delta(str(budgeted_path), m)).norm() / delta.norm())
        assert error == pytest.approx(reported[m.name].relative_error, rel=2e-3, abs=1e-4)  # fp16 tensors
    assert_lycoris_rebuilds(base, str(budgeted_path), chosen)
    assert_apply_adds_the_stored_delta(base, str(budgeted_path), tmp_path, chosen)


def test_a_parameter_budget_counts_every_tensor_and_turns_w2_whole_when_it_can(family, tmp_path):
    base, tuned, _ = family
    whole = extract(base, tuned, tmp_path / "whole.safetensors", type="lokr", record=False, progress=False)
    n_tensors = len(read_header(tmp_path / "whole.safetensors")[0])
    # Exactly the whole LoKr's tensors: every module's w2 whole, the same error.
    exact_fit = whole.params + len(whole.modules)  # + one alpha per module
    done = extract(base, tuned, tmp_path / "b.safetensors", type="lokr", params=exact_fit, dtype="fp32",
                   record=False, progress=False)
    assert all(m.w2_rank is None for m in done.modules) and done.params == whole.params
    assert done.total_error == pytest.approx(whole.total_error, rel=1e-6)
    assert len(read_header(tmp_path / "b.safetensors")[0]) == n_tensors
    # One parameter less: some module's w2 becomes a pair, and the file holds at most that many values.
    tighter = extract(base, tuned, tmp_path / "c.safetensors", type="lokr", params=exact_fit - 1, dtype="fp32",
                      record=False, progress=False)
    assert any(m.w2_rank for m in tighter.modules)
    assert tensor_bytes(tmp_path / "c.safetensors") <= (exact_fit - 1) * 4
    assert tighter.total_error >= whole.total_error


def test_tucker_w2_is_lycoris_layout_and_its_error_is_the_written_one(family, tmp_path):
    """--tucker: every 3x3 convolution whose w2 is factored holds lokr_t2 (r, r, kh, kw), lokr_w2_a (r, b)
    and lokr_w2_b (r, d); the error reported is ‖Δ − rebuilt‖/‖Δ‖ of the written tensors; LyCORIS' own
    Tucker rebuild and its module (built with use_tucker) give our delta; ComfyUI's and A1111's key
    rules load every key; apply adds the delta."""
    from loader_rules import a1111_unloaded, comfyui_key_map, comfyui_unloaded
    from lycoris.functional.general import rebuild_tucker
    from lycoris.modules.lokr import LokrModule

    base, tuned, _ = family
    out = tmp_path / "tucker.safetensors"
    rank = 1  # (at the tiny size most 3x3 convolutions' w2 take a pair at rank 1 only)
    done = extract(base, tuned, out, type="lokr", rank=rank, tucker=True, dtype="fp32", record=False,
                   progress=False)
    plain = extract(base, tuned, tmp_path / "plain.safetensors", type="lokr", rank=rank, dtype="fp32",
                    record=False, progress=False)
    reported = {m.name: m for m in done.modules}
    untouched = {m.name: m for m in plain.modules}
    header, metadata = read_header(out)
    assert json.loads(metadata["ss_network_args"])["use_tucker"] == "True"
    convs = [m for m in modules_of(base, conv=True) if m.spatial]
    tucker = [m for m in convs if f"{m.name}.lokr_t2" in header]
    assert tucker and all(reported[m.name].tucker for m in tucker)
    assert not any(reported[m.name].tucker for m in modules_of(base, conv=True) if not m.spatial)
    with SafetensorsFile(out) as f:
        for m in tucker:
            split = KroneckerShape.of(m.shape)
            t2, w2a, w2b = (f.read(f"{m.name}.{role}") for role in ("lokr_t2", "lokr_w2_a", "lokr_w2_b"))
            assert t2.shape == (rank, rank, *m.shape[2:]) and w2a.shape == (rank, split.b)
            assert w2b.shape == (rank, split.d) and float(f.read(f"{m.name}.alpha")) == rank
            delta = module_difference(base, tuned, m)
            ours = stored_delta(str(out), m)
            error = float((delta - ours).double().norm() / delta.double().norm())
            assert error == pytest.approx(reported[m.name].relative_error, rel=1e-4)
            assert reported[m.name].relative_error >= untouched[m.name].relative_error * (1 - 1e-5)
            assert reported[m.name].params < untouched[m.name].params
            # LyCORIS: its Tucker rebuild of w2, and its module built with use_tucker from our tensors.
            w1 = f.read(f"{m.name}.lokr_w1")
            rebuilt = torch.kron(w1[:, :, None, None], rebuild_tucker(t2, w2a, w2b)).reshape(m.shape[0], -1)
            torch.testing.assert_close(rebuilt, ours, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(comfy_delta(str(out), m), ours, rtol=1e-4, atol=1e-6)
            conv = torch.nn.Conv2d(m.shape[1], m.shape[0], m.shape[2:], bias=False)
            module = LokrModule(m.name, conv, lora_dim=rank, alpha=rank, use_tucker=True)
            state = {role: f.read(f"{m.name}.{role}") for role in ("lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b")}
            loaded = module.load_state_dict({**state, "alpha": f.read(f"{m.name}.alpha")}, strict=False)
            assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"org_weight"}
            torch.testing.assert_close(module.get_diff_weight()[0].detach().reshape(m.shape[0], -1), ours,
                                       rtol=1e-4, atol=1e-6)
    keys = list(header)
    assert comfyui_unloaded(keys, comfyui_key_map(read_header(base)[0], {})) == set()
    assert a1111_unloaded(keys, read_header(base)[0]) == set()
    assert_apply_adds_the_stored_delta(base, str(out), tmp_path, tucker[:3])


def test_decompose_both_factors_w1_where_lycoris_takes_it(family, tmp_path):
    """--decompose-both: w1 as lokr_w1_a (a, r) @ lokr_w1_b (r, c) beside a w2 pair of the same rank wherever
    that is smaller than w1, w2 fitted again to the truncated w1; the reported error is the written
    tensors' error, LyCORIS' own loader (every key) and apply rebuild the same delta."""
    from loader_rules import comfyui_key_map, comfyui_unloaded

    base, tuned, _ = family
    rank = 1  # (at the tiny size most w1 are 4x4: LyCORIS takes a pair below rank 2)
    out = tmp_path / "both.safetensors"
    done = extract(base, tuned, out, type="lokr", rank=rank, decompose_both=True, dtype="fp32", record=False,
                   progress=False)
    header = read_header(out)[0]
    assert json.loads(read_header(out)[1]["ss_network_args"])["decompose_both"] == "True"
    modules = {m.name: m for m in modules_of(base, conv=True)}
    both = [r for r in done.modules if r.w1_rank]
    assert both and all(r.w1_rank == r.w2_rank == rank for r in both)
    for r in done.modules:
        a, c = r.w1_shape
        assert (f"{r.name}.lokr_w1_a" in header) == (r.w1_rank is not None)
        if r.w1_rank:
            assert header[f"{r.name}.lokr_w1_a"].shape == (a, rank) and header[f"{r.name}.lokr_w1_b"].shape == (rank, c)
            assert rank * (a + c) < a * c and f"{r.name}.lokr_w2_a" in header
    for r in both[::10]:
        m = modules[r.name]
        delta = module_difference(base, tuned, m)
        error = float((delta - stored_delta(str(out), m)).double().norm() / delta.double().norm())
        assert error == pytest.approx(r.relative_error, rel=1e-4)
    chosen = [modules[r.name] for r in both[::10]]
    assert comfyui_unloaded(list(header), comfyui_key_map(read_header(base)[0], {})) == set()
    assert_lycoris_rebuilds(base, str(out), chosen)
    assert_apply_adds_the_stored_delta(base, str(out), tmp_path, chosen)
