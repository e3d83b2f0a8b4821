"""The convolution swaps of the torch fast backend compute exactly what nn.Conv2d computes.

CPU: GemmConv2d in float64; the Triton implicit-GEMM kernel through Triton's interpreter (skipped without triton);
the swap applied to the tiny model's step; the tuning table's file format. GPU: the compiled Triton kernel on the
sd15 step's real shapes, every candidate config, against cuDNN.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engines.torch_fast import triton_conv
from engines.torch_fast.conv_tuning import ConvChoice, TuningTable
from engines.torch_fast.gemm_conv import GemmConv2d, TritonConv2d, is_wide, pointwise_as_matmul, triton_candidate
from engines.torch_fast.triton_conv import ConvConfig, candidate_configs, output_box, tma_candidate_configs
from tests.triton_interpreter import run_interpreted

CASES = [  # (Cin, Cout, kernel, stride, padding, bias, H, W)
    (64, 48, 3, 1, 1, True, 5, 7),
    (64, 40, 3, 2, 1, True, 8, 12),
    (64, 24, 3, 1, 1, False, 4, 6),
    (64, 32, 1, 1, 0, True, 4, 6),
    (64, 4, 3, 1, 1, True, 6, 8),  # conv_out-like: fewer output channels than a tile
]


@pytest.mark.parametrize("cin,cout,k,s,p,bias,h,w", CASES)
def test_gemm_conv_equals_conv2d(cin, cout, k, s, p, bias, h, w):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, bias=bias).double()
    x = torch.randn(2, cin, h, w, dtype=torch.double).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(GemmConv2d(conv)(x), conv(x), rtol=1e-12, atol=1e-12)


def test_only_wide_plain_pointwise_convolutions_become_matmuls():
    assert isinstance(pointwise_as_matmul(nn.Conv2d(64, 64, 1), (2, 64, 4, 6)), GemmConv2d)
    assert pointwise_as_matmul(nn.Conv2d(64, 64, 3, padding=1), (2, 64, 4, 6)) is None
    assert pointwise_as_matmul(nn.Conv2d(4, 320, 1), (2, 4, 4, 6)) is None  # conv_in-like: stays on cuDNN
    assert not is_wide(nn.Conv2d(64, 64, 3, groups=2))


def test_triton_candidates_are_plain_kxk_with_wide_input():
    assert triton_candidate(nn.Conv2d(320, 4, 3, padding=1))  # conv_out
    assert triton_candidate(nn.Conv2d(640, 640, 3, 2, 1))
    assert not triton_candidate(nn.Conv2d(4, 320, 3, padding=1))  # conv_in: 4 input channels
    assert not triton_candidate(nn.Conv2d(320, 320, 1))
    assert not triton_candidate(nn.Conv2d(64, 64, 3, groups=2))


INTERPRETED_CHECK = r"""
import sys
import torch, torch.nn.functional as F
from torch import nn

from engines.torch_fast.gemm_conv import TritonConv2d
from engines.torch_fast.triton_conv import ConvConfig, conv2d_nhwc
cin, cout, k, s, p, bias, h, w, split, groups = (int(v) for v in sys.argv[1:])
torch.manual_seed(1)
cfg = ConvConfig(16, 32, 32, split, 4, 2)
if groups == 1:
    conv = nn.Conv2d(cin, cout, k, s, p, bias=bool(bias)).half()
    x = torch.randn(2, cin, h, w).half().contiguous(memory_format=torch.channels_last)
    got = TritonConv2d(conv, cfg)(x).float()
    ref = F.conv2d(x.float(), conv.weight.float(), None if conv.bias is None else conv.bias.float(), s, p)
else:  # independent convolutions, one per group of images, in one launch
    convs = [nn.Conv2d(cin, cout, k, s, p, bias=bool(bias)).half() for _ in range(groups)]
    x = torch.randn(2 * groups, cin, h, w).half().contiguous(memory_format=torch.channels_last)
    weight = torch.stack([c.weight.permute(2, 3, 1, 0).reshape(-1, cout) for c in convs]).contiguous()
    b = torch.stack([c.bias for c in convs]) if bias else None
    got = conv2d_nhwc(x, weight, b, k, s, p, cfg, groups=groups).float()
    ref = torch.cat([F.conv2d(xg.float(), c.weight.float(), None if c.bias is None else c.bias.float(), s, p)
                     for xg, c in zip(x.chunk(groups), convs)])
