"""Where one training step's time goes: a torch.profiler trace of the step, attributed to the parts of the model.

    python bench/profile_step.py --model tiny --ibot-weight 0 --koleo-weight 0   # the DINO-only step of bench/README.md
    python bench/profile_step.py --model tiny --gram                             # the full recipe
    python bench/profile_step.py --compile ...                                   # the torch.compile'd step
    python bench/profile_step.py --steps 5 --top-ops 20 ...                      # more steps; the top 20 ops

Any flag of dinov3_mini.py is accepted. The step is the one bench/benchmark.py times: multi-crop (+ iBOT masks),
teacher forward, student forward, losses, backward, gradient clipping, AdamW, EMA. After --warmup steps,
--steps steps are profiled on the CPU (torch.profiler, self time of every op). Each op is charged to a part:
forward ops to the innermost module they ran in (forward hooks open a profiler scope per module), backward ops
to the module whose forward op created them (matched by autograd sequence number), the rest to the step's
phases (data, losses, clip, optimiser, EMA). Within a part, ops are split into matmul (mm, addmm, bmm, linear,
conv), attention kernel (SDPA) and everything else (element-wise, copies, reductions). Prints one table (ms
per step and share) and, last, one JSON line. Profiling adds overhead per op: compare shares, not absolute ms.
"""
import copy
import json
import os
import sys
from collections import defaultdict

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dinov3_mini as dm  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::convolution",
          "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward", "aten::baddbmm")
ATTENTION = ("scaled_dot_product", "flash_attention")


def label_modules(model, prefix):
    """Open a profiler scope 'mod::<prefix>/<part>' around the forward of every module worth a row."""
    def part(name, m):
        if isinstance(m, dm.Attention):
            return "attention"
        if isinstance(m, nn.LayerNorm):
            return "layernorm"
        if isinstance(m, dm.RoPE):
            return "rope angles"
        if isinstance(m, dm.DINOHead):
            return name.split(".")[-1].replace("_", " ")  # dino head / ibot head
        if name.endswith(".mlp") and isinstance(m, nn.Sequential) and "head" not in name:
            return "mlp"
        if name.endswith("patch_embed"):
            return "patch embed"
        return None
    stack = []
    for name, m in model.named_modules():
        p = part(name, m)
        if p is None:
            continue
        scope = f"mod::{prefix}/{p}"

        def pre(mod, inp, scope=scope):
            stack.append(_enter(scope))

        def post(mod, inp, out):
            stack.pop().__exit__(None, None, None)
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
    # everything else the model runs: token concat, RoPE padding, the blocks' residual updates (Block.residual)
    model.register_forward_pre_hook(lambda mod, inp: stack.append(_enter(f"mod::{prefix}/other")))
    model.register_forward_hook(lambda mod, inp, out: stack.pop().__exit__(None, None, None))


def _enter(scope):
    rf = torch.profiler.record_function(scope)
    rf.__enter__()
    return rf


def kind(name):
    if any(a in name for a in ATTENTION):
        return "attention kernel"
    if name in MATMUL or name.startswith(("aten::mm", "aten::addmm", "aten::bmm")):
        return "matmul"
    return "other"


def attribute(events):
    """events: prof.events() -> ({(part, direction): {kind: self us}}, {(part, direction, op): self us})."""
    def scope_of(e):
        while e is not None:
            if e.name.startswith(("mod::", "step::")):
                return e.name.split("::", 1)[1]
            e = e.cpu_parent
        return "unattributed"

    def grad_fn_of(e):  # the autograd node a backward op runs under
        while e is not None:
            if e.name.startswith("autograd::engine::evaluate_function"):
                return e
            e = e.cpu_parent
        return None
    fwd_scope = {}  # sequence number of a forward op -> its scope
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and "Backward" not in e.name:
            fwd_scope.setdefault(e.sequence_nr, scope_of(e))
    out, ops = defaultdict(lambda: defaultdict(float)), defaultdict(float)
    for e in events:
        if e.name.startswith(("mod::", "step::")) or e.self_cpu_time_total == 0:
            continue
        node = grad_fn_of(e)
        if node is not None:  # a backward op: charge it to the forward op's module
            seq = next((c.sequence_nr for c in [node] + list(node.cpu_children) if c.sequence_nr >= 0), -1)
            scope = fwd_scope.get(seq, "losses") if seq >= 0 else "gradient accumulation"
            direction = "backward"
        else:
            scope, direction = scope_of(e), "forward"
        if scope.startswith(("teacher/", "gram teacher/")):
            direction = "forward"  # no grad: forward only
        elif "/" not in scope and scope != "losses":
            direction = "-"  # a phase of the step (data, clip, optimiser, EMA), not a module
        out[(scope, direction)][kind(e.name)] += e.self_cpu_time_total
        ops[(scope, direction, e.name)] += e.self_cpu_time_total
    return out, ops


