"""Our DINO step against lightly's, in the same process, on the same device, alternating A B A B.

    pip install lightly            # for this benchmark only; not a requirement of dinov3-mini
    python bench/vs_lightly.py     # tiny ViT (192-d, 12 blocks, 3 heads), patch 4, 2x32 + 6x16 crops, batch 64
    python bench/vs_lightly.py --device cuda   # on a GPU: both steps under the same bf16 autocast

Both steps are DINO only (our iBOT, KoLeo and Gram off), the same ViT shape (ours without registers), the
same crops (the same tensors are fed to both), the same head (2048-2048-256 -> 4096 prototypes) and batch. A step is: teacher
forward on the 2 global crops, student forward on all 8 crops, DINO loss, backward, AdamW, EMA update.
lightly's side is built from its own components: MaskedVisionTransformerTorchvision around torchvision's
VisionTransformer (learned position embeddings, interpolated for the local crops), DINOProjectionHead,
DINOLoss (centring) and update_momentum. Its data pipeline, DINOTransform (per-image PIL work), is timed
apart from ours (batched tensor multi-crop). Prints medians per round and the ratio; the last line is JSON.
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dinov3_mini as dm  # noqa: E402


def sync(device):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()


def lightly_step_fn(dim, depth, heads, image_size, patch, hidden, prototypes, lr, fused=False, device="cpu",
                    amp=None):
    from lightly.loss import DINOLoss
    from lightly.models.modules import MaskedVisionTransformerTorchvision
    from lightly.models.modules.heads import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from torchvision.models.vision_transformer import VisionTransformer

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            vit = VisionTransformer(image_size=image_size, patch_size=patch, num_layers=depth, num_heads=heads,
                                    hidden_dim=dim, mlp_dim=4 * dim)
            self.backbone = MaskedVisionTransformerTorchvision(vit=vit)
            self.head = DINOProjectionHead(dim, hidden, 256, prototypes, freeze_last_layer=1)

        def forward(self, x):
            return self.head(self.backbone(x))

    student, teacher = Student().to(device), Student().to(device)  # (deepcopy fails on lightly's weight-normed head)
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=prototypes, warmup_teacher_temp_epochs=5).to(device)
    amp = amp or contextlib.nullcontext()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, fused=fused)  # lightly's examples: the default AdamW

    def step(globals_, locals_, B):
        update_momentum(student, teacher, m=0.996)
        with amp:
            with torch.no_grad():
                t_out = list(teacher(globals_).chunk(2))
            s_out = list(student(globals_).chunk(2)) + list(student(locals_).chunk(len(locals_) // B))
            loss = criterion(t_out, s_out, epoch=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def ours_step_fn(args, device="cpu", amp=None):
    student = dm.DINOModel(dm.build_backbone(args), args.prototypes, args.head_hidden, args.head_bottleneck,
                           args.norm_last_layer).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dm.param_groups(student, args.depth, args.layer_decay), lr=1e-4, fused=True)  # as train()
    sched = dm.make_schedules(args, 100)
    sched["steps_per_epoch"] = 100

    def step(globals_, locals_, B, images):
        crops = {"globals": globals_, "locals": locals_}
        with amp or contextlib.nullcontext():
            total, _, _ = dm.compute_losses(student, teacher, None, images, crops, None, 50, sched, args)
        opt.zero_grad(set_to_none=True)
        total.backward()
        dm.clip_gradients(student, args.clip_grad)
        opt.step()
        dm.ema_update(teacher, student, 0.996)
    return step


def median_time(fn, n, device=None):
    ts = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="A B rounds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round (median)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="tiny")
    p.add_argument("--registers", type=int, default=0, help="ours only; 0 = the peer's token count")
    p.add_argument("--peer-fused-adamw", action="store_true", help="give lightly's side the fused AdamW ours uses "
                   "(by default it gets torch's default AdamW, as in lightly's examples)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: both models and the crops on the GPU, both steps "
                   "under the same bf16 autocast (as train() does); our multi-crop runs there too, lightly's PIL "
                   "pipeline on the CPU")
    a = p.parse_args()
    device = torch.device(a.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    torch.manual_seed(0)
    # the same ViT shape as the peer's: no registers (torchvision's ViT has none), DINO loss only
    args = dm.get_args_parser().parse_args(["--model", a.model, "--batch-size", str(a.batch_size), "--registers",
                                            str(a.registers), "--ibot-weight", "0", "--koleo-weight", "0"])
    args = dm.resolve_args(args, dm.get_args_parser())
    B = a.batch_size
    images = dm.make_scenes("train", B, args.image_size)[0]
    gen = torch.Generator().manual_seed(0)
    crops = dm.multicrop(images, gen, **dm.crop_kwargs(args))
    g, l = crops["globals"].to(device), crops["locals"].to(device)
    ours = ours_step_fn(args, device, amp)
    theirs = lightly_step_fn(args.dim, args.depth, args.heads, args.image_size, args.patch_size, args.head_hidden,
                             args.prototypes, 1e-4, fused=a.peer_fused_adamw, device=device, amp=amp)
    # data pipelines: lightly's per-image PIL DINOTransform vs our batched multi-crop
    from lightly.transforms import DINOTransform
    from torchvision.transforms.functional import to_pil_image
    tr = DINOTransform(global_crop_size=args.image_size, local_crop_size=args.local_size, n_local_views=6)
    pils = [to_pil_image(im) for im in images]
    for _ in range(2):  # warm-up
        ours(g, l, B, images)
        theirs(g, l, B)
    res = {"ours": [], "lightly": []}
    for r in range(a.rounds):
        res["ours"].append(B / median_time(lambda: ours(g, l, B, images), a.steps, device))
        res["lightly"].append(B / median_time(lambda: theirs(g, l, B), a.steps, device))
        print(f"round {r}: ours {res['ours'][-1]:.2f} img/s, lightly {res['lightly'][-1]:.2f} img/s", flush=True)
    images_dev = images.to(device)  # ours runs where the training runs (on the GPU with --device cuda)
    data_ours = B / median_time(lambda: dm.multicrop(images_dev, gen, **dm.crop_kwargs(args)), 5, device)
    data_lightly = B / median_time(lambda: [tr(im) for im in pils], 3)
    out = {"ours_img_per_s": round(statistics.median(res["ours"]), 2),
           "lightly_img_per_s": round(statistics.median(res["lightly"]), 2),
           "ratio": round(statistics.median(res["ours"]) / statistics.median(res["lightly"]), 3),
           "ours_data_img_per_s": round(data_ours, 1), "lightly_data_img_per_s": round(data_lightly, 1),
           "threads": torch.get_num_threads(), "batch": B, "model": a.model, "torch": torch.__version__,
           "peer_adamw": "fused" if a.peer_fused_adamw else "default", "device": str(device),
           "dtype": "bf16 autocast" if amp is not None else "float32"}
    print(f"DINO-only step, {a.model}, batch {B}, 2x{args.image_size} + 6x{args.local_size} crops, "
          f"{torch.get_num_threads()} threads: ours {out['ours_img_per_s']} img/s, lightly {out['lightly_img_per_s']}"
          f" img/s, ratio {out['ratio']}; data: ours {out['ours_data_img_per_s']} img/s, lightly (PIL) "
          f"{out['lightly_data_img_per_s']} img/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
