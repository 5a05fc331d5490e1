"""`lmerge apply` / lineage.adapters.apply: adapters baked into a checkpoint equal kohya's merge formula and
ComfyUI's patch at the same strengths (to fp16 rounding); untouched keys stay byte for byte; the output is
recorded with the checkpoint and every adapter as parents; bad input is a one-line error naming the file
and leaves nothing behind."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from adapter_references import comfy_patch, kohya_merge
from adapter_samples import lora_tensors, modules_of, write_diff, write_loha, write_lokr, write_lora

import lineage.adapters
from lineage.adapters.apply import AdapterInput
from lineage.errors import CheckpointError, LineageError
from lineage.graph.registry import using_registry
from lineage.io.hashing import hash_file
from lineage.io.safetensors import SafetensorsFile, read_header, save_file
from lineage.sdxl.layout import is_pass_through


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lineage.sdxl.synthetic import write_base
    return write_base(tmp_path_factory.mktemp("apply") / "base.safetensors", size="tiny")


def load(path: str) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f.keys()}


def module_tensors(found: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of module `name` among an adapter's tensors `found`, by role."""
    return {k[len(name) + 1:].removesuffix(".weight"): v for k, v in found.items() if k.startswith(name + ".")}


def expected_output(base: str, adapters: list[tuple[str, float]], formula) -> dict[str, torch.Tensor]:
    """Every module of every adapter applied in order to the base's fp32 weights (q/k/v on their rows)."""
    weights = {k: v.float() for k, v in load(base).items()}
    inventory = {m.name: m for m in modules_of(base, conv=True)}
    for adapter, strength in adapters:
        found = load(adapter)
        for name in {k.split(".")[0] for k in found}:
            m = inventory[name]
            full = weights[m.key]
            rows = slice(*m.rows) if m.rows else slice(None)
            full[rows] = formula(full[rows].reshape(m.shape), module_tensors(found, name), strength).reshape(
                full[rows].shape)
    return weights


