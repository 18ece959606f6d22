"""Decoder attention explorer maths and drawing, on synthetic numpy captures (no model, no torch)."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

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
    return av.render_attention(capture, quantile, list(layers), list(heads), aggregation, viz)


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
    (x0, y0), (x1, y1) = (5.5 * PATCH, 10.5 * PATCH), (35.5 * PATCH, 3.5 * PATCH)  # key, query centres
    t = np.linspace(0.2, 0.8, 7)
    xs, ys = np.rint(x0 + t * (x1 - x0)).astype(int), np.rint(y0 + t * (y1 - y0)).astype(int)
    on_line = image[ys, xs].astype(int)  # (7, 3)
    dimmed = int(100 * av.DIM)
    assert (np.abs(on_line - dimmed).max(axis=1) > 40).all()
    assert (on_line[:, 1] > on_line[:, 0]).all() and (on_line[:, 1] > on_line[:, 2]).all()  # layer 2 is green
    assert (image[5, 5] == dimmed).all()  # away from the line the canvas is only dimmed


def test_heatmap_puts_the_strong_cell_at_its_grid_position(capture):
    image, _, _ = _render(capture, quantile=50, layers=[STRONG_LAYER], viz=av.VIZ_HEATMAP)
    cell = 3
    assert image.shape[0] == 196 * cell and image.shape[1] > 406 * cell
    row = 3 * 14 + (35 - 29)  # row-major among the masked patches (14 per grid row)
    col = 5 * 14 + 10  # keys left to right: grid column 5 of 29 visible columns, row 10
    top = np.rint(np.asarray(av.matplotlib.colormaps["viridis"](1.0)[:3]) * 255).astype(np.uint8)
    np.testing.assert_array_equal(image[row * cell + 1, col * cell + 1], top)
    # region changes: frame t-2 (columns 0-13) | separator 1 (14) | frame t-1 (15-27) | separator 2 (28)
    white = np.flatnonzero((image[:, : 406 * cell] == 255).all(axis=(0, 2)))
    np.testing.assert_array_equal(white, np.array([14, 15, 28]) * 14 * cell)


def test_patch_regions_follow_patch_centres():
    regions, names = av.patch_regions((ROWS, COLS), PATCH)
    assert names == ("frame t-2", "separator 1", "frame t-1", "separator 2", "masked slot")
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
        assert image.shape[1] == COLS * PATCH and image.shape[0] > ROWS * PATCH  # canvas + legend strip


def _hand_made_capture() -> FakeCapture:
    """One patch row of the real 43 columns, 2 layers x 2 heads, all weights 0 but four (grid ids, CLS excluded):
    layer 0 query 30 -> key 5 (frame t-2): heads 0.8 and 0.4, mean 0.6; layer 1 query 40 -> key 20 (frame t-1):
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
        {"frame t-2": 0.6, "separator 1": 0.15, "frame t-1": 0.25, "separator 2": 0.0, "masked slot": 0.0})
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
    code = "import sys, attention_viz; sys.exit(bool({'torch', 'gradio', 'matplotlib.pyplot'} & set(sys.modules)))"
    subprocess.run([sys.executable, "-c", code], cwd=Path(av.__file__).parent, check=True)


def test_heatmap_at_quantile_0_is_the_plain_full_matrix(capture):
    image, _, _ = _render(capture, quantile=0, layers=[1, 3], viz=av.VIZ_HEATMAP)
    m = av.decoder_to_encoder(capture.weights, capture.patch_mask, [1, 3], range(4), "mean")
    q, k = av.patch_ids(capture.patch_mask)
    np.testing.assert_array_equal(image, av.render_heatmap(m, k, q, (ROWS, COLS)))
