"""The torch backend's fast step runner and engine set (fp16, channels_last, compiled parts).

Per step, by default (CNRT_STEP=twin): the UNet encoder and the ControlNet run as ONE batched part
(`twin.TwinEncoder`), then UNetDecoder (with CFG and the DDIM update). CNRT_STEP=streams runs them as two parts,
ControlBranch on a side stream while UNetEncoder runs on the current stream (measured on an H200: 84.4 ms a loop
against 82.0 ms for the twin; bench/NOTES.md).
Per-step inputs are rows of device tables; per-prompt K/V and per-image inputs live in static buffers that
prepare() updates in place, so DenoiseLoop can capture all steps into one CUDA graph.
On a GPU, before compiling, the step's convolutions are swapped for faster kernels where measured so
(`gemm_conv`, `triton_conv`, `conv_tuning`; CNRT_CONV picks the mode).
"""

from __future__ import annotations

import enum
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines.base import EngineSet
from engines.torch_eager import torch_engine_set
from engines.torch_fast.compile import CompileMode, PartCompiler, artifact_key, device_artifact_dir
from engines.torch_fast import conv_tuning, cudnn_conv, folded_cross, residual_gemm, triton_conv
from engines.torch_fast.conv_tuning import ConvShape, TuningTable
from engines.torch_fast.fused_resnet import FusedResnet, can_fuse, fold_conv1_bias, fused_conv2_shape, fused_if_tuned
from engines.torch_fast.gemm_conv import (CudnnGraphConv2d, TritonConv2d, convert_convolutions, pointwise_as_matmul,
                                          record_input_sizes, triton_candidate)
from engines.torch_fast.twin import GROUPS as TWIN_GROUPS
from engines.torch_fast.twin import (TwinEncoder, can_pair, encoder_convolutions, first_pair_input_sizes,
                                    twin_convolutions, twin_kv)
from engines.torch_fast.parts import (ControlBranch, UNetDecoder, UNetEncoder, _resnets_of, cross_attention_kv,
                                      time_table, use_channels_last_group_norm)
from models.bundle import ModelBundle
from models.step import LatentDecoder
from profiles.config import NUM_CONTROLS, Profile, env_flag, parse_choice
from scheduler.ddim import make_ddim_tables


def _copy_into(buffers: "list[torch.Tensor] | None", values: list[torch.Tensor]) -> list[torch.Tensor]:
    if buffers is None or any(b.shape != v.shape for b, v in zip(buffers, values)):
        return [v.clone() for v in values]
    for b, v in zip(buffers, values):
        b.copy_(v)
    return buffers


