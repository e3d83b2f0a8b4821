"""DDIM (ddim_hacked) schedule tables, the CFG mix and the DDIM update."""

from scheduler.ddim import (
    DDIMTables,
    alphas_cumprod,
    cfg_mix,
    control_scales,
    ddim_timesteps,
    ddim_update,
    make_ddim_tables,
)

__all__ = [
    "DDIMTables",
    "alphas_cumprod",
    "cfg_mix",
    "control_scales",
    "ddim_timesteps",
    "ddim_update",
    "make_ddim_tables",
]
