"""What one training step of dinov3_mini.py costs, and how much of the hardware it uses.

    python bench/benchmark.py                                      # the nano default on this machine
    python bench/benchmark.py --model tiny --ibot-weight 0 --koleo-weight 0   # the DINO-only step
    python bench/benchmark.py --model tiny --gram                  # the full recipe (DINO + iBOT + KoLeo + Gram)
    python bench/benchmark.py --model small --image-size 96 --compile        # compiled (GPU; slow to start)

Any flag of dinov3_mini.py is accepted (model, crops, losses, --device, --compile, --preset). It times the full
training step (multi-crop, teacher and student forwards, every loss that is on, backward, clipping, AdamW, EMA;
--gram: the Gram loss at full weight from the first step) and the data pipeline alone, counts the FLOPs of one
step with torch.utils.flop_counter (matmuls, convolutions and attention, forward and backward; element-wise
work not counted), measures the matmul peak of the same device and dtype (2048^2 fp32 on a CPU, 8192^2 bf16
on CUDA, the dtype the training step computes in), and prints a table and, last, one JSON line. Medians of
--reps steps after --warmup warm-up steps; with --compile the warm-up steps' times are reported too (the first
one holds the compilation).
"""
import copy
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dinov3_mini as dm  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_matmul_peak(device, dtype, n=None, reps=10):
    """Measured matmul peak (TFLOP/s) of this device and dtype: median of `reps` square n x n matmuls after
    two warm-up ones (n: 8192 on CUDA, 2048 elsewhere)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / sorted(times[2:])[reps // 2] / 1e12


def autocast_for(device):
    """The training step's precision, as in train(): bf16 autocast on CUDA, fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def make_step(args, device, compile_backend=None):
    """The training step of train(), on a fixed pool of `scenes` images, for timing.

    Returns (data, step, eager_step): data(i) -> (batch, crops, masks); step(batch, crops, masks) runs one full
    step (compiled student and teacher when args.compile, with compile_backend or torch's default); eager_step
    the same step uncompiled (the FLOP counter needs it)."""
    torch.manual_seed(args.seed)
    B, grid = args.batch_size, args.image_size // args.patch_size
    images = dm.make_scenes("train", max(B, 256), args.image_size * (2 if args.gram_hires else 1), args.seed)[0]
    images = images.to(device)
    student = dm.DINOModel(dm.build_backbone(args), args.prototypes, args.head_hidden, args.head_bottleneck,
                   args.norm_last_layer).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    gram_teacher = dm.make_gram_teacher(teacher.backbone) if args.gram else None
    opt = torch.optim.AdamW(dm.param_groups(student, args.depth, args.layer_decay), lr=1e-4,
                            fused=device.type in ("cuda", "cpu"))  # as train()
    sched = dm.make_schedules(args, 100)
    sched["steps_per_epoch"] = 1
    bargs = copy.copy(args)
    bargs.gram_start, bargs.gram_ramp_epochs = 0, 1e-9  # the Gram loss at full weight from step 0
    if args.compile:
        kw = {"backend": compile_backend} if compile_backend else {}
        model, teacher_fwd = torch.compile(student, **kw), torch.compile(teacher, **kw)
    else:
        model, teacher_fwd = student, teacher
    gen = torch.Generator().manual_seed(args.seed)
    amp = autocast_for(device)

    def data(i):
        batch = images[(torch.arange(B, device=device) + i * B) % len(images)]
        crops = dm.multicrop(batch, gen, **dm.crop_kwargs(args))
        masks = dm.ibot_masks(2 * B, grid, gen, **dm.mask_kwargs(args)).to(device) if args.ibot_weight > 0 else None
        return batch, crops, masks

    def run(student_fwd, teacher_f, batch, crops, masks):
        with amp:
            total, _, _ = dm.compute_losses(student_fwd, teacher_f, gram_teacher, batch, crops, masks, 50, sched, bargs)
        opt.zero_grad(set_to_none=True)
        total.backward()
        dm.clip_gradients(student, args.clip_grad)
        opt.step()
        dm.ema_update(teacher, student, 0.996)

    return data, lambda *b: run(model, teacher_fwd, *b), lambda *b: run(student, teacher, *b)


