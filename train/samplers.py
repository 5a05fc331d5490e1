"""Samplers: walk from pure noise to a clean latent along a schedule of sigmas (docs/models.md, "Sampling").

Each sampler asks the model, at every step, what it predicts and turns that into an estimate of the clean
latent x₀; it then moves x towards the next, lower noise level:

- euler: one Euler step of the probability-flow ODE dx/dσ = (x − x₀)/σ, in the variance-exploding view
  x = x₀ + σ·ε (the model sees x/√(σ²+1), the variance-preserving latent it was trained on);
- euler_a: Euler "ancestral": step down past the next sigma to σ_down, then add fresh noise of spread σ_up
  so the total is the next sigma again (different noise draws give different images, hence a generator);
- dpmpp_2m: DPM-Solver++(2M), a second-order multistep solver in log-SNR time λ = log(α/σ) on the
  variance-preserving latent x = α·x₀ + σ·ε, reusing the previous step's x₀; the first step and the last
  (into σ = 0) are first order, as in diffusers with SDXL's config (`lower_order_final`).

The arithmetic follows diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and
DPMSolverMultistepScheduler step for step, so the same model and noise give the same image.
A model predicts either the noise ε ("epsilon") or v = α·ε − σ·x₀ ("v", also for zero-terminal-SNR models).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lineage.train.schedules import DPM_SOLVER_SPACING, EULER_SPACING, Schedule, Spacing

PREDICTIONS = ("epsilon", "v")
# (model input, timestep [1]) -> the model's prediction (ε or v) for that input
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# () -> fresh unit noise shaped like the latents, drawn from each image's own generator
NoiseSource = Callable[[], torch.Tensor]
# (step index, steps) -> None, called after every step (progress bars)
StepCallback = Callable[[int, int], None]


def clean_from_exploding(x: torch.Tensor, output: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """x₀ from x = x₀ + σ·ε and the model's output (the Euler samplers' view)."""
    if prediction == "epsilon":
        return x - sigma * output
    return output * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)


def clean_from_preserving(x: torch.Tensor, output: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                          prediction: str) -> torch.Tensor:
    """x₀ from x = α·x₀ + σ·ε and the model's output (DPM-Solver's view)."""
    if prediction == "epsilon":
        return (x - sigma * output) / alpha
    return alpha * x - sigma * output


def _model_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The variance-preserving latent the model was trained on: x / √(σ² + 1)."""
    return x / (sigma ** 2 + 1) ** 0.5


def sample_euler(model: Model, noise: torch.Tensor, schedule: Schedule, prediction: str,
                 fresh_noise: NoiseSource | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    x = noise * schedule.initial_noise_scale
    steps = len(schedule.timesteps)
    for i in range(steps):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        clean = clean_from_exploding(x, model(_model_input(x, sigma), schedule.timesteps[i]), sigma, prediction)
        x = x + (x - clean) / sigma * (sigma_next - sigma)
        if on_step:
            on_step(i, steps)
    return x


def sample_euler_ancestral(model: Model, noise: torch.Tensor, schedule: Schedule, prediction: str,
                           fresh_noise: NoiseSource | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    if fresh_noise is None:
        raise ValueError("euler_a draws fresh noise every step: pass fresh_noise")
    x = noise * schedule.initial_noise_scale
    steps = len(schedule.timesteps)
    for i in range(steps):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        clean = clean_from_exploding(x, model(_model_input(x, sigma), schedule.timesteps[i]), sigma, prediction)
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - clean) / sigma * (sigma_down - sigma)
        x = x + fresh_noise() * sigma_up
        if on_step:
            on_step(i, steps)
    return x


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The variance-preserving α and σ of an exploding-view sigma: α = 1/√(σ²+1), σ_vp = σ·α."""
    alpha = 1 / (sigma ** 2 + 1) ** 0.5
    return alpha, sigma * alpha


def sample_dpmpp_2m(model: Model, noise: torch.Tensor, schedule: Schedule, prediction: str,
                    fresh_noise: NoiseSource | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    x = noise  # variance-preserving: unit noise is already x_T
    steps = len(schedule.timesteps)
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x₀ estimate, λ) of the step before
    for i in range(steps):
        alpha_s, sigma_s = _alpha_sigma(schedule.sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(schedule.sigmas[i + 1])
        clean = clean_from_preserving(x, model(x, schedule.timesteps[i]), alpha_s, sigma_s, prediction)
        lambda_s = alpha_s.log() - sigma_s.log()
        lambda_t = alpha_t.log() - sigma_t.log()  # +inf into σ = 0: exp(−h) = 0 and x becomes x₀
        h = lambda_t - lambda_s
        first_order = previous is None or i == steps - 1
        x = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * clean
        if not first_order:
            clean_before, lambda_before = previous
            ratio = (lambda_s - lambda_before) / h
            x = x - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * ((1.0 / ratio) * (clean - clean_before))
        previous = clean, lambda_s
        if on_step:
            on_step(i, steps)
    return x


@dataclass(frozen=True)
class Sampler:
    label: str  # as A1111 names it in an image's parameters
    spacing: Spacing  # which of diffusers' schedule variants it runs on
    run: Callable[..., torch.Tensor]
    stochastic: bool = False  # draws fresh noise every step


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler("Euler", EULER_SPACING, sample_euler),
    "euler_a": Sampler("Euler a", EULER_SPACING, sample_euler_ancestral, stochastic=True),
    "dpmpp_2m": Sampler("DPM++ 2M", DPM_SOLVER_SPACING, sample_dpmpp_2m),
}
