"""Reading adapter files (adapters/reader.py): every algorithm and dialect into kohya-named modules, and
the bad-input cases refused with one line naming the file."""
import json
import math

import pytest
import torch
from adapter_samples import modules_of, write_diff, write_loha, write_lokr, write_lora

from lineage.adapters.reader import open_adapter
from lineage.errors import CheckpointError
from lineage.io.safetensors import read_header, save_file


def pair(m, rank=2):
    return {f"{m.name}.lora_down.weight": torch.zeros(rank, m.shape[1]),
            f"{m.name}.lora_up.weight": torch.zeros(m.shape[0], rank)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lineage.sdxl.synthetic import write_base
    return write_base(tmp_path_factory.mktemp("reader") / "base.safetensors", size="tiny")


def test_kohya_lora_full_default_set(base, tmp_path):
    modules = modules_of(base)
    path = write_lora(tmp_path / "lora.safetensors", modules, rank=4, alpha=2)
    found = open_adapter(path, base=read_header(base)[0])
    assert found.dialect == "kohya" and found.algorithm == "lora"
    assert set(found.modules) == {m.name for m in modules} and len(found.modules) == 722 + 72 + 192
    q = found.modules["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    assert q.keys == {"lora_down": "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                      "lora_up": "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
                      "alpha": "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"}
    assert q.alpha == 2.0 and q.rank == 4


def test_peft_lora_reads_under_kohya_names_with_alpha_from_metadata(base, tmp_path):
    modules = modules_of(base)
    path = write_lora(tmp_path / "peft.safetensors", modules, rank=4, alpha=3, dialect="peft")
    keys = read_header(path)[0]
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    found = open_adapter(path, base=read_header(base)[0])
    assert found.dialect == "peft" and len(found.modules) == len(modules)
    m = found.modules["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    assert m.keys["lora_down"] == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert m.alpha == 3.0


def test_locon_with_tucker_mid(base, tmp_path):
    modules = modules_of(base, conv=True)
    path = write_lora(tmp_path / "locon.safetensors", modules, mid=True)
    found = open_adapter(path, base=read_header(base)[0])
    conv = found.modules["lora_unet_input_blocks_1_0_in_layers_2"]
    assert set(conv.keys) == {"lora_down", "lora_mid", "lora_up", "alpha"}
    assert conv.shapes["lora_mid"][2:] == (3, 3)


@pytest.mark.parametrize("writer,algorithm", [(write_lokr, "lokr"), (write_loha, "loha"), (write_diff, "diff")])
def test_lycoris_algorithms(base, tmp_path, writer, algorithm):
    modules = modules_of(base, conv=True)[:40] + modules_of(base)[-20:]
    path = writer(tmp_path / f"{algorithm}.safetensors", modules)
    found = open_adapter(path, base=read_header(base)[0])
    assert found.algorithm == algorithm and len(found.modules) == len(modules)


def test_lokr_low_rank_w2(base, tmp_path):
    modules = modules_of(base)[:10]
    found = open_adapter(write_lokr(tmp_path / "k.safetensors", modules, low_rank_w2=2), base=read_header(base)[0])
    assert set(next(iter(found.modules.values())).keys) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}


def test_dora_scale_is_a_role(base, tmp_path):
    m = modules_of(base)[0]
    path = tmp_path / "dora.safetensors"
    save_file({**pair(m),
               f"{m.name}.dora_scale": torch.ones(m.shape[0], 1)}, path)
    assert open_adapter(path).modules[m.name].keys["dora_scale"] == f"{m.name}.dora_scale"


def test_checkpoint_given_as_adapter(base):
    with pytest.raises(CheckpointError, match=r"base\.safetensors.*is a checkpoint, not an adapter"):
        open_adapter(base)


def test_sd1_adapter_is_refused(tmp_path):
    path = tmp_path / "sd1.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, path)
    with pytest.raises(CheckpointError, match=r"sd1\.safetensors.*SD 1\.x adapter, not SDXL"):
        open_adapter(path)


def test_unknown_module_names_are_listed_with_the_guessed_dialect(base, tmp_path):
    m = modules_of(base)[0]
    path = tmp_path / "odd.safetensors"
    tensors = {**pair(m)}
    for i in range(7):
        tensors[f"lora_unet_time_embed_{i}.lora_down.weight"] = torch.zeros(2, 4)
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as e:
        open_adapter(path)
    text = str(e.value)
    assert "odd.safetensors" in text and "guessed dialect: kohya" in text and "lora_unet_time_embed_0" in text
    assert "and 2 more" in text and "\n" not in text


def test_shapes_that_do_not_fit_the_checkpoint(base, tmp_path):
    m = next(x for x in modules_of(base) if x.name.endswith("attn1_to_q"))
    path = tmp_path / "wide.safetensors"
    save_file({f"{m.name}.lora_down.weight": torch.zeros(2, m.shape[1] * 2),
               f"{m.name}.lora_up.weight": torch.zeros(m.shape[0], 2)}, path)
    open_adapter(path)  # without a checkpoint only the factors' own agreement is checked
    rows, cols = m.shape
    expected = rf"wide\.safetensors.*rebuilds a {rows}x{2 * cols} weight.*is {rows}x{cols}"
    with pytest.raises(CheckpointError, match=expected):
        open_adapter(path, base=read_header(base)[0])


def test_ranks_that_disagree(base, tmp_path):
    m = modules_of(base)[0]
    path = tmp_path / "rank.safetensors"
    save_file({**pair(m), f"{m.name}.lora_down.weight": torch.zeros(3, m.shape[1])}, path)
    with pytest.raises(CheckpointError, match="disagree on the rank"):
        open_adapter(path)


def test_missing_factor_and_mixed_algorithms(base, tmp_path):
    m = modules_of(base)[0]
    path = tmp_path / "half.safetensors"
    save_file({f"{m.name}.lora_down.weight": torch.zeros(2, m.shape[1])}, path)
    with pytest.raises(CheckpointError, match="has no lora_up"):
        open_adapter(path)
    save_file({**pair(m),
               f"{m.name}.diff": torch.zeros(m.shape)}, path)
    with pytest.raises(CheckpointError, match="mixes lora and diff"):
        open_adapter(path)


def test_truncated_file_names_the_file(base, tmp_path):
    path = write_lora(tmp_path / "cut.safetensors", modules_of(base)[:5])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        open_adapter(path)


def test_bad_peft_metadata(base, tmp_path):
    path = write_lora(tmp_path / "p.safetensors", modules_of(base)[:3], dialect="peft")
    tensors = {k: torch.zeros(v.shape) for k, v in read_header(path)[0].items()}
    save_file(tensors, path, {"lora_adapter_metadata": "{not json"})
    with pytest.raises(CheckpointError, match="lora_adapter_metadata entry that is not JSON"):
        open_adapter(path)
    save_file(tensors, path, {"lora_adapter_metadata": json.dumps({})})
    assert all(m.alpha is None for m in open_adapter(path).modules.values())


def test_detection_uses_the_dialect_tables(base, tmp_path):
    from lineage.sdxl.detection import detect
    modules = modules_of(base)[:30]
    found = detect(write_lora(tmp_path / "p.safetensors", modules, dialect="peft"))
    assert (found.format, found.architecture) == ("lora-peft", "sdxl")
    found = detect(write_diff(tmp_path / "d.safetensors", modules))
    assert (found.format, found.architecture) == ("diff", "sdxl")


@pytest.mark.parametrize("algorithm,options", [
    ("lokr", {"use_tucker": True, "factor": 4}), ("lokr", {"decompose_both": True, "factor": 4}),
    ("loha", {"use_tucker": True}), ("loha", {}), ("locon", {"use_tucker": True}), ("locon", {}),
])
def test_files_made_by_lycoris_modules_read_back(base, tmp_path, algorithm, options):
    """LyCORIS' own modules (lycoris-lora) lay out every factor, Tucker cores included; our reader takes
    them and checks their shapes against the checkpoint's weights."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = {"lokr": LokrModule, "loha": LohaModule, "locon": LoConModule}[algorithm]
    # The widest modules: LyCORIS makes no Tucker core or low-rank factor for the narrowest ones
    widest = sorted(modules_of(base, conv=True), key=lambda m: -math.prod(m.shape))
    chosen = [m for m in widest if m.spatial][:3] + [m for m in widest if not m.spatial][:3]
    tensors = {}
    for m in chosen:
        layer = (torch.nn.Conv2d(m.shape[1], m.shape[0], m.shape[2:]) if m.spatial
                 else torch.nn.Linear(m.shape[1], m.shape[0]))
        module = cls(m.name, layer, 1.0, 2, 2, **options)
        torch.nn.init.normal_(next(iter(module.parameters())))
        tensors.update({f"{m.name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    path = tmp_path / "lyco.safetensors"
    save_file(tensors, path)
    found = open_adapter(path, base=read_header(base)[0])
    assert set(found.modules) == {m.name for m in chosen}
    assert found.algorithm == {"locon": "lora"}.get(algorithm, algorithm)
    if options.get("use_tucker"):
        tucker = {"lokr": "lokr_t2", "loha": "hada_t1", "locon": "lora_mid"}[algorithm]
        assert any(tucker in m.keys for m in found.modules.values())


def test_a_full_diff_adapter_is_recorded_as_an_adapter(base, tmp_path):
    from lineage.graph.model import ADAPTER_KINDS
    from lineage.graph.recording import KIND_OF_FORMAT
    from lineage.sdxl.detection import detect
    path = write_diff(tmp_path / "d.safetensors", modules_of(base)[:3])
    assert KIND_OF_FORMAT[detect(path).format] in ADAPTER_KINDS


def test_unknown_role_of_a_known_module(base, tmp_path):
    m = modules_of(base)[0]
    path = tmp_path / "dora_peft.safetensors"
    save_file({**pair(m), f"{m.name}.lora_magnitude_vector": torch.ones(m.shape[0])}, path)
    with pytest.raises(CheckpointError, match=r"tensor\(s\) of SDXL modules in a role .*lora_magnitude_vector"):
        open_adapter(path)
