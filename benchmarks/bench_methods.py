"""Per-tensor cost of the merge methods on the largest SDXL UNet weight shape (1280×10240, 13.1M entries).

    python benchmarks/bench_methods.py [--threads 2] [--rounds 5] [--methods ties,weighted_sum,...]

Measures the methods of merge/methods.py on fp32 tensors already in memory (no I/O), alternating the
methods round by round, and reports the median time, ns per entry, the ratio to a plain copy and to
the weighted sum (the cheapest method) measured in the same run, and what that rate means for the
~3.5G parameters of a full SDXL checkpoint. Two baselines run beside them:
- `copy`: `torch.clone` of one input, the cost of producing any full-size output;
- `ties (whole-tensor)`: TIES written the straightforward way — exact `torch.kthvalue` thresholds and
  full-size boolean masks (what a direct transcription of the paper does), to show what the sampled
  thresholds and cache-sized slices of `methods.ties` buy. Its result is compared with ours.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lineage.merge import methods

SDXL_PARAMETERS = 3.5e9
SHAPE = (1280, 10240)


def ties_whole_tensor(base: torch.Tensor, *models: torch.Tensor, density: float) -> torch.Tensor:
    """TIES with exact thresholds and whole-tensor operations (equal weights, alpha 1)."""
    trimmed = []
    for model in models:
        delta = model - base
        magnitude = delta.abs().reshape(-1)
        threshold = torch.kthvalue(magnitude, magnitude.numel() - round(density * magnitude.numel()) + 1).values
        trimmed.append(torch.where(delta.abs() >= threshold, delta, 0.0))
    elected = torch.sign(sum(trimmed))
    agrees = [(torch.sign(d) == elected) & (d != 0) for d in trimmed]
    agreeing_sum = sum(torch.where(a, d, 0.0) for a, d in zip(agrees, trimmed))
    agreeing_count = sum(a.float() for a in agrees)
    return base + torch.where(agreeing_count > 0, agreeing_sum / agreeing_count, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--methods", default="weighted_sum,add_difference,task_arithmetic,train_difference,ties,"
                                          "breadcrumbs,dare_linear,dare_ties,slerp,model_stock,geometric_median,della")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    base = torch.randn(SHAPE, generator=g) * 0.01
    finetunes = [base + torch.randn(SHAPE, generator=g) * 0.001 for _ in range(3)]
    inputs = {  # the models each method gets: two for two-model methods, else a base and two fine-tunes
        2: [base, finetunes[0]],
        3: [base, finetunes[0], finetunes[1]],
    }
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "copy": lambda: base.clone(),
        "ties (whole-tensor)": lambda: ties_whole_tensor(base, finetunes[0], finetunes[1], density=0.2),
    }
    for name in args.methods.split(","):
        method = methods.get_method(name)
        xs = inputs[2 if method.max_models == 2 else 3]
        params = {"seed": 1} if method.random else {}
        if name == "ties":
            params["density"] = 0.2
        cases[name] = lambda fn=method.fn, xs=xs, params=params: fn(*xs, **params)

    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)

    entries = base.numel()
    copy = statistics.median(timings["copy"])
    cheapest = statistics.median(timings.get("weighted_sum", timings["copy"]))
    print(f"\n{SHAPE[0]}×{SHAPE[1]} fp32 ({entries / 1e6:.1f}M entries), {args.threads} thread(s), "
          f"median of {args.rounds} alternating rounds; methods over a base get 2 fine-tunes")
    print("| method | ms per tensor | ns per entry | × copy | × weighted_sum | s per 3.5G params |")
    print("|---|---|---|---|---|---|")
    for name, samples in timings.items():
        seconds = statistics.median(samples)
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / entries * 1e9:.2f} | {seconds / copy:.1f} | "
              f"{seconds / cheapest:.1f} | {seconds / entries * SDXL_PARAMETERS:.0f} |")

    ours = methods.ties(base, finetunes[0], finetunes[1], density=0.2)
    exact = ties_whole_tensor(base, finetunes[0], finetunes[1], density=0.2)
    kept_ours = [((m - base).abs() >= methods._top_magnitude_threshold(base, m, 0.2)).float().mean().item()
                 for m in finetunes[:2]]
    differing = (ours != exact).float().mean().item()
    print(f"\nties vs whole-tensor ties (exact thresholds): {differing:.3%} of the entries differ (those whose "
          f"|τ| lies between the sampled and the exact threshold); kept shares with the sampled thresholds "
          f"{', '.join(f'{k:.4f}' for k in kept_ours)} (requested 0.2000)")


if __name__ == "__main__":
    main()
