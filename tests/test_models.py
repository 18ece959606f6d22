"""Canvas geometry, masks, patchify and the MAE ViT (tiny widths where only shapes matter)."""

import dataclasses

import numpy as np
import pytest
import torch

from config import AutoencoderConcatPredictorWorldModelConfig
from conftest import TINY
from models import (
    MaskedAutoencoderViT,
    TargetedMAEWrapper,
    build_canvas,
    canvas_to_patches,
    canvas_to_tensor,
    compute_patch_mask_for_last_slot,
    compute_randomized_patch_mask_for_last_slot,
    masked_frame_loss,
    patchify,
    patchify_channels_last,
    roll_canvas_frames,
    tensor_to_uint8,
    unpatchify,
)



def _frame(value: int) -> np.ndarray:
    return np.full((224, 224, 3), value, dtype=np.uint8)


SELF_DECODER = dataclasses.replace(AutoencoderConcatPredictorWorldModelConfig(), decoder_mode="self")  # real sizes, MAE decoder


def test_canvas_is_224_by_688_with_action_coloured_separators():
    canvas = build_canvas([_frame(10), {"action": 0}, _frame(20), {"action": 1}, _frame(30)])
    assert canvas.shape == (224, 688, 3) and canvas.dtype == np.uint8
    assert (canvas[:, 0:224] == 10).all() and (canvas[:, 232:456] == 20).all() and (canvas[:, 464:688] == 30).all()
    assert (canvas[:, 224:232] == [255, 0, 0]).all()  # stay: red
    assert (canvas[:, 456:464] == [0, 255, 0]).all()  # move: green


def test_unknown_action_is_blue_and_trailing_action_leaves_a_blank_slot():
    canvas = build_canvas([_frame(10), {"action": 7}, _frame(20), 1])
    assert canvas.shape == (224, 688, 3)
    assert (canvas[:, 224:232] == [0, 0, 255]).all()
    assert (canvas[:, 456:464] == [0, 255, 0]).all()
    assert (canvas[:, 464:] == 0).all()


@pytest.mark.parametrize("action", [None, "1", 1.0, True, {"move": 1}])
def test_build_canvas_refuses_a_separator_that_is_not_an_action(action):
    with pytest.raises(ValueError, match="Invalid action"):
        build_canvas([_frame(10), action, _frame(20)])


def test_build_canvas_refuses_wrong_frame_size():
    with pytest.raises(ValueError, match="uint8"):
        build_canvas([np.zeros((100, 100, 3), np.uint8), 0, _frame(1)])


def test_torus_roll_moves_every_frame_alike_and_keeps_the_separators():
    from toroidal_dot_robot import ToroidalDotRobot

    robot = ToroidalDotRobot(seed=3, start=(210, 218))  # near the corner: the roll must wrap both ways
    frames = []
    for action in (1, 0, None):
        frames.append(robot.get_observation())
        if action is not None:
            robot.execute_action(action)
    canvases = np.stack([build_canvas([frames[0], {"action": 1}, frames[1], {"action": 0}, frames[2]])] * 2)
    shifts = np.array([[10, 200], [223, 1]])
    rolled = roll_canvas_frames(canvases, shifts, (224, 224), 8)
    assert rolled.shape == canvases.shape and rolled.dtype == np.uint8
    for b, (dy, dx) in enumerate(shifts):
        rolled_frames = [np.roll(f, (dy, dx), axis=(0, 1)) for f in frames]
        expected = build_canvas([rolled_frames[0], {"action": 1}, rolled_frames[1], {"action": 0}, rolled_frames[2]])
        np.testing.assert_array_equal(rolled[b], expected)
        # still a true transition: the same rolled world, moved right 27 px by the recorded move
        robot2 = ToroidalDotRobot(seed=3, start=((210 + dx) % 224, (218 + dy) % 224))
        np.testing.assert_array_equal(rolled[b][:, :224], robot2.get_observation())
    np.testing.assert_array_equal(rolled[:, :, 224:232], canvases[:, :, 224:232])  # separators stay put
    np.testing.assert_array_equal(rolled[:, :, 456:464], canvases[:, :, 456:464])
    np.testing.assert_array_equal(roll_canvas_frames(canvases, np.zeros((2, 2), int), (224, 224), 8), canvases)


