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
import functools
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from artifacts import Manifest, atomic_file, library_versions
from engines.torch_fast import pdl
from profiles.config import parse_choice

# Bump when the parts' code changes in a way that invalidates compiled packages.
PARTS_VERSION = 21  # 21: the opt-in group-major conv1 (20) removed again: the launch operator's old signature
# 20: cnrt::conv2d_launch took out_cpg (group-major partial sums, opt-in)
# 19: finer split reductions (FinerSplits) by default


JIT_CACHE = "inductor_cache.bin"
SPLIT_RUN = int(os.environ.get("CNRT_INDUCTOR_SPLIT_RUN", "1024"))  # `FinerSplits`' run; 0: Inductor's own splits


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
    # Experiments: CNRT_INDUCTOR="conv_1x1_as_mm=1,triton.cooperative_reductions=1" sets Inductor options (a dotted
    # name reaches into a sub-config).
    for item in filter(None, os.environ.get("CNRT_INDUCTOR", "").split(",")):
        name, _, value = item.partition("=")
        *path, leaf = name.strip().split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, _option_value(value.strip()))
    # Reductions Inductor splits are split into runs of at most SPLIT_RUN elements (FinerSplits; 0: Inductor's own
    # splits). One H100, same machine: loop 63.85 against 64.15 ms, Inductor's kernels 13.91 against 14.46 ms
    # (bench/NOTES.md, twenty-fourth session).
    if SPLIT_RUN > 0:
        use_finer_splits(SPLIT_RUN)
    if pdl.REQUESTED:
        _enable_inductor_pdl()


try:
    from torch._inductor.choices import InductorChoices
except ImportError:  # pragma: no cover - older torch
    InductorChoices = object


def use_finer_splits(run: int) -> None:
    """FinerSplits(run) for every compile from here on: as Inductor's choices factory (its uuid then enters the
    cache key) and as this thread's choices handler, which Inductor creates once a thread from the factory, so that
    a process that compiled something before (the bench's torch.compile baseline) switches too."""
    import torch._inductor.config as cfg
    from torch._inductor.virtualized import V

    if InductorChoices is object or not hasattr(cfg, "inductor_choices_class"):
        _log("this Inductor takes no choices class: its own split reductions stay")
        return
    cfg.inductor_choices_class = functools.partial(FinerSplits, run)
    V.set_choices_handler(FinerSplits(run))


class FinerSplits(InductorChoices):
    """Inductor's choices, except that a reduction it splits anyway is split into runs of at most `run` elements
    (CNRT_INDUCTOR_SPLIT_RUN, default 1024): more programs for the group norms' statistics, which the twenty-third
    session's profile found 2-3x slower in the step than their bytes (Inductor ran them as one or two programs a
    (image, group), each walking 7680-15360 elements; a 15360-element group now takes 15 programs). Reductions
    Inductor keeps whole stay whole, and so do reductions of more than MAX_ELEMENTS: the step's largest group is
    46080 elements (2x960x32x48), while the VAE decoder's larger maps have 98304 or more a group, where the A/B
    that kept this (the loop only) says nothing. Its uuid puts the run into Inductor's cache key."""

    MAX_ELEMENTS = 65536

    def __init__(self, run: int):
        super().__init__()
        self.run = run

    def reduction_split_factor(self, device, reduction_numel_hint: int, numel_hint: int,
                               inner_reduction: bool) -> int:
        split = InductorChoices.reduction_split_factor(device, reduction_numel_hint, numel_hint, inner_reduction)
        if split <= 1 or reduction_numel_hint > self.MAX_ELEMENTS:
            return split
        return max(split, -(-reduction_numel_hint // self.run))

    def uuid(self) -> str:
        return f"cnrt-finer-splits-{self.run}-max-{self.MAX_ELEMENTS}"


def _enable_inductor_pdl() -> None:
    """Inductor's programmatic dependent launch with a wait before EVERY kernel's first memory access.

    Inductor's own rule (TORCHINDUCTOR_ENABLE_PDL=1) waits only where a kernel touches what the kernel right before
    it wrote. A kernel that skips the wait lets its dependents start while an older kernel may still be writing:
    the eighth session measured the captured loop drifting from the eager one that way. With a wait in every
    kernel, each kernel touches memory only after the one before has finished, so the order is a plain stream's;
    what PDL still overlaps is the launch and the code before the first access. The patched code generator is
    marked in Inductor's cache key (`_PdlCacheMarker`), so a kernel generated by Inductor's own rule is never loaded
    from its cache in its place. On with our kernels' PDL (`pdl.REQUESTED`, CNRT_PDL)."""
    import torch._inductor.config as cfg
    from torch._inductor.codegen import triton as triton_codegen

    kernel_class = triton_codegen.TritonKernel
    if not hasattr(kernel_class, "_handle_pdl_before_access"):  # another Inductor: leave PDL off
        _log("this Inductor has no _handle_pdl_before_access: its kernels launch without PDL")
        return
    cfg.triton.enable_pdl = True
    kernel_class._handle_pdl_before_access = wait_before_first_access
    cfg.post_grad_custom_post_pass = _PdlCacheMarker()


def wait_before_first_access(self, wait_buffer, *dependencies, consider_reads=False) -> None:
    """TritonKernel._handle_pdl_before_access that always waits (Inductor hoists the wait before a reduction loop,
    and keeps only a kernel's first one)."""
    if not self._enable_pdl_codegen():
        return
    if self.inside_reduction and self.range_trees[-1].is_loop:
        wait_buffer = self.body
    wait_buffer.writeline(self.GDC_WAIT)


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - older torch
    CustomGraphPass = object


class _PdlCacheMarker(CustomGraphPass):
    """A post-grad pass that changes nothing; its uuid puts "every kernel waits" into Inductor's cache key."""

    def __call__(self, graph) -> None:
        return None

    def uuid(self) -> str:
        return "cnrt-pdl-wait-before-first-access-1"


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
        # What the directory held before, whatever its key (`runner._tuning_table` may still use its table)
        self.previous = Manifest.load(self.artifact_dir)
        self.manifest = self.previous
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
