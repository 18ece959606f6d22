"""Decoder attention explorer maths and drawing, on synthetic numpy captures (no model, no torch)."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import attention_draw as ad
import attention_viz as av

ROWS, COLS, PATCH = 14, 43, 16
L = ROWS * COLS  # 602 patches
N = 1 + L  # + CLS
STRONG_LAYER, STRONG_QUERY, STRONG_KEY = 2, 3 * COLS + 35, 10 * COLS + 5  # layer 2 (green): masked (3, 35) -> visible (10, 5)


@dataclass
class FakeCapture:
    """Same fields as AttentionCapture, without importing the torch world model."""

    weights: np.ndarray
    patch_mask: np.ndarray
    grid_size: tuple
    canvas: np.ndarray
    patch_size: int
    prediction: np.ndarray | None = None  # uint8 (H, slot width, 3) the predicted frame, inpainted into the slot


def _softmax_weights(shape, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)).astype(np.float32)  # rows sum to 1


def _real_mask() -> np.ndarray:
    cols = np.broadcast_to(np.arange(COLS), (ROWS, COLS))  # (rows, cols)
    return (cols >= 29).reshape(-1)  # (L,) the next-frame slot


@pytest.fixture(scope="module")
def capture() -> FakeCapture:
    """Real sizes; layer 2 sends masked patch STRONG_QUERY almost all its attention to STRONG_KEY."""
    weights = _softmax_weights((5, 4, N, N), seed=0)
    weights[STRONG_LAYER, :, 1 + STRONG_QUERY, :] = 0.1 / (N - 1)
    weights[STRONG_LAYER, :, 1 + STRONG_QUERY, 1 + STRONG_KEY] = 0.9
    canvas = np.full((ROWS * PATCH, COLS * PATCH, 3), 100, np.uint8)
    return FakeCapture(weights, _real_mask(), (ROWS, COLS), canvas, PATCH)


def _render(capture, quantile=95, layers=range(5), heads=range(4), aggregation="mean", viz=av.VIZ_LINES):
    return ad.render_attention(capture, quantile, list(layers), list(heads), aggregation, viz)


def test_decoder_to_encoder_keeps_masked_rows_and_visible_columns(capture):
    m = av.decoder_to_encoder(capture.weights, capture.patch_mask, range(5), range(4), "mean")
    assert m.shape == (5, 196, 406) and m.dtype == np.float32
    q, k = av.patch_ids(capture.patch_mask)
    assert capture.patch_mask[q].all() and not capture.patch_mask[k].any()
    expected = capture.weights[:, :, 1 + q][:, :, :, 1 + k].mean(axis=1)  # (5, 196, 406)
    np.testing.assert_allclose(m, expected, rtol=1e-6)


@pytest.mark.parametrize("aggregation, fn", [("mean", np.mean), ("max", np.max), ("sum", np.sum)])
def test_head_aggregations_match_numpy_on_a_tiny_case(aggregation, fn):
    weights = _softmax_weights((3, 4, 7, 7), seed=1)
    mask = np.array([0, 1, 0, 0, 1, 1], bool)  # queries 1, 4, 5; keys 0, 2, 3
    got = av.decoder_to_encoder(weights, mask, [0, 2], [1, 3], aggregation)
    sub = weights[[0, 2]][:, [1, 3]][:, :, [2, 5, 6]][:, :, :, [1, 3, 4]]  # (2, 2, 3, 3), +1 for CLS
    np.testing.assert_allclose(got, fn(sub, axis=1), rtol=1e-6)


def test_quantile_95_keeps_about_five_percent_and_0_keeps_all(capture):
    m = av.decoder_to_encoder(capture.weights, capture.patch_mask, range(5), range(4), "mean")
    c95 = av.filter_connections(m, 95)
    assert abs(c95.total / m.size - 0.05) < 0.001
    assert (c95.weight >= c95.threshold).all()
    c0 = av.filter_connections(m, 0, max_lines=None)
    assert c0.total == m.size and len(c0.weight) == m.size
    c100 = av.filter_connections(m, 100)
    assert c100.total == 1 and c100.weight[0] == m.max()


def test_drawing_cap_keeps_the_strongest_but_statistics_count_all(capture):
    image, stats, _ = _render(capture, quantile=0)
    assert stats["total_connections"] == 5 * 196 * 406
    assert stats["drawn_connections"] == av.MAX_LINES
    m = av.decoder_to_encoder(capture.weights, capture.patch_mask, range(5), range(4), "mean")
    c = av.filter_connections(m, 0)
    assert len(c.weight) == av.MAX_LINES and c.truncated
    assert c.weight.min() >= np.sort(m, axis=None)[-av.MAX_LINES]  # the strongest were kept
    assert (np.diff(c.weight) >= 0).all()  # weakest first


def test_connection_ids_are_grid_patches_and_layer_ids(capture):
    m = av.decoder_to_encoder(capture.weights, capture.patch_mask, [1, 2, 4], range(4), "max")
    q, k = av.patch_ids(capture.patch_mask)
    c = av.filter_connections(m, 99, layer_ids=[1, 2, 4], query_ids=q, key_ids=k)
    assert set(c.layer.tolist()) <= {1, 2, 4}
    np.testing.assert_array_equal(np.asarray(c.layer_ids)[c.layer_index], c.layer)
    assert capture.patch_mask[c.query].all() and not capture.patch_mask[c.key].any()


def test_known_strong_connection_is_kept_and_drawn(capture):
    m = av.decoder_to_encoder(capture.weights, capture.patch_mask, range(5), range(4), "mean")
    q, k = av.patch_ids(capture.patch_mask)
    c = av.filter_connections(m, 100, layer_ids=range(5), query_ids=q, key_ids=k)
    assert (c.layer[-1], c.query[-1], c.key[-1]) == (STRONG_LAYER, STRONG_QUERY, STRONG_KEY)

    image, stats, _ = _render(capture, quantile=100)
    assert stats["total_connections"] == 1 and stats["per_layer"][STRONG_LAYER] == 1
    s = ad.LINES_SCALE  # the lines view is drawn at this enlargement
    (x0, y0), (x1, y1) = (5.5 * PATCH * s, 10.5 * PATCH * s), (35.5 * PATCH * s, 3.5 * PATCH * s)  # key, query centres
    t = np.linspace(0.2, 0.8, 7)
    xs, ys = np.rint(x0 + t * (x1 - x0)).astype(int), np.rint(y0 + t * (y1 - y0)).astype(int)
    on_line = image[ys, xs].astype(int)  # (7, 3)
    dimmed = int(100 * ad.DIM)
    assert (np.abs(on_line - dimmed).max(axis=1) > 40).all()
    assert (on_line[:, 1] > on_line[:, 0]).all() and (on_line[:, 1] > on_line[:, 2]).all()  # layer 2 is green
    assert (image[5, 5] == dimmed).all()  # away from the line the canvas is only dimmed


def test_heatmap_puts_the_strong_cell_at_its_grid_position(capture):
    image, _, _ = _render(capture, quantile=50, layers=[STRONG_LAYER], viz=av.VIZ_HEATMAP)
    cell, top, left = ad.HEATMAP_CELL, ad.HEATMAP_TOP, ad.HEATMAP_LEFT
    assert image.shape[0] > top + 196 * cell and image.shape[1] > left + 406 * cell
    matrix = image[top:top + 196 * cell, left:left + 406 * cell]  # (Q * cell, K * cell, 3) the labelled figure's matrix
    row = 3 * 14 + (35 - 29)  # row-major among the masked patches (14 per grid row)
    col = 5 * 14 + 10  # keys left to right: grid column 5 of 29 visible columns, row 10
    top_colour = np.rint(np.asarray(ad.matplotlib.colormaps["viridis"](1.0)[:3]) * 255).astype(np.uint8)
    np.testing.assert_array_equal(matrix[row * cell + 1, col * cell + 1], top_colour)
    # region changes: frame t-1 (columns 0-13) | separator 1 (14) | frame t (15-27) | separator 2 (28)
    white = np.flatnonzero((matrix == 255).all(axis=(0, 2)))
    np.testing.assert_array_equal(white, np.array([14, 15, 28]) * 14 * cell)
    assert (image[top - 1, left:left + 406 * cell] == 255).all()  # the title strip ends just above the matrix


def test_patch_regions_follow_patch_centres():
    regions, names = av.patch_regions((ROWS, COLS), PATCH)
    assert names == ("frame t-1", "separator 1", "frame t", "separator 2", "masked slot")
    by_column = regions.reshape(ROWS, COLS)[0]  # (cols,)
    assert (by_column[:14] == 0).all() and by_column[14] == 1 and (by_column[15:28] == 2).all()
    assert by_column[28] == 3 and (by_column[29:] == 4).all()


def test_statistics_are_consistent(capture):
    _, stats, markdown = _render(capture, quantile=90, layers=[0, 3], heads=[1, 2, 3], aggregation="sum")
    assert sum(stats["per_layer"].values()) == stats["total_connections"]
    assert sum(stats["per_head"].values()) == stats["total_connections"]
    assert set(stats["per_layer"]) == {0, 3} and set(stats["per_head"]) == {1, 2, 3}
    assert sum(stats["distribution"]["histogram"]["counts"]) == stats["total_connections"]
    assert abs(sum(stats["region_share"].values()) - 1) < 1e-9 and stats["region_share"]["masked slot"] == 0
    d = stats["distribution"]
    assert stats["threshold"] <= d["min"] <= d["p25"] <= d["median"] <= d["p75"] <= d["max"]
    direct = av.attention_statistics(capture.weights, capture.patch_mask, [0, 3], [1, 2, 3], "sum", 90)
    assert direct["total_connections"] == stats["total_connections"] and direct["per_head"] == stats["per_head"]
    assert f"{stats['total_connections']:,}" in markdown and "separator 1" in markdown


@pytest.mark.parametrize("viz", av.VIZ_TYPES)
def test_controls_change_the_image_and_statistics(capture, viz):
    base_image, base_stats, _ = _render(capture, viz=viz)
    for kwargs in ({"heads": [0]}, {"aggregation": "max"}, {"quantile": 80}, {"quantile": 99.8}):
        image, stats, _ = _render(capture, viz=viz, **kwargs)
        assert image.shape != base_image.shape or not np.array_equal(image, base_image), kwargs
        assert stats != base_stats, kwargs


@pytest.mark.parametrize("viz", av.VIZ_TYPES)
def test_render_outputs_are_uint8_rgb(capture, viz):
    image, stats, markdown = _render(capture, viz=viz)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    if viz == av.VIZ_LINES:
        scale = ad.LINES_SCALE  # drawn at the size the page shows it
        assert image.shape[1] == COLS * PATCH * scale and image.shape[0] > ROWS * PATCH * scale  # canvas + legend strip


def _hand_made_capture() -> FakeCapture:
    """One patch row of the real 43 columns, 2 layers x 2 heads, all weights 0 but four (grid ids, CLS excluded):
    layer 0 query 30 -> key 5 (frame t-1): heads 0.8 and 0.4, mean 0.6; layer 1 query 40 -> key 20 (frame t):
    head 1 0.5, mean 0.25; layer 1 query 35 -> key 14 (separator 1): head 0 0.3, mean 0.15."""
    weights = np.zeros((2, 2, 1 + COLS, 1 + COLS), np.float32)
    for layer, head, query, key, w in [(0, 0, 30, 5, 0.8), (0, 1, 30, 5, 0.4), (1, 1, 40, 20, 0.5), (1, 0, 35, 14, 0.3)]:
        weights[layer, head, 1 + query, 1 + key] = w
    canvas = np.zeros((PATCH, COLS * PATCH, 3), np.uint8)
    return FakeCapture(weights, np.arange(COLS) >= 29, (1, COLS), canvas, PATCH)


# 2 layers x 14 queries x 29 keys = 812 entries, 809 of them 0: this percentile falls halfway between 0 and 0.15
HAND_MADE_QUANTILE = 100 * 808.5 / 811


def test_statistics_of_a_hand_made_attention_are_exact():
    _, stats, markdown = _render(_hand_made_capture(), quantile=HAND_MADE_QUANTILE, layers=[0, 1], heads=[0, 1])
    assert stats["threshold"] == pytest.approx(0.075)
    assert stats["total_connections"] == stats["drawn_connections"] == 3
    assert stats["weight_sum"] == pytest.approx(1.0)
    assert stats["per_layer"] == {0: 1, 1: 2} and stats["per_head"] == {0: 2, 1: 1}
    assert stats["region_share"] == pytest.approx(
        {"frame t-1": 0.6, "separator 1": 0.15, "frame t": 0.25, "separator 2": 0.0, "masked slot": 0.0})
    d = stats["distribution"]
    assert (d["min"], d["median"], d["max"]) == pytest.approx((0.15, 0.25, 0.6))
    assert (stats["n_queries"], stats["n_keys"]) == (14, 29)
    assert "**3 connections**" in markdown and "All of them are drawn as lines." in markdown
    _, _, heatmap_markdown = _render(_hand_made_capture(), quantile=HAND_MADE_QUANTILE, layers=[0, 1], heads=[0, 1],
                                     viz=av.VIZ_HEATMAP)
    assert "lines" not in heatmap_markdown  # the heatmap shows every cell


def test_the_strongest_hand_made_connection_comes_last_and_the_cap_keeps_it():
    capture = _hand_made_capture()
    m = av.decoder_to_encoder(capture.weights, capture.patch_mask, [0, 1], [0, 1], "mean")
    q, k = av.patch_ids(capture.patch_mask)
    c = av.filter_connections(m, HAND_MADE_QUANTILE, layer_ids=[0, 1], query_ids=q, key_ids=k, max_lines=2)
    assert (c.layer.tolist(), c.query.tolist(), c.key.tolist()) == ([1, 0], [40, 30], [20, 5])
    assert c.weight.tolist() == pytest.approx([0.25, 0.6]) and c.total == 3 and c.truncated
    stats = av.attention_statistics(capture.weights, capture.patch_mask, [0, 1], [0, 1], "mean", HAND_MADE_QUANTILE,
                                    grid_size=(1, COLS), max_lines=2)
    assert stats["drawn_connections"] == 2
    assert "The 2 strongest of them are drawn as lines." in av.statistics_markdown(stats)


def test_the_quantile_is_checked_once_per_redraw(capture, monkeypatch):
    calls = []
    check = av._check_quantile
    monkeypatch.setattr(av, "_check_quantile", lambda q: (calls.append(q), check(q))[1])
    for viz in av.VIZ_TYPES:
        calls.clear()
        _render(capture, quantile="95", viz=viz)
        assert calls == ["95"], viz


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quantile": -1}, "Quantile must be between 0 and 100, got -1"),
        ({"quantile": 101}, "Quantile must be between 0 and 100, got 101"),
        ({"quantile": float("nan")}, "Quantile must be a finite number"),
        ({"quantile": float("inf")}, "Quantile must be a finite number"),
        ({"quantile": "abc"}, "Quantile must be a number between 0 and 100, got 'abc'"),
        ({"quantile": None}, "Quantile must be a number between 0 and 100, got None"),
        ({"quantile": True}, "Quantile must be a number between 0 and 100, got True"),
        ({"layers": []}, "Select at least one decoder layer"),
        ({"heads": []}, "Select at least one attention head"),
        ({"layers": [7]}, "Decoder layer 7 does not exist"),
        ({"aggregation": "median"}, "Unknown aggregation 'median'"),
        ({"viz": "Pie chart"}, "Unknown visualization type 'Pie chart'"),
    ],
)
def test_invalid_controls_raise_a_named_error(capture, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _render(capture, **change)


def test_validate_controls_normalises():
    assert av.validate_controls("95", ["3", 1, 1], (0,), "Max", av.VIZ_HEATMAP) == (95.0, (1, 3), (0,), "max", av.VIZ_HEATMAP)


def test_module_imports_neither_torch_nor_gradio():
    code = "import sys, attention_viz, attention_draw; sys.exit(bool({'torch', 'gradio', 'matplotlib.pyplot'} & set(sys.modules)))"
    subprocess.run([sys.executable, "-c", code], cwd=Path(av.__file__).parent, check=True)


def test_heatmap_at_quantile_0_is_the_plain_full_matrix(capture):
    image, _, _ = _render(capture, quantile=0, layers=[1, 3], viz=av.VIZ_HEATMAP)
    m = av.decoder_to_encoder(capture.weights, capture.patch_mask, [1, 3], range(4), "mean")
    q, k = av.patch_ids(capture.patch_mask)
    heatmap = ad.render_heatmap(m, k, q, (ROWS, COLS), cell=ad.HEATMAP_CELL)
    h, w = heatmap.shape[0], heatmap.shape[1] - ad.COLOUR_BAR_LABEL_WIDTH  # matrix, gap and colour bar
    np.testing.assert_array_equal(image[ad.HEATMAP_TOP:ad.HEATMAP_TOP + h, ad.HEATMAP_LEFT:ad.HEATMAP_LEFT + w],
                                  heatmap[:, :w])
    title = "Decoder attention: layers L1, L3 (averaged); heads H0-H3 combined by mean; every cell at full colour"
    figure, layout = ad.label_heatmap(heatmap, k, q, (ROWS, COLS), title=title, peak=float(m.mean(axis=0).max()),
                                      cell=ad.HEATMAP_CELL)
    np.testing.assert_array_equal(image, figure)
    assert layout.origin == (ad.HEATMAP_TOP, ad.HEATMAP_LEFT) and layout.size == image.shape[:2]


# -----------------------------------------------------------------------------
# labelled heatmap


@pytest.mark.parametrize("layers, heads, aggregation, quantile, expected", [
    ((0, 1, 2), (0, 1, 2, 3), "mean", 95,
     "Decoder attention: layers L0, L1, L2 (averaged); heads H0-H3 combined by mean; "
     "strongest 5% at full colour, the rest dimmed"),
    ((2,), (1, 3), "max", 99.8,
     "Decoder attention: layer L2; heads H1, H3 combined by max; strongest 0.2% at full colour, the rest dimmed"),
    ((0, 4), (2,), "sum", 100,
     "Decoder attention: layers L0, L4 (averaged); head H2; only the strongest cell at full colour, the rest dimmed"),
])
def test_heatmap_title_names_layers_heads_aggregation_and_quantile(layers, heads, aggregation, quantile, expected):
    assert ad.heatmap_title(layers, heads, aggregation, quantile) == expected


def _heatmap_figure(capture, layers):
    """(label_heatmap figure, its layout, matrix (nl, Q, K)) of the capture's layers, all heads, mean."""
    heads = tuple(range(capture.weights.shape[1]))
    m = av.decoder_to_encoder(capture.weights, capture.patch_mask, layers, heads, "mean")
    q, k = av.patch_ids(capture.patch_mask)
    heatmap = ad.render_heatmap(m, k, q, capture.grid_size)
    figure, layout = ad.label_heatmap(heatmap, k, q, capture.grid_size, peak=float(m.mean(axis=0).max()),
                                      title=ad.heatmap_title(tuple(layers), heads, "mean", 95))
    return figure, layout, m


