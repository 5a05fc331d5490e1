import os
from importlib import resources

import torch

from lineage.io.hashing import hash_file
from lineage.io.safetensors import SafetensorsFile
from lineage.sdxl.detection import detect
from lineage.sdxl.synthetic import sdxl_shapes, write_base

# The inventory shipped in the package, parsed here on its own; the counts below pin it to the public file.
TSV = resources.files("lineage.sdxl").joinpath("data/sd_xl_base_1.0_keys.tsv")
PREFIXES = {"unet": "model.diffusion_model.", "clip_l": "conditioner.embedders.0.",
            "clip_g": "conditioner.embedders.1.", "vae": "first_stage_model."}
TO_K = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
IN_PROJ = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


def _tsv_inventory() -> dict[str, tuple[str, tuple[int, ...]]]:
    rows = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t"):
            continue
        key, _component, dtype, shape = line.split("\t")
        rows[key] = (dtype, tuple(int(x) for x in shape.strip("[]").split(",") if x.strip()))
    return rows


def test_full_size_plan_is_exactly_the_sdxl_base_inventory():
    expected = _tsv_inventory()
    assert len(expected) == 2515
    assert sdxl_shapes("full") == expected
    # Per-component parameter counts of the public SDXL 1.0 base file.
    params: dict[str, int] = {}
    for key, (_, shape) in expected.items():
        component = next(c for c, prefix in PREFIXES.items() if key.startswith(prefix))
        params[component] = params.get(component, 0) + torch.Size(shape).numel()
    assert params["unet"] == 2_567_463_684 and params["clip_g"] == 694_659_841 and params["vae"] == 83_653_863


def test_small_plan_has_the_same_keys_and_consistent_widths():
    small = sdxl_shapes("small")
    assert small.keys() == _tsv_inventory().keys()
    assert small["model.diffusion_model.input_blocks.0.0.weight"][1] == (32, 4, 3, 3)
    assert small[TO_K][1][1] == 64 + 80  # cross-attention context = CLIP-L width + CLIP-G width
    assert small[IN_PROJ][1] == (240, 80)


def test_tiny_plan_divides_unet_widths_by_80_and_the_others_by_64():
    full, tiny = sdxl_shapes("full"), sdxl_shapes("tiny")
    assert tiny.keys() == full.keys()
    kept = {1, 3, 4, 8, 77}  # scalars, RGB, latent channels (4, and 8 = mean and log-variance), tokens
    context_and_adm = {2048: 32, 2816: 44}  # widths the UNet takes from the text encoders
    for key, (dtype, shape) in full.items():
        tiny_dtype, tiny_shape = tiny[key]
        assert tiny_dtype == dtype and len(tiny_shape) == len(shape), key
        divisor = 80 if key.startswith(PREFIXES["unet"]) else 64
        for d, t in zip(shape, tiny_shape, strict=True):
            if d in kept:
                assert t == d, (key, shape, tiny_shape)
            elif d == 49408:  # the token vocabulary
                assert t == 1544, key
            elif key.startswith(PREFIXES["unet"]) and d in context_and_adm:
                assert t == context_and_adm[d], (key, shape, tiny_shape)
            else:
                assert t * divisor == d, (key, shape, tiny_shape)
    assert tiny["model.diffusion_model.input_blocks.0.0.weight"][1] == (4, 4, 3, 3)
    assert tiny[TO_K][1][1] == 12 + 20  # the context stays CLIP-L width + CLIP-G width
    assert tiny["model.diffusion_model.label_emb.0.0.weight"][1] == (16, 44)  # pooled CLIP-G + 6 size embeddings
    assert tiny[IN_PROJ][1] == (60, 20)  # q, k, v stacked


def test_tiny_file_is_under_2_mb(tmp_path):
    assert os.path.getsize(write_base(tmp_path / "tiny.safetensors", size="tiny")) < 2_000_000


def test_a_tiny_checkpoint_is_a_complete_sdxl_file_of_7_mb(tmp_path, lmerge):
    code, _, err = lmerge("generate", tmp_path / "tiny.safetensors", "--size", "tiny")
    assert code == 0, err
    tiny = tmp_path / "tiny.safetensors"
    found = detect(tiny)
    assert (found.format, found.variant) == ("sdxl-single-file", "full")
    with SafetensorsFile(tiny) as f:
        assert {k: (i.dtype, i.shape) for k, i in f.tensors.items()} == sdxl_shapes("tiny")
    params = {size: sum(torch.Size(s).numel() for _, s in sdxl_shapes(size).values()) for size in ("tiny", "full")}
    assert params["tiny"] < params["full"] / 1000  # widths / 64-80: about 1/5000 of the parameters
    assert tiny.stat().st_size < 2_000_000  # 0.69 M parameters in fp16 and a 0.34 MB header for 2,515 keys


def test_generation_is_deterministic(tmp_path):
    a = write_base(tmp_path / "a.safetensors", size="tiny", seed=5, components=["unet"])
    b = write_base(tmp_path / "b.safetensors", size="tiny", seed=5, components=["unet"])
    c = write_base(tmp_path / "c.safetensors", size="tiny", seed=6, components=["unet"])
    assert hash_file(a).autov3 == hash_file(b).autov3 != hash_file(c).autov3


def test_child_has_a_planted_low_rank_delta_and_markers(family):
    key = "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn1.to_q.weight"  # the widest level
    with (SafetensorsFile(family["base"]) as p, SafetensorsFile(family["child"]) as c,
          SafetensorsFile(family["vchild"]) as v):
        delta = c.read(key).float() - p.read(key).float()
        s = torch.linalg.svdvals(delta)
        assert s[7] > 5 * s[8]  # rank 8 planted, noise far below it (16 x 16 at the tiny size)
        assert 0.01 < (delta.norm() / p.read(key).float().norm()).item() < 0.2
        vae = "first_stage_model.decoder.conv_in.weight"
        assert torch.equal(c.read(vae), p.read(vae))  # the VAE is not fine-tuned by default
        ids = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
        assert torch.equal(c.read(ids), torch.arange(77).reshape(1, 77))
        assert "v_pred" in v and "ztsnr" in v and "v_pred" not in c


def test_other_dtypes_and_components(tmp_path):
    path = write_base(tmp_path / "bf.safetensors", size="tiny", dtype="BF16", components=["unet", "vae"])
    with SafetensorsFile(path) as f:
        assert {i.dtype for i in f.tensors.values()} == {"BF16"}
        assert not any(k.startswith("conditioner.") for k in f.keys())
