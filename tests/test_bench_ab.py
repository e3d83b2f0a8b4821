"""bench.ab's parsing: variant settings and the loop figure of profile_step's output."""

from __future__ import annotations

import pytest

from bench.ab import loop_ms, parse_setting, variant_timeout


def test_settings_parse_to_environment_entries():
    assert parse_setting("CNRT_A=0 CNRT_B=1e9") == {"CNRT_A": "0", "CNRT_B": "1e9"}
    assert parse_setting("") == {}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_setting("CNRT_A")


def test_loop_figure_is_read_from_profile_step_output():
    out = "parts compiled\nloop (one graph, twin encoder): 72.78 ms (min 72.65)\ndecode 2.7 ms"
    assert loop_ms(out) == 72.78
    assert loop_ms("rc 1, no loop line") is None


def test_the_first_variant_gets_time_to_compile_cold():
    assert [variant_timeout(i, 200, 90) for i in range(3)] == [290, 200, 200]
    assert variant_timeout(0, 200, 0) == 200
