"""`lmerge inspect`: one summary of what a checkpoint holds, for people and (as JSON) for programs."""
from __future__ import annotations

import os
import textwrap
from collections import Counter, defaultdict
from typing import Any

from lineage.graph.metadata import lineage_from_metadata
from lineage.io.hashing import hash_file
from lineage.io.safetensors import SafetensorsFile, TensorInfo
from lineage.sdxl.detection import Detection, detect_file, detect_folder
from lineage.sdxl.layout import base_inventory, component_of, is_marker


def _stats(tensors: list[TensorInfo]) -> dict[str, Any]:
    return {"tensors": len(tensors), "params": sum(t.numel for t in tensors),
            "dtypes": dict(Counter(t.dtype for t in tensors))}


def _component_stats(tensors: list[TensorInfo]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[TensorInfo]] = defaultdict(list)
    for t in tensors:
        groups[component_of(t.name) or ("markers" if is_marker(t.name) else "other")].append(t)
    return {name: _stats(ts) for name, ts in groups.items()}


def _against_inventory(tensors: dict[str, TensorInfo], components: list[str]) -> dict[str, Any]:
    """Missing and unexpected keys versus the SDXL base inventory (restricted to the components
    present, so a UNet-only file is not reported as missing its text encoders key by key)."""
    inventory = {k: e for k, e in base_inventory().items() if e.component in components}
    present = set(tensors)
    missing = sorted(k for k in inventory if k not in present)
    unexpected = sorted(k for k in present if k not in inventory and not is_marker(k))
    same_shapes = all(tensors[k].shape == e.shape for k, e in inventory.items() if k in present)
    return {"missing": missing, "unexpected": unexpected, "full_size": same_shapes}