@pytest.mark.parametrize("which", ["real grid", "one-row hand-made grid"])
def test_heatmap_labels_are_drawn_apart_from_each_other_and_the_matrix(capture, which):
    capture = capture if which == "real grid" else _hand_made_capture()
    image, layout, m = _heatmap_figure(capture, [0, 1])
    assert image.shape[:2] == layout.size
    boxes = np.array([label.box for label in layout.labels])  # (n, 4) x0, y0, x1, y1
    x0, y0, x1, y1 = boxes.T
    overlap = (x0[:, None] < x1) & (x0 < x1[:, None]) & (y0[:, None] < y1) & (y0 < y1[:, None])  # (n, n)
    assert not (overlap & ~np.eye(len(boxes), dtype=bool)).any()
    h, w = m.shape[1] * 3, m.shape[2] * 3 + 4 + ad.COLOUR_BAR_WIDTH  # matrix, gap and colour bar
    top, left = ad.HEATMAP_TOP, ad.HEATMAP_LEFT
    assert not ((x0 < left + w) & (left < x1) & (y0 < top + h) & (top < y1)).any()
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= image.shape[1]).all() and (y1 <= image.shape[0]).all()
    for label in layout.labels:  # each text left ink (dark pixels) inside its box
        bx0, by0, bx1, by1 = label.box
        assert (image[by0:by1, bx0:bx1] < 100).all(axis=2).any(), label
    texts = [label.text for label in layout.labels]
    assert {"frame t-1", "separator 1", "frame t", "separator 2", "layer-mean weight", "0",
            f"{m.mean(axis=0).max():.3g}", "keys: visible patches of the canvas, left to right",
            "queries: masked slot (predicted frame), row-major"} <= set(texts)
    assert texts[0].startswith("Decoder attention: layers L0, L1 (averaged); heads H0")


