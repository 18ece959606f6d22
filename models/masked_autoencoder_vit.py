"""A masked-autoencoder ViT for non-square canvases, built from timm blocks.

References: He et al., "Masked Autoencoders Are Scalable Vision Learners" (facebookresearch/mae,
``models_mae.py``); timm's ``PatchEmbed`` and ``Block``; lucidrains' ``Recorder`` for attention
capture. Differences from MAE: the mask is given by the caller instead of drawn at random,
the patch grid may be wide (14 x 43 for a 224x688 canvas), and nothing assumes 3 channels.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

SPLIT_CACHE_SIZE = 16  # index sets kept per model (mask x batch size); the loop uses two or three

# -----------------------------------------------------------------------------
# helpers


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding for a (rows, columns) patch grid.

    Half the channels encode the row, half the column (MAE ``util/pos_embed.py``, without its
    square-grid assumption).

    Returns:
        float32 (gh * gw [+1], embed_dim); a zero row first for the CLS token when asked.
    """
    gh, gw = grid_size
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")  # (gh, gw)
    emb = np.concatenate(
        [_1d_sincos(embed_dim // 2, rows.reshape(-1)), _1d_sincos(embed_dim // 2, cols.reshape(-1))], axis=1
    )  # (gh*gw, D)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)  # (1 + gh*gw, D)
    return emb.astype(np.float32)


TORUS_HARMONICS = 4  # frame-periodic column harmonics in a "torus" decoder position embedding
TORUS_FIRST_FREQUENCY = 10  # column frequencies from this index on are replaced (low ones: nearly flat over a canvas)
SLOT_PERIOD = 3.0  # the slot code turns once every this many slots


def torus_slots(grid_size: tuple[int, int], pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Each patch's frame slot and column inside its frame, for a canvas of slots ``pitch`` patch
    columns apart (a frame plus its separator). A patch straddling a separator counts with the slot
    it overlaps most; its column may be -0.5 (its left half is separator).

    Returns:
        slot, column: float64 (gh * gw,) each, row-major like the patch grid.
    """
    gh, gw = grid_size
    cols = np.tile(np.arange(gw, dtype=np.float64), gh)  # (gh*gw,)
    slot = np.floor((cols + 0.5) / pitch)
    return slot, cols - pitch * slot


def add_torus_position(emb: np.ndarray, grid_size: tuple[int, int], pitch: float, frame_cols: float) -> np.ndarray:
    """Overwrite some low column frequencies of a 2-D sin-cos embedding (``get_2d_sincos_pos_embed``,
    no CLS row) with a code of where a patch is *on the torus*: ``TORUS_HARMONICS`` harmonics of its
    column inside its frame, period ``frame_cols`` (so the right edge of a frame is next to its left
    edge), and its slot, turning once every ``SLOT_PERIOD`` slots. A look-up "this place in the slot
    before, a few columns left" is then one rotation of these channels, wrapping round the frame's
    edge (``init_torus_correspondence_attention``). The high frequencies, rows, and the canvas
    column code the action look-up reads, are kept.

    Returns:
        float32 (gh * gw, D), a new array.
    """
    D = emb.shape[1]
    half, quarter = D // 2, D // 4
    first, last = TORUS_FIRST_FREQUENCY, TORUS_FIRST_FREQUENCY + TORUS_HARMONICS  # harmonics, then the slot
    if last >= quarter:
        raise ValueError(f"a torus position embedding needs a width of at least {4 * (last + 1)}, got {D}")
    slot, col = torus_slots(grid_size, pitch)
    out = emb.copy()
    m = np.arange(1, TORUS_HARMONICS + 1, dtype=np.float64)  # (K,) harmonics
    angles = np.einsum("l,k->lk", col, 2 * np.pi * m / frame_cols)  # (L, K)
    out[:, half + first : half + last] = np.sin(angles)
    out[:, half + quarter + first : half + quarter + last] = np.cos(angles)
    out[:, half + last] = np.sin(2 * np.pi * slot / SLOT_PERIOD)
    out[:, half + quarter + last] = np.cos(2 * np.pi * slot / SLOT_PERIOD)
    return out.astype(np.float32)


def _1d_sincos(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # (dim/2,)
    angles = np.einsum("m,d->md", pos, omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (M, dim)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images (B, C, H, W) -> patches (B, L, p*p*C), row-major over the (H/p, W/p) grid."""
    B, C, H, W = imgs.shape
    p = patch_size
    gh, gw = H // p, W // p
    x = imgs.reshape(B, C, gh, p, gw, p)  # (B, C, gh, p, gw, p)
    x = torch.einsum("bchpwq->bhwpqc", x)  # (B, gh, gw, p, p, C)
    return x.reshape(B, gh * gw, p * p * C)  # (B, L, p*p*C)


def patchify_channels_last(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Channels-last images (B, H, W, C) -> patches (B, L, p*p*C), the same layout as ``patchify``.

    Canvases are stored (H, W, C); cutting them into patches from that layout moves runs of
    p*C contiguous values (no per-pixel shuffle), and works on uint8 before any float copy."""
    B, H, W, C = x.shape
    p = patch_size
    gh, gw = H // p, W // p
    x = x.reshape(B, gh, p, gw, p * C)  # (B, gh, p, gw, p*C)
    return x.permute(0, 1, 3, 2, 4).reshape(B, gh * gw, p * p * C)  # (B, L, p*p*C)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: tuple[int, int], in_chans: int = 3) -> torch.Tensor:
    """Patches (B, L, p*p*C) -> images (B, C, gh*p, gw*p); the exact inverse of ``patchify``."""
    B = x.shape[0]
    p = patch_size
    gh, gw = grid_size
    x = x.reshape(B, gh, gw, p, p, in_chans)  # (B, gh, gw, p, p, C)
    x = torch.einsum("bhwpqc->bchpwq", x)  # (B, C, gh, p, gw, p)
    return x.reshape(B, in_chans, gh * p, gw * p)  # (B, C, H, W)


@torch.no_grad()
def init_correspondence_attention(attn: nn.Module, column_shifts: Sequence[float], gain: float) -> None:
    """Initialise one timm ``Attention`` so each head looks a fixed number of columns to the left.

    The decoder's tokens carry the 2-D sin-cos position embedding (rows in channels [0, D/2),
    columns in [D/2, D), each half ``[sin(w_k x) ..., cos(w_k x) ...]``). Keys are set to that
    embedding and queries to the same embedding rotated by ``w_k * shift`` in every column
    frequency, so ``q_i . k_j`` peaks where ``row_j = row_i`` and ``col_j = col_i - shift``: a
    query in one frame slot starts out attending to the same place in the previous slot. Every
    head uses the ``head_dim / 4`` highest frequencies of both axes (periods of 6 to ~50 patches). Values and outputs keep their
    random initialisation; training learns what to copy and how far things moved.

    Args:
        attn: a timm Attention with ``qkv`` of shape (3D, D) and D divisible by 4 * num_heads.
        column_shifts: one shift in patch columns per head (may be fractional).
        gain: scale of the queries; larger means sharper initial attention.
    """
    D = attn.qkv.in_features
    H, hd = attn.num_heads, attn.head_dim
    half, quarter = D // 2, D // 4  # channels per axis; frequencies per axis
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,) as in the embedding
    Wq = torch.zeros(D, D, dtype=torch.float64)
    Wk = torch.zeros(D, D, dtype=torch.float64)
    for h in range(H):  # a handful of heads
        ks = torch.arange(hd // 4)  # (hd/4,) the highest frequencies: a sharp peak, little aliasing
        out = h * hd + 4 * torch.arange(len(ks))  # first of 4 output channels per frequency
        row_sin, row_cos, col_sin, col_cos = ks, ks + quarter, ks + half, ks + half + quarter
        c, s = torch.cos(omega[ks] * column_shifts[h]), torch.sin(omega[ks] * column_shifts[h])
        Wk[out, row_sin] = Wk[out + 1, row_cos] = Wk[out + 2, col_sin] = Wk[out + 3, col_cos] = 1.0
        Wq[out, row_sin] = Wq[out + 1, row_cos] = 1.0
        Wq[out + 2, col_sin], Wq[out + 2, col_cos] = c, -s  # sin(w(x - shift))
        Wq[out + 3, col_sin], Wq[out + 3, col_cos] = s, c  # cos(w(x - shift))
    attn.qkv.weight[:D] = (gain * Wq).to(attn.qkv.weight.dtype)
    attn.qkv.weight[D : 2 * D] = Wk.to(attn.qkv.weight.dtype)
    if attn.qkv.bias is not None:
        attn.qkv.bias[: 2 * D] = 0


@torch.no_grad()
def init_torus_correspondence_attention(attn: nn.Module, column_shifts: Sequence[float], gain: float,
                                        frame_cols: float) -> None:
    """``init_correspondence_attention`` for a decoder with a torus position embedding
    (``add_torus_position``): each head starts out attending to the same row, the slot before, and
    the column ``shift`` to the left *modulo the frame width*, so a dot that left a frame's right
    edge is looked for at its left edge from the first step. Per head: the 3 highest row
    frequencies (matched), the ``TORUS_HARMONICS`` column harmonics (rotated by the shift) and the
    slot code (rotated by one slot), two channels each: 16 channels, the decoder's head width.
    """
    D = attn.qkv.in_features
    H, hd = attn.num_heads, attn.head_dim
    half, quarter = D // 2, D // 4
    n_rows = (hd - 2 * TORUS_HARMONICS - 2) // 2
    if n_rows < 1:
        raise ValueError(f"a torus look-up needs heads at least {2 * TORUS_HARMONICS + 4} wide, got {hd}")
    omega_cols = 2 * torch.pi * torch.arange(1, TORUS_HARMONICS + 1, dtype=torch.float64) / frame_cols  # (K,)
    Wq = torch.zeros(D, D, dtype=torch.float64)
    Wk = torch.zeros(D, D, dtype=torch.float64)
    rows = torch.arange(n_rows)
    torus = TORUS_FIRST_FREQUENCY + torch.arange(TORUS_HARMONICS)  # frequency indices of the harmonics
    slot = TORUS_FIRST_FREQUENCY + TORUS_HARMONICS
    for h in range(H):  # a handful of heads
        o = h * hd
        out_r = o + 2 * rows  # (n_rows,) sin, cos pairs of the rows: matched as they are
        Wq[out_r, rows] = Wk[out_r, rows] = 1.0
        Wq[out_r + 1, rows + quarter] = Wk[out_r + 1, rows + quarter] = 1.0
        out_c = o + 2 * n_rows + 2 * torch.arange(TORUS_HARMONICS)  # (K,) pairs of the column harmonics
        angle = torch.cat([omega_cols * column_shifts[h], torch.tensor([2 * torch.pi / SLOT_PERIOD], dtype=torch.float64)])
        out = torch.cat([out_c, torch.tensor([o + 2 * n_rows + 2 * TORUS_HARMONICS])])  # (K + 1,) harmonics, slot
        sin_in = half + torch.cat([torus, torch.tensor([slot])])  # (K + 1,) input channels of sin(w x)
        cos_in = sin_in + quarter
        c, s = torch.cos(angle), torch.sin(angle)
        Wk[out, sin_in] = Wk[out + 1, cos_in] = 1.0
        Wq[out, sin_in], Wq[out, cos_in] = c, -s  # sin(w (x - shift))
        Wq[out + 1, sin_in], Wq[out + 1, cos_in] = s, c  # cos(w (x - shift))
    attn.qkv.weight[:D] = (gain * Wq).to(attn.qkv.weight.dtype)
    attn.qkv.weight[D : 2 * D] = Wk.to(attn.qkv.weight.dtype)
    if attn.qkv.bias is not None:
        attn.qkv.bias[: 2 * D] = 0


@torch.no_grad()
def init_column_lookup_attention(attn: nn.Module, column: float, gain: float, heads: Sequence[int] = (0,)) -> None:
    """Initialise some heads of a timm ``Attention`` to look at one fixed column of the query's row.

    Like ``init_correspondence_attention``, but the column half of the query comes from the
    bias (the sin-cos embedding of ``column``) instead of the query's own position, so every
    query in a row starts out attending to the same place: the separator band that carries the
    action. Other heads keep their initialisation.

    Args:
        attn: a timm Attention with ``qkv`` of shape (3D, D), a bias, and D divisible by 4 * num_heads.
        column: the patch column to look at (may be fractional).
        gain: scale of the queries; larger means sharper initial attention.
        heads: which heads to initialise.
    """
    D = attn.qkv.in_features
    hd = attn.head_dim
    half, quarter = D // 2, D // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    W = attn.qkv.weight
    for h in heads:
        ks = torch.arange(hd // 4)  # the highest frequencies, as in init_correspondence_attention
        out = h * hd + 4 * torch.arange(len(ks))
        row_sin, row_cos, col_sin, col_cos = ks, ks + quarter, ks + half, ks + half + quarter
        rows = slice(h * hd, (h + 1) * hd)
        W[rows] = 0  # queries of this head: rows from the position, columns from the bias
        W[D + h * hd : D + (h + 1) * hd] = 0  # keys of this head
        W[out, row_sin] = W[out + 1, row_cos] = gain
        W[D + out, row_sin] = W[D + out + 1, row_cos] = W[D + out + 2, col_sin] = W[D + out + 3, col_cos] = 1.0
        attn.qkv.bias[rows] = 0
        attn.qkv.bias[D + h * hd : D + (h + 1) * hd] = 0
        attn.qkv.bias[out + 2] = gain * torch.sin(omega[ks] * column).to(W.dtype)
        attn.qkv.bias[out + 3] = gain * torch.cos(omega[ks] * column).to(W.dtype)


def block_for_queries(blk: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A timm ``Block`` whose output is wanted at some tokens only: every token is a key and a
    value, only the tokens ``ids`` are queries. The result equals ``blk(x)`` gathered at ``ids``
    (the same products, summed in the same order per row); the query projection, attention rows,
    output projection and MLP run for ``Nq`` tokens instead of ``N``.

    Args:
        blk: a timm Block (pre-norm attention then MLP, no attention gate).
        x: (B, N, D) the block's input tokens.
        ids: (B, Nq) long, the tokens whose output is wanted.

    Returns:
        (B, Nq, D).
    """
    attn = blk.attn
    if getattr(attn, "gate", None) is not None:
        raise ValueError("block_for_queries does not support gated attention")
    B, N, D = x.shape
    Nq, H, hd = ids.shape[1], attn.num_heads, attn.head_dim
    A = H * hd  # attention width
    xq = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, D))  # (B, Nq, D)
    h = blk.norm1(x)  # (B, N, D)
    hq = torch.gather(h, 1, ids.unsqueeze(-1).expand(-1, -1, D))  # (B, Nq, D)
    w, b = attn.qkv.weight, attn.qkv.bias  # (3A, D), (3A,)
    q = F.linear(hq, w[:A], None if b is None else b[:A])  # (B, Nq, A)
    kv = F.linear(h, w[A:], None if b is None else b[A:])  # (B, N, 2A)
    q = q.reshape(B, Nq, H, hd).transpose(1, 2)  # (B, H, Nq, hd)
    k, v = kv.reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)  # (B, H, Nq, hd)
    o = o.transpose(1, 2).reshape(B, Nq, A)  # (B, Nq, A)
    o = attn.proj_drop(attn.proj(getattr(attn, "norm", nn.Identity())(o)))  # (B, Nq, D)
    xq = xq + blk.drop_path1(blk.ls1(o))
    return xq + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(xq))))  # (B, Nq, D)


