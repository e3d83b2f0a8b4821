"""Convolutions on cuDNN graph-API engine configs (`cudnn_conv`): the tuning table's record of them, which shapes
are tried, how a FusedResnet takes them (conv2 with its 1x1 shortcut too) and a twin downsampler pair; on a GPU with
the cudnn-frontend package, that each offered config computes F.conv2d (stride 2, shortcut GEMM and groups
included) and that the step's block computes diffusers' block with one, compiled and captured."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from engines.torch_fast import conv_tuning, cudnn_conv
from engines.torch_fast.conv_tuning import ConvChoice, ConvShape, TuningTable
from engines.torch_fast.fused_resnet import FusedResnet, fused_if_tuned
from engines.torch_fast.triton_conv import ConvConfig

needs_graph_api = pytest.mark.skipif(not cudnn_conv.available(),
                                     reason="needs a CUDA GPU and the nvidia-cudnn-frontend package")


def test_a_graph_api_choice_survives_the_table_file(tmp_path):
    table = TuningTable({"2x960x32x48->320 k3 s1 p1": ConvChoice("cudnn_graph", None, 52.1, 36.4, "eng62_k2=18"),
                         "2x320x32x48->320 k3 s1 p1 g2": ConvChoice("triton", ConvConfig(128, 64, 64, 1, 4, 4),
                                                                     66.6, 32.2)})
    table.save(tmp_path / "t.json")
    back = TuningTable.load(tmp_path / "t.json")
    assert back.choices == table.choices
    assert back.choices["2x960x32x48->320 k3 s1 p1"].plan == "eng62_k2=18"
    assert "1 on cuDNN graph-API configs" in back.summary()


def test_graph_api_configs_are_tried_for_3x3_convolutions_cudnn_takes(monkeypatch):
    monkeypatch.setattr(cudnn_conv, "available", lambda: True)
    keys = ("2x960x32x48->320 k3 s1 p1", "2x2560x4x6->1280 k3 s1 p1", "2x320x32x48->320 k3 s1 p1 g2",
            "2x320x32x48->320 k3 s1 p1 +1x1(960)", "2x640x16x24->640 k3 s1 p1 g2 +1x1(320)",
            "2x320x32x48->320 k3 s2 p1 g2", "2x640x16x24->2560 k2 s1 p1", "2x320x32x48->4 k3 s1 p1")
    for strides in ((1,), (1, 2)):
        monkeypatch.setattr(conv_tuning, "GRAPH_API_STRIDES", strides)
        tried = [k for k in keys if conv_tuning.graph_api_candidate(ConvShape.from_key(k))]
        assert tried == list(keys[:5]) + (["2x320x32x48->320 k3 s2 p1 g2"] if 2 in strides else [])
    monkeypatch.setattr(cudnn_conv, "available", lambda: False)
    assert not conv_tuning.graph_api_candidate(ConvShape.from_key("2x960x32x48->320 k3 s1 p1"))


def test_fused_resnet_takes_graph_api_convolutions_where_they_fit():
    block = ResnetBlock2D(in_channels=128, out_channels=64, temb_channels=32)
    sizes = {block.conv1: (2, 128, 4, 6), block.conv2: (2, 64, 4, 6)}
    cfg = ConvConfig(64, 64, 64, 1, 4, 3)
    conv2_only = lambda shape: cfg if shape.shortcut else None  # noqa: E731
    fused = fused_if_tuned((block,), sizes, conv2_only, lambda shape: "eng62_test")
    assert isinstance(fused, FusedResnet) and fused.conv1_plan == "eng62_test" and fused.conv2_plan is None
    assert fused.conv1_weight.shape == (64, 128, 3, 3) and fused.shortcut_weight is None
    assert fused.conv1_weight.is_contiguous(memory_format=torch.channels_last)  # cuDNN's KRSC
    assert fused_if_tuned((block,), sizes, conv2_only) is None  # conv1 on neither: not fused
    # a conv2 with a shortcut takes one too: the 1x1 shortcut's weights as (Cs, Cout) for the GEMM after it
    fused = fused_if_tuned((block,), sizes, lambda shape: None, lambda shape: "eng62_test")
    assert fused.conv2_plan == "eng62_test" and fused.conv2_weight.shape == (64, 64, 3, 3)
    assert fused.shortcut_weight.shape == (128, 64) and fused.shortcut_weight.is_contiguous()
    torch.testing.assert_close(fused.shortcut_weight, block.conv_shortcut.weight[:, :, 0, 0].t())
    pair = tuple(ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=32) for _ in range(2))
    sizes = {c: (2, 64, 4, 6) for b in pair for c in (b.conv1, b.conv2)}
    fused = fused_if_tuned(pair, sizes, lambda shape: None, lambda shape: "eng62_test")
    assert fused.groups == 2 and fused.conv1_plan == fused.conv2_plan == "eng62_test"
    assert fused.conv2_weight.shape == (2, 64, 64, 3, 3)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in fused.conv2_weight)


def _grouped_conv(x, w, padding, plan, stride=1, shortcut=None, shortcut_weight=None):
    """What cudnn_conv.conv2d computes (no bias; (G, ...) weights over G slices of the batch; plus the 1x1
    shortcut by (Cs, Cout) / (G, Cs, Cout) weights), by F.conv2d."""
    if w.dim() == 4:
        w, shortcut_weight = w[None], None if shortcut is None else shortcut_weight[None]
    g = w.shape[0]
    out = []
    for i, (xs, ws) in enumerate(zip(x.chunk(g), w)):
        y = F.conv2d(xs, ws, stride=stride, padding=padding)
        if shortcut is not None:
            y = y + F.conv2d(shortcut.chunk(g)[i], shortcut_weight[i].t()[:, :, None, None])
        out.append(y)
    return torch.cat(out)


@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("in_channels", [64, 96])
def test_fused_resnet_on_graph_api_convolutions_computes_the_diffusers_block(monkeypatch, pair, in_channels):
    """The biases (time row per group), the identity residual or the 1x1 shortcut, and the fp32 sums around the
    cuDNN calls, with the calls stood in for by F.conv2d: the block's function, for one block and a twin pair."""
    from engines.torch_fast.parts import _resnet

    monkeypatch.setattr(cudnn_conv, "conv2d", _grouped_conv)
    torch.manual_seed(0)
    blocks = [ResnetBlock2D(in_channels=in_channels, out_channels=64, temb_channels=32, groups=32).eval()
              for _ in range(2 if pair else 1)]
    for b in blocks:
        for p in b.parameters():
            p.data.normal_(0, 0.05)
    x = torch.randn(2 * len(blocks), in_channels, 4, 6).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(1, 32)
    with torch.no_grad():
        temb = [b.time_emb_proj(F.silu(emb))[0] for b in blocks]
        bias = torch.stack([t + b.conv1.bias for t, b in zip(temb, blocks)])
        fused = FusedResnet(tuple(blocks), "eng62_a", "eng62_b")
        got = fused(x, bias if pair else bias[0])
        ref = torch.cat([_resnet(b, xs, t) for b, xs, t in zip(blocks, x.chunk(len(blocks)), temb)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_weights_are_laid_out_as_the_calls_read_them():
    """krsc_weights / shortcut_matrices: one network's (G = 1) and a pair's weights, as `run` and `run_groups` take
    them (what the tuner and FusedResnet both build with)."""
    torch.manual_seed(0)
    for groups in (1, 2):
        w, w2 = torch.randn(groups, 8, 16, 3, 3), torch.randn(groups, 8, 24, 1, 1)
        krsc, matrices = cudnn_conv.krsc_weights(w), cudnn_conv.shortcut_matrices(w2)
        if groups == 1:
            assert torch.equal(krsc, w[0]) and krsc.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(matrices, w2[0, :, :, 0, 0].t()) and matrices.is_contiguous()
        else:
            assert torch.equal(krsc, w) and all(k.is_contiguous(memory_format=torch.channels_last) for k in krsc)
            assert torch.equal(matrices, w2[..., 0, 0].transpose(1, 2)) and matrices.is_contiguous()


@pytest.mark.skipif(cudnn_conv.cudnn is not None, reason="the cudnn-frontend package is installed")
def test_without_the_package_the_call_says_what_is_missing():
    x = torch.zeros(1, 8, 4, 4, dtype=torch.half)
    with pytest.raises(RuntimeError, match="nvidia-cudnn-frontend"):
        cudnn_conv.conv2d(x, torch.zeros(8, 8, 3, 3, dtype=torch.half), 1, "eng62")


@pytest.mark.gpu
@needs_graph_api
def test_every_offered_config_that_runs_computes_conv2d():
    torch.manual_seed(0)
    x = torch.randn(2, 320, 16, 24, device="cuda").half().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(640, 320, 3, 3, device="cuda") * 0.02).half().contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, w, padding=1).float()
    names = cudnn_conv.plan_names(x, w, 1)
    assert names, "cuDNN offered no engine config"
    ran = 0
    for name in names[:12]:
        try:
            y = cudnn_conv.run(x, w, 1, name)
        except Exception:  # noqa: BLE001  (configs this GPU cannot build are skipped by the tuner too)
            continue
        ran += 1
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-3, name
    assert ran > 0
    with pytest.raises(ValueError, match="no engine config"):
        cudnn_conv.run(x, w, 1, "no-such-config")


