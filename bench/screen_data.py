"""Screen candidate built-in datasets: can a nano ViT learn the class at all, and do raw pixels or a
random-init ViT already solve it? Then (--ssl) the default self-supervised recipe on the best ones.

    python bench/screen_data.py                       # supervised screen + baselines of every candidate
    python bench/screen_data.py --only shapes glyphs  # some of them
    python bench/screen_data.py --ssl shapes --epochs 10 --eval-every 1 --out-dir runs/screen/shapes
    python bench/screen_data.py --picture assets/textures.png  # the chosen dataset, drawn (README picture)

Candidates (10 classes, one object filling most of a 32 px frame, random colours, background, rotation,
scale and position; per-pixel masks 0 = background, label + 1 = the object):
  scenes    the existing dataset (small object among distractors), for reference
  shapes    class = one shape AND one surface texture (disk with stripes, square with checker, ...)
  textures  class = the texture alone, on a random shape
  glyphs    class = a letter, rendered bold in one of several fonts (DejaVu/STIX, shipped with matplotlib)
  fractals  class = an iterated function system (FractalDB), rendered bold (dilated), a few variants each;
            not screened: finding ten categories (sequential chaos game) is too slow for "10,000 images in seconds"
Screen (OMP_NUM_THREADS=1): render time, k-NN (k=20) on raw pixels and on a random-init nano ViT, and a
supervised nano ViT (the file's ViT + a linear head on CLS) trained --sup-steps steps on augmented global
crops (the recipe's multicrop), tested on clean test images.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import dinov3_mini as dm  # noqa: E402

SIZES = {"train": 10000, "test": 2000}


def _grid(n, size):
    t = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(t, t, indexing="ij")
    return x.expand(n, size, size), y.expand(n, size, size)


def _background(g, n, x, y):
    """Low-detail background: flat (50%) or a linear gradient between two random colours. (n,3,S,S), c1."""
    U = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    c1, c2 = U(n, 3, 1, 1), U(n, 3, 1, 1)
    th = U(n, 1, 1) * 2 * math.pi
    proj = ((x - 0.5) * torch.cos(th) + (y - 0.5) * torch.sin(th) + 0.5).clamp(0, 1)
    mix = torch.where(U(n, 1, 1) < 0.5, torch.zeros_like(x), proj)
    return c1 + (c2 - c1) * mix[:, None], c1


def _object_coords(g, n, x, y, scale=(0.36, 0.48), rot=math.pi):
    """Object frame: centre 0.5 +- 0.1, half-size `scale` of the frame, rotation +-rot, aspect 0.85-1.15."""
    U = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    cx, cy = 0.5 + 0.2 * (U(n) - 0.5), 0.5 + 0.2 * (U(n) - 0.5)
    s = scale[0] + (scale[1] - scale[0]) * U(n)
    ang = (2 * U(n) - 1) * rot
    aspect = 0.85 + 0.3 * U(n)
    e = lambda t: t[:, None, None]  # noqa: E731
    dx, dy = (x - e(cx)) / e(s), (y - e(cy)) / e(s)
    ca, sa = e(torch.cos(ang)), e(torch.sin(ang))
    return (ca * dx + sa * dy) * e(aspect), (-sa * dx + ca * dy) / e(aspect), (cx, cy, s, ang)


TEXTURES = ("stripes", "checker", "dots", "rings", "grid", "chevron", "pinwheel", "waves", "blobs", "plain")


def texture(cls, u, v, g, freq=(2.2, 3.5)):
    """Two-tone texture `cls` (n,) on object coordinates u, v (n,S,S): 0/1 pattern (n,S,S)."""
    n = u.shape[0]
    f = (freq[0] + (freq[1] - freq[0]) * torch.rand(n, 1, 1, generator=g)) * math.pi  # periods across the object
    r, phi = torch.sqrt(u ** 2 + v ** 2), torch.atan2(v, u)
    su, sv = torch.sin(f * u), torch.sin(f * v)
    low = F.interpolate(torch.randn(n, 1, 5, 5, generator=g), size=u.shape[-1], mode="bicubic", align_corners=False)[:, 0]
    pats = torch.stack([
        su > 0,                                                        # stripes
        (su > 0) ^ (sv > 0),                                           # checker
        torch.cos(f * u) * torch.cos(f * v) > 0.35,                    # dots
        torch.sin(1.3 * f * r) > 0,                                    # concentric rings
        (su.abs() < 0.45) | (sv.abs() < 0.45),                         # grid lines
        torch.sin(f * (v + u.abs())) > 0,                              # chevrons
        torch.sin(5 * phi) > 0,                                        # pinwheel sectors
        torch.sin(f * u + 2.2 * torch.sin(0.8 * f * v)) > 0,           # wavy stripes
        low > 0.3,                                                     # blobs (smooth random noise)
        torch.zeros_like(u, dtype=torch.bool),                         # plain
    ]).float()
    return pats[cls, torch.arange(n)]


def _finish(img, inside, labels, g, obj_colour_fn):
    """Paint the object, add a little noise; returns uint8 images, labels, masks."""
    obj = obj_colour_fn()
    img = torch.where(inside[:, None], obj, img)
    img = (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    masks = torch.where(inside, labels[:, None, None] + 1, 0).to(torch.uint8)
    return (img * 255).round().to(torch.uint8), labels, masks


def _two_tone(g, n, c_bg, pat):
    """Object colours: a random colour kept away from the background, and a second one of another
    brightness; the texture pattern (n,S,S) mixes them."""
    col = torch.rand(n, 3, 1, 1, generator=g)
    col = torch.where((col - c_bg).abs().mean(1, keepdim=True) < 0.25, 1 - col, col)
    col2 = torch.rand(n, 3, 1, 1, generator=g)
    col2 = torch.where((col2 - col).abs().mean(1, keepdim=True) < 0.3, 1 - col2, col2)
    return col + (col2 - col) * pat[:, None]


def make_shapes(split, n, size=32, seed=0, texture_only=False, freq=(2.2, 3.5)):
    g = torch.Generator().manual_seed(seed * 1_000_003 + {"train": 0, "test": 500_000}[split] + 77)
    x, y = _grid(n, size)
    img, c1 = _background(g, n, x, y)
    labels = torch.randint(10, (n,), generator=g)
    u, v, _ = _object_coords(g, n, x, y)
    shape = torch.randint(10, (n,), generator=g) if texture_only else labels
    inside = dm.shape_mask(shape, u, v)
    pat = texture(labels, u, v, g, freq)
    return _finish(img, inside, labels, g, lambda: _two_tone(g, n, c1, pat))


def make_textures(split, n, size=32, seed=0):
    """The chosen candidate, now dinov3_mini.make_textures; it renders exactly what
    make_shapes(..., texture_only=True) renders (same draws in the same order), only per class and in chunks."""
    return dm.make_textures(split, n, size, seed)


def recolour(c, mode):
    """Colours (n,3,1,1) in [0,1] under a palette mode: "colour" unchanged, "muted" a quarter of the saturation,
    "grey" the channel mean."""
    m = c.mean(1, keepdim=True)
    return {"colour": c, "muted": m + 0.25 * (c - m), "grey": m.expand_as(c)}[mode]


def make_textures_palette(split, n, size=32, seed=0, mode="grey"):
    """dinov3_mini.make_textures with the colours under a palette `mode` (the same draws in the same order,
    so the same objects, patterns and positions; "colour" is bit-identical to the built-in). In the built-in,
    every image has its own three random colours: an instance cue that two crops of one image share and that
    says nothing about the class, which DINO's image objective picks up first."""
    d = dm.texture_draws(split, size, seed, palette=lambda c: recolour(c, mode))
    if mode == "grey":
        d["pixel_noise"] = d["pixel_noise"][:, :1].expand_as(d["pixel_noise"])
    x, masks = dm.render_textures(d, slice(0, n), size)
    return x, d["labels"][:n], masks


