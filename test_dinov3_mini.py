"""Tests: each component against its defining property, then end-to-end runs and the command line.

    python -m pytest -q test_dinov3_mini.py        # about a few minutes on a 2-core CPU, no network
"""
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import dinov3_mini as m

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--head-hidden", "64", "--prototypes", "64",
        "--num-images", "64", "--batch-size", "16", "--local-crops", "2", "--no-progress", "--log-every", "1",
        "--dataset", "scenes"]  # scenes: a small object among distractors, the harder case for the instruments


def assert_close(a, b, atol=1e-5, rtol=1e-5):
    diff = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs difference {diff}"


def args_for(*argv):
    p = m.get_args_parser()
    return m.parse_args(p, list(argv))


# ---- losses ------------------------------------------------------------------------------------

def test_gram_loss_invariances():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))  # a random orthogonal matrix
    assert m.gram_loss(x, x).item() < 1e-10
    assert m.gram_loss(x, 3.7 * x @ q).item() < 1e-10  # rescaled and rotated: same Gram matrix
    assert m.gram_loss(x, torch.randn(3, 16, 8)).item() > 1e-2
    # the definition: mean over entries of the squared difference of cosine-similarity matrices
    y = torch.randn(3, 16, 8)
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    ref = ((xn @ xn.transpose(1, 2) - yn @ yn.transpose(1, 2)) ** 2).mean()
    assert_close(m.gram_loss(x, y), ref)


def test_sinkhorn_rows_and_columns():
    torch.manual_seed(0)
    B, K = 64, 16
    logits = torch.randn(B, K) * 0.1 + torch.arange(K) * 0.01  # skewed towards high prototypes
    Q = m.sinkhorn_knopp(logits, temp=0.04, n_iters=3)
    assert_close(Q.sum(1), torch.ones(B), atol=1e-5)  # each row a distribution
    assert (Q.sum(0) - B / K).abs().max() < 0.25 * B / K  # columns close to balanced after 3 iterations
    Q50 = m.sinkhorn_knopp(logits, temp=0.04, n_iters=50)
    assert_close(Q50.sum(0), torch.full((K,), B / K), atol=1e-2)  # and balanced in the limit
    # centring matters: the plain softmax puts far more mass on the favourite prototypes
    assert (F.softmax(logits / 0.04, -1).sum(0) - B / K).abs().max() > 3 * (Q.sum(0) - B / K).abs().max()


def test_dino_loss_pairs_and_weighting():
    torch.manual_seed(0)
    B, K, L = 4, 10, 3
    s = torch.randn((2 + L) * B, K)
    t = F.softmax(torch.randn(2 * B, K), -1)
    ls = F.log_softmax(s / 0.1, -1).chunk(2 + L)
    tt = t.chunk(2)
    pairs = [-(tt[i] * ls[j]).sum(-1).mean() for i in range(2) for j in range(2 + L) if i != j]
    assert len(pairs) == 2 * L + 2
    assert_close(m.dino_loss(s, t, 2, 0.1), torch.stack(pairs).mean())
    # with 8 local crops the local pairs weigh 16/18 and the global pairs 2/18, as in the reference
    s8 = torch.randn(10 * B, K)
    ls8 = F.log_softmax(s8 / 0.1, -1).chunk(10)
    glob = torch.stack([-(tt[0] * ls8[1]).sum(-1).mean(), -(tt[1] * ls8[0]).sum(-1).mean()]).mean()
    loc = torch.stack([-(tt[i] * ls8[j]).sum(-1).mean() for i in range(2) for j in range(2, 10)]).mean()
    assert_close(m.dino_loss(s8, t, 2, 0.1), 16 / 18 * loc + 2 / 18 * glob)


def test_ibot_loss_averages_per_image():
    torch.manual_seed(0)
    masks = torch.zeros(3, 6, dtype=torch.bool)
    masks[0, :1] = True  # 1 masked patch
    masks[2, :4] = True  # 4 masked patches; image 1 has none
    M, K = int(masks.sum()), 7
    s, t = torch.randn(M, K), F.softmax(torch.randn(M, K), -1)
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    # the reference (DINOv2/v3 `iBOTPatchLoss.forward_masked`): mean within each crop, summed over crops, divided
    # by ALL 3 crops, masked or not
    ref = (ce[0] + ce[1:].mean()) / 3
    assert_close(m.ibot_loss(s, t, masks, 0.1), ref)
    # so with half the crops masked it is half the mean over the masked crops (not equal to it)
    assert_close(m.ibot_loss(s, t, masks, 0.1), 2 / 3 * (ce[0] + ce[1:].mean()) / 2)


def test_koleo_loss_value():
    x = torch.eye(4) * 5.0  # after normalisation: orthonormal, every nearest neighbour at sqrt(2)
    assert_close(m.koleo_loss(x), torch.tensor(-math.log(math.sqrt(2))), atol=1e-6)
    close = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]])
    assert m.koleo_loss(close) > m.koleo_loss(x)  # crowded points cost more


# ---- faithful to the reference code: each pinned against a reference formula written here --------