def test_heatmap_region_labels_rows_ticks_and_leaders_sit_where_they_belong(capture):
    image, layout, _ = _heatmap_figure(capture, [0, 1, 2])
    top, left, cell, block = ad.HEATMAP_TOP, ad.HEATMAP_LEFT, 3, 14 * 3  # a grid column of keys is 14 cells wide
    bottom = top + 196 * cell
    labels = {label.text: label for label in layout.labels}
    centre = lambda label: (label.box[0] + label.box[2]) / 2  # noqa: E731
    assert abs(centre(labels["frame t-1"]) - (left + 14 * block / 2)) <= 1  # columns 0-13
    assert abs(centre(labels["frame t"]) - (left + 21.5 * block)) <= 1  # columns 15-27
    first_row = labels["frame t-1"].y
    assert labels["frame t"].y == first_row and labels["separator 1"].y == labels["separator 2"].y > first_row
    for name, column in (("separator 1", 14), ("separator 2", 28)):  # one grid column each: too narrow for the name
        x = left + int((column + 0.5) * block)
        leader = next(line for line in layout.leaders if line[0] == (x, bottom))
        assert (image[bottom:leader[1][1], x] == ad.INK).all()  # a line from the block down to its label
        assert labels[name].box[0] <= x < labels[name].box[2]
    np.testing.assert_array_equal(layout.column_ticks, left + np.array([0, 14, 15, 28, 29]) * block - [0, 0, 0, 0, 1])
    assert (image[bottom:bottom + ad.TICK, layout.column_ticks] == ad.INK).all()
    np.testing.assert_array_equal(layout.row_ticks, top + np.arange(1, 14) * 14 * cell)  # between grid rows
    assert (image[layout.row_ticks, left - ad.TICK:left] == ad.INK).all()
    for row in (0, 7, 13):  # labelled grid rows, centred on their band of 14 query rows
        x0, y0, x1, y1 = labels[f"row {row}"].box
        assert abs((y0 + y1) / 2 - (top + (row + 0.5) * 14 * cell)) <= 3 and x1 <= left - ad.TICK


