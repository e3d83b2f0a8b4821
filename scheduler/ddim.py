"""The exact DDIM schedule of ControlNet's `cldm/ddim_hacked.py`, as device-side tables.

Everything is computed the way the original computes it (float64 beta schedule made with torch.linspace, cumprod,
stored as float32; DDIM coefficients taken from the float32 cumprod), so the reference pipeline and every fused
backend read the same numbers. The tables are indexed by the step number k = 0..steps-1 in *sampling* order
(k = 0 is t = 951 for 20 steps), which lets one captured CUDA graph replay every step without Python floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from profiles.errors import ControlNetRTError

# models/cldm_v15.yaml
LINEAR_START = 0.00085
LINEAR_END = 0.0120
NUM_TRAIN_TIMESTEPS = 1000


def alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """ldm `register_schedule` with the "linear" beta schedule: float64 maths, stored as float32."""
    betas = torch.linspace(LINEAR_START**0.5, LINEAR_END**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    cumprod = torch.cumprod(1.0 - betas, dim=0)
    return cumprod.to(torch.float32)


def ddim_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """`make_ddim_timesteps(..., "uniform")`: range(0, T, T // steps) + 1, in ascending order."""
    if not 1 <= steps <= num_train_timesteps:
        raise ControlNetRTError(f"ddim_steps must be in 1..{num_train_timesteps}, got {steps}")
    stride = num_train_timesteps // steps
    return [t + 1 for t in range(0, num_train_timesteps, stride)]


@dataclass(frozen=True)
class DDIMTables:
    """Per-step constants in sampling order (k = 0 is the noisiest step).

    timesteps:  (S,) int64   value fed to the networks (951, 901, ..., 1 for 20 steps)
    alphas:     (S,) float32 a_t
    alphas_prev:(S,) float32 a_prev (the last one is alphas_cumprod[0], not 1)
    coeffs:     (S, 4) float32 [sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev)]
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    coeffs: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device) -> "DDIMTables":
        return DDIMTables(*(t.to(device) for t in (self.timesteps, self.alphas, self.alphas_prev, self.coeffs)))


def make_ddim_tables(steps: int = 20, eta: float = 0.0) -> DDIMTables:
    """`make_ddim_sampling_parameters` with eta = 0 (the only value the hackathon and our fused step use)."""
    if eta != 0.0:
        raise ControlNetRTError(f"eta={eta} is not supported: the DDIM tables (and the original run) use eta=0")
    ac = alphas_cumprod()
    ascending = ddim_timesteps(steps)
    a_t = ac[ascending]
    a_prev = torch.cat([ac[:1], ac[ascending[:-1]]])
    # Sampling runs in reverse order; flip once here so every consumer indexes by k.
    timesteps = torch.tensor(ascending[::-1], dtype=torch.int64)
    a_t, a_prev = a_t.flip(0), a_prev.flip(0)
    # The original takes these square roots in float32 (np.sqrt / Tensor.sqrt on float32 buffers).
    coeffs = torch.stack([a_t.sqrt(), (1.0 - a_t).sqrt(), a_prev.sqrt(), (1.0 - a_prev).sqrt()], dim=1)
    return DDIMTables(timesteps, a_t, a_prev, coeffs)


def cfg_mix(e_cond: torch.Tensor, e_uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance exactly as ddim_hacked: e_u + scale * (e_c - e_u)."""
    return e_uncond + scale * (e_cond - e_uncond)


def ddim_update(x: torch.Tensor, e_t: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """`p_sample_ddim` for eps-parameterisation, eta = 0. `coeffs` is one row of DDIMTables.coeffs
    (4 values, any leading shape broadcastable to x after reshaping)."""
    c = coeffs.reshape(-1, 4).to(x.dtype)
    sqrt_at, sqrt_1m_at, sqrt_aprev, sqrt_1m_aprev = (c[:, i].reshape(-1, 1, 1, 1) for i in range(4))
    pred_x0 = (x - sqrt_1m_at * e_t) / sqrt_at
    return sqrt_aprev * pred_x0 + sqrt_1m_aprev * e_t


def control_scales(strength: float, guess_mode: bool, num_controls: int = 13) -> torch.Tensor:
    """ControlLDM's per-residual scales as a (2, 13) table: row 0 for the cond branch, row 1 for uncond.

    Normal mode: strength everywhere. Guess mode: strength * 0.825**(12 - i) for cond, and zeros for uncond,
    which the original gets by not running ControlNet there (adding a zero residual is the same sum).
    """
    if guess_mode:
        cond = torch.tensor([strength * 0.825 ** float(num_controls - 1 - i) for i in range(num_controls)])
        return torch.stack([cond, torch.zeros(num_controls)]).float()
    return torch.full((2, num_controls), float(strength))
