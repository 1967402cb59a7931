"""A miniature screen for the storage failure: a tiny ViT, no LayerScale, trained with labels on a task that needs
global aggregation over images whose background is one flat colour. Does it recycle background tokens into
high-norm stores (Darcet et al. 2023), and do registers take that role over?

The task: an 8 x 8 grid of 4 px patches on a flat background; k of the patches hold a target (a hollow square in
another colour; k = 1..8, the label is k - 1), and with --distractors D, 0..D more hold a solid square of the same
colour that must not be counted (then k = 0..7). Every batch is freshly drawn (no data set, no augmentation).

Why background tokens: on a flat background every background patch embeds to the same vector up to its position,
so a background token that ends up 3x the norm of the others was made so by the blocks, not by its pixels. The
screen therefore reads the norms of the background tokens alone, layer by layer (max / median over the evaluation
images; 1.0 at the embedding would mean identical tokens; different images have different background colours,
so the embedding's ratio is ~2), the outlier rule of dinov3_mini on them, and the CLS attention they receive.

    python bench/storage_miniature.py --steps 2500                 # 0 registers (about 10 min on one CPU thread)
    python bench/storage_miniature.py --steps 2500 --registers 4
    python bench/storage_miniature.py --steps 2000 --distractors 6

Prints one JSON line per evaluation. A screen, not a result of the recipe: never read it as DINO's behaviour.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dinov3_mini as dm  # noqa: E402


def counting_images(n, gen, size=32, patch=4, max_objects=8, distractors=0):
    """(n,3,S,S) uint8 images, labels (n,), object masks (n,S,S) of the counting task above."""
    g = size // patch
    bg = torch.rand(n, 3, 1, 1, generator=gen)
    fg = (bg + 0.35 + 0.3 * torch.rand(n, 3, 1, 1, generator=gen)) % 1.0  # far from the background in each channel
    lo = 0 if distractors else 1
    k = torch.randint(lo, max_objects + lo, (n,), generator=gen)
    d = torch.randint(0, distractors + 1, (n,), generator=gen)
    rank = torch.rand(n, g * g, generator=gen).argsort(1).argsort(1)  # a random order of the patches
    up = lambda on: F.interpolate(on.view(n, 1, g, g).float(), scale_factor=patch, mode="nearest")  # noqa: E731
    target, other = up(rank < k[:, None]), up((rank >= k[:, None]) & (rank < (k + d)[:, None]))
    if distractors:  # targets become hollow squares, distractors stay solid
        u = torch.arange(size) % patch
        rim = (u[:, None] == 0) | (u[:, None] == patch - 1) | (u[None] == 0) | (u[None] == patch - 1)
        target = target * rim.float()
    m = (target + other).clamp(max=1)
    img = bg * (1 - m) + fg * m
    return (img * 255).round().to(torch.uint8), k - lo, m[:, 0].long()


@torch.no_grad()
def background_instruments(vit, x, masks, registers):
    """Norms of the background tokens through depth, and where the CLS looks, from dinov3_mini's collect_tokens."""
    tok = dm.collect_tokens(vit, x, x.shape[-1], "cpu")
    R, grid = registers, tok["grid"][0]
    lab = dm.patch_labels(masks, grid)  # (N, P): 0 background
    norms = tok["norms"][:, :, 1 + R:]  # (depth+1, N, P)
    bg = norms[:, lab == 0]  # (depth+1, n_background)
    med = bg.median(1).values
    out = {"bg_max_over_median": (bg.max(1).values / med).tolist(),
           "object_over_bg_median": (norms[:, lab > 0].median(1).values / med).tolist(),
           "cls_over_bg_median": (tok["norms"][:, :, 0].median(1).values / med).tolist(),
           "bg_outlier_fraction": [dm.find_outliers(b[None])[0].float().mean().item() for b in bg]}
    cls_attn = tok["attn"].mean(1)  # (N, T): last layer, mean over heads
    out["cls_attention_on_background"] = (cls_attn[:, 1 + R:] * (lab == 0)).sum(1).mean().item()
    out["cls_attention_on_registers"] = cls_attn[:, 1:1 + R].sum(1).mean().item() if R else None
    if R:
        out["register_over_bg_median"] = (tok["norms"][:, :, 1:1 + R].flatten(1).median(1).values / med).tolist()
    return out


def r3(v):
    return [round(u, 3) for u in v] if isinstance(v, list) else round(v, 3) if isinstance(v, float) else v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--registers", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW, 200 steps of linear warm-up, then constant")
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--distractors", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    vit = dm.ViT(image_size=32, patch_size=4, dim=a.dim, depth=a.depth, heads=a.heads, num_registers=a.registers,
                 layerscale=0.0, rope_jitter=1.0, rope_rescale=1.0)
    head = nn.Linear(a.dim, 8)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.wd)
    xe, ye, me = counting_images(512, torch.Generator().manual_seed(999), distractors=a.distractors)
    t0, losses = time.time(), []
    for it in range(a.steps):
        for gr in opt.param_groups:
            gr["lr"] = a.lr * min(1.0, (it + 1) / 200)
        x, y, _ = counting_images(a.batch, gen, distractors=a.distractors)
        loss = F.cross_entropy(head(vit(dm.normalize(x.float() / 255))["cls"]), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (it + 1) % a.eval_every == 0 or it + 1 == a.steps:
            vit.eval()
            with torch.no_grad():
                acc = (head(vit(next(dm.eval_batches(xe, 32, "cpu", 512)))["cls"]).argmax(1) == ye).float().mean()
            rec = {"step": it + 1, "loss": sum(losses) / len(losses), "test_acc": acc.item(),
                   **background_instruments(vit, xe, me, a.registers), "s": time.time() - t0}
            vit.train()
            print(json.dumps({k: r3(v) for k, v in rec.items()}), flush=True)
            losses = []


if __name__ == "__main__":
    main()
