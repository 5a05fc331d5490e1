"""Recognise what a file or folder holds: which format, which architecture, which prediction type.

Detection looks at key names first (they survive reduced widths and dtype changes) and at a few
shapes where names are shared between architectures (SD 1.x vs 2.x cross-attention width).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lineage.adapters.dialects import DIALECTS, algorithm_of
from lineage.adapters.reader import SD1_NAMES
from lineage.errors import CheckpointError
from lineage.io.safetensors import SafetensorsFile, TensorInfo
from lineage.sdxl.layout import (
    COMPONENT_PREFIXES,
    DIFFUSERS_FILES,
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_REFINER_MARKER,
    SDXL_TEXT_MARKER,
    SDXL_UNET_MARKER,
    prediction_type_from_keys,
)

# Adapter formats by algorithm (the roles of adapters/dialects.py); a LoRA is named by its dialect's family.
ADAPTER_FORMATS: dict[str, str] = {"lokr": "lokr", "loha": "loha", "diff": "diff", "lora": "lora-kohya"}
LORA_FORMAT_BY_DIALECT: dict[str, str] = {"peft": "lora-peft"}


@dataclass
class Detection:
    """What `detect` found. `variant` says which parts a checkpoint has (full, unet-only, ...)."""

    path: str
    # sdxl-single-file | sdxl-diffusers | lora-kohya | locon | lokr | loha | diff | lora-peft | sd1 | sd2 | unknown
    format: str
    architecture: str | None  # sdxl | sd1 | sd2 | None
    prediction_type: str | None = None
    prediction_source: str | None = None  # markers | modelspec | default
    variant: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # component -> file, for folders
    seen: list[str] = field(default_factory=list)  # for "unknown": the key prefixes found
    reason: str = ""


def _prefix_summary(keys: list[str], depth: int = 2, most: int = 8) -> list[str]:
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return [f"{p} ({n})" for p, n in counts.most_common(most)]


def _components_present(keys: list[str]) -> list[str]:
    return [name for name, prefix in COMPONENT_PREFIXES.items() if any(k.startswith(prefix) for k in keys)]


def _variant(components: list[str]) -> str:
    have = set(components)
    if have == set(COMPONENT_PREFIXES):
        return "full"
    if have == {"unet"}:
        return "unet-only"
    missing = [c for c in COMPONENT_PREFIXES if c not in have]
    return "without-" + "-".join(missing)


def _with_ztsnr(prediction: str, zero_terminal_snr: bool) -> str:
    """"v" / "epsilon" with "+ztsnr" when the noise schedule was rescaled to zero terminal SNR."""
    return f"{prediction}+ztsnr" if zero_terminal_snr else prediction


def _kohya_prediction(metadata: dict[str, str]) -> str | None:
    """kohya's training flags: `ss_v_parameterization` and `ss_zero_terminal_snr` ("True" / "False")."""
    v = metadata.get("ss_v_parameterization") == "True"
    ztsnr = metadata.get("ss_zero_terminal_snr") == "True"
    return _with_ztsnr("v" if v else "epsilon", ztsnr) if v or ztsnr else None


def _prediction(keys: set[str], metadata: dict[str, str]) -> tuple[str, str]:
    from_markers = prediction_type_from_keys(keys)
    if from_markers:
        return from_markers, "markers"
    declared = metadata.get("modelspec.prediction_type")
    if declared in ("v", "epsilon"):
        return _with_ztsnr(declared, metadata.get("ss_zero_terminal_snr") == "True"), "modelspec"
    from_kohya = _kohya_prediction(metadata)
    if from_kohya:
        return from_kohya, "kohya metadata"
    return "epsilon", "default"


def _sd1_or_sd2(tensors: dict[str, TensorInfo]) -> str:
    if any(k.startswith(SD2_TEXT_PREFIX) for k in tensors):
        return "sd2"
    to_k = tensors.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    return "sd2" if to_k is not None and to_k.shape[-1] == 1024 else "sd1"


def detect_file(f: SafetensorsFile) -> Detection:
    keys = f.keys()
    key_set = set(keys)
    fmt = _adapter_format(keys)
    if fmt:
        return _detect_adapter(f, fmt)

    if SDXL_UNET_MARKER in key_set or SDXL_TEXT_MARKER in key_set:
        components = _components_present(keys)
        pred, source = _prediction(key_set, f.metadata)
        return Detection(f.path, "sdxl-single-file", "sdxl", pred, source, _variant(components),
                         reason="has SDXL's label_emb (ADM) input or OpenCLIP-G text encoder")
    if any(k.startswith(SDXL_REFINER_MARKER) for k in keys):
        return Detection(f.path, "sdxl-refiner", "sdxl-refiner", reason="OpenCLIP-G as the only text encoder")
    if any(k.startswith(("model.diffusion_model.", SD1_TEXT_PREFIX, SD2_TEXT_PREFIX)) for k in keys):
        arch = _sd1_or_sd2(f.tensors)
        pred, source = _prediction(key_set, f.metadata)
        return Detection(f.path, arch, arch, pred, source,
                         reason="Stable Diffusion UNet without SDXL's label_emb and OpenCLIP-G")
    return Detection(f.path, "unknown", None, seen=_prefix_summary(keys),
                     reason="no SDXL, SD 1.x/2.x or adapter key layout recognised")


