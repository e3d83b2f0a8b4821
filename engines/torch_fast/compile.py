"""How a torch part becomes fast: eager, torch.compile ("jit", the default) or an AOTInductor package ("aoti").

jit: preprocess.sh compiles every part once and saves Inductor's compiled kernels and graphs as one artifact
(`inductor_cache.bin`, torch.compiler's portable cache); initialize() loads it before compiling, so start-up
re-traces but does not re-generate or re-build kernels.
aoti: torch.export + AOTInductor packages (.pt2) per part. On torch 2.11 + H200 loading our package segfaulted in
`aoti_load_package` (seen 2026-11-26), so it is opt-in only.
Compiled artifacts are machine code for one GPU architecture, one torch version, one set of weights and one static
shape set: their manifest key holds all four and a mismatch means a rebuild.
"""

from __future__ import annotations

import enum
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from artifacts import Manifest, atomic_file, library_versions
from profiles.config import parse_choice

# Bump when the parts' code changes in a way that invalidates compiled packages.
PARTS_VERSION = 14


JIT_CACHE = "inductor_cache.bin"


class CompileMode(str, enum.Enum):
    AUTO = "auto"  # jit on a GPU, eager on CPU
    EAGER = "eager"
    JIT = "jit"
    AOTI = "aoti"

    @classmethod
    def parse(cls, value: "str | CompileMode") -> "CompileMode":
        return parse_choice(cls, value, "compile mode")


def _inductor_settings() -> None:
    import torch._inductor.config as cfg

    # No weight freezing: with it the loop was no faster (86.8 vs 86.2 ms on an H200) and Inductor's FX-graph
    # cache is bypassed, so loading the saved kernels took 76 s instead of 12 s.
    cfg.freezing = False
    cfg.triton.cudagraphs = False  # we capture the whole loop ourselves
    # Let pointwise chains grow longer before Inductor stores an intermediate (defaults 30 ops / 8 reads): the
    # decoder's cat + control add + group norm, for one, were split around a stored fp32 intermediate. One H100:
    # loop 71.41 -> 70.86 ms, 14 fewer kernels a step (bench/NOTES.md, session 10).
    cfg.realize_opcount_threshold = 100
    cfg.realize_acc_reads_threshold = 32
    # Experiments: CNRT_INDUCTOR="conv_1x1_as_mm=1,epilogue_fusion=0" sets top-level Inductor options.
    for item in filter(None, os.environ.get("CNRT_INDUCTOR", "").split(",")):
        name, _, value = item.partition("=")
        setattr(cfg, name.strip(), _option_value(value.strip()))


def _option_value(text: str):
    """An Inductor option's value as written in CNRT_INDUCTOR: 0 / 1 are booleans, other numbers ints, else text."""
    if text in ("0", "1"):
        return text == "1"
    try:
        return int(text)
    except ValueError:
        return text


def device_artifact_dir(base: Path, device: torch.device) -> Path:
    """Where the artifacts of one GPU model live: base/<gpu name as a slug> (e.g. nvidia-h100-80gb-hbm3). The
    tuning table and the compiled kernels are specific to the GPU model, so each model keeps its own directory
    and a machine with another GPU does not overwrite (and re-tune over) them. base itself off CUDA."""
    if device.type != "cuda":
        return Path(base)
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return Path(base) / (slug or "cuda")


def artifact_key(profile_name: str, weights_id: str, device: torch.device) -> dict:
    return {
        "profile": profile_name,
        "weights_id": weights_id,
        "parts_version": PARTS_VERSION,
        "versions": library_versions(("torch", "diffusers", "transformers")),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
    }


def _log(msg: str) -> None:
    print(f"[torch-engine] {msg}", file=sys.stderr, flush=True)


class PartCompiler:
    """Compiles named parts in one mode, sharing one artifact directory and manifest."""

    def __init__(self, mode: CompileMode, artifact_dir: Path, key: dict):
        self.mode = mode
        self.artifact_dir = Path(artifact_dir)
        self.key = key
        self.manifest = Manifest.load(self.artifact_dir)
        if self.manifest is None or self.manifest.key != key:
            self.manifest = Manifest(key)
        if mode in (CompileMode.JIT, CompileMode.AOTI):
            _inductor_settings()
        self._cache_loaded = mode is CompileMode.JIT and self._load_jit_cache()

    def _load_jit_cache(self) -> bool:
        if not self.manifest.is_fresh(self.artifact_dir, self.key, ["jit-cache"]):
            return False
        torch.compiler.load_cache_artifacts((self.artifact_dir / JIT_CACHE).read_bytes())
        _log(f"loaded compiled kernels from {self.artifact_dir / JIT_CACHE}")
        return True

    def finish(self) -> None:
        """Call after every part has run once (torch.compile compiles lazily): saves the jit cache artifact."""
        if self.mode is not CompileMode.JIT or self._cache_loaded:
            return
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            _log("torch.compiler saved no cache artifacts: start-up will recompile")
            return
        with atomic_file(self.artifact_dir / JIT_CACHE) as tmp:
            tmp.write_bytes(saved[0])
        self.manifest.record(self.artifact_dir, "jit-cache", self.artifact_dir / JIT_CACHE)
        self.manifest.save(self.artifact_dir)
        _log(f"saved compiled kernels to {self.artifact_dir / JIT_CACHE} ({len(saved[0]) / 2**20:.0f} MiB)")

    def __call__(self, name: str, module: torch.nn.Module, example_args: tuple) -> Callable:
        if self.mode is CompileMode.EAGER:
            return module
        if self.mode is CompileMode.JIT:
            return torch.compile(module, fullgraph=True, dynamic=False)
        return self._aoti(name, module, example_args)

    def _aoti(self, name: str, module: torch.nn.Module, example_args: tuple) -> Callable:
        role = f"aoti:{name}"
        path = self.artifact_dir / f"{name}.pt2"
        if not self.manifest.is_fresh(self.artifact_dir, self.key, [role]):
            start = time.perf_counter()
            _log(f"compiling {name} with AOTInductor (one-off; minutes) ...")
            with torch.no_grad():
                exported = torch.export.export(module, example_args, strict=False)
                with atomic_file(path) as tmp:
                    torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp.with_suffix(".pt2")))
                    tmp.with_suffix(".pt2").replace(tmp)
            self.manifest.record(self.artifact_dir, role, path)
            self.manifest.save(self.artifact_dir)
            _log(f"compiled {name} in {time.perf_counter() - start:.1f} s ({path.stat().st_size / 2**20:.0f} MiB)")
        loaded = torch._inductor.aoti_load_package(str(path))
        return loaded