def assert_equal_to_fp16_rounding(out: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key, value in out.items():
        reference = expected[key]
        if not value.is_floating_point():
            assert torch.equal(value, reference.to(value.dtype)), key
            continue
        # one step of the stored dtype at the value, plus what fp32 sums taken in another order differ by
        # (relative to the tensor's largest value: the factors' products can be far larger than the sum)
        step = torch.finfo(value.dtype).eps * reference.abs() + 2 ** -20 * reference.abs().max()
        error = (value.float() - reference).abs()
        assert bool((error <= step).all()), f"{key}: off by {float((error / step).max()):.2f} steps"


# ---- equal to kohya and ComfyUI ---------------------------------------------------------------------

def test_lora_and_locon_equal_kohya_merge(base, tmp_path):
    lora = write_lora(tmp_path / "lora.safetensors", modules_of(base, conv=True), rank=4, alpha=2.0)
    result = lineage.adapters.apply(base, [(lora, 0.8)], tmp_path / "out.safetensors", progress=False)
    out = load(result.path)
    assert_equal_to_fp16_rounding(out, expected_output(base, [(lora, 0.8)], kohya_merge))
    q_module = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    in_proj = next(m.key for m in modules_of(base) if m.name == q_module)
    before, after = load(base)[in_proj], out[in_proj]
    assert not torch.equal(before[: before.shape[0] // 3], after[: after.shape[0] // 3])  # q rows patched


def test_several_algorithms_at_strengths_equal_comfyui(base, tmp_path):
    unet = [m for m in modules_of(base) if m.component == "unet"]
    text = [m for m in modules_of(base) if m.component != "unet"]
    lora = write_lora(tmp_path / "lora.safetensors", modules_of(base), rank=4, alpha=3.0)
    lokr = write_lokr(tmp_path / "lokr.safetensors", unet[::2], low_rank_w2=2)
    loha = write_loha(tmp_path / "loha.safetensors", text[::3] + unet[1::5])
    diff = write_diff(tmp_path / "diff.safetensors", unet[::7])
    adapters = [(lora, 0.7), (lokr, -0.5), (loha, 0.3), (diff, 1.5)]
    result = lineage.adapters.apply(base, adapters, tmp_path / "out.safetensors", progress=False)
    assert_equal_to_fp16_rounding(load(result.path), expected_output(base, adapters, comfy_patch))


@pytest.mark.parametrize("block", [1, 37, 4096])
def test_row_blocks_of_any_size_give_the_same_weights(base, tmp_path, monkeypatch, block):
    """apply works a block of rows at a time (on the CPU, for products and dense deltas): blocks of one
    row, blocks that straddle OpenCLIP-G's q/k/v thirds and the default all give kohya's and ComfyUI's
    weights; a LoKr on the same key (not sliced by rows) takes the whole-weight path beside them."""
    import lineage.adapters.apply as apply_module

    monkeypatch.setattr(apply_module, "BLOCK_ELEMENTS", block)
    assert list(apply_module.row_blocks((5, 2))) == ([(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)] if block == 1
                                                     else [(0, 5)] if block == 4096 else [(0, 5)])
    if block == 37:
        assert list(apply_module.row_blocks((10, 8))) == [(0, 4), (4, 8), (8, 10)]
    modules = modules_of(base, conv=True)
    lora = write_lora(tmp_path / "lora.safetensors", modules, rank=4, alpha=2.0)
    loha = write_loha(tmp_path / "loha.safetensors", modules[1::3])
    lokr = write_lokr(tmp_path / "lokr.safetensors", [m for m in modules if m.component == "unet"][::4])
    adapters = [(lora, 0.8), (loha, -0.6), (lokr, 0.5)]
    result = lineage.adapters.apply(base, adapters, tmp_path / "out.safetensors", progress=False)
    assert_equal_to_fp16_rounding(load(result.path), expected_output(base, adapters, comfy_patch))


def test_each_patch_is_rebuilt_once_per_key(base, tmp_path, monkeypatch):
    """Keys with a LoRA and a LoKr (not sliced by rows, so the whole weight is patched) and keys with the
    LoRA alone (a block of rows at a time) rebuild each patch's delta from its factors once: in `lmerge
    apply`'s jobs, and when a weight in memory is patched (sampling with adapters, a merge's patched keys)."""
    from lineage.adapters import delta as delta_module
    from lineage.adapters.apply import add_patches_, plan

    calls: Counter[str] = Counter()

    def counted(algorithm, rebuild):
        def spy(tensors, alpha):
            calls[algorithm] += 1
            return rebuild(tensors, alpha)
        return spy

    for algorithm, rebuild in list(delta_module.REBUILD.items()):
        monkeypatch.setitem(delta_module.REBUILD, algorithm, counted(algorithm, rebuild))
    unet = [m for m in modules_of(base) if m.component == "unet"][:6]
    lora = write_lora(tmp_path / "lora.safetensors", unet, rank=4, alpha=2.0)
    lokr = write_lokr(tmp_path / "lokr.safetensors", unet[::2], low_rank_w2=2)
    adapters = [(lora, 0.8), (lokr, 0.5)]
    out = load(lineage.adapters.apply(base, adapters, tmp_path / "out.safetensors", record=False,
                                      progress=False).path)
    assert calls == {"lora": 6, "lokr": 3}

    calls.clear()
    applied, original = plan(base, adapters), load(base)
    paths = [a.path for a in applied.adapters]
    with SafetensorsFile(lora) as lora_file, SafetensorsFile(lokr) as lokr_file:
        files = [lora_file, lokr_file]
        for key, patches in applied.patches.items():
            weight = original[key].float()
            add_patches_(weight, patches, ((p.module.keys[r], files[p.adapter].read(p.module.keys[r]))
                                           for p in patches for r in p.roles), paths)
            torch.testing.assert_close(weight.to(out[key].dtype), out[key])  # the same sums, in the key's dtype
    assert calls == {"lora": 6, "lokr": 3}


def test_lokr_with_full_factors_ignores_alpha(base, tmp_path):
    modules = [m for m in modules_of(base) if m.component == "unet"][:4]
    lokr = write_lokr(tmp_path / "lokr.safetensors", modules)  # both factors full, alpha 1 in the file
    tensors = load(lokr)
    for m in modules:
        tensors[f"{m.name}.alpha"] = torch.tensor(50.0)
    save_file(tensors, lokr)
    result = lineage.adapters.apply(base, [lokr], tmp_path / "out.safetensors", progress=False)
    assert_equal_to_fp16_rounding(load(result.path), expected_output(base, [(lokr, 1.0)], comfy_patch))


def test_untouched_keys_are_byte_for_byte_and_dtypes_stay(base, tmp_path):
    lora = write_lora(tmp_path / "lora.safetensors", modules_of(base)[:5])
    result = lineage.adapters.apply(base, [lora], tmp_path / "out.safetensors", progress=False)
    before, after = read_header(base)[0], read_header(result.path)[0]
    assert list(before) == list(after)
    patched = set(result.plan.patches)
    assert len(patched) == 5
    original, out = load(base), load(result.path)
    for key, info in before.items():
        assert after[key].dtype == info.dtype and after[key].shape == info.shape
        if key not in patched:
            assert torch.equal(original[key].view(torch.uint8) if original[key].dim() else original[key],
                               out[key].view(torch.uint8) if out[key].dim() else out[key]), key
    assert any(is_pass_through(k) for k in before)  # markers and pass-through tensors were among them


def test_diff_bias_and_dora(base, tmp_path):
    m = next(m for m in modules_of(base) if m.key.endswith("ff.net.2.weight"))
    q = next(m for m in modules_of(base) if m.name.endswith("layers_0_self_attn_k_proj") and m.component == "clip_g")
    g = torch.Generator().manual_seed(3)
    diff_b = torch.randn(m.shape[0], generator=g)
    k_bias = torch.randn(q.shape[0], generator=g)
    path = tmp_path / "diffb.safetensors"
    save_file({f"{m.name}.diff": torch.randn(m.shape, generator=g), f"{m.name}.diff_b": diff_b,
               f"{q.name}.diff_b": k_bias}, path)
    out = load(lineage.adapters.apply(base, [(path, 0.5)], tmp_path / "o.safetensors", progress=False).path)
    original = load(base)
    bias_key = m.key[: -len("weight")] + "bias"
    torch.testing.assert_close(out[bias_key].float(), (original[bias_key].float() + 0.5 * diff_b).to(
        out[bias_key].dtype).float())
    in_bias = q.key[: -len("weight")] + "bias"
    rows = slice(*q.rows)
    torch.testing.assert_close(out[in_bias][rows].float(),
                               (original[in_bias][rows].float() + 0.5 * k_bias).to(out[in_bias].dtype).float())
    assert torch.equal(out[in_bias][: q.rows[0]], original[in_bias][: q.rows[0]])  # q's rows untouched

    # DoRA: the module's weight gets dora_scale's column norms at strength 1
    lora = lora_tensors([m], rank=4, alpha=4.0, dtype=torch.float32)
    lora[f"{m.name}.dora_scale"] = torch.rand(1, m.shape[1], generator=g) + 0.5
    dora = tmp_path / "dora.safetensors"
    save_file(lora, dora)
    out = load(lineage.adapters.apply(base, [dora], tmp_path / "d.safetensors", progress=False).path)
    torch.testing.assert_close(out[m.key].float().norm(dim=0), lora[f"{m.name}.dora_scale"].reshape(-1),
                               rtol=2e-3, atol=2e-3)


# ---- recording and metadata -----------------------------------------------------------------------

def test_recorded_with_checkpoint_and_adapters_as_parents(base, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", modules_of(base)[:3], seed=1)
    b = write_lora(tmp_path / "b.safetensors", modules_of(base)[3:6], seed=2)
    result = lineage.adapters.apply(base, [a, (b, 0.25)], tmp_path / "out.safetensors", progress=False)
    assert result.node == result.autov3 and result.record_error is None
    with using_registry() as reg:
        graph = reg.user_graph()
    parents = {p: graph.edges[p, result.node] for p in graph.predecessors(result.node)}
    ids = [hash_file(p).autov3 for p in (base, a, b)]
    assert set(parents) == set(ids)
    assert [parents[i]["weight"] for i in ids] == [1.0, 1.0, 0.25]
    assert all(e["relation"] == "merge" and e["params"]["method"] == "apply" for e in parents.values())
    meta = read_header(result.path)[1]
    record = json.loads(meta["lineage.record"])
    assert [i["autov3"] for i in record["inputs"]] == ids and record["strengths"] == [1.0, 0.25]
    assert meta["modelspec.hash_sha256"] == "0x" + result.autov3


def test_recording_failure_is_a_warning(base, tmp_path):
    lora = write_lora(tmp_path / "a.safetensors", modules_of(base)[:2])
    registry = tmp_path / "not-a-dir" / "x"
    (tmp_path / "not-a-dir").write_text("a file where a folder should be")
    result = lineage.adapters.apply(base, [lora], tmp_path / "out.safetensors", registry=registry, progress=False)
    assert result.node is None and result.record_error
    assert read_header(result.path)[0]


def test_strength_parsing():
    assert AdapterInput.parse("a.safetensors:0.5") == AdapterInput("a.safetensors", 0.5)
    assert AdapterInput.parse("a.safetensors") == AdapterInput("a.safetensors", 1.0)
    assert AdapterInput.parse("C:/x/a.safetensors") == AdapterInput("C:/x/a.safetensors", 1.0)
    assert AdapterInput.parse("a.safetensors:-1") == AdapterInput("a.safetensors", -1.0)


# ---- bad input ------------------------------------------------------------------------------------

def nothing_written(tmp_path) -> bool:
    return not (tmp_path / "out.safetensors").exists() and not [p for p in tmp_path.iterdir()
                                                               if p.name.startswith(".out")]


def test_checkpoint_given_as_adapter_and_the_reverse(base, tmp_path):
    lora = write_lora(tmp_path / "lora.safetensors", modules_of(base)[:2])
    with pytest.raises(CheckpointError, match="is a checkpoint, not an adapter") as e:
        lineage.adapters.apply(base, [base], tmp_path / "out.safetensors", progress=False)
    assert base in str(e.value)
    with pytest.raises(CheckpointError, match="SDXL checkpoint is required") as e:
        lineage.adapters.apply(lora, [lora], tmp_path / "out.safetensors", progress=False)
    assert "lora.safetensors" in str(e.value)
    assert nothing_written(tmp_path)


def test_sd1_lora_and_unfitting_shapes(base, tmp_path):
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 768),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 2)}, sd1)
    with pytest.raises(CheckpointError, match="SD 1.x adapter") as e:
        lineage.adapters.apply(base, [sd1], tmp_path / "out.safetensors", progress=False)
    assert "sd1.safetensors" in str(e.value)
    m = modules_of(base)[0]
    wrong = tmp_path / "wrong.safetensors"
    save_file({f"{m.name}.lora_down.weight": torch.zeros(2, m.shape[1] + 1),
               f"{m.name}.lora_up.weight": torch.zeros(m.shape[0], 2)}, wrong)
    with pytest.raises(CheckpointError, match="but the checkpoint's") as e:
        lineage.adapters.apply(base, [wrong], tmp_path / "out.safetensors", progress=False)
    assert "wrong.safetensors" in str(e.value)
    assert nothing_written(tmp_path)