@pytest.mark.gpu
@needs_graph_api
def test_fused_resnet_with_a_graph_api_conv1_matches_diffusers_compiled_and_captured():
    from engines.torch_fast.parts import _resnet
    from engines.torch_fast.triton_conv import candidate_configs

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=960, out_channels=320, temb_channels=1280).eval().cuda().half()
    x = torch.randn(2, 960, 32, 48, device="cuda").half().contiguous(memory_format=torch.channels_last)
    emb = torch.randn(1, 1280, device="cuda").half()
    h = torch.randn(2, 960, 32, 48, device="cuda").half().contiguous(memory_format=torch.channels_last)
    w = block.conv1.weight.detach().contiguous(memory_format=torch.channels_last)
    plan = next(n for n in cudnn_conv.plan_names(h, w, 1) if _runs(h, w, n))
    with torch.no_grad():
        temb = block.time_emb_proj(F.silu(emb))[0]
        ref = _resnet(block, x, temb).float()
        fused = FusedResnet((block,), plan, candidate_configs(2 * 32 * 48, 320, 320, 3, 960)[0])
        bias = temb + block.conv1.bias
        eager = fused(x, bias)
        assert ((eager.float() - ref).norm() / ref.norm()).item() < 3e-3
        compiled = torch.compile(fused, fullgraph=True)
        compiled(x, bias)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(x, bias)
        graph.replay()
        first = out.clone()
        graph.replay()
        assert torch.equal(out, first)  # replays repeat the bytes
        assert ((out.float() - eager.float()).norm() / eager.float().norm()).item() < 1e-3