def inspect_path(path: str | os.PathLike, with_hashes: bool = False) -> dict[str, Any]:
    """Summarise a checkpoint file or diffusers folder as a JSON-ready dict."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _inspect_folder(detect_folder(path), with_hashes)
    with SafetensorsFile(path) as f:
        found = detect_file(f)
        infos = list(f.tensors.values())
        report = _base_report(found)
        report.update(
            file_size=f.file_size,
            tensors=len(infos),
            params=sum(t.numel for t in infos),
            components=_component_stats(infos),
            markers=[k for k in f.tensors if is_marker(k)],
            metadata=f.metadata,
            lineage=lineage_from_metadata(f.metadata, path),
        )
        report["made_from"] = _made_from(report["lineage"], found.format)
        if found.format == "sdxl-single-file":
            present = [c for c in report["components"] if c in ("unet", "clip_l", "clip_g", "vae")]
            report.update(_against_inventory(f.tensors, present))
        else:
            report.update(missing=[], unexpected=[])
        if found.format == "unknown":
            report["seen"] = found.seen
    if with_hashes:
        report["hashes"] = {k: v for k, v in hash_file(path).to_dict().items() if k != "path"}
    return report


def _base_report(found: Detection) -> dict[str, Any]:
    return {
        "path": found.path,
        "format": found.format,
        "variant": found.variant,
        "architecture": found.architecture,
        "prediction_type": found.prediction_type,
        "prediction_source": found.prediction_source,
        "reason": found.reason,
    }


def _inspect_folder(found: Detection, with_hashes: bool) -> dict[str, Any]:
    report = _base_report(found)
    components: dict[str, Any] = {}
    metadata: dict[str, dict[str, str]] = {}
    for component, file in found.files.items():
        with SafetensorsFile(file) as f:
            components[component] = _stats(list(f.tensors.values()))
            if f.metadata:
                metadata[component] = f.metadata
    report.update(
        components=components,
        files={c: os.path.relpath(p, found.path) for c, p in found.files.items()},
        missing=[c for c in ("unet", "clip_l", "clip_g", "vae") if c not in found.files],
        unexpected=[],
        metadata=metadata,
        lineage={c: lineage_from_metadata(m) for c, m in metadata.items() if lineage_from_metadata(m)},
        tensors=sum(c.get("tensors", 0) for c in components.values()),
        params=sum(c.get("params", 0) for c in components.values()),
    )
    if with_hashes:
        report["hashes"] = {c: {k: v for k, v in hash_file(p).to_dict().items() if k != "path"}
                            for c, p in found.files.items()}
    return report


def _made_from(found: dict[str, Any], fmt: str) -> dict[str, Any] | None:
    """The parents the metadata names (its best source, as `lmerge scan` reads it): relation, method,
    each parent's name, hash or path and weight, and how many earlier steps the file's ancestry records."""
    from lineage.graph.recording import KIND_OF_FORMAT, origins_from_metadata

    origins = origins_from_metadata(found, KIND_OF_FORMAT.get(fmt, fmt))
    own = next((o for o in origins if o.child is None), None)
    if own is None:
        return None
    parents = [{"name": ref.name, ref.kind: ref.value, "weight": weight}
               for ref, weight in zip(own.parents, own.weights)]
    return {"relation": own.relation, "method": (own.params or {}).get("method"), "source": own.source,
            "parents": parents, "earlier_steps": len(origins) - 1}


def _parent_line(parent: dict[str, Any]) -> str:
    weight = f"{parent['weight']:>6.3g}  " if parent.get("weight") is not None else "        "
    named = next((f"{kind} {value[:12]}" if kind != "path" else value for kind, value in parent.items()
                  if kind not in ("name", "weight")), "")
    name = parent.get("name") or ""
    return f"    {weight}{name}" + (f" ({named})" if named and named != name else "")


def format_report(report: dict[str, Any]) -> str:
    """The human summary of an `inspect_path` report."""
    lines = [f"{report['path']}",
             f"  format:      {report['format']}" + (f" ({report['variant']})" if report.get("variant") else ""),
             f"  arch:        {report['architecture'] or 'unknown'}"]
    if report.get("prediction_type"):
        lines.append(f"  prediction:  {report['prediction_type']} (from {report['prediction_source']})")
    if "tensors" in report:
        lines.append(f"  tensors:     {report['tensors']:,} ({report['params']:,} parameters)")
    for name, c in report.get("components", {}).items():
        dtypes = ", ".join(f"{d}×{n}" for d, n in c.get("dtypes", {}).items())
        lines.append(f"    {name:<8} {c.get('tensors', 0):>5} tensors {c.get('params', 0):>14,} params  {dtypes}")
    if report.get("markers"):
        lines.append(f"  markers:     {', '.join(report['markers'])}")
    if "full_size" in report:
        widths = "SDXL 1.0 full size" if report["full_size"] else "reduced / non-standard widths"
        lines.append(f"  shapes:      {widths}")
    for label in ("missing", "unexpected"):
        items = report.get(label) or []
        if items:
            shown = ", ".join(items[:3]) + (f", … ({len(items)} in all)" if len(items) > 3 else "")
            lines.append(f"  {label + ':':<12} {shown}")
    if report.get("seen"):
        lines.append(f"  seen:        {', '.join(report['seen'])}")
    made = report.get("made_from")
    if made:
        how = ", ".join(str(x) for x in (made["method"], f"read from {made['source']} metadata") if x)
        lines.append(f"  made by:     {made['relation']} ({how}) of")
        lines.extend(_parent_line(p) for p in made["parents"])
        if made["earlier_steps"]:
            lines.append(f"  ancestry:    {made['earlier_steps']} earlier step(s) recorded in the file")
    for tool, found in report.get("lineage", {}).items():  # which keys each tool left, fitted to 80 columns
        keys = ", ".join(found) if isinstance(found, dict) else str(found)
        lines.append(textwrap.fill(f"lineage ({tool}): {keys}", width=80, initial_indent="  ",
                                   subsequent_indent="      ", break_on_hyphens=False))
    if report.get("metadata") and not report.get("lineage"):
        lines.append(f"  metadata:    {len(report['metadata'])} keys")
    for name, value in report.get("hashes", {}).items():
        lines.append(f"  {name + ':':<12} {value}")
    return "\n".join(lines)
