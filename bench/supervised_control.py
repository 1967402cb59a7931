"""Supervised control for the storage failure: the file's ViT trained with labels, DeiT-III style.

High-norm tokens were first reported in supervised DeiT-III as well as in DINOv2 (Darcet et al. 2023), and the
smallest published case is a supervised DeiT-III-Small (Bach et al. 2025). When a self-supervised run shows no
outlier, this control tells whether the absence is DINO's (the supervised net grows them) or the scale's
(neither does). It trains the very same backbone (`dinov3_mini.build_backbone`, registers and all) with:

  DeiT-III "3-Augment" (Touvron et al. 2022): random resized crop (0.08-1) and flip, then one of grayscale,
  solarisation or Gaussian blur, colour jitter 0.3; CutMix (p 0.5) or Mixup 0.8 per batch; binary
  cross-entropy on the (mixed) one-hot targets; AdamW (LAMB in the paper), lr warm-up then cosine; a linear
  classifier on the CLS token.

Every --eval-every steps it logs test accuracy, the k-NN accuracy of CLS, and the same instruments as the
self-supervised runs (outlier fraction, max/median norm, bimodality, the blocks' writes, register norms,
attention shares), into OUT/log.jsonl; a checkpoint after each evaluation lets --resume continue.

    python bench/supervised_control.py --dataset textures --steps 5000 --out-dir runs/sup_r0
    python bench/supervised_control.py --dataset textures --steps 5000 --registers 4 --out-dir runs/sup_r4
    python bench/supervised_control.py --steps 20 --eval-every 10 --num-images 512 --out-dir /tmp/sup   # smoke

Options this script does not define (--dataset, --model, --registers, --image-size, --layerscale, --seed,
...) go to dinov3_mini's parser and mean what they mean there.
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


def three_augment(images, gen, size, scale=(0.08, 1.0), jitter=0.3):
    """DeiT-III's 3-Augment on a uint8 batch (B,3,S,S): normalised crops (B,3,size,size)."""
    B = images.shape[0]
    boxes, flips = dm.sample_boxes(B, scale, gen)
    x = dm.render_crops(images.float() / 255, boxes, flips, size)
    pick = torch.randint(3, (B,), generator=gen)[:, None, None, None]  # one of the three, uniformly
    x = torch.where(pick == 0, dm.grayscale(x, gen, p=1.0), x)
    x = torch.where(pick == 1, dm.solarize(x, gen, p=1.0), x)
    x = torch.where(pick == 2, dm.gaussian_blur(x, gen, p=1.0), x)
    x = dm.color_jitter(x, gen, p=1.0, brightness=jitter, contrast=jitter, saturation=jitter, hue=0.0)
    return dm.normalize(x)


