"""
dinov3-mini: the ideas of DINOv3 in one readable file, small enough to train on one GPU or a laptop.

The sections tell the paper's story, then the machinery around it:
  1. model sizes
  2. multi-crop   -- batched multi-crop augmentation (DINO) and iBOT block masks
  3. backbone     -- a ViT with register tokens (Darcet et al. 2023) and DINOv3's axial RoPE
  4. heads        -- separate DINO (image) and iBOT (patch) heads
  5. losses       -- Sinkhorn-Knopp centring, DINO, iBOT, KoLeo and Gram anchoring (DINOv3 Eq. 2)
  6. teachers     -- the EMA teacher and the Gram teacher (a frozen snapshot of an earlier EMA teacher)
  7. training     -- AdamW with the reference schedules, the step, checkpoints, resume, logs
  8. evaluation   -- weighted k-NN on the teacher's CLS token, plus raw-pixel and random-init baselines
  9. instruments  -- token norms and high-norm outliers, attention, PCA and similarity maps, dense probe,
                     effective rank (`--analyze`, `--plot-log`)
 10. released models -- DINOv2 (with and without registers) and DINOv3 weights loaded into this file's ViT
 11. data         -- `scenes` and `textures` (procedural, offline, with per-pixel masks; in `textures` one large
                     object's surface texture is its class), CIFAR-10/100, STL-10, Imagenette, any image folder
 12. command line -- every option with its reference value and what breaks if you push it; main

Papers: DINO (Caron et al. 2021, arXiv 2104.14294), iBOT (Zhou et al. 2021, arXiv 2111.07832),
DINOv2 (Oquab et al. 2023, arXiv 2304.07193), Vision Transformers Need Registers (Darcet et al. 2023,
arXiv 2309.16588), DINOv3 (Simeoni et al. 2025, arXiv 2508.10104).

    python dinov3_mini.py                                   # CPU: nano ViT on `textures`, about 10 min on 2 cores
    python dinov3_mini.py --dataset cifar10 --registers 4   # GPU: the classic run (bf16 autocast)
    python dinov3_mini.py --gram --gram-teacher-epoch 10 --gram-start 20 --epochs 60

Deliberately left out (see README, faithfulness table): the 7B model and its distillation, the
high-resolution adaptation phase, the text alignment, FSDP. Everything else is scaled down, not cut.
"""
import argparse
import json
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# -----------------------------------------------------------------------------------------------
# 1. Model sizes
# -----------------------------------------------------------------------------------------------

# Model presets. tiny/small/base are the usual DeiT/DINO sizes with the reference heads; nano is sized
# so that the default run takes about 10 minutes on a 2-core CPU (its heads shrink with it).
MODELS = {
    "nano": dict(dim=64, depth=6, heads=2, head_hidden=256, prototypes=1024),
    "tiny": dict(dim=192, depth=12, heads=3, head_hidden=2048, prototypes=4096),
    "small": dict(dim=384, depth=12, heads=6, head_hidden=2048, prototypes=4096),
    "base": dict(dim=768, depth=12, heads=12, head_hidden=2048, prototypes=4096),
}


# -----------------------------------------------------------------------------------------------
# 2. Multi-crop augmentation and iBOT masks
# -----------------------------------------------------------------------------------------------

# Multi-crop on whole batches of tensors (DINO Sec. 3.1, DINOv2 data/augmentations.py): every crop of
# a batch is cut by one grid_sample call, and each photometric transform is applied to a random subset
# with the reference probabilities. It runs wherever the images are (GPU or CPU).
def sample_boxes(n, scale, gen, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop boxes in normalised coordinates: (n, 4) as (cx, cy, w, h), and flips (n,)."""
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=gen)
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, generator=gen)
    w = torch.sqrt(area * logr.exp()).clamp(max=1.0)
    h = torch.sqrt(area / logr.exp()).clamp(max=1.0)
    cx = w / 2 + (1 - w) * torch.rand(n, generator=gen)
    cy = h / 2 + (1 - h) * torch.rand(n, generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.stack([cx, cy, w, h], 1), flip


def render_crops(images, boxes, flip, size):
    """Cut boxes (n,4) out of images (n,3,H,W) in [0,1] and resize to (n,3,size,size), bilinear."""
    n = images.shape[0]
    boxes, flip = boxes.to(images.device), flip.to(images.device)
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = boxes[:, 2] * torch.where(flip, -1.0, 1.0)  # horizontal flip = negative x scale
    theta[:, 0, 2] = boxes[:, 0] * 2 - 1
    theta[:, 1, 1] = boxes[:, 3]
    theta[:, 1, 2] = boxes[:, 1] * 2 - 1
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (n,1,H,W), ITU-R 601 luma


def color_jitter(x, gen, p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with probability p, on (n,3,H,W) in [0,1].

    Simplification: a fixed order (b, c, s, h) instead of torchvision's random order, and the hue shift as
    a rotation of the chroma plane in YIQ space instead of HSV."""
    n, dev = x.shape[0], x.device
    r = lambda m: (1 + m * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)).to(dev)  # noqa: E731
    y = (x * r(brightness)).clamp(0, 1)
    mean = _gray(y).mean((2, 3), keepdim=True)
    y = ((y - mean) * r(contrast) + mean).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * r(saturation) + g).clamp(0, 1)
    ang = (hue * (2 * torch.rand(n, generator=gen) - 1) * 2 * math.pi).to(dev)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
    yiq = torch.einsum("ij,njhw->nihw", to_yiq, y)
    c, s = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
    i, q = yiq[:, 1] * c - yiq[:, 2] * s, yiq[:, 1] * s + yiq[:, 2] * c
    y = torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_yiq), torch.stack([yiq[:, 0], i, q], 1)).clamp(0, 1)
    apply = (torch.rand(n, generator=gen) < p).to(dev)[:, None, None, None]
    return torch.where(apply, y, x)


def grayscale(x, gen, p=0.2):
    apply = (torch.rand(x.shape[0], generator=gen) < p).to(x.device)[:, None, None, None]
    return torch.where(apply, _gray(x).expand_as(x), x)


def gaussian_blur(x, gen, p, sigma=(0.1, 2.0)):
    """GaussianBlur with sigma ~ U(sigma) in pixels of a 224 px crop, scaled to this crop's size."""
    n, C, H, W = x.shape
    scale = H / 224  # the reference sigmas are for 224 px crops; keep the blur's share of the crop
    s = (sigma[0] + (sigma[1] - sigma[0]) * torch.rand(n, generator=gen)).to(x.device) * scale  # (n,)
    k = 2 * math.ceil(3 * sigma[1] * scale) + 1
    t = torch.arange(k, device=x.device) - k // 2
    kern = torch.exp(-t[None] ** 2 / (2 * s[:, None] ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (n*C, k)
    y = F.pad(x.reshape(1, n * C, H, W), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kern[:, None, :, None], groups=n * C)  # vertical pass
    y = F.conv2d(y, kern[:, None, None, :], groups=n * C).view(n, C, H, W)  # horizontal pass
    apply = (torch.rand(n, generator=gen) < p).to(x.device)[:, None, None, None]
    return torch.where(apply, y, x)


def solarize(x, gen, p):
    apply = (torch.rand(x.shape[0], generator=gen) < p).to(x.device)[:, None, None, None]
    return torch.where(apply & (x >= 0.5), 1 - x, x)  # torchvision threshold 128/255


def normalize(x):
    """ImageNet mean/std normalisation of (n,3,H,W) in [0,1], as the reference."""
    mean, std = x.new_tensor([0.485, 0.456, 0.406]), x.new_tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


def multicrop(images, gen, *, global_size=224, local_size=96, n_local=8, global_scale=(0.32, 1.0),
              local_scale=(0.05, 0.32)):
    """DINOv2 multi-crop for a uint8 batch (B,3,S,S) -> dict of normalised crops (reference defaults).

    globals (2B,3,G,G): crop 1 blur p=1.0; crop 2 blur p=0.1 and solarize p=0.2   [B crop-1 then B crop-2]
    locals (L*B,3,l,l): blur p=0.5                                                 [crop-major order]
    boxes/flips of the global crops are returned so the Gram teacher can re-render the same views."""
    B = images.shape[0]
    x = images.float() / 255
    boxes, flips = sample_boxes(2 * B, global_scale, gen)
    g = render_crops(x.repeat(2, 1, 1, 1), boxes, flips, global_size)  # (2B, 3, G, G)
    g = grayscale(color_jitter(g, gen), gen)
    g1, g2 = g[:B], g[B:]
    g1 = gaussian_blur(g1, gen, p=1.0)
    g2 = solarize(gaussian_blur(g2, gen, p=0.1), gen, p=0.2)
    out = {"globals": normalize(torch.cat([g1, g2])), "boxes": boxes, "flips": flips}
    if n_local:
        lb, lf = sample_boxes(n_local * B, local_scale, gen)
        loc = render_crops(x.repeat(n_local, 1, 1, 1), lb, lf, local_size)  # (L*B, 3, l, l)
        loc = gaussian_blur(grayscale(color_jitter(loc, gen), gen), gen, p=0.5)
        out["locals"] = normalize(loc)
    return out


def block_mask(h, w, n_mask, rng, min_block=4, aspect=(0.3, 1 / 0.3)):
    """BEiT block masking on an (h, w) grid with exactly n_mask patches masked: (h*w,) bool.

    Blocks of area >= min_block and at most half the grid, aspect log-uniform in `aspect`; once fewer than
    min_block patches are left, blocks of that size are still tried; when 10 tries in a row add nothing,
    random patches top the mask up to the exact count (DINOv2/v3's MaskingGenerator)."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    max_block = max(min_block, 0.5 * h * w)
    count = 0
    while count < n_mask:
        budget = min(n_mask - count, max_block)
        delta = 0
        for _ in range(10):
            target = rng.uniform(min_block, budget)  # budget < min_block: a small block of at most budget
            ar = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
            bh, bw = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if bh < h and bw < w:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= budget:
                    mask[top:top + bh, left:left + bw] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    flat = mask.flatten()
    if count < n_mask:  # top up at random
        free = (~flat).nonzero().squeeze(1).tolist()
        flat[rng.sample(free, n_mask - count)] = True
    return flat


def ibot_masks(n, grid, gen, *, mask_prob=0.5, mask_ratio=(0.1, 0.5)):
    """Masks for n global crops on a grid x grid patch grid (n, N): a fraction mask_prob of them masked, with
    ratios spread evenly over mask_ratio (the i-th masked crop masks the upper end of the i-th slice, as the
    reference's collate), the rest unmasked; shuffled."""
    import random  # local, so the function can be copied alone
    rng = random.Random(int(torch.randint(2 ** 31, (1,), generator=gen)))
    h = w = grid
    n_masked = int(n * mask_prob)
    probs = torch.linspace(mask_ratio[0], mask_ratio[1], n_masked + 1).tolist()
    masks = [block_mask(h, w, int(h * w * probs[i + 1]), rng) for i in range(n_masked)]
    masks += [torch.zeros(h * w, dtype=torch.bool)] * (n - n_masked)
    rng.shuffle(masks)
    return torch.stack(masks)  # (n, N)


# -----------------------------------------------------------------------------------------------
# 3. The backbone: a ViT with register tokens and DINOv3's axial RoPE
# -----------------------------------------------------------------------------------------------

class RoPE(nn.Module):
    """DINOv3's axial 2D rotary position embedding: no weights, patch tokens only.

    Patch centres sit at ((arange(0.5, H) / H) * 2 - 1) per axis, in [-1, 1]. Each head's D_h channels
    carry D_h/4 frequencies per axis with periods base^(2i / (D_h/2)); the H and W angles are concatenated
    and tiled x2 for rotate-half. In training the coordinates are augmented (shift, per-axis jitter, a
    global log-uniform rescale: "box jittering"); in eval they are not."""

    def __init__(self, *, head_dim, base=100.0, shift=0.0, jitter=1.0, rescale=2.0):
        super().__init__()
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        self.register_buffer("periods", base ** (2 * torch.arange(head_dim // 4) / (head_dim // 2)),
                             persistent=False)  # (D_h/4,)

    def forward(self, h, w):
        dev = self.periods.device
        ch, cw = (torch.arange(0.5, h, device=dev) / h) * 2 - 1, (torch.arange(0.5, w, device=dev) / w) * 2 - 1
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).flatten(0, 1)  # (N, 2)
        if self.training:
            if self.shift > 0:
                coords = coords + torch.empty(2, device=dev).uniform_(-self.shift, self.shift)
            if self.jitter > 1:
                coords = coords * torch.empty(2, device=dev).uniform_(-math.log(self.jitter), math.log(self.jitter)).exp()
            if self.rescale > 1:
                coords = coords * torch.empty(1, device=dev).uniform_(-math.log(self.rescale), math.log(self.rescale)).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods  # (N, 2, D_h/4)
        angles = angles.flatten(1).tile(2)  # (N, D_h): [h-angles, w-angles, h-angles, w-angles]
        return torch.sin(angles), torch.cos(angles)


def rope_apply(x, sin, cos):
    """Rotate q or k (..., D_h) by per-token angles sin, cos that broadcast to it. Rows with sin = 0, cos = 1
    (CLS and registers) pass unchanged, so no slicing is needed."""
    x1, x2 = x.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    # rotate-half form of a 2D rotation per pair: x cos + [-x2, x1] sin, with the sign moved onto the small
    # sin table and the add fused (addcmul): two passes over x fewer than the literal form
    return torch.addcmul(x * cos, torch.cat([x2, x1], dim=-1), torch.cat([-s1, s2], dim=-1))


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on patch tokens; fused SDPA unless the maps are asked for."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None, return_attn=False):
        B, T, D = x.shape
        qk, v = self.qkv(x).split([2 * D, D], dim=-1)  # (B, T, 2D), (B, T, D)
        qk = qk.view(B, T, 2, self.heads, D // self.heads)  # (B, T, 2, H, D_h): q and k side by side
        if rope is not None:
            qk = rope_apply(qk, *(r[:, None, None] for r in rope))  # q and k rotated in one pass
        q, k = qk.transpose(1, 3).unbind(2)  # (B, H, T, D_h) each
        v = v.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        attn = None
        if return_attn:  # the explicit path: softmax(q k^T / sqrt(d)) v, keeping the (B, H, T, T) maps
            attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h t d -> b t (h d)")), attn


class LayerScale(nn.Module):
    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, p, training):
    """Stochastic depth: drop a sample's whole residual branch with probability p (student only)."""
    if p == 0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, dim, heads, mlp_ratio=4.0, layerscale=1e-5, drop_path=0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)  # eps as the reference
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.ls1 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, rope=None, return_attn=False):
        a, attn = self.attn(self.norm1(x), rope, return_attn)
        x = self.residual(x, a, self.ls1)
        x = self.residual(x, self.mlp(self.norm2(x)), self.ls2)
        return x, attn

    def residual(self, x, branch, ls):
        """x + drop_path(ls(branch)) in one pass over the tokens: LayerScale's gamma (D,) and the drop-path
        keep mask (B, 1, 1) / (1 - p) fold into one small (B, 1, D) scale, then one fused multiply-add (the
        three-step form's result, with fewer passes over the tokens)."""
        scale = ls.gamma if isinstance(ls, LayerScale) else None
        if self.drop_path > 0 and self.training:
            keep = drop_path(x.new_ones(x.shape[0], 1, 1), self.drop_path, True)  # 0 or 1 / (1 - p) per sample
            scale = keep if scale is None else keep * scale
        return x + branch if scale is None else torch.addcmul(x, branch, scale)


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """Vision Transformer with [CLS, R registers, N patches] tokens (Darcet et al. 2023) and axial RoPE.

    Registers are learnable tokens with no position encoding, dropped at the output. A mask token
    replaces masked patch embeddings (iBOT). Works on any image size divisible by the patch size.
    untie_local_norm: local crops' CLS and registers get their own final LayerNorm in training (DINOv3's
    `untie_global_and_local_cls_norm`), so the small views' statistics do not pull on the global ones."""

    def __init__(self, *, image_size=32, patch_size=4, dim=192, depth=12, heads=3, num_registers=4,
                 mlp_ratio=4.0, layerscale=1e-5, drop_path=0.0, rope_base=100.0, rope_shift=0.0,
                 rope_jitter=1.0, rope_rescale=2.0, untie_local_norm=False, pos_grid=0, pos_offset=0.1,
                 pos_antialias=False):
        super().__init__()
        self.image_size, self.patch_size, self.dim, self.num_registers = image_size, patch_size, dim, num_registers
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.registers = nn.Parameter(torch.zeros(1, num_registers, dim))  # (1, R, D); R = 0 is allowed
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # zero init, as in DINOv2/v3
        self.rope = RoPE(head_dim=dim // heads, base=rope_base, shift=rope_shift, jitter=rope_jitter,
                         rescale=rope_rescale)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, layerscale, drop_path) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.local_norm = nn.LayerNorm(dim, eps=1e-6) if untie_local_norm else None  # CLS + registers of local crops
        nn.init.normal_(self.cls_token, std=0.02)  # DINOv3's init (DINOv2: 1e-6)
        nn.init.normal_(self.registers, std=0.02)
        self.apply(_init_weights)
        # pos_grid > 0: DINOv2's learned absolute position embedding instead of RoPE (to run its released weights):
        # one vector for CLS and a G x G grid (G = 37: 518 px / patch 14), resized to other grids in positions().
        # RoPE gets infinite periods, so every angle is 0 and its rotation is the identity.
        self.pos_embed, self.pos_interp = None, (pos_offset, pos_antialias)
        if pos_grid:
            self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1 + pos_grid ** 2, dim), std=0.02))
            self.rope.periods.fill_(math.inf)

    def forward(self, x, masks=None, return_norms=False, return_attn=False, local=False):
        """x (B,3,H,W), masks (B,N) bool or None -> dict with cls (B,D), registers (B,R,D), patches (B,N,D),
        all after the final norm; norms (depth+1, B, T) of the residual stream before the final norm (input
        to block 1 ... output of the last block) and attn [depth x (B,heads,T,T)] when asked. local=True marks
        local crops (their CLS and registers take local_norm in training when the norms are untied)."""
        x = self.patch_embed(x)  # (B, D, h, w)
        h, w = x.shape[-2:]
        x = rearrange(x, "b d h w -> b (h w) d")  # (B, N, D)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.registers.expand(B, -1, -1), x], dim=1)  # (B, 1+R+N, D)
        if self.pos_embed is not None:  # DINOv2: after the mask token, as there; registers get no position
            x = x + self.positions(h, w).to(x.dtype)
        P = 1 + self.num_registers

        def rope_tables():  # (N, D_h) for the patches, padded with the identity rotation for CLS and registers
            sin, cos = self.rope(h, w)
            return F.pad(sin, (0, 0, P, 0)), F.pad(cos, (0, 0, P, 0), value=1.0)  # (1+R+N, D_h) each
        # in training every block draws its own RoPE augmentation, as the reference recomputes the tables per
        # block; in eval the tables are deterministic and computed once
        augment = self.training and (self.rope.shift > 0 or self.rope.jitter > 1 or self.rope.rescale > 1)
        rope = rope_tables()
        norms, writes, attns, x0 = [], [], [], x
        for i, blk in enumerate(self.blocks):
            if return_norms:
                norms.append(x.norm(dim=-1))
            if augment and i > 0:
                rope = rope_tables()
            x_in = x
            x, attn = blk(x, rope, return_attn)
            attns.append(attn)
            if return_norms:  # what this block wrote into each token, relative to the token it was given
                writes.append((x - x_in).norm(dim=-1) / x_in.norm(dim=-1).clamp_min(1e-6))
        if return_norms:
            norms.append(x.norm(dim=-1))
        x_out, x = x, self.norm(x)
        if local and self.local_norm is not None and self.training:  # untied: CLS + registers of local crops
            x = torch.cat([self.local_norm(x_out[:, :P]), x[:, P:]], dim=1)
        R = self.num_registers
        out = {"cls": x[:, 0], "registers": x[:, 1:1 + R], "patches": x[:, 1 + R:], "grid": (h, w)}
        if return_norms:
            out["norms"] = torch.stack(norms)  # (depth+1, B, 1+R+N)
            # how much all the blocks together wrote into each token's residual stream, relative to what it
            # started as: |x_L - x_0| / |x_0| (B, 1+R+N). Artifacts are tokens written to several times their
            # embedding's norm; CLS and registers start near 0, so theirs is huge by construction.
            out["write"] = (x_out - x0).norm(dim=-1) / x0.norm(dim=-1).clamp_min(1e-6)
            out["block_write"] = (torch.stack(writes) if writes else  # (depth, B, 1+R+N): |x_l - x_l-1| / |x_l-1|
                                  x_out.new_zeros(0, *x_out.shape[:2]))
        if return_attn:
            out["attn"] = attns
        return out

    def positions(self, h, w):
        """DINOv2's learned position embeddings for an h x w patch grid -> (1, 1+R+N, D), zero on the registers.
        The G x G grid is resized bicubically as dinov2's interpolate_pos_encoding does: unchanged at G x G,
        else to (h + offset) / G, (w + offset) / G by scale factor (offset 0.1, no antialias: the models without
        registers) or to the size itself (offset 0, antialias: the _reg models)."""
        pos = self.pos_embed.float()  # (1, 1 + G*G, D)
        G, (offset, antialias) = math.isqrt(pos.shape[1] - 1), self.pos_interp
        grid = pos[:, 1:]
        if (h, w) != (G, G):
            kw = dict(scale_factor=((h + offset) / G, (w + offset) / G)) if offset else dict(size=(h, w))
            grid = F.interpolate(rearrange(grid, "1 (g k) d -> 1 d g k", g=G), mode="bicubic", antialias=antialias, **kw)
            grid = rearrange(grid, "1 d h w -> 1 (h w) d")  # (1, N, D)
        regs = pos.new_zeros(1, self.num_registers, pos.shape[-1])
        return torch.cat([pos[:, :1], regs, grid], dim=1).to(self.pos_embed.dtype)  # (1, 1+R+N, D)