DECODER_MODES = ("self", "cross", "cross_mlp", "cross_self")


def cross_block(blk: nn.Module, xq: torch.Tensor, ctx: torch.Tensor, record: list | None = None) -> torch.Tensor:
    """A timm ``Block`` as a CrossMAE decoder block (Fu et al., arXiv 2401.14391): the tokens ``xq``
    are the queries, the tokens ``ctx`` the keys and values; the block's own parameters serve both
    (``norm1`` and the key/value part of ``qkv`` on ``ctx``, the query part on ``xq``), so the
    attention initialisations of the self-attention decoder apply unchanged.

    Args:
        blk: a timm Block (pre-norm attention then MLP, no attention gate).
        xq: (B, Nq, D) query tokens (the masked patches).
        ctx: (B, Nk, D) key/value tokens.
        record: a list that receives the softmax weights (B, heads, Nq, Nk) (explicit, slower path).

    Returns:
        (B, Nq, D), ``xq`` after the attention and MLP residuals.
    """
    attn = blk.attn
    if getattr(attn, "gate", None) is not None:
        raise ValueError("cross_block does not support gated attention")
    B, Nq, D = xq.shape
    Nk, H, hd = ctx.shape[1], attn.num_heads, attn.head_dim
    A = H * hd
    w, b = attn.qkv.weight, attn.qkv.bias  # (3A, D), (3A,)
    q = F.linear(blk.norm1(xq), w[:A], None if b is None else b[:A]).reshape(B, Nq, H, hd).transpose(1, 2)  # (B, H, Nq, hd)
    kv = F.linear(blk.norm1(ctx), w[A:], None if b is None else b[A:])  # (B, Nk, 2A)
    k, v = kv.reshape(B, Nk, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, Nk, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    if record is None:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)  # (B, H, Nq, hd)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, Nq, Nk)
        a = a.softmax(dim=-1)
        record.append(a.detach())
        o = attn.attn_drop(a) @ v
    o = o.transpose(1, 2).reshape(B, Nq, A)  # (B, Nq, A)
    o = attn.proj_drop(attn.proj(getattr(attn, "norm", nn.Identity())(o)))  # (B, Nq, D)
    xq = xq + blk.drop_path1(blk.ls1(o))
    return xq + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(xq))))  # (B, Nq, D)