assert got.shape == ref.shape, (got.shape, ref.shape)
assert got.is_contiguous(memory_format=torch.channels_last)
print(((got - ref).norm() / ref.norm()).item())
"""


@pytest.mark.parametrize("cin,cout,k,s,p,bias,h,w", [c for c in CASES if c[2] == 3])
@pytest.mark.parametrize("split,groups", [(1, 1), (3, 1), (1, 2), (3, 2)])
def test_triton_conv_equals_conv2d_interpreted(cin, cout, k, s, p, bias, h, w, split, groups):
    """The kernel's indexing (taps, halo, stride, split-K, bias), run on the CPU by Triton's interpreter."""
    args = [str(int(v)) for v in (cin, cout, k, s, p, bias, h, w, split, groups)]
    out = run_interpreted(INTERPRETED_CHECK, args)
    assert float(out.strip().splitlines()[-1]) < 2e-3


SUM_ONLY_CHECK = r"""
import torch
from engines.torch_fast.triton_conv import ConvConfig, conv2d_nhwc, weight_matrix
torch.manual_seed(3)
x = torch.randn(2, 64, 6, 8).half().contiguous(memory_format=torch.channels_last)
w = torch.randn(48, 64, 3, 3).half() * 0.05
b = torch.randn(48).half()
cfg = ConvConfig(16, 32, 32, 3, 4, 2)
full = conv2d_nhwc(x, weight_matrix(w), b, 3, 1, 1, cfg).float()
partial = conv2d_nhwc(x, weight_matrix(w), b, 3, 1, 1, cfg, sum_only=True)
assert partial.dtype == torch.float32 and partial.shape == (2 * 6 * 8, 48), (partial.dtype, partial.shape)
rows = full.permute(0, 2, 3, 1).reshape(-1, 48)
print(((partial + b.float() - rows).abs().max() / rows.abs().max()).item())
"""


LAUNCH_FAKE_CHECK = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from engines.torch_fast import triton_conv
from engines.torch_fast.triton_conv import ConvConfig, weight_matrix

def case(cin, cout, h, w, split, groups, n, tma, stride, fixup):
    x = torch.randn(n * groups, cin, h, w).half().contiguous(memory_format=torch.channels_last)
    mats = [weight_matrix(torch.randn(cout, cin, 3, 3).half() * 0.05) for _ in range(groups)]
    mat = mats[0] if groups == 1 else torch.stack(mats)
    cfg = ConvConfig(16, 32, 32, split, 4, 2, box=(1, 4, 4) if tma else None)
    final = split == 1 or fixup
    bias = torch.randn(cout).half() if final else None
    real = triton_conv._launch(x, mat, bias, None, None, 3, stride, 1, cfg, groups, fixup)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx, fm = mode.from_tensor(x), mode.from_tensor(mat)
        fb = None if bias is None else mode.from_tensor(bias)
        fake = torch.ops.cnrt.conv2d_launch(fx, fm, fb, None, None, 3, stride, 1,
                                            [16, 32, 32, split, 4, 2], [1, 4, 4] if tma else [], groups, fixup)
    got, want = (fake.shape, fake.dtype, fake.stride()), (real.shape, real.dtype, real.stride())
    assert got == want, (got, want)
    print(tuple(real.shape), real.dtype)

for args in [(64, 48, 5, 7, 1, 1, 2, 0, 1, False), (64, 48, 5, 7, 2, 1, 2, 1, 1, False),
             (64, 40, 8, 12, 3, 2, 1, 0, 2, True), (64, 32, 4, 6, 2, 2, 2, 1, 1, True)]:
    case(*args)
"""


