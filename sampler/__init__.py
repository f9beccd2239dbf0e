"""DDIM and DDPM sampling and inversion for the SD-2.1 schedule: pure tensor math, models come in as functions."""

from sampler.schedule import Schedule
from sampler.ddim import (
    add_noise,
    classifier_free_guidance,
    ddim_inversion_step,
    ddim_step,
    invert,
    inversion_timesteps,
    predict_x0_and_eps,
    sample,
    sdedit_first_step,
    sdedit_start,
    state_dtype,
)
from sampler.ddpm import (
    ddpm_invert,
    ddpm_noise_map,
    ddpm_sample,
    ddpm_step,
    draw_version_noise,
    noisy_versions,
)

__all__ = [
    "Schedule",
    "add_noise",
    "classifier_free_guidance",
    "ddim_inversion_step",
    "ddim_step",
    "ddpm_invert",
    "ddpm_noise_map",
    "ddpm_sample",
    "ddpm_step",
    "draw_version_noise",
    "invert",
    "inversion_timesteps",
    "noisy_versions",
    "predict_x0_and_eps",
    "sample",
    "sdedit_first_step",
    "sdedit_start",
    "state_dtype",
]
