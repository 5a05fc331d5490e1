"""adapters/delta.py: each algorithm's delta against the real LyCORIS package (`lycoris.functional`), against
kohya's merge formula and ComfyUI's, as their code computes them (reproduced here from their behaviour)."""
from __future__ import annotations

import pytest
import torch
from adapter_references import comfy_dora, kohya_merge

from lineage.adapters.delta import add_delta_, module_delta, rebuild
from lineage.errors import LineageError

lycoris = pytest.importorskip("lycoris.functional")


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-5, atol=1e-5)


# ---- LoRA / LoCon ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, rank", [((64, 48), 8), ((32, 16, 1, 1), 4), ((32, 16, 3, 3), 6)])
def test_lora_matches_kohya_and_lycoris(shape: tuple[int, ...], rank: int) -> None:
    out, inp, *kernel = shape
    up = rand(out, rank, *([1, 1] if kernel else []))
    down = rand(rank, inp, *kernel, seed=1)
    weight = rand(*shape, seed=2)
    delta = module_delta("lora", {"lora_up": up, "lora_down": down}, 3.0, shape)
    kohya = kohya_merge(weight, {"lora_up": up, "lora_down": down, "alpha": torch.tensor(3.0)}, 0.7)
    close(weight + 0.7 * delta, kohya)
    close(delta, lycoris.locon.diff_weight(down, up, None, gamma=3.0 / rank, backend="torch"))


def test_locon_tucker_mid_matches_lycoris() -> None:
    up, down, mid = rand(32, 4, 1, 1), rand(4, 16, 1, 1, seed=1), rand(4, 4, 3, 3, seed=2)
    delta = module_delta("lora", {"lora_up": up, "lora_down": down, "lora_mid": mid}, 2.0, (32, 16, 3, 3))
    close(delta, lycoris.locon.diff_weight(down, up, mid, gamma=2.0 / 4, backend="torch"))


def test_lora_without_alpha_has_scale_one() -> None:
    up, down = rand(8, 4), rand(4, 6, seed=1)
    close(module_delta("lora", {"lora_up": up, "lora_down": down}, None, (8, 6)), up @ down)


# ---- LoKr --------------------------------------------------------------------------------------

def lokr_tensors(case: str) -> tuple[dict[str, torch.Tensor], tuple[int, ...], tuple]:
    """(our tensors, the weight's shape, LyCORIS' (w1, w1a, w1b, w2, w2a, w2b, t2))."""
    r = 3
    if case == "full-full":
        w1, w2 = rand(4, 8), rand(16, 6, seed=1)
        return {"lokr_w1": w1, "lokr_w2": w2}, (64, 48), (w1, None, None, w2, None, None, None)
    if case == "full-lowrank":
        w1, w2a, w2b = rand(4, 8), rand(16, r, seed=1), rand(r, 6, seed=2)
        return {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, (64, 48), (w1, None, None, None, w2a, w2b, None)
    if case == "lowrank-lowrank":
        w1a, w1b, w2a, w2b = rand(4, r), rand(r, 8, seed=1), rand(16, r, seed=2), rand(r, 6, seed=3)
        return ({"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, (64, 48),
                (None, w1a, w1b, None, w2a, w2b, None))
    if case == "conv-full":
        w1, w2 = rand(4, 2), rand(8, 8, 3, 3, seed=1)
        return {"lokr_w1": w1, "lokr_w2": w2}, (32, 16, 3, 3), (w1, None, None, w2, None, None, None)
    if case == "conv-lowrank":
        w1, w2a, w2b = rand(4, 2), rand(8, r, seed=1), rand(r, 8, 3, 3, seed=2)
        return ({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b.flatten(1)}, (32, 16, 3, 3),
                (w1, None, None, None, w2a, w2b, None))
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["full-full", "full-lowrank", "lowrank-lowrank", "conv-full", "conv-lowrank"])
def test_lokr_matches_lycoris(case: str) -> None:
    ours, shape, theirs = lokr_tensors(case)
    delta = module_delta("lokr", ours, 6.0, shape)
    close(delta, lycoris.lokr.diff_weight(*theirs, gamma=6.0, backend="torch"))


def test_lokr_alpha_rule() -> None:
    """Both factors full: alpha is ignored (scale 1); a low-rank factor: alpha / its rank."""
    ours, shape, _ = lokr_tensors("full-full")
    close(module_delta("lokr", ours, 123.0, shape), torch.kron(ours["lokr_w1"], ours["lokr_w2"]))
    ours, shape, _ = lokr_tensors("full-lowrank")
    w2 = ours["lokr_w2_a"] @ ours["lokr_w2_b"]
    close(module_delta("lokr", ours, 6.0, shape), torch.kron(ours["lokr_w1"], w2) * 6.0 / 3)


def test_lokr_tucker_matches_lycoris() -> None:
    r, b, d = 3, 8, 8
    w1, t2, w2a, w2b = rand(4, 2), rand(r, r, 3, 3, seed=1), rand(r, b, seed=2), rand(r, d, seed=3)
    ours = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "lokr_t2": t2}
    delta = module_delta("lokr", ours, 6.0, (32, 16, 3, 3))
    # LyCORIS' functional form takes the rank from w2_a's second dimension, which with Tucker is b (its
    # modules and ComfyUI use the Tucker rank r): give it the gamma that makes its scale alpha / r.
    theirs = lycoris.lokr.diff_weight(w1, None, None, None, w2a, w2b, t2, gamma=6.0 * b / r, backend="torch")
    close(delta, theirs)


