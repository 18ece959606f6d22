"""Decoder attention explorer, the pictures: numpy/Pillow drawings of ``attention_viz``'s numbers.

- a patch-to-patch line overlay on the canvas (``render_lines``), or a labelled heatmap of the
  decoder-to-encoder matrix (``render_heatmap``, ``label_heatmap``); ``render_attention`` and
  ``draw_attention`` compute, then draw, one of the two with its statistics;
- one masked patch's attention, drawn per layer on the canvas (``render_patch_attention``);
- a clickable picture of the predicted frame and the click-to-patch mapping that inverts it
  (``patch_picker_image``, ``picker_patch``).

Colour maps come from ``matplotlib.colormaps[name]`` used as lookup tables (pyplot keeps every
figure alive in a server); lines are drawn with Pillow ``ImageDraw`` on an RGBA overlay and
alpha-composited (faster than a matplotlib ``LineCollection``). No torch, no gradio, no model.
"""

from __future__ import annotations

from functools import lru_cache
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from attention_viz import (
    PATCH_SIZE,
    VIZ_LINES,
    N_HEADS,
    N_LAYERS,
    Connections,
    Slot,
    attention_view,
    check_whole,
    format_weight,
    heads_text,
    patch_regions,
    patch_sources,
    statistics_markdown,
    validate_controls,
)
from images import enlarge, panel_grid

if TYPE_CHECKING:  # type hints only: importing the world model would pull in torch
    from autoencoder_concat_predictor_world_model import AttentionCapture

# -----------------------------------------------------------------------------
# constants

# one colour per decoder layer (RGB, bright enough to read on a dark canvas); cycled past layer 4
LAYER_COLOURS = [
    (255, 99, 71),  # L0 tomato
    (255, 215, 0),  # L1 gold
    (50, 205, 50),  # L2 lime green
    (0, 191, 255),  # L3 deep sky blue
    (238, 130, 238),  # L4 violet
]

DIM = 0.6  # canvas brightness under the line overlay
BELOW_THRESHOLD_DIM = 0.3  # heatmap brightness of cells that no selected layer keeps at the quantile
MIN_LINE_WIDTH, MAX_LINE_WIDTH = 1, 4  # line width in pixels (at scale 1) for the weakest/strongest kept weight
MIN_LINE_ALPHA, MAX_LINE_ALPHA = 90, 230  # line opacity for the weakest/strongest kept weight
LEGEND_HEIGHT = 18  # legend strip height in pixels (at scale 1)
LINES_SCALE = 2  # the lines view is drawn at 2x (1376 px wide): the page shows it about 1000 px wide, never stretched
COLOUR_BAR_WIDTH = 12  # heatmap colour bar width in pixels
COLOUR_BAR_LABEL_WIDTH = 52  # room right of the colour bar for its max/0 labels

# labelled heatmap (``label_heatmap``): matrix cell (i, j) starts at figure pixel
# (HEATMAP_TOP + i * cell, HEATMAP_LEFT + j * cell), whatever the matrix size
HEATMAP_TOP = 30  # title strip height above the matrix
HEATMAP_LEFT = 72  # left margin: y-axis title and grid-row ticks
TITLE_SIZE, LABEL_SIZE = 14, 12  # font sizes in pixels (the app shows the figure about 1200 px wide)
LABEL_ROW = 18  # height of one row of x-axis labels
TICK = 4  # tick mark length in pixels
INK = (20, 20, 20)  # text, tick and leader-line colour on the white figure

# one patch's attention (``render_patch_attention``)
PATCH_CMAP = "inferno"  # tint of the key patches: black (no weight) to pale yellow (the panel's max)
MAX_TINT_ALPHA = 0.85  # tint opacity of the strongest key; it falls linearly to 0 with the weight
QUERY_OUTLINE = (0, 255, 255)  # 2 px box around the query patch (cyan: not in the tint colour map)
STRIP_HEIGHT = 22  # label strip above each layer panel
PICKER_GRID = (128, 128, 128)  # patch grid lines on the clickable picture of the predicted frame
HEATMAP_CELL = 2  # pixels per matrix cell in the explorer's heatmap: ~1100 px wide, so the page shows its labels near 1:1
PATCH_PANEL_COLUMNS = 2  # one patch's attention: layer panels per row (two stay legible at the page's width)


# -----------------------------------------------------------------------------
# small helpers


def _patch_centres(ids: np.ndarray, grid_size: tuple[int, int], patch_size: int, scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.divmod(ids, grid_size[1])  # (n,), (n,) grid row and column of each patch
    return (cols + 0.5) * patch_size * scale, (rows + 0.5) * patch_size * scale


def _colour_lut(cmap: str) -> np.ndarray:
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"Unknown colour map {cmap!r}") from None
    return (colormap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)  # (256, 3)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _layer_colour(layer_id: int) -> tuple[int, int, int]:
    return LAYER_COLOURS[layer_id % len(LAYER_COLOURS)]


