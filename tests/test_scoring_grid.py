"""The comparison sheet: layout arithmetic, cell placement, colour order and labels."""

import numpy as np
import pytest

from scoring.grid import BACKGROUND, GridLayout, GridRow, build_grid, column_titles


def _row(seed, h=32, w=48, with_reference=True):
    rng = np.random.default_rng(seed)
    make = lambda: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    edges = (rng.random((h, w)) > 0.8).astype(np.uint8) * 255
    return GridRow(input_bgr=make(), edges=edges, result_rgb=make(), reference_rgb=make() if with_reference else None,
                   caption=f"bird_{seed}  1.0 ms")


def test_layout_shape_and_origins():
    layout = GridLayout(cell_h=32, cell_w=48, columns=4, rows=3)
    assert layout.shape == (24 + 3 * (32 + 20 + 4), 4 + 4 * (48 + 4), 3)
    assert layout.cell_origin(0, 0) == (24, 4)
    assert layout.cell_origin(2, 3) == (24 + 2 * 56, 4 + 3 * 52)


def test_cells_hold_the_images_in_display_colours():
    rows = [_row(0), _row(1)]
    sheet = build_grid(rows)
    layout = GridLayout(32, 48, 4, 2)
    assert sheet.shape == layout.shape and sheet.dtype == np.uint8
    for r, row in enumerate(rows):
        expected = [row.input_bgr, np.repeat(row.edges[:, :, None], 3, 2), row.reference_rgb[:, :, ::-1],
                    row.result_rgb[:, :, ::-1]]
        for c, cell in enumerate(expected):
            y, x = layout.cell_origin(r, c)
            np.testing.assert_array_equal(sheet[y:y + 32, x:x + 48], cell)


def test_labels_are_drawn_in_header_and_caption_strips():
    sheet = build_grid([_row(0)])
    layout = GridLayout(32, 48, 4, 1)
    header = sheet[:layout.header_h]
    assert (header != BACKGROUND).any()
    y, _ = layout.cell_origin(0, 0)
    caption = sheet[y + 32:y + 32 + layout.caption_h]
    assert (caption != BACKGROUND).any()


def test_without_reference_there_are_three_columns_and_cells_are_resized():
    row = _row(3, with_reference=False)
    small_input = GridRow(input_bgr=row.input_bgr[::2, ::2].copy(), edges=row.edges, result_rgb=row.result_rgb)
    sheet = build_grid([small_input])
    assert column_titles(False) == ["input", "canny edges", "result"]
    assert sheet.shape == GridLayout(32, 48, 3, 1).shape


def test_mixed_reference_rows_are_rejected():
    with pytest.raises(ValueError):
        build_grid([_row(0), _row(1, with_reference=False)])
    with pytest.raises(ValueError):
        build_grid([])
