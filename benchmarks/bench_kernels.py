"""The Triton kernels on a CUDA device beside the torch path and the device's memory bandwidth.

    python benchmarks/bench_kernels.py [--rounds 20] [--json]

Every kernel here is memory bound, so each is reported as time and achieved bandwidth (the bytes it
must read and write, divided by its median time) beside the same operation done by the torch path on
the same device, and beside the device's bandwidth: the theoretical figure from its memory clock and
bus width (when torch reports them) and a measured device-to-device copy. The kernels:

- adapters/kernels.py: `add_lora` W += s·(up @ down) with fp16 W and factors, rank 64 (the GEMM with
  the add in its epilogue; torch: fp32 copy of W, addmm, rounding back); `add_kron` W += s·kron(w1, w2)
  (torch: the broadcast product over W seen as 4-D);
- merge/kernels.py: weighted sum of two fp16 tensors, TIES of three fine-tunes over a base (thresholds
  given), DARE of three (torch: the methods of merge/methods.py with the kernels switched off).

Shapes are SDXL's largest UNet linear weight (10240×1280). Without a CUDA device or without Triton
it prints one line saying why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from unittest import mock

import torch

ROWS, COLUMNS, RANK = 10240, 1280, 64
KRON_W1 = (16, 8)  # w1 (a, c); w2 is (ROWS / a, COLUMNS / c)
DEVICE = "cuda"


@dataclass
class Row:
    kernel: str
    shape: str
    bytes_moved: int
    triton_ms: float
    torch_ms: float

    @property
    def triton_gbps(self) -> float:
        return self.bytes_moved / self.triton_ms / 1e6

    @property
    def torch_gbps(self) -> float:
        return self.bytes_moved / self.torch_ms / 1e6


def why_not_here() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'lmerge[cuda]')"
    return None


def median_ms(run: Callable[[], object], rounds: int) -> float:
    """Median of `rounds` timings by CUDA events, after two warm-up calls (compilation, caches)."""
    for _ in range(2):
        run()
    samples = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def theoretical_gbps() -> float | None:
    """Peak DRAM bandwidth from the device's memory clock (kHz) and bus width (bits), double data rate."""
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def measured_copy_gbps(rounds: int) -> float:
    """A device-to-device copy of 512 MiB: bytes read plus bytes written per second."""
    source = torch.empty(1 << 27, dtype=torch.float32, device=DEVICE)
    target = torch.empty_like(source)
    return 2 * source.nbytes / median_ms(lambda: target.copy_(source), rounds) / 1e6


def adapter_rows(rounds: int) -> list[Row]:
    from lineage.adapters import kernels

    def randn(*shape: int, dtype=torch.float16) -> torch.Tensor:
        return torch.randn(shape, device=DEVICE).to(dtype)

    weight, up, down = randn(ROWS, COLUMNS), randn(ROWS, RANK), randn(RANK, COLUMNS)
    lora_bytes = 2 * weight.nbytes + up.nbytes + down.nbytes
    (a, c) = KRON_W1
    w1, w2 = randn(a, c), randn(ROWS // a, COLUMNS // c)
    kron_bytes = 2 * weight.nbytes + w1.nbytes + w2.nbytes
    return [
        Row("add_lora (fp16 W, rank 64)", f"{ROWS}x{COLUMNS}", lora_bytes,
            median_ms(lambda: kernels.add_lora_triton_(weight, up, down, 1e-3), rounds),
            median_ms(lambda: kernels.add_lora_torch_(weight, up, down, 1e-3), rounds)),
        Row(f"add_kron (fp16 W, w1 {a}x{c})", f"{ROWS}x{COLUMNS}", kron_bytes,
            median_ms(lambda: kernels.add_kron_triton_(weight, w1, w2, 1e-3), rounds),
            median_ms(lambda: kernels.add_kron_torch_(weight, w1, w2, 1e-3), rounds)),
    ]


def merge_rows(rounds: int) -> list[Row]:
    from lineage.merge import kernels, methods

    g = torch.Generator(device=DEVICE).manual_seed(0)
    base = torch.randn(ROWS, COLUMNS, device=DEVICE, generator=g, dtype=torch.float16)
    models = [base + 0.01 * torch.randn(ROWS, COLUMNS, device=DEVICE, generator=g, dtype=torch.float16)
              for _ in range(3)]
    fp16, fp32 = base.nbytes, 2 * base.nbytes  # one input read, the fp32 output written
    cases = [("weighted_sum (2 models)", (base, models[0]), {"alpha": 0.3}, 2 * fp16 + fp32),
             ("ties (base + 3)", (base, *models), {"density": 0.2, "threshold": "exact"}, 4 * fp16 + fp32),
             ("dare_linear (base + 3)", (base, *models), {"density": 0.3, "seed": 1}, 4 * fp16 + fp32)]
    rows = []
    for name, tensors, params, nbytes in cases:
        method = methods.get_method(name.split()[0])
        if method.statistics is not None:  # computed once per tensor by the engine, not part of the kernel
            params = {**params, "statistics": method.statistics([t.reshape(-1).cpu() for t in tensors], params)}
        triton_ms = median_ms(lambda: method.fn(*tensors, **params), rounds)
        with mock.patch.object(kernels, "use_kernels", lambda *_: False):
            torch_ms = median_ms(lambda: method.fn(*tensors, **params), rounds)
        rows.append(Row(name, f"{ROWS}x{COLUMNS}", nbytes, triton_ms, torch_ms))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed calls per measurement (median reported)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    reason = why_not_here()
    if reason:
        print(f"bench_kernels: skipped: {reason}")
        return 0
    device = torch.cuda.get_device_name(0)
    theoretical, copy = theoretical_gbps(), measured_copy_gbps(args.rounds)
    rows = adapter_rows(args.rounds) + merge_rows(args.rounds)
    if args.json:
        print(json.dumps({"device": device, "theoretical_gbps": theoretical, "copy_gbps": copy,
                          "kernels": [{**asdict(r), "triton_gbps": r.triton_gbps, "torch_gbps": r.torch_gbps}
                                      for r in rows]}, indent=2))
        return 0
    peak = f"{theoretical:.0f} GB/s theoretical, " if theoretical else ""
    print(f"{device}: {peak}{copy:.0f} GB/s measured device-to-device copy")
    print(f"{'kernel':32} {'shape':>11} {'MB':>6} {'triton ms':>10} {'GB/s':>7} {'% copy':>7} "
          f"{'torch ms':>9} {'GB/s':>7} {'speed-up':>8}")
    for r in rows:
        speed_up = r.torch_ms / r.triton_ms
        print(f"{r.kernel:32} {r.shape:>11} {r.bytes_moved / 1e6:6.0f} {r.triton_ms:10.3f} {r.triton_gbps:7.0f} "
              f"{100 * r.triton_gbps / copy:6.0f}% {r.torch_ms:9.3f} {r.torch_gbps:7.0f} {speed_up:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