def test_the_launch_operators_fake_matches_the_kernels_output():
    """cnrt::conv2d_launch's fake (what torch.compile plans buffers with) has the shape, dtype and strides of what
    the launch returns: whole fp16 rows, fp32 partials per split, fixup, groups, stride 2, both kernels."""
    out = run_interpreted(LAUNCH_FAKE_CHECK, [])
    assert out.split() == ["(1,", "70,", "48)", "torch.float16", "(2,", "70,", "48)", "torch.float32",
                           "(1,", "48,", "40)", "torch.float16", "(1,", "96,", "32)", "torch.float16"]


def test_sum_only_is_the_split_k_sum_without_the_finish():
    """What the tuner times for a split config: the fp32 sum of the partials, before bias and cast."""
    out = run_interpreted(SUM_ONLY_CHECK, [])
    assert float(out.strip().splitlines()[-1]) < 2e-3


FIXUP_CHECK = r"""
import sys
import torch
from engines.torch_fast import triton_conv
from engines.torch_fast.triton_conv import ConvConfig, conv2d_nhwc, weight_matrix
cin, cout, h, w, split, groups, n, tma, sc, res, stride = (int(v) for v in sys.argv[1:])
torch.manual_seed(3)
x = torch.randn(n * groups, cin, h, w).half().contiguous(memory_format=torch.channels_last)
oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
x2 = torch.randn(n * groups, sc, oh, ow).half().contiguous(memory_format=torch.channels_last) if sc else None
r = torch.randn(n * groups, cout, oh, ow).half().contiguous(memory_format=torch.channels_last) if res else None
mats = [weight_matrix(torch.randn(cout, cin, 3, 3).half() * 0.05,
                      torch.randn(cout, sc, 1, 1).half() * 0.05 if sc else None) for _ in range(groups)]
mat = mats[0] if groups == 1 else torch.stack(mats)
bias = torch.randn(groups, cout).half()
bias = bias[0] if groups == 1 else bias
cfg = ConvConfig(16, 32, 32, split, 4, 2, box=(1, 4, 4) if tma else None)
args = (x, mat, bias, 3, stride, 1, cfg)
kw = dict(groups=groups, shortcut=x2, residual=r)
outside = conv2d_nhwc(*args, **kw, fixup=False)  # the partials summed by torch
inside = conv2d_nhwc(*args, **kw, fixup=True)
again = conv2d_nhwc(*args, **kw, fixup=True)
assert inside.shape == outside.shape and inside.is_contiguous(memory_format=torch.channels_last)
assert torch.equal(inside, again)  # the partials are added in slot order, whoever finishes last
assert all(int(c.abs().sum()) == 0 for c in triton_conv._counters.values())  # the counters are left at zero
print(((inside.float() - outside.float()).abs().max()).item())
"""


@pytest.mark.parametrize("case", [
    "64 32 6 8 2 1 2 0 0 0 1",     # gather kernel, two-way split, bias
    "64 64 6 8 5 2 1 0 64 0 1",    # gather kernel, twin groups, the split crossing into the 1x1 shortcut
    "32 32 7 9 3 1 2 0 0 1 2",     # gather kernel, stride 2, residual
    "64 32 6 8 2 1 2 1 0 1 1",     # TMA kernel, residual
    "64 64 5 7 5 2 1 1 64 0 1",    # TMA kernel, twin groups, shortcut, boxes over the border
])
def test_split_k_reduced_in_the_kernel_equals_the_torch_sum_interpreted(case):
    """The last program of each tile adds the fp32 partials in slot order, then bias / residual and the cast: what
    the torch finish computes (one fp16 rounding apart at most), the same bytes on a second call, and the tiles'
    arrival counters back at zero. Arguments: cin cout h w split groups n tma shortcut residual stride."""
    out = run_interpreted(FIXUP_CHECK, case.split())
    assert float(out.strip().splitlines()[-1]) <= 2e-3