class FastStepRunner:
    """twin: a TwinEncoder runs the UNet encoder and the ControlNet as one batched part (one stream); without it
    they are two parts on two streams. fused_decoder: the decoder's FusedResnets by resnet index; folded: every
    diffusers ResNet block whose conv1.bias the time tables carry (the fused ones, twin's included)."""

    def __init__(self, bundle: ModelBundle, profile: Profile, device: torch.device, compiler: PartCompiler,
                 twin: "TwinEncoder | None" = None, fused_decoder: "dict[int, FusedResnet] | None" = None,
                 folded: frozenset = frozenset()):
        self.device = device
        self.profile = profile
        self.dtype = next(bundle.unet.parameters()).dtype
        self.cn = ControlBranch(bundle.controlnet, runnable=twin is None)  # with a twin: tables and K/V only
        self.enc = UNetEncoder(bundle.unet, runnable=twin is None)
        self.dec = UNetDecoder(bundle.unet, fused_decoder, latent_size=tuple(profile.latent_shape[-2:]))
        tables = make_ddim_tables(profile.ddim_steps).to(device)
        self.coeffs = tables.coeffs
        self.cn_temb, self.cn.slices = time_table(bundle.controlnet, self.cn.resnets, tables.timesteps)
        self.enc_temb, self.enc.slices = time_table(bundle.unet, self.enc.resnets, tables.timesteps)
        self.dec_temb, self.dec.slices = time_table(bundle.unet, self.dec.resnets, tables.timesteps)
        if folded:
            self.cn_temb = fold_conv1_bias(self.cn_temb, self.cn.slices, self.cn.resnets, folded)
            self.enc_temb = fold_conv1_bias(self.enc_temb, self.enc.slices, self.enc.resnets, folded)
            self.dec_temb = fold_conv1_bias(self.dec_temb, self.dec.slices, self.dec.resnets, folded)
        self.twin = twin
        if twin is not None:
            twin.slices = self.enc.slices
            self.twin_temb = torch.stack([self.enc_temb, self.cn_temb], dim=1).contiguous()  # (S, 2, sum C)
        self.twin_kv = None
        self.side = torch.cuda.Stream(device) if device.type == "cuda" and twin is None else None
        self.context_dim = bundle.context_dim
        self.hint_channels = bundle.controlnet.config.block_out_channels[0]
        self._context = None
        self.cn_kv = self.enc_kv = self.dec_kv = None
        self.hint_features = self.guidance_scale = self.control_scales = None
        self._scales: "tuple | None" = None  # (guidance scale, control scales) in the device buffers
        self._compile(compiler, bundle)

    def _example_inputs(self, bundle: ModelBundle):
        b, c, h, w = self.profile.latent_shape
        x = torch.randn(b, c, h, w, device=self.device)
        context = torch.randn(2 * b, 77, bundle.context_dim, device=self.device, dtype=self.dtype)
        hint = torch.randn(b, bundle.controlnet.config.block_out_channels[0], h, w, device=self.device,
                           dtype=self.dtype)
        return x, context, hint

    @torch.no_grad()
    def _compile(self, compiler: PartCompiler, bundle: ModelBundle) -> None:
        x, context, hint = self._example_inputs(bundle)
        scales = torch.ones(2, NUM_CONTROLS, device=self.device)  # control scales
        cn_kv = cross_attention_kv(self.cn.transformers, context)
        enc_kv = cross_attention_kv(self.enc.transformers, context)
        dec_kv = cross_attention_kv(self.dec.transformers, context)
        if self.twin is not None:
            kv = twin_kv(enc_kv, cn_kv)
            self._twin = compiler("twin_encoder", self.twin, (x, hint, self.twin_temb[0], kv))
            mid, skips, controls = self.twin(x, hint, self.twin_temb[0], kv)
        else:
            self._cn = compiler("control_branch", self.cn, (x, hint, self.cn_temb[0], cn_kv))
            self._enc = compiler("unet_encoder", self.enc, (x, self.enc_temb[0], enc_kv))
            mid, skips = self.enc(x, self.enc_temb[0], enc_kv)
            controls = self.cn(x, hint, self.cn_temb[0], cn_kv)
        gs = torch.ones(1, device=self.device)
        self._dec = compiler("unet_decoder", self.dec,
                             (x, mid, skips, controls, scales, self.dec_temb[0], dec_kv, self.coeffs[0], gs))

    @torch.no_grad()
    def warm_up(self) -> None:
        """One step on random inputs (triggers lazy compilation); prepare() must be called again before use."""
        x, context, hint = self._example_inputs_from_tables()
        self.prepare(context, hint, 9.0, torch.ones(2, NUM_CONTROLS))
        self.step(x, 0)
        self._context = None

    def _example_inputs_from_tables(self):
        b, c, h, w = self.profile.latent_shape
        x = torch.randn(b, c, h, w, device=self.device)
        context = torch.randn(2 * b, 77, self.context_dim, device=self.device)
        hint = torch.randn(b, self.hint_channels, h, w, device=self.device)
        return x, context, hint

    @torch.no_grad()
    def prepare(self, context, hint_features, guidance_scale, control_scales) -> None:
        if context is not self._context:  # the prompt cache hands back the same tensor for the same prompts
            ctx = context.to(self.device, self.dtype)
            cn_kv = cross_attention_kv(self.cn.transformers, ctx)
            enc_kv = cross_attention_kv(self.enc.transformers, ctx)
            if self.twin is not None:  # the twin reads only the stacked copy
                self.twin_kv = _copy_into(self.twin_kv, twin_kv(enc_kv, cn_kv))
            else:
                self.cn_kv = _copy_into(self.cn_kv, cn_kv)
                self.enc_kv = _copy_into(self.enc_kv, enc_kv)
            self.dec_kv = _copy_into(self.dec_kv, cross_attention_kv(self.dec.transformers, ctx))
            self._context = context
        self.hint_features = _copy_into(None if self.hint_features is None else [self.hint_features],
                                        [hint_features.to(self.device, self.dtype)])[0]
        # Uploading the two scale tables from pageable memory would wait for the GPU's queue (the hint stage) each
        # image; they change only with the request's scale / strength / guess_mode, so they go up only then.
        scales = (float(guidance_scale), tuple(control_scales.flatten().tolist()))
        if scales != self._scales:
            gs = torch.tensor([scales[0]], dtype=torch.float32)
            (self.guidance_scale, self.control_scales) = _copy_into(
                None if self.guidance_scale is None else [self.guidance_scale, self.control_scales],
                [gs.to(self.device), control_scales.to(self.device).float()])
            self._scales = scales

    @torch.no_grad()
    def step(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if self.twin is not None:
            mid, skips, controls = self._twin(x, self.hint_features, self.twin_temb[k], self.twin_kv)
        elif self.side is None:
            controls = self._cn(x, self.hint_features, self.cn_temb[k], self.cn_kv)
            mid, skips = self._enc(x, self.enc_temb[k], self.enc_kv)
        else:
            main = torch.cuda.current_stream(self.device)
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                controls = self._cn(x, self.hint_features, self.cn_temb[k], self.cn_kv)
            mid, skips = self._enc(x, self.enc_temb[k], self.enc_kv)
            main.wait_stream(self.side)
            for c in controls:  # allocated on the side stream, consumed on main
                c.record_stream(main)
        return self._dec(x, mid, list(skips), list(controls), self.control_scales, self.dec_temb[k], self.dec_kv,
                         self.coeffs[k], self.guidance_scale)


def _log(msg: str) -> None:
    print(f"[torch-engine] {msg}", file=sys.stderr, flush=True)


class ConvKernels(str, enum.Enum):
    """Which kernels run the step's convolutions (environment variable CNRT_CONV; `tuned` is the default on a GPU)."""

    TUNED = "tuned"  # 1x1 as matmuls, kxk on the Triton kernel where the tuning table measured it faster
    POINTWISE = "pointwise"  # 1x1 as matmuls only
    CUDNN = "cudnn"  # nothing swapped (the CPU always uses this)

    @classmethod
    def parse(cls, value: "str | ConvKernels") -> "ConvKernels":
        return parse_choice(cls, value, "convolution kernels (CNRT_CONV)")


# The parts of the artifacts' key a convolution timing depends on. The rest (parts version, step layout, folds, fused
# blocks) changes which shapes the step asks for or how it is compiled, not what a shape's kernels measure: a table
# saved under another value of those is reused, and only shapes it lacks are measured.
TUNING_KEY_FIELDS = ("profile", "versions", "gpu", "capability", "conv_kernels", "conv_tuning", "split_fixup",
                     "cudnn_graph")


def _tuning_key(key: dict) -> dict:
    return {name: key.get(name) for name in TUNING_KEY_FIELDS}


def _saved_table_is_valid(compiler: PartCompiler) -> bool:
    """Whether the directory's table may be used: fresh under the current key, or recorded under a key that
    differs only outside TUNING_KEY_FIELDS (then it is recorded under the current key too)."""
    directory = compiler.artifact_dir
    if compiler.manifest.is_fresh(directory, compiler.key, ["conv-tuning"]):
        return True
    previous = compiler.previous
    if (previous is None or _tuning_key(previous.key) != _tuning_key(compiler.key)
            or not previous.is_fresh(directory, previous.key, ["conv-tuning"])):
        return False
    compiler.manifest.record(directory, "conv-tuning", directory / previous.artifacts["conv-tuning"].path)
    compiler.manifest.save(directory)
    return True


def _tuning_table(shapes: list[ConvShape], compiler: PartCompiler) -> TuningTable:
    """The saved table when it is valid (`_saved_table_is_valid`) and has every shape; else the missing shapes are
    measured and added. CNRT_CONV_TABLE=FILE (for A/Bs of two tables on one machine) uses that table as it is,
    outside the manifest; a shape it lacks runs on cuDNN."""
    override = os.environ.get("CNRT_CONV_TABLE")
    if override:
        _log(f"convolution choices from {override} (CNRT_CONV_TABLE)")
        return TuningTable.load(Path(override))
    path = compiler.artifact_dir / conv_tuning.TABLE_FILE
    table = TuningTable()
    if _saved_table_is_valid(compiler):
        table = TuningTable.load(path)
    missing = sorted({s for s in shapes if s.key not in table.choices}, key=lambda s: s.key)
    if not missing:
        return table
    _log(f"tuning {len(missing)} convolution shapes (one-off) ...")
    table.choices.update(conv_tuning.tune_all(missing).choices)
    table.save(path)
    compiler.manifest.record(compiler.artifact_dir, "conv-tuning", path)
    compiler.manifest.save(compiler.artifact_dir)
    return table


class StepLayout(str, enum.Enum):
    """How a step runs the UNet encoder and the ControlNet (environment variable CNRT_STEP)."""

    TWIN = "twin"  # one batched part (TwinEncoder), one stream
    STREAMS = "streams"  # two parts on two CUDA streams

    @classmethod
    def parse(cls, value: "str | StepLayout") -> "StepLayout":
        return parse_choice(cls, value, "step layout (CNRT_STEP)")


@dataclass
class StepLayers:
    """What _prepare_step_layers built for the FastStepRunner."""

    twin: "TwinEncoder | None" = None
    fused_decoder: dict = field(default_factory=dict)  # up-path resnet index -> FusedResnet
    folded: frozenset = frozenset()  # blocks whose conv1.bias the time tables carry


def _prepare_step_layers(bundle: ModelBundle, profile: Profile, device: torch.device, compiler: PartCompiler,
                         kernels: ConvKernels, layout: StepLayout, fuse: bool = False) -> StepLayers:
    """Swap the step's convolutions for faster kernels (1x1 by matmuls; kxk by the Triton kernel where the tuning
    table says so), build the TwinEncoder if asked, and (fuse) run ResNet blocks whose convolutions are both on
    Triton as FusedResnets. Input sizes come from one eager step of the plain parts."""
    eager = FastStepRunner(bundle, profile, device, PartCompiler(CompileMode.EAGER, compiler.artifact_dir, {}))
    roots = [bundle.unet, bundle.controlnet, eager.dec.subpixel]  # the decoder's 2x2 upsampler convolutions too
    sizes = record_input_sizes(roots, eager.warm_up)
    del eager
    twin = layout is StepLayout.TWIN and can_pair(bundle.unet, bundle.controlnet)
    if layout is StepLayout.TWIN and not twin:
        _log("the ControlNet's encoder does not match the UNet's: running them on two streams instead")
    if twin:  # the twin runs the first ResNet pair once for both CFG rows
        sizes = first_pair_input_sizes(sizes, bundle.unet, bundle.controlnet)
    fuse = fuse and kernels is ConvKernels.TUNED
    paired = set(encoder_convolutions(bundle.unet)) if twin else set()
    unused = set(encoder_convolutions(bundle.controlnet)) if twin else set()  # the twin runs them as pairs
    decoder_blocks = _resnets_of(list(bundle.unet.up_blocks))  # UNetDecoder's order
    fusable = {b for b in decoder_blocks if can_fuse(b)} if fuse else set()
    if fuse and twin:
        fusable |= {b for b in _resnets_of(list(bundle.unet.down_blocks) + [bundle.unet.mid_block]) if can_fuse(b)}
    fused_conv2 = {b.conv2: b for b in fusable}
    table = None
    if kernels is ConvKernels.TUNED:
        shapes = []
        for c, s in sizes.items():
            if not triton_candidate(c) or c in unused:
                continue
            groups = TWIN_GROUPS if c in paired else 1
            block = fused_conv2.get(c)  # a fused block's conv2 is tuned with its shortcut
            shapes.append(fused_conv2_shape(block, sizes, groups) if block is not None
                          else ConvShape.of(c, s, groups))
        table = _tuning_table(shapes, compiler)
        _log(table.summary())

    def triton_config(shape: ConvShape):
        choice = None if table is None else table.choices.get(shape.key)
        return choice.config if choice is not None and choice.backend == "triton" else None

    def graph_plan(shape: ConvShape):
        choice = None if table is None else table.choices.get(shape.key)
        return choice.plan if choice is not None and choice.backend == "cudnn_graph" else None

    layers = StepLayers()
    folded = set()
    if twin:  # built from the unswapped layers; its own stacked weights from here on
        layers.twin = TwinEncoder(bundle.unet, bundle.controlnet, sizes, triton_config, fuse_resnets=fuse,
                                  graph_plan=graph_plan)
        folded |= layers.twin.fused_blocks
    for i, block in enumerate(decoder_blocks):
        fused = fused_if_tuned((block,), sizes, triton_config, graph_plan) if block in fusable else None
        if fused is not None:
            layers.fused_decoder[i] = fused
            folded.add(block)
    if fuse:
        _log(f"{len(folded)} ResNet blocks fused ({len(layers.fused_decoder)} in the decoder)")
    layers.folded = frozenset(folded)
    fused_convs = {c for b in folded for c in (b.conv1, b.conv2, b.conv_shortcut) if c is not None}
    if twin:  # the twin runs these from its own stacked weights
        fused_convs |= set(twin_convolutions(bundle.unet)) | set(twin_convolutions(bundle.controlnet))

    def replacement(conv, shape):
        if conv in fused_convs:  # never called again: keep the original, no converted copy
            return None
        swapped = pointwise_as_matmul(conv, shape)
        if swapped is None and triton_candidate(conv):
            tuned = ConvShape.of(conv, shape)
            config, plan = triton_config(tuned), graph_plan(tuned)
            if config is not None:
                swapped = TritonConv2d(conv, config)
            elif plan is not None:
                swapped = CudnnGraphConv2d(conv, plan)
        return swapped

    if kernels is not ConvKernels.CUDNN:
        n = convert_convolutions(roots, sizes, replacement)
        _log(f"{n} convolutions swapped ({kernels.value})")
    return layers


def step_settings(kernels: ConvKernels, layout: StepLayout, fuse: bool) -> dict:
    """The switches that shape the compiled step, for the artifacts' manifest key: saved parts built under other
    settings are rebuilt, not loaded. The folds change the parts' inputs (per-prompt A / B instead of K / V) and
    weights, so a package of one form cannot run the other."""
    settings = dict(conv_kernels=kernels.value, conv_tuning=conv_tuning.TUNING_VERSION, step_layout=layout.value,
                    fused_resnets=fuse, folded_cross=folded_cross.active(),
                    folded_feed_forward=residual_gemm.FOLD_FF_PROJ_OUT)
    if triton_conv.SPLIT_FIXUP:  # split configs are timed (and run) differently: their own tuning table
        settings.update(split_fixup=True)
    if kernels is ConvKernels.TUNED and cudnn_conv.available():  # the graph API's configs are named per version
        settings.update(cudnn_graph=cudnn_conv.version())
    return settings


def build_fast_engines(bundle: ModelBundle, profile: Profile, device: torch.device, artifact_dir: Path,
                       compile_mode: str = "auto") -> EngineSet:
    artifact_dir = device_artifact_dir(artifact_dir, device)
    mode = CompileMode.parse(compile_mode)
    if mode is CompileMode.AUTO:
        mode = CompileMode.JIT if device.type == "cuda" else CompileMode.EAGER
    bundle.to(device=device, dtype=profile.precision.torch_dtype)
    for net in (bundle.unet, bundle.controlnet, bundle.vae):
        net.to(memory_format=torch.channels_last)
    use_channels_last_group_norm(bundle.vae.decoder)  # its group norms read channels_last maps in memory order
    cuda = device.type == "cuda"
    kernels = ConvKernels.parse(os.environ.get("CNRT_CONV", "tuned")) if cuda else ConvKernels.CUDNN
    layout = StepLayout.parse(os.environ.get("CNRT_STEP", "twin"))
    fuse = cuda and env_flag("CNRT_FUSE", True)
    key = artifact_key(profile.name, bundle.weights_id, device)
    key.update(step_settings(kernels, layout, fuse))
    compiler = PartCompiler(mode, artifact_dir, key)
    layers = StepLayers()
    if kernels is not ConvKernels.CUDNN or layout is StepLayout.TWIN:
        layers = _prepare_step_layers(bundle, profile, device, compiler, kernels, layout, fuse)
    twin = layers.twin
    step = FastStepRunner(bundle, profile, device, compiler, twin, layers.fused_decoder, layers.folded)
    b, c, h, w = profile.latent_shape
    decoder = LatentDecoder(bundle.vae)
    latent = torch.randn(b, c, h, w, device=device)
    decode = compiler("vae_decoder", decoder, (latent,))
    if mode is not CompileMode.EAGER:
        start = time.perf_counter()
        with torch.no_grad():  # torch.compile compiles on first call: do it here, in initialize(), not per image
            step.warm_up()
            decode(latent)
        torch.cuda.synchronize(device)
        compiler.finish()
        _log(f"parts compiled / loaded in {time.perf_counter() - start:.1f} s")
    return torch_engine_set(
        bundle, step, decode, device,
        f"torch fast {profile.precision.value} ({mode.value}, channels_last, "
        f"{'twin encoder' if twin is not None else '2 streams'}) on {device}")
