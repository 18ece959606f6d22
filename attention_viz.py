"""Decoder attention explorer: pure numpy/Pillow functions behind README section 6.

The decoder of the canvas MAE sees 1 + L tokens (token 0 = CLS, tokens 1..L = the patches of the
canvas grid in row-major order). Its attention tells how each masked patch of the next-frame slot
(a decoder query) gathers information from the visible patches of the history frames and action
separators (encoder keys). This module turns an ``AttentionCapture`` into:

- a (layers, Q, K) decoder-to-encoder matrix (masked rows, visible columns, heads aggregated),
- the connections at or above a percentile threshold,
- statistics and a markdown summary of them,
- a patch-to-patch line overlay on the canvas, or a heatmap of the matrix.

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
from typing import TYPE_CHECKING

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


def _gather_heads(weights: np.ndarray, patch_mask: np.ndarray, layers, heads) -> np.ndarray:
    """(layers, heads, N, N) -> (n_layers_selected, n_heads_selected, Q, K) masked rows x visible columns."""
    query_ids, key_ids = patch_ids(patch_mask)
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
    canvas = np.asarray(canvas)
    if canvas.ndim != 3 or canvas.shape[2] != 3 or canvas.dtype != np.uint8:
        raise ValueError(f"Canvas must be uint8 (H, W, 3), got {canvas.dtype} {canvas.shape}")
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
        image = render_heatmap(matrix, key_ids, query_ids, grid_size, patch_size=patch_size, keep=keep)
    return image, stats, statistics_markdown(stats)