def _sinkhorn_reference(logits, temp, n_iters=3):
    """The official SinkhornKnoppTeacher on one process, in float64: no max shift at all."""
    Q = torch.exp(logits.double() / temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(n_iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def _sinkhorn_worker(rank, store, logits, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    q = m.sinkhorn_knopp(logits.chunk(2)[rank], temp=0.04)
    torch.save(q, f"{out}.{rank}")
    dist.destroy_process_group()


def test_sinkhorn_across_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    logits = torch.rand(32, 12) * 0.9
    logits[16:] += 0.9  # the second process's half has a very different maximum
    mp.spawn(_sinkhorn_worker, args=(str(tmp_path / "store"), logits, str(tmp_path / "q")), nprocs=2)
    two = torch.cat([torch.load(tmp_path / f"q.{r}") for r in range(2)])
    ref = _sinkhorn_reference(logits, 0.04).float()
    assert_close(two, ref, atol=1e-5, rtol=0)
    assert_close(m.sinkhorn_knopp(logits, 0.04), ref, atol=1e-5, rtol=0)  # and one process on all of it


def test_gradients_clipped_per_part():
    model = m.DINOModel(m.ViT(dim=32, depth=1, heads=2, num_registers=1), 16, 32, 8)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        p.grad = torch.randn_like(p) * (10.0 if name.startswith("backbone") else 1e-3)
    parts = {k: [p.grad.clone() for p in getattr(model, k).parameters()] for k in ("backbone", "dino_head", "ibot_head")}
    m.clip_gradients(model, 3.0)
    for k, grads in parts.items():  # the reference: each of backbone, DINO head, iBOT head clipped on its own
        norm = torch.stack([g.norm() for g in grads]).norm()
        scale = min(1.0, 3.0 / (norm.item() + 1e-6))
        for g, p in zip(grads, getattr(model, k).parameters()):
            assert_close(p.grad, g * scale)
    assert scale == 1.0  # the tiny head gradients are untouched (a joint clip would have shrunk them ~1e4x)


def test_gram_loss_is_fp32_inside_bf16_autocast():
    torch.manual_seed(0)
    s = torch.randn(2, 64, 32)
    t = s + 0.005 * torch.randn(2, 64, 32)  # the regime Gram anchoring works in: a student close to its teacher
    sn, tn = F.normalize(s.double(), dim=-1), F.normalize(t.double(), dim=-1)
    ref = ((sn @ sn.transpose(1, 2) - tn @ tn.transpose(1, 2)) ** 2).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.gram_loss(s, t)
        naive = (F.normalize(s, dim=-1) @ F.normalize(s, dim=-1).transpose(1, 2)
                 - F.normalize(t, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2)).pow(2).mean()
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 1e-6 * ref.item()
    assert abs(naive.float().item() - ref.item()) > 0.1 * ref.item()  # bf16 Gram matrices: ~30% off here


def test_rope_augmentation_drawn_per_block_in_training_once_in_eval():
    vit = m.ViT(image_size=16, patch_size=4, dim=32, depth=3, heads=2, num_registers=1, rope_rescale=2.0)
    seen = []
    for blk in vit.blocks:
        blk.register_forward_pre_hook(lambda mod, a: seen.append(a[1][0].clone()))  # the sin table it gets
    x = torch.randn(2, 3, 16, 16)
    vit.train()(x)
    assert all(not torch.allclose(seen[0], t) for t in seen[1:3])  # three blocks, three rescale draws
    seen.clear()
    vit.eval()(x)
    assert all(torch.equal(seen[0], t) for t in seen[1:3])
    ref = vit.rope.eval()(4, 4)[0]  # eval: the deterministic table, identity rows for CLS and register
    assert torch.equal(seen[0][2:], ref) and seen[0][:2].abs().max() == 0


def test_dino_local_weight_matches_reference_scaling():
    torch.manual_seed(0)
    B, K, L = 4, 10, 8
    s, t = torch.randn((2 + L) * B, K), F.softmax(torch.randn(2 * B, K), -1)
    ls, tt = F.log_softmax(s / 0.1, -1).chunk(2 + L), t.chunk(2)
    glob = torch.stack([-(tt[0] * ls[1]).sum(-1).mean(), -(tt[1] * ls[0]).sum(-1).mean()]).mean()
    loc = torch.stack([-(tt[i] * ls[j]).sum(-1).mean() for i in range(2) for j in range(2, 2 + L)]).mean()
    # the reference: dino_local_scale * local_weight * local + dino_global_scale * global, scales 16/18 and 2/18
    assert_close(m.dino_loss(s, t, 2, 0.1, local_weight=0.5), 16 / 18 * 0.5 * loc + 2 / 18 * glob)


def test_gram_phase_schedule_momentum_and_untied_local_norm():
    args = args_for("--gram", "--epochs", "4", "--gram-teacher-epoch", "1", "--gram-start", "2")
    sched = m.make_schedules(args, 10)
    sched["steps_per_epoch"] = 10
    w = [m.gram_weight(i, sched, args) for i in range(40)]
    # the reference's linear_warmup_cosine_decay(0, 0, 2.0, ...): zeros, then cos over linspace(0, pi, 1 epoch)
    ref = [0.0] * 20 + [2.0 + (0 - 2.0) * (math.cos(math.pi * i / 9) + 1) / 2 for i in range(10)] + [2.0] * 10
    assert max(abs(a - b) for a, b in zip(w, ref)) < 1e-9
    assert [m.teacher_momentum(i, sched, args) for i in (19, 20, 39)] == [sched["momentum"][19], 0.999, 0.999]
    off = args_for("--gram", "--epochs", "4", "--gram-momentum", "0", "--gram-local-weight", "1", "--no-untie-local-norm")
    assert m.teacher_momentum(39, sched, off) == sched["momentum"][39] and not off.untie_local_norm
    assert args.untie_local_norm and not args_for().untie_local_norm  # on with --gram, off without
    # untied: in training the local crops' CLS and registers go through local_norm, the patches through norm
    vit = m.ViT(image_size=16, patch_size=4, dim=32, depth=1, heads=2, num_registers=2, untie_local_norm=True)
    with torch.no_grad():
        vit.local_norm.weight.uniform_(0.5, 2.0)
        vit.local_norm.bias.normal_()
    x = torch.randn(3, 3, 8, 8)
    vit.eval()
    g, l_eval = vit(x), vit(x, local=True)
    assert torch.equal(g["cls"], l_eval["cls"])  # never used in eval
    vit.rope.rescale = 1.0  # deterministic tables, so train and eval forwards are comparable
    vit.train()
    tok = {}
    vit.norm.register_forward_hook(lambda mod, a, out: tok.update(x=a[0]))
    loc = vit(x, local=True)
    ref = F.layer_norm(tok["x"][:, :3], (32,), vit.local_norm.weight, vit.local_norm.bias, 1e-6)
    assert_close(loc["cls"], ref[:, 0]) and assert_close(loc["registers"], ref[:, 1:])
    assert_close(loc["patches"], vit.norm(tok["x"])[:, 3:])
    assert not torch.allclose(loc["cls"], vit(x)["cls"])


PASTE_HEADER = ("import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
                "import torch.distributed as dist\nimport einops\nfrom einops import rearrange\n")


def _paste(*names):
    """A fresh module holding only the pasted source of `names`, with the allowed imports."""
    import inspect
    import types
    src = PASTE_HEADER + "\n\n".join(inspect.getsource(getattr(m, n)) for n in names)
    mod = types.ModuleType("pasted")
    exec(compile(src, "pasted", "exec"), mod.__dict__)
    return mod


VIT_PARTS = ("RoPE", "rope_apply", "Attention", "LayerScale", "drop_path", "Block", "ViT", "_init_weights")
CROP_PARTS = ("sample_boxes", "render_crops", "_gray", "color_jitter", "grayscale", "gaussian_blur", "solarize",
              "normalize", "multicrop")


def test_copyable_pieces_run_pasted_alone():
    torch.manual_seed(0)
    logits, probs = torch.randn(8, 6), F.softmax(torch.randn(4, 6), -1)
    masks = torch.zeros(4, 5, dtype=torch.bool)
    masks[:2, :2] = True
    x, y, student = torch.randn(2, 9, 8), torch.randn(2, 9, 8), torch.randn(8, 6)
    for name, call in {
        "sinkhorn_knopp": lambda f: f(logits, 0.04),
        "dino_loss": lambda f: f(student, probs, 2),
        "ibot_loss": lambda f: f(logits[:4], probs, masks),
        "koleo_loss": lambda f: f(logits),
        "gram_loss": lambda f: f(x, y),
    }.items():
        assert_close(call(getattr(_paste(name), name)), call(getattr(m, name)))
    vit_mod = _paste(*VIT_PARTS)
    torch.manual_seed(0)
    a = vit_mod.ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=2, num_registers=1).eval()
    torch.manual_seed(0)
    b = m.ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=2, num_registers=1).eval()
    img = torch.randn(2, 3, 16, 16)
    assert_close(a(img)["patches"], b(img)["patches"])
    heads = _paste(*VIT_PARTS, "DINOHead", "DINOModel")
    model = heads.DINOModel(a, 16, 32, 8)
    assert model(img, img[:, :, :8, :8])["cls_logits"].shape == (4, 16)
    args = args_for("--local-crops", "2")
    imgs = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    c1 = _paste(*CROP_PARTS).multicrop(imgs, torch.Generator().manual_seed(0), **m.crop_kwargs(args))
    c2 = m.multicrop(imgs, torch.Generator().manual_seed(0), **m.crop_kwargs(args))
    assert_close(c1["globals"], c2["globals"]) and assert_close(c1["locals"], c2["locals"])
    mk = _paste("block_mask", "ibot_masks").ibot_masks(8, 4, torch.Generator().manual_seed(0),
                                                           **m.mask_kwargs(args))
    assert torch.equal(mk, m.ibot_masks(8, 4, torch.Generator().manual_seed(0), **m.mask_kwargs(args)))
    teach = _paste("ema_update", "make_gram_teacher")
    g = teach.make_gram_teacher(b)
    teach.ema_update(g, a, 0.0)
    assert_close(g(img)["patches"], a(img)["patches"])
    hires = args_for("--dim", "32", "--depth", "1", "--heads", "2", "--gram-hires")
    gt = _paste(*CROP_PARTS, "gram_teacher_patches")
    crops = m.multicrop(imgs, torch.Generator().manual_seed(0), **m.crop_kwargs(hires))
    vit = m.build_backbone(hires).eval()
    assert_close(gt.gram_teacher_patches(vit, imgs, crops, hires=True),
                 m.gram_teacher_patches(vit, imgs, crops, hires=True))


# ---- backbone ----------------------------------------------------------------------------------

def test_vit_outputs_and_registers_never_among_patches():
    vit = m.ViT(image_size=32, patch_size=4, dim=32, depth=0, heads=2, num_registers=3)
    with torch.no_grad():
        vit.registers.normal_()
    x = torch.randn(2, 3, 32, 32)
    out = vit(x)
    assert out["cls"].shape == (2, 32) and out["registers"].shape == (2, 3, 32) and out["patches"].shape == (2, 64, 32)
    # with no blocks the outputs are the normed inputs: patches come from the image, registers from their parameter
    emb = vit.patch_embed(x).flatten(2).transpose(1, 2)
    assert_close(out["patches"], vit.norm(emb))
    assert_close(out["registers"], vit.norm(vit.registers).expand(2, -1, -1))
    deep = m.ViT(image_size=32, patch_size=4, dim=32, depth=2, heads=2, num_registers=0)
    o = deep(torch.randn(2, 3, 24, 16), return_norms=True, return_attn=True)  # any size divisible by the patch
    assert o["registers"].shape == (2, 0, 32) and o["patches"].shape == (2, 24, 32)
    assert o["norms"].shape == (3, 2, 25) and o["attn"][0].shape == (2, 2, 25, 25)
    # the write ratio |x_L - x_0| / |x_0|: 0 without blocks, ~LayerScale-sized with them, larger without LayerScale
    assert vit(x, return_norms=True)["write"].abs().max() == 0
    torch.manual_seed(0)
    w = {ls: m.ViT(image_size=32, patch_size=4, dim=32, depth=2, heads=2, num_registers=0, layerscale=ls)(
        x, return_norms=True)["write"][:, 1:].median().item() for ls in (1e-5, 0.0)}
    assert w[0.0] > 0.01 and w[1e-5] < 1e-3 * w[0.0]  # LayerScale 1e-5 scales the writes by ~1e-5
    # per block: what each block wrote relative to its input; with one block that is the whole write
    assert o["block_write"].shape == (2, 2, 25) and vit(x, return_norms=True)["block_write"].shape == (0, 2, 68)
    one = m.ViT(image_size=32, patch_size=4, dim=32, depth=1, heads=2, num_registers=0, layerscale=0.0)
    o1 = one(x, return_norms=True)
    assert_close(o1["block_write"][0], o1["write"])


def test_rope_depends_only_on_relative_offset():
    torch.manual_seed(0)
    rope = m.RoPE(head_dim=16).eval()
    sin, cos = rope(6, 6)  # (36, 16)
    q, k = torch.randn(16), torch.randn(16)

    def score(pq, pk):  # q at grid position pq, k at grid position pk, rotated as the ViT does
        iq, ik = pq[0] * 6 + pq[1], pk[0] * 6 + pk[1]
        rq = m.rope_apply(q.view(1, 1, 1, 16), sin[iq], cos[iq])
        rk = m.rope_apply(k.view(1, 1, 1, 16), sin[ik], cos[ik])
        return (rq * rk).sum()
    base = score((1, 2), (3, 0))
    assert_close(score((2, 3), (4, 1)), base, atol=1e-5)  # the same offset elsewhere: the same score
    assert_close(score((0, 4), (2, 2)), base, atol=1e-5)
    assert (score((1, 2), (3, 1)) - base).abs() > 1e-3  # another offset: another score
    # train mode jitters the coordinates, eval mode does not
    assert_close(rope(6, 6)[0], sin)
    rope.train()
    assert not torch.allclose(rope(6, 6)[0], sin)


def test_sdpa_equals_explicit_attention():
    torch.manual_seed(0)
    vit = m.ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=4, num_registers=2).eval()
    x = torch.randn(3, 3, 16, 16)
    fast, slow = vit(x), vit(x, return_attn=True)
    assert_close(fast["patches"], slow["patches"], atol=1e-5)
    assert_close(slow["attn"][0].sum(-1), torch.ones(3, 4, 19))  # 1 CLS + 2 registers + 16 patches


def test_attention_matches_textbook_multihead_attention_with_rope():
    # qkv channels are [q | k | v], each head-major (as in DINOv2/v3 checkpoints); RoPE rotates q and k
    torch.manual_seed(0)
    att, x = m.Attention(32, 4), torch.randn(2, 5, 32)
    sin, cos = torch.randn(5, 8), torch.randn(5, 8)  # any per-token tables (T, D_h)
    w = att.qkv(x)
    q, k, v = (w[..., i * 32:(i + 1) * 32].reshape(2, 5, 4, 8).transpose(1, 2) for i in range(3))  # (B, H, T, D_h)
    rot = lambda t: t * cos + torch.cat([-t[..., 4:], t[..., :4]], -1) * sin  # noqa: E731
    ref = ((rot(q) @ rot(k).transpose(-1, -2)) / 8 ** 0.5).softmax(-1) @ v
    ref = att.proj(ref.transpose(1, 2).reshape(2, 5, 32))
    assert_close(att(x, (sin, cos))[0], ref, atol=1e-5)
    assert_close(att(x, (sin, cos), return_attn=True)[0], ref, atol=1e-5)


def test_block_residual_is_layerscale_then_drop_path_then_add():
    torch.manual_seed(0)
    x, branch = torch.randn(64, 3, 8), torch.randn(64, 3, 8)
    for ls, p in ((0.1, 0.5), (0.0, 0.5), (0.1, 0.0), (0.0, 0.0)):
        blk = m.Block(8, 2, layerscale=ls, drop_path=p).train()
        lsm = blk.ls1
        torch.manual_seed(1)
        want = x + m.drop_path(lsm(branch), p, True)
        torch.manual_seed(1)
        assert_close(blk.residual(x, branch, lsm), want)
    # drop path drops whole samples: each sample got either nothing or 2 x gamma x branch
    blk = m.Block(8, 2, layerscale=0.1, drop_path=0.5).train()
    d = (blk.residual(x, branch, blk.ls1) - x) / (0.1 * branch)
    kept = d.flatten(1).mean(1)
    assert set(kept.round(decimals=4).tolist()) == {0.0, 2.0} and 16 < (kept > 1).sum() < 48
    blk.eval()
    assert_close(blk.residual(x, branch, blk.ls1), x + 0.1 * branch)  # eval: no drop path


def test_mask_token_replaces_masked_patches():
    vit = m.ViT(image_size=16, patch_size=4, dim=32, depth=1, heads=2, num_registers=1).eval()
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, :8] = True
    a, b = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    b[..., 8:, :] = a[..., 8:, :]  # same bottom half, different top half (the masked rows of patches)
    with torch.no_grad():
        vit.blocks[0].ls1.gamma.zero_()
        vit.blocks[0].ls2.gamma.zero_()  # no mixing: each output depends only on its own input token
    assert_close(vit(a, masks)["patches"], vit(b, masks)["patches"])


# ---- teachers ----------------------------------------------------------------------------------

def test_ema_momentum_limits():
    s, t = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    t0 = [p.clone() for p in t.parameters()]
    m.ema_update(t, s, 1.0)
    for a, b in zip(t.parameters(), t0):
        assert_close(a, b)
    m.ema_update(t, s, 0.0)
    for a, b in zip(t.parameters(), s.parameters()):
        assert_close(a, b)


