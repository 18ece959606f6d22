"""Decoder attention explorer: pure numpy/Pillow functions behind README section 6.

The decoder of the canvas MAE sees 1 + L tokens (token 0 = CLS, tokens 1..L = the patches of the
canvas grid in row-major order). Its attention tells how each masked patch of the next-frame slot
(a decoder query) gathers information from the visible patches of the history frames and action
separators (encoder keys). This module turns an ``AttentionCapture`` into:

- a (layers, Q, K) decoder-to-encoder matrix (masked rows, visible columns, heads aggregated),
- the connections at or above a percentile threshold,
- statistics and a markdown summary of them,
- a patch-to-patch line overlay on the canvas, or a labelled heatmap of the matrix,
- one masked patch's attention, drawn per layer on the canvas (``render_patch_attention``),
- a clickable picture of the predicted frame that maps a click to its patch (``patch_picker_image``).

Everything is a function of arrays: no torch, no gradio, no model. Colour maps come from
``matplotlib.colormaps[name]`` used as lookup tables (never pyplot, STYLE.md habit 11); lines are
drawn with Pillow ``ImageDraw`` on an RGBA overlay and alpha-composited (GRADIO_NOTES.md 3.4).
References: timm ``utils/attention_extract.py``, lucidrains ``recorder.py``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from config import AutoencoderConcatPredictorWorldModelConfig

if TYPE_CHECKING:  # type hints only: importing the world model would pull in torch
    from autoencoder_concat_predictor_world_model import AttentionCapture

# -----------------------------------------------------------------------------
# constants

_CFG = AutoencoderConcatPredictorWorldModelConfig()  # read-only defaults: the canvas layout lives in config.py

VIZ_LINES = "Patch-to-Patch Lines"
VIZ_HEATMAP = "Heatmap"
VIZ_TYPES = (VIZ_LINES, VIZ_HEATMAP)
AGGREGATIONS = ("mean", "max", "sum")  # how the selected heads are combined

# one colour per decoder layer (RGB, bright enough to read on a dark canvas); cycled past layer 4
LAYER_COLOURS = [
    (255, 99, 71),  # L0 tomato
    (255, 215, 0),  # L1 gold
    (50, 205, 50),  # L2 lime green
    (0, 191, 255),  # L3 deep sky blue
    (238, 130, 238),  # L4 violet
]

MAX_LINES = 2000  # at most this many (strongest) connections are drawn; statistics count all of them
N_LAYERS = _CFG.decoder_depth  # default layer range for validation (5)
N_HEADS = _CFG.decoder_num_heads  # default head range for validation (4)
GRID_SIZE = _CFG.grid_size  # default (rows, columns) of the patch grid: (14, 43)
PATCH_SIZE = _CFG.patch_size  # default patch side in pixels: 16
FRAME_WIDTH = _CFG.frame_size[1]  # width in pixels of one frame slot: 224
SEPARATOR_WIDTH = _CFG.separator_width  # width in pixels of an action separator: 8

DIM = 0.6  # canvas brightness under the line overlay
BELOW_THRESHOLD_DIM = 0.3  # heatmap brightness of cells that no selected layer keeps at the quantile
MIN_LINE_WIDTH, MAX_LINE_WIDTH = 1, 4  # line width in pixels (at scale 1) for the weakest/strongest kept weight
MIN_LINE_ALPHA, MAX_LINE_ALPHA = 90, 230  # line opacity for the weakest/strongest kept weight
LEGEND_HEIGHT = 18  # legend strip height in pixels (at scale 1)
COLOUR_BAR_WIDTH = 12  # heatmap colour bar width in pixels
COLOUR_BAR_LABEL_WIDTH = 52  # room right of the colour bar for its max/0 labels
SPARK = "▁▂▃▄▅▆▇█"  # histogram glyphs for the markdown summary

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


@dataclass(frozen=True)
class Connections:
    """Decoder-to-encoder connections at or above a threshold, weakest first (so strong lines draw on top).

    All arrays have shape (C,), C = number of connections kept for drawing (at most ``max_lines``).

    Attributes:
        layer_index: int64, index into ``layer_ids`` (the selected layers list).
        layer: int64, the actual decoder layer id of each connection.
        query: int64, patch index in the full grid (row-major, CLS excluded) of the masked patch.
        key: int64, patch index in the full grid of the visible patch it attends to.
        weight: float32, aggregated attention weight.
        threshold: the weight at the requested percentile; every kept weight is >= it.
        total: number of entries at or above the threshold before the drawing cap (>= C).
        layer_ids: the selected decoder layers, in matrix order.
    """

    layer_index: np.ndarray
    layer: np.ndarray
    query: np.ndarray
    key: np.ndarray
    weight: np.ndarray
    threshold: float
    total: int
    layer_ids: tuple[int, ...]

    @property
    def truncated(self) -> bool:
        """True when fewer connections are kept for drawing than pass the threshold."""
        return self.total > len(self.weight)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _check_quantile(quantile) -> float:
    if quantile is None or isinstance(quantile, (bool, np.bool_)):
        raise ValueError(f"Quantile must be a number between 0 and 100, got {quantile!r}")
    if isinstance(quantile, str):
        try:
            value = float(quantile.strip())
        except ValueError:
            raise ValueError(f"Quantile must be a number between 0 and 100, got {quantile!r}") from None
    elif isinstance(quantile, numbers.Real):
        value = float(quantile)
    else:
        raise ValueError(f"Quantile must be a number between 0 and 100, got {quantile!r}")
    if not math.isfinite(value):
        raise ValueError(f"Quantile must be a finite number between 0 and 100, got {value}")
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"Quantile must be between 0 and 100, got {value:g}")
    return value


def _check_indices(selection, n: int, what: str) -> tuple[int, ...]:
    """Sorted unique indices in [0, n); ints or digit strings; ``what`` is 'decoder layer' or 'attention head'."""
    if selection is None or isinstance(selection, (str, bytes)) or not isinstance(selection, Iterable):
        raise ValueError(f"The {what} selection must be a list of indices, got {selection!r}")
    out = []
    for item in selection:  # a handful of checkbox values, not patches
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item.strip())
        if not _is_int(item):
            raise ValueError(f"A {what} must be an integer index, got {item!r}")
        if not 0 <= int(item) < n:
            raise ValueError(f"{what.capitalize()} {int(item)} does not exist; choose from 0-{n - 1}")
        out.append(int(item))
    if not out:
        raise ValueError(f"Select at least one {what}")
    return tuple(sorted(set(out)))


def _check_aggregation(aggregation) -> str:
    name = aggregation.strip().lower() if isinstance(aggregation, str) else aggregation
    if name not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    return name


def _check_weights(weights: np.ndarray, patch_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    weights, patch_mask = np.asarray(weights), np.asarray(patch_mask, dtype=bool)
    if weights.ndim != 4 or weights.shape[2] != weights.shape[3]:
        raise ValueError(f"Attention weights must have shape (layers, heads, N, N), got {weights.shape}")
    if patch_mask.shape != (weights.shape[2] - 1,):
        raise ValueError(f"Patch mask must have shape ({weights.shape[2] - 1},) = N - 1 (CLS excluded), got {patch_mask.shape}")
    if not patch_mask.any():
        raise ValueError("The patch mask has no masked patches, so the decoder has no queries to show")
    if patch_mask.all():
        raise ValueError("The patch mask has no visible patches, so the decoder has no keys to show")
    return weights, patch_mask


def _check_grid(grid_size: tuple[int, int], n_patches: int) -> tuple[int, int]:
    rows, cols = (int(v) for v in grid_size)
    if rows * cols != n_patches:
        raise ValueError(f"Grid {rows}x{cols} does not match {n_patches} patches")
    return rows, cols


def _aggregate(x: np.ndarray, aggregation: str, axis: int) -> np.ndarray:
    if aggregation == "mean":
        return x.mean(axis=axis, dtype=np.float32)
    if aggregation == "max":
        return x.max(axis=axis)
    return x.sum(axis=axis, dtype=np.float32)


def _gather_heads(weights: np.ndarray, patch_mask: np.ndarray, layers, heads, queries=None) -> np.ndarray:
    """(layers, heads, N, N) -> (n_layers_selected, n_heads_selected, Q, K) masked rows x visible columns.

    ``queries`` (optional positions among the masked patches) keeps only those rows: Q = len(queries)."""
    query_ids, key_ids = patch_ids(patch_mask)
    if queries is not None:
        query_ids = query_ids[np.asarray(queries)]  # (Q,)
    # +1 skips the CLS token; np.ix_ gathers only the needed entries (no full (N, N) copies)
    return weights[np.ix_(np.asarray(layers), np.asarray(heads), query_ids + 1, key_ids + 1)].astype(np.float32, copy=False)  # (nl, nh, Q, K)


def _patch_centres(ids: np.ndarray, grid_size: tuple[int, int], patch_size: int, scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.divmod(ids, grid_size[1])  # (n,), (n,) grid row and column of each patch
    return (cols + 0.5) * patch_size * scale, (rows + 0.5) * patch_size * scale


def _region_names(n_slots: int) -> tuple[str, ...]:
    names = []
    for slot in range(n_slots):
        names.append("masked slot" if slot == n_slots - 1 else f"frame t-{n_slots - 1 - slot}")
        if slot < n_slots - 1:
            names.append(f"separator {slot + 1}")
    return tuple(names)


def patch_regions(
    grid_size: tuple[int, int] = GRID_SIZE,
    patch_size: int = PATCH_SIZE,
    frame_width: int = FRAME_WIDTH,
    separator_width: int = SEPARATOR_WIDTH,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Canvas region of every patch, decided by the x coordinate of the patch centre.

    Regions alternate frame slot, separator, frame slot, ... (slot x-starts 0, 232, 464 on the
    default canvas). A separator band is a closed interval: a centre lying exactly on a separator
    edge counts to the separator. On the default grid this puts the two patch columns that are half
    separator (columns 14 and 28, centres x = 232 and 456) in separator 1 and separator 2, so both
    action bands are represented symmetrically.

    Args:
        grid_size: (rows, columns) of the patch grid.
        patch_size: patch side in pixels.
        frame_width: width in pixels of one frame slot.
        separator_width: width in pixels of one separator.

    Returns:
        (regions, names): int64 (L,) region index per patch (row-major), and the region names, e.g.
        ("frame t-2", "separator 1", "frame t-1", "separator 2", "masked slot").
    """
    rows, cols = grid_size
    period = frame_width + separator_width
    n_slots = (cols * patch_size + separator_width) // period
    x = (np.arange(cols) + 0.5) * patch_size  # (cols,) centre x of each grid column
    slot = np.floor(x / period).astype(np.int64)  # (cols,) slot whose frame-plus-separator span holds the centre
    within = x - slot * period
    region = np.where(within >= frame_width, 2 * slot + 1, 2 * slot)  # past the frame -> the separator after it
    region = np.where((within == 0) & (slot > 0), 2 * slot - 1, region)  # on a slot's left edge -> separator before
    region = np.minimum(region, 2 * n_slots - 2)
    return np.broadcast_to(region, (rows, cols)).reshape(-1).copy(), _region_names(n_slots)  # (L,)


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


