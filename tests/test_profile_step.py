"""bench.profile_step's kernel kinds: a kernel is counted where its time goes, whatever its name mentions."""

from __future__ import annotations

import pytest

from bench.profile_step import kernel_kind


@pytest.mark.parametrize("name,kind", [
    ("triton_poi_fused_conv2d_launch_silu_0", "triton (fused elementwise / norm)"),
    ("triton_red_fused_convolution_native_group_norm_3", "triton (fused elementwise / norm)"),
    ("triton_per_fused_add_sum_12", "triton (fused elementwise / norm)"),
    ("_conv_tma_kernel", "convolution"),
    ("_conv_nhwc_kernel", "convolution"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("_attention_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("_geglu_tma_kernel", "other"),
])
def test_kernel_kind(name, kind):
    assert kernel_kind(name) == kind