def test_gram_teacher_is_frozen_copy_and_hires_matches_grid():
    args = args_for("--dim", "32", "--depth", "1", "--heads", "2", "--gram-hires")
    vit = m.build_backbone(args)
    g = m.make_gram_teacher(vit)
    assert not g.training and not any(p.requires_grad for p in g.parameters())
    with torch.no_grad():
        vit.cls_token.add_(1.0)
    assert not torch.equal(g.cls_token, vit.cls_token)  # a snapshot, not a view
    imgs = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    crops = m.multicrop(imgs, torch.Generator().manual_seed(0), **m.crop_kwargs(args))
    feats = m.gram_teacher_patches(g, imgs, crops, hires=args.gram_hires)
    assert feats.shape == (4, 64, 32)  # the 2x view's 16x16 map downsampled to the student's 8x8 grid


def test_schedules():
    args = args_for("--epochs", "10")
    s = m.make_schedules(args, 10)
    assert len(s["lr"]) == len(s["wd"]) == len(s["momentum"]) == len(s["teacher_temp"]) == 100
    peak = args.lr * math.sqrt(args.batch_size / 1024)
    assert s["lr"][0] == 0 and abs(max(s["lr"]) - peak) < 1e-9 and s["lr"][-1] < 2e-5
    # the reference's CosineScheduler: linspace(0, peak, warmup) reaches the peak at the warmup's last step
    warm = args.warmup_epochs * 10
    assert abs(s["lr"][warm - 1] - peak) < 1e-9 and abs(s["lr"][warm] - peak) < 1e-9
    assert abs(s["momentum"][0] - 0.992) < 1e-6 and s["momentum"][-1] > 0.9999
    assert abs(s["wd"][0] - 0.04) < 1e-6 and abs(s["wd"][-1] - 0.4) < 1e-3
    assert abs(s["teacher_temp"][0] - 0.04) < 1e-6 and s["teacher_temp"][-1] == 0.07


def test_param_groups_no_decay_and_layer_decay():
    model = m.DINOModel(m.ViT(dim=32, depth=2, heads=2, num_registers=2), 16, 32, 8)
    groups = m.param_groups(model, depth=2, layer_decay=0.5)
    name = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = name[id(p)]
            # the reference's rule (dinov3 `get_params_groups_with_decay`): no decay on biases, norms and
            # LayerScale gammas only; the CLS, register and mask tokens are decayed
            no_decay = n.endswith("bias") or "norm" in n or "gamma" in n
            assert (g["wd_mult"] == 0) == no_decay, n
            if n.endswith(("cls_token", "registers", "mask_token")):
                assert g["wd_mult"] == 1.0, n
            if "blocks.0." in n:
                assert g["lr_mult"] == 0.25
            if "patch_embed" in n:
                assert abs(g["lr_mult"] - 0.125 * 0.2) < 1e-12
            assert g["last_layer"] == ("last_layer" in n)


# ---- data --------------------------------------------------------------------------------------

def test_scenes_deterministic_and_masks_agree_with_labels():
    x1, y1, m1 = m.make_scenes("train", 50, 32, seed=3)
    x2, y2, m2 = m.make_scenes("train", 1200, 32, seed=3)
    assert torch.equal(x1, x2[:50]) and torch.equal(y1, y2[:50]) and torch.equal(m1, m2[:50])
    x3, _, _ = m.make_scenes("train", 50, 32, seed=4)
    xt, _, _ = m.make_scenes("test", 50, 32, seed=3)
    assert not torch.equal(x1, x3) and not torch.equal(x1, xt)
    assert x1.dtype == torch.uint8 and x1.shape == (50, 3, 32, 32) and m1.shape == (50, 32, 32)
    for i in range(50):  # the main object is the largest labelled region and carries the image's label
        counts = torch.bincount(m1[i].flatten().long(), minlength=11)[1:]
        assert counts.argmax().item() == y1[i].item()
    assert (m1 == 0).float().mean() > 0.4  # large background areas
    assert set(y2.tolist()) == set(range(10))
    xh, yh, mh = m.make_scenes("train", 20, 64, seed=3)  # the same scenes at another resolution
    assert torch.equal(yh, y1[:20])
    assert (F.interpolate(mh[:, None].float(), size=32, mode="nearest")[:, 0] == m1[:20]).float().mean() > 0.9


def test_textures_deterministic_and_masks_agree_with_labels():
    x1, y1, m1 = m.make_textures("test", 60, 32, seed=3)
    x2, y2, m2 = m.make_textures("test", 150, 32, seed=3, chunk=64)  # image i does not depend on n or chunking
    assert torch.equal(x1, x2[:60]) and torch.equal(y1, y2[:60]) and torch.equal(m1, m2[:60])
    x3, _, _ = m.make_textures("test", 60, 32, seed=4)
    xt, _, _ = m.make_textures("train", 60, 32, seed=3)
    assert not torch.equal(x1, x3) and not torch.equal(x1, xt)
    assert x1.dtype == torch.uint8 and x1.shape == (60, 3, 32, 32) and m1.shape == (60, 32, 32)
    assert m1.dtype == torch.uint8 and y2.min() >= 0 and y2.max() <= 9 and set(y2.tolist()) == set(range(10))
    # one object per image: its mask value is label + 1, everything else is background
    assert all(set(m1[i].unique().tolist()) == {0, y1[i].item() + 1} for i in range(60))
    fg = (m1 > 0).float().mean((1, 2))
    assert fg.min() > 0.1 and 0.3 < fg.mean() < 0.7  # a large object, with flat background around it
    # the class is the texture: `plain` objects are one colour (only the pixel noise, std 0.03), the others
    # have two tones far apart (>= 0.3 in mean absolute channel difference; `blobs` may show little of one)
    spread = torch.stack([x1[i].float().div(255)[:, m1[i] > 0].std(1).mean() for i in range(60)])
    plain = y1 == m.TEXTURES.index("plain")
    assert plain.any() and spread[plain].max() < 0.04 and spread[~plain].min() > 0.045 and spread[~plain].median() > 0.1
    # past one block (2,000 test images) the next block has its own generator: the first block stays the same
    xb, yb, mb = m.make_textures("test", 2050, 32, seed=3, chunk=700)
    assert torch.equal(xb[:150], x2) and torch.equal(mb[:150], m2) and len(yb) == 2050 and xb.shape[0] == 2050
    assert not torch.equal(xb[2000:2050], xb[:50]) and set(yb[2000:].tolist()) == set(range(10))
    xh, yh, mh = m.make_textures("test", 20, 64, seed=3)  # the same objects at another resolution
    assert torch.equal(yh, y1[:20])
    assert (F.interpolate(mh[:, None].float(), size=32, mode="nearest")[:, 0] == m1[:20]).float().mean() > 0.9


def test_multicrop_shapes_ranges_and_boxes():
    args = args_for("--local-crops", "3")
    imgs = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    out = m.multicrop(imgs, torch.Generator().manual_seed(0), **m.crop_kwargs(args))
    assert out["globals"].shape == (16, 3, 32, 32) and out["locals"].shape == (24, 3, 16, 16)
    lo = m.normalize(torch.zeros(1, 3, 1, 1)).min().item()
    hi = m.normalize(torch.ones(1, 3, 1, 1)).max().item()
    for v in (out["globals"], out["locals"]):
        assert v.min() >= lo - 1e-4 and v.max() <= hi + 1e-4
    boxes, _ = m.sample_boxes(20000, (0.32, 1.0), torch.Generator().manual_seed(1))
    area = boxes[:, 2] * boxes[:, 3]
    assert area.min() > 0.32 * 0.75 and area.max() <= 1.0  # clamped boxes can only shrink
    assert (boxes[:, 0] - boxes[:, 2] / 2 >= -1e-6).all() and (boxes[:, 0] + boxes[:, 2] / 2 <= 1 + 1e-6).all()
    # an identity box renders the image itself
    x = torch.rand(2, 3, 8, 8)
    same = m.render_crops(x, torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2), torch.tensor([False, True]), 8)
    assert_close(same[0], x[0], atol=1e-5)
    assert_close(same[1], x[1].flip(-1), atol=1e-5)


def test_photometric_probabilities():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 3, 4, 4) * 0.5 + 0.25
    gray = m.grayscale(x, g, p=0.2)
    frac = ((gray[:, 0] == gray[:, 1]) & (gray[:, 1] == gray[:, 2])).flatten(1).all(1).float().mean()
    assert abs(frac - 0.2) < 0.03
    jit = m.color_jitter(x, g)
    assert abs((jit != x).flatten(1).any(1).float().mean() - 0.8) < 0.03
    sol = m.solarize(torch.full((4000, 3, 2, 2), 0.9), g, p=0.2)
    assert abs((sol < 0.5).flatten(1).any(1).float().mean() - 0.2) < 0.03


def test_block_masks_exact_ratio():
    import random
    rng = random.Random(0)
    for n in (0, 3, 10, 32, 50):
        mk = m.block_mask(8, 8, n, rng)
        assert mk.shape == (64,) and mk.sum().item() == n
    args = args_for()
    masks = m.ibot_masks(200, 8, torch.Generator().manual_seed(0), **m.mask_kwargs(args))
    ratios = masks.float().mean(1)
    masked = ratios[ratios > 0]
    assert len(masked) == 100  # half of the global crops
    assert masked.min() >= 0.1 - 1 / 64 and masked.max() <= 0.5
    assert abs(masked.mean() - 0.3) < 0.03  # spread evenly over [0.1, 0.5]
    # the reference's collate: the i-th masked crop masks int(N * probs[i + 1]), the upper end of its slice
    probs = torch.linspace(0.1, 0.5, 101)
    assert sorted(masks.sum(1)[masks.sum(1) > 0].tolist()) == sorted(int(64 * p) for p in probs[1:].tolist())


# ---- real-dataset readers on small fakes in each format ---------------------------------------

def _fake_cifar(root, name, monkeypatch, n=12):
    """Fake CIFAR batches; their MD5s stand in for the published ones (checked before unpickling)."""
    import hashlib
    d = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(d)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    key = "labels" if name == "cifar10" else "fine_labels"
    for f in files:
        data = torch.randint(0, 255, (n, 3072), dtype=torch.uint8).numpy()
        with open(os.path.join(d, f), "wb") as fh:
            pickle.dump({"data": data, key: list(range(n))}, fh)
        monkeypatch.setitem(m.MD5, f, hashlib.md5(open(os.path.join(d, f), "rb").read()).hexdigest())


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reader(tmp_path, name, monkeypatch):
    _fake_cifar(str(tmp_path), name, monkeypatch)
    args = args_for("--dataset", name, "--data-dir", str(tmp_path))
    x, xk, yk, xt, yt, mt = m.load_data(args)
    assert x.shape == ((60 if name == "cifar10" else 12), 3, 32, 32) and x.dtype == torch.uint8
    assert yk[:12].tolist() == list(range(12)) and xt.shape == (12, 3, 32, 32) and mt is None


def test_stl10_reader(tmp_path):
    d = tmp_path / "stl10_binary"
    d.mkdir()
    img = torch.zeros(96, 96, 3, dtype=torch.uint8)
    img[:, :48] = 200  # left half bright: checks the column-major layout is undone
    col_major = img.permute(2, 1, 0).contiguous()  # STL-10 stores (C, W, H)
    for split, n in (("train", 3), ("test", 2), ("unlabeled", 4)):
        (d / f"{split}_X.bin").write_bytes(col_major.repeat(n, 1, 1, 1).numpy().tobytes())
        if split != "unlabeled":
            (d / f"{split}_y.bin").write_bytes(bytes([1, 10, 5][:n]))
    args = args_for("--dataset", "stl10", "--data-dir", str(tmp_path))
    x, xk, yk, xt, yt, _ = m.load_data(args)
    assert x.shape == (7, 3, 96, 96)  # unlabeled + train for self-supervised training
    assert xk.shape == (3, 3, 96, 96) and yk.tolist() == [0, 9, 4] and yt.tolist() == [0, 9]
    assert xk[0, 0, 10, 10] == 200 and xk[0, 0, 10, 80] == 0


