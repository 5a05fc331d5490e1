"""How kohya's sd-scripts and ComfyUI patch one weight with one adapter module, reproduced from their
documented behaviour (docs/adapters.md) for the tests of delta.py and apply.py: the results our code must
equal."""
from __future__ import annotations

import torch


def kohya_merge(weight: torch.Tensor, t: dict[str, torch.Tensor], ratio: float) -> torch.Tensor:
    """sd-scripts' merge of one LoRA module: ratio · alpha / dim · up @ down (alpha = dim when absent);
    a 1x1 convolution squeezed to a matrix product, a 3x3 one as the down kernel convolved with up."""
    up, down = t["lora_up"].float(), t["lora_down"].float()
    dim = down.shape[0]
    scale = (float(t["alpha"]) if "alpha" in t else dim) / dim
    if down.dim() == 2:
        return weight + ratio * (up @ down) * scale
    if down.shape[2:] == (1, 1):
        product = up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)
        return weight + ratio * product.unsqueeze(2).unsqueeze(3) * scale
    return weight + ratio * torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


def comfy_patch(weight: torch.Tensor, t: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """ComfyUI's patch of one module (lora, lokr, loha, diff; no DoRA) in fp32: alpha / rank, 1 without
    alpha; LoKr's rank is the low-rank factor's (the second's when both are), 1 when both are full; a Tucker
    w2 rebuilt from lokr_t2 by ComfyUI's einsum."""
    t = {k: v.float() for k, v in t.items()}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "diff" in t:
        return weight + strength * t["diff"]
    if "lora_up" in t:
        diff = (t["lora_up"].flatten(1) @ t["lora_down"].flatten(1)).reshape(weight.shape)
        return weight + strength * (alpha / t["lora_down"].shape[0] if alpha is not None else 1.0) * diff
    if "hada_w1_a" in t:
        w1 = t["hada_w1_a"] @ t["hada_w1_b"]
        w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return weight + strength * scale * (w1 * w2).reshape(weight.shape)
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None and "lokr_t2" in t:  # Tucker: t2 (r, r, kh, kw), w2_a (r, b), w2_b (r, d)
        # ComfyUI's einsum; its result is not contiguous, which torch.kron refuses under the torch of
        # these tests (2.13); A1111 and LyCORIS call .contiguous() before the product, as done here.
        dim = t["lokr_w2_b"].shape[0]
        w2 = torch.einsum("ijkl,jr,ip->prkl", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"]).contiguous()
    elif w2 is None:
        dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return weight + strength * scale * torch.kron(w1, w2).reshape(weight.shape)


def comfy_dora(weight: torch.Tensor, diff: torch.Tensor, dora_scale: torch.Tensor, strength: float) -> torch.Tensor:
    """ComfyUI's weight_decompose: the norm of each input column of W + ΔW, rescaled to dora_scale,
    then blended with W at the strength."""
    merged = weight + diff
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return weight + strength * (merged * (dora_scale / norm) - weight)
