"""The interface every backend implements.

A backend turns (weights, profile, device) into an `EngineSet`: the text encoder, the hint encoder, the fused
denoising step and the VAE decoder (with uint8 conversion), all speaking the tensor names and shapes of
`models.step.network_io`.

A `StepRunner` owns static buffers for the per-image inputs. `prepare()` copies new values into them (in place, so
a CUDA graph captured over `step()` sees them); `step(x, k)` runs step k of the DDIM schedule on latent x and
returns x_prev, reading t and the DDIM coefficients from device tables, with no host synchronisation, so a whole
loop of steps can be captured into one CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class StepRunner(Protocol):
    device: torch.device

    def prepare(self, context: torch.Tensor, hint_features: torch.Tensor, guidance_scale: float,
                control_scales: torch.Tensor) -> None:
        """context (2B, 77, D) [cond.., uncond..]; hint_features (B, C0, h, w); control_scales (2, 13)."""

    def step(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """x (B, 4, h, w) float32 -> x_prev for schedule step k (0 = noisiest)."""


@dataclass
class EngineSet:
    """What the pipeline runs. Every callable takes and returns tensors on `device`.

    text:   input_ids (2B, 77) int64 -> context (2B, 77, D) float32
    hint:   hint (B, 3, H, W) float32 -> hint_features (B, C0, h, w) float32
    step:   the fused step (StepRunner)
    decode: latent (B, 4, h, w) float32 -> image (B, H, W, 3) uint8
    """

    text: Callable[[torch.Tensor], torch.Tensor]
    hint: Callable[[torch.Tensor], torch.Tensor]
    step: StepRunner
    decode: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    description: str
    # True when step() may be captured into a CUDA graph (static buffers, no host sync).
    capturable: bool = False
