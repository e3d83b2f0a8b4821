"""The DDIM tables against design.md part 2 (e), and the CFG / update / control-scale maths."""

import numpy as np
import pytest
import torch

from profiles import ControlNetRTError
from scheduler import alphas_cumprod, cfg_mix, control_scales, ddim_timesteps, ddim_update, make_ddim_tables

# design.md (e): index: t, a_t, a_prev (index 0 is the LAST sampling step)
DESIGN_TABLE = {
    0: (1, 0.99829602, 0.99914998), 1: (51, 0.95052433, 0.99829602), 9: (451, 0.34555823, 0.42288151),
    10: (501, 0.27499905, 0.34555823), 18: (901, 0.01400490, 0.02307699), 19: (951, 0.00815500, 0.01400490),
}


def test_alphas_cumprod_endpoints():
    ac = alphas_cumprod()
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert ac[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert ac[999].item() == pytest.approx(0.0046601, abs=1e-6)


def test_timesteps_have_the_plus_one_offset():
    assert ddim_timesteps(20) == [1 + 50 * i for i in range(20)]
    assert make_ddim_tables(20).timesteps.tolist() == [951 - 50 * k for k in range(20)]


def test_tables_match_design_values():
    tables = make_ddim_tables(20)
    for index, (t, a_t, a_prev) in DESIGN_TABLE.items():
        k = 19 - index  # tables are in sampling order
        assert int(tables.timesteps[k]) == t
        assert tables.alphas[k].item() == pytest.approx(a_t, abs=1e-8)
        assert tables.alphas_prev[k].item() == pytest.approx(a_prev, abs=1e-8)
    # the final step goes to alphas_cumprod[0], not to 1
    assert tables.alphas_prev[-1].item() == alphas_cumprod()[0].item() != 1.0


def test_coeffs_are_float32_square_roots():
    tables = make_ddim_tables(20)
    a, ap = tables.alphas, tables.alphas_prev
    expected = torch.stack([a.sqrt(), (1 - a).sqrt(), ap.sqrt(), (1 - ap).sqrt()], 1)
    assert tables.coeffs.dtype == torch.float32
    assert torch.equal(tables.coeffs, expected)


def test_ddim_update_matches_p_sample_ddim_formula():
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    tables = make_ddim_tables(20)
    k = 7
    a_t, a_prev = tables.alphas[k].double(), tables.alphas_prev[k].double()
    pred_x0 = (x.double() - (1 - a_t).sqrt() * e.double()) / a_t.sqrt()
    expected = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e.double()
    torch.testing.assert_close(ddim_update(x, e, tables.coeffs[k]).double(), expected, rtol=1e-5, atol=1e-5)


def test_cfg_mix():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert cfg_mix(c, u, 9.0).item() == 10.0


def test_control_scales_normal_and_guess_mode():
    assert torch.equal(control_scales(0.5, False), torch.full((2, 13), 0.5))
    guess = control_scales(1.0, True)
    np.testing.assert_allclose(guess[0].numpy(), [0.825 ** (12 - i) for i in range(13)], rtol=1e-6)
    assert guess[0, 12].item() == 1.0 and not guess[1].any()


def test_bad_schedule_arguments():
    with pytest.raises(ControlNetRTError, match="eta"):
        make_ddim_tables(20, eta=0.5)
    with pytest.raises(ControlNetRTError, match="ddim_steps"):
        make_ddim_tables(0)