def _fmt(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def _whole(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high) (no upper bound when high is None); 3.0 passes, 3.5, True and '3' do not."""
    real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    whole = _is_int(value) or (real and math.isfinite(value) and float(value).is_integer())
    if not whole or int(value) < low or (high is not None and int(value) >= high):
        allowed = f"from {low} to {high - 1}" if high is not None else f"of at least {low}"
        raise ValueError(f"{name} must be a whole number {allowed}, got {value!r}")
    return int(value)


def _check_rgb(image, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _ids_text(prefix: str, ids: tuple[int, ...]) -> str:
    """'H0-H3' for a run of three or more consecutive ids, else 'H0, H2'."""
    if len(ids) >= 3 and ids[-1] - ids[0] == len(ids) - 1:
        return f"{prefix}{ids[0]}-{prefix}{ids[-1]}"
    return ", ".join(f"{prefix}{i}" for i in ids)


def _heads_text(head_ids: tuple[int, ...], aggregation: str) -> str:
    if len(head_ids) == 1:
        return f"head H{head_ids[0]}"
    return f"heads {_ids_text('H', head_ids)} combined by {aggregation}"


# -----------------------------------------------------------------------------
# controls and matrices


def validate_controls(
    quantile,
    layers,
    heads,
    aggregation,
    viz_type,
    *,
    n_layers: int = N_LAYERS,
    n_heads: int = N_HEADS,
) -> tuple[float, tuple[int, ...], tuple[int, ...], str, str]:
    """Check and normalise the explorer's controls.

    Args:
        quantile: percentile threshold, a finite number (or numeric string) in [0, 100]; 95 keeps
            the strongest 5 %. Booleans, None, NaN and infinities are refused.
        layers: iterable of selected decoder layer indices (ints or digit strings) in [0, n_layers).
        heads: iterable of selected attention head indices in [0, n_heads).
        aggregation: one of AGGREGATIONS (case-insensitive).
        viz_type: one of VIZ_TYPES.
        n_layers: decoder layers available.
        n_heads: heads per decoder layer.

    Returns:
        (quantile, layers, heads, aggregation, viz_type); layers and heads sorted and de-duplicated.

    Raises:
        ValueError: with a message naming the offending control.
    """
    q = _check_quantile(quantile)
    layer_ids = _check_indices(layers, n_layers, "decoder layer")
    head_ids = _check_indices(heads, n_heads, "attention head")
    agg = _check_aggregation(aggregation)
    if not isinstance(viz_type, str) or viz_type not in VIZ_TYPES:
        raise ValueError(f"Unknown visualization type {viz_type!r}; choose one of {', '.join(VIZ_TYPES)}")
    return q, layer_ids, head_ids, agg, viz_type


def patch_ids(patch_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices of the decoder queries and encoder keys.

    Args:
        patch_mask: bool (L,), True = masked (predicted).

    Returns:
        (query_ids, key_ids): int64 (Q,) masked patches and int64 (K,) visible patches, both in
        row-major grid order, CLS excluded.
    """
    patch_mask = np.asarray(patch_mask, dtype=bool)
    return np.flatnonzero(patch_mask), np.flatnonzero(~patch_mask)


def decoder_to_encoder(
    weights: np.ndarray,
    patch_mask: np.ndarray,
    layers: Iterable[int],
    heads: Iterable[int],
    aggregation: str,
) -> np.ndarray:
    """Attention from masked patches (decoder queries) to visible patches (encoder keys).

    Args:
        weights: float (layers, heads, N, N), N = 1 + L, token 0 = CLS, rows softmax over keys.
        patch_mask: bool (L,), True = masked (predicted next-frame slot).
        layers: selected decoder layer indices.
        heads: selected head indices.
        aggregation: "mean", "max" or "sum" over the selected heads.

    Returns:
        float32 (n_layers_selected, Q, K): rows = masked patches, columns = visible patches, both
        in grid order (see ``patch_ids``); the CLS key and masked keys are dropped, so rows no
        longer sum to 1.
    """
    weights, patch_mask = _check_weights(weights, patch_mask)
    layer_ids = _check_indices(layers, weights.shape[0], "decoder layer")
    head_ids = _check_indices(heads, weights.shape[1], "attention head")
    heads_t = _gather_heads(weights, patch_mask, layer_ids, head_ids)  # (nl, nh, Q, K)
    return _aggregate(heads_t, _check_aggregation(aggregation), axis=1)  # (nl, Q, K)


def filter_connections(
    matrix: np.ndarray,
    quantile: float,
    *,
    layer_ids: Iterable[int] | None = None,
    query_ids: np.ndarray | None = None,
    key_ids: np.ndarray | None = None,
    max_lines: int | None = MAX_LINES,
) -> Connections:
    """Connections whose weight is at or above the ``quantile``-th percentile of all entries.

    The percentile is taken over every entry of every selected layer together, so 95 keeps the
    strongest 5 %, 0 keeps everything and 100 keeps only the entries equal to the maximum (ties
    can keep a few more). At most ``max_lines`` of them, the strongest, are returned for drawing;
    ``total`` counts all of them.

    Args:
        matrix: float (n_layers_selected, Q, K) from ``decoder_to_encoder``.
        quantile: percentile in [0, 100].
        layer_ids: actual layer id of each matrix layer (default 0..n-1).
        query_ids: (Q,) grid index of each row (default 0..Q-1).
        key_ids: (K,) grid index of each column (default 0..K-1).
        max_lines: cap on the returned connections; None = no cap.

    Returns:
        Connections sorted by weight, weakest first.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 3 or matrix.size == 0:
        raise ValueError(f"Attention matrix must have shape (layers, Q, K) and be non-empty, got {matrix.shape}")
    q = _check_quantile(quantile)
    n_layers, Q, K = matrix.shape
    layer_ids = np.arange(n_layers) if layer_ids is None else np.asarray(tuple(layer_ids), dtype=np.int64)
    query_ids = np.arange(Q) if query_ids is None else np.asarray(query_ids, dtype=np.int64)
    key_ids = np.arange(K) if key_ids is None else np.asarray(key_ids, dtype=np.int64)
    if layer_ids.shape != (n_layers,) or query_ids.shape != (Q,) or key_ids.shape != (K,):
        raise ValueError("layer_ids, query_ids and key_ids must match the matrix shape (layers, Q, K)")
    return _filter_connections(matrix, q, layer_ids, query_ids, key_ids, max_lines)


def _filter_connections(
    matrix: np.ndarray,
    q: float,
    layer_ids: np.ndarray,
    query_ids: np.ndarray,
    key_ids: np.ndarray,
    max_lines: int | None,
) -> Connections:
    # filter_connections on arguments already checked: q a float in [0, 100], the ids int64 matching the matrix
    flat_matrix = matrix.reshape(-1)  # (n_layers * Q * K,)
    threshold = matrix.dtype.type(np.percentile(flat_matrix, q))  # same dtype as the entries: exact >= comparison
    kept = np.flatnonzero(flat_matrix >= threshold)
    total = int(kept.size)
    weight = flat_matrix[kept]
    if max_lines is not None and total > max_lines:
        top = np.argpartition(weight, total - max_lines)[total - max_lines:]  # the max_lines strongest
        kept, weight = kept[top], weight[top]
    order = np.argsort(weight, kind="stable")  # weakest first: strongest lines are drawn on top
    kept, weight = kept[order], weight[order]
    li, qi, ki = np.unravel_index(kept, matrix.shape)  # (C,) each
    return Connections(
        layer_index=li.astype(np.int64),
        layer=layer_ids[li],
        query=query_ids[qi],
        key=key_ids[ki],
        weight=weight.astype(np.float32, copy=False),
        threshold=float(threshold),
        total=total,
        layer_ids=tuple(int(v) for v in layer_ids),
    )


# -----------------------------------------------------------------------------
# statistics


def _statistics(
    heads_t: np.ndarray,
    matrix: np.ndarray,
    threshold: float,
    layer_ids: tuple[int, ...],
    head_ids: tuple[int, ...],
    key_regions: np.ndarray,
    region_names: tuple[str, ...],
    max_lines: int | None,
) -> dict:
    keep = matrix >= matrix.dtype.type(threshold)  # (nl, Q, K) same rule as filter_connections
    kept_w = matrix[keep].astype(np.float64)  # (C,) in (layer, query, key) order
    total = int(kept_w.size)
    per_layer = keep.sum(axis=(1, 2))  # (nl,)
    dominant = heads_t.argmax(axis=1)  # (nl, Q, K) position (in head_ids) of the largest single head
    per_head = np.bincount(dominant[keep], minlength=len(head_ids))  # (nh,)
    kept_regions = key_regions[np.nonzero(keep)[2]]  # (C,) region of each kept connection's key
    region_w = np.bincount(kept_regions, weights=kept_w, minlength=len(region_names))  # (n_regions,)
    weight_sum = float(kept_w.sum())

    if total:
        p = np.percentile(kept_w, [0, 25, 50, 75, 100])
        counts, edges = np.histogram(kept_w, bins=10)
    else:  # only reachable with NaN weights
        p, counts, edges = np.zeros(5), np.zeros(10, np.int64), np.zeros(11)
    return {
        "total_connections": total,
        "drawn_connections": total if max_lines is None else min(total, max_lines),
        "weight_sum": weight_sum,
        "threshold": float(threshold),
        "per_layer": {int(l): int(c) for l, c in zip(layer_ids, per_layer)},
        "per_head": {int(h): int(c) for h, c in zip(head_ids, per_head)},
        "distribution": {
            "min": float(p[0]), "p25": float(p[1]), "median": float(p[2]), "p75": float(p[3]), "max": float(p[4]),
            "histogram": {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges]},
        },
        "region_share": {
            name: (float(w / weight_sum) if weight_sum > 0 else 0.0) for name, w in zip(region_names, region_w)
        },
        "layers": list(layer_ids),
        "heads": list(head_ids),
        "n_queries": int(matrix.shape[1]),
        "n_keys": int(matrix.shape[2]),
    }


def attention_statistics(
    weights: np.ndarray,
    patch_mask: np.ndarray,
    layers: Iterable[int],
    heads: Iterable[int],
    aggregation: str,
    quantile: float,
    *,
    grid_size: tuple[int, int] = GRID_SIZE,
    patch_size: int = PATCH_SIZE,
    max_lines: int | None = MAX_LINES,
) -> dict:
    """Statistics of the decoder-to-encoder connections kept at a percentile threshold.

    A connection is one entry (layer, query, key) of ``decoder_to_encoder(...)`` whose aggregated
    weight is at or above the ``quantile``-th percentile of all entries of the selected layers
    (the same rule as ``filter_connections``; the drawing cap does not apply here).

    Per-head count: each kept connection is credited to the selected head with the largest
    individual weight on that entry (its dominant head; ties go to the lower head id). The
    per-head counts therefore sum to ``total_connections`` and show which heads carry the
    strongest attention, for every aggregation (for "max" it is exactly the head that gave the max).

    Args:
        weights: float (layers, heads, N, N), N = 1 + L, token 0 = CLS.
        patch_mask: bool (L,), True = masked (predicted next-frame slot).
        layers: selected decoder layer indices.
        heads: selected head indices.
        aggregation: "mean", "max" or "sum" over the selected heads.
        quantile: percentile in [0, 100].
        grid_size: (rows, columns) of the patch grid, rows * columns = L.
        patch_size: patch side in pixels.
        max_lines: drawing cap, only used to report ``drawn_connections``.

    Returns:
        dict with total_connections, drawn_connections, weight_sum (of all kept connections),
        threshold, per_layer {layer id: count}, per_head {head id: count}, distribution {min, p25,
        median, p75, max, histogram {counts (10,), edges (11,)}} of the kept weights, region_share
        {region name: share of the kept weight sum whose key patch centre lies in that region},
        layers, heads, n_queries, n_keys. Plain Python types (JSON-serialisable).
    """
    weights, patch_mask = _check_weights(weights, patch_mask)
    q = _check_quantile(quantile)
    layer_ids = _check_indices(layers, weights.shape[0], "decoder layer")
    head_ids = _check_indices(heads, weights.shape[1], "attention head")
    grid_size = _check_grid(grid_size, patch_mask.size)
    heads_t = _gather_heads(weights, patch_mask, layer_ids, head_ids)  # (nl, nh, Q, K)
    matrix = _aggregate(heads_t, _check_aggregation(aggregation), axis=1)  # (nl, Q, K)
    threshold = float(matrix.dtype.type(np.percentile(matrix, q)))
    regions, names = patch_regions(grid_size, patch_size)
    _, key_ids = patch_ids(patch_mask)
    return _statistics(heads_t, matrix, threshold, layer_ids, head_ids, regions[key_ids], names, max_lines)


def statistics_markdown(stats: dict) -> str:
    """A compact markdown summary of ``attention_statistics`` output.

    Args:
        stats: dict returned by ``attention_statistics`` (or ``render_attention``).

    Returns:
        Markdown with a headline, how many connections are drawn as lines (not for the heatmap, which
        shows every cell), per-layer / per-head / per-region tables and the weight distribution
        (five-number summary plus a 10-bin text histogram).
    """
    total, drawn = stats["total_connections"], stats.get("drawn_connections", stats["total_connections"])
    lines = [
        f"**{total:,} connection{'' if total == 1 else 's'}** at or above threshold {_fmt(stats['threshold'])} "
        f"(weight sum {_fmt(stats['weight_sum'])}; masked queries {stats.get('n_queries', '?')} x "
        f"visible keys {stats.get('n_keys', '?')})",
    ]
    if total and stats.get("viz_type") != VIZ_HEATMAP:  # the heatmap shows every cell; lines are capped
        if drawn < total:
            lines.append(f"\nThe {drawn:,} strongest of them are drawn as lines.")
        else:
            lines.append("\nIt is drawn as a line." if total == 1 else "\nAll of them are drawn as lines.")

    per_layer, per_head = stats["per_layer"], stats["per_head"]
    lines += ["", "| Layer | " + " | ".join(f"L{l}" for l in per_layer) + " |",
              "|---|" + "---:|" * len(per_layer),
              "| Connections | " + " | ".join(f"{c:,}" for c in per_layer.values()) + " |"]
    lines += ["", "| Head (dominant) | " + " | ".join(f"H{h}" for h in per_head) + " |",
              "|---|" + "---:|" * len(per_head),
              "| Connections | " + " | ".join(f"{c:,}" for c in per_head.values()) + " |"]
    shares = stats["region_share"]
    lines += ["", "| Attention to | " + " | ".join(shares) + " |",
              "|---|" + "---:|" * len(shares),
              "| Share of kept weight | " + " | ".join(f"{100 * s:.1f}%" for s in shares.values()) + " |"]

    d = stats["distribution"]
    counts = np.asarray(d["histogram"]["counts"], dtype=np.float64)
    levels = np.ceil(counts / max(counts.max(), 1) * len(SPARK)).astype(int)  # (10,) 0 = empty bin
    spark = "".join(SPARK[k - 1] if k else " " for k in levels)
    lines += ["", "| min | p25 | median | p75 | max |", "|---:|---:|---:|---:|---:|",
              "| " + " | ".join(_fmt(d[k]) for k in ("min", "p25", "median", "p75", "max")) + " |",
              "", f"Kept weights, 10 bins from {_fmt(d['histogram']['edges'][0])} to "
                  f"{_fmt(d['histogram']['edges'][-1])}: `{spark}`",
              "", "_Head counts credit each kept connection to the head with the largest single weight on it._"]
    return "\n".join(lines)


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
        base = np.repeat(np.repeat(base, scale, axis=0), scale, axis=1)  # (H*s, W*s, 3) nearest
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
    regions form contiguous blocks frame t-2 | separator 1 | frame t-1 | separator 2; a 1 px white
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
    img = np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)  # (Q*cell, K*cell, 3) crisp cells

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
    draw.text((3, 0), _fmt(peak), fill=(0, 0, 0), font=font)
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
    return f"Decoder attention: {layers}; {_heads_text(tuple(head_ids), aggregation)}; {shown}"


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
    """Right of the colour bar: its max at the top, 0 at the bottom, then the vertical title 'attention weight'."""
    top = TextLabel(_fmt(peak), x, HEATMAP_TOP)
    zero_height = _font(LABEL_SIZE).getbbox("0")[3]
    zero = TextLabel("0", x, max(HEATMAP_TOP + height - zero_height, top.box[3] + 2))
    title = "attention weight"
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
    of the colour bar, its max, 0 and the vertical title "attention weight"; under the matrix the key region
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
    cell = _whole(cell, "cell", 1)
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
    weights, patch_mask = _check_weights(capture.weights, capture.patch_mask)
    if max(layer_ids) >= weights.shape[0] or max(head_ids) >= weights.shape[1]:
        raise ValueError(f"The capture has {weights.shape[0]} layers and {weights.shape[1]} heads")
    grid_size = _check_grid(capture.grid_size, patch_mask.size)
    patch_size = int(capture.patch_size)

    query_ids, key_ids = patch_ids(patch_mask)
    heads_t = _gather_heads(weights, patch_mask, layer_ids, head_ids)  # (nl, nh, Q, K)
    matrix = _aggregate(heads_t, agg, axis=1)  # (nl, Q, K)
    if not np.isfinite(matrix).all():
        raise ValueError("Attention weights contain NaN or infinite values")
    connections = _filter_connections(matrix, q, np.asarray(layer_ids, dtype=np.int64), query_ids, key_ids, MAX_LINES)
    regions, names = patch_regions(grid_size, patch_size)
    stats = _statistics(heads_t, matrix, connections.threshold, layer_ids, head_ids,
                        regions[key_ids], names, MAX_LINES)
    stats.update(quantile=q, aggregation=agg, viz_type=viz)

    if viz == VIZ_LINES:
        canvas = np.asarray(capture.canvas)
        if canvas.shape[:2] != (grid_size[0] * patch_size, grid_size[1] * patch_size):
            raise ValueError(f"Canvas {canvas.shape[:2]} does not match the {grid_size} grid of {patch_size} px patches")
        image = render_lines(canvas, connections, grid_size, patch_size)
    else:
        keep = (matrix >= matrix.dtype.type(connections.threshold)).any(axis=0)  # (Q, K) kept in some selected layer
        heatmap = render_heatmap(matrix, key_ids, query_ids, grid_size, cell=HEATMAP_CELL, patch_size=patch_size, keep=keep)
        peak = float(matrix.mean(axis=0).max())  # render_heatmap's colour scale: the max of the layer mean
        title = heatmap_title(layer_ids, head_ids, agg, q)
        image, _ = label_heatmap(heatmap, key_ids, query_ids, grid_size, title=title, peak=peak, cell=HEATMAP_CELL,
                                 patch_size=patch_size)
    return image, stats, statistics_markdown(stats)


# -----------------------------------------------------------------------------
# one patch's attention


class _Slot(NamedTuple):
    """The predicted slot: a block of rows x cols patches whose top-left patch is at grid (top, left)."""

    rows: int
    cols: int
    top: int
    left: int


class _PatchQuery(NamedTuple):
    """One masked query's attention and the checked controls it was computed with."""

    matrix: np.ndarray  # float32 (n_layers_selected, K) weight of each visible key
    key_ids: np.ndarray  # int64 (K,) grid index of each visible key, row-major
    row: int  # query patch row inside the predicted slot
    col: int  # query patch column inside the predicted slot
    query_id: int  # grid index of the query patch
    layer_ids: tuple[int, ...]
    head_ids: tuple[int, ...]
    aggregation: str
    grid_size: tuple[int, int]
    slot: _Slot


def _slot_block(patch_mask: np.ndarray, grid_cols: int) -> _Slot:
    query_ids = np.flatnonzero(patch_mask)  # (Q,) row-major
    q_rows, q_cols = np.divmod(query_ids, grid_cols)  # (Q,) each
    top, left = int(q_rows[0]), int(q_cols.min())
    rows, cols = int(q_rows[-1]) - top + 1, int(q_cols.max()) - left + 1
    block = (top + np.arange(rows))[:, None] * grid_cols + left + np.arange(cols)  # (rows, cols) grid ids of the block
    if not np.array_equal(query_ids, block.reshape(-1)):  # (rows * cols,)
        raise ValueError("patch_mask must mask one rectangular block of patches (the predicted slot)")
    return _Slot(rows, cols, top, left)


def _patch_query(capture: AttentionCapture, row, col, layers, heads, aggregation) -> _PatchQuery:
    weights, patch_mask = _check_weights(capture.weights, capture.patch_mask)
    grid_size = _check_grid(capture.grid_size, patch_mask.size)
    layer_ids = _check_indices(layers, weights.shape[0], "decoder layer")
    head_ids = _check_indices(heads, weights.shape[1], "attention head")
    agg = _check_aggregation(aggregation)
    slot = _slot_block(patch_mask, grid_size[1])
    row, col = _whole(row, "row", 0, slot.rows), _whole(col, "col", 0, slot.cols)
    heads_t = _gather_heads(weights, patch_mask, layer_ids, head_ids, [row * slot.cols + col])  # (nl, nh, 1, K)
    matrix = _aggregate(heads_t, agg, axis=1)[:, 0]  # (nl, K)
    if not np.isfinite(matrix).all():
        raise ValueError("Attention weights contain NaN or infinite values")
    query_id = (slot.top + row) * grid_size[1] + slot.left + col
    return _PatchQuery(matrix, patch_ids(patch_mask)[1], row, col, query_id, layer_ids, head_ids, agg, grid_size, slot)


def patch_attention(capture: AttentionCapture, row: int, col: int, layer_ids: Iterable[int], head_ids: Iterable[int],
                    aggregation: str) -> tuple[np.ndarray, np.ndarray]:
    """Attention of one masked patch of the predicted slot to every visible patch, per selected layer.

    Args:
        capture: ``AttentionCapture`` (weights (layers, heads, N, N), patch_mask (L,) whose masked patches form one
            block of rows x slot_cols patches, grid_size).
        row: patch row inside the predicted slot, a whole number in [0, rows).
        col: patch column inside the predicted slot, a whole number in [0, slot_cols).
        layer_ids: selected decoder layers.
        head_ids: selected heads.
        aggregation: "mean", "max" or "sum" over the selected heads.

    Returns:
        (matrix, key_ids): float32 (n_layers_selected, K) the query's weight to each visible key, layers sorted;
        int64 (K,) the keys' grid indices (row-major, CLS excluded), as ``patch_ids``.

    Raises:
        ValueError: naming row or col and its range, or the invalid control or capture field.
    """
    query = _patch_query(capture, row, col, layer_ids, head_ids, aggregation)
    return query.matrix, query.key_ids


def _frame_cols(grid_cols: np.ndarray, regions: np.ndarray, patch_size: int) -> np.ndarray:
    """Each key's column inside its region: the frame's own patch column holding the patch centre (frame t-1 is
    offset half a patch on the default canvas, so its grid column 20 is frame column 6); 0 in a separator."""
    slot_x = (grid_cols + 0.5) * patch_size - regions // 2 * (FRAME_WIDTH + SEPARATOR_WIDTH)  # centre x in its slot
    cols = np.clip(slot_x // patch_size, 0, FRAME_WIDTH // patch_size - 1).astype(np.int64)
    return np.where(regions % 2 == 1, 0, cols)  # odd regions are the separators


def _top_sources(query: _PatchQuery, patch_size: int, top_k: int) -> list[dict]:
    order = np.argsort(-query.matrix, axis=1, kind="stable")[:, :top_k]  # (nl, k) strongest first, ties in grid order
    keys = query.key_ids[order]  # (nl, k)
    grid_rows, grid_cols = np.divmod(keys, query.grid_size[1])  # (nl, k) each
    regions, names = patch_regions(query.grid_size, patch_size)
    key_regions = regions[keys]  # (nl, k)
    cols = _frame_cols(grid_cols, key_regions, patch_size)  # (nl, k)
    weights = np.take_along_axis(query.matrix, order, axis=1)  # (nl, k)
    return [
        {"layer": query.layer_ids[i], "rank": r + 1, "region": names[key_regions[i, r]], "row": int(grid_rows[i, r]),
         "col": int(cols[i, r]), "grid_row": int(grid_rows[i, r]), "grid_col": int(grid_cols[i, r]),
         "weight": float(weights[i, r])}
        for i, r in np.ndindex(*order.shape)  # layers x top_k rows of the table
    ]


def _canvas_with_prediction(capture: AttentionCapture, slot: _Slot, grid_size: tuple[int, int],
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
    colour = np.repeat(np.repeat(colour, patch_size, axis=0), patch_size, axis=1)  # (H, W, 3) patch -> pixels
    alpha = np.repeat(np.repeat(alpha, patch_size, axis=0), patch_size, axis=1)  # (H, W, 1)
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


def _sources_markdown(query: _PatchQuery, sources: list[dict]) -> str:
    lines = [f"### Patch (row {query.row}, col {query.col}) of the predicted frame, "
             f"{_heads_text(query.head_ids, query.aggregation)}", "",
             "| Layer | Rank | Region | Row | Col | Weight |", "|---|---:|---|---:|---:|---:|"]
    lines += [f"| L{s['layer']} | {s['rank']} | {s['region']} | {s['row']} | {s['col']} | {_fmt(s['weight'])} |"
              for s in sources]
    lines += ["", "_Row and col place the key inside its frame (a separator's col is 0). Each layer's panel tints "
                  "the keys by weight, scaled to that layer's strongest._"]
    return "\n".join(lines)


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
        ``_frame_cols``), grid_row, grid_col, weight}. markdown: a heading naming the query and a table of sources.

    Raises:
        ValueError: naming the invalid argument and its range.
    """
    query = _patch_query(capture, row, col, layer_ids, head_ids, aggregation)
    k = min(_whole(top_k, "top_k", 1), query.key_ids.size)
    patch_size = int(capture.patch_size)
    canvas = _canvas_with_prediction(capture, query.slot, query.grid_size, patch_size)
    sources = _top_sources(query, patch_size, k)
    panels = []
    for i, layer in enumerate(query.layer_ids):  # one panel per selected layer (a handful)
        panel = _tint(canvas, query.matrix[i], query.key_ids, query.grid_size, patch_size)  # (H, W, 3)
        _outline(panel, query.query_id, query.grid_size[1], patch_size)
        best = sources[i * k]
        text = (f"L{layer}: strongest source {best['region']} row {best['row']} col {best['col']} "
                f"(weight {_fmt(best['weight'])})")
        panels.append(np.concatenate([_label_strip(panel.shape[1], text, _layer_colour(layer)), panel]))
    return _panel_grid(panels, PATCH_PANEL_COLUMNS), sources, _sources_markdown(query, sources)


def _panel_grid(panels: list[np.ndarray], columns: int, gap: int = 6) -> np.ndarray:
    """Equal-sized panels (h, w, 3) in reading order, ``columns`` to a row, white gaps; blank cells stay white."""
    h, w, _ = panels[0].shape
    rows = -(-len(panels) // columns)  # ceil
    cells = np.full((rows * columns, h + gap, w + gap, 3), 255, np.uint8)  # (cells, h+g, w+g, 3)
    cells[: len(panels), :h, :w] = np.stack(panels)
    grid = cells.reshape(rows, columns, h + gap, w + gap, 3).transpose(0, 2, 1, 3, 4)  # (rows, h+g, cols, w+g, 3)
    return np.ascontiguousarray(grid.reshape(rows * (h + gap), columns * (w + gap), 3)[:-gap, :-gap])


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
    patch_size, scale = _whole(patch_size, "patch_size", 1), _whole(scale, "scale", 1)
    H, W = prediction.shape[:2]
    if H % patch_size or W % patch_size:
        raise ValueError(f"prediction height and width must be multiples of patch_size {patch_size}, got {H} x {W}")
    image = np.repeat(np.repeat(prediction, scale, axis=0), scale, axis=1)  # (H*s, W*s, 3) nearest neighbour
    step = patch_size * scale
    image[step::step] = PICKER_GRID  # horizontal lines between patch rows
    image[:, step::step] = PICKER_GRID  # vertical lines between patch columns
    if selected is not None:
        rows, cols = H // patch_size, W // patch_size
        row, col = _whole(selected[0], "selected row", 0, rows), _whole(selected[1], "selected col", 0, cols)
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
    step = _whole(patch_size, "patch_size", 1) * _whole(scale, "scale", 1)
    if len(tuple(shape_hw)) != 2:
        raise ValueError(f"shape_hw must be (height, width), got {shape_hw!r}")
    height, width = (_whole(v, "shape_hw", step) for v in shape_hw)
    if height % step or width % step:
        raise ValueError(f"shape_hw must be multiples of patch_size * scale = {step}, got {tuple(shape_hw)}")
    x, y = _whole(x, "x", 0, width), _whole(y, "y", 0, height)
    return y // step, x // step