def _fake_folder(root, classes=("cat", "dog"), per_class=12, bad=1):
    from PIL import Image
    for c in classes:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            Image.new("RGB", (40 + i, 30), (i * 10, 50, 100)).save(os.path.join(root, c, f"{i}.png"))
        for i in range(bad):
            open(os.path.join(root, c, f"broken{i}.jpg"), "w").write("not an image")


def test_folder_reader_skips_unreadable(tmp_path, capsys):
    _fake_folder(str(tmp_path))
    args = args_for("--dataset", "folder", "--data-dir", str(tmp_path), "--image-size", "16")
    x, xk, yk, xt, yt, _ = m.load_data(args)
    assert x.shape[1:] == (3, 16, 16) and len(x) + len(xt) == 24
    assert set(yk.tolist()) == {0, 1}
    assert "skipped" in capsys.readouterr().out


def test_imagenette_reader_uses_train_val(tmp_path):
    root = tmp_path / "imagenette2-160"
    _fake_folder(str(root / "train"), ("n01", "n02"), 5, 0)
    _fake_folder(str(root / "val"), ("n01", "n02"), 2, 0)
    args = args_for("--dataset", "imagenette", "--data-dir", str(tmp_path), "--image-size", "32")
    x, xk, yk, xt, yt, _ = m.load_data(args)
    assert x.shape == (10, 3, 32, 32) and xt.shape == (4, 3, 32, 32) and yt.tolist() == [0, 0, 1, 1]