# -----------------------------------------------------------------------------------------------
# 4. Heads
# -----------------------------------------------------------------------------------------------

class DINOHead(nn.Module):
    """MLP D -> hidden -> hidden -> bottleneck, L2-normalise, then K prototypes (a bias-free linear layer).

    DINOv2 weight-normalised the prototypes; DINOv3 does not. The same class serves as the iBOT head."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
        super().__init__()
        self.norm_last_layer = norm_last_layer
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.apply(_init_weights)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)  # (.., bottleneck)
        if self.norm_last_layer:  # DINO/DINOv2: unit-norm prototypes, so logits are cosines in [-1, 1]
            return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))  # (.., K)
        return self.last_layer(x)  # (.., K)


class DINOModel(nn.Module):
    """Backbone + DINO head + iBOT head: the student and (as an EMA copy) the teacher.

    forward(globals, locals, masks) runs the two global crops (masked when mask_input) and the local
    crops, and returns what the losses need:
      cls (2B,D), patches (2B,N,D)               global crops, after the final norm (KoLeo, Gram)
      cls_logits (2B + L*B, K)                    DINO head on every crop's CLS  [globals, then locals]
      patch_logits (M, K)                         iBOT head on the M patches where masks is True"""

    def __init__(self, backbone, prototypes, head_hidden, head_bottleneck, norm_last_layer=True):
        super().__init__()
        self.backbone = backbone
        self.dino_head = DINOHead(backbone.dim, prototypes, head_hidden, head_bottleneck, norm_last_layer)
        self.ibot_head = DINOHead(backbone.dim, prototypes, head_hidden, head_bottleneck, norm_last_layer)

    def forward(self, global_crops, local_crops=None, masks=None, mask_input=True):
        g = self.backbone(global_crops, masks=masks if mask_input else None)
        cls = [g["cls"]]
        if local_crops is not None:
            cls.append(self.backbone(local_crops, local=True)["cls"])
        out = {"cls": g["cls"], "patches": g["patches"], "cls_logits": self.dino_head(torch.cat(cls))}
        if masks is not None:
            out["patch_logits"] = self.ibot_head(g["patches"][masks])  # (M, K)
        return out


# -----------------------------------------------------------------------------------------------
# 5. Losses. Each works on plain tensors and without torch.distributed; when it is initialised, the
# sums that span the batch are all-reduced.
# -----------------------------------------------------------------------------------------------

@torch.no_grad()
def sinkhorn_knopp(teacher_logits, temp, n_iters=3):
    """Sinkhorn-Knopp centring of teacher logits (B, K) -> targets (B, K) whose rows sum to 1 (DINOv3, SwAV).

    Q = exp(logits / temp); Q /= sum(Q); then n_iters of (rows /= row sums, /= K; cols /= col sums, /= B);
    return Q * B. Balances the prototypes so the teacher cannot collapse onto one; columns approach B/K.
    Under torch.distributed the batch is the union of all processes' rows: B and the sums over it are
    all-reduced, and so is the max subtracted before exp (one shift for every process, so it cancels)."""
    ddp = dist.is_available() and dist.is_initialized()
    logits = teacher_logits.float()
    shift = logits.max()
    if ddp:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    Q = torch.exp((logits - shift) / temp).t()  # (K, B); the shift keeps exp finite (the reference has none)
    B = torch.tensor(Q.shape[1], device=Q.device, dtype=torch.float)
    total = Q.sum()
    if ddp:
        dist.all_reduce(B)
        dist.all_reduce(total)
    K = Q.shape[0]
    Q /= total
    for _ in range(n_iters):
        rows = Q.sum(dim=1, keepdim=True)  # (K, 1)
        if ddp:
            dist.all_reduce(rows)
        Q /= rows  # each prototype gets total mass 1/K
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)  # each sample gets total mass 1/B
        Q /= B
    return (Q * B).t()  # (B, K)


def dino_loss(student_logits, teacher_probs, n_global=2, student_temp=0.1, local_weight=1.0):
    """DINO loss: cross-entropy H(P_t, P_s) over every (student crop, teacher global crop) pair but the same crop.

    student_logits (C*B, K) crop-major with the n_global global crops first; teacher_probs (n_global*B, K).
    Local pairs and global pairs are averaged separately and combined by their counts, which is the
    reference's 16/18 and 2/18 with 8 local crops; local_weight scales the local part (DINOv3's Gram phase
    lowers it from 1 to 0.5: `reweight_dino_local_loss`)."""
    t = teacher_probs.chunk(n_global)
    s = F.log_softmax(student_logits.float() / student_temp, dim=-1).chunk(len(student_logits) // len(t[0]))
    glob, loc = [], []
    for i, ti in enumerate(t):
        for j, sj in enumerate(s):
            if j == i:
                continue  # the same global crop on both sides: skipped
            (glob if j < n_global else loc).append(-(ti * sj).sum(-1).mean())
    n_g, n_l = len(glob), len(loc)
    loss_g = sum(glob) / n_g if n_g else 0.0  # mean over global pairs
    loss_l = sum(loc) / n_l if n_l else 0.0  # mean over local pairs
    return (n_g * loss_g + local_weight * n_l * loss_l) / (n_g + n_l)


def dino_over_lnk(loss, local_weight, local_crops, prototypes):
    """The DINO loss per unit weight over ln K (1 = uniform targets, nothing learnt). dino_loss weighs the
    2 x local_crops local pairs by local_weight (0.5 in the Gram phase) against the 2 global pairs: undone here."""
    n_g, n_l = 2, 2 * local_crops
    return loss * (n_g + n_l) / ((n_g + local_weight * n_l) * math.log(prototypes))


def ibot_loss(student_patch_logits, teacher_patch_probs, masks, student_temp=0.1):
    """iBOT loss: cross-entropy at masked positions. student (M, K), teacher (M, K), masks (B, N) bool.

    L = (1/B) sum_b (1/M_b) sum_{masked i in b} H(P_t,i, P_s,i): each crop's masked tokens are averaged, the
    crops are summed and divided by all B global crops, masked or not (DINOv2/v3's `forward_masked`). With
    half the crops masked the loss is half the mean over masked crops; the weight 1.0 is set for this form."""
    ce = -(teacher_patch_probs * F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)).sum(-1)  # (M,)
    weight = (1.0 / masks.sum(1).clamp(min=1)).unsqueeze(1).expand_as(masks)[masks]  # (M,) 1/M_b per token
    return (ce * weight).sum() / masks.shape[0]


def koleo_loss(x, eps=1e-8):
    """KoLeo (Sablayrolles et al. 2019): -mean_i log(min_{j != i} ||x_i - x_j||), x (B, D) L2-normalised here.

    Spreads the batch's features uniformly; on one process's batch, as in the reference. Computed in fp32 with
    autocast off, as the reference does: in bf16 the nearest neighbour of close features can flip."""
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=eps)
        with torch.no_grad():
            sim = x @ x.t()  # (B, B)
            sim.fill_diagonal_(-2.0)  # never pick yourself
            nn_idx = sim.argmax(dim=1)  # (B,) nearest neighbour = highest cosine
        dist_nn = F.pairwise_distance(x, x[nn_idx], eps=eps)  # (B,)
        return -torch.log(dist_nn + eps).mean()


def gram_loss(student_patches, teacher_patches):
    """Gram anchoring (DINOv3 Eq. 2): || X_S X_S^T - X_G X_G^T ||^2 per image, averaged over entries (MSE).

    student_patches, teacher_patches (B, N, D): L2-normalised here, one Gram matrix (B, N, N) per image,
    negative similarities kept. It constrains only the patch-to-patch cosine structure: the features
    themselves may rotate or rescale freely. Computed in fp32 whatever autocast region it is called from
    (as the reference does): in bf16 a cosine carries only ~3 significant digits, the size of the signal."""
    with torch.autocast(student_patches.device.type, enabled=False):
        s = F.normalize(student_patches.float(), dim=-1)
        t = F.normalize(teacher_patches.float(), dim=-1)
        return (s @ s.transpose(1, 2) - t @ t.transpose(1, 2)).pow(2).mean()


# -----------------------------------------------------------------------------------------------
# 6. Teachers: the EMA teacher and the Gram teacher
# -----------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (one fused op)."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


def make_gram_teacher(teacher_backbone):
    """A frozen, backbone-only copy of the EMA teacher as it is now: the Gram teacher (DINOv3 Sec. 4.2)."""
    import copy  # local, so the function can be copied alone
    g = copy.deepcopy(teacher_backbone).eval()
    for p in g.parameters():
        p.requires_grad_(False)
    return g


@torch.no_grad()
def gram_teacher_patches(gram_teacher, images, crops, *, hires=False):
    """Patch features (2B, N, D) of the Gram teacher on the student's global views.

    hires=False: the same (colour-augmented) global crops as the EMA teacher. hires=True (--gram-hires): the
    same boxes re-rendered from the uint8 images at 2x without colour distortion, the patch map
    bicubic-downsampled to the student's grid (DINOv3 Sec. 4.3)."""
    if not hires:
        return gram_teacher(crops["globals"])["patches"]
    size = crops["globals"].shape[-1]  # G, the student's global crop size
    x = images.float().div(255).repeat(2, 1, 1, 1)  # (2B, 3, S, S)
    out = gram_teacher(normalize(render_crops(x, crops["boxes"], crops["flips"], 2 * size)))
    h, w = out["grid"]
    fmap = rearrange(out["patches"], "b (h w) d -> b d h w", h=h, w=w)
    g = size // gram_teacher.patch_size  # the student's grid
    fmap = F.interpolate(fmap.float(), size=(g, g), mode="bicubic", align_corners=False)
    return rearrange(fmap, "b d h w -> b (h w) d")  # (2B, N, D)


# -----------------------------------------------------------------------------------------------
# 7. Training. The step is compute_losses (the paper's loss sum) inside `train`; the helpers between them set
# up the device and processes, the schedules, checkpoints and resume, signals, logs and the evaluation hook.
# -----------------------------------------------------------------------------------------------

class UsageError(Exception):
    """A user mistake found only once the data is loaded; reported like an argparse error (exit 2)."""


def print0(*a, **k):
    """print on rank 0 only (every process runs the same code)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(*a, **k, flush=True)


def pick_device(name):
    """--device: auto picks cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_distributed(args):
    """The device and the processes, decided once: (device, rank, world). Several processes (torchrun sets
    WORLD_SIZE > 1) each take one GPU (nccl) or share the CPU (gloo)."""
    device = pick_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    return device, rank, world


def build_backbone(args, student=True):
    """The ViT a run's args describe (drop path on the student only)."""
    return ViT(image_size=args.image_size, patch_size=args.patch_size, dim=args.dim, depth=args.depth,
               heads=args.heads, num_registers=args.registers, layerscale=args.layerscale,
               drop_path=args.drop_path if student else 0.0, rope_shift=args.rope_shift,
               rope_jitter=args.rope_jitter, rope_rescale=args.rope_rescale, untie_local_norm=args.untie_local_norm)


def build_model(args, student=True):
    """Backbone + DINO and iBOT heads as args describe them (the teacher has no drop path)."""
    return DINOModel(build_backbone(args, student), args.prototypes, args.head_hidden, args.head_bottleneck,
                     args.norm_last_layer)


def wrap_models(student, teacher, args, device, world):
    """(student as the step calls it: DDP-wrapped with several processes, compiled with --compile; teacher)."""
    model = student
    if world > 1:  # parameters without a gradient in some runs: the iBOT head at weight 0, an unused local norm
        unused = args.ibot_weight == 0 or (args.untie_local_norm and args.local_crops == 0)
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                    else None, find_unused_parameters=unused)
    if args.compile:
        return torch.compile(model), torch.compile(teacher)
    return model, teacher


def cosine_schedule(base, final, total, warmup=0, start=0.0):
    """Per-iteration values: linear warmup start -> base over `warmup` iterations (reaching base at its last
    one, as the reference's CosineScheduler), then cosine base -> final."""
    warm = torch.linspace(start, base, warmup) if warmup > 0 else torch.zeros(0)
    t = torch.arange(max(0, total - warmup)) / max(1, total - warmup)
    return torch.cat([warm, final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t))]).tolist()


def make_schedules(args, steps_per_epoch):
    """Precomputed per-iteration lr, weight decay, EMA momentum and teacher temperature (as in DINO)."""
    total = args.epochs * steps_per_epoch
    lr = args.lr * math.sqrt(args.batch_size / 1024)  # DINOv2's sqrt scaling rule
    warm_t = args.teacher_temp_warmup_epochs * steps_per_epoch
    temp = torch.linspace(args.warmup_teacher_temp, args.teacher_temp, warm_t).tolist() + \
        [args.teacher_temp] * max(0, total - warm_t)
    return {"lr": cosine_schedule(lr, args.min_lr, total, args.warmup_epochs * steps_per_epoch),
            "wd": cosine_schedule(args.weight_decay[0], args.weight_decay[1], total),
            "momentum": cosine_schedule(args.momentum[0], args.momentum[1], total),
            "teacher_temp": temp[:total], "steps_per_epoch": steps_per_epoch}


def gram_ramp(it, sched, args):
    """Progress of the Gram phase's switch-on at iteration it: 0 before --gram-start, then a cosine 0 -> 1 over
    --gram-ramp-epochs, then 1. The reference ramps the Gram weight 0 -> 2 and the local DINO weight 1 -> 0.5
    on the same one-epoch cosine (`loss_weight_schedule`, `local_loss_weight_schedule`)."""
    if not args.gram:
        return 0.0
    spe = sched["steps_per_epoch"]
    start = args.gram_start * spe
    if it < start:
        return 0.0
    ramp = max(2, round(args.gram_ramp_epochs * spe))  # iterations; the cosine's last one reaches 1
    return 0.5 * (1 - math.cos(math.pi * min(1.0, (it - start) / (ramp - 1))))


def gram_weight(it, sched, args):
    """Gram loss weight at iteration it: 0 before --gram-start, then a cosine ramp up to --gram-weight."""
    return args.gram_weight * gram_ramp(it, sched, args)


def teacher_momentum(it, sched, args):
    """EMA momentum at iteration it: the cosine schedule, but --gram-momentum (reference 0.999) in the Gram phase."""
    if args.gram and args.gram_momentum > 0 and it >= args.gram_start * sched["steps_per_epoch"]:
        return args.gram_momentum
    return sched["momentum"][it]


def param_groups(model, depth, layer_decay):
    """AdamW groups: no weight decay on biases, norms and LayerScale (the CLS, register and mask tokens are
    decayed, as in the reference code, whose comment says otherwise); layer-wise lr decay
    (block i gets decay^(depth - i), the patch embedding a further x0.2); the prototypes marked so
    they can be frozen in the first epoch."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim == 1 or name.endswith(".bias") or ".gamma" in name or "norm" in name
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.registers", "backbone.mask_token")):
            layer = 0
        else:
            layer = depth + 1  # the final norm and the heads
        lr_mult = layer_decay ** (depth + 1 - layer) * (0.2 if "patch_embed" in name else 1.0)
        last = "last_layer" in name
        key = (lr_mult, no_wd, last)
        if key not in groups:
            groups[key] = {"params": [], "lr_mult": lr_mult, "wd_mult": 0.0 if no_wd else 1.0, "last_layer": last}
        groups[key]["params"].append(p)
    return list(groups.values())


def clip_gradients(model, max_norm):
    """Clip the gradient norm of the backbone, the DINO head and the iBOT head each on its own to max_norm (the
    reference's loop over the student's parts): a large head gradient does not shrink the backbone's step."""
    if max_norm > 0:
        for part in (model.backbone, model.dino_head, model.ibot_head):
            nn.utils.clip_grad_norm_(part.parameters(), max_norm)