TMA_CHECK = r"""
import sys
import torch, torch.nn.functional as F
from engines.torch_fast.triton_conv import ConvConfig, conv2d_nhwc, weight_matrix
cin, cout, h, w, split, groups, n, bi, bh, bw, sc, res = (int(v) for v in sys.argv[1:])
torch.manual_seed(2)
x = torch.randn(n * groups, cin, h, w).half().contiguous(memory_format=torch.channels_last)
ws = [torch.randn(cout, cin, 3, 3).half() * 0.05 for _ in range(groups)]
bs = torch.randn(groups, cout).half()
x2 = torch.randn(n * groups, sc, h, w).half().contiguous(memory_format=torch.channels_last) if sc else None
w2 = [torch.randn(cout, sc, 1, 1).half() * 0.05 for _ in range(groups)] if sc else [None] * groups
r = torch.randn(n * groups, cout, h, w).half().contiguous(memory_format=torch.channels_last) if res else None
mat = torch.stack([weight_matrix(a, b) for a, b in zip(ws, w2)])
mat, bias = (mat[0], bs[0]) if groups == 1 else (mat, bs)
cfg = ConvConfig(bi * bh * bw, 32, 32, split, 4, 2, box=(bi, bh, bw))
got = conv2d_nhwc(x, mat, bias, 3, 1, 1, cfg, groups=groups, shortcut=x2, residual=r).float()
refs = []
for g in range(groups):
    sl = slice(g * n, (g + 1) * n)
    y = F.conv2d(x[sl].float(), ws[g].float(), bs[g].float(), 1, 1)
    y = y + (F.conv2d(x2[sl].float(), w2[g].float()) if sc else 0) + (r[sl].float() if res else 0)
    refs.append(y)
ref = torch.cat(refs)
assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
print(((got - ref).norm() / ref.norm()).item())
"""


@pytest.mark.parametrize("case", [
    "64 64 6 8 1 1 2 1 4 8 0 0",     # box inside the map, one image per box
    "64 96 5 7 3 2 2 2 2 4 0 0",     # boxes overhang both edges; two images a box; groups; split-K
    "32 64 6 8 1 2 1 1 4 4 64 1",    # shortcut rows and residual epilogue
    "128 64 8 12 5 1 2 2 4 16 128 0",  # a split whose K range crosses from the taps into the shortcut
])
def test_tma_conv_equals_conv2d_interpreted(case):
    """The TMA kernel's boxes (tap shifts, zero fill past the border, images past the group), run by the
    interpreter. Arguments: cin cout h w split groups n box_i box_h box_w shortcut residual."""
    out = run_interpreted(TMA_CHECK, case.split())
    assert float(out.strip().splitlines()[-1]) < 2e-3


def test_output_box_tiles_the_step_maps_with_least_waste():
    assert output_box(2, 32, 48, 128) == (2, 4, 16)  # 48 = 3 x 16: no pixel wasted
    assert output_box(2, 8, 12, 64) == (2, 8, 4)
    assert output_box(2, 4, 6, 64) == (2, 4, 8)  # 48 of 64 pixels: the least waste a 64-pixel box allows
    for images, h, w, bm in [(2, 32, 48, 128), (2, 16, 24, 64), (1, 32, 48, 256), (2, 8, 12, 128)]:
        bi, bh, bw = output_box(images, h, w, bm)
        assert bi * bh * bw == bm


def test_tma_candidates_fit_and_avoid_the_miscompiled_case():
    configs = tma_candidate_configs(2, 8, 12, 1280, 1280, 3, shortcut_channels=1920)
    assert configs and all(c.box is not None and triton_conv.supports(1280, 3, c, 1920) for c in configs)
    # 8 warps, or 128-row tiles under a K split, with the shortcut loop: wrong sums on the GPU
    assert all(c.num_warps == 4 and (c.block_m == 64 or c.split_k == 1) for c in configs)
    assert not tma_candidate_configs(2, 32, 48, 4, 320, 3)  # Cout 4: rows under TMA's 16 bytes
    with pytest.raises(ValueError, match="stride"):
        triton_conv.conv2d_nhwc(torch.zeros(1, 64, 8, 8).half(), torch.zeros(576, 64).half(), None, 3, 2, 1,
                                ConvConfig(64, 64, 64, 1, 4, 3, box=(1, 8, 8)))