# ---- LoHa --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 48), (32, 16, 1, 1)])
def test_loha_matches_lycoris(shape: tuple[int, ...]) -> None:
    out, inp, *kernel = shape
    r = 4
    w1a, w1b = rand(out, r), rand(r, inp, *kernel, seed=1)
    w2a, w2b = rand(out, r, seed=2), rand(r, inp, *kernel, seed=3)
    ours = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    delta = module_delta("loha", ours, 2.0, shape)
    close(delta, lycoris.loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=2.0 / r, backend="torch"))


def test_loha_tucker_matches_lycoris() -> None:
    r, out, inp = 4, 32, 16
    t1, t2 = rand(r, r, 3, 3), rand(r, r, 3, 3, seed=1)
    w1a, w1b, w2a, w2b = rand(r, out, seed=2), rand(r, inp, seed=3), rand(r, out, seed=4), rand(r, inp, seed=5)
    ours = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "hada_t1": t1, "hada_t2": t2}
    delta = module_delta("loha", ours, 8.0, (out, inp, 3, 3))
    close(delta, lycoris.loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=8.0 / r, backend="torch"))


# ---- diff, shapes --------------------------------------------------------------------------------

def test_diff_ignores_alpha() -> None:
    diff = rand(8, 6)
    close(module_delta("diff", {"diff": diff}, 99.0, (8, 6)), diff)


def test_factors_that_do_not_fit_the_weight_are_refused() -> None:
    with pytest.raises(LineageError, match="rebuild a 8x6 weight, not 8x7"):
        module_delta("lora", {"lora_up": rand(8, 2), "lora_down": rand(2, 6)}, 2.0, (8, 7))
    with pytest.raises(LineageError, match="rebuild a 8x6 weight"):
        add_delta_(torch.zeros(8, 7), rebuild("lora", {"lora_up": rand(8, 2), "lora_down": rand(2, 6)}, 2.0), 1.0)
    with pytest.raises(LineageError, match="needs a lora_up tensor"):
        rebuild("lora", {"lora_down": rand(2, 6)}, None)
    with pytest.raises(LineageError, match="unknown adapter algorithm"):
        rebuild("boft", {}, None)


# ---- in place, at a strength ----------------------------------------------------------------------

@pytest.mark.parametrize("algorithm, case", [("lora", None), ("lokr", "full-lowrank"), ("lokr", "conv-lowrank"),
                                             ("loha", None), ("diff", None)])
def test_add_delta_equals_weight_plus_strength_times_delta(algorithm: str, case: str | None) -> None:
    if algorithm == "lokr":
        tensors, shape, _ = lokr_tensors(case)
    else:
        shape = (64, 48)
        tensors = {"lora": {"lora_up": rand(64, 4), "lora_down": rand(4, 48, seed=1)},
                   "loha": {"hada_w1_a": rand(64, 4), "hada_w1_b": rand(4, 48, seed=1),
                            "hada_w2_a": rand(64, 4, seed=2), "hada_w2_b": rand(4, 48, seed=3)},
                   "diff": {"diff": rand(64, 48)}}[algorithm]
    weight = rand(*shape, seed=9)
    expected = weight + 0.6 * module_delta(algorithm, tensors, 2.0, shape)
    add_delta_(weight, rebuild(algorithm, tensors, 2.0), 0.6)
    close(weight, expected)


# ---- DoRA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 48), (32, 16, 3, 3)])
@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_dora_per_input_channel_matches_comfyui_and_lycoris(shape: tuple[int, ...], strength: float) -> None:
    out, inp, *kernel = shape
    up, down = rand(out, 4, *([1, 1] if kernel else [])), rand(4, inp, *kernel, seed=1)
    weight = rand(*shape, seed=2)
    dora_scale = rand(1, inp, *([1] * len(kernel)), seed=3).abs() + 0.5
    tensors = {"lora_up": up, "lora_down": down, "dora_scale": dora_scale}
    diff = module_delta("lora", tensors, 2.0, shape)
    expected = comfy_dora(weight, diff, dora_scale, strength)
    close(lycoris.apply_dora_scale(weight, diff, dora_scale, strength), expected)
    patched = weight.clone()
    add_delta_(patched, rebuild("lora", tensors, 2.0), strength, dora_scale)
    close(patched, expected)
    assert not torch.allclose(patched, weight + strength * diff, atol=1e-3)  # DoRA really rescaled


def test_dora_per_output_row_matches_lycoris_wd_on_out() -> None:
    up, down, weight = rand(64, 4), rand(4, 48, seed=1), rand(64, 48, seed=2)
    dora_scale = rand(64, 1, seed=3).abs() + 0.5
    tensors = {"lora_up": up, "lora_down": down, "dora_scale": dora_scale}
    merged = weight + module_delta("lora", tensors, 2.0, (64, 48))
    expected = lycoris.weight_decompose(merged, dora_scale, 1, wd_on_out=True, backend="torch")
    patched = weight.clone()
    add_delta_(patched, rebuild("lora", tensors, 2.0), 1.0, dora_scale)
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patched.norm(dim=1), dora_scale.reshape(-1), rtol=1e-5, atol=1e-5)


def test_dora_scale_of_the_wrong_size_is_refused() -> None:
    tensors = {"lora_up": rand(8, 2), "lora_down": rand(2, 6), "dora_scale": rand(1, 5)}
    with pytest.raises(LineageError, match="dora_scale"):
        add_delta_(torch.zeros(8, 6), rebuild("lora", tensors, 2.0), 1.0, tensors["dora_scale"])