def crop_kwargs(args):
    """The multicrop keywords a run's args give."""
    return dict(global_size=args.image_size, local_size=args.local_size, n_local=args.local_crops,
                global_scale=args.global_scale, local_scale=args.local_scale)


def mask_kwargs(args):
    """The ibot_masks keywords a run's args give."""
    return dict(mask_prob=args.mask_prob, mask_ratio=args.mask_ratio)


def shard(x, n_groups, rank, world):
    """This process's share of a crop-major batch (n_groups*B, ...): the same slice of every crop group."""
    if world == 1:
        return x
    x = x.view(n_groups, -1, *x.shape[1:])
    b = x.shape[1] // world
    return x[:, rank * b:(rank + 1) * b].flatten(0, 1)


def shard_batch(images, crops, masks, n_local, rank, world):
    """This process's share of the global batch: its images, the same slice of every crop group, its masks."""
    images = shard(images, 1, rank, world)
    crops = {k: shard(v, 2 if k in ("globals", "boxes", "flips") else n_local, rank, world) for k, v in crops.items()}
    return images, crops, shard(masks, 2, rank, world) if masks is not None else None


def _all_reduce(x):
    """Sum x over processes in place when torch.distributed is initialised; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def compute_losses(student, teacher, gram_teacher, images, crops, masks, it, sched, args):
    """One step's losses, the paper's sum: DINO + iBOT + KoLeo + Gram. Returns (total, parts, stats)."""
    temp = sched["teacher_temp"][it]
    with torch.no_grad():  # the teacher sees the unmasked global crops (eval mode: no drop path, no RoPE jitter)
        t = teacher(crops["globals"], masks=masks, mask_input=False)
        t_cls = sinkhorn_knopp(t["cls_logits"], temp)  # (2B, K)
        t_patch = sinkhorn_knopp(t["patch_logits"], temp) if masks is not None else None  # (M, K)
    s = student(crops["globals"], crops.get("locals"), masks=masks)
    ramp = gram_ramp(it, sched, args)  # 0 before the Gram phase, cosine 0 -> 1 at its start
    local_weight = 1.0 - (1.0 - args.gram_local_weight) * ramp  # DINOv3's Gram phase: local DINO loss 1 -> 0.5
    parts = {"dino": dino_loss(s["cls_logits"], t_cls, 2, args.student_temp, local_weight)}
    if masks is not None:
        parts["ibot"] = ibot_loss(s["patch_logits"], t_patch, masks, args.student_temp)
    if args.koleo_weight > 0:
        parts["koleo"] = sum(koleo_loss(c) for c in s["cls"].chunk(2))  # 0.1 x 2 x mean over crops
    gram_w = args.gram_weight * ramp
    if gram_teacher is not None and gram_w > 0:
        g_patches = gram_teacher_patches(gram_teacher, images, crops, hires=args.gram_hires)  # (2B, N, D)
        parts["gram"] = gram_loss(s["patches"], g_patches)
    weights = {"dino": 1.0, "ibot": args.ibot_weight, "koleo": args.koleo_weight, "gram": gram_w}
    total = sum(weights[k] * v for k, v in parts.items())
    stats = {"teacher_entropy": -(t_cls * torch.log(t_cls + 1e-12)).sum(-1).mean().detach()}
    return total, parts, stats


def raise_if_not_finite(first_bad, acc, steps_per_epoch, ck_path):
    """Stop on the first non-finite loss (tracked on the device, read here at the logging gates only), before
    a checkpoint could save the broken state."""
    if first_bad.item() >= 0:
        bad = [k for k, v in acc.items() if not torch.isfinite(v)]
        raise FloatingPointError(
            f"the loss became non-finite at step {first_bad.item()} (epoch {first_bad.item() // steps_per_epoch}) "
            f"in part(s) {', '.join(bad) or 'total'}; training stopped and the last good checkpoint in {ck_path} "
            "is intact. Lower --lr, raise --warmup-epochs or --clip-grad, or check the data.")


def save_checkpoint(path, state):
    """Atomic: write to a temp file in the same folder, then rename over the old one."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".checkpoint-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


ARCH_KEYS = ("dim", "depth", "heads", "registers", "patch_size", "prototypes", "head_hidden", "head_bottleneck",
             "layerscale", "norm_last_layer", "untie_local_norm")


class CheckpointError(Exception):
    """A checkpoint or weights file that cannot be used: missing, corrupt, carrying code, or of another model."""


def safe_load(path):
    """torch.load with weights_only=True: a checkpoint is data (tensors, numbers, strings, lists, dicts), and a
    pickle that would run code while loading (an object with a __reduce__ calling anything) is refused
    (CheckpointError), as is a file that is missing, truncated or corrupt."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL ([\w.]+)", str(e))  # the function or class the pickle asks for
        raise CheckpointError(
            f"{path} holds more than tensors and plain data: loading it would call {what[1] if what else 'code'} "
            "from inside the file, so it was not loaded. Checkpoints and weights are read with "
            "torch.load(weights_only=True), which runs no code from the file; only use files from a source you "
            "trust, and ask for a plain state dict (tensors only)") from None
    except Exception as e:
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({type(e).__name__})") from None


def save_teacher(out_dir, epoch, step, teacher_backbone, args):
    """--keep-teachers: the EMA teacher's backbone at an evaluation, as out_dir/teachers/epoch{E}.pt, a small
    checkpoint that --analyze and --gram-teacher read (the Gram teacher can then be taken at a dense peak)."""
    path = os.path.join(out_dir, "teachers", f"epoch{epoch}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(path, {"teacher_backbone": teacher_backbone.state_dict(), "step": step, "args": vars(args)})


def load_checkpoint(path, args=None):
    """Load a checkpoint dict; refuse (CheckpointError) one that is truncated, carries code, is not ours, or is
    of another model."""
    ck = safe_load(path)
    if not isinstance(ck, dict) or "teacher_backbone" not in ck or "args" not in ck:
        raise CheckpointError(f"{path} is not a dinov3_mini checkpoint")
    if args is not None:
        diff = [f"{k}: checkpoint {ck['args'].get(k)} vs now {getattr(args, k)}" for k in ARCH_KEYS
                if ck["args"].get(k) != getattr(args, k)]
        if diff:
            raise CheckpointError(f"{path} was trained with a different configuration ({'; '.join(diff)})")
    return ck


def restore_checkpoint(ck_path, args, student, teacher, opt, gen):
    """--resume: every state the run continues from, bit for bit (weights, optimiser, Gram teacher, both random
    generators); returns (step, baselines, gram_teacher, gram_refreshes)."""
    ck = load_checkpoint(ck_path, args)
    student.load_state_dict(ck["student"])
    teacher.load_state_dict(ck["teacher"])
    opt.load_state_dict(ck["optimizer"])
    gram_teacher = None
    if ck.get("gram_teacher") is not None:
        gram_teacher = make_gram_teacher(teacher.backbone)
        gram_teacher.load_state_dict(ck["gram_teacher"])
    gen.set_state(ck["gen_state"])
    torch.set_rng_state(ck["rng_state"])
    return ck["step"], ck["baselines"], gram_teacher, ck.get("gram_refreshes", 0)


def load_gram_teacher(path, teacher_backbone):
    """--gram-teacher PATH: the teacher backbone of another run's checkpoint as the Gram teacher."""
    gram_teacher = make_gram_teacher(teacher_backbone)
    try:  # the local-crop norm (--untie-local-norm) is never used by a Gram teacher, so it may be absent
        missing, unexpected = gram_teacher.load_state_dict(load_checkpoint(path)["teacher_backbone"], strict=False)
    except RuntimeError:
        missing, unexpected = ["shape"], []
    if unexpected or any(not k.startswith("local_norm.") for k in missing):
        raise CheckpointError(f"--gram-teacher {path} holds a backbone of another shape")
    return gram_teacher


def gram_snapshot_due(epoch, args, gram_refreshes):
    """At the start of an epoch: does the EMA teacher become the Gram teacher now? At --gram-teacher-epoch,
    then every --gram-refresh-every epochs after --gram-start, at most --gram-refresh-max times."""
    if not args.gram or args.gram_teacher is not None:
        return False
    return epoch == args.gram_teacher_epoch or bool(
        args.gram_refresh_every and epoch > args.gram_start and gram_refreshes < args.gram_refresh_max
        and (epoch - args.gram_start) % args.gram_refresh_every == 0)


class Stop:
    """SIGINT/SIGTERM while training: remembered (pending) so the loop can finish its step, save and exit
    cleanly. One process acts on it at once; several first agree (signal) at the next logging gate, then
    stop together. `with Stop() as stop:` installs the handler and restores the previous one."""

    def __init__(self):
        self.pending = self.signal = None

    def __call__(self, signum, frame):
        self.pending = signum

    def __enter__(self):
        self.old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def agree(self, first_bad, world, device):
        """At a logging gate: every process learns of a signal to any of them and of the first non-finite
        loss anywhere (a max all-reduce); returns that step (-1: none)."""
        if world > 1:
            flags = torch.tensor([first_bad.item() + 1, self.pending or 0], device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            first_bad, self.signal = flags[0] - 1, int(flags[1]) or None
        return first_bad

    def exit_if_signalled(self, ck_path, step):
        if self.signal is not None:
            print0(f"\n{signal.Signals(self.signal).name}: saved {ck_path} at step {step}; continue with the same "
                   "command and --resume.")
            raise SystemExit(128 + self.signal)


class TrainLog:
    """log.jsonl (rank 0 writes it), the progress bar, the running sums of the loss parts between log lines,
    and the step records since the last evaluation (for the collapse alarm). Creating it creates --out-dir:
    a failed or interrupted setup leaves nothing behind."""

    def __init__(self, args, master, total_steps, start_step):
        self.master = master
        if master:
            os.makedirs(args.out_dir, exist_ok=True)
        self.file = open(os.path.join(args.out_dir, "log.jsonl"), "a" if args.resume else "w") if master else None
        self.bar = None
        if master and not args.no_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)
        self.acc, self.n, self.t, self.since_eval, self.streak = {}, 0, time.time(), [], 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()

    def write(self, rec, flush=True):
        if self.master:
            self.file.write(json.dumps(rec) + "\n")
            if flush:
                self.file.flush()

    def add(self, values):
        for k, v in values.items():
            self.acc[k] = self.acc.get(k, 0.0) + v.detach().float()
        self.n += 1

    def step_record(self, step, sched, args, world):
        """One log line: each loss part's mean over the steps since the last line and over the processes, the
        schedules' values at the last step, and the throughput."""
        now, keys = time.time(), sorted(self.acc)
        vals = _all_reduce(torch.stack([self.acc[k] for k in keys])) / (world * self.n)  # mean over processes
        it = step - 1
        rec = {"type": "step", "step": step, "epoch": step / sched["steps_per_epoch"],
               **{k: round(v, 5) for k, v in zip(keys, vals.tolist())},
               "lr": sched["lr"][it], "wd": sched["wd"][it], "momentum": teacher_momentum(it, sched, args),
               "teacher_temp": sched["teacher_temp"][it], "gram_weight": gram_weight(it, sched, args),
               "dino_local_weight": 1.0 - (1.0 - args.gram_local_weight) * gram_ramp(it, sched, args),
               "img_per_s": round(self.n * args.batch_size / (now - self.t), 1)}
        rec["dino_over_lnK"] = round(dino_over_lnk(rec["dino"], rec["dino_local_weight"], args.local_crops,
                                                   args.prototypes), 4)
        self.acc, self.n, self.t = {}, 0, now
        self.since_eval.append(rec)
        self.write(rec)
        if self.bar is not None:
            self.bar.set_postfix({k.replace("_over_lnK", "/lnK"): rec[k] for k in ("loss", "dino_over_lnK", "ibot",
                                  "koleo", "gram", "lr", "img_per_s") if k in rec}, refresh=False)


def knn_baselines(backbone, eval_data, args, device):
    """What k-NN gets without self-supervised learning: raw pixels and the ViT at initialisation."""
    x_knn, y_knn, x_test, y_test, _ = eval_data
    baselines = {"knn_acc_raw_pixels": knn_raw_pixels(x_knn, y_knn, x_test, y_test, args),
                 **knn_random_init(backbone, x_knn, y_knn, x_test, y_test, args, device)}
    print0("baselines: " + ", ".join(f"{k} {v:.3f}" for k, v in baselines.items()))
    return baselines


def collapse_alarm(records, args):
    """A message when the logged steps since the last evaluation look collapsed, else None.

    Two signatures (DINO Sec. 5.3): the teacher's targets are one-hot-like (entropy near 0: every image on
    one prototype), or the DINO loss stays at ln K (targets uniform: nothing is being learnt)."""
    if not records:
        return None
    ratio = sum(r["dino_over_lnK"] for r in records) / len(records)
    entropy = sum(r["teacher_entropy"] for r in records) / len(records)
    if entropy < 0.05 * math.log(args.prototypes):
        return (f"teacher entropy {entropy:.3f} is near 0: the teacher puts every image on a few prototypes. "
                "Lower --lr, raise --momentum, raise --teacher-temp slightly or use fewer --prototypes.")
    if ratio > 0.97:
        return (f"the DINO loss stays at {ratio:.3f} x ln K: the teacher's targets are nearly uniform and nothing "
                "is being learnt yet. Lower --warmup-teacher-temp / --teacher-temp (DINO: 'try decreasing it if "
                "the training loss does not decrease'), train longer, or use fewer --prototypes.")
    return None


def evaluate(step, epoch, backbone, eval_data, args, device, log):
    """The evaluation hook of the training loop: k-NN accuracy, the instruments' key figures, and the collapse
    alarm (after two evaluations in a row look collapsed), into log.jsonl; returns the k-NN accuracy."""
    x_knn, y_knn, x_test, y_test, test_masks = eval_data
    knn_acc = evaluate_knn(backbone, x_knn, y_knn, x_test, y_test, args, device)["cls"]
    inst = eval_instruments(backbone, x_test, y_test, test_masks, args, device)
    log.write({"type": "eval", "step": step, "epoch": epoch, "knn_acc": knn_acc, **inst})
    print0(f"\nepoch {epoch}: k-NN accuracy {knn_acc:.4f}, " +
           ", ".join(f"{k} {v:.4f}" for k, v in inst.items() if isinstance(v, float)))
    alarm = collapse_alarm(log.since_eval, args)
    log.streak = log.streak + 1 if alarm else 0
    if alarm and log.streak >= 2 and log.master:
        print0(f"warning: {alarm}")
        log.write({"type": "alarm", "step": step, "message": alarm}, flush=False)
    log.since_eval = []
    return knn_acc


def write_summary(summary, baselines, ck_path, out_dir):
    """summary.json, and the result said aloud: the trained k-NN accuracy against both baselines."""
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    knn_acc, best = summary["knn_acc"], max(baselines["knn_acc_raw_pixels"], baselines["knn_acc_random_init"])
    print0(f"\nk-NN accuracy: trained {knn_acc:.4f} | random-init ViT {baselines['knn_acc_random_init']:.4f} | "
           f"raw pixels {baselines['knn_acc_raw_pixels']:.4f} | gain over the better baseline "
           f"{100 * (knn_acc - best):+.1f} points")
    print0(f"{summary['images_per_s']} images/s on {summary['device']}, {summary['wall_s']} s in all. Files: "
           f"{ck_path}, {os.path.join(out_dir, 'log.jsonl')}, {os.path.join(out_dir, 'summary.json')}")