def main():
    own = {"--steps": 3, "--top-ops": 0}  # this script's flags; the rest go to dinov3_mini's parser
    argv = sys.argv[1:]
    for flag in own:
        if flag in argv:
            i = argv.index(flag)
            own[flag] = int(argv[i + 1])
            argv = argv[:i] + argv[i + 2:]
    steps = own["--steps"]
    parser = dm.get_args_parser()
    args = dm.resolve_args(dm.parse_args(parser, argv), parser)
    torch.manual_seed(args.seed)
    B, grid = args.batch_size, args.image_size // args.patch_size
    images = dm.make_scenes("train", max(B, 256), args.image_size * (2 if args.gram_hires else 1), args.seed)[0]
    student = dm.DINOModel(dm.build_backbone(args), args.prototypes, args.head_hidden, args.head_bottleneck,
                           args.norm_last_layer)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    gram_teacher = dm.make_gram_teacher(teacher.backbone) if args.gram else None
    opt = torch.optim.AdamW(dm.param_groups(student, args.depth, args.layer_decay), lr=1e-4)
    sched = dm.make_schedules(args, 100)
    sched["steps_per_epoch"] = 1
    args.gram_start, args.gram_ramp_epochs = 0, 1e-9  # the Gram loss at full weight, as in bench/benchmark.py
    label_modules(student, "student")
    label_modules(teacher, "teacher")
    if gram_teacher is not None:
        label_modules(gram_teacher, "gram teacher")
    model, teacher_fwd = (torch.compile(student), torch.compile(teacher)) if args.compile else (student, teacher)
    gen = torch.Generator().manual_seed(args.seed)

    def step(i):
        with torch.profiler.record_function("step::data"):
            batch = images[(torch.arange(B) + i * B) % len(images)]
            crops = dm.multicrop(batch, gen, **dm.crop_kwargs(args))
            masks = dm.ibot_masks(2 * B, grid, gen, **dm.mask_kwargs(args)) if args.ibot_weight > 0 else None
        with torch.profiler.record_function("step::losses"):
            total, _, _ = dm.compute_losses(model, teacher_fwd, gram_teacher, batch, crops, masks, 50, sched, args)
        opt.zero_grad(set_to_none=True)
        total.backward()
        with torch.profiler.record_function("step::clip"):
            dm.clip_gradients(student, args.clip_grad)
        with torch.profiler.record_function("step::optimiser"):
            opt.step()
        with torch.profiler.record_function("step::ema"):
            dm.ema_update(teacher, student, 0.996)

    for i in range(3):
        step(i)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(3 + i)
    table, ops = attribute(prof.events())
    total = sum(sum(v.values()) for v in table.values())
    rows = sorted(table.items(), key=lambda kv: -sum(kv[1].values()))
    kinds = ("matmul", "attention kernel", "other")
    print(f"profile: {args.model} (dim {args.dim}, depth {args.depth}), batch {B}, 2x{args.image_size} + "
          f"{args.local_crops}x{args.local_size} px, {torch.get_num_threads()} threads, {steps} steps; "
          f"ms per step (self CPU time)" + (", compiled" if args.compile else ""))
    print(f"  {'part':34s} {'dir':9s} {'matmul':>8s} {'attn':>8s} {'other':>8s} {'total':>8s} {'share':>6s}")
    res = {}
    for (scope, direction), v in rows:
        t = sum(v.values())
        res[f"{scope} {direction}"] = {k: round(v[k] / steps / 1e3, 2) for k in kinds} | {"share": round(t / total, 4)}
        print(f"  {scope:34s} {direction:9s} " + " ".join(f"{v[k] / steps / 1e3:8.1f}" for k in kinds)
              + f" {t / steps / 1e3:8.1f} {100 * t / total:5.1f}%")
    by_kind = {k: sum(v[k] for v in table.values()) / total for k in kinds}
    print(f"  {'all':44s} " + " ".join(f"{100 * by_kind[k]:7.1f}%" for k in kinds) + f" {total / steps / 1e3:8.1f}")
    for (scope, direction, name), t in sorted(ops.items(), key=lambda kv: -kv[1])[:own["--top-ops"]]:
        print(f"  op {name:40s} in {scope} {direction}: {t / steps / 1e3:.1f} ms ({100 * t / total:.1f}%)")
    print(json.dumps({"ms_per_step": round(total / steps / 1e3, 1), "share_by_kind": by_kind, "parts": res}))


if __name__ == "__main__":
    main()