def _adapter_format(keys: list[str]) -> str | None:
    """The adapter format the keys' roles make, None for a file that is no adapter. Each key's role is
    read by the first dialect (adapters/dialects.py) whose suffixes it ends with."""
    roles: dict[str, str] = {}  # role -> dialect
    for key in keys:
        for name, dialect in DIALECTS.items():
            found = dialect.split(key)
            if found:
                roles.setdefault(found[1], name)
                break
    algorithm = algorithm_of(roles)
    if algorithm is None:
        return None
    if algorithm == "lora":
        return LORA_FORMAT_BY_DIALECT.get(roles.get("lora_down", "kohya"), ADAPTER_FORMATS["lora"])
    return ADAPTER_FORMATS[algorithm]


def _detect_adapter(f: SafetensorsFile, fmt: str) -> Detection:
    keys = f.keys()
    if fmt == "lora-kohya" and any(k.endswith(".lora_down.weight") and len(f.tensors[k].shape) == 4
                                   and f.tensors[k].shape[-1] > 1 for k in keys):
        fmt = "locon"  # 3x3 convolutions carry a LoRA too (LyCORIS LoCon / kohya conv_dim)
    version = f.metadata.get("ss_base_model_version", "")
    if any(SD1_NAMES.match(k) for k in keys) or version.startswith(("sd_v1", "sd_v2")):
        arch = "sd2" if version.startswith("sd_v2") or f.metadata.get("ss_v2") == "True" else "sd1"
    elif any(d.parse(k) for d in DIALECTS.values() for k in keys) or version.startswith("sdxl"):
        arch = "sdxl"
    else:
        arch = None
    pred = _kohya_prediction(f.metadata)
    return Detection(f.path, fmt, arch, pred, "kohya metadata" if pred else None, variant="adapter",
                     reason=f"{fmt} adapter key names")


def _scheduler_config(path: str) -> dict[str, Any]:
    """A diffusers scheduler_config.json; one that cannot be read is an error naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the scheduler config ({e})", path) from None
    if not isinstance(config, dict):
        raise CheckpointError("the scheduler config is not a JSON object", path)
    return config


def scheduler_prediction(config: dict[str, Any]) -> str | None:
    """The prediction type a diffusers scheduler config declares beyond the default (plain epsilon), else None."""
    v = config.get("prediction_type") == "v_prediction"
    ztsnr = config.get("rescale_betas_zero_snr") is True  # diffusers' zero-terminal-SNR schedule
    return _with_ztsnr("v" if v else "epsilon", ztsnr) if v or ztsnr else None


def detect_folder(path: str) -> Detection:
    files = {}
    for component, candidates in DIFFUSERS_FILES.items():
        for rel in candidates:
            if os.path.isfile(os.path.join(path, rel)):
                files[component] = os.path.join(path, rel)
                break
    if not files and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise CheckpointError("is a directory that is neither a diffusers model folder nor a checkpoint file", path)
    if "clip_g" in files or os.path.isdir(os.path.join(path, "text_encoder_2")):
        pred = "epsilon"
        source = "default"
        scheduler = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.isfile(scheduler):
            declared = scheduler_prediction(_scheduler_config(scheduler))
            if declared:
                pred, source = declared, "scheduler_config"
        return Detection(path, "sdxl-diffusers", "sdxl", pred, source,
                         _variant(list(files)), files=files, reason="diffusers folder with text_encoder_2")
    return Detection(path, "diffusers", None, files=files, reason="diffusers folder without SDXL's second text encoder")


def detect(path: str | os.PathLike) -> Detection:
    """Detect the format of a checkpoint file or a diffusers folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return detect_folder(path)
    with SafetensorsFile(path) as f:
        return detect_file(f)


def require_sdxl(path: str | os.PathLike) -> Detection:
    """Detect `path` and raise a clear error unless it is an SDXL checkpoint (file or folder)."""
    found = detect(path)
    if found.format not in ("sdxl-single-file", "sdxl-diffusers"):
        what = {"sd1": "an SD 1.x checkpoint", "sd2": "an SD 2.x checkpoint", "unknown": "not a recognised model"}.get(
            found.format, f"a {found.format} file")
        raise CheckpointError(f"is {what}, but an SDXL checkpoint is required", found.path)
    return found
