"""bench/inductor_code.py: the launch list of Inductor's generated modules, copies marked."""

import torch

from bench import inductor_code

_GPU_LIKE = """
triton_poi_fused_copy_0 = async_compile.triton('triton_poi_fused_copy_0', '''
import triton
from torch._inductor.runtime import triton_helpers, triton_heuristics

@triton_heuristics.pointwise(size_hints={'x': 1024})
@triton.jit
def triton_poi_fused_copy_0(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xindex = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)[:]
    x0 = (xindex % 320)
    tmp0 = tl.load(in_ptr0 + (x0 + 320*((xindex // 320) % 1536)), None).to(tl.float32)
    tl.store(out_ptr0 + (xindex), tmp0, None)
''', device_str='cuda')

triton_poi_fused_add_1 = async_compile.triton('triton_poi_fused_add_1', '''
import triton

@triton.jit
def triton_poi_fused_add_1(in_ptr0, in_ptr1, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xindex = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)[:]
    tmp0 = tl.load(in_ptr0 + (xindex), None)
    tmp1 = tl.load(in_ptr1 + (xindex), None)
    tmp2 = tmp0 + tmp1
    tl.store(out_ptr0 + (xindex), tmp2, None)
''', device_str='cuda')


class Runner:
    def call(self, args):
        arg0_1, arg1_1 = args
        assert_size_stride(arg0_1, (4, 320), (320, 1))
        buf0 = empty_strided_cuda((4, 320), (320, 1), torch.float16)
        # Topologically Sorted Source Nodes: [rows, out], Original ATen: [aten.view]
        triton_poi_fused_copy_0.run(arg0_1, buf0, 1280, stream=stream0)
        # Topologically Sorted Source Nodes: [h, out_2], Original ATen: [aten.bmm]
        extern_kernels.bmm(buf0, arg1_1, out=buf1)
        # Topologically Sorted Source Nodes: [h_1], Original ATen: [aten.add]
        triton_poi_fused_add_1.run(buf1, buf0, buf2, 1280, stream=stream0)
        torch.ops.cnrt.accumulate_mm.default(buf2, buf0, arg1_1)
        return (buf2, )

    def other(self):
        triton_poi_fused_add_1.run(1)
"""


def test_launches_in_order_with_sources_and_copies_marked(tmp_path):
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "module.py").write_text(_GPU_LIKE)
    found = inductor_code.launches(_GPU_LIKE)
    assert [f.name for f in found] == ["triton_poi_fused_copy_0", "extern_kernels.bmm", "triton_poi_fused_add_1",
                                       "torch.ops.cnrt.accumulate_mm"]
    assert [f.data_only for f in found] == [True, False, False, False]
    assert found[1].sources == "h, out_2"
    text = inductor_code.summarise(tmp_path)
    assert text.startswith("== ab/module.py: 4 launches, 1 only move data")
    assert "triton_poi_fused_copy_0  [data only]" in text


def test_reads_a_real_generated_module(tmp_path, monkeypatch):
    """A function compiled on the CPU: its cpp kernels and the extern matmul are listed in call order."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()

    def f(x, w):
        return torch.relu(x @ w + 1.0).sum(-1)

    torch.compile(f)(torch.randn(8, 16), torch.randn(16, 4))
    text = inductor_code.summarise(tmp_path)
    assert "extern_kernels.mm" in text, text
    assert "cpp_fused" in text, text
    assert inductor_code.main([str(tmp_path / "missing")]) == 2
