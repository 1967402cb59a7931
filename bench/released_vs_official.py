"""The released-model loaders against the official DINOv2 and DINOv3 backbones, on random weights: builds each
official model (full depth, as its hub entry builds it), draws random weights, loads its state_dict() with
dm.load_dinov2 / dm.load_dinov3, and prints the max abs difference of the outputs (CLS, registers, patches after the
final norm) and of DINOv2's interpolated position embeddings, at the native and at other resolutions.

    python bench/released_vs_official.py --dinov2 PATH/TO/dinov2 --dinov3 PATH/TO/dinov3   # repository checkouts

Needs only torch (and numpy) besides the checkouts; their modules are imported, nothing of them is copied here.
"""
import argparse
import os
import sys
import warnings
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dinov3_mini as dm  # noqa: E402


def diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dinov2", required=True, help="Path of a facebookresearch/dinov2 checkout (its root folder).")
    p.add_argument("--dinov3", required=True, help="Path of a facebookresearch/dinov3 checkout (its root folder).")
    a = p.parse_args()
    for repo, pkg in ((a.dinov2, "dinov2"), (a.dinov3, "dinov3")):
        if not os.path.isdir(os.path.join(repo, pkg, "models")):
            sys.exit(f"error: {repo} is not a {pkg} checkout (no {pkg}/models folder in it).")
        sys.path.insert(0, repo)
    os.environ["XFORMERS_DISABLED"] = "1"  # the plain PyTorch attention path
    warnings.filterwarnings("ignore")
    import dinov2.models.vision_transformer as v2
    import dinov3.hub.backbones as v3
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; batch 1; weights N(0, 0.1^2) "
          "(+1 on the norm weights and LayerScale)")
    for name, (D, depth, H) in {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16)}.items():
        for R in (0, 4):  # as dinov2/hub/backbones.py builds dinov2_<name> and dinov2_<name>_reg
            ref = v2.DinoVisionTransformer(
                img_size=518, patch_size=14, embed_dim=D, depth=depth, num_heads=H, init_values=1.0, block_chunks=0,
                block_fn=partial(v2.Block, attn_class=v2.MemEffAttention), num_register_tokens=R,
                interpolate_antialias=R > 0, interpolate_offset=0.0 if R else 0.1).eval()
            with torch.no_grad():
                for prm in ref.parameters():
                    prm.normal_(0, 0.1).add_(1.0 if prm.ndim == 1 and prm.shape[0] == D else 0.0)
            vit = dm.load_dinov2(ref.state_dict())
            for size in ((224, 224), (518, 518), (98, 126)):
                if name == "vitl14" and size == (518, 518):
                    continue  # minutes on a small CPU; ViT-S/B cover the native grid
                x = torch.randn(1, 3, *size)
                h, w = size[0] // 14, size[1] // 14
                with torch.no_grad():
                    o, m = ref.forward_features(x), vit(x)
                    pos_ref = ref.interpolate_pos_encoding(torch.zeros(1, 1 + h * w, D), *size)
                    pos = vit.positions(h, w)
                d = max(diff(o["x_norm_clstoken"], m["cls"]), diff(o["x_norm_regtokens"], m["registers"]),
                        diff(o["x_norm_patchtokens"], m["patches"]))
                dp = diff(pos_ref, torch.cat([pos[:, :1], pos[:, 1 + R:]], 1))
                print(f"dinov2_{name}{'_reg' if R else '':4s} {size[0]}x{size[1]}: outputs {d:.1e} (largest "
                      f"{o['x_norm_patchtokens'].abs().max():.1f}), position embeddings {dp:.1e}")
    for name, (D, depth, H) in {"vits16": (384, 12, 6), "vitb16": (768, 12, 12)}.items():
        ref = v3._make_dinov3_vit(  # the released dinov3_<name> configuration, random weights
            patch_size=16, pos_embed_rope_base=100, pos_embed_rope_normalize_coords="separate",
            pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32", embed_dim=D, depth=depth, num_heads=H,
            ffn_ratio=4, qkv_bias=True, layerscale_init=1e-5, norm_layer="layernormbf16", ffn_layer="mlp",
            n_storage_tokens=4, mask_k_bias=True, pretrained=False).eval()
        ref.init_weights()
        with torch.no_grad():
            for prm in ref.parameters():
                prm.add_(torch.randn_like(prm) * 0.1)
        vit = dm.load_dinov3(ref.state_dict())
        for size in ((224, 224), (96, 128)):
            x = torch.randn(1, 3, *size)
            with torch.no_grad():
                o, m = ref.forward_features(x), vit(x)
            d = max(diff(o["x_norm_clstoken"], m["cls"]), diff(o["x_storage_tokens"], m["registers"]),
                    diff(o["x_norm_patchtokens"], m["patches"]))
            big = o["x_norm_patchtokens"].abs().max()
            print(f"dinov3_{name}     {size[0]}x{size[1]}: outputs {d:.1e} (largest {big:.1f})")


if __name__ == "__main__":
    main()