def benchmark(args, warmup=3, reps=10, compile_backend=None, quiet=False, peak_n=None):
    """Time the full step, the model step on fixed crops and the data pipeline; count FLOPs; return a dict
    (also printed as a table and one JSON line unless quiet)."""
    from torch.utils.flop_counter import FlopCounterMode
    device = dm.pick_device(args.device)
    B = args.batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    data, step, eager_step = make_step(args, device, compile_backend)
    first = []  # the warm-up steps' times (with --compile the first holds the compilation)

    def timed(fn, keep=None):
        ts = []
        for i in range(warmup + reps):
            sync(device)
            t = time.perf_counter()
            fn(i)
            sync(device)
            ts.append(time.perf_counter() - t)
        if keep is not None:
            keep += ts[:warmup]
        return sorted(ts[warmup:])[reps // 2]  # the median, after warm-up

    t_full = timed(lambda i: step(*data(i)), first)
    fixed = data(0)
    t_model = timed(lambda i: step(*fixed))
    t_data = timed(data)
    flop = FlopCounterMode(display=False)
    with flop:
        eager_step(*fixed)
    flops_per_img = flop.get_total_flops() / B
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        import resource
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measure_matmul_peak(device, dtype, n=peak_n)
    achieved = flops_per_img * B / t_model / 1e12
    res = {"train_img_per_s": round(B / t_full, 2), "model_step_img_per_s": round(B / t_model, 2),
           "data_img_per_s": round(B / t_data, 1), "data_to_step_speed": round(t_full / t_data, 1),
           "flops_per_img": round(flops_per_img), "achieved_tflops": round(achieved, 4),
           "peak_tflops": round(peak, 4), "mfu": round(achieved / peak, 4), "peak_mem_mb": round(peak_mem, 1),
           "warmup_step_s": [round(t, 3) for t in first], "compiled": bool(args.compile),
           "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
           "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "batch_size": B,
           "torch": torch.__version__, "model": f"{args.model} dim {args.dim} depth {args.depth} heads {args.heads}",
           "crops": f"2x{args.image_size}px + {args.local_crops}x{args.local_size}px, patch {args.patch_size}",
           "losses": "dino" + ("+ibot" if args.ibot_weight > 0 else "") + ("+koleo" if args.koleo_weight > 0 else "")
           + ("+gram" if args.gram else "")}
    if quiet:
        return res
    rows = [("full training step (data + model)", f"{res['train_img_per_s']:.1f} img/s", f"{1000 * t_full:.0f} ms"),
            ("model step alone (fwd, bwd, AdamW, EMA)", f"{res['model_step_img_per_s']:.1f} img/s",
             f"{1000 * t_model:.0f} ms"),
            ("data pipeline alone (multi-crop + masks)", f"{res['data_img_per_s']:.1f} img/s",
             f"{1000 * t_data:.0f} ms"),
            ("FLOPs per image (counted)", f"{flops_per_img / 1e9:.3f} GFLOP", ""),
            ("achieved / measured matmul peak", f"{1000 * achieved:.1f} / {1000 * peak:.1f} GFLOP/s",
             f"MFU {100 * res['mfu']:.1f}%"),
            ("peak memory", f"{peak_mem:.0f} MB", "")]
    print(f"benchmark: {res['model']}, {res['crops']}, batch {B}, losses {res['losses']}, {res['device']} "
          f"{res['dtype']}{', compiled' if args.compile else ''}, medians of {reps} steps after {warmup} warm-up")
    for r in rows:
        print(f"  {r[0]:42s} {r[1]:>26s} {r[2]:>12s}")
    if args.compile:
        print(f"  warm-up steps (the first compiles): {', '.join(f'{t:.1f} s' for t in first)}")
    print(json.dumps(res))
    return res


def main(argv=None):
    parser = dm.get_args_parser()
    parser.prog, parser.description = "bench/benchmark.py", __doc__.split("\n")[0]
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps before each timing.")
    parser.add_argument("--reps", type=int, default=10, help="Timed steps; the median is reported.")
    parser.add_argument("--peak-n", type=int, default=None, help="Size of the matmuls that measure the peak "
                        "(default 8192 on CUDA, 2048 elsewhere).")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend with --compile (default: "
                        "torch's, inductor; aot_eager traces without generating code).")
    args = dm.parse_args(parser, argv)
    if args.warmup < 1 or args.reps < 1:
        parser.error(f"--warmup and --reps must be at least 1, got {args.warmup} and {args.reps}.")
    return benchmark(args, args.warmup, args.reps, args.compile_backend, peak_n=args.peak_n)


if __name__ == "__main__":
    main()
