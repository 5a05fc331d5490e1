"""The device a run computes on: `--device cpu|cuda|cuda:N` (merge, extract, apply).

Files are read and written by the host whatever the device; a job moves the fp32 pieces it computes
on to the device (`JobContext.to_device`), computes there and copies its results back into its
output views (lineage/engine/executor.py). So a GPU run streams exactly as a CPU run does, and its
memory on the device is a few pieces per worker.
"""
from __future__ import annotations

from lineage.errors import LineageError
from lineage.lazy import torch


def compute_device(name: str | None) -> torch.device:
    """The torch device `name` names (None: the CPU), checked to exist here."""
    try:
        device = torch.device(name or "cpu")
    except RuntimeError:
        raise LineageError(f"--device {name}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise LineageError(f"--device {name}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise LineageError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise LineageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device