def test_download_failure_is_one_paragraph(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise OSError("Temporary failure in name resolution")
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as e:
        m.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "could not fetch" in err and "--dataset scenes" in err and "--data-dir" in err and "Traceback" not in err


# ---- end to end --------------------------------------------------------------------------------

def test_end_to_end_run_writes_logs_and_summary(tmp_path):
    out = str(tmp_path / "run")
    summary = m.main(TINY + ["--epochs", "2", "--out-dir", out, "--gram", "--gram-teacher-epoch", "1",
                             "--gram-start", "1", "--eval-every", "1"])
    for key in ("knn_acc", "knn_acc_random_init", "knn_acc_raw_pixels", "images_per_s", "wall_s", "device",
                "config"):
        assert key in summary
    assert json.load(open(os.path.join(out, "summary.json")))["knn_acc"] == summary["knn_acc"]
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    steps = [r for r in recs if r["type"] == "step"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert len(steps) == 8 and len(evals) == 2
    for k in ("dino", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy", "dino_over_lnK"):
        assert k in steps[0]
    assert "gram" not in steps[0] and "gram" in steps[-1]  # the Gram loss switched on in epoch 1
    last = steps[-1]  # the Gram phase weighs the 2 x 2 local pairs by dino_local_weight against the 2 global ones;
    unit = (2 + last["dino_local_weight"] * 4) / 6  # the logged ratio to ln K is per unit weight
    assert last["dino_local_weight"] < 1 and steps[0]["dino_local_weight"] == 1
    assert last["dino_over_lnK"] == pytest.approx(last["dino"] / (unit * math.log(64)), abs=1e-3)
    assert all(math.isfinite(r["loss"]) for r in steps)
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["step"] == 8 and ck["gram_teacher"] is not None


def test_interrupt_and_resume_reproduce_uninterrupted_run(tmp_path, monkeypatch):
    argv = TINY + ["--epochs", "2", "--eval-every", "2"]
    ref = str(tmp_path / "ref")
    m.main(argv + ["--out-dir", ref])
    calls = {"n": 0}
    real = m.ema_update

    def interrupt_at_step_3(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # mid-epoch: the handler lets the step finish, saves and exits
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(m, "ema_update", interrupt_at_step_3)
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        m.main(argv + ["--out-dir", run])
    assert e.value.code == 128 + signal.SIGINT
    assert torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["step"] == 3
    monkeypatch.setattr(m, "ema_update", real)
    m.main(argv + ["--out-dir", run, "--resume"])
    a = torch.load(os.path.join(ref, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    for k in a["teacher"]:
        assert torch.equal(a["teacher"][k], b["teacher"][k]), k
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), k


def test_evaluating_does_not_change_the_training(tmp_path):
    """An evaluation (k-NN, dense probes, DSE, ...) measures the run without changing it: evaluating after every
    epoch or only at the end leaves the same weights, so --eval-every can be chosen freely."""
    argv = TINY + ["--epochs", "2", "--analyze-images", "32"]
    for ev in ("1", "2"):
        m.main(argv + ["--eval-every", ev, "--out-dir", str(tmp_path / ev)])
    a, b = (torch.load(str(tmp_path / ev / "checkpoint.pt"), weights_only=True) for ev in ("1", "2"))
    assert len([1 for line in open(tmp_path / "1" / "log.jsonl") if '"eval"' in line]) == 2
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), k


def test_resume_refuses_other_config_and_corrupt_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    m.main(TINY + ["--epochs", "1", "--out-dir", out])
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    with pytest.raises(SystemExit) as e:
        m.main(TINY + ["--epochs", "2", "--out-dir", out, "--resume", "--registers", "2"])
    assert e.value.code == 2 and "different configuration" in capsys.readouterr().err
    open(os.path.join(tmp_path, "bad.pt"), "wb").write(before[: len(before) // 2])
    os.replace(os.path.join(tmp_path, "bad.pt"), os.path.join(out, "checkpoint.pt"))
    with pytest.raises(SystemExit) as e:
        m.main(TINY + ["--epochs", "2", "--out-dir", out, "--resume"])
    assert e.value.code == 2 and "truncated or corrupt" in capsys.readouterr().err


# ---- command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--image-size", "30"], "multiples of --patch-size"),
    (["--local-size", "32"], "smaller than --image-size"),
    (["--registers", "-1"], "--registers must be 0 or more"),
    (["--mask-prob", "1.5"], "--mask-prob must be a probability"),
    (["--global-scale", "0.5", "1.2"], "--global-scale"),
    (["--dataset", "mnist"], "invalid choice"),
    (["--images", "photos"], "go with --analyze"),
])
def test_command_line_errors(argv, words, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "dinov3_mini.py"), "--out-dir", str(tmp_path)] + argv,
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_help_is_grouped_and_prints_real_defaults():
    text = m.get_args_parser().format_help()
    for group in ("model:", "data:", "augmentation:", "recipe and losses:", "Gram anchoring:",
                  "schedule and optimiser:", "run and output:", "modes (instead of training):"):
        assert "\n" + group in text, group
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 0.32 1.0)" in text and "(default: 64)" in text  # as typed on the command line
    assert "30% of" in text  # a default that depends on other flags is named in the text, not as None


def test_argument_error_is_one_line_pointing_to_help(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "dinov3_mini.py"), "--registers", "-1"],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--registers must be 0 or more" in r.stderr and "see --help" in r.stderr and "usage:" not in r.stderr


def test_ctrl_c_during_setup_exits_130_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):  # Ctrl-C while the baselines are computed, before the first step
        raise KeyboardInterrupt
    monkeypatch.setattr(m, "knn_raw_pixels", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        m.main(TINY + ["--out-dir", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.count("\n") == 1 and "nothing was written" in err, err
    assert not out.exists()
    out.mkdir()  # over an existing run with --overwrite: the old files stay exactly as they were
    (out / "checkpoint.pt").write_bytes(b"old run")
    (out / "log.jsonl").write_text("old log\n")
    with pytest.raises(SystemExit) as e:
        m.main(TINY + ["--out-dir", str(out), "--overwrite"])
    assert e.value.code == 130 and (out / "log.jsonl").read_text() == "old log\n"
    assert (out / "checkpoint.pt").read_bytes() == b"old run"
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl"]


@pytest.mark.parametrize("case", ["offline", "bad_folder", "batch_too_large"])
def test_run_failing_before_training_leaves_no_out_dir(tmp_path, capsys, monkeypatch, case):
    import torchvision.datasets.utils as tvu
    monkeypatch.setattr(tvu, "download_and_extract_archive", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    flags = {"offline": ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data")],
             "bad_folder": ["--dataset", "folder", "--data-dir", str(tmp_path / "missing")],
             "batch_too_large": TINY + ["--batch-size", "128"]}[case]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        m.main(flags + ["--out-dir", str(out), "--no-progress"])
    assert e.value.code in (1, 2) and "Traceback" not in capsys.readouterr().err
    assert not out.exists()


def test_resume_of_a_finished_run_changes_nothing_unless_epochs_are_raised(tmp_path, capsys):
    out = tmp_path / "run"
    first = m.main(TINY + ["--epochs", "1", "--out-dir", str(out)])
    files = {f: (out / f).read_bytes() for f in os.listdir(out)}
    capsys.readouterr()
    again = m.main(TINY + ["--epochs", "1", "--out-dir", str(out), "--resume"])
    assert "complete run" in capsys.readouterr().out and again == json.loads(json.dumps(first))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == files  # not a byte changed
    more = m.main(TINY + ["--epochs", "2", "--out-dir", str(out), "--resume"])  # --epochs raised: it trains on
    assert more["steps"] == 2 * first["steps"] and more["images_per_s"] > 0
    assert json.load(open(out / "summary.json"))["steps"] == more["steps"]


def test_progress_bar_shows_dino_loss_as_a_fraction_of_ln_k(tmp_path, capsys):
    out = tmp_path / "run"
    m.main([f for f in TINY if f != "--no-progress"] + ["--epochs", "1", "--out-dir", str(out)])
    bar = capsys.readouterr().err
    last = [r for r in map(json.loads, open(out / "log.jsonl")) if r["type"] == "step"][-1]
    assert f"dino/lnK={last['dino_over_lnK']:.3g}" in bar, bar[-400:]
    assert last["dino_over_lnK"] == pytest.approx(last["dino"] / math.log(64), abs=1e-3)


def test_reported_wall_time_includes_setup(tmp_path, monkeypatch):
    import time
    real = m.load_data

    def slow_data(args):  # a setup that takes a noticeable time, as data loading and the baselines do
        time.sleep(1.5)
        return real(args)
    monkeypatch.setattr(m, "load_data", slow_data)
    t = time.time()
    summary = m.main(TINY + ["--epochs", "1", "--out-dir", str(tmp_path / "run")])
    waited = time.time() - t
    assert waited - 0.3 <= summary["wall_s"] <= waited + 0.1


def test_presets_fill_defaults_and_explicit_flags_win():
    plain = args_for()
    for name, flags in m.PRESETS.items():
        a = args_for("--preset", name)
        assert all(getattr(a, k) == (tuple(v) if isinstance(v, list) else v) for k, v in flags.items()), name
        derived = {"preset", "warmup_epochs", "teacher_temp_warmup_epochs", "gram_teacher_epoch", "gram_start"}
        assert all(getattr(a, k) == v for k, v in vars(plain).items() if k not in flags and k not in derived)
    assert args_for("--preset", "artifacts").registers == 0
    assert args_for("--preset", "artifacts", "--registers", "4").registers == 4  # the fix: same run, 4 registers
    assert args_for("--registers", "2", "--preset", "artifacts").registers == 2  # order does not matter
    a = args_for("--preset", "collapse", "--epochs", "8", "--gram")
    assert a.registers == 4 and a.layerscale == 0 and a.gram_teacher_epoch == 2  # derived defaults follow the flags


def test_results_script_reuses_same_config_and_refuses_another(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import results  # bench/results.py: the experiments of docs/results.md
    flags = [f for f in TINY if f not in ("--no-progress",)] + ["--epochs", "1", "--analyze-images", "32"]
    out, summary, cmd = results.run("r", flags, str(tmp_path))
    assert cmd.startswith("python dinov3_mini.py --dim 32") and os.path.exists(os.path.join(out, "checkpoint.pt"))
    stamp = os.path.getmtime(os.path.join(out, "checkpoint.pt"))
    again = results.run("r", flags, str(tmp_path))  # a finished run with the same configuration: reused, not retrained
    assert again[1] == summary and os.path.getmtime(os.path.join(out, "checkpoint.pt")) == stamp
    with pytest.raises(SystemExit) as e:  # the same folder asked for another configuration: refused, nothing changed
        results.run("r", flags + ["--registers", "2"], str(tmp_path))
    assert "registers" in str(e.value) and os.path.getmtime(os.path.join(out, "checkpoint.pt")) == stamp
    assert results.mean_sd([0.1, 0.3, None])["mean"] == pytest.approx(0.2) and results.mean_sd([None]) is None
    # the long runs' record: every instrument at every evaluation, epoch 0 measured on the run's own init
    monkeypatch.setattr(results, "LONG", {"storage_long": {"r": flags}})
    (rec,) = results.long_runs("storage_long", str(tmp_path), str(tmp_path), {})
    assert rec["command"] == cmd and rec["registers"] == 4 and rec["finished"] and rec["gram"] is False
    assert [e["step"] for e in rec["evals"]] == [0, 4] and rec["evals"][0]["knn_acc"] == summary["knn_acc_random_init"]
    assert all(len(e["patch_norm_max_ratio_per_layer"]) == 3 for e in rec["evals"])
    assert os.path.getsize(tmp_path / "storage_long.png") > 1000
    monkeypatch.setattr(results, "NO_TRAIN", True)  # a run measured before whose folder is elsewhere: kept as it was
    monkeypatch.setattr(results, "LONG", {"storage_long": {"gone": flags}})
    assert results.long_runs("storage_long", str(tmp_path), str(tmp_path), {"storage_long": [rec]}) == [rec]


def test_run_queue_runs_side_by_side_and_skips_finished(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import run_queue  # bench/run_queue.py: the named experiments of results.py, a few at a time
    flags = [f for f in TINY if f != "--no-progress"] + ["--epochs", "1", "--analyze-images", "32"]
    monkeypatch.setattr(run_queue.results, "LEARNABLE", {})
    monkeypatch.setattr(run_queue.results, "LONG", {"k": {"a": flags, "b": flags + ["--registers", "0"]}})
    run_queue.main(["a", "b", "--lanes", "2", "--runs-dir", str(tmp_path)])
    for n, r in (("a", 4), ("b", 0)):
        summary = json.load(open(tmp_path / n / "summary.json"))
        assert summary["steps"] == 4 and summary["config"]["registers"] == r and (tmp_path / f"{n}.log").exists()
    run_queue.main(["a", "--runs-dir", str(tmp_path)])
    assert "a: finished, skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_queue.main(["nope", "--runs-dir", str(tmp_path)])


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"precious")
    r = subprocess.run([sys.executable, os.path.join(HERE, "dinov3_mini.py"), "--out-dir", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert (out / "checkpoint.pt").read_bytes() == b"precious"


def test_batch_larger_than_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        m.main(TINY + ["--batch-size", "128", "--out-dir", str(tmp_path / "o")])  # 64 images
    assert e.value.code == 2 and "larger than the 64 training images" in capsys.readouterr().err


def test_gram_teacher_from_checkpoint(tmp_path, capsys):
    first = str(tmp_path / "first")
    m.main(TINY + ["--epochs", "2", "--eval-every", "1", "--keep-teachers", "--out-dir", first])
    ck = os.path.join(first, "teachers", "epoch1.pt")  # --keep-teachers: the EMA teacher at each evaluation
    kept = [torch.load(os.path.join(first, "teachers", f"epoch{e}.pt"), weights_only=True) for e in (1, 2)]
    assert [k["step"] for k in kept] == [4, 8] and set(kept[0]) == {"teacher_backbone", "step", "args"}
    full = torch.load(os.path.join(first, "checkpoint.pt"), weights_only=True)
    final = full["teacher_backbone"]
    # the EMA teacher is its own copy that lags the student (a teacher sharing the student's weights gives the
    # DINO loss stuck at ln K and no error): after 8 steps every trained weight differs
    lagging = [k for k in full["student"] if k.startswith("backbone.blocks")]
    assert lagging and all(not torch.equal(full["student"][k], full["teacher"][k]) for k in lagging)
    assert all(torch.equal(kept[1]["teacher_backbone"][k], final[k]) for k in final)
    assert not torch.equal(kept[0]["teacher_backbone"]["cls_token"], final["cls_token"])
    summary = m.main(TINY + ["--epochs", "1", "--out-dir", str(tmp_path / "b"), "--gram", "--gram-teacher", ck,
                             "--gram-start", "0"])
    assert math.isfinite(summary["knn_acc"])
    recs = [json.loads(line) for line in open(os.path.join(tmp_path / "b", "log.jsonl"))]
    assert any("gram" in r for r in recs if r["type"] == "step")
    with pytest.raises(SystemExit) as e:  # a teacher of another width is refused, not a traceback
        m.main(TINY + ["--dim", "48", "--epochs", "1", "--out-dir", str(tmp_path / "c"), "--gram",
                       "--gram-teacher", ck])
    assert e.value.code == 2 and "another shape" in capsys.readouterr().err


def test_collapse_alarm():
    args = args_for("--prototypes", "1024")
    lnk = math.log(1024)
    flat = [{"dino_over_lnK": 0.999, "teacher_entropy": 6.9}] * 3
    sharp = [{"dino_over_lnK": 0.1, "teacher_entropy": 0.01}] * 3
    healthy = [{"dino_over_lnK": 0.6, "teacher_entropy": 0.5 * lnk}] * 3
    assert "ln K" in m.collapse_alarm(flat, args)
    assert "entropy" in m.collapse_alarm(sharp, args)
    assert m.collapse_alarm(healthy, args) is None and m.collapse_alarm([], args) is None


def test_torchrun_two_processes_match_one(tmp_path):
    """gloo, 2 CPU processes: the first step's DINO loss equals the single-process one on the same global
    batch, and after 4 steps the teachers agree (KoLeo off: the reference computes it per process)."""
    argv = TINY + ["--epochs", "1", "--koleo-weight", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        os.path.join(HERE, "dinov3_mini.py")] + argv + ["--out-dir", str(tmp_path / "ddp")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m.main(argv + ["--out-dir", str(tmp_path / "one")])
    first = [json.loads(open(tmp_path / d / "log.jsonl").readline()) for d in ("ddp", "one")]
    # equal up to float32 round-off, which the division by the teacher temperature (0.04) amplifies; a sharding
    # bug (a wrong crop pairing, an un-reduced Sinkhorn sum) moves the loss by 1e-2 or more
    assert abs(first[0]["dino"] - first[1]["dino"]) < 1e-4 * abs(first[1]["dino"])
    evals = [[json.loads(x) for x in open(tmp_path / d / "log.jsonl") if '"eval"' in x][-1] for d in ("ddp", "one")]
    # k-NN on features gathered from the 2 processes; the teachers differ by float round-off, which may
    # flip a near-tie among the 2000 test images
    assert abs(evals[0]["knn_acc"] - evals[1]["knn_acc"]) <= 0.0025
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["teacher"] for d in ("ddp", "one"))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4


def test_torchrun_sigterm_saves_and_resumes(tmp_path):
    """SIGTERM to the whole torchrun process group (what Ctrl-C or a scheduler does): the 2 processes agree
    at the next logging interval, rank 0 saves, and --resume continues from that step."""
    import time
    out = tmp_path / "ddp"
    argv = TINY + ["--epochs", "200", "--num-images", "128", "--out-dir", str(out), "--log-every", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.join(HERE, "dinov3_mini.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGTERM)
    text = p.communicate(timeout=120)[0]
    assert "SIGTERM: saved" in text, text[-2000:]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 200 * 8 and step % 2 == 0  # saved at an agreed logging interval, mid-run
    r = subprocess.run(cmd + [a if a != "200" else "1" for a in argv] + ["--resume"], capture_output=True,
                       text=True, env=env, timeout=120)  # fewer epochs: the run is already past them
    assert f"resumed from {out / 'checkpoint.pt'} at step {step}" in r.stdout + r.stderr


def _gather_worker(rank, store, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    vit = m.ViT(image_size=16, patch_size=4, dim=32, depth=1, heads=2, num_registers=1)
    f = m.gather_features(vit, m.make_scenes("test", 51, 16)[0], 16, torch.device("cpu"))  # 51: uneven slices
    if rank == 0:
        torch.save(f, out)
    dist.destroy_process_group()


def test_gather_features_equals_one_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path / "f.pt")), nprocs=2)
    torch.manual_seed(0)
    vit = m.ViT(image_size=16, patch_size=4, dim=32, depth=1, heads=2, num_registers=1)
    one = m.extract_features(vit, m.make_scenes("test", 51, 16)[0], 16, torch.device("cpu"))
    two = torch.load(tmp_path / "f.pt")
    for k in ("cls", "mean"):
        assert two[k].shape == one[k].shape == (51, 32)
        assert_close(two[k], one[k])


def test_non_finite_loss_stops_with_step_and_part_and_keeps_checkpoint(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    calls = {"n": 0}
    real = m.koleo_loss

    def koleo_goes_nan(x, eps=1e-8):  # two calls per step (one per global crop); NaN from step 6 on
        calls["n"] += 1
        return real(x, eps) * (float("nan") if calls["n"] > 12 else 1.0)
    monkeypatch.setattr(m, "koleo_loss", koleo_goes_nan)
    with pytest.raises(SystemExit) as e:
        m.main(TINY + ["--epochs", "3", "--out-dir", out, "--log-every", "3"])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite at step 6" in err and "koleo" in err and "intact" in err
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["step"] == 4  # the end of epoch 1, saved before the NaN; nothing after it
    assert all(torch.isfinite(v).all() for v in ck["student"].values())


@pytest.mark.parametrize("layout", ["missing", "no_classes", "no_images"])
def test_folder_missing_or_empty_is_a_usage_error(tmp_path, capsys, layout):
    root = tmp_path / "imgs"
    if layout != "missing":
        root.mkdir()
    if layout == "no_images":
        (root / "cat").mkdir()
        (root / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit) as e:
        m.main(["--dataset", "folder", "--data-dir", str(root), "--out-dir", str(tmp_path / "o"), "--no-progress"])
    assert e.value.code == 2
    assert "--data-dir" in capsys.readouterr().err


# ---- analysis: the instruments for the two failures ---------------------------------------------

def test_outlier_rule_finds_planted_token_and_not_healthy_ones():
    torch.manual_seed(0)
    healthy = (torch.randn(200, 64, 32).norm(dim=-1))  # chi-distributed norms, a skewed healthy bulk
    assert m.find_outliers(healthy).sum() == 0
    planted = healthy.clone()
    planted[7, 13] *= 8  # one artifact-like token, 8x the bulk
    out = m.find_outliers(planted)
    assert out.sum() == 1 and out[7, 13]
    two_modes = torch.cat([torch.randn(1000), 10 + torch.randn(1000)])
    assert m.bimodality(two_modes) > 5 / 9 > m.bimodality(torch.randn(2000))


def test_dense_probe_scores_exact_features_high_and_noise_low():
    torch.manual_seed(0)
    y = torch.randint(0, 11, (4000,))
    exact = F.one_hot(y, 11).float() + 0.01 * torch.randn(4000, 11)
    assert m.dense_probe(exact[:2000], y[:2000], exact[2000:], y[2000:]) > 0.95
    noise = torch.randn(4000, 16)
    assert m.dense_probe(noise[:2000], y[:2000], noise[2000:], y[2000:]) < 0.15  # chance is 1/21 per class


def test_effective_rank_of_rank_r_features():
    torch.manual_seed(0)
    for r in (1, 4, 16):
        x = torch.randn(2000, r) @ torch.randn(r, 64)
        assert 0.8 * r <= m.effective_rank(x) <= r + 0.01  # float32 round-off adds a hair


def test_dense_structure_terms():
    # DSE = inter + dim - intra (Dai et al. 2025). One direction per image, B orthonormal ones: every draw of one
    # patch per image has effective rank B (dim = 1) and no cluster has any spread (intra = 0)
    B, N, D = 8, 16, 16
    onehot = torch.eye(D)[:B, None, :].expand(B, N, D)
    r = m.dense_structure(3 * onehot, group=4, local_k=2, global_k=4)
    assert abs(r["dim"] - 1) < 1e-4 and abs(r["intra"]) < 1e-4, r
    # tight clusters spread less than noise; a collapsed field (one direction) has dim near 1 / min(B, D)
    # and the lowest DSE; the measure does not depend on the features' scale
    g = torch.Generator().manual_seed(0)
    B = 16
    centres = torch.randn(4, D, generator=g)
    clustered = centres[torch.randint(4, (B, N), generator=g)] + 0.05 * torch.randn(B, N, D, generator=g)
    noise = torch.randn(B, N, D, generator=g)
    collapsed = torch.randn(D, generator=g) + 0.01 * torch.randn(B, N, D, generator=g)
    c, n, k = (m.dense_structure(z, group=4, global_k=8) for z in (clustered, noise, collapsed))
    assert c["intra"] < 0.5 * n["intra"] and k["dim"] < 0.1 < n["dim"], (c, n, k)
    assert k["dse"] < min(c["dse"], n["dse"])
    assert abs(m.dense_structure(10 * noise, group=4, global_k=8)["dse"] - n["dse"]) < 1e-4
    # fewer patches than clusters (one 4x4 image): one-point clusters have no spread, nothing fails
    assert math.isfinite(m.dense_structure(torch.randn(1, 16, 8, generator=g))["dse"])


def test_similarity_locality_and_patch_labels():
    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    masks[:, :4, :4] = 3  # one object in the top-left quarter
    lab = m.patch_labels(masks, 4)  # 2x2-pixel patches
    assert lab.shape == (2, 16) and (lab == 3).sum() == 8 and set(lab.unique().tolist()) == {0, 3}
    local = F.one_hot(lab, 4).float()  # features that say which object a patch is on
    score, chance = m.similarity_locality(local, lab)
    assert score > 0.999 and abs(chance - 3 / 15) < 1e-6
    flat = torch.ones(2, 16, 4)  # every patch the same: similarity is spread evenly
    assert abs(m.similarity_locality(flat, lab)[0] - chance) < 1e-6


def test_analyze_command_writes_pictures_and_every_metric(tmp_path, capsys):
    out = str(tmp_path / "run")
    m.main(TINY + ["--epochs", "1", "--out-dir", out, "--analyze-images", "64"])
    rec = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))][-1]
    assert rec["type"] == "eval" and 0 <= rec["dense_miou"] <= 1 and rec["outlier_fraction"] is not None
    assert isinstance(rec["dse"], float) and 0 < rec["register_cls_attention_share"] < 1
    ratios = rec["patch_norm_max_ratio_per_layer"]  # one max/median per layer: the embedding, then each block
    assert len(ratios) == 3 and min(ratios) >= 1 and len(rec["patch_write_max_per_layer"]) == 2  # TINY: depth 2
    metrics = m.main(["--analyze", out, "--analyze-images", "64"])
    saved = json.load(open(os.path.join(out, "analysis", "metrics.json")))
    for k in ("outlier_fraction", "outlier_background_share", "outlier_cls_attention_share", "register_norm_mean",
              "patch_norm_median", "dense_miou", "patch_effective_rank", "patch_cls_cosine", "similarity_locality"):
        assert k in saved and k in metrics
    for k in ("dense_miou", "patch_effective_rank", "patch_cls_cosine", "similarity_locality", "register_norm_mean",
              "dse"):
        assert isinstance(saved[k], float)
    for name in ("norm_hist", "norms_per_layer", "norm_maps", "cls_attention", "register_attention",
                 "pca_similarity"):
        path = os.path.join(out, "analysis", name + ".png")
        assert os.path.getsize(path) > 1000
    m.main(["--plot-log", out])
    assert os.path.getsize(os.path.join(out, "analysis", "log.png")) > 1000
    assert "dense_miou" in capsys.readouterr().out


def test_benchmark_prints_table_and_json(capsys):
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import benchmark  # bench/benchmark.py
    res = benchmark.main(["--dim", "32", "--depth", "2", "--heads", "2", "--head-hidden", "64",
                  "--prototypes", "64", "--batch-size", "8", "--local-crops", "2", "--gram"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("train_img_per_s", "data_img_per_s", "flops_per_img", "achieved_tflops", "peak_tflops", "mfu",
              "peak_mem_mb", "device"):
        assert k in last and last[k] == res[k]
    assert last["flops_per_img"] > 0 and 0 < last["mfu"] < 1.5 and last["losses"] == "dino+ibot+koleo+gram"


def test_profile_step_charges_forward_and_backward_to_modules(capsys, monkeypatch):
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import profile_step  # bench/profile_step.py
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--dim", "32", "--depth", "2", "--heads", "2",
                                      "--head-hidden", "64", "--prototypes", "64", "--batch-size", "8",
                                      "--local-crops", "2", "--gram", "--steps", "1"])
    profile_step.main()
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    parts = res["parts"]
    for p in ("student/attention forward", "student/attention backward", "student/mlp backward",
              "student/dino head backward", "student/ibot head backward", "teacher/attention forward",
              "gram teacher/mlp forward", "data -", "optimiser -", "ema -", "losses forward"):
        assert p in parts, p
    assert parts["student/mlp backward"]["matmul"] > 0 and parts["student/attention forward"]["attention kernel"] > 0
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0, abs=1e-3)
    assert parts.get("unattributed -", {"share": 0})["share"] < 0.05  # (almost) every op is charged to a part
    assert not any(k.startswith("teacher/") and k.endswith("backward") for k in parts)  # no grad in the teacher


# ---- the GPU path, as far as a CPU can check it --------------------------------------------------

def _gpu_suite():
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import gpu_suite  # bench/gpu_suite.py
    return gpu_suite


def test_bf16_autocast_step_matches_fp32_step():
    """The autocast code path of the training step is device-independent: under CPU bf16 autocast one full-recipe
    step (DINO + iBOT + KoLeo + Gram) from the same weights, crops and draws gives every loss part within the
    suite's tolerance of the fp32 step, finite gradients and a gradient that points the same way."""
    gs = _gpu_suite()
    args = args_for(*TINY, "--gram", "--epochs", "4", "--batch-size", "4")
    r = gs.correctness_step(args, torch.device("cpu"))
    assert set(r["checks"]) == {"dino", "ibot", "koleo", "gram", "total"}
    assert r["ok"], r["checks"]
    assert r["fp32"]["grads_finite"] and r["bfloat16"]["grads_finite"] and r["grad_cosine"] > 0.99
    assert 0 < r["checks"]["dino"]["abs_diff"] < 0.05  # bf16 really ran (not the same numbers) and stayed close
    assert r["fp32"]["n_grads"] == r["bfloat16"]["n_grads"] > 10


def test_compiled_block_matches_eager():
    """torch.compile traces one transformer block (RoPE, SDPA, LayerScale and drop-path residual) in one graph
    (fullgraph: no graph break), forward and backward agree with eager. Backend aot_eager: the tracing and the
    autograd graph without generating kernels, which on this CPU would take minutes."""
    try:
        import torch._dynamo  # noqa: F401
    except Exception as e:  # a torch build without dynamo
        pytest.skip(f"torch.compile unavailable: {e}")
    torch.manual_seed(0)
    blk = m.Block(16, 2, layerscale=0.1, drop_path=0.0)
    rope = m.RoPE(head_dim=8).eval()
    sin, cos = rope(4, 4)
    P = 1 + 2  # CLS + 2 registers, unrotated
    r = (F.pad(sin, (0, 0, P, 0)), F.pad(cos, (0, 0, P, 0), value=1.0))
    x = torch.randn(3, P + 16, 16, requires_grad=True)
    try:
        cblk = torch.compile(blk, backend="aot_eager", fullgraph=True)
        y_c, _ = cblk(x, r)
    except Exception as e:
        if "not supported" in str(e).lower() or "unsupported" in str(e).lower():
            pytest.skip(f"torch.compile unsupported here: {e}")
        raise
    y_c.square().sum().backward()
    g_c = x.grad.clone()
    x.grad = None
    y, _ = blk(x, r)
    y.square().sum().backward()
    assert_close(y_c, y, atol=1e-5)
    assert_close(g_c, x.grad, atol=1e-4)


def test_supervised_control_trains_logs_instruments_and_resumes(tmp_path):
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import supervised_control  # bench/supervised_control.py: the same ViT trained with labels
    out = str(tmp_path / "sup")
    flags = TINY + ["--dataset", "textures", "--batch", "16", "--eval-every", "2", "--warmup", "2",
                    "--analyze-images", "32", "--out-dir", out]
    supervised_control.main(flags + ["--steps", "4"])
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["knn_acc"] <= 1 and math.isfinite(r["loss"])
        assert r["outlier_fraction"] is not None and r["register_norm_mean"] is not None and "dse" in r
    with pytest.raises(SystemExit):  # an existing run is never overwritten
        supervised_control.main(flags + ["--steps", "4"])
    supervised_control.main(flags + ["--steps", "6", "--resume"])
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))] == [2, 4, 6]


def test_storage_miniature_counts_targets_and_reads_background_tokens(capsys):
    """bench/storage_miniature.py: the label is the number of hollow targets (distractors are solid and not
    counted), the background is one flat colour, and a background token made 5x the others by a block is
    what its instruments report (an outlier at the layer it was written, none at the embedding)."""
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import storage_miniature as sm
    x, y, m = sm.counting_images(64, torch.Generator().manual_seed(0), distractors=4)
    cells = m.view(64, 8, 4, 8, 4).sum((2, 4))  # object pixels per 4 x 4 patch: 12 for a rim, 16 for a solid one
    assert torch.equal((cells == 12).sum((1, 2)), y) and (cells == 16).any() and y.min() == 0
    bg = (m.view(64, -1) == 0)
    for i in range(64):  # the background pixels of an image share one colour
        px = x[i].view(3, -1)[:, bg[i]]
        assert torch.equal(px, px[:, :1].expand_as(px))
    vit = sm.dm.ViT(image_size=32, patch_size=4, dim=32, depth=2, heads=2, num_registers=0, layerscale=0.0)

    class Boost(torch.nn.Module):  # the last block, then 5x on one background token of every image
        def __init__(self, blk):
            super().__init__()
            self.blk = blk

        def forward(self, x, rope=None, return_attn=False):
            x, attn = self.blk(x, rope, return_attn)
            x = x.clone()
            x[:, 1 + first_bg] *= 5
            return x, attn
    first_bg = int(bg[0].nonzero()[0])
    vit.blocks[-1] = Boost(vit.blocks[-1])
    x1, m1 = x[:1].repeat(32, 1, 1, 1), m[:1].repeat(32, 1, 1)
    r = sm.background_instruments(vit, x1, m1, 0)
    assert r["bg_outlier_fraction"][0] == 0 and r["bg_outlier_fraction"][-1] > 0
    assert r["bg_max_over_median"][-1] > 3 > r["bg_max_over_median"][0]
    sm.main(["--steps", "2", "--eval-every", "2", "--dim", "32", "--registers", "2"])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["step"] == 2 and len(rec["bg_max_over_median"]) == 7 and 0 <= rec["cls_attention_on_registers"] <= 1


def test_results_records_the_supervised_control(tmp_path, monkeypatch):
    """bench/results.py --only storage_supervised: every evaluation of each control run, its final ViT measured
    like --analyze, and the two figures (instruments per step; norms of 0 vs 4 registers on the same images)."""
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import results
    import supervised_control
    base = TINY + ["--dataset", "textures", "--batch", "16", "--eval-every", "2", "--warmup", "2", "--steps", "4",
                   "--analyze-images", "32"]
    flags = {f"sup_r{r}": ["--dataset", "textures", "--steps", "4", "--registers", str(r)] for r in (0, 4)}
    for name, f in flags.items():
        supervised_control.main(base + ["--registers", f[-1], "--out-dir", str(tmp_path / name)])
    monkeypatch.setattr(results, "SUPERVISED", flags)
    recs = results.supervised(str(tmp_path), str(tmp_path), {})
    assert [r["registers"] for r in recs] == [0, 4] and all([e["step"] for e in r["evals"]] == [2, 4] for r in recs)
    assert recs[0]["command"] == "python bench/supervised_control.py --dataset textures --steps 4 --registers 0"
    assert all(r["final_analysis"]["outlier_fraction"] is not None for r in recs)
    assert os.path.getsize(tmp_path / "storage_supervised.png") > 1000
    assert os.path.getsize(tmp_path / "storage_supervised_norms.png") > 1000
    kept = results.supervised(str(tmp_path / "elsewhere"), str(tmp_path), {"storage_supervised": recs})
    assert kept == recs  # runs measured before whose folders are elsewhere: kept as they were


def test_gpu_suite_smoke_runs_every_part(tmp_path):
    """bench/gpu_suite.py --smoke: every part on the CPU at toy size within its budget; the JSON holds every
    part without an error, and --out holds at most 8 plain files (what the device machine brings back)."""
    out, work = tmp_path / "out", tmp_path / "work"
    t = time.time()
    # a budget with room for a slow or shared 2-core machine (at 165 s a loaded machine left part 3 no time)
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench", "gpu_suite.py"), "--smoke", "--budget-s", "240",
                        "--out", str(out), "--work-dir", str(work)], capture_output=True, text=True, timeout=600,
                       cwd=HERE,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.time() - t
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(out / "gpu_results.json"))
    assert res["errors"] == {}, res["errors"]
    assert wall < res["budget_s"] + 30 and res["elapsed_s"] <= res["budget_s"] + 15
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and all(os.path.isfile(out / f) for f in files)
    assert {"gpu_results.json", "gpu_log.txt", "learning_curves.png", "storage_norms.png", "dense_curves.png"} <= set(files)
    P = res["parts"]
    assert P["environment"]["matmul_peak_tflops"] > 0
    assert P["correctness"]["bf16_vs_fp32"]["ok"] and "command" in P["correctness"]["compile"]
    assert P["speed"]["eager"]["tiny@32"]["train_img_per_s"] > 0 and "mfu_vs_part1_peak" in P["speed"]["eager"]["tiny@32"]
    assert "skipped" in P["speed"]["lightly"] or "ratio" in P["speed"]["lightly"]
    runs = P["learning"]["runs"]
    assert set(runs) >= {"a_default_tiny", "b_artifacts_r0", "b_artifacts_r4", "c_collapse_base", "c_collapse_gram"}
    for name, r in runs.items():
        assert r["command"].startswith("python dinov3_mini.py") and "returncode" in r
        if r["returncode"] == 0:  # finished in time (on a busy machine a run may be stopped at the deadline)
            assert r["evals"] and r["evals"][-1]["knn_acc"] is not None and "outlier_fraction" in r["evals"][-1]
    assert "--gram-start" in runs["c_collapse_gram"]["command"] and "--registers 0" in runs["b_artifacts_r0"]["command"]
    assert P["summary"]["table"] and os.path.getsize(out / "learning_curves.png") > 1000