GLYPHS = "AEGKMRSWXZ"
FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans-BoldOblique.ttf",
         "DejaVuSerif-BoldItalic.ttf", "STIXGeneralBol.ttf")


def glyph_templates(res=64):
    """(classes, fonts, res, res) float masks of each letter in each font, centred, filling ~80% of the box."""
    from PIL import Image, ImageDraw, ImageFont
    import matplotlib
    d = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    out = torch.zeros(len(GLYPHS), len(FONTS), res, res)
    for j, fname in enumerate(FONTS):
        font = ImageFont.truetype(os.path.join(d, fname), size=res)
        for i, ch in enumerate(GLYPHS):
            im = Image.new("L", (2 * res, 2 * res), 0)
            ImageDraw.Draw(im).text((res // 2, res // 4), ch, fill=255, font=font)
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(2 * res, 2 * res).float() / 255
            ys, xs = (t > 0.5).nonzero(as_tuple=True)
            t = t[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            h, w = t.shape
            side = max(h, w)
            t = F.pad(t, ((side - w) // 2, side - w - (side - w) // 2, (side - h) // 2, side - h - (side - h) // 2))
            out[i, j] = F.interpolate(t[None, None], size=res, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    return out


def _warp(templates, idx, g, n, size, scale=(0.32, 0.45), rot=math.radians(30)):
    """Place templates[idx] (T,R,R) into (n,S,S): centre 0.5 +- 0.1, half-size `scale`, rotation +-rot, flips."""
    U = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    cx, cy = 0.2 * (U(n) - 0.5) * 2, 0.2 * (U(n) - 0.5) * 2  # in [-1,1] units
    s = (scale[0] + (scale[1] - scale[0]) * U(n)) * 2
    ang = (2 * U(n) - 1) * rot
    ca, sa = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = ca / s, sa / s
    theta[:, 1, 0], theta[:, 1, 1] = -sa / s, ca / s
    theta[:, 0, 2] = -(theta[:, 0, 0] * cx + theta[:, 0, 1] * cy)
    theta[:, 1, 2] = -(theta[:, 1, 0] * cx + theta[:, 1, 1] * cy)
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    return F.grid_sample(templates[idx][:, None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


_GLYPH_T = None


def make_glyphs(split, n, size=32, seed=0):
    global _GLYPH_T
    if _GLYPH_T is None:
        _GLYPH_T = glyph_templates()
    g = torch.Generator().manual_seed(seed * 1_000_003 + {"train": 0, "test": 500_000}[split] + 99)
    x, y = _grid(n, size)
    img, c1 = _background(g, n, x, y)
    labels = torch.randint(10, (n,), generator=g)
    font = torch.randint(len(FONTS), (n,), generator=g)
    T = _GLYPH_T.flatten(0, 1)
    a = _warp(T, labels * len(FONTS) + font, g, n, size)
    inside = a > 0.5
    col = torch.rand(n, 3, 1, 1, generator=g)
    col = torch.where((col - c1).abs().mean(1, keepdim=True) < 0.25, 1 - col, col)
    return _finish(img, inside, labels, g, lambda: col.expand(-1, -1, size, size))


def ifs_systems(seed=0, classes=10, maps=(2, 3, 4), pool=120):
    """FractalDB-style categories: random affine maps (w_i: 2x2 + shift) with probabilities ~|det|, kept
    when FractalDB's sigma-factor (sum of singular values) is in range and the attractor covers a fair share
    of its bounding box. Candidates are drawn in pools and filtered together (the chaos game is sequential)."""
    g = torch.Generator().manual_seed(seed + 12345)
    out = []
    while len(out) < classes:
        for k in maps:
            A = torch.rand(pool, k, 2, 2, generator=g) * 2 - 1
            b = torch.rand(pool, k, 2, generator=g) * 2 - 1
            sv = torch.linalg.svdvals(A)  # (pool, k, 2)
            sigma = sv.sum((1, 2))
            ok = (sv.amax((1, 2)) < 0.9) & (sigma > 0.9 + 0.5 * (k - 2)) & (sigma < 1.9 + 0.6 * (k - 2))
            A, b = A[ok], b[ok]
            if len(A) == 0:
                continue
            dens = (render_ifs(A, b, 32, 4000, g) > 0).float()
            cov = F.max_pool2d(dens[:, None], 3, 1, 1).mean((1, 2, 3))  # bold at 32 px
            good = ((cov > 0.25) & (cov < 0.6)).nonzero()[:, 0]
            out += [(A[i], b[i]) for i in good[:max(0, (classes + 2) // 3)]]
    return out[:classes]


def render_ifs(A, b, res, n_points, g):
    """Chaos game for V systems at once: A (V,k,2,2), b (V,k,2) -> point densities (V,res,res), fitted
    to their bounding boxes (aspect kept)."""
    V, k = A.shape[:2]
    p = (torch.linalg.det(A).abs() + 1e-3)
    p = p / p.sum(1, keepdim=True)
    pts = torch.zeros(V, 2)
    keep = []
    idx = torch.multinomial(p, n_points + 20, replacement=True, generator=g)  # (V, N)
    Ai, bi = A[torch.arange(V)[:, None], idx], b[torch.arange(V)[:, None], idx]  # (V, N, 2, 2), (V, N, 2)
    for t in range(n_points + 20):
        pts = (Ai[:, t] @ pts[:, :, None])[:, :, 0] + bi[:, t]
        if t >= 20:
            keep.append(pts)
    P = torch.stack(keep, 1)  # (V, N, 2)
    lo, hi = P.min(1, keepdim=True).values, P.max(1, keepdim=True).values
    c, half = (lo + hi) / 2, ((hi - lo).max(-1, keepdim=True).values / 2).clamp_min(1e-6)
    q = ((P - c) / half * 0.95 + 1) / 2 * res  # (V, N, 2) in pixels
    q = q.long().clamp(0, res - 1)
    img = torch.zeros(V, res * res)
    img.scatter_add_(1, q[..., 1] * res + q[..., 0], torch.ones(V, q.shape[1]))
    return img.view(V, res, res)


_FRACTAL_T = {}


def fractal_templates(seed=0, variants=12, res=64):
    """(classes, variants, res, res) bold renderings: each variant scales one map's parameters by 0.8-1.2
    (FractalDB's intra-category variation); dilated so strokes survive 32 px and blur."""
    if seed in _FRACTAL_T:
        return _FRACTAL_T[seed]
    g = torch.Generator().manual_seed(seed + 999)
    systems = ifs_systems(seed)
    out = []
    for A, b in systems:
        k = A.shape[0]
        AA, bb = A.repeat(variants, 1, 1, 1), b.repeat(variants, 1, 1)
        j = torch.randint(k, (variants,), generator=g)
        w = 0.8 + 0.4 * torch.rand(variants, generator=g)
        AA[torch.arange(variants), j] *= w[:, None, None]
        dens = render_ifs(AA, bb, res, 30000, g)
        bold = F.max_pool2d((dens > 0).float()[:, None], 3, 1, 1)[:, 0]  # dilation: 3 px strokes at 64 px
        out.append(bold)
    _FRACTAL_T[seed] = torch.stack(out)
    return _FRACTAL_T[seed]


def make_fractals(split, n, size=32, seed=0):
    T = fractal_templates(0)  # the categories are fixed; images vary with the seed
    g = torch.Generator().manual_seed(seed * 1_000_003 + {"train": 0, "test": 500_000}[split] + 55)
    x, y = _grid(n, size)
    img, c1 = _background(g, n, x, y)
    labels = torch.randint(10, (n,), generator=g)
    var = torch.randint(T.shape[1], (n,), generator=g)
    a = _warp(T.flatten(0, 1), labels * T.shape[1] + var, g, n, size, scale=(0.38, 0.5), rot=math.pi)
    inside = a > 0.4
    col = torch.rand(n, 3, 1, 1, generator=g)
    col = torch.where((col - c1).abs().mean(1, keepdim=True) < 0.25, 1 - col, col)
    return _finish(img, inside, labels, g, lambda: col.expand(-1, -1, size, size))


def make_scenes(split, n, size=32, seed=0):
    return dm.make_scenes(split, n, size, seed)


CANDIDATES = {"scenes": make_scenes, "shapes": make_shapes, "textures": make_textures, "glyphs": make_glyphs,
              "fractals": make_fractals,
              "textures_muted": lambda *a, **k: make_textures_palette(*a, **k, mode="muted"),
              "textures_grey": lambda *a, **k: make_textures_palette(*a, **k, mode="grey")}


def nano_args(name="scenes", extra=()):
    return dm.parse_args(dm.get_args_parser(), ["--dataset", "scenes", *extra])


def supervised(x, y, xt, yt, steps, seed=0, batch=64, lr=1e-3):
    """A nano ViT + linear head on CLS, trained on the recipe's augmented global crops; clean test accuracy."""
    args = nano_args()
    torch.manual_seed(seed)
    vit = dm.build_backbone(args)
    head = nn.Linear(vit.dim, 10)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    args.local_crops = 0
    vit.train()
    for it in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        crops = dm.multicrop(x[idx], gen, **dm.crop_kwargs(args))["globals"][:batch]
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1, (it + 1) / 30) * 0.5 * (1 + math.cos(math.pi * it / steps))
        loss = F.cross_entropy(head(vit(crops)["cls"]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    vit.eval()
    correct = 0
    with torch.no_grad():
        for xb, i in zip(dm.eval_batches(xt, 32, "cpu", 500), range(0, len(xt), 500)):
            correct += (head(vit(xb)["cls"]).argmax(1) == yt[i:i + 500]).sum().item()
    return correct / len(xt)


def screen(name, sup_steps):
    fn = CANDIDATES[name]
    t0 = time.time()
    x, y, mk = fn("train", SIZES["train"])
    t_render = time.time() - t0
    xt, yt, mt = fn("test", SIZES["test"])
    args = nano_args()
    raw = dm.knn_raw_pixels(x, y, xt, yt, args)
    torch.manual_seed(0)
    rnd = dm.knn_random_init(dm.build_backbone(args, student=False), x, y, xt, yt, args, "cpu")["knn_acc_random_init"]
    t1 = time.time()
    sup = supervised(x, y, xt, yt, sup_steps)
    fg = (mk > 0).float().mean().item()
    return dict(name=name, render_s=round(t_render, 2), fg=round(fg, 3), raw=raw, random_init=rnd, supervised=sup,
                sup_s=round(time.time() - t1, 1))


def install(name):
    """Make `--dataset NAME` load candidate NAME inside dinov3_mini (for --ssl screens of candidates that are
    not in the file)."""
    if name in dm.DATASETS:
        return
    fn = CANDIDATES[name]
    dm.DATASETS = dm.DATASETS + (name,)
    orig_load, orig_resolve = dm.load_data, dm.resolve_args

    def load_data(args):
        if args.dataset != name:
            return orig_load(args)
        x, y, _ = fn("train", args.num_images or SIZES["train"], args.image_size, args.seed)
        xt, yt, mt = fn("test", SIZES["test"], args.image_size, args.seed)
        return x, x, y, xt, yt, mt

    def resolve_args(args, parser):
        if args.dataset == name:
            args.dataset, out = "scenes", None
            out = orig_resolve(args, parser)
            out.dataset = name
            return out
        return orig_resolve(args, parser)
    dm.load_data, dm.resolve_args = load_data, resolve_args


def picture(path, per_class=8):
    """The built-in `textures` dataset (dinov3_mini.make_textures): per_class train images of each class,
    one row per class, then the mask of the last one (0 = background, label + 1 = object)."""
    from matplotlib.figure import Figure
    x, y, mk = dm.make_textures("train", 400)
    fig = Figure(figsize=(0.9 * (per_class + 1) + 0.9, 0.9 * 10))
    ax = fig.subplots(10, per_class + 1)
    for c in range(10):
        idx = (y == c).nonzero()[:per_class, 0]
        for j, i in enumerate(idx.tolist()):
            ax[c, j].imshow(x[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax[c, -1].imshow(mk[idx[-1]].numpy(), cmap="gray", vmin=0, vmax=10, interpolation="nearest")
        ax[c, 0].set_ylabel(dm.TEXTURES[c], rotation=0, ha="right", va="center", fontsize=9)
    ax[0, -1].set_title("mask", fontsize=9)
    for a in ax.flat:
        a.set_xticks([]), a.set_yticks([])
        for sp in a.spines.values():
            sp.set_visible(False)
    fig.suptitle("--dataset textures: the class is the texture (32 px, seed 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=[c for c in CANDIDATES if c != "fractals"], choices=list(CANDIDATES),
                   help="candidates to screen (default: all but fractals, whose category search alone took over a "
                   "minute on a loaded 2-core machine)")
    p.add_argument("--sup-steps", type=int, default=300)
    p.add_argument("--ssl", default=None, choices=list(CANDIDATES), help="run the default recipe on this candidate; "
                   "the remaining arguments go to dinov3_mini.py")
    p.add_argument("--json", default=os.path.join(ROOT, "runs", "results", "screen.json"), help="the table is "
                   "merged into this file (bench/results.py puts it into assets/results.json)")
    p.add_argument("--picture", default=None, help="draw the built-in `textures` dataset into this PNG and stop")
    a, rest = p.parse_known_args()
    if a.picture:
        return picture(a.picture)
    if a.ssl:
        install(a.ssl)
        return dm.main(["--dataset", a.ssl, *rest])
    print(f"{'dataset':10s} {'render 10k (s)':>14s} {'fg':>6s} {'raw px k-NN':>11s} {'random-init k-NN':>16s} "
          f"{'supervised ' + str(a.sup_steps):>15s}")
    for name in a.only:
        r = screen(name, a.sup_steps)
        print(f"{r['name']:10s} {r['render_s']:14.2f} {r['fg']:6.2f} {r['raw']:11.3f} {r['random_init']:16.3f} "
              f"{r['supervised']:15.3f}   ({r['sup_s']} s)", flush=True)
        table = json.load(open(a.json)) if os.path.exists(a.json) else {}
        table[name] = dict(r, sup_steps=a.sup_steps, command=f"python bench/screen_data.py --only {name} "
                           f"--sup-steps {a.sup_steps}", threads=torch.get_num_threads())
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
