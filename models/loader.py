"""Weights sources -> ModelBundle.

Three sources, one result:
- `synthetic` / `synthetic-tiny` (optionally `synthetic-tiny:SEED`): seeded random weights of the real (or tiny)
  architecture, generated once into a diffusers folder under the cache;
- a diffusers-format folder with `unet/ controlnet/ vae/ text_encoder/` (each a `save_pretrained` output);
- an original ControlNet checkpoint (`control_sd15_canny.pth` / `.ckpt` / `.safetensors`, LDM key names).
The architecture always comes from the weights, so tiny test models go through the same code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from artifacts import file_sha256
from models.bundle import ModelBundle
from models.synthetic import SUBFOLDERS, ensure_synthetic_folder, synthetic_weights_id
from profiles.errors import ControlNetRTError

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "build" / "weights"
CHECKPOINT_SUFFIXES = (".pth", ".ckpt", ".safetensors", ".pt")
_SYNTHETIC_ARCH = {"synthetic": "sd15", "synthetic-tiny": "tiny"}


def describe_sources() -> str:
    return ("'synthetic', 'synthetic-tiny' (add ':SEED' for another seed), a diffusers folder with "
            "unet/ controlnet/ vae/ text_encoder/, or an LDM checkpoint (.pth/.ckpt/.safetensors)")


def resolve_weights_id(source: str, cache_root: "str | Path | None" = None) -> str:
    """The content hash artifacts are keyed on, without loading the networks."""
    kind, arg = _parse(source)
    if kind == "synthetic":
        return synthetic_weights_id(*arg)
    return _fingerprint(Path(arg), Path(cache_root or DEFAULT_CACHE))


def load_bundle(source: str, cache_root: "str | Path | None" = None) -> ModelBundle:
    cache_root = Path(cache_root or DEFAULT_CACHE)
    kind, arg = _parse(source)
    if kind == "synthetic":
        arch, seed = arg
        folder = ensure_synthetic_folder(arch, seed, cache_root)
        nets = load_diffusers_folder(folder)
        weights_id = synthetic_weights_id(arch, seed)
    elif kind == "folder":
        nets = load_diffusers_folder(arg)
        weights_id = _fingerprint(arg, cache_root)
    else:
        from models.ldm_checkpoint import load_ldm_checkpoint

        nets = load_ldm_checkpoint(arg)
        weights_id = _fingerprint(arg, cache_root)
    for net in nets.values():
        net.eval().requires_grad_(False)
    return ModelBundle(**nets, weights_id=weights_id, source=str(source))


def _parse(source: str):
    name, _, seed = str(source).partition(":")
    if name in _SYNTHETIC_ARCH:
        try:
            return "synthetic", (_SYNTHETIC_ARCH[name], int(seed) if seed else 0)
        except ValueError:
            raise ControlNetRTError(f"bad synthetic seed in {source!r}: use e.g. 'synthetic-tiny:3'") from None
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ControlNetRTError(f"weights file {path} has an unknown suffix: expected one of {CHECKPOINT_SUFFIXES}")
        return "checkpoint", path
    raise ControlNetRTError(f"weights {source!r} not found: pass {describe_sources()}")


def load_diffusers_folder(folder: "str | Path") -> dict:
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    missing = [name for name in SUBFOLDERS if not (folder / name / "config.json").is_file()]
    if missing:
        raise ControlNetRTError(
            f"weights folder {folder} lacks {', '.join(m + '/config.json' for m in missing)}: it must hold the "
            "save_pretrained() output of unet, controlnet, vae and text_encoder")
    classes = {"unet": UNet2DConditionModel, "controlnet": ControlNetModel, "vae": AutoencoderKL,
               "text_encoder": CLIPTextModel}
    nets = {}
    for name, cls in classes.items():
        try:
            nets[name] = cls.from_pretrained(folder / name, local_files_only=True)
        except Exception as exc:  # diffusers/transformers/safetensors raise many types for bad files
            raise ControlNetRTError(f"cannot load {folder / name}: {type(exc).__name__}: {exc}. "
                                    "Re-export it with save_pretrained() or pass other weights") from exc
    return nets


def _fingerprint(path: Path, cache_root: Path) -> str:
    """sha256 over the weight files (names + contents), cached by (size, mtime) so it is computed once."""
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    cache_file = cache_root / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    import hashlib

    digest = hashlib.sha256()
    changed = False
    for f in files:
        stat = f.stat()
        key = f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            cache[key] = file_sha256(f)
            changed = True
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{cache[key]}\n".encode())
    if changed:
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    return "sha256-" + digest.hexdigest()[:16]