def test_last_slot_mask_is_196_patches_in_columns_29_to_42():
    mask = compute_patch_mask_for_last_slot(224, 16, 3, 8)
    assert mask.shape == (602,) and mask.dtype == torch.bool
    assert int(mask.sum()) == 196
    cols = torch.nonzero(mask.view(14, 43).any(0)).flatten().tolist()
    assert cols == list(range(29, 43))
    assert mask.view(14, 43)[:, 29:].all()


def test_randomized_mask_stays_in_the_last_slot_with_equal_counts():
    g = torch.Generator().manual_seed(0)
    mask = compute_randomized_patch_mask_for_last_slot(224, 16, 3, 8, mask_ratio=0.5, batch_size=4, generator=g)
    assert mask.shape == (4, 602)
    assert (mask.sum(1) == 98).all()
    assert not mask.view(4, 14, 43)[:, :, :29].any()
    assert not torch.equal(mask[0], mask[1])


def test_patchify_round_trip_on_the_wide_canvas_is_exact():
    x = torch.rand(2, 3, 224, 688)
    patches = patchify(x, 16)
    assert patches.shape == (2, 602, 768)
    assert torch.equal(unpatchify(patches, 16, (14, 43), 3), x)
    # patch 1 is the second patch of the first row
    assert torch.equal(patches[0, 1].view(16, 16, 3), x[0, :, :16, 16:32].permute(1, 2, 0))


def test_canvas_tensor_round_trip():
    canvas = build_canvas([_frame(10), 0, _frame(200), 1, _frame(30)])
    assert np.array_equal(tensor_to_uint8(canvas_to_tensor(canvas))[0], canvas)


def test_loss_ignores_visible_patches():
    target = torch.zeros(1, 602, 768)
    pred = torch.zeros(1, 602, 768)
    mask = compute_patch_mask_for_last_slot(224, 16, 3, 8)
    pred[0, ~mask] = 5.0  # huge errors only where the model is not asked to predict
    loss, mse = masked_frame_loss(pred, target, mask, foreground_weight=20.0)
    assert loss.item() == 0.0 and mse.item() == 0.0
    pred[0, mask] = 0.1
    _, mse = masked_frame_loss(pred, target, mask)
    assert mse.item() == pytest.approx(0.01)


def test_foreground_weight_counts_dot_pixels_more():
    mask = torch.ones(602, dtype=torch.bool)
    target = torch.zeros(1, 602, 768)
    target[0, 0, :10] = 1.0  # a 10-value "dot"
    pred = torch.zeros_like(target)  # predicts black everywhere
    n = 602 * 768
    loss, mse = masked_frame_loss(pred, target, mask, foreground_weight=20.0)
    assert mse.item() == pytest.approx(10 / n)
    assert loss.item() == pytest.approx(200 / (n - 10 + 200))


def test_mae_forward_backward_every_parameter_gets_a_gradient():
    model = TargetedMAEWrapper(TINY)
    imgs = torch.rand(2, 3, 224, 688)
    mask = model.default_mask()
    pred = model.forward_with_patch_mask(imgs, mask)
    assert pred.shape == (2, 602, 768) and torch.isfinite(pred).all()
    loss, _ = model.loss(imgs, pred, mask)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_encoder_sees_only_visible_patches():
    model = TargetedMAEWrapper(TINY).eval()
    mask = model.default_mask()
    a = torch.rand(1, 3, 224, 688)
    b = a.clone()
    b[..., 464:] = torch.rand(1, 3, 224, 224)  # change only the masked slot
    with torch.no_grad():
        assert torch.allclose(model.forward_with_patch_mask(a, mask), model.forward_with_patch_mask(b, mask))