@contextmanager
def capture_attention(blocks: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Record the softmax attention weights of timm ``Block``s during one forward pass.

    timm computes attention with fused SDPA, which never materialises the weights, so for the
    duration of the ``with`` block the given blocks take the explicit path, and a hook on each
    ``attn_drop`` (identity at p=0) copies the weights. Hooks and the fused flag are restored
    on exit, so training keeps the fused kernel.

    Yields:
        A list that, after the forward pass, holds one (B, heads, N, N) float tensor per block.
    """
    recorded: list[torch.Tensor] = []
    saved = [blk.attn.fused_attn for blk in blocks]
    hooks = [blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: recorded.append(out.detach())) for blk in blocks]
    try:
        for blk in blocks:
            blk.attn.fused_attn = False
        yield recorded
    finally:
        for blk, fused in zip(blocks, saved):
            blk.attn.fused_attn = fused
        for h in hooks:
            h.remove()


# -----------------------------------------------------------------------------
# model


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder over visible patches and a light decoder over all patches.

    Args:
        img_size: (H, W) of the input canvas; both multiples of ``patch_size``.
        patch_size: patch side in pixels.
        in_chans: image channels.
        embed_dim, depth, num_heads: encoder width, blocks and heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder width, blocks and heads.
        mlp_ratio: MLP hidden width over token width.
        decoder_mode: "self" (every decoder block is self-attention over all tokens, MAE) or a
            CrossMAE decoder whose queries are the masked tokens alone: "cross" (keys and values are
            the visible decoder tokens and CLS, the same in every block), "cross_mlp" (those tokens
            also pass through each block's MLP, a cheap update without attention), "cross_self"
            (keys and values are the visible tokens plus the masked tokens as they are now).
            Only the masked patches get pixels in a cross mode; the parameters are the same.
    """

    def __init__(
        self,
        img_size: tuple[int, int] = (224, 688),
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 256,
        depth: int = 5,
        num_heads: int = 4,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 5,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        decoder_mode: str = "self",
        decoder_torus: tuple[float, float] | None = None,
    ):
        super().__init__()
        if decoder_mode not in DECODER_MODES:
            raise ValueError(f"decoder_mode must be one of {DECODER_MODES}, got {decoder_mode!r}")
        self.decoder_mode = decoder_mode
        self.decoder_torus = decoder_torus  # (slot pitch, frame width) in patch columns: a torus position code; None: canvas
        self.patch_size = patch_size
        self.in_chans = in_chans

        # encoder: patch embedding, CLS token, fixed position embedding, blocks
        self.patch_embed = PatchEmbed(img_size=tuple(img_size), patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", torch.zeros(1, num_patches + 1, embed_dim), persistent=False)
        self.blocks = nn.ModuleList(
            [Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim)

        # decoder: project, fill masked places with a learned token, blocks, predict pixels
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, num_patches + 1, decoder_embed_dim), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(dim=decoder_embed_dim, num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's initialisation: fixed sin-cos positions, xavier linears, small CLS/mask tokens."""
        self.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size, True)).unsqueeze(0))
        dec = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, True)  # (1 + L, Dd)
        if self.decoder_torus is not None:
            dec[1:] = add_torus_position(dec[1:], self.grid_size, *self.decoder_torus)
        self.decoder_pos_embed.copy_(torch.from_numpy(dec).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # like nn.Linear, not a conv
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # -- stages ----------------------------------------------------------------

    def split_by_mask(self, patch_mask: torch.Tensor, B: int, device: torch.device | str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices of the visible and of the masked patches, and the permutation that restores the
        original order.

        The indices are worked out on the host (from a CPU mask this never waits for the device) and
        kept for each distinct mask and batch size (at most ``SPLIT_CACHE_SIZE``), so the loop's fixed mask costs one
        upload in all and the same index tensors serve every step (as a CUDA graph needs).

        Args:
            patch_mask: (L,) or (B, L) bool, True = masked; every row masks the same count.
            B: batch size.
            device: where the indices are wanted (default: the mask's device).

        Returns:
            ids_keep (B, L_vis) visible patch indices in grid order; ids_masked (B, L_mask) masked
            patch indices in grid order; ids_restore (B, L) such that gathering ``[visible tokens,
            mask tokens]`` with it gives grid order back. Shared: never modify them in place.
        """
        device = torch.device(device) if device is not None else patch_mask.device
        mask = patch_mask.detach().cpu()
        key = (tuple(mask.shape), int(B), str(device), mask.numpy().tobytes())
        cache = self.__dict__.setdefault("_split_cache", {})
        if key not in cache:
            m = mask.expand(B, -1) if mask.ndim == 1 else mask  # (B, L)
            n_keep = m.shape[1] - int(m[0].sum())
            ids_shuffle = torch.argsort(m.to(torch.int8), dim=1, stable=True)  # (B, L) visible first, grid order kept
            ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
            if len(cache) >= SPLIT_CACHE_SIZE:
                cache.clear()
            cache[key] = tuple(t.contiguous().to(device) for t in (ids_shuffle[:, :n_keep], ids_shuffle[:, n_keep:], ids_restore))
        return cache[key]

    def cached_index_sets(self) -> tuple:
        """Every index set ``split_indices`` holds in its cache now; a recorded CUDA graph reads
        them by address, so it keeps these alive while the cache may be cleared."""
        return tuple(self.__dict__.get("_split_cache", {}).values())

    def forward_encoder(self, patches: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode the visible patches. patches (B, L, p*p*C) -> latent (B, 1 + L_vis, D).

        The patch embedding is timm's stride-p convolution, applied as the matrix product it is,
        to the visible patches only (the masked ones never reach the encoder)."""
        x = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # (B, L_vis, P)
        w = self.patch_embed.proj.weight  # (D, C, p, p)
        x = F.linear(x, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.patch_embed.proj.bias)  # (B, L_vis, D)
        pos = self.pos_embed[:, 1:].expand(x.shape[0], -1, -1)  # (B, L, D)
        x = x + torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, L_vis, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + L_vis, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, ids_out: torch.Tensor | None = None,
                        tap: list | None = None, attn: list | None = None) -> torch.Tensor:
        """Decode visible tokens plus mask tokens in grid order -> pixels (B, L, p*p*C).

        With ``ids_out`` (B, L_out) patch indices, only those patches' pixels are computed:
        (B, L_out, p*p*C), equal to the full output gathered there. The last block then runs its
        queries, MLP and the pixel head for those tokens only (``block_for_queries``); every
        earlier block still runs for all tokens, since each of them is a key of the next. A list
        given as ``tap`` receives the last block's input (B, 1 + L, Dd), for ``finish_decoder``.

        A cross ``decoder_mode`` runs the blocks for the masked tokens only (``_forward_cross``);
        ``attn`` (cross modes only) then receives each block's weights as (B, heads, 1 + L, 1 + L)."""
        x = self.decoder_embed(latent)  # (B, 1 + L_vis, Dd)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)  # (B, L_mask, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd) visible first, then masked
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, L, Dd) grid order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + L, Dd)
        if self.decoder_mode != "self":
            return self._forward_cross(x, ids_restore, mask_tokens.shape[1], ids_out, tap, attn)
        if ids_out is None:
            for blk in self.decoder_blocks:
                x = blk(x)
            x = self.decoder_pred(self.decoder_norm(x))  # (B, 1 + L, p*p*C)
            return x[:, 1:]  # (B, L, p*p*C) drop CLS
        for blk in self.decoder_blocks[:-1]:
            x = blk(x)
        if tap is not None:
            tap.append(x)
        x = block_for_queries(self.decoder_blocks[-1], x, ids_out + 1)  # (B, L_out, Dd); token 0 is CLS
        return self.decoder_pred(self.decoder_norm(x))  # (B, L_out, p*p*C)

    def _forward_cross(self, x: torch.Tensor, ids_restore: torch.Tensor, n_masked: int, ids_out: torch.Tensor | None,
                       tap: list | None, attn: list | None) -> torch.Tensor:
        """The CrossMAE decoder on the embedded tokens x (B, 1 + L, Dd) in grid order (CLS first):
        the masked tokens are the queries of every block, the CLS and visible tokens the keys (see
        ``decoder_mode``). Returns the masked patches' pixels (B, L_mask, P) in grid order, or with
        ``ids_out`` None every patch (B, L, P) with the visible ones zero (nothing is decoded there).
        ``tap`` receives the last block's query input (B, L_mask, Dd); ``attn`` one (B, heads,
        1 + L, 1 + L) tensor per block, zero outside the computed rows (masked queries) and columns."""
        B, L = ids_restore.shape
        Dd = x.shape[-1]
        ids_shuffle = torch.argsort(ids_restore, dim=1)  # (B, L) visible first, then masked (grid order in each)
        n_vis = x.shape[1] - 1 - n_masked
        ids_vis, ids_msk = ids_shuffle[:, :n_vis], ids_shuffle[:, n_vis:]  # (B, L_vis), (B, L_mask)
        if ids_out is not None and not torch.equal(ids_out, ids_msk):
            raise ValueError("a cross decoder computes the masked patches only")
        ctx = torch.cat([x[:, :1], torch.gather(x, 1, (ids_vis + 1).unsqueeze(-1).expand(-1, -1, Dd))], dim=1)  # (B, 1 + L_vis, Dd)
        xq = torch.gather(x, 1, (ids_msk + 1).unsqueeze(-1).expand(-1, -1, Dd))  # (B, L_mask, Dd)
        rec: list | None = [] if attn is not None else None
        for i, blk in enumerate(self.decoder_blocks):
            if tap is not None and i == len(self.decoder_blocks) - 1:
                tap.append(xq)
            keys = torch.cat([ctx, xq], dim=1) if self.decoder_mode == "cross_self" else ctx
            xq_new = cross_block(blk, xq, keys, rec)
            if self.decoder_mode == "cross_mlp" and i < len(self.decoder_blocks) - 1:
                ctx = ctx + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(ctx))))
            xq = xq_new
        if rec is not None:  # scatter each block's (B, H, L_mask, Nk) weights into the (B, H, 1 + L, 1 + L) grid
            key_ids = torch.cat([torch.zeros_like(ids_vis[:, :1]), ids_vis + 1], dim=1)  # (B, 1 + L_vis)
            if self.decoder_mode == "cross_self":
                key_ids = torch.cat([key_ids, ids_msk + 1], dim=1)
            for a in rec:
                full = a.new_zeros(B, a.shape[1], L + 1, L + 1)
                rows = (ids_msk + 1)[:, None, :, None].expand(-1, a.shape[1], -1, L + 1)  # (B, H, L_mask, 1 + L)
                cols = key_ids[:, None, None, :].expand(-1, a.shape[1], a.shape[2], -1)  # (B, H, L_mask, Nk)
                block_rows = a.new_zeros(B, a.shape[1], a.shape[2], L + 1).scatter_(3, cols, a)  # (B, H, L_mask, 1 + L)
                attn.append(full.scatter_(2, rows, block_rows))
        out = self.decoder_pred(self.decoder_norm(xq))  # (B, L_mask, P)
        if ids_out is not None:
            return out
        full = out.new_zeros(B, L, out.shape[-1])
        return full.scatter_(1, ids_msk.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out)  # (B, L, P)

    def finish_decoder(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder block and the pixel head over every token: the last block's input
        (B, 1 + L, Dd), as ``forward_decoder`` taps it, -> pixels (B, L, p*p*C). A cross decoder
        decodes no visible patch: (B, L, p*p*C) zeros (its tap holds the masked queries only)."""
        if self.decoder_mode != "self":
            L, P = self.grid_size[0] * self.grid_size[1], self.patch_size**2 * self.in_chans
            return x.new_zeros(x.shape[0], L, P)
        x = self.decoder_pred(self.decoder_norm(self.decoder_blocks[-1](x)))  # (B, 1 + L, p*p*C)
        return x[:, 1:]  # drop CLS

    def forward(self, imgs: torch.Tensor, patch_mask: torch.Tensor, masked_only: bool = False,
                tap: list | None = None, attn: list | None = None) -> torch.Tensor:
        """Inpaint: imgs (B, C, H, W), patch_mask (L,) or (B, L) -> pred (B, L, p*p*C), or with
        ``masked_only`` the masked patches alone, in grid order: (B, L_mask, p*p*C) (``tap``: see
        ``forward_decoder``)."""
        expected = (self.in_chans, self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)
        if tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"images must be (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(imgs.shape)}")
        return self.forward_patches(patchify(imgs, self.patch_size), patch_mask, masked_only, tap, attn)

    def forward_patches(self, patches: torch.Tensor, patch_mask: torch.Tensor, masked_only: bool = False,
                        tap: list | None = None, attn: list | None = None) -> torch.Tensor:
        """``forward`` for images already cut into patches: (B, L, p*p*C) as ``patchify`` makes them."""
        L, P = self.grid_size[0] * self.grid_size[1], self.patch_size**2 * self.in_chans
        if patches.ndim != 3 or tuple(patches.shape[1:]) != (L, P):
            raise ValueError(f"patches must be (B, {L}, {P}), got {tuple(patches.shape)}")
        ids_keep, ids_masked, ids_restore = self.split_by_mask(patch_mask, patches.shape[0], patches.device)
        latent = self.forward_encoder(patches, ids_keep)
        return self.forward_decoder(latent, ids_restore, ids_masked if masked_only else None, tap, attn)