# ---- the tutorial notebook -----------------------------------------------------------------------

def _notebook():
    import nbformat
    return nbformat.read(os.path.join(HERE, "tutorial.ipynb"), as_version=4)


def test_committed_notebook_holds_an_error_free_executed_run():
    """The notebook in the repository shows the outputs of a run: every code cell executed, none failed."""
    nb = _notebook()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cells and all(c.execution_count for c in cells), "tutorial.ipynb is committed without its outputs"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"tutorial.ipynb holds an error output: {errors[0].ename}: {errors[0].evalue}"
    images = sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)
    assert images >= 10, f"only {images} figures in the committed notebook"


def test_notebook_runs_top_to_bottom_in_fast_mode(tmp_path, monkeypatch):
    """DINOV3_MINI_FAST=1 executes every cell (toy trainings) in a fresh kernel; any cell error fails the test."""
    from nbclient import NotebookClient
    monkeypatch.setenv("DINOV3_MINI_FAST", "1")
    monkeypatch.setenv("PYTHONPATH", HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = _notebook()
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "mode: FAST" in out and "this notebook ran in" in out
    assert os.path.exists(tmp_path / "tutorial_runs_fast" / "storage_r0" / "analysis" / "norm_hist.png")


# ---- the released models: official names and shapes (random values), an independent forward pass ----------------

def _official_block(sd, b, D, hidden, g, bias_mask=False):
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
               b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
               b + "ls1.gamma": 1 + r(D), b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
               b + "mlp.fc1.weight": r(hidden, D), b + "mlp.fc1.bias": r(hidden), b + "mlp.fc2.weight": r(D, hidden),
               b + "mlp.fc2.bias": r(D), b + "ls2.gamma": 1 + r(D)})
    if bias_mask:  # DINOv3's mask_k_bias: ones on q and v, zeros on k
        sd[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])


