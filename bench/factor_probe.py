"""What a trained backbone's features encode on `textures`: the class (the texture) or the per-image nuisances.

`make_textures` draws every factor of an image from its generator in a fixed order (`texture_draws`), so each
image's shape, background and object colours, pattern frequency and rotation are known, and reads
each one from the features with the same weighted k-NN (k = 20) as the class. A factor the trained teacher
reads far better than a ViT at initialisation is something the self-supervised objective picked up; a random
per-image factor (a colour) learnt instead of the class is an instance cue that two crops of one image share.

    python bench/factor_probe.py runs/textures_s0                   # a run on --dataset textures
    python bench/factor_probe.py runs/screen_grey --palette grey    # a run on bench/screen_data.py's textures_grey

Factors (10,000 train images as the bank is slow on 2 cores; the first --bank are used; 2,000 test images):
  texture (the class, 10), shape (10), bg_colour / obj_colour (8 bins: each RGB channel above or below 0.5),
  bg_lum / obj_lum (4 luminance bins), freq (5 bins of the pattern frequency), angle (8 bins of the rotation).
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dinov3_mini as dm  # noqa: E402
import screen_data as sd  # noqa: E402


def factors(split, n, seed=0, palette="colour"):
    """make_textures' own draws (dinov3_mini.texture_draws), each factor binned: {name: labels (n,)}."""
    d = dm.texture_draws(split, 32, seed, palette=lambda c: sd.recolour(c, palette))
    N = len(d["labels"])
    bits = lambda c: ((c.view(N, 3) > 0.5).long() * torch.tensor([1, 2, 4])).sum(1)  # noqa: E731
    lum = lambda c: (c.view(N, 3).mean(1) * 4).long().clamp(max=3)  # noqa: E731
    freq = (d["freq"].view(N) / math.pi - 2.2) / 1.3  # back to [0, 1)
    angle = (d["ang"] / math.pi + 1) / 2
    out = dict(texture=d["labels"], shape=d["shape"], bg_colour=bits(d["c1"]), obj_colour=bits(d["col"]),
               bg_lum=lum(d["c1"]), obj_lum=lum(d["col"]), freq=(freq * 5).long().clamp(0, 4),
               angle=(angle * 8).long().clamp(0, 7))
    return {k: v[:n] for k, v in out.items()}


def probe(backbone, x_tr, f_tr, x_te, f_te):
    """k-NN accuracy of every factor from the CLS token and from the mean patch token."""
    a = dm.extract_features(backbone, x_tr, 32, "cpu")
    b = dm.extract_features(backbone, x_te, 32, "cpu")
    return {(pool, k): dm.knn_classify(F.normalize(a[pool], dim=-1), f_tr[k], F.normalize(b[pool], dim=-1), f_te[k])
            for k in f_tr for pool in ("cls", "mean")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (or checkpoint.pt) trained on textures or one of its palettes")
    p.add_argument("--palette", default="colour", choices=("colour", "muted", "grey"))
    p.add_argument("--bank", type=int, default=5000, help="training images used as the k-NN bank")
    a = p.parse_args()
    torch.manual_seed(0)
    make = lambda split, n: sd.make_textures_palette(split, n, mode=a.palette)  # noqa: E731
    x_tr, y_tr, _ = make("train", a.bank)
    x_te, _, _ = make("test", 2000)
    f_tr, f_te = factors("train", a.bank, palette=a.palette), factors("test", 2000, palette=a.palette)
    assert torch.equal(f_tr["texture"], y_tr)
    trained, run_args, _ = dm.load_teacher(a.run)
    random_init = dm.build_backbone(run_args, student=False).eval()  # same architecture, at initialisation
    res = {"trained": probe(trained, x_tr, f_tr, x_te, f_te), "random init": probe(random_init, x_tr, f_tr, x_te, f_te)}
    chance = {k: 1 / len(v.unique()) for k, v in f_te.items()}
    print(f"k-NN accuracy of each factor (bank {a.bank}, 2,000 test images, palette {a.palette})")
    print(f"{'factor':11s} {'chance':>6s}  {'trained CLS':>11s} {'random CLS':>10s}  {'trained mean':>12s} {'random mean':>11s}")
    for k in f_tr:
        print(f"{k:11s} {chance[k]:6.3f}  {res['trained'][('cls', k)]:11.3f} {res['random init'][('cls', k)]:10.3f}  "
              f"{res['trained'][('mean', k)]:12.3f} {res['random init'][('mean', k)]:11.3f}")


if __name__ == "__main__":
    main()
