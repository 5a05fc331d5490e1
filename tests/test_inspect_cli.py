"""`lmerge inspect`, `lmerge convert` and the one-line errors for bad input."""
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch

from lineage.io.safetensors import save_file
from lineage.sdxl.synthetic import write_base


def test_inspect_json_with_hashes(lmerge, family):
    code, out, _ = lmerge("inspect", family["vchild"], "--json", "--hash")
    assert code == 0
    r = json.loads(out)
    found = (r["format"], r["architecture"], r["prediction_type"], r["variant"])
    assert found == ("sdxl-single-file", "sdxl", "v+ztsnr", "full")
    assert r["components"]["unet"]["tensors"] == 1680 and r["components"]["clip_l"]["dtypes"] == {"F16": 196, "I64": 1}
    assert r["missing"] == [] and r["unexpected"] == [] and r["full_size"] is False
    assert r["markers"] == ["v_pred", "ztsnr"] and r["tensors"] == 2517
    assert set(r["hashes"]) == {"sha256", "autov1", "autov2", "autov3", "crc32"}


def test_inspect_reports_missing_unexpected_and_lineage(lmerge, tmp_path, family):
    from lineage.io.safetensors import SafetensorsFile

    with SafetensorsFile(family["base"]) as f:
        tensors = {k: f.read(k) for k in f.keys() if k.startswith("model.diffusion_model.") and "out." not in k[:26]}
    tensors["model.diffusion_model.extra.weight"] = torch.zeros(1)
    meta = {"modelspec.merged_from": "a.safetensors, b.safetensors", "sd_merge_models": "{not json",
            "ss_sd_model_hash": "abc", "mecha_recipe": "merge x"}
    path = tmp_path / "odd.safetensors"
    save_file(tensors, path, meta)
    code, out, _ = lmerge("inspect", path, "--json")
    r = json.loads(out)
    assert r["variant"] == "unet-only"
    assert r["missing"] == ["model.diffusion_model.out.0.bias", "model.diffusion_model.out.0.weight",
                            "model.diffusion_model.out.2.bias", "model.diffusion_model.out.2.weight"]
    assert r["unexpected"] == ["model.diffusion_model.extra.weight"]
    assert r["lineage"]["modelspec"]["merged_from"] == ["a.safetensors", "b.safetensors"]
    assert "not valid JSON" in r["lineage"]["a1111"]["sd_merge_models"]["error"]
    assert r["lineage"]["kohya"] == {"ss_sd_model_hash": "abc"} and r["lineage"]["sd_mecha"] == {"recipe": "merge x"}
    code, text, _ = lmerge("inspect", path)
    assert "unet-only" in text and "missing:" in text and "(4 in all)" in text


def _valid_bytes() -> bytes:
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


def _with_header(entries: dict, data: bytes = b"\0" * 16) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + data


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


BAD_INPUTS = {
    "empty": (b"", "empty file"),
    "truncated": (_valid_bytes()[:-3], "truncated file"),
    "header_past_end": (struct.pack("<Q", 10_000) + b"{}", "runs past the end of the file"),
    "bad_json": (struct.pack("<Q", 6) + b"{nope}", "invalid safetensors header JSON"),
    "overlap": (_with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),
                "overlapping data_offsets"),
    "out_of_range": (_with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}),
                     "out-of-range data_offsets"),
    "unknown_dtype": (_with_header({"a": {"dtype": "F13", "shape": [2], "data_offsets": [0, 8]}}),
                      "unknown dtype 'F13'"),
    "shape_size": (_with_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
                   "needs 12 bytes but data_offsets span 8"),
    "pickle": (pickle.dumps(_Evil(), protocol=2), "pickle checkpoint"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gives_one_line_naming_the_file(lmerge, tmp_path, name):
    content, message = BAD_INPUTS[name]
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(content)
    code, out, err = lmerge("inspect", path)
    assert code == 1 and out == ""
    assert err.startswith(f"error: {path}: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


def test_directory_where_a_file_is_expected(lmerge, tmp_path):
    code, _, err = lmerge("hash", tmp_path)
    assert code == 1 and f"{tmp_path}: is a directory" in err
    code, _, err = lmerge("inspect", tmp_path)
    assert code == 1 and "neither a diffusers model folder nor a checkpoint file" in err


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "lineage", "--debug", "inspect", str(path)], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lineage", "inspect", str(path)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip() == f"error: {path}: empty file"


def test_convert_pickle_loads_weights_only(lmerge, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    state = {"w": torch.arange(6.0).reshape(2, 3), "nested": {"b": torch.ones(2, dtype=torch.bfloat16)}}
    torch.save({"state_dict": state, "global_step": 7}, ckpt)
    code, out, err = lmerge("convert", ckpt, tmp_path / "model.safetensors")
    assert code == 0, err
    import safetensors.torch

    got = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert got["w"].tolist() == [[0, 1, 2], [3, 4, 5]] and got["nested.b"].dtype == torch.bfloat16


def test_convert_refuses_code_in_a_pickle(lmerge, tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": torch.ones(1)}, evil)  # a zip checkpoint ...
    evil.write_bytes(pickle.dumps({"x": _Evil()}))  # ... replaced by a pickle that runs a command
    code, _, err = lmerge("convert", evil, tmp_path / "out.safetensors")
    assert code == 1 and "cannot load as a weights-only pickle checkpoint" in err
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
    assert not (tmp_path / "out.safetensors").exists()


def test_inspect_a_unet_only_fp32_file(lmerge, tmp_path):
    p = write_base(tmp_path / "u.safetensors", components=["unet"], dtype="F32")
    code, out, _ = lmerge("inspect", p, "--json")
    r = json.loads(out)
    assert r["variant"] == "unet-only" and r["components"]["unet"]["dtypes"] == {"F32": 1680} and r["missing"] == []


def test_inspect_shows_the_lineage_it_read_and_takes_several_files(lmerge, trio, tmp_path):
    weighted, ties = tmp_path / "w.safetensors", tmp_path / "t.safetensors"
    assert lmerge("merge", trio["base"], trio["x"], "--alpha", "0.25", "-o", weighted, "--no-record")[0] == 0
    assert lmerge("merge", trio["base"], trio["x"], trio["y"], "--method", "ties", "-o", ties, "--no-record")[0] == 0
    code, stdout, _ = lmerge("inspect", weighted, ties)
    assert code == 0
    first, second = stdout.split("\n\n")
    assert "made by:     merge (weighted_sum, read from lineage metadata) of" in first
    assert "    0.75  base (autov3 " in first and "    0.25  x (autov3 " in first
    assert "made by:     merge (ties, read from lineage metadata) of" in second and " y (autov3 " in second
    # each report opens with the file's path, printed whole however long; the rest fits 80 columns
    assert max(len(line) for line in stdout.splitlines() if line not in (str(weighted), str(ties))) <= 80
    code, stdout, _ = lmerge("inspect", "--json", weighted, ties)
    reports = json.loads(stdout)
    assert [r["made_from"]["method"] for r in reports] == ["weighted_sum", "ties"]
    assert [p["weight"] for p in reports[0]["made_from"]["parents"]] == [0.75, 0.25]


def test_inspect_reports_a_bad_file_among_several_and_shows_the_others(lmerge, trio, tmp_path):
    code, stdout, err = lmerge("inspect", trio["base"], tmp_path / "missing.safetensors")
    assert code == 1 and trio["base"] in stdout and "missing.safetensors" in err and "Traceback" not in err