def _dinov2_state_dict(D, depth, R, G=37, p=14, seed=0):
    """The keys and shapes of dinov2's DinoVisionTransformer.state_dict() (block_chunks=0, as the hub builds it)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + G * G, D), "mask_token": r(1, D)}
    if R:
        sd["register_tokens"] = r(1, R, D)
    sd.update({"patch_embed.proj.weight": r(D, 3, p, p), "patch_embed.proj.bias": r(D)})
    for i in range(depth):
        _official_block(sd, f"blocks.{i}.", D, 4 * D, g)
    sd.update({"norm.weight": 1 + r(D), "norm.bias": r(D)})
    return sd


def _dinov3_state_dict(D, depth, heads, R=4, p=16, seed=0):
    """The keys and shapes of dinov3's DinoVisionTransformer.state_dict() for the released ViT-S/B/L/16."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    dh = D // heads
    sd = {"cls_token": r(1, 1, D), "storage_tokens": r(1, R, D), "mask_token": r(1, D),
          "patch_embed.proj.weight": r(D, 3, p, p), "patch_embed.proj.bias": r(D),
          "rope_embed.periods": 100.0 ** (2 * torch.arange(dh // 4) / (dh // 2)) * (1 + r(dh // 4).abs())}
    for i in range(depth):
        _official_block(sd, f"blocks.{i}.", D, 4 * D, g, bias_mask=True)
    sd.update({"norm.weight": 1 + r(D), "norm.bias": r(D)})
    return sd


def _ref_forward(sd, x, heads, eps, R, pos=None, periods=None, masks=None):
    """DINOv2/v3's backbone written from their definitions, on the official names: patch embedding, mask token,
    learned positions (CLS and patches) or RoPE (patches only), pre-norm blocks with LayerScale, final norm."""
    B, D, p = x.shape[0], sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    h, w = x.shape[2] // p, x.shape[3] // p
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    if masks is not None:
        t = torch.where(masks[..., None], sd["mask_token"], t)
    t = torch.cat([sd["cls_token"].expand(B, 1, D), t], 1)
    if pos is not None:  # pos = (offset, antialias): interpolate_pos_encoding's rule
        table = sd["pos_embed"]
        G = int(round((table.shape[1] - 1) ** 0.5))
        grid = table[:, 1:]
        if (h, w) != (G, G):
            img = grid.reshape(1, G, G, D).permute(0, 3, 1, 2)
            kw = {"scale_factor": ((h + pos[0]) / G, (w + pos[0]) / G)} if pos[0] else {"size": (h, w)}
            grid = F.interpolate(img, mode="bicubic", antialias=pos[1], **kw).permute(0, 2, 3, 1).reshape(1, h * w, D)
        t = t + torch.cat([table[:, :1], grid], 1)
    regs = sd.get("register_tokens", sd.get("storage_tokens", torch.zeros(1, 0, D)))
    t = torch.cat([t[:, :1], regs.expand(B, -1, -1), t[:, 1:]], 1)  # registers after the positions: none for them
    if periods is not None:  # axial RoPE: coordinates in [-1, 1], [h angles, w angles] tiled twice, rotate-half
        ch, cw = (torch.arange(0.5, h) / h) * 2 - 1, (torch.arange(0.5, w) / w) * 2 - 1
        yx = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).reshape(-1, 2)
        ang = (2 * math.pi * yx[:, :, None] / periods).reshape(h * w, -1).repeat(1, 2)
        sin, cos = ang.sin(), ang.cos()
    n_pre, dh = 1 + regs.shape[1], D // heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        a = F.layer_norm(t, (D,), g("norm1.weight"), g("norm1.bias"), eps)
        bias = g("attn.qkv.bias") * sd.get(f"blocks.{i}.attn.qkv.bias_mask", 1)
        q, k, v = (a @ g("attn.qkv.weight").T + bias).reshape(B, -1, 3, heads, dh).permute(2, 0, 3, 1, 4)
        if periods is not None:
            rot = lambda z: torch.cat([z[..., :n_pre, :], z[..., n_pre:, :] * cos + torch.cat(  # noqa: E731
                [-z[..., n_pre:, dh // 2:], z[..., n_pre:, :dh // 2]], -1) * sin], -2)
            q, k = rot(q), rot(k)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(dh)).softmax(-1) @ v
        t = t + g("ls1.gamma") * (att.transpose(1, 2).reshape(B, -1, D) @ g("attn.proj.weight").T + g("attn.proj.bias"))
        a = F.layer_norm(t, (D,), g("norm2.weight"), g("norm2.bias"), eps)
        a = F.gelu(a @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
        t = t + g("ls2.gamma") * a
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps)
    return t[:, 0], t[:, 1:n_pre], t[:, n_pre:]


def _our_name(k):
    """The map the loaders must apply, written out independently: official name -> the file's ViT's name."""
    for a, b in (("register_tokens", "registers"), ("storage_tokens", "registers"),
                 ("patch_embed.proj.", "patch_embed."), (".mlp.fc1.", ".mlp.0."), (".mlp.fc2.", ".mlp.2."),
                 ("local_cls_norm.", "local_norm.")):
        k = k.replace(a, b)
    return k


@pytest.mark.parametrize("name, D, depth, R", [
    ("vits14", 384, 12, 0), ("vits14_reg", 384, 12, 4),  # the full official layout of ViT-S
    ("vitb14", 768, 2, 0), ("vitb14_reg", 768, 2, 4), ("vitl14", 1024, 2, 0), ("vitl14_reg", 1024, 2, 4)])
def test_dinov2_state_dict_loads_every_key_and_matches_an_independent_forward(name, D, depth, R):
    sd = _dinov2_state_dict(D, depth, R)
    vit = m.load_dinov2(sd)
    ours = vit.state_dict()
    assert (vit.dim, len(vit.blocks), vit.num_registers, vit.patch_size) == (D, depth, R, 14)
    assert vit.blocks[0].attn.heads == D // 64 and vit.pos_interp == ((0.0, True) if R else (0.1, False))
    for k, v in sd.items():  # every official tensor sits, unchanged, under its name here
        assert torch.equal(ours[_our_name(k)], v.reshape(ours[_our_name(k)].shape)), k
    assert set(ours) == {_our_name(k) for k in sd} | ({"registers"} if not R else set())  # nothing left at init
    x = torch.randn(2, 3, 56, 70)  # a 4 x 5 grid: the 37 x 37 table is interpolated (offset, antialias)
    masks = torch.rand(2, 20) < 0.3
    with torch.no_grad():
        for mk in (None, masks):
            out = vit(x, masks=mk)
            cls, regs, patches = _ref_forward(sd, x, D // 64, 1e-6, R, pos=((0.0, True) if R else (0.1, False)),
                                              masks=mk)
            assert_close(out["cls"], cls, atol=1e-4)
            assert_close(out["patches"], patches, atol=1e-4)
            assert out["registers"].shape == (2, R, D) and (not R or torch.allclose(out["registers"], regs, atol=1e-4))


def test_dinov2_positions_unchanged_on_the_native_grid_and_interpolated_elsewhere():
    sd = _dinov2_state_dict(64, 1, 0, G=4)
    vit = m.load_dinov2(sd)
    assert torch.equal(vit.positions(4, 4), sd["pos_embed"])  # 56 px = the stored 4 x 4 grid: no interpolation
    with torch.no_grad():
        for size in ((56, 56), (112, 84)):
            x = torch.randn(1, 3, *size)
            assert_close(vit(x)["patches"], _ref_forward(sd, x, 1, 1e-6, 0, pos=(0.1, False))[2], atol=1e-4)


def test_dinov3_state_dict_maps_storage_tokens_rope_periods_layerscale_and_mask_k_bias():
    sd = _dinov3_state_dict(384, 2, heads=6)
    sd["local_cls_norm.weight"], sd["local_cls_norm.bias"] = torch.rand(384), torch.rand(384)  # ViT-L SAT: local crops
    vit = m.load_dinov3(sd)
    assert vit.local_norm is not None  # used in training only: the eval forward below never reads it
    assert (vit.dim, len(vit.blocks), vit.num_registers, vit.patch_size, vit.blocks[0].attn.heads) == (384, 2, 4, 16, 6)
    assert vit.pos_embed is None and torch.equal(vit.rope.periods, sd["rope_embed.periods"])
    ours = vit.state_dict()
    for k, v in sd.items():
        if k.endswith("qkv.bias"):  # the k part of the bias is masked out (mask_k_bias)
            assert torch.equal(ours[k], v * sd[k + "_mask"]) and ours[k][384:768].abs().max() == 0
        elif k != "rope_embed.periods" and "bias_mask" not in k:
            assert torch.equal(ours[_our_name(k)], v.reshape(ours[_our_name(k)].shape)), k
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = vit(x)
    cls, regs, patches = _ref_forward(sd, x, 6, 1e-5, 4, periods=sd["rope_embed.periods"])
    assert_close(out["cls"], cls, atol=1e-4)
    assert_close(out["registers"], regs, atol=1e-4)
    assert_close(out["patches"], patches, atol=1e-4)


def test_released_loader_refuses_what_it_cannot_map():
    giant = _dinov2_state_dict(64, 1, 0, G=2)
    for k in [k for k in giant if ".mlp." in k]:
        del giant[k]
    giant.update({"blocks.0.mlp.w12.weight": torch.zeros(340, 64), "blocks.0.mlp.w3.weight": torch.zeros(64, 170)})
    with pytest.raises(m.CheckpointError, match=r"blocks\.0\.mlp\.w12\.weight.*SwiGLU"):
        m.load_released(giant)
    extra = {**_dinov2_state_dict(64, 1, 0, G=2), "head.weight": torch.zeros(10, 64)}
    with pytest.raises(m.CheckpointError, match="head.weight"):
        m.load_released(extra)
    missing = _dinov2_state_dict(64, 1, 0, G=2)
    del missing["norm.weight"]
    with pytest.raises(m.CheckpointError, match="norm.weight"):
        m.load_released(missing)
    with pytest.raises(m.CheckpointError, match="neither"):
        m.load_released({"weight": torch.zeros(3)})


def test_matches_the_official_dinov2_and_dinov3_code_when_it_is_importable():
    """With facebookresearch/dinov2 and /dinov3 on the path (PYTHONPATH): their modules, random weights, our ViT."""
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    from functools import partial
    v2 = pytest.importorskip("dinov2.models.vision_transformer")
    torch.manual_seed(0)
    for R in (0, 4):  # dinov2_vits14 and dinov2_vits14_reg as dinov2/hub/backbones.py builds them, 2 blocks
        ref = v2.DinoVisionTransformer(
            img_size=518, patch_size=14, embed_dim=384, depth=2, num_heads=6, init_values=1.0, block_chunks=0,
            block_fn=partial(v2.Block, attn_class=v2.MemEffAttention), num_register_tokens=R,
            interpolate_antialias=R > 0, interpolate_offset=0.0 if R else 0.1).eval()
        with torch.no_grad():
            for prm in ref.parameters():
                prm.normal_(0, 0.1).add_(1.0 if prm.ndim == 1 and prm.shape[0] == 384 else 0.0)
        vit = m.load_dinov2(ref.state_dict())
        for size in ((224, 224), (518, 518), (98, 126)):
            x = torch.randn(2, 3, *size)
            with torch.no_grad():
                a, b = ref.forward_features(x), vit(x)
            for k, o in (("x_norm_clstoken", "cls"), ("x_norm_regtokens", "registers"),
                         ("x_norm_patchtokens", "patches")):
                if R or o != "registers":
                    assert_close(b[o], a[k], atol=1e-4)
    v3 = pytest.importorskip("dinov3.hub.backbones")
    ref = v3._make_dinov3_vit(  # dinov3_vits16's configuration, 2 blocks
        patch_size=16, pos_embed_rope_base=100, pos_embed_rope_normalize_coords="separate",
        pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32", embed_dim=384, depth=2, num_heads=6,
        ffn_ratio=4, qkv_bias=True, layerscale_init=1e-5, norm_layer="layernormbf16", ffn_layer="mlp",
        n_storage_tokens=4, mask_k_bias=True, pretrained=False).eval()
    ref.init_weights()
    with torch.no_grad():
        for prm in ref.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    vit = m.load_dinov3(ref.state_dict())
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        a, b = ref.forward_features(x), vit(x)
    for k, o in (("x_norm_clstoken", "cls"), ("x_storage_tokens", "registers"), ("x_norm_patchtokens", "patches")):
        assert_close(b[o], a[k], atol=1e-4)


def test_analyze_a_released_model_end_to_end_from_a_weights_file(tmp_path, capsys):
    """--analyze NAME --weights PATH on a small DINOv2-shaped state dict saved as the hub saves it."""
    from PIL import Image
    w = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(_dinov2_state_dict(64, 2, 4, G=4), w)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (80 + 10 * i, 70), (40 * i, 90, 200)).save(photos / f"{i}.png")
    metrics = m.main(["--analyze", "dinov2_vits14_reg", "--weights", str(w), "--images", str(photos),
                      "--image-size", "112", "--out-dir", str(tmp_path / "out")])
    out = tmp_path / "out" / "dinov2_vits14_reg"
    saved = json.load(open(out / "metrics.json"))
    assert saved["outlier_fraction"] == metrics["outlier_fraction"] and saved["image_size"] == 112
    for name in ("norm_hist", "norms_per_layer", "norm_maps", "cls_attention", "register_attention", "pca_similarity"):
        assert os.path.getsize(out / f"{name}.png") > 1000
    # a weights file given directly, on matplotlib's sample photo
    torch.save(_dinov2_state_dict(64, 2, 0, G=4), tmp_path / "v2.pth")
    m.main(["--analyze", str(tmp_path / "v2.pth"), "--image-size", "56", "--out-dir", str(tmp_path / "out")])
    assert json.load(open(tmp_path / "out" / "v2" / "metrics.json"))["images"].startswith("grace_hopper")
    assert "outlier_fraction" in capsys.readouterr().out


def test_released_weights_offline_is_one_paragraph(tmp_path, capsys, monkeypatch):
    import urllib.error

    def offline(url, **kw):
        assert url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
        assert kw["weights_only"] is True
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as e:
        m.main(["--analyze", "dinov2_vitl14_reg", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "--weights" in err and "dinov2_vitl14_reg4_pretrain.pth" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # DINOv3: behind a licence form, never downloaded here
        m.main(["--analyze", "dinov3_vitl16", "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "licence" in capsys.readouterr().err


def test_a_checkpoint_that_carries_code_is_refused_everywhere(tmp_path, capsys):
    """Every checkpoint read is torch.load(weights_only=True): a pickle whose __reduce__ calls os.mkdir never runs."""
    marker = tmp_path / "the_pickle_ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"teacher": Payload(), "args": {}, "step": 0}, run / "checkpoint.pt")
    torch.save({"cls_token": Payload()}, tmp_path / "weights.pth")
    with pytest.raises(m.CheckpointError, match="posix.mkdir|os.mkdir"):
        m.load_teacher(str(run))
    for argv in (["--analyze", str(run)], ["--analyze", "dinov2_vits14", "--weights", str(tmp_path / "weights.pth")],
                 ["--analyze", str(tmp_path / "weights.pth")], TINY + ["--out-dir", str(run), "--resume"]):
        with pytest.raises(SystemExit) as e:
            m.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "more than tensors" in err and "Traceback" not in err, argv
    assert not marker.exists()


def test_downloads_and_pickled_data_are_checked_against_published_md5s(tmp_path, monkeypatch):
    import hashlib
    import torchvision.datasets.utils as tvu
    f = tmp_path / "small.bin"
    f.write_bytes(b"dinov3-mini")
    m.check_md5(str(f), hashlib.md5(b"dinov3-mini").hexdigest())  # the right checksum passes
    with pytest.raises(m.DataUnavailable, match="published MD5"):
        m.check_md5(str(f), "0" * 32)
    seen = {}

    def fake_download(url, download_root, md5=None):
        seen[url] = md5
        raise OSError("offline")
    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    with pytest.raises(m.DataUnavailable):
        m._read_cifar(str(tmp_path), "cifar10")
    assert seen == {"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
    # a batch file replaced by a pickle that carries code is refused before it is unpickled
    marker = tmp_path / "the_pickle_ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    _fake_cifar(str(tmp_path / "c"), "cifar10", monkeypatch)
    with open(tmp_path / "c" / "cifar-10-batches-py" / "data_batch_1", "wb") as fh:
        pickle.dump(Payload(), fh)
    with pytest.raises(m.DataUnavailable, match="data_batch_1 does not have the published MD5"):
        m._read_cifar(str(tmp_path / "c"), "cifar10")
    assert not marker.exists()