TUNER_CHECK = r"""
import torch
from engines.torch_fast.conv_tuning import ConvShape, conv_inputs, cudnn_call, relative_error, triton_call
from engines.torch_fast.triton_conv import ConvConfig
cpu = torch.device("cpu")
for shape, cfg in [(ConvShape(1, 64, 6, 8, 64, 3, 1, 1, groups=2, shortcut=64), ConvConfig(32, 32, 64, 2, 4, 2)),
                   (ConvShape(2, 64, 4, 6, 64, 3, 1, 1), ConvConfig(64, 32, 64, 1, 4, 2, box=(2, 4, 8))),
                   (ConvShape(2, 64, 6, 8, 64, 3, 2, 1), ConvConfig(16, 32, 64, 1, 4, 2))]:
    t = conv_inputs(shape, device=cpu, copies=2)
    for i in range(2):  # every argument set: the Triton call against the cuDNN one, as the tuner checks them
        ref = cudnn_call(shape, t, i).float()
        print(relative_error(triton_call(shape, t, i, cfg, sum_only=False), ref))
"""


def test_tuner_inputs_and_calls_agree_interpreted():
    """What the tuner checks and times (its inputs, the cuDNN call and the Triton call), on the CPU: groups with a
    shortcut and split-K, the TMA kernel, a stride-2 map."""
    out = run_interpreted(TUNER_CHECK, [])
    errors = [float(v) for v in out.split()]
    assert len(errors) == 6 and max(errors) < 2e-3, errors


def test_conv_shape_key_round_trips():
    from engines.torch_fast.conv_tuning import ConvShape

    for shape in [ConvShape(2, 1280, 8, 12, 1280, 3, 1, 1, groups=2, shortcut=640),
                  ConvShape(1, 320, 32, 48, 4, 3, 2, 1), ConvShape(2, 2560, 4, 6, 1280, 3, 1, 1, shortcut=2560)]:
        assert ConvShape.from_key(shape.key) == shape


def test_triton_conv_rejects_configs_that_do_not_divide_k():
    conv = nn.Conv2d(96, 64, 3, padding=1)
    with pytest.raises(ValueError, match="does not fit"):
        TritonConv2d(conv, ConvConfig(64, 64, 64, 1, 4, 3))  # 96 input channels: not a multiple of block_k


def test_candidate_configs_all_divide_their_shape():
    for m, cout, cin in [(48, 1280, 1280), (192, 1280, 2560), (3072, 320, 320), (768, 640, 1920)]:
        configs = candidate_configs(m, cout, cin, 3)
        assert configs
        assert all(triton_conv.supports(cin, 3, c) for c in configs)
    assert candidate_configs(48, 64, 96, 3) == []


@pytest.fixture
def fake_tuner(monkeypatch):
    """conv_tuning.tune_all replaced by a recorder (the real one times kernels on a GPU): the list of the shape keys
    it was asked to measure, and two shapes (plain, and grouped as the twin's)."""
    from engines.torch_fast import conv_tuning
    from engines.torch_fast.conv_tuning import ConvShape

    measured = []

    def fake_tune_all(shapes):
        measured.extend(s.key for s in shapes)
        return TuningTable({s.key: ConvChoice("cudnn", None, 1.0, 1.0) for s in shapes})

    monkeypatch.setattr(conv_tuning, "tune_all", fake_tune_all)
    return measured, (ConvShape(2, 64, 4, 6, 64, 3, 1, 1), ConvShape(1, 64, 4, 6, 64, 3, 1, 1, groups=2))


def test_tuning_table_measures_only_missing_shapes(tmp_path, fake_tuner):
    """A fresh table is reused; shapes it lacks (a new step layout, a new fused block) are measured and added."""
    from engines.torch_fast.compile import CompileMode, PartCompiler
    from engines.torch_fast.runner import _tuning_table

    measured, (a, b) = fake_tuner

    def compiler(**key):
        return PartCompiler(CompileMode.EAGER, tmp_path, {"gpu": "A", "parts_version": 1, **key})

    assert set(_tuning_table([a], compiler()).choices) == {a.key}
    assert _tuning_table([a], compiler()).choices.keys() == {a.key}
    table = _tuning_table([a, b], compiler())
    assert measured == [a.key, b.key] and set(table.choices) == {a.key, b.key}
    _tuning_table([a], compiler(gpu="B"))  # another GPU: measured again
    assert measured == [a.key, b.key, a.key]