def test_nan_in_an_adapter(base, tmp_path):
    modules = modules_of(base)[:3]
    tensors = lora_tensors(modules)
    tensors[f"{modules[1].name}.lora_up.weight"][0, 0] = math.nan
    path = tmp_path / "nan.safetensors"
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="holds NaN or Inf") as e:
        lineage.adapters.apply(base, [path], tmp_path / "out.safetensors", progress=False)
    assert "nan.safetensors" in str(e.value) and modules[1].name in str(e.value)
    tensors = lora_tensors(modules)
    tensors[f"{modules[0].name}.alpha"] = torch.tensor(math.inf)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="alpha is inf"):
        lineage.adapters.apply(base, [path], tmp_path / "out.safetensors", progress=False)
    assert nothing_written(tmp_path)


def test_truncated_adapter(base, tmp_path):
    lora = write_lora(tmp_path / "lora.safetensors", modules_of(base)[:3])
    data = open(lora, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(LineageError) as e:
        lineage.adapters.apply(base, [cut], tmp_path / "out.safetensors", progress=False)
    assert "cut.safetensors" in str(e.value)
    assert nothing_written(tmp_path)


def test_output_onto_an_input_is_refused(base, tmp_path):
    lora = write_lora(tmp_path / "lora.safetensors", modules_of(base)[:3])
    before = open(lora, "rb").read()
    for target in (lora, base):
        with pytest.raises(LineageError):
            lineage.adapters.apply(base, [lora], target, progress=False)
    assert open(lora, "rb").read() == before


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_apply(base, tmp_path, lmerge):
    lora = write_lora(tmp_path / "lora.safetensors", modules_of(base)[:4])
    code, out, err = lmerge("apply", base, f"{lora}:0.5", "-o", tmp_path / "out.safetensors", "--json")
    assert code == 0, err
    found = json.loads(out)
    assert found["patched_keys"] == 4 and found["adapters"][0]["strength"] == 0.5 and found["node"]
    code, out, err = lmerge("apply", base, base, "-o", tmp_path / "x.safetensors")
    assert code == 1 and "is a checkpoint, not an adapter" in err and err.count("\n") == 1
    code, out, err = lmerge("apply", base, lora, "-o", tmp_path / "dry.safetensors", "--dry-run")
    assert code == 0 and "4 keys patched" in out and not (tmp_path / "dry.safetensors").exists()
