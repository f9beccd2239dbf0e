"""The SD-2.1 noise schedule: betas -> cumulative alphas, and the DDIM timestep grid.

Everything a DDIM step needs from the schedule is alpha_bar_t = prod_{s<=t} (1 - beta_s)
(`alphas_cumprod`), the alpha used "after the last step" (`final_alpha_cumprod`), and which
training timesteps an N-step run visits (`timesteps`). Numbers follow the diffusers DDIM
scheduler bit for bit (float32 betas and cumprod, the same integer grids) so sampled latents agree
with the reference to 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class Schedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # "epsilon" (SD-2.1 base, 512) or "v_prediction" (SD-2.1, 768)
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    # derived once in __post_init__, float32 [num_train_timesteps]
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"Schedule: unknown beta_schedule {self.beta_schedule!r}; supported: {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Schedule: unknown prediction_type {self.prediction_type!r}; supported: {PREDICTION_TYPES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"Schedule: unknown timestep_spacing {self.timestep_spacing!r}; supported: {TIMESTEP_SPACINGS}"
            )
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError(f"Schedule: num_train_timesteps must be a positive int, got {self.num_train_timesteps!r}")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"Schedule: steps_offset must be a non-negative int, got {self.steps_offset!r}")
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        else:
            # "scaled_linear" (the ldm schedule): linear in sqrt(beta), squared.
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        # float32 on purpose: the reference computes the cumprod in float32, and the parity tests
        # hold to 1e-6 only if the rounding is the same.
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    @classmethod
    def from_scheduler_config(cls, d: dict) -> "Schedule":
        """Build from a diffusers `scheduler/scheduler_config.json` dict (DDIM or PNDM class alike:
        only the beta schedule matters). Keys that are missing take the SD-2.1 defaults above;
        bookkeeping keys (`_class_name`, `skip_prk_steps`, ...) are ignored; settings that would
        change the math and are not implemented here raise instead of being silently dropped."""
        if not isinstance(d, dict):
            raise ValueError(f"Schedule.from_scheduler_config: expected a dict, got {type(d).__name__}")
        unsupported = {
            "trained_betas": lambda v: v is not None,
            "clip_sample": lambda v: bool(v),  # latents are not in [-1, 1]; SD configs say false
            "thresholding": lambda v: bool(v),
            "rescale_betas_zero_snr": lambda v: bool(v),
        }
        for key, is_bad in unsupported.items():
            if key in d and is_bad(d[key]):
                raise ValueError(f"Schedule.from_scheduler_config: {key}={d[key]!r} is not supported")
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        # alpha_bar "before step 0": what the last DDIM step lands on. SD-2.1 sets it to alpha_bar_0
        # (set_alpha_to_one False), so x_0 keeps a tiny bit of noise scale, as in the reference.
        return torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def alpha_at(self, t) -> torch.Tensor:
        """alpha_bar_t for an int or an integer tensor of timesteps; t < 0 -> final_alpha_cumprod.
        Returns a float32 tensor of t's shape (0-dim for an int) on t's device."""
        n = self.num_train_timesteps
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"alpha_at: timesteps must be an integer tensor, got {t.dtype}")
            if t.numel() and int(t.max()) >= n:
                raise ValueError(f"alpha_at: timestep {int(t.max())} is out of range [0, {n - 1}]")
            table = self.alphas_cumprod.to(t.device)
            final = self.final_alpha_cumprod.to(t.device)
            return torch.where(t >= 0, table[t.clamp(min=0)], final)
        t = int(t)
        if t >= n:
            raise ValueError(f"alpha_at: timestep {t} is out of range [0, {n - 1}]")
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The training timesteps an N-step DDIM run visits, descending (int64 [num_steps]).
        SD-2.1 (leading, offset 1), 50 steps: 981, 961, ..., 21, 1.

        Leading spacing with steps_offset can overflow: N=1000 gives 1..1000 and timestep 1000
        does not exist (diffusers returns it anyway and its step() then fails with an IndexError).
        Here the offset is reduced just enough to keep the largest timestep at
        num_train_timesteps - 1, so 1000 steps visit every training timestep 999..0 once."""
        n = self.num_train_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= n:
            raise ValueError(f"timesteps: num_steps must be an int in [1, {n}], got {num_steps!r}")
        if self.timestep_spacing == "leading":
            ratio = n // num_steps
            offset = min(self.steps_offset, n - 1 - (num_steps - 1) * ratio)
            ts = [i * ratio + offset for i in range(num_steps)]
        elif self.timestep_spacing == "trailing":
            # n, n - n/N, ..., rounded half-to-even, minus one: always ends on n - 1.
            ratio = n / num_steps
            ts = [round(n - i * ratio) - 1 for i in range(num_steps)][::-1]
        else:  # linspace: N points from 0 to n - 1 inclusive, rounded half-to-even
            step = (n - 1) / (num_steps - 1) if num_steps > 1 else 0.0
            ts = [round(i * step) for i in range(num_steps - 1)] + [n - 1 if num_steps > 1 else 0]
        return torch.tensor(ts[::-1], dtype=torch.long)