def mix(x, y, n_classes, gen, mixup=0.8, cutmix=1.0):
    """CutMix (half of the batches) or Mixup on a batch: mixed images and soft targets (B, n_classes)."""
    t = F.one_hot(y, n_classes).float()
    perm = torch.randperm(len(x), generator=gen)
    use_cutmix = torch.rand(1, generator=gen).item() < 0.5
    lam = torch.distributions.Beta(cutmix if use_cutmix else mixup, cutmix if use_cutmix else mixup).sample().item()
    if use_cutmix:
        S = x.shape[-1]
        cut = math.sqrt(1 - lam)
        h = w = int(S * cut)
        cy, cx = torch.randint(S, (2,), generator=gen).tolist()
        y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, S), max(cx - w // 2, 0), min(cx + w // 2, S)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (S * S)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * t + (1 - lam) * t[perm]


@torch.no_grad()
def accuracy(vit, head, x, y, image_size, device):
    vit.eval()
    correct = 0
    for i in range(0, len(x), 500):
        xb = next(dm.eval_batches(x[i:i + 500], image_size, device, 500))
        correct += (head(vit(xb)["cls"]).argmax(1).cpu() == y[i:i + 500]).sum().item()
    vit.train()
    return correct / len(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--base-lr", type=float, default=3e-3, help="DeiT-III: 3e-3 for batch 2048 (LAMB); the lr is "
                   "base-lr x batch / 256 (AdamW), with at least --min-lr-scale of it. Default 3e-3 gives 7.5e-4 at 64")
    p.add_argument("--wd", type=float, default=0.05, help="AdamW weight decay on weights (not biases, norms, tokens' "
                   "LayerScale); DeiT-III uses 0.02-0.05")
    p.add_argument("--warmup", type=int, default=500, help="linear warm-up steps, then cosine to 0")
    p.add_argument("--no-mix", action="store_true", help="no CutMix/Mixup (plain one-hot targets)")
    p.add_argument("--eval-every", type=int, default=500, help="steps between evaluations and checkpoints")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    a, rest = p.parse_known_args(argv)
    args = dm.parse_args(dm.get_args_parser(), rest + ["--out-dir", a.out_dir])
    if os.path.exists(os.path.join(a.out_dir, "log.jsonl")) and not a.resume:
        sys.exit(f"supervised_control: {a.out_dir} already holds a run; give --resume to continue it or another --out-dir")
    os.makedirs(a.out_dir, exist_ok=True)
    device = dm.pick_device(args.device)
    torch.manual_seed(args.seed)
    _, x_knn, y_knn, xt, yt, mt = dm.load_data(args)  # trains on the labelled split (k-NN's bank)
    x, y = x_knn[:args.num_images], y_knn[:args.num_images]
    n_classes = int(max(y.max(), yt.max())) + 1
    vit = dm.build_backbone(args).to(device)
    head = nn.Linear(vit.dim, n_classes).to(device)
    named = list(vit.named_parameters()) + list(head.named_parameters())
    decay = [q for n, q in named if q.ndim > 1 and "token" not in n]
    no_decay = [q for n, q in named if not (q.ndim > 1 and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.base_lr * a.batch / 256, betas=(0.9, 0.999))
    peak = a.base_lr * a.batch / 256
    gen = torch.Generator().manual_seed(args.seed)
    start, log_path, ck_path = 0, os.path.join(a.out_dir, "log.jsonl"), os.path.join(a.out_dir, "checkpoint.pt")
    if a.resume and os.path.exists(ck_path):
        ck = dm.safe_load(ck_path)
        vit.load_state_dict(ck["vit"]), head.load_state_dict(ck["head"]), opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"]), torch.set_rng_state(ck["rng"])
        start = ck["step"]
    t0, losses = time.time(), []
    for it in range(start, a.steps):
        lr = peak * (it + 1) / a.warmup if it < a.warmup else \
            peak * 0.5 * (1 + math.cos(math.pi * (it - a.warmup) / max(1, a.steps - a.warmup)))
        for gr in opt.param_groups:
            gr["lr"] = lr
        idx = torch.randint(len(x), (a.batch,), generator=gen)
        xb = three_augment(x[idx], gen, args.image_size)
        yb = y[idx]
        xb, tb = (xb, F.one_hot(yb, n_classes).float()) if a.no_mix else mix(xb, yb, n_classes, gen)
        loss = F.binary_cross_entropy_with_logits(head(vit(xb.to(device))["cls"]), tb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(vit.parameters()) + list(head.parameters()), 1.0)
        opt.step()
        losses.append(loss.item())
        if (it + 1) % a.eval_every == 0 or it + 1 == a.steps:
            rec = {"step": it + 1, "loss": sum(losses) / len(losses), "lr": lr, "train_s": round(time.time() - t0, 1),
                   "test_acc": accuracy(vit, head, xt, yt, args.image_size, device),
                   "knn_acc": dm.evaluate_knn(vit, x_knn, y_knn, xt, yt, args, device)["cls"]}
            rec.update(dm.eval_instruments(vit, xt, yt, mt, args, device))
            vit.train()
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) and k != "lr" else v) for k, v in rec.items()
                              if not isinstance(v, list)}), flush=True)
            dm.save_checkpoint(ck_path, {"vit": vit.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(),
                                         "gen": gen.get_state(), "rng": torch.get_rng_state(), "step": it + 1,
                                         "args": vars(args), "control_args": vars(a)})
            t0, losses = time.time(), []


if __name__ == "__main__":
    main()