# -----------------------------------------------------------------------------
# one patch's attention

P_ROW, P_COL = 2, 5  # the query: row 2, col 5 of the predicted slot = grid (2, 34)
P_QUERY = P_ROW * COLS + 29 + P_COL
CANVAS_GREY, PREDICTION_RGB = 100, (10, 200, 30)


def _patch_capture(prediction: bool = True) -> FakeCapture:
    """Real grid, 2 layers x 2 heads, every weight 0 but these from query P_QUERY (grid row, col -> weight):
    layer 1, both heads: (4, 20) 1.0 (frame t). Layer 0, head 0 / head 1 (mean): (13, 27) 0.3 / 0.5 (0.4, frame
    t-1), (0, 0) 0.6 / 0.1 (0.35, frame t-1), (9, 28) 0.1 / 0.4 (0.25, separator 2)."""
    weights = np.zeros((2, 2, N, N), np.float32)
    weights[1, :, 1 + P_QUERY, 1 + 4 * COLS + 20] = 1.0
    for (r, c), (w0, w1) in {(13, 27): (0.3, 0.5), (0, 0): (0.6, 0.1), (9, 28): (0.1, 0.4)}.items():
        weights[0, :, 1 + P_QUERY, 1 + r * COLS + c] = w0, w1
    canvas = np.full((ROWS * PATCH, COLS * PATCH, 3), CANVAS_GREY, np.uint8)
    canvas[:, 29 * PATCH:] = 0  # the masked slot is blank on a captured canvas
    slot = np.broadcast_to(np.array(PREDICTION_RGB, np.uint8), (ROWS * PATCH, 14 * PATCH, 3)).copy()
    return FakeCapture(weights, _real_mask(), (ROWS, COLS), canvas, PATCH, slot if prediction else None)


