"""Our SDXL UNet (train/unet.py) beside diffusers' UNet2DConditionModel, same config, same run.

    python benchmarks/bench_unet.py [--part mid|full|both] [--rounds 3] [--steps 3] [--threads N] [--device cpu]
                                    [--dtype fp32 [bf16 fp16]]

Part `mid`: a mid-size UNet (SDXL's structure at 128 base channels, transformer depths 0/2/4, SDXL's
2048-wide context and 2816-wide ADM input; 248M parameters) trained for a step in fp32: forward, MSE
loss, backward, on a batch of 1 at a 32x32 latent (a 256x256 image). Both models get the same weights:
ours are initialised from a seed and written as a single file, diffusers loads that file through its
own converter (`convert_ldm_unet_checkpoint`), and the two outputs are compared.

Part `full`: the full-size SDXL UNet (2.57G parameters, fp32) forward at a 64x64 latent (512x512), batch 1, under
no_grad: seconds per step, as a sampler would run it. Weights are seeded normal values (the speed does
not depend on them), built on the meta device and filled in place.

`--dtype`: the weights, inputs and activations in each dtype given (fp32 by default), both implementations in
the same dtype; with several, the table also gives each dtype's time and memory beside our fp32 run
(what `lmerge sample --dtype` trades: bf16 halves the weights; its speed depends on the CPU's bf16 support).

Every measurement runs in its own subprocess, ours and diffusers alternately (in the order ABBA...); the table
gives medians over the rounds of the median step time, of the resident memory once the model is loaded, and
of the peak resident memory above it (the kernel's high-water mark, reset once the model is in memory:
activations, gradients and allocator slack).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from lineage.train.unet import UNet, UNetConfig, timestep_embedding

CONFIGS = {
    "mid": UNetConfig(model_channels=128, transformer_depth=(0, 2, 4)),
    "full": UNetConfig(),
}
LATENT = {"mid": 32, "full": 64}  # latent side; the image is 8 times larger (256x256, 512x512)
POOLED = 1280  # OpenCLIP-G's pooled width; the rest of the 2816 ADM input is six 256-wide size embeddings
IMPLEMENTATIONS = ("ours", "diffusers")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inputs(c: UNetConfig, latent: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The same inputs for both, in the models' dtype; the timestep and the six size values stay fp32 (both
    turn them into sinusoidal embeddings in fp32 and cast those)."""
    g = torch.Generator().manual_seed(0)
    values = {"x": torch.randn(1, c.in_channels, latent, latent, generator=g), "t": torch.tensor([500.0]),
              "context": torch.randn(1, 77, c.context_dim, generator=g), "pooled": torch.randn(1, POOLED, generator=g),
              "size_values": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]),
              "target": torch.randn(1, c.out_channels, latent, latent, generator=g)}
    return {k: v.to(device, dtype if k in ("x", "context", "pooled", "target") else torch.float32)
            for k, v in values.items()}


def model_call(name: str, model: torch.nn.Module, c: UNetConfig, v: dict[str, torch.Tensor]):
    """A closure running one forward pass of either implementation on the same inputs."""
    if name == "ours":
        size_embedding = timestep_embedding(v["size_values"].flatten(), (c.adm_in_channels - POOLED) // 6)
        y = torch.cat([v["pooled"], size_embedding.reshape(1, -1).to(v["pooled"].dtype)], dim=1)
        return lambda: model(v["x"], v["t"], v["context"], y)
    added = {"text_embeds": v["pooled"], "time_ids": v["size_values"]}
    return lambda: model(v["x"], v["t"], encoder_hidden_states=v["context"], added_cond_kwargs=added).sample


def build(name: str, part: str, weights: str | None, device: str, dtype: torch.dtype) -> torch.nn.Module:
    c = CONFIGS[part]
    if weights is None:  # full size: seeded values filled in place, no file
        with torch.device("meta"):
            model = UNet(c) if name == "ours" else diffusers_model(c)
        model = model.to(dtype).to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02, generator=g)
        return model
    from lineage.io.safetensors import SafetensorsFile
    with SafetensorsFile(weights) as f:
        state = dict(f.items())
    if name == "ours":
        model = UNet(c)
        model.load_state_dict(state, strict=True)
    else:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
        model = diffusers_model(c)
        prefixed = {"model.diffusion_model." + k: v for k, v in state.items()}
        model.load_state_dict(convert_ldm_unet_checkpoint(prefixed, dict(model.config)), strict=True)
    del state
    return model.to(device, dtype)


