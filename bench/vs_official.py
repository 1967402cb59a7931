"""dinov3_mini against the official DINOv3 code, on the same random tensors: prints the max abs difference of
each piece the README's faithfulness table calls "same".

    python bench/vs_official.py --repo PATH/TO/dinov3     # a checkout of github.com/facebookresearch/dinov3

Needs only torch (and numpy) besides the checkout: the official loss, schedule, masking and RoPE modules are
imported from it; nothing of it is copied here. One process (the cross-process Sinkhorn-Knopp is pinned by a
2-process test in test_dinov3_mini.py).
"""
import argparse
import math
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dinov3_mini as dm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="Path of a facebookresearch/dinov3 checkout (its root folder).")
    a = p.parse_args()
    if not os.path.isdir(os.path.join(a.repo, "dinov3", "loss")):
        sys.exit(f"error: {a.repo} is not a dinov3 checkout (no dinov3/loss folder in it).")
    sys.path.insert(0, a.repo)
    from dinov3.data.collate import collate_data_and_cast
    from dinov3.data.masking import MaskingGenerator
    from dinov3.layers.rope_position_encoding import RopePositionEmbedding
    from dinov3.loss.dino_clstoken_loss import DINOLoss
    from dinov3.loss.gram_loss import GramLoss
    from dinov3.loss.ibot_patch_loss import iBOTPatchLoss
    from dinov3.loss.koleo_loss import KoLeoLoss
    # dinov3.train's package imports the whole trainer (omegaconf, FSDP): load its two small files on their own
    import importlib.util

    def load(rel):
        spec = importlib.util.spec_from_file_location(rel.replace("/", "_"), os.path.join(a.repo, rel))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    sched_mod = load("dinov3/train/cosine_lr_scheduler.py")
    CosineScheduler, linear_warmup_cosine_decay = sched_mod.CosineScheduler, sched_mod.linear_warmup_cosine_decay
    get_params_groups_with_decay = load("dinov3/train/param_groups.py").get_params_groups_with_decay

    torch.manual_seed(0)
    rows = []

    def row(name, ours, ref):
        rows.append((name, (torch.as_tensor(ours).double() - torch.as_tensor(ref).double()).abs().max().item()))

    # Sinkhorn-Knopp (DINO head), then the DINO loss with the Gram phase's local weight
    B, K, L = 16, 64, 8
    t_logits = torch.randn(2 * B, K)
    row("sinkhorn_knopp", dm.sinkhorn_knopp(t_logits, 0.05), DINOLoss(K).sinkhorn_knopp_teacher(t_logits, 0.05))
    s_logits = torch.randn((2 + L) * B, K)
    probs = dm.sinkhorn_knopp(t_logits, 0.05)
    ref_loss = DINOLoss(K)
    local = ref_loss(s_logits[2 * B:].unflatten(0, (L, B)), probs.unflatten(0, (2, B)))
    glob = ref_loss(s_logits[:2 * B].unflatten(0, (2, B)), probs.unflatten(0, (2, B)), ignore_diagonal=True)
    n_g, n_l = 2, 2 * L
    for w in (1.0, 0.5):  # the reference's compute_losses: local and global scales, times the local weight
        ref = n_l / (n_g + n_l) * w * local + n_g / (n_g + n_l) * glob
        row(f"dino_loss (local weight {w})", dm.dino_loss(s_logits, probs, 2, 0.1, local_weight=w), ref)

    # iBOT: masks from the reference's own collate (its MaskingGenerator), then the masked loss
    random.seed(0)
    np.random.seed(0)
    grid = 8
    gen = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    samples = [({"global_crops": [torch.zeros(3, 4, 4)] * 2, "local_crops": [torch.zeros(3, 2, 2)] * L}, None)
               for _ in range(B)]
    col = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens=grid * grid, mask_generator=gen)
    masks = col["collated_masks"]
    M = int(masks.sum())
    s_patch, t_patch = torch.randn(M, K), dm.sinkhorn_knopp(torch.randn(M, K), 0.05)
    ref = iBOTPatchLoss(K).forward_masked(s_patch, t_patch, masks, n_masked_patches=M,
                                           masks_weight=col["masks_weight"])
    row("ibot_loss", dm.ibot_loss(s_patch, t_patch, masks), ref)
    args = dm.parse_args(dm.get_args_parser(), [])
    ours = dm.ibot_masks(2 * B, grid, torch.Generator().manual_seed(0), **dm.mask_kwargs(args))
    row("ibot_masks: sorted masked counts per crop", sorted(ours.sum(1).tolist()), sorted(masks.sum(1).tolist()))

    # KoLeo and Gram (the reference's GramLoss: normalised, image level, negatives kept)
    x = torch.randn(2 * B, 32)
    row("koleo_loss", dm.koleo_loss(x), KoLeoLoss()(x))
    s, t = torch.randn(2 * B, 64, 32), torch.randn(2 * B, 64, 32)
    row("gram_loss", dm.gram_loss(s, t), GramLoss(apply_norm=True, img_level=True, remove_neg=False)(s, t))

    # RoPE tables in eval (the official module has no train-time augmentation in eval either)
    rope_ref = RopePositionEmbedding(64, num_heads=2, base=100.0, normalize_coords="separate").eval()
    sin_ref, cos_ref = rope_ref(H=6, W=5)
    sin, cos = dm.RoPE(head_dim=32).eval()(6, 5)
    row("RoPE sin/cos (6x5 grid)", torch.cat([sin, cos]), torch.cat([sin_ref, cos_ref]))

    # schedules: the lr (CosineScheduler, warmup reaching the peak) and the Gram phase (linear_warmup_cosine_decay)
    args = dm.parse_args(dm.get_args_parser(), ["--epochs", "10", "--gram", "--gram-start", "4"])
    spe = 25
    sched = dm.make_schedules(args, spe)
    sched["steps_per_epoch"] = spe
    peak = args.lr * math.sqrt(args.batch_size / 1024)
    lr_ref = CosineScheduler(peak, args.min_lr, 10 * spe, warmup_iters=args.warmup_epochs * spe).schedule
    row("lr schedule", sched["lr"], lr_ref)
    start, total = 4 * spe, 10 * spe
    g_ref = linear_warmup_cosine_decay(0, 0, 2.0, start, total, cosine_iterations=spe)
    l_ref = linear_warmup_cosine_decay(1, 1, 0.5, start, total, cosine_iterations=spe)
    g = [dm.gram_weight(i, sched, args) for i in range(total)]
    lw = [1 - (1 - args.gram_local_weight) * dm.gram_ramp(i, sched, args) for i in range(total)]
    row("Gram weight schedule (0 -> 2)", g, g_ref)
    row("local DINO weight schedule (1 -> 0.5)", lw, l_ref)

    # weight decay: which parameters the reference decays, by name, on our model
    model = dm.DINOModel(dm.ViT(dim=32, depth=2, heads=2, num_registers=2, untie_local_norm=True), 16, 32, 8)
    ref_wd = {d["name"]: d["wd_multiplier"] for d in get_params_groups_with_decay(model)}
    ours_wd = {}
    for grp in dm.param_groups(model, 2, 0.9):
        for prm in grp["params"]:
            ours_wd[id(prm)] = grp["wd_mult"]
    diff = [n for n, prm in model.named_parameters() if ours_wd[id(prm)] != ref_wd[n]]
    rows.append(("weight decay on/off per parameter (mismatches)", float(len(diff))))

    print(f"{'piece':<46} max abs difference vs the official code")
    for name, d in rows:
        print(f"{name:<46} {d:.3g}")


if __name__ == "__main__":
    main()