@pytest.mark.parametrize("aggregation", av.AGGREGATIONS)
def test_patch_attention_is_one_row_of_the_decoder_matrix(capture, aggregation):
    m, k = av.patch_attention(capture, P_ROW, P_COL, [0, 2, 4], [1, 3], aggregation)
    full = av.decoder_to_encoder(capture.weights, capture.patch_mask, [0, 2, 4], [1, 3], aggregation)  # (3, Q, K)
    np.testing.assert_array_equal(m, full[:, P_ROW * 14 + P_COL])
    np.testing.assert_array_equal(k, av.patch_ids(capture.patch_mask)[1])
    assert m.dtype == np.float32 and m.shape == (3, 406) and k.dtype == np.int64
    whole_floats, _ = av.patch_attention(capture, float(P_ROW), np.float64(P_COL), [0, 2, 4], [1, 3], aggregation)
    np.testing.assert_array_equal(whole_floats, m)


def test_patch_sources_name_the_strongest_keys_by_region_and_in_frame_position():
    _, sources, markdown = ad.render_patch_attention(_patch_capture(), P_ROW, P_COL, [0, 1], [0, 1], "mean")
    rows = [(s["layer"], s["rank"], s["region"], s["row"], s["col"], s["grid_row"], s["grid_col"]) for s in sources]
    assert rows == [
        (0, 1, "frame t", 13, 13, 13, 27), (0, 2, "frame t-1", 0, 0, 0, 0), (0, 3, "separator 2", 9, 0, 9, 28),
        (1, 1, "frame t", 4, 6, 4, 20), (1, 2, "frame t-1", 0, 0, 0, 0), (1, 3, "frame t-1", 0, 1, 0, 1),
    ]  # frame t starts half a patch into grid column 14: grid column 20's centre lies in its frame column 6
    assert [s["weight"] for s in sources] == pytest.approx([0.4, 0.35, 0.25, 1.0, 0.0, 0.0])
    assert markdown.startswith("### Patch (row 2, col 5) of the predicted frame, heads H0, H1 combined by mean\n")
    assert "| L1 | 1 | frame t | 4 | 6 | 1 |" in markdown and "| L0 | 3 | separator 2 | 9 | 0 | 0.25 |" in markdown
    _, top_one, _ = ad.render_patch_attention(_patch_capture(), P_ROW, P_COL, [1], [1], "max", top_k=1)
    assert [(s["layer"], s["grid_row"], s["grid_col"], s["weight"]) for s in top_one] == [(1, 4, 20, 1.0)]