def train(args, t_start=None):
    """Train; returns the summary dict (also written to --out-dir/summary.json). wall_s counts from t_start
    (main passes its own start, so the setup is included), else from the start of the loop."""
    device, rank, world = setup_distributed(args)
    master = rank == 0
    print0(f"device: {device}" + (f" x {world} processes" if world > 1 else ""))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()  # bf16: GPU only
    ck_path = os.path.join(args.out_dir, "checkpoint.pt")

    # ---- data: uint8 tensors in memory (on the GPU if there is one); crops are made on the fly
    x_train, *eval_data = load_data(args)  # eval_data: k-NN bank images and labels, test images, labels, masks
    if args.batch_size > len(x_train):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(x_train)} training images; "
                         "lower it or raise --num-images")
    x_train = x_train.to(device)
    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch
    sched = make_schedules(args, steps_per_epoch)
    total_steps, grid = args.epochs * steps_per_epoch, args.image_size // args.patch_size

    # ---- models: student, EMA teacher (same init), optional Gram teacher
    torch.manual_seed(args.seed)
    student, teacher = build_model(args).to(device), build_model(args, student=False).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.eval().requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(student, args.depth, args.layer_decay), betas=(0.9, 0.999),
                            fused=device.type in ("cuda", "cpu"))  # one multi-tensor kernel per step
    last_layer = [p for g in opt.param_groups if g["last_layer"] for p in g["params"]]
    gen = torch.Generator().manual_seed(args.seed)  # augmentation and masks: every rank draws the same
    # global batch of crops, then takes its shard, so N processes compute what one process would
    start_step, baselines, gram_teacher, gram_refreshes = 0, None, None, 0
    if args.resume:
        start_step, baselines, gram_teacher, gram_refreshes = restore_checkpoint(ck_path, args, student, teacher,
                                                                                 opt, gen)
        print0(f"resumed from {ck_path} at step {start_step} (epoch {start_step // steps_per_epoch})")
    if args.gram and args.gram_teacher and gram_teacher is None:
        gram_teacher = load_gram_teacher(args.gram_teacher, teacher.backbone)
    if baselines is None:
        baselines = knn_baselines(teacher.backbone, eval_data, args, device)
    model, teacher_fwd = wrap_models(student, teacher, args, device, world)

    def checkpoint_state(step):  # one plain dict: everything --resume needs
        return {"student": student.state_dict(), "teacher": teacher.state_dict(),
                "teacher_backbone": teacher.backbone.state_dict(), "optimizer": opt.state_dict(),
                "gram_teacher": gram_teacher.state_dict() if gram_teacher is not None else None,
                "gram_refreshes": gram_refreshes, "step": step, "args": vars(args), "baselines": baselines,
                "gen_state": gen.get_state(), "rng_state": torch.get_rng_state()}

    t0, knn_acc, train_time, step = time.time(), None, 0.0, start_step
    first_bad = torch.tensor(-1, device=device)  # the first step whose loss is not finite, kept on the device
    with Stop() as stop, TrainLog(args, master, total_steps, start_step) as log:
        while step < total_steps:
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0 or step == start_step:
                perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
            if i == 0 and gram_snapshot_due(epoch, args, gram_refreshes):  # the Gram teacher, then its refreshes
                gram_refreshes += gram_teacher is not None
                gram_teacher = make_gram_teacher(teacher.backbone)
                print0(f"epoch {epoch}: Gram teacher = EMA teacher snapshot (refreshes so far: {gram_refreshes})")

            # ---- the training step
            t_step = time.time()
            images = x_train[perm[i * args.batch_size:(i + 1) * args.batch_size].to(device)]  # (B, 3, S, S) uint8
            crops = multicrop(images, gen, **crop_kwargs(args))
            masks = (ibot_masks(2 * args.batch_size, grid, gen, **mask_kwargs(args)).to(device)
                     if args.ibot_weight > 0 else None)  # (2B, N) bool
            images, crops, masks = shard_batch(images, crops, masks, args.local_crops, rank, world)
            for g in opt.param_groups:
                g["lr"] = sched["lr"][step] * g["lr_mult"]
                g["weight_decay"] = sched["wd"][step] * g["wd_mult"]
            with amp:
                total, parts, stats = compute_losses(model, teacher_fwd, gram_teacher, images, crops, masks,
                                                     step, sched, args)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(total.detach()), step, first_bad)
            opt.zero_grad(set_to_none=True)
            total.backward()
            clip_gradients(student, args.clip_grad)
            if epoch < args.freeze_last_layer_epochs:  # DINO: keep the prototypes fixed in the first epoch
                for p in last_layer:
                    p.grad = None
            opt.step()
            ema_update(teacher, student, teacher_momentum(step, sched, args))
            step += 1
            train_time += time.time() - t_step

            # ---- diagnostics: logging, evaluation, checkpoints
            log.add({**parts, **stats, "loss": total})
            epoch_end = step % steps_per_epoch == 0
            if world == 1:
                stop.signal = stop.pending
            if step % args.log_every == 0 or step == total_steps or epoch_end or stop.signal:  # gates every save
                first_bad = stop.agree(first_bad, world, device)
                raise_if_not_finite(first_bad, log.acc, steps_per_epoch, ck_path)
            if step % args.log_every == 0 or step == total_steps:
                log.step_record(step, sched, args, world)
            if log.bar is not None:
                log.bar.update(1)
            if epoch_end and ((step // steps_per_epoch) % args.eval_every == 0 or step == total_steps):
                knn_acc = evaluate(step, step // steps_per_epoch, teacher.backbone, eval_data, args, device, log)
                if master and args.keep_teachers:
                    save_teacher(args.out_dir, step // steps_per_epoch, step, teacher.backbone, args)
            if master and (epoch_end or stop.signal is not None):
                save_checkpoint(ck_path, checkpoint_state(step))
            stop.exit_if_signalled(ck_path, step)

    if knn_acc is None:  # resumed a finished run
        knn_acc = evaluate_knn(teacher.backbone, *eval_data[:4], args, device)["cls"]
    summary = {"knn_acc": knn_acc, **baselines,
               "images_per_s": round((step - start_step) * args.batch_size / max(train_time, 1e-9), 1),
               "wall_s": round(time.time() - (t_start or t0), 1), "device": str(device), "steps": step,
               "config": vars(args)}
    if master:
        write_summary(summary, baselines, ck_path, args.out_dir)
    if world > 1:
        dist.destroy_process_group()
    return summary


# -----------------------------------------------------------------------------------------------
# 8. Evaluation: weighted k-NN (DINO Sec. 4.1) and the two baselines
# -----------------------------------------------------------------------------------------------

def eval_batches(images, image_size, device, batch):
    """uint8 images (N,3,S,S) -> normalised float batches at image_size (resized only if they differ)."""
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device).float() / 255
        if x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        yield normalize(x)


@torch.no_grad()
def extract_features(backbone, images, image_size, device, batch=256):
    """Features of uint8 images (N,3,S,S): {"cls": the CLS token (N, D), "mean": the mean patch token (N, D)}."""
    was_training = backbone.training
    backbone.eval()
    feats = {"cls": [], "mean": []}
    for x in eval_batches(images, image_size, device, batch):
        out = backbone(x)
        feats["cls"].append(out["cls"].float().cpu())
        feats["mean"].append(out["patches"].mean(1).float().cpu())
    backbone.train(was_training)
    return {k: torch.cat(v) for k, v in feats.items()}


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, k=20, temp=0.07, chunk=1024):
    """Weighted k-NN (Wu et al. 2018, as in DINO): cosine similarity, top k neighbours vote exp(sim / temp)."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    C = int(train_y.max()) + 1
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim = test_f[i:i + chunk] @ train_f.t()  # (n, N_train)
        s, idx = sim.topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(s), C).scatter_add_(1, train_y[idx], (s / temp).exp())  # (n, C)
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return correct / len(test_f)


KNN_BANK = 10000  # k-NN memory bank: at most this many training images (enough for 10 classes)


def gather_features(backbone, images, image_size, device):
    """extract_features over several processes: each takes its slice of the images, then all-gather."""
    if not (dist.is_available() and dist.is_initialized()):
        return extract_features(backbone, images, image_size, device)
    rank, world, n = dist.get_rank(), dist.get_world_size(), len(images)
    per = math.ceil(n / world)
    mine = images[rank * per:(rank + 1) * per]
    f = extract_features(backbone, mine, image_size, device) if len(mine) else \
        {k: torch.zeros(0, backbone.dim) for k in ("cls", "mean")}
    out = {}
    for k, v in f.items():
        v = F.pad(v, (0, 0, 0, per - len(v))).to(device)  # equal shapes for all_gather
        parts = [torch.empty_like(v) for _ in range(world)]
        dist.all_gather(parts, v)
        out[k] = torch.cat(parts)[:n].cpu()
    return out


def evaluate_knn(backbone, x_train, y_train, x_test, y_test, args, device, pools=("cls",)):
    """k-NN accuracy {pool: acc} of the backbone's features, one feature pass for all pools (with several
    processes, each extracts a slice and the features are gathered)."""
    f_tr = gather_features(backbone, x_train[:KNN_BANK], args.image_size, device)
    f_te = gather_features(backbone, x_test, args.image_size, device)
    return {p: knn_classify(f_tr[p], y_train[:KNN_BANK], f_te[p], y_test, args.knn_k, args.knn_temp) for p in pools}


def knn_raw_pixels(x_train, y_train, x_test, y_test, args):
    """Baseline: k-NN on the normalised raw pixels (at most 32x32, so the vectors stay small)."""
    def flat(x):
        x = x.float() / 255
        if x.shape[-1] > 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        x = x.flatten(1)
        return x - x.mean(1, keepdim=True)
    return knn_classify(flat(x_train[:KNN_BANK]), y_train[:KNN_BANK], flat(x_test), y_test, args.knn_k, args.knn_temp)


def knn_random_init(backbone, x_train, y_train, x_test, y_test, args, device):
    """Baseline: the same ViT at initialisation. With LayerScale 1e-5 its CLS token barely sees the image, so the
    mean of its patch tokens is read too, and the better of the two reported."""
    res = evaluate_knn(backbone, x_train, y_train, x_test, y_test, args, device, pools=("cls", "mean"))
    return {"knn_acc_random_init": max(res.values()), "knn_acc_random_init_cls": res["cls"],
            "knn_acc_random_init_meanpatch": res["mean"]}


# -----------------------------------------------------------------------------------------------
# 9. Instruments for the two failures. Storage: high-norm artifact tokens (registers paper Sec. 2);
# signal: dense features that lose locality while the global ones improve (DINOv3 Sec. 4.1).
# -----------------------------------------------------------------------------------------------

@torch.no_grad()
def collect_tokens(backbone, images, image_size, device, batch=128):
    """Run the backbone (eval mode) on uint8 images (N,3,S,S) and keep what the instruments read:
      norms (depth+1, N, T)   residual-stream norms before the final norm, T = 1 + R + P tokens
      write (N, P)            |x_L - x_0| / |x_0| of each patch: what the blocks wrote, relative to its embedding
      block_write (depth, N, P)  the same for each block alone, relative to the token it was given
      cls (N,D), registers (N,R,D), patches (N,P,D)   after the final norm (what the heads and probes see)
      attn (N, heads, T)      the last layer's CLS attention row;  reg_attn (N, R, T) the registers' rows"""
    was_training = backbone.training
    backbone.eval()
    R, keep = backbone.num_registers, {}
    for x in eval_batches(images, image_size, device, batch):
        out = backbone(x, return_norms=True, return_attn=True)
        a = out["attn"][-1].float()  # (b, heads, T, T)
        for k, v in (("norms", out["norms"]), ("write", out["write"][:, 1 + R:]),
                     ("block_write", out["block_write"][:, :, 1 + R:]), ("cls", out["cls"]),
                     ("registers", out["registers"]), ("patches", out["patches"]), ("attn", a[:, :, 0]),
                     ("reg_attn", a[:, :, 1:1 + R].mean(1))):
            keep.setdefault(k, []).append(v.float().cpu())
    backbone.train(was_training)
    tok = {k: torch.cat(v, dim=1 if k in ("norms", "block_write") else 0) for k, v in keep.items()}
    tok["grid"] = (image_size // backbone.patch_size,) * 2
    return tok


# A patch token is a high-norm outlier when its output norm (last block, before the final norm, where
# the registers paper reads it; after a LayerNorm every token has about the same norm) is
#     n > median + k * 1.4826 * MAD   and   n > 2 * median,   over all patch tokens of the batch.
# 1.4826 * MAD estimates the bulk's standard deviation without being pulled by the outliers. k = 6: a
# Gaussian bulk passes that bar with probability 1e-9, and norm bulks are skewed (chi-like right tail),
# so a smaller k flags healthy tails; the factor-2 floor guards against a very tight bulk (small MAD).
# Artifacts in the registers paper sit 3-10x above the median, far beyond both bars.
OUTLIER_K = 6.0
# one colour per kind of token in every picture (norm histograms, norms through depth, outlier maps)
TOKEN_COLORS = {"patch": "tab:blue", "CLS": "tab:red", "register": "tab:green", "outlier": "tab:orange"}


def find_outliers(norms, k=OUTLIER_K):
    """norms (N, P) of patch tokens -> bool (N, P), True for high-norm outliers (rule above)."""
    med = norms.median()
    mad = (norms - med).abs().median()
    return (norms > med + k * 1.4826 * mad) & (norms > 2 * med)


def bimodality(x):
    """Sarle's bimodality coefficient of a 1D sample: (skew^2 + 1) / kurtosis; above 5/9 ~ bimodal
    (a uniform distribution scores 5/9, a Gaussian 1/3, two well-separated modes approach 1)."""
    x = x.double().flatten()
    z = (x - x.mean()) / x.std().clamp_min(1e-12)
    return ((z ** 3).mean() ** 2 + 1).item() / (z ** 4).mean().item()


def patch_labels(masks, grid):
    """Per-pixel masks (N,S,S) with 0 = background -> per-patch labels (N, grid*grid): each patch's most
    frequent class."""
    onehot = F.one_hot(masks.long(), int(masks.max()) + 1).permute(0, 3, 1, 2).float()  # (N, C, S, S)
    return F.adaptive_avg_pool2d(onehot, grid).argmax(1).flatten(1)  # (N, grid*grid)


def dense_probe(f_train, y_train, f_test, y_test, iters=100, wd=1e-4):
    """Linear probe on frozen patch features: f (M, D) -> per-patch class. Full-batch L-BFGS on the cross
    entropy of standardised features (DINOv2's linear segmentation probe, at the patch grid's resolution).
    Returns the mIoU on the held-out patches, over the classes present in their labels or predictions."""
    mu, sd = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    C = int(max(y_train.max(), y_test.max())) + 1
    # a convex problem: zero init, and plain tensors (nn.Linear would draw its init from the global RNG, which
    # the training shares: an evaluation must not change the run it measures)
    W, bias = torch.zeros(C, a.shape[1], requires_grad=True), torch.zeros(C, requires_grad=True)
    opt = torch.optim.LBFGS([W, bias], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(a, W, bias), y_train) + wd * W.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = F.linear(b, W, bias).argmax(1)
    ious = []
    for c in range(C):
        inter, union = ((pred == c) & (y_test == c)).sum(), ((pred == c) | (y_test == c)).sum()
        if union > 0:
            ious.append((inter / union).item())
    return sum(ious) / len(ious)


def effective_rank(x):
    """exp(entropy of the normalised singular values) of centred features x (M, D) (Roy & Vetterli 2007):
    about r for features spread over r directions, 1 when one direction dominates (collapse)."""
    s = torch.linalg.svdvals((x - x.mean(0)).double())
    p = s / s.sum()
    return math.exp(-(p * torch.log(p.clamp_min(1e-12))).sum().item())


def similarity_locality(patches, labels):
    """How local are similarity maps: for each query patch on an object (label > 0), its cosine similarities
    to the other patches of its image, clamped at 0; the share of that mass on patches of the same label.
    patches (N,P,D), labels (N,P) -> (score, chance) where chance is the share that same-label patches
    would get if the mass were spread evenly. Degraded dense features score near chance."""
    eye = torch.eye(labels.shape[1], dtype=torch.bool)
    shares, chances = [], []
    for i in range(0, len(patches), 64):  # 64 images at a time: (64, P, P) stays small at 96 px too
        f = F.normalize(patches[i:i + 64].float(), dim=-1)
        lab = labels[i:i + 64]
        sim = (f @ f.transpose(1, 2)).clamp_min(0).masked_fill(eye, 0)  # (n, P, P)
        same = (lab[:, :, None] == lab[:, None, :]) & ~eye  # (n, P, P)
        query = lab > 0  # (n, P)
        shares.append(((sim * same).sum(-1) / sim.sum(-1).clamp_min(1e-12))[query])
        chances.append((same.sum(-1) / (labels.shape[1] - 1))[query])
    return torch.cat(shares).mean().item(), torch.cat(chances).float().mean().item()


def _kmeans(x, k, gen, iters=20):
    """k-means with k-means++ seeding on points x (n, D): (centroids (k, D), labels (n,)); k <= n."""
    k = min(k, len(x))
    c = x[torch.randint(len(x), (1,), generator=gen)]
    for _ in range(k - 1):
        d = torch.cdist(x, c).min(1).values
        c = torch.cat([c, x[torch.multinomial(d if d.sum() > 0 else torch.ones_like(d), 1, generator=gen)]])
    for _ in range(iters):
        lab = torch.cdist(x, c).argmin(1)
        cnt = torch.bincount(lab, minlength=k)[:, None]
        new = torch.where(cnt > 0, torch.zeros_like(c).index_add_(0, lab, x) / cnt.clamp(min=1), c)
        if torch.allclose(new, c):
            break
        c = new
    return c, torch.cdist(x, c).argmin(1)


@torch.no_grad()
def dense_structure(patches, group=8, local_k=3, global_k=24, seed=0):
    """Label-free estimate of dense quality (DSE; Dai et al., "Exploring Structural Degradation in Dense
    Representations for Self-supervised Learning", NeurIPS 2025) of patch features (B, N, D), L2-normalised.
    With s the features' mean distance to their centre and spread(C) = sum of the centred singular values of a
    cluster C / sqrt(max(|C| - 1, D)):
      inter = mean distance of a patch to the nearest *other* of global_k k-means centroids of its group of
              `group` images, / s                                          (classes apart: higher is better)
      intra = (mean spread of those clusters + mean spread of local_k clusters within each image) / (2 s)
      dim   = effective rank / min(B, D) of B patches, one per image at random positions, mean over N draws
      dse   = inter + dim - intra.   Returns {"dse", "inter", "intra", "dim"}."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(patches.float(), dim=-1)
    B, N, D = x.shape
    s = (x - x.mean((0, 1))).norm(dim=-1).mean()
    spread = lambda c: torch.linalg.svdvals(c - c.mean(0)).sum() / max(len(c) - 1, D) ** 0.5  # noqa: E731

    def mean_spread(pts, lab, k):  # a cluster of one point has no spread
        s = [spread(pts[lab == j]) for j in range(k) if (lab == j).sum() > 1]
        return torch.stack(s).mean() if s else x.new_zeros(())
    intra_img = torch.stack([mean_spread(x[b], _kmeans(x[b], local_k, gen)[1], local_k) for b in range(B)]).mean()
    inter, intra_grp = [], []
    for g in range(0, B, group):
        pts = x[g:g + group].reshape(-1, D)  # (group * N, D)
        c, lab = _kmeans(pts, global_k, gen)
        d = torch.cdist(pts, c)
        d[torch.arange(len(pts)), lab] = float("inf")  # the nearest centroid other than its own
        if len(c) > 1:
            inter.append(d.min(1).values.mean())
        intra_grp.append(mean_spread(pts, lab, global_k))
    perm = torch.argsort(torch.rand(B, N, generator=gen), dim=1)
    shuffled = x[torch.arange(B)[:, None], perm]  # (B, N, D): each image's patches in a random order
    p = torch.linalg.svdvals(shuffled.transpose(0, 1))  # (N, min(B, D)) one draw of B patches per row
    p = p / p.sum(1, keepdim=True) + 1e-12
    dim = (torch.exp(-(p * p.log()).sum(1)) / min(B, D)).mean()
    out = {"inter": (torch.stack(inter).mean() / s).item() if inter else 0.0, "dim": dim.item(),
           "intra": ((torch.stack(intra_grp).mean() + intra_img) / (2 * s)).item()}
    return {"dse": out["inter"] + out["dim"] - out["intra"], **out}


def analyze(tok, labels=None, masks=None):
    """Every number of the two failures from collect_tokens' output; labels (N,) and masks (N,S,S) when the
    dataset has them (mask-based figures need `textures` or `scenes`). Returns (metrics, per-token details for plots)."""
    N, R, P = tok["cls"].shape[0], tok["registers"].shape[1], tok["patches"].shape[1]
    out_norms = tok["norms"][-1]  # (N, T) residual stream after the last block
    cls_n, reg_n, patch_n = out_norms[:, 0], out_norms[:, 1:1 + R], out_norms[:, 1 + R:]
    outl = find_outliers(patch_n)  # (N, P)
    cls_attn = tok["attn"].mean(1)  # (N, T) mean over heads
    f_cls, f_patch = F.normalize(tok["cls"], dim=-1), F.normalize(tok["patches"], dim=-1)
    cos_cls = (f_patch * f_cls[:, None]).sum(-1)  # (N, P) cosine of each patch to its image's CLS
    layer_norms = tok["norms"][:, :, 1 + R:].flatten(1)  # (depth+1, N*P) patch norms after each layer
    layer_median = layer_norms.median(1).values
    m = {"n_images": N, "outlier_rule": f"norm > median + {OUTLIER_K:g} x 1.4826 x MAD and > 2 x median",
         "outlier_fraction": outl.float().mean().item(),
         "patch_norm_median": patch_n.median().item(), "patch_norm_max": patch_n.max().item(),
         "patch_norm_max_ratio": (patch_n.max() / patch_n.median()).item(),  # artifacts: 3-10x
         "patch_write_median": tok["write"].median().item(), "patch_write_max": tok["write"].max().item(),
         "patch_write_max_per_layer": tok["block_write"].flatten(1).max(1).values.tolist(),  # each block's largest
         "cls_norm_mean": cls_n.mean().item(),
         "register_norm_mean": reg_n.mean().item() if R else None,
         "patch_norm_bimodality": bimodality(patch_n),
         "patch_norm_median_per_layer": layer_median.tolist(),
         "patch_norm_max_ratio_per_layer": (layer_norms.max(1).values / layer_median).tolist(),
         "register_norm_mean_per_layer": tok["norms"][:, :, 1:1 + R].flatten(1).mean(1).tolist() if R else None,
         "register_cls_attention_share": cls_attn[:, 1:1 + R].sum(1).mean().item() if R else None,
         "patch_cls_cosine": cos_cls.mean().item(),
         "patch_effective_rank": effective_rank(tok["patches"].flatten(0, 1)),
         "dse": dense_structure(tok["patches"][:64])["dse"],  # label-free dense quality, on 64 images
         "outlier_cls_attention_share": None, "outlier_cls_cosine": None, "normal_cls_cosine": None,
         "outlier_knn_acc": None, "normal_patch_knn_acc": None, "outlier_background_share": None,
         "dense_miou": None, "dense_fg_miou": None, "similarity_locality": None,
         "similarity_locality_chance": None, "skipped": []}
    has = outl.any(1)  # images with at least one outlier
    if has.any():
        share = (cls_attn[:, 1 + R:] * outl).sum(1)  # (N,) CLS attention mass on the image's outliers
        m["outlier_cls_attention_share"] = share[has].mean().item()
        m["outlier_cls_attention_share_if_uniform"] = (outl.sum(1)[has] / (1 + R + P)).float().mean().item()
        m["outlier_cls_cosine"] = cos_cls[outl].mean().item()
        m["normal_cls_cosine"] = cos_cls[~outl].mean().item()
    # do the outliers hold global information? k-NN on the image label from one outlier token per image
    # (its highest-norm one) vs one ordinary patch token of the same image, half the images as the bank
    if labels is not None and has.sum() >= 40:
        idx = has.nonzero()[:, 0]
        top = patch_n[idx].argmax(1)
        normal = torch.where(outl[idx], torch.inf, (patch_n[idx] - patch_n.median()).abs()).argmin(1)
        fo, fn, y = tok["patches"][idx, top], tok["patches"][idx, normal], labels[idx]
        h = len(idx) // 2
        m["outlier_knn_acc"] = knn_classify(fo[:h], y[:h], fo[h:], y[h:])
        m["normal_patch_knn_acc"] = knn_classify(fn[:h], y[:h], fn[h:], y[h:])
    elif labels is not None:
        m["skipped"].append("outlier_knn_acc (fewer than 40 images with outliers)")
    if masks is not None:
        lab = patch_labels(masks, tok["grid"][0])  # (N, P)
        if outl.any():
            m["outlier_background_share"] = (lab[outl] == 0).float().mean().item()
        m["background_share"] = (lab == 0).float().mean().item()  # what a token picked at random would give
        h = N // 2  # the dense probe trains on the first half of the images and is scored on the second
        f_tr, f_te = tok["patches"][:h].flatten(0, 1), tok["patches"][h:].flatten(0, 1)
        m["dense_miou"] = dense_probe(f_tr, lab[:h].flatten(), f_te, lab[h:].flatten())
        # object vs background alone (2 classes): moves earlier than the 11-class mIoU in weak models
        fg = (lab > 0).long()
        m["dense_fg_miou"] = dense_probe(f_tr, fg[:h].flatten(), f_te, fg[h:].flatten())
        m["similarity_locality"], m["similarity_locality_chance"] = similarity_locality(tok["patches"], lab)
    else:
        m["skipped"] += ["outlier_background_share", "dense_miou", "dense_fg_miou",
                         "similarity_locality (need per-pixel masks: --dataset textures or scenes)"]
    return m, {"outliers": outl, "patch_norms": patch_n, "register_norms": reg_n, "cls_norms": cls_n,
               "cls_attn": tok["attn"], "reg_attn": tok["reg_attn"]}


INSTRUMENTS_LOGGED = ("dense_miou", "dense_fg_miou", "similarity_locality", "outlier_fraction", "patch_norm_median",
                      "patch_norm_max_ratio", "patch_norm_bimodality", "patch_write_median", "patch_write_max",
                      "register_norm_mean", "patch_effective_rank", "patch_cls_cosine", "dse", "cls_norm_mean",
                      "register_cls_attention_share", "outlier_cls_attention_share", "patch_norm_max_ratio_per_layer",
                      "patch_write_max_per_layer")


def eval_instruments(backbone, x_test, y_test, test_masks, args, device):
    """The instruments' key figures for log.jsonl at each evaluation (dense ones only with masks)."""
    n = min(args.analyze_images, len(x_test))
    tok = collect_tokens(backbone, x_test[:n], args.image_size, device)
    m, _ = analyze(tok, None, test_masks[:n] if test_masks is not None else None)
    r5 = lambda v: [round(x, 5) for x in v] if isinstance(v, list) else round(v, 5)  # noqa: E731
    return {k: (r5(m[k]) if m[k] is not None else None) for k in INSTRUMENTS_LOGGED}


def _pca_rgb(patches, fit=None):
    """Patch features (N,P,D) -> (N,P,3) in [0,1]: the first 3 principal components (fitted on `fit`),
    each min-max scaled over the whole set, as in the DINOv2 figures."""
    fit = patches if fit is None else fit
    x = fit.flatten(0, 1).float()
    mu = x.mean(0)
    _, _, V = torch.pca_lowrank(x - mu, q=3, center=False)
    y = (patches.float() - mu) @ V  # (N, P, 3)
    lo, hi = y.flatten(0, 1).quantile(0.01, 0), y.flatten(0, 1).quantile(0.99, 0)
    return ((y - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def plot_analysis(tok, details, metrics, images, out_dir, title, masks=None, n_show=6):
    """Write the instruments' pictures as PNGs into out_dir; returns their paths. images uint8 (N,3,S,S)."""
    from matplotlib.figure import Figure  # no pyplot: draws off-screen and leaves the caller's backend alone
    os.makedirs(out_dir, exist_ok=True)
    g = tok["grid"][0]
    R, P = tok["registers"].shape[1], tok["patches"].shape[1]
    # show the images with the most outliers first (then the first ones): that is where the artifacts are
    order = torch.argsort(details["outliers"].sum(1), descending=True, stable=True)[:n_show]
    pics = images[order].permute(0, 2, 3, 1).cpu().numpy()
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=80)
        paths.append(os.path.join(out_dir, name))

    def grid_fig(rows, name, suptitle, row_titles, cmap_rows, marks=None, shared=False, blank=None, no_bar=(),
                 ref=None):
        """One column per image: the image, then one row per map. shared: one colour scale (and one colour bar)
        for all maps; else each map has its own. blank: {row: (per-image bools, text)} writes text instead of
        the map where the bool is True (e.g. an outlier map without outliers); no_bar: rows without colour bar;
        ref: (value, label) marked on the shared colour bar."""
        fig = Figure(figsize=(2 * n_show, 2.1 * (len(rows) + 1)))
        ax = fig.subplots(len(rows) + 1, n_show, squeeze=False)
        lims = {}
        if shared:
            lims = {"vmin": min(float(v.min()) for v in rows), "vmax": max(float(v.max()) for v in rows)}
        im = None
        for j in range(len(order)):
            ax[0, j].imshow(pics[j])
            for r, (vals, cmap) in enumerate(zip(rows, cmap_rows)):
                if blank is not None and r in blank and blank[r][0][j]:
                    ax[r + 1, j].text(0.5, 0.5, blank[r][1], ha="center", va="center", fontsize=10,
                                      transform=ax[r + 1, j].transAxes)
                    continue
                im = ax[r + 1, j].imshow(vals[j], cmap=cmap, **({} if cmap is None else {"interpolation": "nearest"}),
                                         **lims)
                if cmap is not None and not shared and r not in no_bar:
                    fig.colorbar(im, ax=ax[r + 1, j], fraction=0.046, pad=0.02)
                if marks is not None:  # the query patch of a similarity map
                    ax[r + 1, j].plot(int(marks[j]) % g, int(marks[j]) // g, "kx", ms=8, mew=2)
        for a in ax.flat:
            a.set_xticks([]), a.set_yticks([])
        ax[0, 0].set_ylabel("image")
        for r, t in enumerate(row_titles):
            ax[r + 1, 0].set_ylabel(t)
        fig.suptitle(f"{suptitle}\n{title}")
        fig.tight_layout()
        if shared and im is not None:  # one bar in a margin of its own, after tight_layout
            fig.subplots_adjust(right=0.9)
            top = ax[1, 0].get_position().y1
            cb = fig.colorbar(im, cax=fig.add_axes([0.92, 0.04, 0.015, top - 0.04]))
            if ref is not None:  # e.g. the value of uniform attention, marked on the bar
                cb.ax.axhline(ref[0], color="c", lw=2)
                cb.set_label(ref[1])
        fig.savefig(os.path.join(out_dir, name), dpi=80)
        paths.append(os.path.join(out_dir, name))

    # 1. norm histogram: patch vs register vs CLS output norms (log counts: outliers are rare)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    allv = torch.cat([details[k].flatten() for k in ("patch_norms", "register_norms", "cls_norms")])
    bins = torch.logspace(math.log10(max(allv.min().item(), 1e-6)), math.log10(allv.max().item() * 1.01), 81).numpy()
    out_v = details["patch_norms"][details["outliers"]]
    for kind, name, v in (("patch", "patch tokens", details["patch_norms"]), ("register", "registers",
                          details["register_norms"]), ("CLS", "CLS", details["cls_norms"]),
                          ("outlier", "outlier patch tokens", out_v)):
        if v.numel():  # one fixed colour per kind of token, whatever the number of registers
            ax.hist(v.flatten().numpy(), bins=bins, alpha=0.9 if kind == "outlier" else 0.6, label=name, log=True,
                    color=TOKEN_COLORS[kind])  # the outliers drawn over the patch bulk, nearly opaque
    ax.set_xscale("log")  # registers/CLS and artifacts can sit decades away from the patch bulk
    thr = metrics["patch_norm_median"]
    ax.axvline(2 * thr, color="k", ls="--", lw=1, label="2 x patch median (outlier floor)")
    ax.set_xlabel("token norm after the last block (before the final norm)")
    ax.set_ylabel("tokens (log)")
    ax.set_title(f"Output token norms: outlier fraction {metrics['outlier_fraction']:.3%}, bimodality "
                 f"{metrics['patch_norm_bimodality']:.2f}\n{title}", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "norm_hist.png")
    # 2. norms per layer: where in depth the high norms appear
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    L = tok["norms"].shape[0]
    pn = tok["norms"][:, :, 1 + R:]
    ax.plot(range(L), pn.flatten(1).median(1).values, "o-", color=TOKEN_COLORS["patch"], label="patch median")
    ax.plot(range(L), pn.flatten(1).max(1).values, "o--", color=TOKEN_COLORS["patch"], label="patch max")
    ax.plot(range(L), tok["norms"][:, :, 0].mean(1), "s-", color=TOKEN_COLORS["CLS"], label="CLS mean")
    if R:
        ax.plot(range(L), tok["norms"][:, :, 1:1 + R].flatten(1).mean(1), "^-", color=TOKEN_COLORS["register"],
                label="register mean")
    ax.set_xlabel("layer (0 = input to block 1)")
    ax.set_ylabel("token norm")
    ax.set_yscale("log")
    ax.set_title(f"Token norms through depth\n{title}", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "norms_per_layer.png")
    # 3. norm maps and outliers over the patch grid
    nm = details["patch_norms"][order].reshape(-1, g, g).numpy()
    om = details["outliers"][order].reshape(-1, g, g).float().numpy()
    from matplotlib.colors import ListedColormap
    om_show = om.copy()
    om_show[om_show == 0] = float("nan")  # not drawn: only the outlier patches are coloured
    grid_fig([nm, om_show], "norm_maps.png",
             "Output norm of each patch token, and the outlier patches (coloured; white: not an outlier)",
             ["norm", "outlier"], ["viridis", ListedColormap([TOKEN_COLORS["outlier"]])], no_bar={1},
             blank={1: (om.reshape(len(om), -1).sum(1) == 0, "no outlier")})
    # 4. CLS attention per head (last layer) and the registers' attention
    ca = tok["attn"][order][:, :, 1 + R:].reshape(len(order), -1, g, g)  # (n, heads, g, g)
    T = tok["attn"].shape[-1]  # the tokens CLS attends to: CLS, registers and patches
    grid_fig([ca[:, h].numpy() for h in range(ca.shape[1])], "cls_attention.png",
             f"Last-layer CLS attention over the patches, per head (one colour scale); "
             f"uniform attention would be 1/T = 1/{T} = {1 / T:.4f}", [f"head {h}" for h in range(ca.shape[1])],
             ["inferno"] * ca.shape[1], shared=True, ref=(1 / T, "attention weight (cyan line: uniform, 1/T)"))
    if R:
        ra = tok["reg_attn"][order][:, :, 1 + R:].reshape(len(order), R, g, g)
        grid_fig([ra[:, r].numpy() for r in range(R)], "register_attention.png",
                 f"Last-layer attention of each register over the patches (mean over heads; one colour scale); "
                 f"uniform attention would be 1/T = 1/{T} = {1 / T:.4f}",
                 [f"register {r}" for r in range(R)], ["inferno"] * R, shared=True,
                 ref=(1 / T, "attention weight (cyan line: uniform, 1/T)"))
    # 5. PCA of patch features as RGB, and similarity maps from a query patch on the object
    pca = _pca_rgb(tok["patches"][order], fit=tok["patches"][:256]).reshape(len(order), g, g, 3).numpy()
    f = F.normalize(tok["patches"][order], dim=-1)
    if masks is not None:
        lab = patch_labels(masks[order], g)
        q = []  # the patch of the main object (its most frequent label) nearest the object's centroid
        for i in range(len(order)):
            fg = lab[i][lab[i] > 0]
            if not len(fg):
                q.append(P // 2 + g // 2)
                continue
            on = (lab[i] == fg.mode().values).nonzero()[:, 0]
            yx = torch.stack([on // g, on % g], 1).float()
            q.append(on[(yx - yx.mean(0)).norm(dim=1).argmin()].item())
        q = torch.tensor(q)
    else:
        q = torch.full((len(order),), P // 2 + g // 2)  # the centre patch
    sim = (f * f[torch.arange(len(order)), q][:, None]).sum(-1).reshape(-1, g, g).numpy()
    grid_fig([pca, sim], "pca_similarity.png", "PCA of patch features (RGB) and cosine similarity to a query "
             "patch (on the object; x marks it)", ["PCA", "similarity"], [None, "coolwarm"], marks=q)
    return paths


def plot_log(out_dir):
    """Plot log.jsonl of a run: k-NN, dense mIoU, outlier fraction and the collapse signatures vs epoch."""
    from matplotlib.figure import Figure  # no pyplot: draws off-screen and leaves the caller's backend alone
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        raise UsageError(f"--plot-log: there is no log.jsonl in {out_dir}")
    recs = [json.loads(line) for line in open(path) if line.strip()]
    steps = [r for r in recs if r["type"] == "step"]
    evals = [r for r in recs if r["type"] == "eval"]
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(18, 3.8))
    ax = fig.subplots(1, 4)
    for key, a, lab in (("knn_acc", ax[0], "k-NN accuracy (CLS)"), ("dense_miou", ax[1], "dense-probe mIoU"),
                        ("dense_fg_miou", ax[1], "object/background probe mIoU"),
                        ("similarity_locality", ax[1], "similarity locality"),
                        ("outlier_fraction", ax[2], "outlier fraction")):
        pts = [(r["epoch"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            a.plot(*zip(*pts), "o-", ms=7 if len(pts) == 1 else 4, label=lab)
            if len(pts) == 1:  # a single evaluation: its value written beside the point
                a.annotate(f"{pts[0][1]:.4g}", pts[0], xytext=(8, 0), textcoords="offset points", va="center",
                           fontsize=8)
    ax[0].set_title("global quality")
    ax[1].set_title("dense quality")
    ax[2].set_title("high-norm outlier patch tokens")
    ax[3].set_title("collapse signatures (1 = uniform)")
    if steps:
        e = [r["epoch"] for r in steps]
        sty = "o-" if len(steps) <= 30 else "-"  # a few records (or one): markers, so that single points show
        ax[3].plot(e, [r["dino_over_lnK"] for r in steps], sty, ms=4, label="DINO loss / ln K")
        lnk = steps[0]["dino"] / steps[0]["dino_over_lnK"]
        ax[3].plot(e, [r["teacher_entropy"] / lnk for r in steps], sty, ms=4, label="teacher entropy / ln K")
    for i, a in enumerate(ax):
        a.set_xlabel("epoch")
        if not a.lines:  # nothing logged for this panel: say so rather than draw empty axes
            a.text(0.5, 0.5, "no training steps in log.jsonl" if i == 3 else "no evaluation in log.jsonl",
                   ha="center", va="center", transform=a.transAxes, color="0.4")
            a.set_xticks([]), a.set_yticks([])
            continue
        xs = sorted({float(x) for line in a.lines for x in line.get_xdata()})
        if i < 3 or len(xs) == 1:
            a.xaxis.set_major_locator(MaxNLocator(integer=True))  # evaluations happen at whole epochs
        if len(xs) == 1:  # one x: a window around it instead of matplotlib's +-5% of the value
            a.set_xlim(xs[0] - 1, xs[0] + 1)
            ys = [float(y) for line in a.lines for y in line.get_ydata()]
            lo, hi = min(ys), max(ys)
            top = hi * 1.5 if hi > 0 else 1e-3  # room above the points for the legend
            a.set_ylim(min(0.0, lo) - 0.03 * top, top)  # from zero (the values are rates and ratios), a zero visible
            a.legend(fontsize=8, loc="upper left")
        else:
            a.legend(fontsize=8)
    fig.suptitle(f"training log of {out_dir}")
    fig.tight_layout()
    out = os.path.join(out_dir, "analysis", "log.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=80)
    return out


def write_metrics(metrics, out_dir, n_pics, keys, show_skipped=False, verbose=True):
    """metrics.json into out_dir, and (verbose) the key figures printed one per line; returns the metrics."""
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    for k in keys if verbose else ():
        v = metrics.get(k)
        print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    if show_skipped and metrics["skipped"]:
        print("skipped: " + "; ".join(metrics["skipped"]))
    print(f"wrote {os.path.join(out_dir, 'metrics.json')} and {n_pics} pictures in {out_dir}")
    return metrics


def load_teacher(path, device="cpu"):
    """The EMA teacher's backbone of a run folder or checkpoint, in eval mode: (backbone, the run's args, checkpoint)."""
    ck_path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.exists(ck_path):
        raise UsageError(f"found no checkpoint at {ck_path} (give a run folder that holds checkpoint.pt, or the file)")
    ck = load_checkpoint(ck_path)
    args = argparse.Namespace(**ck["args"])
    backbone = build_backbone(args, student=False).to(device)
    backbone.load_state_dict(ck["teacher_backbone"])
    return backbone.eval(), args, ck


def analyze_run(path, device_name="auto", n_images=1000, verbose=True):
    """--analyze: load a checkpoint (or a run folder holding one), measure its EMA teacher on the test
    images of its own dataset, and write analysis/metrics.json and the PNGs next to the checkpoint
    (verbose: the key figures printed too)."""
    ck_path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    device = pick_device(device_name)
    backbone, args, ck = load_teacher(ck_path, device)
    x_train, _, _, x_test, y_test, masks = load_data(args)
    epoch = ck["step"] / max(1, len(x_train) // args.batch_size)
    n = min(n_images, len(x_test))
    tok = collect_tokens(backbone, x_test[:n], args.image_size, device)
    metrics, details = analyze(tok, y_test[:n], masks[:n] if masks is not None else None)
    metrics.update(checkpoint=ck_path, epoch=epoch, model=args.model, registers=args.registers,
                   dataset=args.dataset)
    out_dir = os.path.join(os.path.dirname(ck_path) or ".", "analysis")  # relative stays relative
    title = f"{args.model} ViT, {args.registers} registers, {args.dataset}, epoch {epoch:g} (EMA teacher)"
    pics = plot_analysis(tok, details, metrics, x_test[:n], out_dir, title, masks[:n] if masks is not None else None)
    return write_metrics(metrics, out_dir, len(pics), (
        "outlier_fraction", "outlier_background_share", "outlier_cls_attention_share", "outlier_knn_acc",
        "normal_patch_knn_acc", "register_norm_mean", "register_cls_attention_share", "patch_norm_median",
        "patch_norm_max_ratio", "patch_write_median", "patch_write_max", "patch_norm_bimodality", "dense_miou",
        "dense_fg_miou", "patch_effective_rank", "patch_cls_cosine", "similarity_locality",
        "similarity_locality_chance", "dse"), show_skipped=verbose, verbose=verbose)


# -----------------------------------------------------------------------------------------------
# 10. The released models: DINOv2 (with and without registers) and DINOv3 weights in this file's ViT,
# where the high-norm artifacts are known to exist (registers paper, Fig. 1 and 7)
# -----------------------------------------------------------------------------------------------

# where dinov2's hubconf.py downloads them (dinov2/hub/backbones.py); the _reg models have 4 registers
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{a}/{a}{r}_pretrain.pth"
DINOV2_NAMES = [f"dinov2_vit{s}14{r}" for s in "sbl" for r in ("", "_reg")]
DINOV3_NAMES = ["dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"]  # behind a licence form: --weights PATH
# official name -> this file's name: inside each block, and at the top (whole tensors, or modules' weights)
BLOCK_NAMES = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "ls1": "ls1", "norm2": "norm2",
               "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2", "ls2": "ls2"}
TOP_NAMES = {"cls_token": "cls_token", "register_tokens": "registers", "storage_tokens": "registers",
             "pos_embed": "pos_embed", "mask_token": "mask_token", "patch_embed.proj": "patch_embed", "norm": "norm",
             "rope_embed.periods": "rope.periods", "local_cls_norm": "local_norm"}  # (DINOv3 ViT-L SAT: local crops)


def _official_to_ours(sd, vit):
    """Rename an official backbone state dict onto vit's names and load it strictly; refuse what is not mapped."""
    ours, unmapped = {}, []
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        blk = re.fullmatch(r"blocks\.(\d+)\.(.+)", head)
        if k in TOP_NAMES:  # cls_token, pos_embed, ...
            ours[TOP_NAMES[k]] = v
        elif head in TOP_NAMES:  # patch_embed.proj.weight -> patch_embed.weight, norm.bias, ...
            ours[f"{TOP_NAMES[head]}.{leaf}"] = v
        elif blk and blk[2] in BLOCK_NAMES:  # blocks.N.mlp.fc1.weight -> blocks.N.mlp.0.weight
            ours[f"blocks.{blk[1]}.{BLOCK_NAMES[blk[2]]}.{leaf}"] = v
        else:
            unmapped.append(k)
    if unmapped:
        raise CheckpointError(
            f"the weights hold {len(unmapped)} tensor(s) this file's ViT has no place for ({', '.join(unmapped[:4])}"
            f"{', ...' if len(unmapped) > 4 else ''}), so they were not loaded. Maps exist for DINOv2 ViT-S/B/L/14 "
            "(with or without registers) and DINOv3 ViT-S/B/L/16; the SwiGLU feed-forward models (DINOv2 ViT-g/14, "
            "DINOv3 ViT-S+/L+/H+/7B) are left out")
    ours["mask_token"] = ours["mask_token"].reshape(1, 1, -1)  # official (1, D)
    ours.setdefault("registers", vit.registers.detach())  # (1, 0, D) without registers
    periods = ours.pop("rope.periods", None)  # a buffer here, not part of the state dict
    try:
        vit.load_state_dict(ours, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit the ViT their shapes describe "
                              f"({str(e).splitlines()[1].strip()[:300]})") from None
    if periods is not None:
        vit.rope.periods.copy_(periods)
    return vit.eval()


def _released_vit(sd, heads, R, eps, **kw):
    """The ViT an official state dict describes: width, depth, patch size, MLP width, LayerScale from the shapes."""
    D, _, p, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * D
    vit = ViT(image_size=224, patch_size=p, dim=D, depth=depth, heads=heads, num_registers=R, mlp_ratio=hidden / D,
              layerscale=1.0 if "blocks.0.ls1.gamma" in sd else 0.0,
              untie_local_norm="local_cls_norm.weight" in sd, **kw)
    for m in vit.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    return vit


def load_dinov2(state_dict, heads=None):
    """A released DINOv2 backbone state dict (official names) -> this file's ViT, eval mode. The architecture is
    read from the shapes (heads: 64 channels each, as in every released model); LayerNorm eps 1e-6; learned
    position embeddings, interpolated as the official code does (the _reg models with their own settings).
    Forward gives cls, registers, patches equal to the official x_norm_clstoken, _regtokens, _patchtokens."""
    w, pos = state_dict["patch_embed.proj.weight"], state_dict["pos_embed"]  # (D, 3, p, p), (1, 1 + G*G, D)
    R = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    vit = _released_vit(state_dict, heads or w.shape[0] // 64, R, eps=1e-6, pos_grid=math.isqrt(pos.shape[1] - 1),
                        pos_offset=0.0 if R else 0.1, pos_antialias=R > 0)
    return _official_to_ours(state_dict, vit)


def load_dinov3(state_dict):
    """A released DINOv3 ViT state dict (official names) -> this file's ViT (DINOv3's architecture: RoPE with the
    stored periods, storage tokens = registers, LayerScale), eval mode, LayerNorm eps 1e-5 (as released). The
    k part of the qkv bias is masked out in DINOv3 (mask_k_bias): bias_mask is folded into the bias here."""
    sd = dict(state_dict)
    for k in [k for k in sd if k.endswith("attn.qkv.bias_mask")]:
        b = k[:-len("_mask")]
        sd[b] = sd[b] * sd.pop(k)  # (3D,): ones on q and v, zeros on k
    D = sd["patch_embed.proj.weight"].shape[0]
    R = sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0
    return _official_to_ours(sd, _released_vit(sd, D // (4 * len(sd["rope_embed.periods"])), R, eps=1e-5))


def load_released(state_dict):
    """load_dinov2 or load_dinov3, told apart by their position encoding (a learned table or RoPE periods)."""
    try:
        if "pos_embed" in state_dict:
            return load_dinov2(state_dict)
        if "rope_embed.periods" in state_dict:
            return load_dinov3(state_dict)
    except KeyError as e:
        raise CheckpointError(f"the weights lack the tensor {e}, which every released DINOv2/DINOv3 backbone "
                              "has") from None
    raise CheckpointError("the file is neither a run of this file nor a DINOv2/DINOv3 backbone state dict (it has "
                          "no pos_embed and no rope_embed.periods)")


class WeightsUnavailable(Exception):
    """Released weights could not be downloaded; the command line turns this into a one-paragraph message."""


def released_state_dict(name, weights=None):
    """The state dict of a released model: from --weights PATH, a local file given as the name, or (DINOv2) the
    official download, cached by torch.hub; every read is torch.load(weights_only=True)."""
    if weights or (os.path.isfile(name) and name not in DINOV2_NAMES):
        return safe_load(weights or name)
    if name in DINOV3_NAMES:
        raise UsageError(f"the DINOv3 weights are downloaded after accepting Meta's licence form (see the dinov3 "
                         f"repository's README); then run: --analyze {name} --weights PATH/TO/{name}_pretrain.pth")
    if name not in DINOV2_NAMES:
        raise UsageError(f"--analyze {name}: no run folder, checkpoint or weights file of that name, and not a "
                         f"released model this file can load ({', '.join(DINOV2_NAMES + DINOV3_NAMES)}; the SwiGLU "
                         "ViT-g/14 and DINOv3's + and 7B models are left out)")
    a, reg = name.removesuffix("_reg"), name.endswith("_reg")
    url = DINOV2_URL.format(a=a, r="_reg4" if reg else "")
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, weights_only=True)
    except pickle.UnpicklingError:
        return safe_load(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))  # its message
    except Exception as e:  # URLError, HTTPError, socket errors, a broken download: all mean "not here"
        raise WeightsUnavailable(
            f"could not download the {name} weights from {url} ({type(e).__name__}: {e}). This machine may have no "
            f"network. Download that file on another machine, copy it here and run `python dinov3_mini.py --analyze "
            f"{name} --weights PATH/TO/{os.path.basename(url)}`, or put it into the torch hub cache "
            f"({os.path.join(torch.hub.get_dir(), 'checkpoints')}), where it is found without a network.") from None


def load_photos(folder, size, n):
    """Up to n photos of a folder as uint8 (N,3,S,S) (shorter side resized, centre crop); matplotlib's sample
    photo (Grace Hopper) when no folder is given."""
    if folder is None:
        from matplotlib import cbook
        paths = [str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]
    elif not os.path.isdir(folder):
        raise UsageError(f"--images {folder}: the folder does not exist")
    else:
        paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTS))
    imgs = [im for im in (_load_image(p, size) for p in paths[:n]) if im is not None]
    if not imgs:
        raise UsageError(f"--images {folder}: no readable image files ({', '.join(IMAGE_EXTS)}) in it")
    return torch.stack(imgs)


def analyze_released(args, state_dict=None):
    """--analyze on a released backbone: every instrument on photographs, PNGs and metrics.json in --out-dir/NAME."""
    name = args.analyze
    backbone = load_released(state_dict if state_dict is not None else released_state_dict(name, args.weights))
    S, p = args.image_size, backbone.patch_size
    if S % p:
        raise UsageError(f"--image-size {S} must be a multiple of the model's patch size {p}")
    images = load_photos(args.images, S, args.analyze_images)
    device = pick_device(args.device)
    tok = collect_tokens(backbone.to(device), images, S, device, batch=2)  # keeps every layer's attention maps
    metrics, details = analyze(tok)
    tag = os.path.splitext(os.path.basename(name))[0]
    out_dir = os.path.join(args.out_dir, tag)
    title = (f"{tag}: {backbone.dim}-d, {len(backbone.blocks)} blocks, {backbone.num_registers} registers, "
             f"patch {p}, {len(images)} photo(s) at {S} px")
    pics = plot_analysis(tok, details, metrics, images, out_dir, title, n_show=min(6, len(images)))
    metrics.update(model=tag, image_size=S, images=args.images or "grace_hopper.jpg (matplotlib)")
    return write_metrics(metrics, out_dir, len(pics), ("outlier_fraction", "patch_norm_median", "patch_norm_max",
                         "patch_norm_max_ratio", "patch_norm_bimodality", "register_norm_mean",
                         "outlier_cls_attention_share", "register_cls_attention_share", "patch_cls_cosine"))


def analyze_command(args):
    """--analyze: a run of this file (folder or checkpoint.pt) or a released backbone (name, --weights, a file)."""
    path = os.path.join(args.analyze, "checkpoint.pt") if os.path.isdir(args.analyze) else args.analyze
    if args.weights or not os.path.isfile(path):
        return analyze_released(args)
    ck = safe_load(path)
    if isinstance(ck, dict) and "teacher" in ck and "args" in ck:
        return analyze_run(args.analyze, args.device, args.analyze_images)
    return analyze_released(args, ck)


# -----------------------------------------------------------------------------------------------
# 11. Data: the `scenes` and `textures` datasets and the readers of real datasets
# -----------------------------------------------------------------------------------------------

class DataUnavailable(Exception):
    """A dataset could not be found or fetched; the command line turns this into a one-paragraph message."""


DATASETS = ("scenes", "textures", "cifar10", "cifar100", "stl10", "imagenette", "folder")


SHAPES = ("disk", "square", "triangle", "diamond", "plus", "ring", "star", "hexagon", "bar", "crescent")
SCENES_SIZES = {"train": 10000, "test": 2000}
SCENES_CHUNK = 1000  # images are generated in chunks of 1000, each from its own seed: image i never changes


def shape_mask(cls, u, v):
    """Inside-test of shape `cls` (B,) in object coordinates u, v (B, S, S), object roughly in [-1, 1]^2."""
    r, phi = torch.sqrt(u ** 2 + v ** 2), torch.atan2(v, u)
    inside = torch.stack([
        r < 1,                                                             # disk
        torch.maximum(u.abs(), v.abs()) < 0.85,                            # square
        (v < 0.7) & (v > -1.0 + 1.9 * u.abs()),                           # triangle (pointing up)
        u.abs() + v.abs() < 1.05,                                          # diamond
        ((u.abs() < 0.32) & (v.abs() < 1)) | ((v.abs() < 0.32) & (u.abs() < 1)),  # plus
        (r < 1) & (r > 0.55),                                              # ring
        r < 0.55 + 0.42 * torch.cos(5 * phi),                              # five-pointed star
        torch.maximum(u.abs() * 0.866 + v.abs() * 0.5, v.abs()) < 0.9,     # hexagon
        (u / 1.05) ** 2 + (v / 0.4) ** 2 < 1,                              # bar (flat ellipse)
        (r < 1) & ((u - 0.45) ** 2 + v ** 2 > 0.8 ** 2),                   # crescent
    ])  # (10, B, S, S)
    return inside[cls, torch.arange(len(cls))]  # (B, S, S): each image's own shape


def _scenes_chunk(seed, split, chunk, size):
    """Render SCENES_CHUNK images of `size` px: (uint8 images (n,3,S,S), labels (n,), masks (n,S,S))."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + {"train": 0, "test": 500_000}[split] + chunk)
    n = SCENES_CHUNK
    U = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    t = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(t, t, indexing="ij")
    y, x = y.expand(n, size, size), x.expand(n, size, size)
    # background: flat (35%), gradient (25%), stripes (20%), dead leaves (20%); large redundant areas
    kind = torch.bucketize(U(n), torch.tensor([0.35, 0.6, 0.8]))[:, None, None]
    c1, c2 = U(n, 3, 1, 1), U(n, 3, 1, 1)
    th = U(n, 1, 1) * 2 * math.pi
    proj = (x - 0.5) * torch.cos(th) + (y - 0.5) * torch.sin(th)
    mix = torch.where(kind == 1, (proj + 0.5).clamp(0, 1), torch.zeros_like(x))
    freq, phase = 2 + 4 * U(n, 1, 1), U(n, 1, 1) * 2 * math.pi
    mix = torch.where(kind == 2, (torch.sin(2 * math.pi * freq * proj + phase) > 0).float(), mix)
    img = c1 + (c2 - c1) * mix[:, None]
    for _ in range(14):  # dead leaves: discs of random colour and size stacked over the background
        cx, cy, rad, col = U(n, 1, 1), U(n, 1, 1), 0.05 + 0.25 * U(n, 1, 1), U(n, 3, 1, 1)
        disc = ((x - cx) ** 2 + (y - cy) ** 2 < rad ** 2) & (kind == 3)
        img = torch.where(disc[:, None], col, img)
    labels = torch.randint(len(SHAPES), (n,), generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)

    def draw(img, cls, cx, cy, scale, present):
        ang = (U(n) - 0.5) * math.radians(40)  # +-20 degrees keeps square and diamond apart
        aspect = 0.85 + 0.3 * U(n)
        dx, dy = (x - cx[:, None, None]) / scale[:, None, None], (y - cy[:, None, None]) / scale[:, None, None]
        ca, sa = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
        u, v = (ca * dx + sa * dy) * aspect[:, None, None], (-sa * dx + ca * dy) / aspect[:, None, None]
        inside = shape_mask(cls, u, v) & present[:, None, None]
        # the object's colour keeps a distance from the background colour; its texture is one of
        # solid, stripes, checker or radial gradient between two colours
        col = U(n, 3, 1, 1)
        col = torch.where((col - c1).abs().mean(1, keepdim=True) < 0.25, 1 - col, col)
        col2 = col * (0.3 + 0.4 * U(n, 1, 1, 1))
        tex = torch.randint(4, (n, 1, 1), generator=g)
        f = 2 + 3 * U(n, 1, 1)
        pattern = torch.stack([torch.zeros_like(u), (torch.sin(math.pi * f * u) > 0).float(),
                               ((torch.sin(math.pi * f * u) > 0) ^ (torch.sin(math.pi * f * v) > 0)).float(),
                               (u ** 2 + v ** 2).sqrt().clamp(0, 1)])  # (4, n, S, S)
        pat = pattern[tex[:, 0, 0], torch.arange(n)]
        obj = col + (col2 - col) * pat[:, None]
        return torch.where(inside[:, None], obj, img), inside

    for _ in range(2):  # distractors: small objects of any class, drawn first so the main object covers them
        dcls = torch.randint(len(SHAPES), (n,), generator=g)
        img, inside = draw(img, dcls, U(n), U(n), 0.07 + 0.07 * U(n), U(n) < 0.35)
        masks[inside] = (dcls + 1)[:, None, None].expand_as(inside)[inside].to(torch.uint8)
    cx, cy = 0.5 + 0.3 * (U(n) - 0.5), 0.5 + 0.3 * (U(n) - 0.5)
    img, inside = draw(img, labels, cx, cy, 0.22 + 0.16 * U(n), torch.ones(n, dtype=torch.bool))
    masks[inside] = (labels + 1)[:, None, None].expand_as(inside)[inside].to(torch.uint8)
    img = (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    return (img * 255).round().to(torch.uint8), labels, masks


def make_scenes(split="train", n=None, size=32, seed=0):
    """The built-in dataset: (images uint8 (n,3,S,S), labels (n,) in 0..9, masks uint8 (n,S,S) 0=background).

    Deterministic from (seed, split, index); the same scene renders at any resolution (32, 64, 96, ...)."""
    n = SCENES_SIZES[split] if n is None else n
    parts = [_scenes_chunk(seed, split, c, size) for c in range(math.ceil(n / SCENES_CHUNK))]
    return tuple(torch.cat(p)[:n] for p in zip(*parts))


# `textures`: object-centric, designed so that DINO can learn it at small scale. One object fills most of the frame, so
# every crop sees part of it; its class is its surface texture (one of 10 two-tone patterns drawn in the
# object's own frame, so they rotate and scale with it), on a random shape with random colours, rotation,
# scale and position over a flat or gradient background. A texture survives cropping, flips, colour jitter,
# grayscale, blur and solarisation, and a ViT's patches see it directly; raw pixels and a random-init ViT
# do not separate the classes (bench/screen_data.py checks this).
TEXTURES = ("stripes", "checker", "dots", "rings", "grid", "chevrons", "pinwheel", "waves", "blobs", "plain")
TEXTURES_SIZES = {"train": 10000, "test": 2000}  # the default sizes, and the images of one block (see make_textures)


def texture_pattern(cls, u, v, f, noise):
    """Two-tone texture `cls` (n,) on object coordinates u, v (n,S,S) with frequency f (n,1,1) and a smooth
    noise field (n,S,S) for `blobs`: a 0/1 pattern (n,S,S). Only each image's own pattern is computed."""
    r, phi = torch.sqrt(u ** 2 + v ** 2), torch.atan2(v, u)
    out = torch.zeros_like(u)
    for c in range(len(TEXTURES)):
        i = (cls == c).nonzero().squeeze(1)
        if len(i) == 0:
            continue
        uc, vc, fc, rc, pc = u[i], v[i], f[i], r[i], phi[i]
        su, sv = torch.sin(fc * uc), torch.sin(fc * vc)
        out[i] = [lambda: su > 0,                                                  # stripes
                  lambda: (su > 0) ^ (sv > 0),                                     # checker
                  lambda: torch.cos(fc * uc) * torch.cos(fc * vc) > 0.35,          # dots
                  lambda: torch.sin(1.3 * fc * rc) > 0,                            # concentric rings
                  lambda: (su.abs() < 0.45) | (sv.abs() < 0.45),                   # grid lines
                  lambda: torch.sin(fc * (vc + uc.abs())) > 0,                     # chevrons
                  lambda: torch.sin(5 * pc) > 0,                                   # pinwheel sectors
                  lambda: torch.sin(fc * uc + 2.2 * torch.sin(0.8 * fc * vc)) > 0,  # wavy stripes
                  lambda: noise[i] > 0.3,                                          # blobs
                  lambda: torch.zeros_like(uc, dtype=torch.bool)][c]().float()     # plain
    return out


def texture_draws(split="train", size=32, seed=0, palette=None, block=0):
    """Every random number of one block of a `textures` split (TEXTURES_SIZES[split] images), drawn in a fixed
    order for all of its images (so image i does not depend on how many are rendered): a dict of tensors whose
    first dimension is the block's size. `palette`, if given, maps the four colours (n,3,1,1) before the
    object's are kept apart from the background."""
    N = TEXTURES_SIZES[split]
    g = torch.Generator().manual_seed(seed * 1_000_003 + {"train": 0, "test": 500_000}[split] + 77 + 7919 * block)
    U = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    d = dict(c1=U(N, 3, 1, 1), c2=U(N, 3, 1, 1), bg_angle=U(N, 1, 1) * 2 * math.pi, bg_kind=U(N, 1, 1))
    d["labels"] = torch.randint(len(TEXTURES), (N,), generator=g)
    d["cx"], d["cy"] = 0.5 + 0.2 * (U(N) - 0.5), 0.5 + 0.2 * (U(N) - 0.5)  # object centre
    d["scale"] = 0.36 + 0.12 * U(N)  # half-size: the object spans 70-95% of the frame
    d["ang"], d["aspect"] = (2 * U(N) - 1) * math.pi, 0.85 + 0.3 * U(N)
    d["shape"] = torch.randint(len(SHAPES), (N,), generator=g)  # any shape: the texture alone is the class
    d["freq"] = (2.2 + 1.3 * U(N, 1, 1)) * math.pi  # 2.2-3.5 periods across the object
    d["noise"] = F.interpolate(torch.randn(N, 1, 5, 5, generator=g), size=size, mode="bicubic",
                               align_corners=False)[:, 0]
    d["col"], d["col2"] = U(N, 3, 1, 1), U(N, 3, 1, 1)
    if palette is not None:
        for k in ("c1", "c2", "col", "col2"):
            d[k] = palette(d[k])
    c1, col, col2 = d["c1"], d["col"], d["col2"]
    d["col"] = col = torch.where((col - c1).abs().mean(1, keepdim=True) < 0.25, 1 - col, col)  # away from bg
    d["col2"] = torch.where((col2 - col).abs().mean(1, keepdim=True) < 0.3, 1 - col2, col2)  # two tones apart
    d["pixel_noise"] = torch.randn(N, 3, size, size, generator=g)
    return d


def render_textures(d, sl, size=32):
    """Images uint8 (m,3,S,S) and masks uint8 (m,S,S) of the drawn images d[sl] (see texture_draws)."""
    d = {k: v[sl] for k, v in d.items()}
    m = len(d["labels"])
    t = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(t, t, indexing="ij")
    y, x = y.expand(m, size, size), x.expand(m, size, size)
    e = lambda z: z[:, None, None]  # noqa: E731
    # background: flat (50%) or a linear gradient between two colours
    proj = ((x - 0.5) * torch.cos(d["bg_angle"]) + (y - 0.5) * torch.sin(d["bg_angle"]) + 0.5).clamp(0, 1)
    mix = torch.where(d["bg_kind"] < 0.5, torch.zeros_like(x), proj)
    img = d["c1"] + (d["c2"] - d["c1"]) * mix[:, None]
    # object frame: u, v in [-1, 1] across the object
    dx, dy = (x - e(d["cx"])) / e(d["scale"]), (y - e(d["cy"])) / e(d["scale"])
    ca, sa = e(torch.cos(d["ang"])), e(torch.sin(d["ang"]))
    u, v = (ca * dx + sa * dy) * e(d["aspect"]), (-sa * dx + ca * dy) / e(d["aspect"])
    inside = shape_mask(d["shape"], u, v)
    pat = texture_pattern(d["labels"], u, v, d["freq"], d["noise"])
    obj = d["col"] + (d["col2"] - d["col"]) * pat[:, None]
    img = torch.where(inside[:, None], obj, img)
    img = (img + 0.03 * d["pixel_noise"]).clamp(0, 1)
    return (img * 255).round().to(torch.uint8), torch.where(inside, e(d["labels"]) + 1, 0).to(torch.uint8)


def make_textures(split="train", n=None, size=32, seed=0, chunk=1000):
    """The `textures` dataset: (images uint8 (n,3,S,S), labels (n,) in 0..9, masks uint8 (n,S,S): 0 =
    background, label + 1 = the object). Deterministic from (seed, split): images come in blocks of
    TEXTURES_SIZES[split] (the default n), each block drawn whole from its own generator and the first n images
    rendered, so image i never depends on n; the same scenes render at any resolution (32, 64, ...; only the
    pixel noise differs)."""
    B = TEXTURES_SIZES[split]
    n = B if n is None else n
    out, labels = [], []
    for b in range(math.ceil(n / B)):
        d, m = texture_draws(split, size, seed, block=b), min(B, n - b * B)
        out += [render_textures(d, slice(a, min(m, a + chunk)), size) for a in range(0, m, chunk)]
        labels.append(d["labels"][:m])
    return torch.cat([o[0] for o in out]), torch.cat(labels), torch.cat([o[1] for o in out])


# The published MD5s of the archives, and of CIFAR's pickled batches (as torchvision's dataset classes check
# them): an archive is checked before it is unpacked, a pickle before it is unpickled (unpickling runs code).
MD5 = {"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
       "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
       "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz": "91f7769df0f17e558f3565bffb0c7dfb",
       "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz": "e793b78cc4c9e9a4ccc0c1155377a412",
       "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
       "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
       "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
       "train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}


def check_md5(path, md5):
    """Refuse (DataUnavailable) a file whose MD5 is not the published one: corrupt, truncated or replaced."""
    import hashlib
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != md5:
        raise DataUnavailable(f"{path} does not have the published MD5 ({h.hexdigest()} instead of {md5}): it is "
                              "corrupt, truncated or not the original file, so it was not read. Delete it to download "
                              "it again")


def _fetch(url, root, md5=None):
    """Download and extract an archive into root with torchvision's helper, which checks the archive's published
    MD5 before unpacking; no network or a wrong checksum -> DataUnavailable."""
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        download_and_extract_archive(url, download_root=root, md5=md5 or MD5.get(url))
    except Exception as e:  # URLError, HTTPError, socket errors, a broken archive: all mean "not here"
        raise DataUnavailable(f"could not fetch {url} into {root} ({type(e).__name__}: {e})") from None


def _read_cifar(root, name):
    """CIFAR-10/100 in the 'python version' layout: pickled dicts with 'data' (N, 3072) and labels."""
    d = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    files = ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]} if name == "cifar10"
             else {"train": ["train"], "test": ["test"]})
    if not all(os.path.exists(os.path.join(d, f)) for fs in files.values() for f in fs):
        url = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
               "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}[name]
        _fetch(url, root)
    out = {}
    for split, fs in files.items():
        xs, ys = [], []
        for f in fs:
            check_md5(os.path.join(d, f), MD5[f])  # before unpickling: a pickle can carry code
            with open(os.path.join(d, f), "rb") as fh:
                e = pickle.load(fh, encoding="latin1")
            xs.append(torch.as_tensor(e["data"], dtype=torch.uint8).view(-1, 3, 32, 32))
            ys.append(torch.as_tensor(e["labels" if name == "cifar10" else "fine_labels"]))
        out[split] = (torch.cat(xs), torch.cat(ys))
    return out


def _read_stl10(root):
    """STL-10 binary layout: uint8 (N, 3, 96, 96) stored column-major, labels 1..10 (0 = unlabeled)."""
    d = os.path.join(root, "stl10_binary")
    if not os.path.exists(os.path.join(d, "unlabeled_X.bin")):
        _fetch("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", root)

    def x(f):
        a = torch.frombuffer(bytearray(open(os.path.join(d, f), "rb").read()), dtype=torch.uint8)
        return a.view(-1, 3, 96, 96).transpose(2, 3).contiguous()  # column-major -> (N, 3, H, W)

    def y(f):
        return torch.frombuffer(bytearray(open(os.path.join(d, f), "rb").read()), dtype=torch.uint8).long() - 1
    return {"train": (x("train_X.bin"), y("train_y.bin")), "test": (x("test_X.bin"), y("test_y.bin")),
            "unlabeled": (x("unlabeled_X.bin"), None)}


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _load_image(path, size):
    """An image file -> uint8 (3, size, size): shorter side resized to size (bicubic), centre-cropped; None if
    the file cannot be read."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            s = size / min(im.size)
            im = im.resize((max(size, round(im.size[0] * s)), max(size, round(im.size[1] * s))), Image.BICUBIC)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    except Exception:
        return None  # unreadable file: skipped and counted


def _read_folder(root, size, workers):
    """Class-subfolder images, resized (shorter side) and centre-cropped to size: {split: (x, y)}, classes.

    Uses root/train and root/val when present, else holds out every 10th file of each class for testing."""
    from concurrent.futures import ThreadPoolExecutor
    exts = IMAGE_EXTS
    if not os.path.isdir(root):
        raise UsageError(f"--data-dir {root}: the image folder does not exist (for --dataset folder, point "
                         "--data-dir at a folder of class subfolders)")
    splits = {s: os.path.join(root, s) for s in ("train", "val")} if os.path.isdir(os.path.join(root, "train")) \
        else {"train": root, "val": root}
    classes = sorted(c for c in os.listdir(splits["train"]) if os.path.isdir(os.path.join(splits["train"], c)))
    if not classes:
        raise UsageError(f"--data-dir {splits['train']} has no class subfolders (--dataset folder expects "
                         "DIR/class_name/image files, optionally under DIR/train and DIR/val)")

    out, skipped = {}, 0
    for split, d in splits.items():
        items = []
        for ci, c in enumerate(classes):
            files = sorted(f for f in os.listdir(os.path.join(d, c)) if f.lower().endswith(exts)) \
                if os.path.isdir(os.path.join(d, c)) else []
            if d == root:  # no train/val folders: a fixed 90/10 split
                files = [f for i, f in enumerate(files) if (i % 10 == 9) == (split == "val")]
            items += [(os.path.join(d, c, f), ci) for f in files]
        with ThreadPoolExecutor(max(1, workers)) as ex:
            imgs = list(ex.map(lambda p: _load_image(p, size), [p for p, _ in items]))
        keep = [i for i, im in enumerate(imgs) if im is not None]
        skipped += len(items) - len(keep)
        if not keep:
            raise UsageError(f"--data-dir {d}: no readable images in its {split} part ({len(items)} image "
                             "file(s) found, all unreadable)" if items else f"--data-dir {d}: its class "
                             f"subfolders hold no image files ({', '.join(exts)}) for the {split} part")
        out[split] = (torch.stack([imgs[i] for i in keep]), torch.tensor([items[i][1] for i in keep]))
    if skipped:
        print(f"warning: skipped {skipped} unreadable image file(s) in {root}")
    return out, classes


def load_data(args):
    """(train_images, knn_train_images, knn_train_labels, test_images, test_labels, test_masks or None).

    Images stay uint8 (N, 3, S, S) at their stored size; crops are resized on the fly. With --gram-hires the
    built-in datasets render, and image folders load, at 2x, so the Gram teacher really sees more detail."""
    name, root = args.dataset, args.data_dir
    size = args.image_size * (2 if args.gram_hires else 1)
    if name == "scenes":
        x, y, _ = make_scenes("train", args.num_images or SCENES_SIZES["train"], size, args.seed)
        xt, yt, mt = make_scenes("test", SCENES_SIZES["test"], size, args.seed)
        return x, x, y, xt, yt, mt
    if name == "textures":
        x, y, _ = make_textures("train", args.num_images, size, args.seed)
        xt, yt, mt = make_textures("test", None, size, args.seed)
        return x, x, y, xt, yt, mt
    if name in ("cifar10", "cifar100"):
        d = _read_cifar(root, name)
        (x, y), (xt, yt) = d["train"], d["test"]
        return x[:args.num_images], x, y, xt, yt, None
    if name == "stl10":
        d = _read_stl10(root)  # self-supervised training on unlabeled + train, k-NN on train -> test
        x = torch.cat([d["unlabeled"][0], d["train"][0]])
        return x[:args.num_images], d["train"][0], d["train"][1], d["test"][0], d["test"][1], None
    if name == "imagenette":
        folder = os.path.join(root, "imagenette2-160")
        if not os.path.isdir(folder):
            _fetch("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz", root)
        root = folder
    d, _ = _read_folder(root, size, args.workers)
    (x, y), (xt, yt) = d["train"], d["val"]
    return x[:args.num_images], x, y, xt, yt, None


# -----------------------------------------------------------------------------------------------
# 12. Command line
# -----------------------------------------------------------------------------------------------

# Experiment presets for the two failures at small scale: named flag sets, filled in before the other
# defaults, so a flag given on the command line still wins.
PRESETS = {
    # storage: the default run as a plain ViT without registers, its instruments logged every epoch; add
    # `--registers 4` (or 1, 2) for the fix. Artifacts are tokens the blocks have written several times their
    # embedding's norm into; LayerScale off, a 2.5x lr and no layer decay let the blocks write that much.
    "artifacts": dict(registers=0, eval_every=1, layerscale=0.0, lr=1e-2, layer_decay=1.0),
    # signal: the same free-writing setting with the default 4 registers (so storage is not the question),
    # where the patches' similarity maps lose locality over training. Add `--gram --gram-teacher-epoch 1
    # --gram-start 1` for the fix, `--ibot-weight 0` for the global objective alone.
    "collapse": dict(layerscale=0.0, lr=1e-2, layer_decay=1.0, eval_every=1),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line and a pointer to --help instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: ...)" as it would be typed, only where the text does not give the default itself."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or isinstance(d, bool) or d is argparse.SUPPRESS or "Default" in action.help:
            return action.help
        return f"{action.help} (default: {' '.join(map(str, d)) if isinstance(d, (tuple, list)) else d})"


def get_args_parser():
    p = ArgumentParser(
        "dinov3_mini", description="DINOv3 in one file: registers, RoPE, DINO + iBOT + KoLeo + Gram anchoring.",
        usage="python dinov3_mini.py [options]", formatter_class=HelpFormatter)
    group = {name: p.add_argument_group(name) for name in (
        "model", "data", "augmentation", "recipe and losses", "Gram anchoring", "schedule and optimiser",
        "run and output", "modes (instead of training)")}
    a = group["recipe and losses"].add_argument
    a("--preset", default=None, choices=list(PRESETS), help="A named flag set for the two failure modes. "
      "artifacts: 0 registers, LayerScale off, lr 1e-2, no layer decay, instruments every epoch; collapse: the "
      "same with 4 registers (add --gram ...). Flags given explicitly override it.")
    a = group["data"].add_argument
    a("--dataset", default="textures", choices=DATASETS, help="`textures` and `scenes` are built in and need no "
      "download (textures: one large object whose surface texture is its class, learnable at small scale; "
      "scenes: a small shape among distractors, not learnt at CPU scale); the others download into --data-dir "
      "on first use (`folder`: any folder of class subfolders).")
    a("--data-dir", default="./data", help="Where datasets live or are downloaded to; point it at an existing "
      "copy to skip the download (for `folder`: the folder itself, optionally with train/ and val/).")
    a("--image-size", type=int, default=None, help="Global crop size in pixels (reference 224). Default: the "
      "dataset's native size (scenes, textures, CIFAR 32, STL-10 96, Imagenette 64). A multiple of --patch-size.")
    a = group["augmentation"].add_argument
    a("--local-size", type=int, default=None, help="Local crop size (reference 96 for 224 globals). Default: "
      "half of --image-size, rounded to the patch size. Must be smaller than --image-size.")
    a("--local-crops", type=int, default=6, help="Number of local crops (reference 8). Each adds a short student "
      "forward; 0 trains on global crops only, which learns much slower.")
    a("--global-scale", type=float, nargs=2, default=(0.32, 1.0), help="Area range of global crops (reference "
      "0.32 1.0). A lower minimum makes the task harder and the invariance stronger.")
    a("--local-scale", type=float, nargs=2, default=(0.05, 0.32), help="Area range of local crops (reference "
      "0.05 0.32). Above ~0.4 local and global views overlap so much that the task becomes trivial.")
    a = group["data"].add_argument
    a("--num-images", type=int, default=None, help="Training images: a cap for quick runs; for the generated "
      "`textures` and `scenes`, any number (default 10000).")
    a("--workers", type=int, default=4, help="Threads used to decode image files for `folder`/`imagenette`.")
    a = group["model"].add_argument
    a("--model", default="nano", choices=list(MODELS), help="Preset: nano (64-d, 6 layers, 2 heads; CPU), "
      "tiny (192-d, 12 layers, 3 heads), small (384-d, 12, 6), base (768-d, 12, 12).")
    a("--dim", type=int, default=None, help="Override the preset's width.")
    a("--depth", type=int, default=None, help="Override the preset's number of blocks.")
    a("--heads", type=int, default=None, help="Override the preset's number of attention heads.")
    a("--patch-size", type=int, default=4, help="Patch size (reference 16 at 224 px; 4 on 32 px images keeps an "
      "8x8 grid). Smaller patches cost quadratically more attention.")
    a("--registers", type=int, default=4, help="Register tokens (DINOv3: 4). 0 is the plain ViT that grows "
      "high-norm artifact tokens; in the registers paper one register already removes them.")
    a("--layerscale", type=float, default=None, help="LayerScale init (reference 1e-5); 0 disables LayerScale. "
      "Default: 1e-5, but 0.1 for nano (CaiT's value for depth <= 18): at 1e-5 a shallow net's CLS outputs start "
      "almost identical across images, so the first Sinkhorn targets are uniform.")
    a("--drop-path", type=float, default=None, help="Stochastic depth on the student (reference 0.1-0.4 by "
      "size). Default 0 for nano, 0.1 otherwise.")
    a("--rope-rescale", type=float, default=2.0, help="Train-time RoPE box jitter: coordinates rescaled by a "
      "log-uniform factor in [1/x, x] (DINOv3: 2). 1 disables it.")
    a("--rope-shift", type=float, default=0.0, help="Train-time RoPE coordinate shift, uniform in [-x, x] "
      "(off in DINOv3's released config).")
    a("--rope-jitter", type=float, default=1.0, help="Train-time per-axis RoPE scale jitter, log-uniform in "
      "[1/x, x] (off = 1, as in the released config).")
    a = group["recipe and losses"].add_argument
    a("--prototypes", type=int, default=None, help="K, the number of prototypes of both heads (reference "
      "65536 on ImageNet; here 4096, nano 1024). Small data converges faster with 1k-8k; too few caps what the "
      "features can separate.")
    a("--head-hidden", type=int, default=None, help="Hidden width of the DINO/iBOT heads (reference 2048; "
      "nano 256, to stay fast on a CPU).")
    a("--head-bottleneck", type=int, default=256, help="Bottleneck width before the prototypes (reference 256).")
    a("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True, help="L2-normalise the "
      "prototypes, so logits are cosines (DINO/DINOv2; DINOv3's code: --no-norm-last-layer). On by default: "
      "with small heads and short runs it gives the teacher less flat targets at the start.")
    a("--student-temp", type=float, default=0.1, help="Student softmax temperature (reference 0.1).")
    a("--teacher-temp", type=float, default=0.07, help="Final teacher temperature (reference 0.07). Above "
      "~0.07 training becomes unstable; lower it (0.04) if the teacher entropy stays high.")
    a("--warmup-teacher-temp", type=float, default=0.04, help="Initial teacher temperature (reference 0.04).")
    a("--teacher-temp-warmup-epochs", type=int, default=None, help="Linear warmup of the teacher temperature "
      "(reference 30 of 100 epochs). Default: 30%% of --epochs.")
    a("--ibot-weight", type=float, default=1.0, help="Weight of the iBOT masked-patch loss (reference 1.0). "
      "0 leaves only the global objective, which degrades dense features faster.")
    a("--koleo-weight", type=float, default=0.1, help="Weight of the KoLeo spreading loss on the student CLS "
      "(reference 0.1). Much higher fights the DINO loss and slows convergence.")
    a("--mask-ratio", type=float, nargs=2, default=(0.1, 0.5), help="iBOT mask ratios, spread over the masked "
      "crops (reference 0.1 0.5).")
    a("--mask-prob", type=float, default=0.5, help="Fraction of global crops that are masked (reference 0.5).")
    a = group["Gram anchoring"].add_argument
    a("--gram", action="store_true", help="Turn on Gram anchoring (DINOv3 Sec. 4): match the patch-similarity "
      "structure of a frozen earlier teacher.")
    a("--gram-weight", type=float, default=2.0, help="Gram loss weight (reference 2.0), ramped in by a cosine.")
    a("--gram-start", type=int, default=None, help="Epoch at which the Gram loss starts (DINOv3: after 1M "
      "iterations, when dense features have degraded). Default: --gram-teacher-epoch.")
    a("--gram-teacher-epoch", type=int, default=None, help="Epoch whose EMA teacher becomes the Gram teacher "
      "(DINOv3: an early one, 100k-200k iterations; a late one is worse). Default: 25%% of --epochs.")
    a("--gram-teacher", default=None, help="Path of a checkpoint whose teacher backbone is the Gram teacher "
      "(instead of a snapshot taken during this run).")
    a("--gram-refresh-every", type=int, default=0, help="Refresh the Gram teacher from the EMA teacher every k "
      "epochs after --gram-start (reference: every 10k iterations); 0 never.")
    a("--gram-refresh-max", type=int, default=3, help="At most this many refreshes, then frozen (reference 3).")
    a("--gram-ramp-epochs", type=float, default=1.0, help="Cosine ramp-in of the Gram weight (and ramp-down of "
      "the local DINO weight), in epochs (reference: 1k iterations).")
    a("--gram-local-weight", type=float, default=0.5, help="Weight of the local-crop DINO loss in the Gram phase, "
      "reached on the same cosine as the Gram weight (reference 0.5, `reweight_dino_local_loss`); 1 turns it off.")
    a("--gram-momentum", type=float, default=0.999, help="EMA teacher momentum in the Gram phase (reference "
      "0.999 constant); 0 keeps the ordinary cosine schedule.")
    a("--untie-local-norm", action=argparse.BooleanOptionalAction, default=None, help="Give local crops' CLS "
      "and registers their own final LayerNorm in training (DINOv3's untie_global_and_local_cls_norm). "
      "Default: on with --gram, off otherwise.")
    a("--gram-hires", action="store_true", help="Give the Gram teacher the same crop at 2x resolution without "
      "colour distortion, and bicubic-downsample its patch features to the student's grid (DINOv3 Sec. 4.3).")
    a = group["schedule and optimiser"].add_argument
    a("--epochs", type=int, default=3, help="Training epochs (reference 100 on ImageNet-scale data). The two "
      "failure modes need long runs; the default is sized for a 10-minute CPU demo.")
    a("--batch-size", type=int, default=64, help="Global batch size (reference 1024+); the lr scales with "
      "sqrt(batch/1024). Sinkhorn-Knopp needs batch >> 1 to spread mass over prototypes.")
    a("--lr", type=float, default=4e-3, help="Base lr for a batch of 1024, scaled by sqrt(batch/1024) (DINOv2 "
      "reference 4e-3). Too high and the DINO loss sticks at ln K (collapse).")
    a("--min-lr", type=float, default=1e-6, help="Final lr of the cosine decay (reference 1e-6).")
    a("--warmup-epochs", type=int, default=None, help="Linear lr warmup (reference 10 of 100 epochs). "
      "Default: 10%% of --epochs, at least 1.")
    a("--weight-decay", type=float, nargs=2, default=(0.04, 0.4), help="Weight decay, cosine from first to "
      "second value (reference 0.04 0.4).")
    a("--layer-decay", type=float, default=0.9, help="Layer-wise lr decay (reference 0.9; patch embedding gets "
      "a further x0.2). 1 turns it off.")
    a("--momentum", type=float, nargs=2, default=(0.992, 1.0), help="EMA teacher momentum, cosine from first "
      "to second value (reference 0.992 1.0). Too low and the teacher chases the student into collapse.")
    a("--clip-grad", type=float, default=3.0, help="Gradient norm clipping (reference 3.0); 0 disables.")
    a("--freeze-last-layer-epochs", type=int, default=1, help="Epochs during which the prototypes are frozen "
      "(reference 1), a stabiliser from DINO.")
    a = group["run and output"].add_argument
    a("--eval-every", type=int, default=4, help="Run k-NN every this many epochs (and always at the end).")
    a("--keep-teachers", action="store_true", help="At every evaluation also keep the EMA teacher's backbone as "
      "teachers/epochE.pt in --out-dir (for --analyze along the run, or as a --gram-teacher taken at a dense peak).")
    a("--knn-k", type=int, default=20, help="k of the weighted k-NN (reference 20).")
    a("--knn-temp", type=float, default=0.07, help="Temperature of the k-NN vote weights (reference 0.07).")
    a("--out-dir", default="out", help="Where checkpoint.pt, log.jsonl and summary.json go.")
    a("--resume", action="store_true", help="Continue the run in --out-dir exactly where it stopped.")
    a("--overwrite", action="store_true", help="Allow starting a fresh run in an --out-dir that holds one.")
    a("--device", default="auto", help="auto picks cuda, then mps, then cpu; or name one.")
    a("--compile", action="store_true", help="torch.compile the student and teacher (GPU; slow to start).")
    a("--seed", type=int, default=0, help="Seed of everything: data order, augmentation, init.")
    a("--log-every", type=int, default=10, help="Log one line to log.jsonl every this many steps.")
    a("--no-progress", action="store_true", help="No tqdm bar (for logs and CI).")
    a("--analyze-images", type=int, default=1000, help="Test images the instruments read, at each evaluation "
      "and in --analyze (half train the dense probe, half score it).")
    a = group["modes (instead of training)"].add_argument
    a("--analyze", metavar="RUN_DIR_OR_CHECKPOINT", default=None, help="Instead of training: measure a trained "
      "teacher (token norms and outliers, attention, PCA/similarity maps, dense probe) and write analysis/*.png "
      "and analysis/metrics.json next to its checkpoint. Or a released backbone, on photographs: dinov2_vit{s,b,l}14 "
      "and their _reg versions (downloaded once), dinov3_vit{s,b,l}16 with --weights, or a weights file.")
    a("--weights", metavar="PATH", default=None, help="With --analyze NAME: the released weights from a local file "
      "(downloaded elsewhere, or DINOv3's after its licence form) instead of the download.")
    a("--images", metavar="DIR", default=None, help="With --analyze of a released model: your own photos (every "
      "image file under DIR, up to --analyze-images) instead of matplotlib's sample photo of Grace Hopper.")
    a("--plot-log", metavar="RUN_DIR", default=None, help="Instead of training: plot RUN_DIR/log.jsonl (k-NN, "
      "dense mIoU, outlier fraction, collapse signatures vs epoch) into RUN_DIR/analysis/log.png.")
    return p


def parse_args(parser, argv=None):
    """argv -> resolved args. A --preset's flag set becomes the defaults first, so explicit flags still win."""
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return resolve_args(args, parser)


def resolve_args(args, parser):
    """Fill the defaults that depend on other options, and refuse bad input with an argparse error (exit 2)."""
    preset = MODELS[args.model]
    for k in ("dim", "depth", "heads", "head_hidden", "prototypes"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    native = {"scenes": 32, "textures": 32, "cifar10": 32, "cifar100": 32, "stl10": 96, "imagenette": 64, "folder": 64}
    if args.analyze and args.image_size is None:  # a released model's photos (a run of this file uses its own size)
        args.image_size = 448  # a 32 x 32 grid at patch 14, 28 x 28 at patch 16
    args.image_size = args.image_size or native[args.dataset]
    if args.local_size is None:
        args.local_size = max(args.patch_size, (args.image_size // 2) // args.patch_size * args.patch_size)
    if args.layerscale is None:
        args.layerscale = 0.1 if args.model == "nano" else 1e-5
    if args.drop_path is None:
        args.drop_path = 0.0 if args.model == "nano" else 0.1
    args.warmup_epochs = max(1, round(0.1 * args.epochs)) if args.warmup_epochs is None else args.warmup_epochs
    if args.teacher_temp_warmup_epochs is None:
        args.teacher_temp_warmup_epochs = max(1, round(0.3 * args.epochs))
    if args.gram_teacher_epoch is None:
        args.gram_teacher_epoch = max(1, args.epochs // 4)
    if args.gram_start is None:
        args.gram_start = args.gram_teacher_epoch
    if args.untie_local_norm is None:
        args.untie_local_norm = args.gram
    errors = []
    if args.patch_size <= 0 or args.image_size % args.patch_size or args.local_size % args.patch_size:
        errors.append(f"--image-size {args.image_size} and --local-size {args.local_size} must both be positive "
                      f"multiples of --patch-size {args.patch_size} (the ViT cuts images into whole patches)")
    if args.local_size >= args.image_size:
        errors.append(f"--local-size {args.local_size} must be smaller than --image-size {args.image_size} "
                      "(local crops are the small views of multi-crop)")
    if args.registers < 0:
        errors.append(f"--registers must be 0 or more, got {args.registers}")
    if args.local_crops < 0:
        errors.append(f"--local-crops must be 0 or more, got {args.local_crops}")
    if args.dim % args.heads or (args.dim // args.heads) % 4:
        errors.append(f"--dim {args.dim} must divide into --heads {args.heads} heads whose width is a multiple "
                      "of 4 (axial RoPE splits each head into 4 parts)")
    for name in ("global_scale", "local_scale", "mask_ratio"):
        lo, hi = getattr(args, name)
        if not 0 <= lo <= hi <= 1:
            errors.append(f"--{name.replace('_', '-')} must be two numbers with 0 <= low <= high <= 1, got {lo} {hi}")
    if not 0 <= args.mask_prob <= 1:
        errors.append(f"--mask-prob must be a probability in [0, 1], got {args.mask_prob}")
    for name in ("epochs", "batch_size", "prototypes", "eval_every", "log_every"):
        if getattr(args, name) <= 0:
            errors.append(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.gram_local_weight < 0 or not 0 <= args.gram_momentum < 1:
        errors.append(f"--gram-local-weight must be 0 or more and --gram-momentum in [0, 1), got "
                      f"{args.gram_local_weight} and {args.gram_momentum}")
    if (args.weights or args.images) and not args.analyze:
        errors.append("--weights and --images go with --analyze NAME (a released model, e.g. dinov2_vitl14)")
    if args.num_images is not None and args.num_images <= 0:
        errors.append(f"--num-images must be positive, got {args.num_images}")
    if args.gram and args.gram_teacher is None and args.gram_teacher_epoch >= args.epochs:
        errors.append(f"--gram-teacher-epoch {args.gram_teacher_epoch} must come before the end of training "
                      f"(--epochs {args.epochs})")
    if errors:
        parser.error("; ".join(errors) + ".")
    return args


def finished_run(out_dir, args):
    """The summary of the finished run in out_dir if its checkpoint is that run's last step and --epochs asks
    for no more; else None. (summary.json is written only when a run ends.)"""
    path = os.path.join(out_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    done = summary.get("steps") == load_checkpoint(os.path.join(out_dir, "checkpoint.pt"), args)["step"]
    return summary if done and args.epochs <= summary["config"]["epochs"] else None


def main(argv=None):
    t_start = time.time()  # the reported wall time is what the user waited: setup, training, evaluation
    parser = get_args_parser()
    args = parse_args(parser, argv)
    try:
        if args.analyze or args.plot_log:
            if args.plot_log:
                print(f"wrote {plot_log(args.plot_log)}")
            return analyze_command(args) if args.analyze else None
        ck = os.path.join(args.out_dir, "checkpoint.pt")
        if os.path.exists(ck) and not (args.resume or args.overwrite):
            parser.error(f"{args.out_dir} already holds a run (checkpoint.pt). Add --resume to continue it, "
                         "--overwrite to start again in its place, or choose another --out-dir.")
        if args.resume and not os.path.exists(ck):
            parser.error(f"--resume: there is no checkpoint.pt in {args.out_dir} to continue from.")
        done = finished_run(args.out_dir, args) if args.resume else None
        if done is not None:
            print(f"{args.out_dir} holds a complete run ({done['config']['epochs']} epochs, step {done['steps']}, "
                  f"k-NN accuracy {done['knn_acc']:.4f}); nothing was changed. To train it further, raise --epochs "
                  f"above {done['config']['epochs']} and --resume again.")
            return done
        return train(args, t_start)
    # a user's mistake or a missing file: one paragraph and a non-zero exit, never a traceback
    except KeyboardInterrupt:  # during setup or an analysis (the training loop itself saves and exits on Ctrl-C)
        print("interrupted" + ("." if args.analyze or args.plot_log else
                               f" before the first training step; nothing was written to {args.out_dir}."),
              file=sys.stderr)
        sys.exit(130)
    except UsageError as e:
        parser.error(str(e))
    except CheckpointError as e:
        print(f"error: cannot use the checkpoint: {e}. Nothing was overwritten.", file=sys.stderr)
        sys.exit(2)
    except WeightsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except DataUnavailable as e:
        print(f"error: the data of the analysed run could not be loaded: {e}." if args.analyze else
              f"error: the {args.dataset} data could not be loaded: {e}. This machine may have no network. "
              f"`--dataset textures` and `--dataset scenes` are built in and need no download; or point "
              f"--data-dir at an existing copy (for cifar10, the folder that holds cifar-10-batches-py/; for "
              f"stl10, stl10_binary/; for imagenette, imagenette2-160/; for folder, the image folder itself).",
              file=sys.stderr)
        sys.exit(1)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
