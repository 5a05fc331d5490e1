"""Hostile adapter files (adapters/reader.py, adapters/convert.py, lmerge convert): each refused with one
line naming the file and the problem, never a traceback, nothing written."""
import os

import pytest
import torch
from adapter_samples import lora_tensors, modules_of, write_lokr

from lineage.adapters.dialects import PEFT_CONFIG_KEY
from lineage.adapters.reader import open_adapter
from lineage.adapters.writer import adapter_key
from lineage.errors import CheckpointError
from lineage.io.safetensors import SafetensorsFile, save_file


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lineage.sdxl.synthetic import write_base
    return write_base(tmp_path_factory.mktemp("probe") / "base.safetensors", size="tiny")


@pytest.fixture(scope="module")
def unet(base):
    return [m for m in modules_of(base) if m.component == "unet"][:3]


def kohya_with(unet, tmp_path, **roles):
    """A kohya LoRA of three modules whose first module's roles are replaced (None: removed)."""
    tensors = lora_tensors(unet)
    for role, value in roles.items():
        key = adapter_key("kohya", unet[0], role)
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    path = tmp_path / "adapter.safetensors"
    save_file(tensors, path)
    return str(path)


def refused(lmerge, path, *words):
    out = path + ".out.safetensors"
    code, stdout, stderr = lmerge("convert", path, out, "--to", "peft", "--no-record")
    text = stdout + stderr
    assert code != 0 and "Traceback" not in text, text
    line = text.strip()
    assert "\n" not in line and os.path.basename(path) in line, text
    for word in words:
        assert word in line, text
    assert not os.path.exists(out)
    with pytest.raises(CheckpointError):
        open_adapter(path)
    return line


@pytest.mark.parametrize("alpha,words", [
    (torch.tensor([1.0, 2.0]), ("alpha", "2 values")),
    (torch.tensor(float("nan")), ("alpha", "nan")),
    (torch.tensor(float("inf")), ("alpha", "inf")),
    (torch.tensor(True), ("alpha", "bool")),
])
def test_bad_alpha_tensor(unet, tmp_path, lmerge, alpha, words):
    refused(lmerge, kohya_with(unet, tmp_path, alpha=alpha), unet[0].name, *words)


def test_int_alpha_is_a_number(unet, tmp_path):
    path = kohya_with(unet, tmp_path, alpha=torch.tensor(3, dtype=torch.int32))
    assert open_adapter(path).modules[unet[0].name].alpha == 3.0


@pytest.mark.parametrize("config,words", [
    ("[1, 2]", ("not a JSON object",)),
    ("5", ("not a JSON object",)),
    ("[" * 100_000 + "]" * 100_000, (PEFT_CONFIG_KEY,)),
    ('{"unet.lora_alpha": {"a": [1]}}', ("unet.lora_alpha",)),
    ('{"unet.lora_alpha": "abc"}', ("unet.lora_alpha",)),
    ('{"unet.lora_alpha": true}', ("unet.lora_alpha",)),
    ('{"unet.lora_alpha": NaN}', ("NaN",)),
    ('{"unet.lora_alpha": 1e999}', ("1e999",)),
    ('{"unet.alpha_pattern": [1, 2]}', ("unet.alpha_pattern",)),
])
def test_bad_peft_adapter_metadata(unet, tmp_path, lmerge, config, words):
    path = tmp_path / "peft.safetensors"
    save_file(lora_tensors(unet, dialect="peft"), path, {PEFT_CONFIG_KEY: config})
    refused(lmerge, str(path), PEFT_CONFIG_KEY, *words)


def test_rank_zero(unet, tmp_path, lmerge):
    m = unet[0]
    path = kohya_with(unet, tmp_path, lora_down=torch.zeros(0, m.shape[1]), lora_up=torch.zeros(m.shape[0], 0))
    refused(lmerge, path, m.name, "rank 0")


def test_factor_of_wrong_dimensionality(unet, tmp_path, lmerge):
    m = unet[0]
    path = kohya_with(unet, tmp_path, lora_down=torch.zeros(4, m.shape[1], 1).half())
    refused(lmerge, path, m.name, "lora_down", "3-D")


def test_module_spelled_in_two_dialects(unet, tmp_path, lmerge):
    m = unet[0]
    tensors = lora_tensors(unet)
    tensors[adapter_key("peft", m, "lora_down")] = torch.zeros(4, m.shape[1])
    tensors[adapter_key("peft", m, "lora_up")] = torch.zeros(m.shape[0], 4)
    path = tmp_path / "twice.safetensors"
    save_file(tensors, path)
    refused(lmerge, str(path), m.name, "twice", adapter_key("peft", m, "lora_down")[:20])


def test_lokr_with_whole_and_factored_w1(base, tmp_path, lmerge):
    path = write_lokr(tmp_path / "lokr.safetensors", modules_of(base)[:2])
    with SafetensorsFile(path) as f:
        tensors = {k: f.read(k) for k in f.keys()}
    name = modules_of(base)[0].name
    w1 = tensors[f"{name}.lokr_w1"]
    tensors[f"{name}.lokr_w1_a"] = torch.zeros(w1.shape[0], 1)
    tensors[f"{name}.lokr_w1_b"] = torch.zeros(1, w1.shape[1])
    save_file(tensors, path)
    line = refused(lmerge, path, name, "lokr_w1")
    assert "lokr_w1_a" in line
