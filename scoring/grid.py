"""A labelled comparison sheet: one row per image, columns input | canny edges | fp32 reference | result.

Built with numpy and cv2 only. The returned array is BGR for cv2.imwrite/imencode. Inputs are BGR (cv2.imread);
the pipeline's outputs are RGB, so they are flipped here and the sheet shows the colours the model produced
(the result JPEGs, saved like the original with cv2.imwrite on RGB data, have red and blue swapped on disk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND = 255
TEXT_COLOR = (0, 0, 0)
FONT_SCALE = 0.45


@dataclass(frozen=True)
class GridRow:
    input_bgr: np.ndarray
    edges: np.ndarray  # (H, W) or (H, W, 3) uint8
    result_rgb: np.ndarray
    reference_rgb: "np.ndarray | None" = None
    caption: str = ""


@dataclass(frozen=True)
class GridLayout:
    cell_h: int
    cell_w: int
    columns: int
    rows: int
    header_h: int = 24
    caption_h: int = 20
    pad: int = 4

    @property
    def shape(self) -> tuple[int, int, int]:
        height = self.header_h + self.rows * (self.cell_h + self.caption_h + self.pad)
        width = self.pad + self.columns * (self.cell_w + self.pad)
        return height, width, 3

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left (y, x) of a cell's image."""
        return (self.header_h + row * (self.cell_h + self.caption_h + self.pad),
                self.pad + col * (self.cell_w + self.pad))


def column_titles(with_reference: bool) -> list[str]:
    return ["input", "canny edges"] + (["fp32 reference"] if with_reference else []) + ["result"]


def _fit(image: np.ndarray, h: int, w: int) -> np.ndarray:
    import cv2

    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    return image


def _put_text(canvas: np.ndarray, text: str, y_baseline: int, x: int) -> None:
    import cv2

    cv2.putText(canvas, text, (x, y_baseline), cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, TEXT_COLOR, 1, cv2.LINE_AA)


def build_grid(rows: list[GridRow]) -> np.ndarray:
    """(height, width, 3) uint8 BGR sheet; every cell is resized to the first result's size."""
    if not rows:
        raise ValueError("build_grid needs at least one row")
    with_reference = rows[0].reference_rgb is not None
    if any((r.reference_rgb is not None) != with_reference for r in rows):
        raise ValueError("either every row has a reference image or none has")
    titles = column_titles(with_reference)
    cell_h, cell_w = rows[0].result_rgb.shape[:2]
    layout = GridLayout(cell_h, cell_w, len(titles), len(rows))
    canvas = np.full(layout.shape, BACKGROUND, np.uint8)
    for col, title in enumerate(titles):
        _, x = layout.cell_origin(0, col)
        _put_text(canvas, title, layout.header_h - 8, x)
    for r, row in enumerate(rows):
        cells = [row.input_bgr, row.edges]
        if with_reference:
            cells.append(row.reference_rgb[:, :, ::-1])
        cells.append(row.result_rgb[:, :, ::-1])
        for col, cell in enumerate(cells):
            y, x = layout.cell_origin(r, col)
            canvas[y:y + cell_h, x:x + cell_w] = _fit(np.ascontiguousarray(cell), cell_h, cell_w)
        y, _ = layout.cell_origin(r, 0)
        _put_text(canvas, row.caption, y + cell_h + layout.caption_h - 6, layout.pad)
    return canvas