def test_batched_forward_matches_per_sample_forward():
    model = TargetedMAEWrapper(TINY).eval()
    imgs = torch.rand(3, 3, 224, 688)
    mask = compute_randomized_patch_mask_for_last_slot(224, 16, 3, 8, mask_ratio=0.5, batch_size=3)
    with torch.no_grad():
        batched = model.forward_with_patch_mask(imgs, mask)
        single = torch.cat([model.forward_with_patch_mask(imgs[i : i + 1], mask[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_captured_attention_matches_fused_forward_and_rows_sum_to_one():
    model = TargetedMAEWrapper(SELF_DECODER).eval()  # the real sizes; the cross decoder's capture is tested below
    imgs = torch.rand(1, 3, 224, 688)
    mask = model.default_mask()
    with torch.no_grad():
        fused = model.forward_with_patch_mask(imgs, mask)
        pred, attn = model.forward_with_patch_mask(imgs, mask, return_attn=True)
    assert torch.allclose(fused, pred, atol=1e-5)
    assert len(attn) == 5 and all(a.shape == (1, 4, 603, 603) for a in attn)
    assert torch.allclose(torch.stack(attn).sum(-1), torch.ones(5, 1, 4, 603), atol=1e-5)
    # the fused path is back on and no hooks remain
    assert all(blk.attn.fused_attn for blk in model.mae.decoder_blocks)
    assert all(len(blk.attn.attn_drop._forward_hooks) == 0 for blk in model.mae.decoder_blocks)


def test_patches_cut_from_the_uint8_canvas_equal_patchify_of_the_image():
    canvases = np.random.default_rng(0).integers(0, 256, (2, 224, 688, 3), dtype=np.uint8)
    expected = patchify(canvas_to_tensor(canvases), 16)  # (2, 602, 768)
    assert torch.equal(canvas_to_patches(canvases, 16), expected)
    assert torch.equal(canvas_to_patches(canvases[0], 16), expected[:1])
    assert torch.equal(patchify_channels_last(torch.as_tensor(canvases), 16), patchify(torch.as_tensor(canvases).permute(0, 3, 1, 2), 16))


def test_patch_embedding_as_a_matrix_product_equals_timms_convolution():
    model = TargetedMAEWrapper(TINY).eval()
    imgs = torch.rand(2, 3, 224, 688)
    mae = model.mae
    ids_keep, _, _ = mae.split_by_mask(model.default_mask(), 2)
    with torch.no_grad():
        conv = mae.patch_embed(imgs) + mae.pos_embed[:, 1:]  # (2, 602, D) timm's module on every patch
        conv = torch.gather(conv, 1, ids_keep.unsqueeze(-1).expand(-1, -1, conv.shape[-1]))
        cls = mae.cls_token + mae.pos_embed[:, :1]
        x = torch.cat([cls.expand(2, -1, -1), conv], 1)
        for blk in mae.blocks:
            x = blk(x)
        expected = mae.norm(x)
        got = mae.forward_encoder(patchify(imgs, 16), ids_keep)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_masked_only_forward_and_loss_equal_the_full_ones_on_the_masked_patches(ratio):
    """Training and prediction compute the masked patches only; the numbers must be the ones the full
    pass gives there, the gradients too (the MAE decoder; the cross decoders are tested below)."""
    model = TargetedMAEWrapper(SELF_DECODER)  # the real sizes
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # the zero-initialised pixel head would hide differences
    patches = canvas_to_patches(np.random.default_rng(1).integers(0, 256, (3, 224, 688, 3), dtype=np.uint8), 16)
    mask = compute_randomized_patch_mask_for_last_slot(224, 16, 3, 8, mask_ratio=ratio, batch_size=3)
    full = model.forward_patches(patches, mask)  # (3, 602, 768)
    loss_full, mse_full = model.loss(unpatchify(patches, 16, (14, 43)), full, mask, 5.0)
    grads_full = torch.autograd.grad(loss_full, list(model.parameters()), allow_unused=True)
    tap: list = []
    part = model.forward_patches(patches, mask, masked_only=True, tap=tap)  # (3, L_mask, 768)
    assert part.shape == (3, int(mask[0].sum()), 768)
    torch.testing.assert_close(part, full[mask].reshape(part.shape), rtol=1e-5, atol=1e-6)
    loss, mse = model.masked_loss(patches, part, mask, 5.0)
    torch.testing.assert_close((loss, mse), (loss_full, mse_full), rtol=1e-5, atol=1e-7)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():  # the tapped input finishes every patch as the full pass does
        torch.testing.assert_close(model.mae.finish_decoder(tap[0]), full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.reconstruct(model.scatter_masked(part, mask))[..., 464:],
                                   model.reconstruct(full * mask[..., None])[..., 464:], rtol=1e-5, atol=1e-6)


def test_sincos_position_embedding_is_non_square_and_fixed():
    mae = MaskedAutoencoderViT(img_size=(224, 688), embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1)
    assert mae.pos_embed.shape == (1, 603, 32)
    assert not mae.pos_embed.requires_grad
    assert torch.all(mae.pos_embed[0, 0] == 0)
    assert torch.unique(mae.pos_embed[0, 1:], dim=0).shape[0] == 602  # every patch distinct


# -----------------------------------------------------------------------------
# CrossMAE decoder (config.decoder_mode): the masked tokens are the only queries

CROSS_MODES = ("cross", "cross_mlp", "cross_self")


def _perturbed(model: TargetedMAEWrapper) -> TargetedMAEWrapper:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # the zero-initialised pixel head would hide differences
    return model


@pytest.mark.parametrize("mode", CROSS_MODES)
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_cross_decoder_shapes_masked_only_equals_full_and_visible_patches_are_zero(mode, ratio):
    model = _perturbed(TargetedMAEWrapper(dataclasses.replace(TINY, decoder_mode=mode))).eval()
    patches = canvas_to_patches(np.random.default_rng(1).integers(0, 256, (3, 224, 688, 3), dtype=np.uint8), 16)
    mask = compute_randomized_patch_mask_for_last_slot(224, 16, 3, 8, mask_ratio=ratio, batch_size=3)
    n = int(mask[0].sum())
    with torch.no_grad():
        tap: list = []
        part = model.forward_patches(patches, mask, masked_only=True, tap=tap)
        full = model.forward_patches(patches, mask)
        single = torch.cat([model.forward_patches(patches[i : i + 1], mask[i : i + 1], masked_only=True) for i in range(3)])
    assert part.shape == (3, n, 768) and full.shape == (3, 602, 768) and torch.isfinite(part).all()
    assert tap[0].shape == (3, n, TINY.decoder_embed_dim)  # the last block's queries
    torch.testing.assert_close(part, full[mask].reshape(part.shape))
    assert (full[~mask] == 0).all()  # nothing is decoded at a visible patch
    assert (model.mae.finish_decoder(tap[0]) == 0).all()
    torch.testing.assert_close(single, part, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", CROSS_MODES)
def test_cross_decoder_every_parameter_gets_a_gradient(mode):
    model = _perturbed(TargetedMAEWrapper(dataclasses.replace(TINY, decoder_mode=mode)))  # a zero pixel head stops gradients
    patches = canvas_to_patches(np.random.default_rng(2).integers(0, 256, (2, 224, 688, 3), dtype=np.uint8), 16)
    mask = model.default_mask()
    loss, _ = model.masked_loss(patches, model.forward_patches(patches, mask, masked_only=True), mask)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.mae.mask_token.grad.abs().sum() > 0 and model.mae.decoder_blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_cross_decoder_blocks_equal_timm_blocks_over_keys_and_queries():
    """The reference: each cross block is timm's own Block run over [CLS, visible, masked] tokens, read
    at the masked tokens; in "cross" and "cross_mlp" an attention mask keeps the masked tokens from
    seeing each other (and themselves)."""
    cfg = dataclasses.replace(TINY, decoder_depth=2)
    mask = compute_patch_mask_for_last_slot(224, 16, 3, 8)
    patches = canvas_to_patches(np.random.default_rng(3).integers(0, 256, (2, 224, 688, 3), dtype=np.uint8), 16)
    for mode in ("cross_self", "cross", "cross_mlp"):
        torch.manual_seed(0)
        model = _perturbed(TargetedMAEWrapper(dataclasses.replace(cfg, decoder_mode=mode))).eval()
        mae = model.mae
        ids_keep, ids_masked, ids_restore = mae.split_by_mask(mask, 2)
        with torch.no_grad():
            got = mae.forward_patches(patches, mask, masked_only=True)
            latent = mae.forward_encoder(patches, ids_keep)
            x = mae.decoder_embed(latent)  # (2, 1 + L_vis, Dd) CLS then visible, grid order
            pos = mae.decoder_pos_embed.expand(2, -1, -1)
            ctx = torch.cat([x[:, :1] + pos[:, :1], x[:, 1:] + pos[:, 1:][:, ~mask]], 1)
            xq = mae.mask_token + pos[:, 1:][:, mask]  # (2, L_mask, Dd)
            n_ctx, n = ctx.shape[1], ctx.shape[1] + xq.shape[1]
            allowed = torch.ones(n, n, dtype=torch.bool)
            if mode != "cross_self":
                allowed[n_ctx:, n_ctx:] = False
            for blk in mae.decoder_blocks:
                new = blk(torch.cat([ctx, xq], 1), attn_mask=allowed)[:, n_ctx:]
                if mode == "cross_mlp":
                    ctx = ctx + blk.mlp(blk.norm2(ctx))
                xq = new
            expected = mae.decoder_pred(mae.decoder_norm(xq))
        rows = slice(None)
        torch.testing.assert_close(got[:, rows], expected[:, rows], rtol=1e-4, atol=1e-5, msg=mode)


@pytest.mark.parametrize("mode", CROSS_MODES)
def test_cross_decoder_attention_capture_keeps_the_viewers_layout(mode):
    import attention_viz as av

    torch.manual_seed(0)  # the initial look-ups' sharpness depends on the random weights
    model = TargetedMAEWrapper(dataclasses.replace(AutoencoderConcatPredictorWorldModelConfig(), decoder_mode=mode)).eval()
    imgs = torch.rand(1, 3, 224, 688)
    mask = model.default_mask()
    with torch.no_grad():
        fused = model.forward_with_patch_mask(imgs, mask)
        pred, attn = model.forward_with_patch_mask(imgs, mask, return_attn=True)
    torch.testing.assert_close(pred, fused, rtol=1e-5, atol=1e-5)
    assert len(attn) == 5 and all(a.shape == (1, 4, 603, 603) for a in attn)
    w = torch.stack(attn)[:, 0]  # (layers, heads, N, N)
    rows = torch.cat([torch.zeros(1, dtype=torch.bool), mask])  # the masked queries' rows
    torch.testing.assert_close(w[:, :, rows].sum(-1), torch.ones(5, 4, 196))  # each a softmax over its keys
    assert (w[:, :, ~rows] == 0).all()  # CLS and visible tokens are no queries
    if mode != "cross_self":
        assert (w[:, :, :, 1:][..., mask] == 0).all()  # masked tokens are no keys
    # block 0 starts out reading one slot back: a query at (row 5, column 35) looks ~14.5 columns left
    q = 1 + 5 * 43 + 35
    assert (w[0, :, q, 1:].argmax(-1) % 43).tolist() == [21, 20, 19, 18]
    # ... on its own row: random content moves a few (head, query) pairs a row off (~13% here, ~5% on
    # black frames with a dot, with either position code)
    queries = torch.arange(1, 604)[rows]  # (196,) token index of each masked query
    on_row = w[0][:, rows, 1:].argmax(-1) // 43 == (queries - 1) // 43  # (heads, 196)
    assert on_row.float().mean() > 0.8
    # block 1's first head starts out reading the action band (patch columns 27-28): on average over
    # the masked queries far more than the ~5% of its weight uniform attention would put there (how
    # much varies with the random initialisation, 0.2-1.0 over seeds with either position code)
    band = w[1, 0][rows][:, 1:].reshape(196, 14, 43)[..., 27:29].sum((-2, -1))  # (196,)
    assert band.mean() > 0.2
    out = av.decoder_to_encoder(w.numpy(), mask.numpy(), [0, 4], [0, 3], "mean")
    assert out.shape == (2, 196, 406) and np.isfinite(out).all()


def test_decoder_mode_is_checked_and_recorded_only_when_not_the_default():
    assert "decoder_mode" not in SELF_DECODER.architecture()  # checkpoints from before the field hold this decoder
    assert AutoencoderConcatPredictorWorldModelConfig().architecture()["decoder_mode"] == "cross_self"
    assert dataclasses.replace(TINY, decoder_mode="cross").architecture()["decoder_mode"] == "cross"
    with pytest.raises(ValueError, match="decoder_mode"):
        TargetedMAEWrapper(dataclasses.replace(TINY, decoder_mode="crossed"))


@pytest.mark.parametrize("mode", CROSS_MODES)
def test_world_model_loop_views_and_attention_with_a_cross_decoder(mode):
    from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
    from toroidal_action_selectors import make_selector
    from toroidal_dot_robot import ToroidalDotRobot

    cfg = dataclasses.replace(TINY, decoder_mode=mode, replay_batch_size=1)
    wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=1), action_selector=make_selector("alternate", 1),
                                              device="cpu", config=cfg)
    for _ in range(5):
        metrics = wm.run_one_iteration()
    assert np.isfinite(metrics["training_loss"]) and metrics["prediction_error"] is not None
    views = wm.get_training_views()
    assert views["inpainting"].shape == (224, 688, 3) and (views["inpainting"][:, :464] == 0).all()
    capture = wm.capture_decoder_attention()
    assert capture.weights.shape == (2, 4, 603, 603) and capture.prediction.shape == (224, 224, 3)


def _first_block_look_ups(cfg, row, col):
    """Where each head of decoder block 0 looks first, from patch (row, col), at initialisation:
    the (row, column) its attention weighs most, from the position code alone."""
    mae = TargetedMAEWrapper(cfg).mae
    blk = mae.decoder_blocks[0]
    H = blk.attn.num_heads
    with torch.no_grad():
        qkv = blk.attn.qkv(blk.norm1(mae.decoder_pos_embed[0, 1:]))  # (L, 3D)
    q, k = qkv.reshape(qkv.shape[0], 3, H, -1).unbind(1)[:2]  # (L, H, hd) each
    gw = mae.grid_size[1]
    i = row * gw + col
    weights = torch.einsum("hd,lhd->hl", q[i], k).softmax(-1)  # (H, L)
    return [(int(j) // gw, int(j) % gw) for j in weights.argmax(-1)]


def test_a_torus_position_code_makes_the_first_look_up_wrap_round_the_frame_edge():
    # the default offsets (-0.5, 0.5, 1.5, 2.5): heads 2 and 3 look where a moved dot came from.
    # From the first column of the masked slot (canvas column 29) that place is past the left edge:
    # on the torus it is the right edge of the previous frame (columns 26-27, slot 1), not slot 0.
    canvas = _first_block_look_ups(AutoencoderConcatPredictorWorldModelConfig(decoder_position="canvas"), 7, 29)
    torus = _first_block_look_ups(AutoencoderConcatPredictorWorldModelConfig(decoder_position="torus"), 7, 29)
    assert canvas[2:] == [(7, 13), (7, 12)]  # the canvas code runs on into frame t-2's right edge
    assert torus[2:] == [(7, 27), (7, 26)]
    assert torus[:2] == canvas[:2] == [(7, 15), (7, 14)]  # "stay" heads: the same place in frame t-1
    # away from the edge both codes look at the same places
    assert _first_block_look_ups(AutoencoderConcatPredictorWorldModelConfig(decoder_position="torus"), 3, 36) == \
        _first_block_look_ups(AutoencoderConcatPredictorWorldModelConfig(decoder_position="canvas"), 3, 36)


def test_the_decoder_position_code_is_part_of_the_architecture():
    cfg = AutoencoderConcatPredictorWorldModelConfig()
    assert cfg.decoder_position == "torus" and cfg.architecture()["decoder_position"] == "torus"
    canvas = AutoencoderConcatPredictorWorldModelConfig.from_env({"CWM_DECODER_POSITION": "canvas"})
    assert "decoder_position" not in canvas.architecture()  # as in checkpoints from before the field
    with pytest.raises(ValueError, match="decoder_position must be 'canvas' or 'torus', got 'ring'"):
        TargetedMAEWrapper(dataclasses.replace(TINY, decoder_position="ring"))
