"""The metadata an adapter file we write carries (docs/metadata.md), so that trainers' and loaders'
tools and `lmerge compat` see what it is and which base it belongs to:

- kohya's `ss_*` keys: base model version, network module (`networks.lora` for LoRA / LoCon written the
  kohya way, `lycoris.kohya` for LyCORIS algorithms), dim, alpha, network args (JSON), the base's
  file name and hashes as kohya computes them (`ss_new_sd_model_hash`: the whole-file sha256;
  `ss_sd_model_hash`: the legacy AutoV1), and `sshs_model_hash`, the adapter's own AutoV3;
- ModelSpec 1.0.0 (`stable-diffusion-xl-v1-base/lora` or `/lycoris`), `hash_sha256` the adapter's AutoV3,
  the base named with its hash in the description;
- our own record under `lineage.record`: the base (and any other input) by name and AutoV3, the
  relation and what the producer adds (method, ranks, errors, ...), read back by lineage/graph/recording.py.
kohya's `sshs_legacy_hash` is not written: kohya computes it over bytes of a re-serialised file that
holds only the `ss_*` keys, which is not this file.
"""
from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lineage import __version__
from lineage.graph.metadata import LINEAGE_RECORD_KEY, modelspec_metadata
from lineage.merge.records import SDXL_ARCHITECTURE, SDXL_IMPLEMENTATION, SDXL_RESOLUTION

KOHYA_BASE_MODEL_VERSION = "sdxl_base_v1-0"
# Algorithm -> (kohya's ss_network_module, ModelSpec architecture suffix, LyCORIS `algo` argument or None).
NETWORK_MODULES: dict[str, tuple[str, str, str | None]] = {
    "lora": ("networks.lora", "lora", None),
    "locon": ("lycoris.kohya", "lycoris", "locon"),
    "lokr": ("lycoris.kohya", "lycoris", "lokr"),
    "loha": ("lycoris.kohya", "lycoris", "loha"),
    "diff": ("lycoris.kohya", "lycoris", "full"),
}
RECORD_VERSION = 1


@dataclass(frozen=True)
class BaseModel:
    """The checkpoint an adapter belongs to: its file name and whichever hashes are known (kohya's two
    need the whole file; AutoV3 is what our runs compute while reading)."""

    name: str
    autov3: str | None = None
    sha256: str | None = None
    autov1: str | None = None


def adapter_record(relation: str, inputs: Sequence[tuple[str, str | None]], **fields: Any) -> dict[str, Any]:
    """Our record: `inputs` ((file name, AutoV3 or None), the parents, base first), the `relation`
    (`adapter` for an extraction, `convert` for a conversion, ...) and the producer's `fields`."""
    return {"version": RECORD_VERSION, "relation": relation,
            "inputs": [{"name": name, "autov3": autov3} for name, autov3 in inputs],
            **fields, "library": f"lineage {__version__}"}


def metadata_number(value: float | int | str) -> str:
    """A number as metadata text, a whole float without its ".0" (kohya writes "16", not "16.0")."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def adapter_metadata(*, algorithm: str, dim: int | str, alpha: float | str, base: BaseModel | None, title: str,
                     output_autov3: str | None, network_args: Mapping[str, Any] | None = None,
                     prediction_type: str | None = None, record: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every metadata key an adapter file gets. `dim` and `alpha` are the (common) rank and alpha, or
    "Dynamic" when modules differ; `network_args` the algorithm's arguments (conv_dim, factor, ...);
    `output_autov3` is None until the file is written (the executor asks again at the end)."""
    module, architecture, algo = NETWORK_MODULES[algorithm]
    args = {**({"algo": algo} if algo else {}), **{k: metadata_number(v) for k, v in (network_args or {}).items()}}
    metadata = {
        "ss_base_model_version": KOHYA_BASE_MODEL_VERSION,
        "ss_network_module": module,
        "ss_network_dim": metadata_number(dim),
        "ss_network_alpha": metadata_number(alpha),
        "ss_output_name": title,
        "ss_v2": "False",
        "ss_v_parameterization": str(prediction_type in ("v", "v+ztsnr", "edm-v")),
    }
    if args:
        metadata["ss_network_args"] = json.dumps(args)
    described = f"{algorithm} adapter made with lineage {__version__}"
    if base is not None:
        metadata["ss_sd_model_name"] = base.name
        if base.sha256:
            metadata["ss_new_sd_model_hash"] = base.sha256
        if base.autov1:
            metadata["ss_sd_model_hash"] = base.autov1
        if base.autov3:
            described += f" for {base.name} (AutoV3 0x{base.autov3})"
    if output_autov3:
        metadata["sshs_model_hash"] = output_autov3
    metadata.update(modelspec_metadata(
        architecture=f"{SDXL_ARCHITECTURE}/{architecture}", implementation=SDXL_IMPLEMENTATION, title=title,
        resolution=SDXL_RESOLUTION, date=datetime.date.today().isoformat(), prediction_type=prediction_type,
        autov3=output_autov3, description=described))
    if record is not None:
        metadata[LINEAGE_RECORD_KEY] = json.dumps(record, ensure_ascii=False)
    return metadata
