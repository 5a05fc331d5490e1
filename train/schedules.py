"""Noise schedules for sampling SDXL: which timesteps a sampler visits and the noise level (sigma) at each
(docs/models.md, "Sampling").

SDXL was trained as a DDPM over T = 1000 steps with "scaled linear" betas, linspace(√0.00085, √0.012)²;
ᾱ_t is the running product of 1 − β and the noise level of step t, in the variance-exploding view the
samplers work in, is σ_t = √((1 − ᾱ_t) / ᾱ_t). A sampler runs N < T steps: the spacing picks N of the
training timesteps and the sigmas are read off the table (interpolated), or, with Karras spacing, N sigmas
are spaced evenly in σ^(1/7) between the extremes and the timesteps read back from them. A final σ = 0
(the clean image) closes every schedule.

The numbers are the ones diffusers' schedulers compute with SDXL's scheduler config (scaled_linear,
steps_offset = 1, "leading" spacing), so that an image sampled here equals one sampled there. Its Euler
and DPM-Solver schedulers differ in two details, kept as the `Spacing` fields below. A model trained with
zero terminal SNR (ZTSNR) has ᾱ_T = 0, an infinite last sigma; like diffusers we put ᾱ_T = 2⁻²⁴ (σ_T = 4096)
and visit it through "trailing" spacing, which starts at t = 999 ("leading" never reaches the last step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TRAIN_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
STEPS_OFFSET = 1  # SDXL's scheduler config: "leading" timesteps are shifted up by one
KARRAS_RHO = 7.0
ZTSNR_LAST_ALPHA_CUMPROD = 2.0 ** -24  # ᾱ_T stand-in for 0: σ_T = 4096 instead of infinity
SPACINGS = ("leading", "trailing")


def scaled_linear_betas(steps: int = TRAIN_STEPS, start: float = BETA_START, end: float = BETA_END) -> torch.Tensor:
    """SDXL's training betas: evenly spaced in √β."""
    return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float32) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift √ᾱ so the last is 0 and scale it so the first is unchanged (Lin et al. 2023, algorithm 1)."""
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    alphas_cumprod = sqrt_ac ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def alphas_cumprod(*, zero_terminal_snr: bool = False) -> torch.Tensor:
    """ᾱ_t for t = 0 … T−1 (fp32), rescaled to zero terminal SNR when the model was trained that way."""
    betas = scaled_linear_betas()
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    result = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        result[-1] = ZTSNR_LAST_ALPHA_CUMPROD
    return result


def training_sigmas(*, zero_terminal_snr: bool = False) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t) for every training timestep, increasing with t."""
    ac = alphas_cumprod(zero_terminal_snr=zero_terminal_snr)
    return ((1 - ac) / ac) ** 0.5


@dataclass(frozen=True)
class Spacing:
    """Where diffusers' Euler-family and DPM-Solver schedulers part ways."""

    leading_extra_step: bool  # "leading" divides T by N+1 and drops the lowest timestep (DPM-Solver), or by N
    karras_over_table: bool  # Karras sigmas span the whole training table (DPM-Solver) or the N chosen steps
    integer_timesteps: bool  # timesteps read back from Karras sigmas are rounded (DPM-Solver)


EULER_SPACING = Spacing(leading_extra_step=False, karras_over_table=False, integer_timesteps=False)
DPM_SOLVER_SPACING = Spacing(leading_extra_step=True, karras_over_table=True, integer_timesteps=True)


@dataclass(frozen=True)
class Schedule:
    """The N timesteps a sampler visits (descending) and N+1 sigmas, the last 0."""

    timesteps: torch.Tensor  # [N] float32
    sigmas: torch.Tensor  # [N+1] float32
    spacing: str  # leading | trailing

    @property
    def initial_noise_scale(self) -> float:
        """How much to scale unit noise to start from, in the variance-exploding view of the Euler samplers.
        diffusers scales by √(σ_max² + 1), the true spread of x_T/√ᾱ_T, for "leading" spacing but by σ_max for
        "trailing"; we follow it so images match (the two differ by under 1e-7 relative at ZTSNR's σ = 4096)."""
        top = self.sigmas.max().item()
        return top if self.spacing == "trailing" else (top ** 2 + 1) ** 0.5


def spaced_timesteps(steps: int, spacing: str, layout: Spacing) -> torch.Tensor:
    """N training timesteps, descending, as float64 (integers)."""
    if spacing == "leading":
        slots = steps + 1 if layout.leading_extra_step else steps
        chosen = torch.arange(slots, dtype=torch.float64) * (TRAIN_STEPS // slots) + STEPS_OFFSET
        return chosen.flip(0)[:steps]
    if spacing == "trailing":
        return (torch.arange(TRAIN_STEPS, 0, -TRAIN_STEPS / steps, dtype=torch.float64).round() - 1)[:steps]
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """N sigmas from sigma_max down to sigma_min, evenly spaced in σ^(1/ρ) (Karras et al. 2022)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (high + ramp * (low - high)) ** rho


def sigma_to_timestep(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The fractional training timestep of each sigma: linear interpolation in log σ over the table."""
    log_table = table.double().log()
    log_sigma = sigma.double().clamp(min=1e-10).log()
    below = (log_sigma[None, :] >= log_table[:, None]).sum(0).clamp(min=1, max=len(table) - 1) - 1
    low, high = log_table[below], log_table[below + 1]
    weight = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return below + weight


def make_schedule(steps: int, *, karras: bool = False, spacing: str = "leading", zero_terminal_snr: bool = False,
                  layout: Spacing = EULER_SPACING) -> Schedule:
    """The timesteps and sigmas of an N-step sampler run (see the module docstring)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    table = training_sigmas(zero_terminal_snr=zero_terminal_snr).double()
    timesteps = spaced_timesteps(steps, spacing, layout)
    sigmas = _interpolate(timesteps, table)
    if karras:
        low, high = (table[0], table[-1]) if layout.karras_over_table else (sigmas[-1], sigmas[0])
        sigmas = karras_sigmas(low.item(), high.item(), steps)
        timesteps = sigma_to_timestep(sigmas.float(), table.float())
        if layout.integer_timesteps:
            timesteps = timesteps.round()
    closing = torch.zeros(1, dtype=torch.float64)
    return Schedule(timesteps.float(), torch.cat([sigmas, closing]).float(), spacing)


def _interpolate(timesteps: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The table's sigma at fractional timesteps (linear between neighbours)."""
    below = timesteps.floor().long().clamp(max=len(table) - 2)
    weight = timesteps - below
    return table[below] * (1 - weight) + table[below + 1] * weight