@pytest.mark.gpu
@needs_graph_api
def test_groups_on_two_streams_compute_each_groups_convolution_in_a_captured_graph():
    torch.manual_seed(0)
    x = torch.randn(4, 320, 32, 48, device="cuda").half().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(2, 320, 320, 3, 3, device="cuda") * 0.02).half()
    ref = torch.cat([F.conv2d(xs, ws, padding=1) for xs, ws in zip(x.chunk(2), w)]).float()
    stacked = cudnn_conv.stacked_krsc(w)
    plan = next(n for n in cudnn_conv.plan_names(x[:2], stacked[0], 1) if _runs(x[:2], stacked[0], n))
    eager = cudnn_conv.run_groups(x, stacked, 1, plan)
    assert ((eager.float() - ref).norm() / ref.norm()).item() < 2e-3
    compiled = torch.compile(lambda x: cudnn_conv.conv2d(x, stacked, 1, plan) * 2, fullgraph=True)
    compiled(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager * 2)


def _runs(x, w, name, stride=1) -> bool:
    try:
        cudnn_conv.run(x, w, 1, name, stride=stride)
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.gpu
@needs_graph_api
def test_a_shortcut_gemm_and_stride_2_compute_torchs_convolutions_also_for_pairs_in_a_captured_graph():
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(4, 320, 16, 24, device="cuda").half().contiguous(memory_format=cl)
    x2 = torch.randn(4, 160, 16, 24, device="cuda").half().contiguous(memory_format=cl)
    w = (torch.randn(2, 320, 320, 3, 3, device="cuda") * 0.02).half()
    w2 = (torch.randn(2, 320, 160, device="cuda") * 0.05).half()  # (G, Cout, Cs)
    stacked, w2_in_out = cudnn_conv.stacked_krsc(w), w2.transpose(1, 2).contiguous()
    plan = next(n for n in cudnn_conv.plan_names(x[:2], stacked[0], 1) if _runs(x[:2], stacked[0], n))
    ref = torch.cat([F.conv2d(x[2 * g:2 * g + 2], w[g], padding=1).float()
                     + F.conv2d(x2[2 * g:2 * g + 2], w2[g, :, :, None, None]).float() for g in range(2)])
    one = cudnn_conv.run(x[:2], stacked[0], 1, plan, shortcut=x2[:2], shortcut_weight=w2_in_out[0])
    assert ((one.float() - ref[:2]).norm() / ref[:2].norm()).item() < 2e-3
    pair = cudnn_conv.run_groups(x, stacked, 1, plan, 1, x2, w2_in_out)
    assert ((pair.float() - ref).norm() / ref.norm()).item() < 2e-3

    s2 = next(n for n in cudnn_conv.plan_names(x[:2], stacked[0], 1, 2) if _runs(x[:2], stacked[0], n, 2))
    down = cudnn_conv.run_groups(x, stacked, 1, s2, 2)
    ref2 = torch.cat([F.conv2d(x[2 * g:2 * g + 2], w[g], stride=2, padding=1) for g in range(2)]).float()
    assert down.shape == (4, 320, 8, 12) and ((down.float() - ref2).norm() / ref2.norm()).item() < 2e-3

    compiled = torch.compile(lambda x, x2: (cudnn_conv.conv2d(x, stacked, 1, plan, shortcut=x2,
                                                              shortcut_weight=w2_in_out) * 2,
                                            cudnn_conv.conv2d(x, stacked, 1, s2, 2) * 2), fullgraph=True)
    compiled(x, x2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(x, x2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], pair * 2) and torch.equal(out[1], down * 2)