def test_tuning_table_outlives_keys_it_does_not_depend_on(tmp_path, fake_tuner):
    """A new parts version (or step layout, or fold) reuses the saved timings; the table is then recorded under the
    new key, so a third key that differs from the first only outside the tuning fields reuses it as well."""
    from engines.torch_fast.compile import CompileMode, PartCompiler
    from engines.torch_fast.runner import _tuning_table

    measured, (a, b) = fake_tuner
    base = {"gpu": "A", "conv_tuning": 3, "parts_version": 14}
    _tuning_table([a], PartCompiler(CompileMode.EAGER, tmp_path, base))
    newer = PartCompiler(CompileMode.EAGER, tmp_path, {**base, "parts_version": 15, "folded_cross": True})
    assert set(_tuning_table([a, b], newer).choices) == {a.key, b.key}
    assert measured == [a.key, b.key]  # only the shape the old table lacked
    assert newer.manifest.artifacts["conv-tuning"].sha256  # recorded under the new key
    again = PartCompiler(CompileMode.EAGER, tmp_path, {**base, "parts_version": 15, "folded_cross": True})
    assert set(_tuning_table([a, b], again).choices) == {a.key, b.key} and measured == [a.key, b.key]
    _tuning_table([a], PartCompiler(CompileMode.EAGER, tmp_path, {**base, "conv_tuning": 4}))  # a new tuner
    assert measured == [a.key, b.key, a.key]


def test_tuning_table_round_trip(tmp_path):
    table = TuningTable({"a": ConvChoice("triton", ConvConfig(64, 64, 64, 12, 4, 4), 26.7, 21.7),
                         "b": ConvChoice("cudnn", None, 40.2, 40.2)})
    table.save(tmp_path / "t.json")
    again = TuningTable.load(tmp_path / "t.json")
    assert again.choices == table.choices
    assert "1/2 conv shapes on Triton" in again.summary()


def test_pointwise_swap_keeps_the_tiny_step(tiny_bundle, tmp_path):
    """The fast step with its 1x1 convolutions swapped for matmuls equals the unswapped one (fp32, CPU)."""
    import copy

    from engines.torch_fast.compile import CompileMode, PartCompiler
    from engines.torch_fast.runner import ConvKernels, FastStepRunner, StepLayout, _prepare_step_layers
    from profiles import get_profile

    profile = get_profile("256x384-fp32")
    device = torch.device("cpu")
    plain = copy.deepcopy(tiny_bundle)
    swapped = copy.deepcopy(tiny_bundle)
    compiler = PartCompiler(CompileMode.EAGER, tmp_path, {})
    _prepare_step_layers(swapped, profile, device, compiler, ConvKernels.POINTWISE, StepLayout.STREAMS)
    assert any(isinstance(m, GemmConv2d) for m in swapped.unet.modules())
    g = torch.Generator().manual_seed(0)
    b, c, h, w = profile.latent_shape
    x = torch.randn(b, c, h, w, generator=g)
    context = torch.randn(2 * b, 77, tiny_bundle.context_dim, generator=g)
    hint = torch.randn(b, tiny_bundle.controlnet.config.block_out_channels[0], h, w, generator=g)
    outs = []
    for bundle in (plain, swapped):
        runner = FastStepRunner(bundle, profile, device, compiler)
        runner.prepare(context, hint, 9.0, torch.ones(2, 13))
        with torch.no_grad():
            outs.append(runner.step(x, 4))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


