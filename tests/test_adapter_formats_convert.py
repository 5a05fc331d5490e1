"""`lmerge convert IN OUT --to kohya|peft` and `lineage.adapters.convert` (adapters/convert.py): bit-exact
round trips, alpha carried across dialects, refusals, the output guarded and recorded."""
import json

import pytest
import torch
from adapter_samples import modules_of, write_lokr, write_lora

import lineage
import lineage.adapters
from lineage.adapters.reader import open_adapter
from lineage.errors import LineageError
from lineage.io.hashing import hash_file
from lineage.io.safetensors import SafetensorsFile, read_header, save_file


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lineage.sdxl.synthetic import write_base
    return write_base(tmp_path_factory.mktemp("convert") / "base.safetensors", size="tiny")


def tensors_of(path):
    with SafetensorsFile(path) as f:
        return {k: (f.tensors[k].dtype, f.read(k)) for k in f.keys()}


def library_copy(path, out):
    """The same tensors and metadata written by the safetensors library (as kohya's scripts save)."""
    import safetensors.torch
    with SafetensorsFile(path) as f:
        safetensors.torch.save_file({k: f.read(k) for k in f.keys()}, out, f.metadata)
    return str(out)


def test_kohya_peft_kohya_is_bit_exact(base, tmp_path):
    modules = modules_of(base, conv=True)
    src = library_copy(write_lora(tmp_path / "k0.safetensors", modules, rank=4, alpha=3), tmp_path / "k.safetensors")
    peft = lineage.adapters.convert(src, tmp_path / "p.safetensors", to="peft")
    assert (peft.source_dialect, peft.dialect, peft.modules) == ("kohya", "peft", len(modules))
    assert not any(k.endswith(".alpha") for k in read_header(peft.path)[0])
    back = lineage.adapters.convert(peft.path, tmp_path / "back.safetensors", to="kohya")
    original, again = tensors_of(src), tensors_of(back.path)
    assert original.keys() == again.keys()
    for key, (dtype, value) in original.items():
        assert again[key][0] == dtype, key
        assert torch.equal(again[key][1].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
    assert hash_file(back.path).autov3 == hash_file(src).autov3  # the same data section, byte for byte
    assert back.autov3 == hash_file(src).autov3


def test_alpha_per_module_survives_peft(base, tmp_path):
    modules = modules_of(base)[:30]
    tensors = {}
    for i, m in enumerate(modules):  # different ranks and alphas, alpha stored in fp32 beside fp16 factors
        r = 1 + i % 3
        tensors[f"{m.name}.lora_down.weight"] = torch.randn(r, m.shape[1]).half()
        tensors[f"{m.name}.lora_up.weight"] = torch.randn(m.shape[0], r).half()
        tensors[f"{m.name}.alpha"] = torch.tensor(0.5 + i / 7)
    src = tmp_path / "k.safetensors"
    import safetensors.torch
    safetensors.torch.save_file(tensors, src)  # fp32 alphas first, then fp16 factors, as that library orders
    peft = lineage.adapters.convert(src, tmp_path / "p.safetensors", to="peft")
    read_back = open_adapter(peft.path)
    for i, m in enumerate(modules):
        assert read_back.modules[m.name].alpha == torch.tensor(0.5 + i / 7).item()
    back = lineage.adapters.convert(peft.path, tmp_path / "b.safetensors", to="kohya")
    assert hash_file(back.path).autov3 == hash_file(src).autov3


def test_peft_without_alpha_gets_alpha_equal_rank(base, tmp_path):
    modules = modules_of(base)[:5]
    src = write_lora(tmp_path / "p.safetensors", modules, rank=4, dialect="peft")
    stripped = tmp_path / "bare.safetensors"
    save_file({k: v for k, (_, v) in tensors_of(src).items()}, stripped)  # no lora_adapter_metadata
    out = lineage.adapters.convert(stripped, tmp_path / "k.safetensors", to="kohya")
    alphas = {k: v for k, (_, v) in tensors_of(out.path).items() if k.endswith(".alpha")}
    assert len(alphas) == 5 and all(v.item() == 4 for v in alphas.values())  # scale 1, as diffusers applies it


def test_lokr_to_peft_is_refused_and_nothing_is_written(base, tmp_path):
    src = write_lokr(tmp_path / "lokr.safetensors", modules_of(base)[:4])
    out = tmp_path / "p.safetensors"
    with pytest.raises(LineageError, match=r"lokr\.safetensors.*cannot convert to peft: module \S+ is lokr"):
        lineage.adapters.convert(src, out, to="peft")
    assert not out.exists()
    kept = lineage.adapters.convert(src, tmp_path / "k.safetensors", to="kohya")  # kohya holds LoKr
    assert open_adapter(kept.path).algorithm == "lokr"


def test_tucker_mid_to_peft_is_refused(base, tmp_path):
    src = write_lora(tmp_path / "locon.safetensors", modules_of(base, conv=True), mid=True)
    with pytest.raises(LineageError, match="lora_mid, which peft cannot hold"):
        lineage.adapters.convert(src, tmp_path / "p.safetensors", to="peft")


def test_lycoris_prefixed_names_become_kohya(base, tmp_path):
    from lineage.adapters.dialects import DIALECTS
    modules = [m for m in modules_of(base) if m.component == "unet"][:6]
    src = tmp_path / "lyco.safetensors"
    save_file({DIALECTS["lycoris"].key(m, role): torch.ones(shape) for m in modules
               for role, shape in (("lora_down", (2, m.shape[1])), ("lora_up", (m.shape[0], 2)), ("alpha", ()))}, src)
    out = lineage.adapters.convert(src, tmp_path / "k.safetensors", to="kohya")
    assert out.source_dialect == "lycoris"
    assert {k.split(".")[0] for k in read_header(out.path)[0]} == {m.name for m in modules}


def test_output_metadata_and_record(base, tmp_path):
    src = write_lora(tmp_path / "k.safetensors", modules_of(base)[:3],
                     metadata={"ss_network_dim": "4", "sshs_model_hash": "stale", "modelspec.title": "t"})
    out = lineage.adapters.convert(src, tmp_path / "p.safetensors", to="peft")
    meta = read_header(out.path)[1]
    assert meta["ss_network_dim"] == "4" and meta["sshs_model_hash"] == out.autov3
    assert meta["modelspec.hash_sha256"] == "0x" + out.autov3
    record = json.loads(meta["lineage.record"])
    assert record["relation"] == "convert" and record["inputs"][0]["autov3"] == hash_file(src).autov3
    assert record["alpha_dtype"] == "F16"
    assert out.node == out.autov3


def test_never_onto_the_input(base, tmp_path):
    src = write_lora(tmp_path / "k.safetensors", modules_of(base)[:3])
    before = open(src, "rb").read()
    with pytest.raises(LineageError):
        lineage.adapters.convert(src, src, to="peft")
    assert open(src, "rb").read() == before


def test_cli(base, tmp_path, lmerge):
    src = write_lora(tmp_path / "k.safetensors", modules_of(base)[:3])
    code, out, err = lmerge("convert", src, tmp_path / "p.safetensors", "--to", "peft")
    assert code == 0 and "3 modules, kohya -> peft" in out, err
    code, out, err = lmerge("convert", tmp_path / "p.safetensors", tmp_path / "k2.safetensors", "--to", "kohya",
                            "--json")
    assert code == 0 and json.loads(out)["dialect"] == "kohya"
    code, out, err = lmerge("convert", base, tmp_path / "x.safetensors", "--to", "peft")
    assert code == 1 and "is a checkpoint, not an adapter" in err and err.count("\n") == 1


def test_a_converted_adapter_keeps_its_base_in_compat(base, tmp_path):
    """The converted file's parent is its source (a convert edge); compat takes the source's base."""
    from lineage.graph.compat import check
    from lineage.graph.registry import Registry
    src = write_lora(tmp_path / "k.safetensors", modules_of(base)[:3])
    base_node = lineage.record(base)
    lineage.record(src, parents=[base], relation="adapter")
    peft = lineage.adapters.convert(src, tmp_path / "p.safetensors", to="peft")
    with Registry() as reg:
        graph = reg.graph()
        assert graph.edges[hash_file(src).autov3, peft.node]["relation"] == "convert"
        assert check(graph, peft.node, base_node).relationship == "same-base"


def test_cli_adapter_without_to_says_what_to_give(base, tmp_path, lmerge):
    src = write_lora(tmp_path / "k.safetensors", modules_of(base)[:3])
    code, out, err = lmerge("convert", src, tmp_path / "x.safetensors")
    assert code == 1 and "is a safetensors file already" in err and "--to kohya or --to peft" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_recorded_alpha_dtype_that_is_not_text_is_ignored(base, tmp_path):
    """Our record in a PEFT file says which dtype the kohya alpha tensors had; metadata is anyone's
    to write, so a value that is not a dtype's name (here a list) is ignored, not a traceback."""
    peft = lineage.adapters.convert(write_lora(tmp_path / "k.safetensors", modules_of(base)[:3]),
                                    tmp_path / "p.safetensors", to="peft")
    with SafetensorsFile(peft.path) as f:
        tensors, metadata = {k: f.read(k) for k in f.keys()}, dict(f.metadata)
    record = json.loads(metadata["lineage.record"])
    record["alpha_dtype"] = ["F16"]
    save_file(tensors, tmp_path / "odd.safetensors", {**metadata, "lineage.record": json.dumps(record)})
    out = lineage.adapters.convert(tmp_path / "odd.safetensors", tmp_path / "back.safetensors", to="kohya")
    factor_dtypes = {dtype for k, (dtype, _) in tensors_of(out.path).items() if not k.endswith(".alpha")}
    assert {dtype for k, (dtype, _) in tensors_of(out.path).items() if k.endswith(".alpha")} == factor_dtypes
