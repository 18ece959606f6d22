"""Decoder attention explorer, the numbers: pure numpy functions behind README section 6.

The decoder of the canvas MAE sees 1 + L tokens (token 0 = CLS, tokens 1..L = the patches of the
canvas grid in row-major order). Its attention tells how each masked patch of the next-frame slot
(a decoder query) gathers information from the visible patches of the history frames and action
separators (encoder keys). This module turns an ``AttentionCapture`` into:

- a (layers, Q, K) decoder-to-encoder matrix (masked rows, visible columns, heads aggregated),
- the connections at or above a percentile threshold,
- statistics and a markdown summary of them (``attention_view`` computes all three for a redraw),
- one masked patch's attention to every visible patch and its strongest sources (``patch_sources``).

Everything is a function of arrays: no torch, no gradio, no model, no drawing. The pictures of these
numbers are drawn by ``attention_draw.py``, which imports this module (never the reverse).
References: timm ``utils/attention_extract.py``, lucidrains ``recorder.py``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from config import AutoencoderConcatPredictorWorldModelConfig
from validation import is_int, whole_number, whole_number_rule

if TYPE_CHECKING:  # type hints only: importing the world model would pull in torch
    from autoencoder_concat_predictor_world_model import AttentionCapture

# -----------------------------------------------------------------------------
# constants

_CFG = AutoencoderConcatPredictorWorldModelConfig()  # read-only defaults: the canvas layout lives in config.py

VIZ_LINES = "Patch-to-Patch Lines"
VIZ_HEATMAP = "Heatmap"
VIZ_TYPES = (VIZ_LINES, VIZ_HEATMAP)
AGGREGATIONS = ("mean", "max", "sum")  # how the selected heads are combined

MAX_LINES = 2000  # at most this many (strongest) connections are drawn; statistics count all of them
N_LAYERS = _CFG.decoder_depth  # default layer range for validation (5)
N_HEADS = _CFG.decoder_num_heads  # default head range for validation (4)
GRID_SIZE = _CFG.grid_size  # default (rows, columns) of the patch grid: (14, 43)
PATCH_SIZE = _CFG.patch_size  # default patch side in pixels: 16
FRAME_WIDTH = _CFG.frame_size[1]  # width in pixels of one frame slot: 224
SEPARATOR_WIDTH = _CFG.separator_width  # width in pixels of an action separator: 8
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
        if not is_int(item):
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


def _region_names(n_slots: int) -> tuple[str, ...]:
    """Region names as the prediction canvas the attention comes from is labelled: its visible frames
    are t-k ... t-1, t and its masked slot is where frame t+1 is predicted."""
    names = []
    for slot in range(n_slots):
        back = n_slots - 2 - slot  # frames before t
        names.append("masked slot" if slot == n_slots - 1 else f"frame t-{back}" if back else "frame t")
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
        ("frame t-1", "separator 1", "frame t", "separator 2", "masked slot").
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


def format_weight(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def check_whole(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high) (no upper bound when high is None); 3.0 passes, 3.5, True and '3' do not.

    The rule is ``validation.whole_number``'s (on the closed range [low, high - 1]); the message
    ends ", got <value>" as this module's other messages do.
    """
    top = None if high is None else high - 1
    try:
        return whole_number(value, name, low, top)
    except ValueError:
        raise ValueError(f"{whole_number_rule(name, low, top)}, got {value!r}") from None


def _ids_text(prefix: str, ids: tuple[int, ...]) -> str:
    """'H0-H3' for a run of three or more consecutive ids, else 'H0, H2'."""
    if len(ids) >= 3 and ids[-1] - ids[0] == len(ids) - 1:
        return f"{prefix}{ids[0]}-{prefix}{ids[-1]}"
    return ", ".join(f"{prefix}{i}" for i in ids)


def heads_text(head_ids: tuple[int, ...], aggregation: str) -> str:
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
        f"**{total:,} connection{'' if total == 1 else 's'}** at or above threshold {format_weight(stats['threshold'])} "
        f"(weight sum {format_weight(stats['weight_sum'])}; masked queries {stats.get('n_queries', '?')} x "
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
              "| " + " | ".join(format_weight(d[k]) for k in ("min", "p25", "median", "p75", "max")) + " |",
              "", f"Kept weights, 10 bins from {format_weight(d['histogram']['edges'][0])} to "
                  f"{format_weight(d['histogram']['edges'][-1])}: `{spark}`",
              "", "_Head counts credit each kept connection to the head with the largest single weight on it._"]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# one redraw: the numbers behind an attention picture


class AttentionView(NamedTuple):
    """What a redraw of the decoder attention needs: the matrix, its kept connections and their statistics.

    Attributes:
        matrix: float32 (n_layers_selected, Q, K) from ``decoder_to_encoder``.
        connections: the connections at or above the quantile (at most MAX_LINES, weakest first).
        stats: ``attention_statistics``'s dict plus the controls (quantile, aggregation, viz_type).
        query_ids: int64 (Q,) grid index of each matrix row.
        key_ids: int64 (K,) grid index of each matrix column.
        grid_size: (rows, columns) of the patch grid.
        patch_size: patch side in pixels.
    """

    matrix: np.ndarray
    connections: Connections
    stats: dict
    query_ids: np.ndarray
    key_ids: np.ndarray
    grid_size: tuple[int, int]
    patch_size: int