SD15_SHAPES = [(2, 1280, 4, 6, 1280, 1), (2, 2560, 8, 12, 1280, 1), (2, 1280, 8, 12, 1280, 2), (2, 640, 32, 48, 320, 1),
               (2, 320, 32, 48, 4, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,cin,h,w,cout,stride", SD15_SHAPES)
def test_triton_conv_matches_cudnn_on_sd15_shapes(n, cin, h, w, cout, stride):
    g = torch.Generator("cuda").manual_seed(2)
    x = torch.randn(n, cin, h, w, device="cuda", generator=g).half().contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(cin, cout, 3, stride, 1).cuda().half()
    ref = conv(x).float()
    oh, ow = ref.shape[-2:]
    for cfg in candidate_configs(n * oh * ow, cout, cin, 3):
        got = TritonConv2d(conv, cfg)(x).float()
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 2e-3, f"{cfg}: relative error {err:.2e}"


TMA_SHAPES = [(2, 2, 1280, 8, 12, 1280, 1920), (1, 2, 640, 32, 48, 320, 0), (2, 2, 640, 16, 24, 640, 320),
              (1, 2, 1280, 4, 6, 1280, 2560)]


@pytest.mark.gpu
@pytest.mark.parametrize("groups,n,cin,h,w,cout,shortcut", TMA_SHAPES)
def test_tma_conv_candidates_match_cudnn_on_sd15_shapes(groups, n, cin, h, w, cout, shortcut):
    """Every TMA config the tuner may pick, against cuDNN, on step shapes (with the fused shortcut too)."""
    from engines.torch_fast.conv_tuning import ConvShape, conv_inputs, cudnn_call, relative_error, triton_call

    shape = ConvShape(n, cin, h, w, cout, 3, 1, 1, groups, shortcut)
    t = conv_inputs(shape, copies=1)
    ref = cudnn_call(shape, t, 0).float()
    for cfg in tma_candidate_configs(n, h, w, cout, cin, 3, shortcut, groups):
        err = relative_error(triton_call(shape, t, 0, cfg, sum_only=False), ref)
        assert err < 2e-3, f"{cfg}: relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("groups,n,cin,h,w,cout,shortcut", TMA_SHAPES)
def test_split_k_reduced_in_the_kernel_on_sd15_shapes(groups, n, cin, h, w, cout, shortcut):
    """CNRT_SPLIT_FIXUP's path on step shapes, every fourth split config of both kernels: inside torch.compile (the
    operator) and replayed 20 times in one CUDA graph, it gives the bytes of its first run, matches cuDNN, and leaves
    its arrival counters at zero."""
    from engines.torch_fast import triton_conv
    from engines.torch_fast.conv_tuning import ConvShape, conv_inputs, cudnn_call, relative_error

    shape = ConvShape(n, cin, h, w, cout, 3, 1, 1, groups, shortcut)
    t = conv_inputs(shape, copies=1)
    ref = cudnn_call(shape, t, 0).float()
    configs = candidate_configs(groups * n * h * w, cout, cin, 3, shortcut)
    configs += tma_candidate_configs(n, h, w, cout, cin, 3, shortcut, groups)
    for cfg in [c for c in configs if c.split_k > 1][::4]:
        torch._dynamo.reset()  # one compile per config, not Dynamo's recompile limit of one code object

        def conv(x, cfg=cfg):
            return triton_conv.conv2d_nhwc(x, t.mats[0], t.bs[0], 3, 1, 1, cfg, groups=groups, shortcut=t.x2s[0],
                                           fixup=True)

        compiled = torch.compile(conv, fullgraph=True)
        first = compiled(t.xs[0]).clone()  # warm-up: compiles, and makes the counter buffer before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(t.xs[0])
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first), cfg
        assert relative_error(out, ref) < 2e-3, cfg
        assert all(int(c.abs().sum()) == 0 for c in triton_conv._counters.values()), cfg


def test_split_partials_are_added_slice_by_slice():
    """sum_partials: unrolled, the split-K partials are added in split order (a pointwise chain, what a compiled
    part runs); either way the result is the sum over the splits."""
    from engines.torch_fast import triton_conv

    parts = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0))
    want = parts.double().sum(0).float()
    for unrolled in (True, False):
        torch.testing.assert_close(triton_conv.sum_partials(parts, unrolled), want, rtol=1e-6, atol=1e-6)
    in_order = (((parts[0] + parts[1]) + parts[2]) + parts[3]) + parts[4]
    assert torch.equal(triton_conv.sum_partials(parts, True), in_order)
    assert torch.equal(triton_conv.sum_partials(parts), parts.sum(0))  # eager: one reduction
    compiled = torch.compile(triton_conv.sum_partials)
    torch._dynamo.reset()
    assert torch.allclose(compiled(parts), want, rtol=1e-6, atol=1e-6)
