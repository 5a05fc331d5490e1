"""Our schedules and samplers against diffusers' schedulers with SDXL's scheduler config: the same timesteps and
sigmas (normal and Karras spacing, ε and v, zero terminal SNR), and the same trajectory step by step for the
same model function and noise."""
from __future__ import annotations

import pytest
import torch

from lineage.train.samplers import SAMPLERS
from lineage.train.schedules import (
    DPM_SOLVER_SPACING,
    EULER_SPACING,
    alphas_cumprod,
    make_schedule,
    scaled_linear_betas,
)

diffusers = pytest.importorskip("diffusers")

# SDXL 1.0 base's scheduler_config.json (the fields that matter to the math)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading")
REFERENCE = {"euler": diffusers.EulerDiscreteScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler,
             "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
CASES = [(sampler, karras, prediction, ztsnr)
         for sampler in REFERENCE for karras in (False, True) for prediction, ztsnr in
         (("epsilon", False), ("v", False), ("v", True))]


def reference_scheduler(sampler: str, karras: bool, prediction: str, ztsnr: bool):
    config = dict(SDXL_SCHEDULER, prediction_type="v_prediction" if prediction == "v" else "epsilon",
                  rescale_betas_zero_snr=ztsnr, timestep_spacing="trailing" if ztsnr else "leading")
    if sampler == "dpmpp_2m":
        config.update(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)
    if karras and sampler != "euler_a":  # diffusers' ancestral Euler has no Karras option: see the test
        config["use_karras_sigmas"] = True
    return REFERENCE[sampler](**config)


def ours(sampler: str, steps: int, karras: bool, ztsnr: bool):
    return make_schedule(steps, karras=karras, spacing="trailing" if ztsnr else "leading", zero_terminal_snr=ztsnr,
                         layout=SAMPLERS[sampler].spacing)


def test_training_table_equals_diffusers():
    reference = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER)
    torch.testing.assert_close(scaled_linear_betas(), reference.betas, rtol=0, atol=0)
    torch.testing.assert_close(alphas_cumprod(), reference.alphas_cumprod, rtol=0, atol=0)
    rescaled = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER, rescale_betas_zero_snr=True)
    torch.testing.assert_close(alphas_cumprod(zero_terminal_snr=True), rescaled.alphas_cumprod, rtol=1e-6, atol=1e-9)
    assert alphas_cumprod(zero_terminal_snr=True)[-1] == 2.0 ** -24  # σ_T = 4096, not infinity


@pytest.mark.parametrize("steps", [1, 7, 28, 50])
@pytest.mark.parametrize("sampler,karras,prediction,ztsnr", CASES)
def test_timesteps_and_sigmas_equal_diffusers(sampler, karras, prediction, ztsnr, steps):
    if sampler == "euler_a" and karras:
        pytest.skip("diffusers' EulerAncestralDiscreteScheduler has no Karras option (trajectory test covers it)")
    if sampler == "dpmpp_2m" and karras and steps == 1:
        pytest.skip("one Karras step is degenerate in diffusers' DPM-Solver (0/0 in its λ spacing)")
    reference = reference_scheduler(sampler, karras, prediction, ztsnr)
    reference.set_timesteps(steps)
    schedule = ours(sampler, steps, karras, ztsnr)
    torch.testing.assert_close(schedule.timesteps, reference.timesteps.float(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(schedule.sigmas, reference.sigmas.float(), rtol=1e-5, atol=1e-6)
    if sampler != "dpmpp_2m":
        assert schedule.initial_noise_scale == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)


def test_spacings_differ_where_diffusers_differs():
    """Euler's leading spacing divides T by N, DPM-Solver's by N+1: 28 steps start at 946 and 953."""
    assert make_schedule(28, layout=EULER_SPACING).timesteps[0] == 946
    assert make_schedule(28, layout=DPM_SOLVER_SPACING).timesteps[0] == 953
    assert make_schedule(28, spacing="trailing", zero_terminal_snr=True).sigmas[0] == pytest.approx(4096, rel=1e-5)


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, t-dependent stand-in for a UNet, so every step's arithmetic shows in the result."""
    return torch.tanh(x * 0.7 + 0.3 * torch.sin(x.flip(-1))) * (0.5 + t.float() / 2000)


@pytest.mark.parametrize("sampler,karras,prediction,ztsnr", CASES)
def test_trajectory_equals_diffusers(sampler, karras, prediction, ztsnr):
    steps = 9
    reference = reference_scheduler(sampler, karras, prediction, ztsnr)
    reference.set_timesteps(steps)
    schedule = ours(sampler, steps, karras, ztsnr)
    if sampler == "euler_a" and karras:  # run diffusers' ancestral steps on Euler's Karras schedule, as A1111 does
        euler = reference_scheduler("euler", True, prediction, ztsnr)
        euler.set_timesteps(steps)
        reference.sigmas, reference.timesteps = euler.sigmas, euler.timesteps
    shape = (2, 4, 6, 5)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))

    x = noise * reference.init_noise_sigma
    g = torch.Generator().manual_seed(11)
    for t in reference.timesteps:
        x = reference.step(toy_model(reference.scale_model_input(x, t), t), t, x, generator=g).prev_sample

    mine = torch.Generator().manual_seed(11)
    got = SAMPLERS[sampler].run(toy_model, noise, schedule, prediction,
                                lambda: torch.randn(shape, generator=mine))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    assert got.abs().max() > 0.1  # a real trajectory, not collapsed to zero