def test_the_tuner_takes_a_faster_correct_config_and_skips_wrong_ones(monkeypatch):
    """tune_graph_api's choice logic with the graph API stood in for by F.conv2d (no bias, as the real configs):
    a config that is right and faster wins, one whose result is off (here: the bias added) never does; for a twin
    pair (g2), a fused 1x1 shortcut and stride 2 too."""
    for key in ("2x16x6x8->24 k3 s1 p1", "2x16x6x8->24 k3 s1 p1 g2", "2x16x6x8->24 k3 s1 p1 +1x1(8)",
                "2x16x6x8->24 k3 s1 p1 g2 +1x1(8)", "2x16x6x8->24 k3 s2 p1 g2"):
        s = ConvShape.from_key(key)
        t = conv_tuning.conv_inputs(s, torch.float32, torch.device("cpu"))
        bias = t.bs[0].reshape(s.groups, -1)[0].reshape(1, -1, 1, 1)

        def right(x, w, padding, plan, stride=1, shortcut=None, shortcut_weight=None):
            return _grouped_conv(x, w, padding, plan, stride, shortcut, shortcut_weight)

        plans = {"right": right, "with-bias": lambda *a, **k: right(*a, **k) + bias}
        monkeypatch.setattr(cudnn_conv, "plan_names", lambda x, w, padding, stride=1: list(plans))
        monkeypatch.setattr(cudnn_conv, "run", lambda x, w, padding, plan, stride=1, shortcut=None,
                            shortcut_weight=None: plans[plan](x, w, padding, plan, stride, shortcut, shortcut_weight))
        monkeypatch.setattr(cudnn_conv, "run_groups", lambda x, w, padding, plan, stride=1, shortcut=None,
                            shortcut_weights=None: plans[plan](x, w, padding, plan, stride, shortcut, shortcut_weights))
        monkeypatch.setattr(conv_tuning, "graph_time_us", lambda make_call: make_call(0)() is not None and 10.0)
        slower = ConvChoice("triton", ConvConfig(64, 64, 64, 1, 4, 3), 30.0, 20.0)
        best = conv_tuning.tune_graph_api(s, t, slower)
        assert (best.backend, best.plan, best.best_us, best.cudnn_us) == ("cudnn_graph", "right", 10.0, 30.0), key
        faster = ConvChoice("triton", ConvConfig(64, 64, 64, 1, 4, 3), 30.0, 5.0)
        assert conv_tuning.tune_graph_api(s, t, faster) is faster
        # two kernels (conv, then the shortcut's GEMM) must win by SHORTCUT_MARGIN_US
        close = ConvChoice("triton", ConvConfig(64, 64, 64, 1, 4, 3), 30.0, 10.0 + conv_tuning.SHORTCUT_MARGIN_US / 2)
        assert (conv_tuning.tune_graph_api(s, t, close) is close) == bool(s.shortcut), key
        del plans["right"]
        assert conv_tuning.tune_graph_api(s, t, slower) is slower