def _check_rgb(image, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return image


# -----------------------------------------------------------------------------
# rendering


def render_lines(
    canvas: np.ndarray,
    connections: Connections,
    grid_size: tuple[int, int],
    patch_size: int,
    scale: int = 1,
) -> np.ndarray:
    """Draw each connection as a line from its key patch centre to its query patch centre.

    Lines are coloured by decoder layer (``LAYER_COLOURS``); width (1..4 px, times ``scale``) and
    opacity grow with the weight, normalised to the kept set's min..max. Each query endpoint gets a
    small dot in the colour of its strongest connection. A legend strip (one swatch per layer in
    ``connections.layer_ids``) sits under the canvas.

    Args:
        canvas: uint8 (H, W, 3), H = rows * patch_size, W = columns * patch_size.
        connections: from ``filter_connections`` with grid patch ids.
        grid_size: (rows, columns) of the patch grid.
        patch_size: patch side in pixels.
        scale: integer upscaling of the canvas (nearest neighbour) before drawing.

    Returns:
        uint8 (H * scale + legend, W * scale, 3).
    """
    canvas = _check_rgb(canvas, "Canvas")
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"Scale must be a positive integer, got {scale}")
    base = (canvas.astype(np.float32) * DIM).astype(np.uint8)  # (H, W, 3) dimmed so lines stand out
    if scale > 1:
        base = enlarge(base, scale)  # (H*s, W*s, 3)
    H, W = base.shape[:2]
    image = Image.fromarray(np.dstack([base, np.full((H, W), 255, np.uint8)]))  # (H, W, 4) opaque RGBA
    overlay = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)

    if len(connections.weight):
        w = connections.weight.astype(np.float64)
        span = w.max() - w.min()
        norm = (w - w.min()) / span if span > 0 else np.ones_like(w)  # (C,) 0 = weakest kept, 1 = strongest
        widths = (np.rint(MIN_LINE_WIDTH + (MAX_LINE_WIDTH - MIN_LINE_WIDTH) * norm) * scale).astype(int)
        alphas = np.rint(MIN_LINE_ALPHA + (MAX_LINE_ALPHA - MIN_LINE_ALPHA) * norm).astype(int)
        kx, ky = _patch_centres(connections.key, grid_size, patch_size, scale)
        qx, qy = _patch_centres(connections.query, grid_size, patch_size, scale)
        colours = np.asarray([_layer_colour(int(l)) for l in connections.layer_ids])[connections.layer_index]  # (C, 3)
        fills = np.column_stack([colours, alphas]).tolist()  # (C, 4) RGBA
        segments = np.column_stack([kx, ky, qx, qy]).tolist()  # (C, 4) x0, y0, x1, y1
        for seg, fill, width in zip(segments, fills, widths.tolist()):  # kept connections, weakest first
            draw.line(seg, fill=tuple(fill), width=width)

        # one dot per query, coloured like its strongest connection (the last one, since sorted weakest first)
        last = len(w) - 1 - np.unique(connections.query[::-1], return_index=True)[1]  # (n_queries,)
        r = 2 * scale
        for x, y, colour in zip(qx[last].tolist(), qy[last].tolist(), colours[last].tolist()):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(*colour, 255), outline=(255, 255, 255, 255))

    image = Image.alpha_composite(image, overlay).convert("RGB")
    legend = _legend(W, connections, scale)
    return np.concatenate([np.asarray(image), legend], axis=0)  # (H + legend, W, 3)


def _legend(width: int, connections: Connections, scale: int) -> np.ndarray:
    h = LEGEND_HEIGHT * scale
    strip = Image.new("RGB", (width, h), (32, 32, 32))
    draw = ImageDraw.Draw(strip)
    font = _font(10 * scale)
    x, sw = 6 * scale, 10 * scale
    top = (h - sw) // 2
    for layer in connections.layer_ids:  # at most 5 layers
        draw.rectangle([x, top, x + sw, top + sw], fill=_layer_colour(layer))
        draw.text((x + sw + 3 * scale, top - scale), f"L{layer}", fill=(230, 230, 230), font=font)
        x += 40 * scale
    shown = f"{len(connections.weight):,} of {connections.total:,} lines" if connections.truncated else f"{connections.total:,} lines"
    draw.text((x + 10 * scale, top - scale), f"{shown}; width and opacity grow with weight; dot = masked query",
              fill=(170, 170, 170), font=font)
    return np.asarray(strip)