def attention_view(
    capture: AttentionCapture,
    q: float,
    layer_ids: tuple[int, ...],
    head_ids: tuple[int, ...],
    agg: str,
    viz: str,
) -> AttentionView:
    """The numbers behind one attention picture, for controls a caller has already checked
    (``validate_controls``, or the app's own input checks), so a redraw validates its controls once.

    Raises:
        ValueError: for a capture whose shapes disagree, layers or heads it lacks, or NaN/infinite weights.
    """
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
    return AttentionView(matrix, connections, stats, query_ids, key_ids, grid_size, patch_size)

# -----------------------------------------------------------------------------
# one patch's attention


class Slot(NamedTuple):
    """The predicted slot: a block of rows x cols patches whose top-left patch is at grid (top, left)."""

    rows: int
    cols: int
    top: int
    left: int


class PatchQuery(NamedTuple):
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
    slot: Slot


def _slot_block(patch_mask: np.ndarray, grid_cols: int) -> Slot:
    query_ids = np.flatnonzero(patch_mask)  # (Q,) row-major
    q_rows, q_cols = np.divmod(query_ids, grid_cols)  # (Q,) each
    top, left = int(q_rows[0]), int(q_cols.min())
    rows, cols = int(q_rows[-1]) - top + 1, int(q_cols.max()) - left + 1
    block = (top + np.arange(rows))[:, None] * grid_cols + left + np.arange(cols)  # (rows, cols) grid ids of the block
    if not np.array_equal(query_ids, block.reshape(-1)):  # (rows * cols,)
        raise ValueError("patch_mask must mask one rectangular block of patches (the predicted slot)")
    return Slot(rows, cols, top, left)


def _patch_query(capture: AttentionCapture, row, col, layers, heads, aggregation) -> PatchQuery:
    weights, patch_mask = _check_weights(capture.weights, capture.patch_mask)
    grid_size = _check_grid(capture.grid_size, patch_mask.size)
    layer_ids = _check_indices(layers, weights.shape[0], "decoder layer")
    head_ids = _check_indices(heads, weights.shape[1], "attention head")
    agg = _check_aggregation(aggregation)
    slot = _slot_block(patch_mask, grid_size[1])
    row, col = check_whole(row, "row", 0, slot.rows), check_whole(col, "col", 0, slot.cols)
    heads_t = _gather_heads(weights, patch_mask, layer_ids, head_ids, [row * slot.cols + col])  # (nl, nh, 1, K)
    matrix = _aggregate(heads_t, agg, axis=1)[:, 0]  # (nl, K)
    if not np.isfinite(matrix).all():
        raise ValueError("Attention weights contain NaN or infinite values")
    query_id = (slot.top + row) * grid_size[1] + slot.left + col
    return PatchQuery(matrix, patch_ids(patch_mask)[1], row, col, query_id, layer_ids, head_ids, agg, grid_size, slot)


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
    """Each key's column inside its region: the frame's own patch column holding the patch centre (frame t is
    offset half a patch on the default canvas, so its grid column 20 is frame column 6); 0 in a separator."""
    slot_x = (grid_cols + 0.5) * patch_size - regions // 2 * (FRAME_WIDTH + SEPARATOR_WIDTH)  # centre x in its slot
    cols = np.clip(slot_x // patch_size, 0, FRAME_WIDTH // patch_size - 1).astype(np.int64)
    return np.where(regions % 2 == 1, 0, cols)  # odd regions are the separators


def _top_sources(query: PatchQuery, patch_size: int, top_k: int) -> list[dict]:
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


def _sources_markdown(query: PatchQuery, sources: list[dict]) -> str:
    lines = [f"### Patch (row {query.row}, col {query.col}) of the predicted frame, "
             f"{heads_text(query.head_ids, query.aggregation)}", "",
             "| Layer | Rank | Region | Row | Col | Weight |", "|---|---:|---|---:|---:|---:|"]
    lines += [f"| L{s['layer']} | {s['rank']} | {s['region']} | {s['row']} | {s['col']} | {format_weight(s['weight'])} |"
              for s in sources]
    lines += ["", "_Row and col place the key inside its frame (a separator's col is 0). Each layer's panel tints "
                  "the keys by weight, scaled to that layer's strongest._"]
    return "\n".join(lines)


def patch_sources(capture: AttentionCapture, row, col, layer_ids: Iterable[int], head_ids: Iterable[int],
                  aggregation: str, top_k: int = 3) -> tuple[PatchQuery, list[dict], str]:
    """One masked patch's attention, its ``top_k`` strongest sources per layer and a markdown table of them.

    Args: as ``patch_attention``, plus top_k: strongest keys listed per layer, a whole number >= 1 (at most K).

    Returns:
        (query, sources, markdown). sources: per layer, its top_k keys strongest first, dicts {layer, rank
        (1 = strongest), region, row, col (inside the region, see ``_frame_cols``), grid_row, grid_col, weight}.
        markdown: a heading naming the query and a table of sources.

    Raises:
        ValueError: naming the invalid argument and its range.
    """
    query = _patch_query(capture, row, col, layer_ids, head_ids, aggregation)
    k = min(check_whole(top_k, "top_k", 1), query.key_ids.size)
    sources = _top_sources(query, int(capture.patch_size), k)
    return query, sources, _sources_markdown(query, sources)
