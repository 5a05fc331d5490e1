"""Per-tensor cost of the merge methods, and of TIES' magnitude thresholds, on the largest SDXL shapes.

    python benchmarks/bench_methods.py [--threads 1] [--rounds 5] [--methods ties,weighted_sum,...]
                                       [--part methods|thresholds|both]

Part `methods`: the methods of merge/methods.py on fp32 tensors of the largest SDXL UNet weight shape
(1280×10240, 13.1M entries) already in memory (no I/O), alternating the methods round by round; the
median time, ns per entry, the ratio to a plain copy and to the weighted sum (the cheapest method)
measured in the same run, and what that rate means for the ~3.5G parameters of a full SDXL
checkpoint. Two baselines run beside them:
- `copy`: `torch.clone` of one input, the cost of producing any full-size output;
- `ties (whole-tensor)`: TIES written the straightforward way — `torch.kthvalue` thresholds and
  full-size boolean masks (a direct transcription of the paper). Its result is compared with ours.

Part `thresholds`: TIES' statistics (one threshold per fine-tune, density 0.2, two fine-tunes) the
way the merge engine computes them — from each input's whole tensor as stored (fp16) — on the
largest SDXL shapes, exact (the default: a sampled bracket, one counting pass, a small selection),
`threshold="sampled"` (the order statistic of a 262,144-entry sample) and a whole-tensor reference
(`torch.kthvalue` over fp32 magnitudes); then what the sampled thresholds change in the merge, and
the exact path's added cost extrapolated to a full SDXL checkpoint (3.46G of its 3.47G parameters
are in tensors above the sample size).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from lineage.merge import methods

SDXL_PARAMETERS = 3.5e9
SDXL_RANKED_PARAMETERS = 3.46e9  # in tensors larger than the sample (their thresholds need the bracketed pass)
SHAPE = (1280, 10240)
# The largest SDXL tensor shapes: (shape, how many the checkpoint has, what they are).
THRESHOLD_SHAPES = [((49408, 1280), 1, "CLIP-G token embedding"), ((1280, 2560, 3, 3), 2, "UNet conv"),
                    ((1280, 1280, 3, 3), 11, "UNet conv"), ((10240, 1280), 60, "UNet feed-forward"),
                    ((640, 640), 70, "UNet attention (0.4M)")]


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


def median_seconds(run: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def whole_tensor_thresholds(base: torch.Tensor, models: list[torch.Tensor], density: float) -> list[float]:
    """torch.kthvalue over each model's full fp32 magnitudes (the reference)."""
    out = []
    for model in models:
        magnitudes = (model.float() - base.float()).abs_()
        count = max(1, math.floor(density * magnitudes.numel() + 0.5))
        out.append(torch.kthvalue(magnitudes, magnitudes.numel() - count + 1).values.item())
    return out


def bench_thresholds(rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    params = {"density": 0.2}
    print(f"\nTIES thresholds of 2 fine-tunes over a base, density 0.2, from fp16 inputs, {torch.get_num_threads()} "
          f"thread(s), median of {rounds} rounds")
    print("| shape | entries | exact ms | sampled ms | whole-tensor kthvalue ms | exact ns/entry/model | "
          "exact = reference | sampled: kept share |")
    print("|---|---|---|---|---|---|---|---|")
    per_entry = {}
    for shape, count, what in THRESHOLD_SHAPES:
        n = math.prod(shape)
        base = (torch.randn(n, generator=g) * 0.02).half()
        row_scale = torch.linspace(0.2, 3.0, shape[0]).repeat_interleave(n // shape[0])  # rows moved unequally
        models = [(base.float() + torch.randn(n, generator=g) * 1e-3 * row_scale).half() for _ in range(2)]
        statistics_of = methods.get_method("ties").statistics
        exact_s = median_seconds(lambda: statistics_of([base, *models], {**params, "threshold": "exact"}), rounds)
        sampled_s = median_seconds(lambda: statistics_of([base, *models], {**params, "threshold": "sampled"}), rounds)
        reference_s = median_seconds(lambda: whole_tensor_thresholds(base, models, 0.2), max(1, rounds // 2))
        exact = statistics_of([base, *models], {**params, "threshold": "exact"})
        sampled = statistics_of([base, *models], {**params, "threshold": "sampled"})
        shares = [((m.float() - base.float()).abs() >= t).float().mean().item() for m, t in zip(models, sampled)]
        per_entry[shape] = exact_s / n / 2
        print(f"| {'×'.join(map(str, shape))} ({count}× {what}) | {n / 1e6:.1f}M | {exact_s * 1e3:.1f} | "
              f"{sampled_s * 1e3:.1f} | {reference_s * 1e3:.0f} | {exact_s / n / 2 * 1e9:.2f} | "
              f"{exact == whole_tensor_thresholds(base, models, 0.2)} | {', '.join(f'{s:.4f}' for s in shares)} |")

    # What the sampled thresholds change in a merged tensor (fp32 inputs, as the methods see them).
    shape = (10240, 1280)
    base = (torch.randn(shape, generator=g) * 0.02).half().float()
    models = [(base + torch.randn(shape, generator=g) * 1e-3 * torch.linspace(0.2, 3.0, shape[0])[:, None]).half()
              .float() for _ in range(2)]
    exact_merge = methods.ties(base, *models, density=0.2)
    sampled_merge = methods.ties(base, *models, density=0.2, threshold="sampled")
    differing = (exact_merge != sampled_merge).float().mean().item()
    delta = exact_merge - base
    relative = ((sampled_merge - exact_merge).norm() / delta.norm()).item()
    print(f"\nties with sampled vs exact thresholds on {shape[0]}×{shape[1]}: {differing:.3%} of the entries differ, "
          f"relative error of the merged delta {relative:.2%}")
    feed_forward = per_entry[(10240, 1280)]
    full_checkpoint_seconds = feed_forward * 2 * SDXL_RANKED_PARAMETERS
    print(f"exact thresholds for a full SDXL checkpoint (2 fine-tunes): ~{full_checkpoint_seconds:.1f} "
          f"CPU-seconds at the feed-forward rate ({feed_forward * 1e9:.2f} ns per entry and fine-tune), spread over "
          "the merge's workers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the merge engine's workers use 1 each)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--part", choices=("methods", "thresholds", "both"), default="both")
    ap.add_argument("--methods", default="weighted_sum,add_difference,task_arithmetic,train_difference,ties,"
                                          "breadcrumbs,dare_linear,dare_ties,slerp,model_stock,geometric_median,della")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("thresholds", "both"):
        bench_thresholds(args.rounds)
    if args.part in ("methods", "both"):
        bench_methods(args)


def bench_methods(args: argparse.Namespace) -> None:

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
    reference = ties_whole_tensor(base, finetunes[0], finetunes[1], density=0.2)
    differing = (ours != reference).float().mean().item()
    print(f"\nties vs whole-tensor ties: {differing:.4%} of the entries differ (float rounding of the disjoint "
          "mean at most; the thresholds are the same exact order statistics)")


if __name__ == "__main__":
    main()