def test_a_twin_downsampler_pair_on_a_graph_api_config_computes_each_networks_convolution(monkeypatch):
    """_TwinConv with an engine config's name: the pair's weights as cuDNN reads them (each KRSC), stride 2, each
    network's bias, with the call stood in for by F.conv2d."""
    from torch import nn

    from engines.torch_fast.twin import _Stack, _TwinConv

    monkeypatch.setattr(cudnn_conv, "conv2d", _grouped_conv)
    torch.manual_seed(0)
    pair = tuple(nn.Conv2d(16, 16, 3, stride=2, padding=1) for _ in range(2))
    owner = nn.Module()
    conv = _TwinConv(pair, _Stack(owner), "eng62_test")
    assert conv.plan == "eng62_test" and conv.config is None
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv.weight.permute(0, 1, 4, 2, 3))
    x = torch.randn(4, 16, 6, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = conv(x)
        ref = torch.cat([c(xs) for c, xs in zip(pair, x.chunk(2))])
    assert got.shape == (4, 16, 3, 4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_swapped_convolution_on_a_graph_api_config_computes_the_conv2d(monkeypatch, stride):
    """CudnnGraphConv2d (what the runner swaps in outside fused blocks and the twin, e.g. the downsamplers of the
    two-stream step): stride, padding and the bias added after, with the call stood in for by F.conv2d."""
    from torch import nn

    from engines.torch_fast.gemm_conv import CudnnGraphConv2d

    monkeypatch.setattr(cudnn_conv, "conv2d", _grouped_conv)
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=stride, padding=1)
    swapped = CudnnGraphConv2d(conv, "eng62_test")
    assert swapped.weight.is_contiguous(memory_format=torch.channels_last) and f"stride={stride}" in repr(swapped)
    x = torch.randn(2, 16, 6, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), conv(x), rtol=1e-5, atol=1e-5)