def _tinted(weight: float) -> np.ndarray:
    """The expected colour of a key patch over the grey canvas at weight / panel max."""
    lut = ad._colour_lut(ad.PATCH_CMAP)
    base = np.float32(int(CANVAS_GREY * ad.DIM))
    colour = lut[int(np.rint(np.float32(weight) * 255))].astype(np.float32)
    return np.rint(base + (colour - base) * (np.float32(weight) * np.float32(ad.MAX_TINT_ALPHA))).astype(np.uint8)


def test_patch_panels_tint_the_strongest_key_brightest_and_outline_the_query():
    image, _, _ = ad.render_patch_attention(_patch_capture(), P_ROW, P_COL, [0, 1], [0, 1], "mean")
    H, W, strip, gap = ROWS * PATCH, COLS * PATCH, ad.STRIP_HEIGHT, 6
    assert ad.PATCH_PANEL_COLUMNS == 2 and image.shape == (strip + H, 2 * W + gap, 3) and image.dtype == np.uint8
    panels = [image[strip:, :W], image[strip:, W + gap:]]  # L0, L1 side by side, each under its label strip
    assert (image[:, W:W + gap] == 255).all()  # the white gap between them
    centres = lambda panel, r, c: panel[r * PATCH + PATCH // 2, c * PATCH + PATCH // 2]  # noqa: E731
    np.testing.assert_array_equal(centres(panels[1], 4, 20), _tinted(1.0))
    visible = panels[1][:, :29 * PATCH].astype(int).sum(axis=2)  # (H, 29 * PATCH) brightness of the key patches
    assert np.unravel_index(visible.argmax(), visible.shape)[1] // PATCH == 20
    assert (visible[visible != visible.max()] == 3 * int(CANVAS_GREY * ad.DIM)).all()  # weight 0: dimmed, untinted
    for (r, c), w in {(13, 27): 1.0, (0, 0): 0.35 / 0.4, (9, 28): 0.25 / 0.4}.items():  # scaled to the panel's max
        np.testing.assert_array_equal(centres(panels[0], r, c), _tinted(w))
    dimmed_prediction = (np.array(PREDICTION_RGB, np.float32) * ad.DIM).astype(np.uint8)
    y, x = P_ROW * PATCH, (29 + P_COL) * PATCH
    for panel in panels:
        assert (panel[[y, y + 1, y + PATCH - 1], x + 4] == ad.QUERY_OUTLINE).all()  # 2 px ring inside the patch
        assert (panel[y + 4, [x, x + 1, x + PATCH - 2, x + PATCH - 1]] == ad.QUERY_OUTLINE).all()
        assert (panel[y + 2:y + PATCH - 2, x + 2:x + PATCH - 2] == dimmed_prediction).all()
        assert (panel[0, 29 * PATCH] == dimmed_prediction).all()  # the prediction fills the slot
    assert (image[10, 10] == ad.LAYER_COLOURS[0]).all() and (image[10, W + gap + 10] == ad.LAYER_COLOURS[1]).all()
    assert (image[:strip, 22:] > 200).all(axis=2).any()  # the strip's label text
    bare, _, _ = ad.render_patch_attention(_patch_capture(prediction=False), P_ROW, P_COL, [1], [0], "mean")
    assert (bare[strip, 29 * PATCH] == 0).all()  # no prediction: the blank slot, dimmed


def test_captures_without_a_prediction_field_still_work():
    @dataclass
    class OldCapture:  # an AttentionCapture from before the prediction field
        weights: np.ndarray
        patch_mask: np.ndarray
        grid_size: tuple
        canvas: np.ndarray
        patch_size: int

    c = _patch_capture(prediction=False)
    old = OldCapture(c.weights, c.patch_mask, c.grid_size, c.canvas, c.patch_size)
    np.testing.assert_array_equal(ad.render_patch_attention(old, 1, 2, [0, 1], [0], "max")[0],
                                  ad.render_patch_attention(c, 1, 2, [0, 1], [0], "max")[0])


@pytest.mark.parametrize("row, col, top_k, message", [
    (14, 0, 3, "row must be a whole number from 0 to 13, got 14"),
    (-1, 0, 3, "row must be a whole number from 0 to 13, got -1"),
    (2.5, 0, 3, "row must be a whole number from 0 to 13, got 2.5"),
    (True, 0, 3, "row must be a whole number from 0 to 13, got True"),
    ("2", 0, 3, "row must be a whole number from 0 to 13, got '2'"),
    (0, 14, 3, "col must be a whole number from 0 to 13, got 14"),
    (0, None, 3, "col must be a whole number from 0 to 13, got None"),
    (0, float("nan"), 3, "col must be a whole number from 0 to 13, got nan"),
    (0, 0, 0, "top_k must be a whole number of at least 1, got 0"),
])
def test_patch_attention_refuses_a_patch_outside_the_slot(row, col, top_k, message):
    with pytest.raises(ValueError, match=message):
        ad.render_patch_attention(_patch_capture(), row, col, [0], [0], "mean", top_k=top_k)
    if top_k == 3:
        with pytest.raises(ValueError, match=message):
            av.patch_attention(_patch_capture(), row, col, [0], [0], "mean")


def test_patch_attention_refuses_a_mask_that_is_not_one_block_and_a_misfit_prediction():
    c = _patch_capture()
    c.patch_mask = c.patch_mask.copy()
    c.patch_mask[5 * COLS + 30] = False  # a hole in the slot
    with pytest.raises(ValueError, match="patch_mask must mask one rectangular block"):
        av.patch_attention(c, 0, 0, [0], [0], "mean")
    c = _patch_capture()
    c.prediction = c.prediction[:, :200]
    with pytest.raises(ValueError, match=r"prediction must fill the predicted slot, \(height, width\) \(224, 224\)"):
        ad.render_patch_attention(c, 0, 0, [0], [0], "mean")


# -----------------------------------------------------------------------------
# clickable picture of the predicted slot


def test_patch_picker_image_is_the_enlarged_prediction_with_a_grey_patch_grid():
    prediction = np.random.default_rng(3).integers(0, 256, (32, 48, 3)).astype(np.uint8)  # 2 x 3 patches
    image = ad.patch_picker_image(prediction, 16, scale=2)
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8
    expected = prediction.repeat(2, axis=0).repeat(2, axis=1)  # (64, 96, 3) nearest neighbour
    on_grid = np.zeros((64, 96), bool)
    on_grid[[32]] = True
    on_grid[:, [32, 64]] = True  # the first pixel row / column of each patch but the top / left ones
    np.testing.assert_array_equal(image[~on_grid], expected[~on_grid])
    assert (image[on_grid] == ad.PICKER_GRID).all()
    ringed = ad.patch_picker_image(prediction, 16, scale=2, selected=(1, 2))  # patch (1, 2): pixels 32..63, 64..95
    changed = np.argwhere((ringed != image).any(axis=2))  # (n, 2)
    assert changed[:, 0].min() >= 32 and changed[:, 1].min() >= 64  # only inside that patch
    assert (ringed[[32, 33, 63], 80] == ad.QUERY_OUTLINE).all() and (ringed[48, [64, 65, 94, 95]] == ad.QUERY_OUTLINE).all()
    np.testing.assert_array_equal(ringed[36:60, 68:92], image[36:60, 68:92])  # the inside is untouched
    with pytest.raises(ValueError, match="selected col must be a whole number from 0 to 2, got 3"):
        ad.patch_picker_image(prediction, 16, selected=(0, 3))
    with pytest.raises(ValueError, match="multiples of patch_size 16, got 32 x 40"):
        ad.patch_picker_image(prediction[:, :40], 16)
    with pytest.raises(ValueError, match="scale must be a whole number of at least 1, got 0"):
        ad.patch_picker_image(prediction, 16, scale=0)


def test_picker_patch_maps_every_patch_centre_and_corner_back_to_its_patch():
    shape = ad.patch_picker_image(np.zeros((224, 224, 3), np.uint8), 16).shape[:2]  # (448, 448): 14 x 14 patches
    for row in range(14):
        for col in range(14):
            y, x = row * 32 + 16, col * 32 + 16
            assert ad.picker_patch(x, y, shape, 16) == (row, col)
            assert ad.picker_patch(col * 32, row * 32, shape, 16) == (row, col)  # top-left pixel (on the grid line)
            assert ad.picker_patch(col * 32 + 31, row * 32 + 31, shape, 16) == (row, col)  # bottom-right pixel
    assert ad.picker_patch(447.0, 0, shape, 16) == (0, 13)
    assert ad.picker_patch(5, 9, (32, 48), 16, scale=1) == (0, 0) and ad.picker_patch(47, 31, (32, 48), 16, 1) == (1, 2)


@pytest.mark.parametrize("x, y, message", [
    (448, 0, "x must be a whole number from 0 to 447, got 448"),
    (-1, 0, "x must be a whole number from 0 to 447, got -1"),
    (0, 448, "y must be a whole number from 0 to 447, got 448"),
    (0, 3.5, "y must be a whole number from 0 to 447, got 3.5"),
])
def test_picker_patch_refuses_a_click_outside_the_picture(x, y, message):
    with pytest.raises(ValueError, match=message):
        ad.picker_patch(x, y, (448, 448), 16)


def test_the_heatmap_says_its_colour_bar_is_the_layer_mean_and_the_statistics_max_a_single_layers(capture):
    """The colour bar tops at the largest layer-mean weight, the statistics' max is the largest weight of
    any one layer: the text names both numbers and which is which."""
    _, stats, text = _render(capture, quantile=0, layers=[1, 3], viz=av.VIZ_HEATMAP)
    m = av.decoder_to_encoder(capture.weights, capture.patch_mask, [1, 3], range(4), "mean")
    peak, top = float(m.mean(axis=0).max()), stats["distribution"]["max"]
    assert peak < top  # two layers that peak in different cells: the mean is lower
    note = text.split("\n\n")[0]
    assert f"from 0 to {av.format_weight(peak)} (the colour bar)" in note
    assert f"their max, {av.format_weight(top)}, is the largest weight in any one layer" in note
    assert "Heatmap colours" not in _render(capture, quantile=0, layers=[1, 3], viz=av.VIZ_LINES)[2]