def diffusers_model(c: UNetConfig) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**c.diffusers_kwargs(POOLED))


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(args: argparse.Namespace) -> None:
    """Time `--steps` steps of one implementation (after one warm-up) and print a JSON line."""
    torch.set_num_threads(args.threads)
    c = CONFIGS[args.part]
    dtype = DTYPES[args.dtype[0]]
    model = build(args.impl, args.part, args.weights, args.device, dtype)
    v = inputs(c, LATENT[args.part], args.device, dtype)
    run = model_call(args.impl, model, c, v)
    training = args.part == "mid"
    model.train(training)

    def step() -> torch.Tensor:
        if not training:
            with torch.no_grad():
                return run()
        model.zero_grad(set_to_none=True)
        out = run()
        torch.nn.functional.mse_loss(out.float(), v["target"].float()).backward()
        return out.detach()

    loaded = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak (VmHWM) to the current RSS
        f.write("5")
    if args.device == "cuda":  # the same "above the loaded model" on the GPU
        torch.cuda.reset_peak_memory_stats()
        loaded_on_gpu = torch.cuda.memory_allocated()
    out = step()
    if args.output:
        torch.save(out.float().cpu(), args.output)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = ((torch.cuda.max_memory_allocated() - loaded_on_gpu) / 2**20 if args.device == "cuda"
            else (resident_kib("VmHWM") - loaded) / 1024)
    print(json.dumps({"seconds": statistics.median(times), "peak_mib": peak, "loaded_mib": loaded / 1024,
                      "parameters": sum(p.numel() for p in model.parameters())}))


def measure(impl: str, part: str, dtype: str, args: argparse.Namespace, weights: str | None,
            output: str | None) -> dict:
    command = [sys.executable, __file__, "--worker", impl, "--part", part, "--steps", str(args.steps),
               "--threads", str(args.threads), "--device", args.device, "--dtype", dtype]
    command += ["--weights", weights] if weights else []
    command += ["--output", output] if output else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{impl} {part} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(part: str, args: argparse.Namespace, scratch: str) -> None:
    weights = None
    if part == "mid":
        torch.manual_seed(0)
        weights = os.path.join(scratch, "mid-unet.safetensors")
        from lineage.io.safetensors import save_file
        save_file({k: t.contiguous() for k, t in UNet(CONFIGS[part]).state_dict().items()}, weights)
    runs = [(impl, dtype) for dtype in args.dtype for impl in IMPLEMENTATIONS]
    outputs = {run: os.path.join(scratch, f"{run[0]}-{run[1]}.pt") for run in runs} if weights else {}
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    for round_ in range(args.rounds):
        # ABBA order: a machine growing busier or quieter during the run favours neither implementation nor dtype
        for impl, dtype in runs if round_ % 2 == 0 else reversed(runs):
            output = outputs.get((impl, dtype)) if round_ == 0 else None
            results[impl, dtype].append(measure(impl, part, dtype, args, weights, output))
    side = LATENT[part]
    what = (f"forward+backward, batch 1, {side}x{side} latent" if part == "mid"
            else f"forward (no_grad), batch 1, {side}x{side} latent")
    params = results[runs[0]][0]["parameters"]
    print(f"\n{part}: {params / 1e6:,.0f}M parameters, {what}, {args.rounds} rounds x {args.steps} steps, "
          f"{args.threads} threads, {args.device}")
    beside_fp32 = len(args.dtype) > 1 and "fp32" in args.dtype
    extra = " time vs ours fp32 | loaded + peak memory vs ours fp32 |" if beside_fp32 else ""
    print(f"| implementation | dtype | s / step | MiB with the model loaded | peak MiB above the model "
          f"| time vs diffusers | peak memory vs diffusers |{extra}")
    print("|---|---|---|---|---|---|---|" + ("---|---|" if beside_fp32 else ""))
    medians = {run: {key: statistics.median(r[key] for r in rs) for key in ("seconds", "loaded_mib", "peak_mib")}
               for run, rs in results.items()}
    for (impl, dtype), m in medians.items():
        ref = medians["diffusers", dtype]
        line = (f"| {impl} | {dtype} | {m['seconds']:.3f} | {m['loaded_mib']:,.0f} | {m['peak_mib']:,.0f} "
                f"| {m['seconds'] / ref['seconds']:.2f}x | {m['peak_mib'] / ref['peak_mib']:.2f}x |")
        if beside_fp32:  # here the weights count too: halving them is what bf16 is for
            base = medians["ours", "fp32"]
            total = (m["loaded_mib"] + m["peak_mib"]) / (base["loaded_mib"] + base["peak_mib"])
            line += f" {m['seconds'] / base['seconds']:.2f}x | {total:.2f}x |"
        print(line)
    for dtype in args.dtype if outputs else ():
        ours, reference = (torch.load(outputs[impl, dtype]) for impl in IMPLEMENTATIONS)
        error = ((ours - reference).abs().max() / reference.abs().max()).item()
        print(f"{dtype}, same weights, same inputs: max relative difference of the outputs {error:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("mid", "full", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["fp32"],
                        help="Measure in each of these dtypes (both implementations in the same one).")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.impl = args.worker
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-unet-") as scratch:
        for part in ("mid", "full") if args.part == "both" else (args.part,):
            benchmark(part, args, scratch)


if __name__ == "__main__":
    main()