def render_heatmap(
    matrix: np.ndarray,
    key_ids: np.ndarray,
    query_ids: np.ndarray,
    grid_size: tuple[int, int],
    cmap: str = "viridis",
    cell: int = 3,
    *,
    patch_size: int = PATCH_SIZE,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """The decoder-to-encoder matrix as a colour-mapped image with a colour bar.

    A (n_layers, Q, K) matrix is first averaged over its layers (mean, whatever the head
    aggregation was). Rows are the masked query patches in row-major grid order. Columns are the
    visible key patches ordered left to right on the canvas (grid column, then row), so the key
    regions form contiguous blocks frame t-1 | separator 1 | frame t | separator 2; a 1 px white
    line (overwriting the first pixel column of the new block) marks each region change (regions by
    patch centre, see ``patch_regions``). Colours are normalised to the matrix max (0 -> bottom of
    the colour map). Cells outside ``keep`` (below the quantile threshold) are drawn at
    ``BELOW_THRESHOLD_DIM`` brightness, so the quantile control highlights the kept connections
    while the rest of the matrix stays readable. Pixel (y, x) of the heatmap area is matrix cell
    (y // cell, x // cell).

    Args:
        matrix: float (Q, K) or (n_layers, Q, K).
        key_ids: (K,) grid index of each column.
        query_ids: (Q,) grid index of each row.
        grid_size: (rows, columns) of the patch grid.
        cmap: a ``matplotlib.colormaps`` name.
        cell: pixels per matrix cell (nearest-neighbour enlargement).
        patch_size: patch side in pixels (for the region boundaries).
        keep: optional bool (Q, K), True = at or above the threshold; None = draw every cell at full colour.

    Returns:
        uint8 (Q * cell, K * cell + colour bar, 3).
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim == 3:
        matrix = matrix.mean(axis=0)  # (Q, K) mean over the selected layers
    key_ids, query_ids = np.asarray(key_ids, dtype=np.int64), np.asarray(query_ids, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape != (query_ids.size, key_ids.size) or matrix.size == 0:
        raise ValueError(f"Matrix shape {matrix.shape} does not match {query_ids.size} queries x {key_ids.size} keys")
    cell = int(cell)
    if cell < 1:
        raise ValueError(f"Cell size must be a positive integer, got {cell}")
    lut = _colour_lut(cmap)
    cols = grid_size[1]
    row_order = np.argsort(query_ids, kind="stable")  # row-major grid order
    col_order = np.lexsort((key_ids // cols, key_ids % cols))  # by grid column, then row: left to right
    m = matrix[np.ix_(row_order, col_order)]  # (Q, K)

    peak = float(m.max())
    idx = np.rint(np.clip(m / peak, 0, 1) * 255).astype(np.uint8) if peak > 0 else np.zeros(m.shape, np.uint8)
    img = lut[idx]  # (Q, K, 3)
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != matrix.shape:
            raise ValueError(f"keep must have the matrix shape {matrix.shape}, got {keep.shape}")
        dim = np.where(keep[np.ix_(row_order, col_order)], 1.0, BELOW_THRESHOLD_DIM).astype(np.float32)  # (Q, K)
        img = (img * dim[..., None]).astype(np.uint8)  # (Q, K, 3)
    img = enlarge(img, cell)  # (Q*cell, K*cell, 3) crisp cells

    regions, _ = patch_regions(grid_size, patch_size)
    key_regions = regions[key_ids[col_order]]  # (K,)
    changes = np.flatnonzero(np.diff(key_regions) != 0) + 1  # first column of each new region
    img[:, changes * cell] = 255

    # colour bar: max at the top, 0 at the bottom, labelled with the value range
    h = img.shape[0]
    bar = lut[np.rint(np.linspace(255, 0, h)).astype(np.uint8)]  # (h, 3)
    bar = np.repeat(bar[:, None, :], COLOUR_BAR_WIDTH, axis=1)  # (h, bar_w, 3)
    gap = np.full((h, 4, 3), 255, np.uint8)
    labels = Image.new("RGB", (COLOUR_BAR_LABEL_WIDTH, h), (255, 255, 255))
    draw = ImageDraw.Draw(labels)
    font = _font(10)
    draw.text((3, 0), format_weight(peak), fill=(0, 0, 0), font=font)
    draw.text((3, max(h - 12, 12)), "0", fill=(0, 0, 0), font=font)
    return np.concatenate([img, gap, bar, np.asarray(labels)], axis=1)  # (Q*cell, K*cell + 4 + bar + labels, 3)


# -----------------------------------------------------------------------------
# heatmap labels


class TextLabel(NamedTuple):
    """One text of a figure, its top-left corner at (x, y); vertical text reads bottom to top."""

    text: str
    x: int
    y: int
    size: int = LABEL_SIZE
    vertical: bool = False

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in pixels, end-exclusive: the area the text may ink."""
        _, _, w, h = _font(self.size).getbbox(self.text)
        return (self.x, self.y, self.x + h, self.y + w) if self.vertical else (self.x, self.y, self.x + w, self.y + h)


class HeatmapLayout(NamedTuple):
    """Where ``label_heatmap`` put the matrix and its labels.

    Attributes:
        origin: (y, x) figure pixel of matrix cell (0, 0): always (HEATMAP_TOP, HEATMAP_LEFT).
        size: (height, width) of the figure.
        labels: every text of the figure; no two boxes overlap, and none overlaps the matrix or colour bar.
        row_ticks: int64 (R,) figure y of the tick marks left of the matrix (boundaries between grid rows).
        column_ticks: int64 (C,) figure x of the tick marks under the matrix (region boundaries and both ends).
        leaders: polylines [(x, y), ...] from a narrow region block down to its label in the second label row.
    """

    origin: tuple[int, int]
    size: tuple[int, int]
    labels: list[TextLabel]
    row_ticks: np.ndarray
    column_ticks: np.ndarray
    leaders: list[list[tuple[int, int]]]


def heatmap_title(layer_ids: tuple[int, ...], head_ids: tuple[int, ...], aggregation: str, quantile: float) -> str:
    """The labelled heatmap's title: which layers and heads it shows, and what the quantile does to it.

    Args:
        layer_ids: selected decoder layers, sorted (the heatmap averages them).
        head_ids: selected heads, sorted.
        aggregation: how the heads are combined: "mean", "max" or "sum".
        quantile: percentile threshold in [0, 100]; cells below it are dimmed.

    Returns:
        e.g. "Decoder attention: layers L0, L1, L2 (averaged); heads H0-H3 combined by mean; strongest 5% at
        full colour, the rest dimmed".
    """
    layers = (f"layer L{layer_ids[0]}" if len(layer_ids) == 1
              else f"layers {', '.join(f'L{l}' for l in layer_ids)} (averaged)")
    if quantile <= 0:
        shown = "every cell at full colour"
    elif quantile >= 100:
        shown = "only the strongest cell at full colour, the rest dimmed"
    else:
        shown = f"strongest {100 - quantile:.3g}% at full colour, the rest dimmed"
    return f"Decoder attention: {layers}; {heads_text(tuple(head_ids), aggregation)}; {shown}"


def _x_labels(key_ids: np.ndarray, grid_size: tuple[int, int], patch_size: int, cell: int,
              bottom: int) -> tuple[list[TextLabel], list[list[tuple[int, int]]], np.ndarray]:
    """Region names under their column blocks: first row, centred, when the name fits its block; else second
    row, left to right without overlapping, with a leader line from the block. ``bottom``: first row under the matrix."""
    regions, names = patch_regions(grid_size, patch_size)
    order = np.lexsort((key_ids // grid_size[1], key_ids % grid_size[1]))  # (K,) left to right, as render_heatmap
    key_regions = regions[key_ids[order]]  # (K,)
    starts = np.flatnonzero(np.r_[True, np.diff(key_regions) != 0])  # (B,) first column of each block
    ends = np.r_[starts[1:], key_regions.size]  # (B,) one past its last column
    first_row, second_row = bottom + TICK + 2, bottom + TICK + 2 + LABEL_ROW
    labels, leaders, free_x = [], [], HEATMAP_LEFT  # free_x: where the next second-row label may start
    for start, end, region in zip(starts.tolist(), ends.tolist(), key_regions[starts].tolist()):  # a few regions
        name = names[region]
        width = _font(LABEL_SIZE).getbbox(name)[2]
        centre = HEATMAP_LEFT + (start + end) * cell // 2
        if width + 4 <= (end - start) * cell:
            labels.append(TextLabel(name, centre - width // 2, first_row))
            continue
        x = max(centre - width // 2, free_x)
        labels.append(TextLabel(name, x, second_row))
        free_x = x + width + 8
        elbow = second_row - 2  # just above the label's ink, just below the first row's
        leaders.append([(centre, bottom), (centre, elbow), (min(max(centre, x), x + width), elbow)])
    column_ticks = HEATMAP_LEFT + np.r_[starts * cell, key_regions.size * cell - 1]  # (B + 1,)
    return labels, leaders, column_ticks


def _y_labels(query_ids: np.ndarray, grid_cols: int, cell: int, height: int) -> tuple[list[TextLabel], np.ndarray]:
    """Left of the matrix: a tick at every grid-row boundary, 'row r' at the first, middle and last grid row, and
    the axis title (vertical, centred on the matrix when it fits)."""
    q_rows = np.sort(query_ids) // grid_cols  # (Q,) grid row of each heatmap row (row-major order)
    grid_rows, first, counts = np.unique(q_rows, return_index=True, return_counts=True)  # (R,) each
    labels, last_y = [], -LABEL_ROW
    for i in sorted({0, len(grid_rows) // 2, len(grid_rows) - 1}):  # at most three labels
        text = f"row {grid_rows[i]}"
        _, _, w, h = _font(LABEL_SIZE).getbbox(text)
        y = max(HEATMAP_TOP + int((first[i] + counts[i] / 2) * cell) - h // 2, HEATMAP_TOP)
        if y >= last_y + LABEL_ROW:  # a label too close to the previous one is left out
            labels.append(TextLabel(text, HEATMAP_LEFT - TICK - 3 - w, y))
            last_y = y
    title = "queries: masked slot (predicted frame), row-major"
    length = _font(LABEL_SIZE).getbbox(title)[2]
    labels.append(TextLabel(title, 4, HEATMAP_TOP + max(0, (height - length) // 2), vertical=True))
    return labels, HEATMAP_TOP + first[1:] * cell


def _bar_labels(peak: float, x: int, height: int) -> list[TextLabel]:
    """Right of the colour bar: its max at the top, 0 at the bottom, then the vertical title 'layer-mean weight'."""
    top = TextLabel(format_weight(peak), x, HEATMAP_TOP)
    zero_height = _font(LABEL_SIZE).getbbox("0")[3]
    zero = TextLabel("0", x, max(HEATMAP_TOP + height - zero_height, top.box[3] + 2))
    title = "layer-mean weight"
    length = _font(LABEL_SIZE).getbbox(title)[2]
    title_x = max(top.box[2], zero.box[2]) + 6
    return [top, zero, TextLabel(title, title_x, HEATMAP_TOP + max(0, (height - length) // 2), vertical=True)]


def _heatmap_layout(
    height: int,
    body_width: int,
    key_ids: np.ndarray,
    query_ids: np.ndarray,
    grid_size: tuple[int, int],
    title: str,
    peak: float,
    cell: int,
    patch_size: int,
) -> HeatmapLayout:
    """Layout of ``label_heatmap`` around a matrix picture ``height`` high, ``body_width`` wide (matrix, gap, bar)."""
    x_labels, leaders, column_ticks = _x_labels(key_ids, grid_size, patch_size, cell, HEATMAP_TOP + height)
    y_labels, row_ticks = _y_labels(query_ids, grid_size[1], cell, height)
    bar = _bar_labels(peak, HEATMAP_LEFT + body_width + 4, height)
    if bar[-1].box[3] > HEATMAP_TOP + height:  # a short matrix: the bar's title reaches down to the region names
        bar = _bar_labels(peak, max([bar[0].x] + [label.box[2] + 8 for label in x_labels]), height)
    labels = [TextLabel(title, 6, 7, TITLE_SIZE), *y_labels, *x_labels, *bar]
    axis = "keys: visible patches of the canvas, left to right"
    y = max(HEATMAP_TOP + height + TICK + 2 + 2 * LABEL_ROW, max(label.box[3] for label in labels) + 4)
    x = HEATMAP_LEFT + max(0, (key_ids.size * cell - _font(LABEL_SIZE).getbbox(axis)[2]) // 2)
    labels.append(TextLabel(axis, x, y))
    size = (max(label.box[3] for label in labels) + 6,
            max(max(label.box[2] for label in labels) + 6, HEATMAP_LEFT + body_width))
    return HeatmapLayout((HEATMAP_TOP, HEATMAP_LEFT), size, labels, row_ticks, column_ticks, leaders)


def _draw_labels(image: Image.Image, labels: list[TextLabel], leaders: list[list[tuple[int, int]]]) -> None:
    draw = ImageDraw.Draw(image)
    for line in leaders:  # one per narrow region block
        draw.line(line, fill=INK, width=1)
    for label in labels:  # a dozen texts
        font = _font(label.size)
        if not label.vertical:
            draw.text((label.x, label.y), label.text, fill=INK, font=font)
            continue
        _, _, w, h = font.getbbox(label.text)
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).text((0, 0), label.text, fill=255, font=font)
        image.paste(INK, (label.x, label.y), mask.rotate(90, expand=True))  # (h, w): reads bottom to top


def label_heatmap(
    heatmap: np.ndarray,
    key_ids: np.ndarray,
    query_ids: np.ndarray,
    grid_size: tuple[int, int],
    *,
    title: str,
    peak: float,
    cell: int = 3,
    patch_size: int = PATCH_SIZE,
) -> tuple[np.ndarray, HeatmapLayout]:
    """A ``render_heatmap`` picture framed by a title, axis labels and a labelled colour bar, drawn with Pillow.

    Top to bottom: the title strip (HEATMAP_TOP px high); the matrix, with the grid-row labels ("row 0", the
    middle and the last row) and the vertical y-axis title in the left margin (HEATMAP_LEFT px wide) and, right
    of the colour bar, its max, 0 and the vertical title "layer-mean weight"; under the matrix the key region
    names (two rows of LABEL_ROW px: a name wider than its block goes to the second row with a leader line) and
    the x-axis title. The matrix, the gap and the colour bar are copied unchanged; the picture's own small
    colour-bar labels (its last COLOUR_BAR_LABEL_WIDTH columns) are replaced by larger ones. Matrix cell (i, j)
    starts at figure pixel (HEATMAP_TOP + i * cell, HEATMAP_LEFT + j * cell) for every matrix size.

    Args:
        heatmap: uint8 (Q * cell, K * cell + colour bar, 3) from ``render_heatmap``.
        key_ids: (K,) grid index of each matrix column, as given to ``render_heatmap``.
        query_ids: (Q,) grid index of each matrix row.
        grid_size: (rows, columns) of the patch grid.
        title: text of the title strip (``heatmap_title``).
        peak: the value at the top of the colour bar (the max of the layer-averaged matrix).
        cell: pixels per matrix cell, as given to ``render_heatmap``.
        patch_size: patch side in pixels (for the key regions).

    Returns:
        (figure, layout): uint8 (H', W', 3) on white, H' > HEATMAP_TOP + Q * cell, W' > HEATMAP_LEFT + K * cell;
        the HeatmapLayout it was drawn with (matrix origin, texts and their boxes, tick marks, leader lines).
    """
    heatmap = _check_rgb(heatmap, "heatmap")
    key_ids, query_ids = np.asarray(key_ids, dtype=np.int64), np.asarray(query_ids, dtype=np.int64)
    cell = check_whole(cell, "cell", 1)
    expected = (query_ids.size * cell, key_ids.size * cell + 4 + COLOUR_BAR_WIDTH + COLOUR_BAR_LABEL_WIDTH)
    if heatmap.shape[:2] != expected:  # render_heatmap: matrix, 4 px gap, colour bar, its labels
        raise ValueError(f"heatmap must be the render_heatmap picture of {query_ids.size} queries x {key_ids.size} "
                         f"keys at cell {cell}, (height, width) {expected}; got {heatmap.shape[:2]}")
    height, width = heatmap.shape[0], heatmap.shape[1] - COLOUR_BAR_LABEL_WIDTH  # matrix, gap and colour bar
    layout = _heatmap_layout(height, width, key_ids, query_ids, grid_size, title, peak, cell, patch_size)
    figure = np.full((*layout.size, 3), 255, np.uint8)  # (H', W', 3) white
    figure[HEATMAP_TOP:HEATMAP_TOP + height, HEATMAP_LEFT:HEATMAP_LEFT + width] = heatmap[:, :width]
    figure[layout.row_ticks[:, None], np.arange(HEATMAP_LEFT - TICK, HEATMAP_LEFT)] = INK  # (R, TICK) tick marks
    below = np.arange(HEATMAP_TOP + height, HEATMAP_TOP + height + TICK)  # (TICK,) rows just under the matrix
    figure[below[:, None], layout.column_ticks] = INK  # (TICK, C) tick marks
    image = Image.fromarray(figure)
    _draw_labels(image, layout.labels, layout.leaders)
    return np.asarray(image), layout


def render_attention(
    capture: AttentionCapture,
    quantile,
    layers,
    heads,
    aggregation,
    viz_type,
) -> tuple[np.ndarray, dict, str]:
    """Validate the controls, compute the decoder-to-encoder attention and draw it.

    Args:
        capture: ``AttentionCapture`` (weights (layers, heads, N, N), patch_mask (L,), grid_size,
            canvas uint8 (H, W, 3), patch_size).
        quantile: percentile threshold in [0, 100].
        layers: selected decoder layers.
        heads: selected heads.
        aggregation: "mean", "max" or "sum" over heads.
        viz_type: VIZ_LINES or VIZ_HEATMAP.

    Returns:
        (image uint8 (H', W', 3), statistics dict as in ``attention_statistics``, markdown summary).

    Raises:
        ValueError: for invalid controls or an inconsistent capture.
    """
    weights = np.asarray(capture.weights)
    n_layers, n_heads = (weights.shape[0], weights.shape[1]) if weights.ndim == 4 else (N_LAYERS, N_HEADS)
    controls = validate_controls(quantile, layers, heads, aggregation, viz_type, n_layers=n_layers, n_heads=n_heads)
    return draw_attention(capture, *controls)


def draw_attention(
    capture: AttentionCapture,
    q: float,
    layer_ids: tuple[int, ...],
    head_ids: tuple[int, ...],
    agg: str,
    viz: str,
) -> tuple[np.ndarray, dict, str]:
    """``render_attention`` for controls a caller has already checked (``validate_controls``, or the
    app's own input checks), so a redraw validates its controls once. Same returns and errors."""
    view = attention_view(capture, q, layer_ids, head_ids, agg, viz)
    matrix, connections, grid_size, patch_size = view.matrix, view.connections, view.grid_size, view.patch_size
    key_ids, query_ids = view.key_ids, view.query_ids
    if viz == VIZ_LINES:
        canvas = np.asarray(capture.canvas)
        if canvas.shape[:2] != (grid_size[0] * patch_size, grid_size[1] * patch_size):
            raise ValueError(f"Canvas {canvas.shape[:2]} does not match the {grid_size} grid of {patch_size} px patches")
        image = render_lines(canvas, connections, grid_size, patch_size, scale=LINES_SCALE)
    else:
        keep = (matrix >= matrix.dtype.type(connections.threshold)).any(axis=0)  # (Q, K) kept in some selected layer
        heatmap = render_heatmap(matrix, key_ids, query_ids, grid_size, cell=HEATMAP_CELL, patch_size=patch_size, keep=keep)
        peak = float(matrix.mean(axis=0).max())  # render_heatmap's colour scale: the max of the layer mean
        title = heatmap_title(layer_ids, head_ids, agg, q)
        image, _ = label_heatmap(heatmap, key_ids, query_ids, grid_size, title=title, peak=peak, cell=HEATMAP_CELL,
                                 patch_size=patch_size)
        return image, view.stats, heatmap_scale_note(peak, len(layer_ids), view.stats) + statistics_markdown(view.stats)
    return image, view.stats, statistics_markdown(view.stats)


def heatmap_scale_note(peak: float, n_layers: int, stats: dict) -> str:
    """Why the heatmap's colour bar and the statistics' max differ: the heatmap colours the mean over
    the selected layers, the statistics count each layer's kept weights on their own."""
    return (f"_Heatmap colours: the mean over the {n_layers} selected layer(s), from 0 to {format_weight(peak)} (the "
            f"colour bar). The statistics below count every layer's weights on their own: their max, "
            f"{format_weight(stats['distribution']['max'])}, is the largest weight in any one layer._\n\n")


# -----------------------------------------------------------------------------
# one patch's attention


def _canvas_with_prediction(capture: AttentionCapture, slot: Slot, grid_size: tuple[int, int],
                            patch_size: int) -> np.ndarray:
    canvas = _check_rgb(capture.canvas, "canvas")
    if canvas.shape[:2] != (grid_size[0] * patch_size, grid_size[1] * patch_size):
        raise ValueError(f"canvas {canvas.shape[:2]} does not match the {grid_size} grid of {patch_size} px patches")
    prediction = getattr(capture, "prediction", None)  # captures made before the field existed have none
    if prediction is None:
        return canvas
    prediction = _check_rgb(prediction, "prediction")
    y, x, h, w = slot.top * patch_size, slot.left * patch_size, slot.rows * patch_size, slot.cols * patch_size
    if prediction.shape[:2] != (h, w):
        raise ValueError(f"prediction must fill the predicted slot, (height, width) ({h}, {w}); "
                         f"got {prediction.shape[:2]}")
    canvas = canvas.copy()
    canvas[y:y + h, x:x + w] = prediction
    return canvas


def _tint(canvas: np.ndarray, weights: np.ndarray, key_ids: np.ndarray, grid_size: tuple[int, int],
          patch_size: int) -> np.ndarray:
    """Dim the canvas, then tint each key patch PATCH_CMAP(w / max) at opacity MAX_TINT_ALPHA * w / max."""
    rows, cols = grid_size
    peak = float(weights.max())
    norm = np.zeros(rows * cols, np.float32)  # (L,) masked patches stay 0: untinted
    norm[key_ids] = weights / peak if peak > 0 else 0.0
    colour = _colour_lut(PATCH_CMAP)[np.rint(norm * 255).astype(np.uint8)].reshape(rows, cols, 3)  # (rows, cols, 3)
    alpha = (norm * np.float32(MAX_TINT_ALPHA)).reshape(rows, cols, 1)  # (rows, cols, 1)
    colour = enlarge(colour, patch_size)  # (H, W, 3) patch -> pixels
    alpha = enlarge(alpha, patch_size)  # (H, W, 1)
    base = (canvas.astype(np.float32) * DIM).astype(np.uint8).astype(np.float32)  # (H, W, 3) dimmed as under the lines
    return np.rint(base + (colour - base) * alpha).astype(np.uint8)  # (H, W, 3)


def _outline(panel: np.ndarray, patch_id: int, grid_cols: int, patch_size: int) -> None:
    r, c = divmod(patch_id, grid_cols)
    box = panel[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size]  # (p, p, 3) view
    inner = box[2:-2, 2:-2].copy()
    box[:] = QUERY_OUTLINE  # a 2 px ring inside the patch: the outline never leaves the canvas
    box[2:-2, 2:-2] = inner


def _label_strip(width: int, text: str, colour: tuple[int, int, int]) -> np.ndarray:
    strip = Image.new("RGB", (width, STRIP_HEIGHT), (32, 32, 32))
    draw = ImageDraw.Draw(strip)
    draw.rectangle([6, 6, 15, 15], fill=colour)
    draw.text((22, 3), text, fill=(235, 235, 235), font=_font(13))
    return np.asarray(strip)  # (STRIP_HEIGHT, width, 3)


def render_patch_attention(
    capture: AttentionCapture,
    row: int,
    col: int,
    layer_ids: Iterable[int],
    head_ids: Iterable[int],
    aggregation: str,
    top_k: int = 3,
) -> tuple[np.ndarray, list[dict], str]:
    """Where one patch of the predicted frame looks: a panel per selected layer, its strongest sources, a table.

    Each panel is the capture canvas (``capture.prediction`` pasted into the slot when present) dimmed by DIM,
    every visible key tinted by PATCH_CMAP scaled to the panel's max weight (opacity grows with the weight), the
    query patch outlined by a 2 px QUERY_OUTLINE ring, under a strip "L{i}: strongest source ...".

    Args:
        capture: ``AttentionCapture`` (canvas uint8 (H, W, 3), patch_size and optional prediction as well).
        row, col: the query patch inside the predicted slot, as ``patch_attention``.
        layer_ids: selected decoder layers.
        head_ids: selected heads.
        aggregation: "mean", "max" or "sum" over the selected heads.
        top_k: strongest keys listed per layer, a whole number >= 1 (at most K are listed).

    Returns:
        (image uint8, sources, markdown). The image holds one panel (a STRIP_HEIGHT label strip over the H x W
        canvas) per selected layer, PATCH_PANEL_COLUMNS to a row with 6 px white gaps. sources: per layer, its
        top_k keys strongest first, dicts {layer, rank (1 = strongest), region, row, col (inside the region, see
        ``attention_viz._frame_cols``), grid_row, grid_col, weight}. markdown: a heading naming the query and a table of sources.

    Raises:
        ValueError: naming the invalid argument and its range.
    """
    query, sources, markdown = patch_sources(capture, row, col, layer_ids, head_ids, aggregation, top_k)
    k = len(sources) // len(query.layer_ids)  # sources listed per layer
    patch_size = int(capture.patch_size)
    canvas = _canvas_with_prediction(capture, query.slot, query.grid_size, patch_size)
    panels = []
    for i, layer in enumerate(query.layer_ids):  # one panel per selected layer (a handful)
        panel = _tint(canvas, query.matrix[i], query.key_ids, query.grid_size, patch_size)  # (H, W, 3)
        _outline(panel, query.query_id, query.grid_size[1], patch_size)
        best = sources[i * k]
        text = (f"L{layer}: strongest source {best['region']} row {best['row']} col {best['col']} "
                f"(weight {format_weight(best['weight'])})")
        panels.append(np.concatenate([_label_strip(panel.shape[1], text, _layer_colour(layer)), panel]))
    return panel_grid(panels, PATCH_PANEL_COLUMNS), sources, markdown


# -----------------------------------------------------------------------------
# clickable picture of the predicted slot


def patch_picker_image(prediction: np.ndarray, patch_size: int, scale: int = 2,
                       selected: tuple[int, int] | None = None) -> np.ndarray:
    """The predicted frame enlarged, with a grey patch grid, for picking a query patch by clicking; the
    ``selected`` (row, col) patch, if any, is ringed in QUERY_OUTLINE.

    Args:
        prediction: uint8 (H, W, 3), H and W multiples of ``patch_size``.
        patch_size: patch side in pixels, a whole number >= 1.
        scale: enlargement (nearest neighbour), a whole number >= 1.

    Returns:
        uint8 (H * scale, W * scale, 3); the first pixel row and column of every patch but the top and left ones
        are a 1 px PICKER_GRID line, so lines repeat every patch_size * scale pixels (``picker_patch`` inverts it).
    """
    prediction = _check_rgb(prediction, "prediction")
    patch_size, scale = check_whole(patch_size, "patch_size", 1), check_whole(scale, "scale", 1)
    H, W = prediction.shape[:2]
    if H % patch_size or W % patch_size:
        raise ValueError(f"prediction height and width must be multiples of patch_size {patch_size}, got {H} x {W}")
    image = enlarge(prediction, scale)  # (H*s, W*s, 3)
    step = patch_size * scale
    image[step::step] = PICKER_GRID  # horizontal lines between patch rows
    image[:, step::step] = PICKER_GRID  # vertical lines between patch columns
    if selected is not None:
        rows, cols = H // patch_size, W // patch_size
        row, col = check_whole(selected[0], "selected row", 0, rows), check_whole(selected[1], "selected col", 0, cols)
        _outline(image, row * cols + col, cols, step)  # a 2 px ring inside the enlarged patch
    return image


def picker_patch(x, y, shape_hw: tuple[int, int], patch_size: int, scale: int = 2) -> tuple[int, int]:
    """The patch under a click on a ``patch_picker_image`` picture.

    Args:
        x: clicked pixel column, a whole number in [0, width).
        y: clicked pixel row, a whole number in [0, height).
        shape_hw: (height, width) of the picture, multiples of patch_size * scale.
        patch_size: patch side in pixels of the predicted frame, a whole number >= 1.
        scale: the picture's enlargement, a whole number >= 1.

    Returns:
        (row, col) of the patch in the predicted slot.

    Raises:
        ValueError: naming x or y and its range when the click is outside the picture, or the bad argument.
    """
    step = check_whole(patch_size, "patch_size", 1) * check_whole(scale, "scale", 1)
    if len(tuple(shape_hw)) != 2:
        raise ValueError(f"shape_hw must be (height, width), got {shape_hw!r}")
    height, width = (check_whole(v, "shape_hw", step) for v in shape_hw)
    if height % step or width % step:
        raise ValueError(f"shape_hw must be multiples of patch_size * scale = {step}, got {tuple(shape_hw)}")
    x, y = check_whole(x, "x", 0, width), check_whole(y, "y", 0, height)
    return y // step, x // step
