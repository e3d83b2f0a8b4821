"""bench/inductor_code.py: the launch list of Inductor's generated modules, copies marked; and a profiled step's
Inductor kernels against the bytes Inductor estimated for them."""

import pytest
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


_WITH_BYTES = """
triton_red_fused_var_mean_0 = async_compile.triton('triton_red_fused_var_mean_0', '''
@triton_heuristics.reduction(
    inductor_meta={'grid_type': 'Grid1D', 'kernel_name': 'triton_red_fused_var_mean_0', 'num_load': 1, 'kernel_num_gb': 0.004},
)
''', device_str='cuda')
triton_poi_fused_add_1 = async_compile.triton('triton_poi_fused_add_1', '''
    inductor_meta={'kernel_name': 'triton_poi_fused_add_1', 'kernel_num_gb': 0.001},
''', device_str='cuda')
triton_poi_fused_cat_2 = async_compile.triton('triton_poi_fused_cat_2', '''
    inductor_meta={'kernel_name': 'triton_poi_fused_cat_2', 'kernel_num_gb': 0.0},
''', device_str='cuda')
"""

# two steps of a profiled loop: start, duration, gap, name (as profile_step --sequence-out writes them)
_SEQUENCE = """\
       0.0     1.0    0.0  Memcpy DtoD (Device -> Device)
      10.0     2.0    9.0  triton_poi_fused_add_1
      11.0    12.0    0.0  triton_red_fused_var_mean_0
      23.5     5.0    0.5  nvjet_sm90_gemm
      28.0     3.0    0.0  triton_poi_fused_cat_2
      40.0     2.0    9.0  triton_poi_fused_add_1
      41.0     4.0    0.0  triton_red_fused_var_mean_0
      45.0     1.0    0.0  triton_poi_fused_cat_2
"""


def test_kernel_bytes_skips_kernels_without_an_estimate():
    assert inductor_code.kernel_bytes(_WITH_BYTES) == {"triton_red_fused_var_mean_0": 4e6,
                                                       "triton_poi_fused_add_1": 1e6}


def test_steps_and_critical_path():
    steps = inductor_code.split_steps(inductor_code.read_sequence(_SEQUENCE), 2)
    assert [len(s) for s in steps] == [4, 3]  # the leading copy belongs to no step
    # each kernel is charged from the latest end before it to its own end (PDL overlap counts once)
    assert inductor_code.critical_path(steps[0]) == [2.0, 11.0, 5.5, 2.5]
    with pytest.raises(ValueError, match="not 3 steps"):
        inductor_code.split_steps(inductor_code.read_sequence(_SEQUENCE), 3)


def test_excess_table_orders_kernels_by_time_above_their_bytes():
    step = inductor_code.split_steps(inductor_code.read_sequence(_SEQUENCE), 2)[0]
    table = inductor_code.excess_table(step, [inductor_code.kernel_bytes(_WITH_BYTES)], 1e12, 10)
    lines = table.splitlines()
    assert lines[0].startswith("3 Inductor kernels a step, 16 us on the critical path; 2 with bytes: 13 us "
                               "against 5 us")
    # the reduction: 11 us on the path against 4 us of bytes at 1 TB/s; the add: 2 against 1
    assert lines[2].split()[:6] == ["1", "11.0", "12.0", "4.00", "4.0", "7.0"]
    assert lines[3].split()[0] == "0" and lines[3].split()[-1] == "triton_poi_fused_add_1"
    assert len(lines) == 4  # the cat has no estimate, the GEMM is not Inductor's
