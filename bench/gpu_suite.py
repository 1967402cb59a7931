"""The project's GPU results in one command: ten minutes of one GPU, run once, everything written to one folder.

    PYTHONUNBUFFERED=1 python bench/gpu_suite.py --budget-s 480 --out "$OUT"    # on a machine with one GPU
    python bench/gpu_suite.py --smoke --out /tmp/gpu_smoke                       # every part at toy size on a CPU

It stops on its own inside --budget-s, whatever it measured. Each part runs in a `try`: an error is recorded in
gpu_results.json and the rest goes on; the JSON is rewritten after every part, so a kill leaves what was done.
Everything it leaves in --out: gpu_results.json, gpu_log.txt and three PNGs (5 files, none in subfolders);
the runs' own folders go to --work-dir (a temporary folder by default). Parts, in order, each sized from what
the earlier ones measured (docs/gpu.md has the plan and the expected time of each):

  1. environment   GPU, torch, CUDA; the measured bf16 matmul peak (8192^3, median of 10 after 2 warm-up)
  2. correctness   one full-recipe step (DINO + iBOT + KoLeo + Gram) under bf16 autocast against the same step in
                   fp32 (same weights, crops, masks and random draws): each loss part within TOLERANCE, every
                   gradient finite; then the compiled step (bench/benchmark.py --compile): compile time, speed
  3. speed         bench/benchmark.py for tiny and small at 32 and 96 px globals (eager; compiled while the time
                   before part 4 lasts): img/s of the step and of the data pipeline, MFU against part 1's peak,
                   peak memory; bench/vs_lightly.py on the GPU when lightly's wheels were carried (.whl/)
  4. learning      concurrent trainings (`python dinov3_mini.py ...`, instruments logged at every evaluation):
                   how many at once maximise total throughput (measured), then (a) the default recipe at tiny on
                   50,000 images; (b) 0 vs 4 registers with --preset artifacts at the largest model and size that
                   still gets MIN_STEPS steps; (c) --preset collapse with and without Gram anchoring (early Gram
                   teacher); each run's epochs sized from part 3's throughput so it ends in time
  5. summary       gpu_results.json (every figure, the exact command of every run), learning_curves.png,
                   storage_norms.png (norm histograms, maps and curves of (b)), dense_curves.png (of (c))

Part 4 gets at least half of the budget; when time is short the compiled variants go first.
"""
import argparse
import copy
import glob
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext

T_START = time.time()  # before torch is imported: the budget counts the imports

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import dinov3_mini as dm  # noqa: E402
import benchmark as bm  # noqa: E402  (bench/benchmark.py)

DATASET = "textures"  # the built-in dataset every run of part 4 trains on: switch it here (or --dataset)
# |bf16 - fp32| <= rtol * |fp32| + atol for each loss part of one step from the same weights and crops. bf16 keeps
# 8 bits of mantissa (relative rounding 2^-9 per operation); the cross-entropies sit near ln K (about 8.3) and
# move by ~1e-4 between precisions on a CPU (tiny at init), KoLeo by ~1e-3, the Gram MSE (a difference of two
# near-equal similarity matrices) by ~0.3%; the bounds leave about 10x room for CUDA's kernels (flash attention).
TOLERANCE = {"dino": (1e-2, 1e-2), "ibot": (1e-2, 1e-2), "koleo": (2e-2, 2e-2), "gram": (5e-2, 2e-3),
             "total": (1e-2, 1e-2)}
GRAD_COSINE_MIN = 0.99  # the bf16 step's gradient (all parameters, flattened) against the fp32 one

# The sizes of the real suite and of --smoke (toy models on a CPU, a few steps, a tiny budget).
TOY = ["--dim", "32", "--depth", "2", "--heads", "2", "--head-hidden", "64", "--prototypes", "64", "--local-crops", "2"]
FULL = dict(models={"tiny": ["--model", "tiny"], "small": ["--model", "small"]}, sizes=(32, 96), batch=64,
            matmul_n=8192, bench=(3, 10), compile_backend=None, compile_cap_s=240.0, probe_k=(5, 10), probe_window=6.0,
            learn_images=50000, fail_images=20000, analyze_images=1000, min_steps=2000, eval_points=6,
            pre4_share=0.42, reserve_s=30.0, grace_s=25.0, startup_s=12.0, safety=0.85, max_epochs=None)
SMOKE = dict(models={"tiny": ["--model", "tiny"] + TOY, "small": ["--model", "small", "--dim", "48", "--depth", "2",
                                                                  "--heads", "3"] + TOY[6:]},
             sizes=(32,), batch=8, matmul_n=256, bench=(1, 2), compile_backend="eager", compile_cap_s=30.0, probe_k=(2,),
             probe_window=1.5, learn_images=128, fail_images=128, analyze_images=32, min_steps=8, eval_points=2,
             pre4_share=0.45, reserve_s=15.0, grace_s=8.0, startup_s=6.0, safety=0.85, max_epochs=2)
BASE_RUNS = 5  # (a), (b) x 2, (c) x 2


class Suite:
    """Time keeping, the log and the results file; part() runs one part in a try and saves after it."""

    def __init__(self, a, cfg):
        self.a, self.cfg, self.t0 = a, cfg, T_START
        os.makedirs(a.out, exist_ok=True)
        self.work = a.work_dir or tempfile.mkdtemp(prefix="gpu_suite_")
        os.makedirs(self.work, exist_ok=True)
        self.logf = open(os.path.join(a.out, "gpu_log.txt"), "w")
        self.device = dm.pick_device(a.device)
        self.res = {"command": "python bench/gpu_suite.py " + " ".join(a.argv), "smoke": a.smoke,
                    "budget_s": a.budget_s, "dataset": a.dataset, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                          time.gmtime()),
                    "parts": {}, "errors": {}, "part_s": {}}
        self.pre4_deadline = a.budget_s * cfg["pre4_share"]  # parts 1-3 end here (seconds since the start)

    def elapsed(self):
        return time.time() - self.t0

    def left(self, until=None):
        return (self.a.budget_s if until is None else until) - self.elapsed()

    def log(self, msg):
        line = f"[{self.elapsed():6.1f} s] {msg}"
        print(line, flush=True)
        self.logf.write(line + "\n")
        self.logf.flush()

    def save(self):
        self.res["elapsed_s"] = round(self.elapsed(), 1)
        path = os.path.join(self.a.out, "gpu_results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.res, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def part(self, name, fn, *args):
        t = time.time()
        self.log(f"== part {name}")
        out = None
        try:
            out = fn(*args)
            self.res["parts"][name] = out
        except Exception as e:
            self.res["errors"][name] = f"{type(e).__name__}: {e}"
            self.res["parts"].setdefault(name, {})["traceback"] = traceback.format_exc()[-3000:]
            self.log(f"   {name} failed: {type(e).__name__}: {e}")
        self.res["part_s"][name] = round(time.time() - t, 1)
        self.save()
        return out

    def flags(self, model, size):
        """dinov3_mini flags of a model preset (toy-sized under --smoke) at a global crop size."""
        return self.cfg["models"][model] + ["--image-size", str(size), "--batch-size", str(self.cfg["batch"]),
                                            "--dataset", self.a.dataset]

    def python(self, argv, timeout, threads=None, log_path=None):
        """Run `python argv` with a hard timeout; returns (returncode or 'timeout', stdout+stderr text, seconds)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        t = time.time()
        # a session of its own, so a timeout ends the whole group (torch.compile's worker processes included)
        p = subprocess.Popen([sys.executable] + argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=max(1.0, timeout))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            try:
                out, _ = p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                out = ""
            rc = "timeout"
        if log_path:
            with open(log_path, "w") as f:
                f.write(out)
        return rc, out, time.time() - t


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


# ---- part 1: environment -------------------------------------------------------------------------

def part_environment(s):
    dev = s.device
    info = {"device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "platform": platform.platform()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=torch.cuda.get_device_name(dev), capability=f"{p.major}.{p.minor}",
                    gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), multiprocessors=p.multi_processor_count)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # bf16 only on CUDA, as train()
    n = s.cfg["matmul_n"]
    info["matmul_peak_tflops"] = round(bm.measure_matmul_peak(dev, dtype, n=n, reps=10), 2)
    info["matmul"] = f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}, median of 10 after 2 warm-up"
    s.log(f"   {info.get('gpu', dev)}, torch {torch.__version__}: matmul peak {info['matmul_peak_tflops']} TFLOP/s "
          f"({info['matmul']})")
    return info


# ---- part 2: correctness -------------------------------------------------------------------------

def correctness_step(args, device, dtype=torch.bfloat16, seed=0):
    """One full-recipe step (DINO + iBOT + KoLeo + Gram at full weight) from the same weights, crops, masks and
    random draws (drop path, RoPE jitter), in fp32 and under torch.autocast(device, dtype); returns each loss part
    of both, the differences against TOLERANCE, the gradients' finiteness and their cosine."""
    torch.manual_seed(seed)
    B, grid = args.batch_size, args.image_size // args.patch_size
    images = dm.make_scenes("train", B, args.image_size * (2 if args.gram_hires else 1), seed)[0].to(device)
    gen = torch.Generator().manual_seed(seed)
    crops = dm.multicrop(images, gen, **dm.crop_kwargs(args))
    masks = dm.ibot_masks(2 * B, grid, gen, **dm.mask_kwargs(args)).to(device)
    student0 = dm.DINOModel(dm.build_backbone(args), args.prototypes, args.head_hidden, args.head_bottleneck,
                   args.norm_last_layer).to(device)
    sched = dm.make_schedules(args, 100)
    sched["steps_per_epoch"] = 1
    bargs = copy.copy(args)
    bargs.gram, bargs.gram_start, bargs.gram_ramp_epochs = True, 0, 1e-9  # the Gram loss at full weight
    out, grads = {}, {}
    for name, ctx in (("fp32", nullcontext()), (str(dtype).replace("torch.", ""), torch.autocast(device.type, dtype=dtype))):
        student = copy.deepcopy(student0)
        teacher = copy.deepcopy(student0).eval().requires_grad_(False)
        gram_teacher = dm.make_gram_teacher(teacher.backbone)
        torch.manual_seed(seed + 1)  # the same drop-path and RoPE-jitter draws in both precisions
        with ctx:
            total, parts, _ = dm.compute_losses(student, teacher, gram_teacher, images, crops, masks, 50, sched, bargs)
        total.backward()
        g = [p.grad.float().flatten() for p in student.parameters() if p.grad is not None]
        grads[name] = torch.cat(g)
        out[name] = {**{k: v.item() for k, v in parts.items()}, "total": total.item(),
                     "grads_finite": bool(torch.isfinite(grads[name]).all()), "n_grads": len(g)}
    lo = str(dtype).replace("torch.", "")
    checks = {}
    for k, (rtol, atol) in TOLERANCE.items():
        if k in out["fp32"]:
            diff = abs(out[lo][k] - out["fp32"][k])
            checks[k] = {"abs_diff": diff, "bound": rtol * abs(out["fp32"][k]) + atol,
                         "ok": diff <= rtol * abs(out["fp32"][k]) + atol}
    cos = F.cosine_similarity(grads["fp32"], grads[lo], dim=0).item()
    out.update(checks=checks, grad_cosine=cos, grad_rel_diff=((grads["fp32"] - grads[lo]).norm()
                                                               / grads["fp32"].norm()).item(),
               tolerance={k: {"rtol": r, "atol": t} for k, (r, t) in TOLERANCE.items()},
               grad_cosine_min=GRAD_COSINE_MIN)
    out["ok"] = all(c["ok"] for c in checks.values()) and out["fp32"]["grads_finite"] and out[lo]["grads_finite"] \
        and cos >= GRAD_COSINE_MIN
    return out


def part_correctness(s):
    dev = s.device
    parser = dm.get_args_parser()
    args = dm.parse_args(parser, s.flags("tiny", 32) + ["--gram", "--epochs", "4", "--device", str(dev)])
    if s.a.smoke:  # CPU autocast in bf16 is slow; the code path is the same at any batch
        args.batch_size = 4
    res = {"bf16_vs_fp32": correctness_step(args, dev)}
    r = res["bf16_vs_fp32"]
    s.log(f"   bf16 vs fp32 ({args.model}, full recipe): " + ", ".join(
        f"{k} {c['abs_diff']:.2g} (bound {c['bound']:.2g})" for k, c in r["checks"].items())
        + f"; grad cosine {r['grad_cosine']:.5f}; {'PASS' if r['ok'] else 'FAIL'}")
    # the compiled step: compile time (first warm-up step) and speed, in a subprocess with a hard timeout
    est_part3 = len(s.cfg["models"]) * len(s.cfg["sizes"]) * (20 if not s.a.smoke else 12)  # the eager benchmarks
    timeout = min(s.cfg["compile_cap_s"], s.left(s.pre4_deadline) - est_part3)
    res["compile"] = run_benchmark(s, "tiny", 32, compiled=True, timeout=timeout)
    return res


def run_benchmark(s, model, size, compiled=False, timeout=60.0):
    """bench/benchmark.py in a subprocess (default recipe: DINO + iBOT + KoLeo); its JSON line, or why not."""
    w, r = s.cfg["bench"]
    argv = [os.path.join("bench", "benchmark.py")] + s.flags(model, size) + [
        "--device", str(s.device), "--warmup", str(w + (2 if compiled else 0)), "--reps", str(r),
        "--peak-n", str(s.cfg["matmul_n"])]
    if compiled:
        argv.append("--compile")
        if s.cfg["compile_backend"]:
            argv += ["--compile-backend", s.cfg["compile_backend"]]
    cmd = "python " + " ".join(argv)
    if timeout < 5:
        s.log(f"   skipped (no time left before part 4): {cmd}")
        return {"command": cmd, "skipped": "no time left before part 4"}
    rc, out, wall = s.python(argv, timeout)
    res = last_json(out) if rc == 0 else None
    if res is None:
        tail = out.strip().splitlines()[-12:]
        s.log(f"   {model}@{size}{' compiled' if compiled else ''}: failed ({rc}) after {wall:.0f} s: "
              f"{tail[-1] if tail else ''}")
        return {"command": cmd, "returncode": rc, "wall_s": round(wall, 1), "error_tail": "\n".join(tail)}
    res.update(command=cmd, wall_s=round(wall, 1))
    if compiled:
        res["compile_s"] = round(res["warmup_step_s"][0] - 1 / res["train_img_per_s"] * res["batch_size"], 1)
    s.log(f"   {model}@{size}px{' compiled' if compiled else ''}: {res['train_img_per_s']} img/s (model step "
          f"{res['model_step_img_per_s']}), data {res['data_img_per_s']} img/s, MFU {res['mfu']:.3f}, "
          f"{res['peak_mem_mb']:.0f} MB" + (f", compile {res['compile_s']} s" if compiled else "") + f" ({wall:.0f} s)")
    return res


# ---- part 3: speed -------------------------------------------------------------------------------

def part_speed(s):
    res = {"eager": {}, "compiled": {}}
    peak = s.res["parts"].get("environment", {}).get("matmul_peak_tflops")
    for size in s.cfg["sizes"]:
        for model in s.cfg["models"]:
            key = f"{model}@{size}"
            r = res["eager"][key] = run_benchmark(s, model, size, timeout=min(120.0, s.left(s.pre4_deadline)))
            if peak and "achieved_tflops" in r:
                r["mfu_vs_part1_peak"] = round(r["achieved_tflops"] / peak, 4)
    res["lightly"] = run_lightly(s, timeout=min(90.0, s.left(s.pre4_deadline)))
    # compiled variants while the time before part 4 lasts (tiny@32 was compiled in part 2)
    comp = s.res["parts"].get("correctness", {}).get("compile", {})
    res["compiled"]["tiny@32"] = {"see": "parts.correctness.compile", "train_img_per_s": comp.get("train_img_per_s")}
    need = 1.5 * comp.get("wall_s", 60.0) if "train_img_per_s" in comp else None
    for size in s.cfg["sizes"]:
        for model in s.cfg["models"]:
            key = f"{model}@{size}"
            if key == "tiny@32":
                continue
            if need is None:
                res["compiled"][key] = {"skipped": "the compiled tiny@32 step of part 2 did not run"}
            elif s.left(s.pre4_deadline) < need:
                res["compiled"][key] = {"skipped": f"not enough time before part 4 ({s.left(s.pre4_deadline):.0f} s "
                                        f"left, a compile took {comp.get('wall_s')} s)"}
            else:
                res["compiled"][key] = run_benchmark(s, model, size, compiled=True, timeout=s.left(s.pre4_deadline))
    return res


def run_lightly(s, timeout):
    """bench/vs_lightly.py on this device when lightly's wheels were carried in .whl/; else a record why not."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if not any(os.path.basename(w).lower().startswith("lightly-") for w in wheels):
        s.log("   lightly: skipped (its wheels are not carried: .whl/lightly-*.whl, see docs/gpu.md)")
        return {"skipped": "lightly's wheels are not carried (.whl/lightly-*.whl); see docs/gpu.md"}
    site = os.path.join(s.work, "site")
    rc, out, _ = s.python(["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site]
                          + wheels, timeout=min(60.0, timeout))
    if rc != 0:
        return {"error": f"pip install of the carried wheels failed ({rc})", "tail": out[-1500:]}
    argv = [os.path.join("bench", "vs_lightly.py"), "--device", str(s.device), "--rounds", "3", "--steps", "5"]
    if s.a.smoke:
        argv[-4:] = ["--rounds", "1", "--steps", "1"]
    os.environ["PYTHONPATH"] = site + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        rc, out, wall = s.python(argv, timeout=s.left(s.pre4_deadline))
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    res = last_json(out) if rc == 0 else None
    if res is None:
        return {"command": "python " + " ".join(argv), "returncode": rc, "error_tail": out[-1500:]}
    s.log(f"   vs lightly: ours {res['ours_img_per_s']} img/s, lightly {res['lightly_img_per_s']} img/s "
          f"(ratio {res['ratio']})")
    return {"command": "python " + " ".join(argv), "wall_s": round(wall, 1), **res}


# ---- part 4: learning and the two failures -------------------------------------------------------

def probe_main(a):
    """--probe: one process of a concurrency probe. Builds the training step, warms up, says it is ready
    (a file), waits for the common start, then counts the steps it completes in the window; prints JSON."""
    args = dm.parse_args(dm.get_args_parser(), a.probe.split())
    device = dm.pick_device(args.device)
    data, step, _ = bm.make_step(args, device)
    for i in range(2):
        step(*data(i))
    bm.sync(device)
    open(a.probe_ready, "w").close()
    while not os.path.exists(a.probe_go):
        time.sleep(0.02)
    start = float(open(a.probe_go).read() or time.time())
    while time.time() < start:
        time.sleep(0.005)
    n, t = 0, time.time()
    while time.time() < start + a.probe_window:
        step(*data(n))
        bm.sync(device)
        n += 1
    print(json.dumps({"img_per_s": n * args.batch_size / (time.time() - t), "steps": n}))


def probe_concurrency(s, k, flags, threads, wait_s=60.0):
    """k probe processes at once on the same device: their summed img/s over a common window."""
    d = tempfile.mkdtemp(prefix=f"probe{k}_", dir=s.work)
    go = os.path.join(d, "go")
    procs = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for i in range(k):
        argv = [sys.executable, os.path.abspath(__file__), "--probe", " ".join(flags), "--probe-ready",
                os.path.join(d, f"ready{i}"), "--probe-go", go, "--probe-window", str(s.cfg["probe_window"])]
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    t_wait = time.time()
    while sum(os.path.exists(os.path.join(d, f"ready{i}")) for i in range(k)) < k:
        if time.time() - t_wait > wait_s or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    ready = sum(os.path.exists(os.path.join(d, f"ready{i}")) for i in range(k))
    with open(go + ".tmp", "w") as f:
        f.write(str(time.time() + 0.3))
    os.replace(go + ".tmp", go)
    rates = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=s.cfg["probe_window"] + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        r = last_json(out or "")
        if r:
            rates.append(r["img_per_s"])
    return {"k": k, "ready": ready, "finished": len(rates), "total_img_per_s": round(sum(rates), 1),
            "per_run_img_per_s": [round(x, 1) for x in rates], "startup_s": round(time.time() - t_wait, 1)}


def measure_overheads(s, threads):
    """What a run spends besides training steps, measured here: generating the data (s per 1000 images at 32 px)
    and one evaluation (k-NN + the instruments) of a tiny model on the test split."""
    torch.set_num_threads(threads)
    parser = dm.get_args_parser()
    args = dm.parse_args(parser, s.flags("tiny", 32) + ["--num-images", str(s.cfg["batch"]),
                                                        "--analyze-images", str(s.cfg["analyze_images"])])
    t = time.time()
    x_train, x_knn, y_knn, x_test, y_test, masks = dm.load_data(args)
    gen_s = time.time() - t
    n_gen = len(x_train) + len(x_test)  # built-in data is generated, the others read: both scale with the count
    torch.manual_seed(0)
    backbone = dm.build_backbone(args, student=False).to(s.device).eval()
    t = time.time()
    dm.evaluate_knn(backbone, x_knn, y_knn, x_test, y_test, args, s.device)
    dm.eval_instruments(backbone, x_test, y_test, masks, args, s.device)
    eval_s = time.time() - t
    torch.set_num_threads(os.cpu_count() or 1)
    return {"data_s_per_1000_at_32px": round(1000 * gen_s / n_gen, 3), "data_load_s": round(gen_s, 1),
            "eval_s_tiny": round(eval_s, 1), "threads": threads}


def plan_run(s, name, flags, model, size, n_images, ips, T, over, min_epochs=1):
    """Epochs and evaluation interval for a run that must end within T seconds at ips img/s: the most epochs whose
    estimated time (start-up, data generation, the baselines and every evaluation, steps, a checkpoint per epoch)
    fits in safety * T; evaluations every ceil(epochs / eval_points) epochs."""
    dim_ratio = {"tiny": 1.0, "small": 2.0}.get(model, 1.0)
    per_1000 = over.get("data_s_per_1000_at_32px")
    gen = (per_1000 * (n_images + 2000) / 1000 * (size / 32) ** 2) if per_1000 else over.get("data_load_s", 10.0)
    eval_s = over["eval_s_tiny"] * dim_ratio * (size / 32) ** 2  # dense probes grow with width, forwards with tokens
    n_params = (5.5e6 * dim_ratio ** 2 + 12.4e6) if not s.a.smoke else 1e5  # student: backbone + DINO and iBOT heads
    ckpt_s = 5.5 * n_params * 4 / 1e9  # student, teacher, AdamW's two moments, teacher backbone, at ~1 GB/s
    B = s.cfg["batch"]
    steps_per_epoch = max(1, n_images // B)
    epoch_s = steps_per_epoch * B / max(ips, 1e-9) + ckpt_s

    def estimate(epochs):
        every = max(1, math.ceil(epochs / s.cfg["eval_points"]))
        n_evals = math.ceil(epochs / every) + 1  # + the baselines at the start
        return every, s.cfg["startup_s"] + gen + eval_s * n_evals + epochs * epoch_s
    epochs = min_epochs
    while estimate(epochs + 1)[1] <= s.cfg["safety"] * T and (not s.cfg["max_epochs"] or epochs < s.cfg["max_epochs"]):
        epochs += 1
    every, est = estimate(epochs)
    return {"name": name, "flags": flags + ["--num-images", str(n_images), "--epochs", str(epochs), "--eval-every",
                                            str(every), "--analyze-images", str(s.cfg["analyze_images"])],
            "model": model, "image_size": size, "epochs": epochs, "eval_every": every,
            "steps": epochs * steps_per_epoch, "img_per_s_expected": round(ips, 1), "expected_s": round(est, 1),
            "data_s_expected": round(gen, 1), "eval_s_expected": round(eval_s, 1)}


def part_learning(s):
    cfg, res = s.cfg, {}
    speed = s.res["parts"].get("speed", {}).get("eager", {})
    single = {k: v["train_img_per_s"] for k, v in speed.items() if "train_img_per_s" in v}
    ncpu = os.cpu_count() or 1
    deadline = s.a.budget_s - cfg["reserve_s"] - cfg["grace_s"]  # the runs are stopped here at the latest
    # 1. concurrency: k probe processes of the (a)/(c) configuration at once; k = 1 is part 3's figure
    pflags = s.flags("tiny", 32) + ["--device", str(s.device)]
    curve = {1: single.get("tiny@32")}
    over = None
    for k in cfg["probe_k"]:
        if s.left(deadline) < 4 * (cfg["probe_window"] + cfg["startup_s"]):
            s.log(f"   {k} concurrent runs: not probed (too little time left)")
            continue
        r = probe_concurrency(s, k, pflags, max(1, ncpu // k), wait_s=min(60.0, s.left(deadline) / 4))
        res.setdefault("concurrency", []).append(r)
        curve[k] = r["total_img_per_s"] if r["finished"] == k else None
        s.log(f"   {k} concurrent runs: {r['total_img_per_s']} img/s in all ({r['finished']}/{k} finished)")
        if over is None:  # measured once, after the first probe (the device is free again)
            try:
                over = measure_overheads(s, max(1, ncpu // BASE_RUNS))
            except Exception as e:  # then rough guesses, and the runs' deadline still holds
                over = {"error": f"{type(e).__name__}: {e}", "data_s_per_1000_at_32px": 1.0, "eval_s_tiny": 15.0}
            s.log(f"   overheads: {over}")
    if curve[1] is None:
        r = probe_concurrency(s, 1, pflags, ncpu, wait_s=min(60.0, s.left(deadline) / 4))
        res.setdefault("concurrency", []).append(r)
        curve[1] = r["total_img_per_s"] or None
    known = {k: v for k, v in curve.items() if v}
    if not known:
        raise RuntimeError("no throughput measured (part 3 and the concurrency probe both failed)")
    best = max(known, key=known.get)
    n = max(BASE_RUNS, best)  # the runs we need run together; more when the device takes more
    x1 = known.get(1) or known[best] / best

    def total_at(k):  # total img/s at k concurrent runs, interpolated between measured points
        pts = sorted(known.items())
        lo = max([p for p in pts if p[0] <= k], default=pts[0])
        hi = min([p for p in pts if p[0] >= k], default=pts[-1])
        if hi[0] == lo[0]:
            return lo[1] if k <= lo[0] else lo[1]  # beyond the last point: flat
        return lo[1] + (hi[1] - lo[1]) * (k - lo[0]) / (hi[0] - lo[0])
    if over is None:
        over = {"data_s_per_1000_at_32px": 1.0, "eval_s_tiny": 15.0, "note": "not measured: rough guesses"}
    share = total_at(n) / n / x1  # each run's speed at n concurrent runs, as a fraction of its speed alone
    res.update(concurrency_curve={str(k): v for k, v in curve.items()}, runs_at_once=n, speed_share=round(share, 3),
               overheads=over)
    s.log(f"   running {n} at once; each at {share:.2f}x its speed alone")
    # 2. the runs, sized to end by the deadline
    T = deadline - s.elapsed()

    def ips(model, size):
        return single.get(f"{model}@{size}", x1 * (1 if model == "tiny" else 0.5) * (32 / size) ** 2) * share
    plans = []
    plans.append(plan_run(s, "a_default_tiny", s.flags("tiny", 32), "tiny", 32, cfg["learn_images"],
                          ips("tiny", 32), T, over))
    # (b): the largest configuration (FLOPs per image) that still gets min_steps steps
    cands = sorted(((speed[k].get("flops_per_img", 0), k) for k in single), reverse=True) or [(0, "tiny@32")]
    pick, why = None, []
    for _, k in cands:
        model, size = k.split("@")[0], int(k.split("@")[1])
        p = plan_run(s, "b", [], model, size, cfg["fail_images"], ips(model, size), T, over)
        why.append(f"{k}: {p['steps']} steps")
        if p["steps"] >= cfg["min_steps"]:
            pick = (model, size)
            break
    if pick is None:
        pick = ("tiny", 32)
    res["storage_choice"] = {"model": pick[0], "image_size": pick[1], "considered": why,
                             "rule": f"the largest (FLOPs per image) with >= {cfg['min_steps']} steps"}
    for r in (0, 4):
        plans.append(plan_run(s, f"b_artifacts_r{r}", ["--preset", "artifacts", "--registers", str(r)]
                              + s.flags(*pick), pick[0], pick[1], cfg["fail_images"], ips(*pick), T, over))
    pc = plan_run(s, "c_collapse_base", ["--preset", "collapse"] + s.flags("tiny", 32), "tiny", 32,
                  cfg["fail_images"], ips("tiny", 32), T, over, min_epochs=2)
    g = max(1, round(0.1 * pc["epochs"]))  # early: at 10% of the schedule (DINOv3: 100k-200k of 1M+ iterations)
    plans.append(pc)
    plans.append({**pc, "name": "c_collapse_gram", "gram_start": g,
                  "flags": pc["flags"] + ["--gram", "--gram-teacher-epoch", str(g), "--gram-start", str(g)]})
    for extra in range(n - BASE_RUNS):  # spare slots: a second seed of (b) and (c), then of (a)
        src = plans[[1, 2, 3, 4, 0][extra % 5]]
        plans.append({**src, "name": src["name"] + "_s1", "flags": src["flags"] + ["--seed", "1"]})
    res["runs"] = launch_runs(s, plans, deadline, max(1, ncpu // n))
    return res


def launch_runs(s, plans, deadline, threads):
    """Start every run at once (`python dinov3_mini.py <flags>`), stop what is still running at the deadline
    (SIGTERM: the run finishes its step and saves; SIGKILL after the grace period), collect the logs."""
    procs = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if s.device.type == "cuda":
        torch.cuda.empty_cache()  # this process idles while the runs train: give back its cached memory
    for p in plans:
        d = os.path.join(s.work, p["name"])
        os.makedirs(d, exist_ok=True)
        argv = [os.path.join(ROOT, "dinov3_mini.py")] + p["flags"] + ["--out-dir", d, "--no-progress", "--overwrite",
                                                                     "--device", str(s.device)]
        p["command"] = "python dinov3_mini.py " + " ".join(p["flags"])
        p["dir"] = d
        procs[p["name"]] = (subprocess.Popen([sys.executable] + argv, cwd=ROOT, env=env,
                                             stdout=open(os.path.join(d, "stdout.txt"), "w"), stderr=subprocess.STDOUT),
                            time.time())
        s.log(f"   start {p['name']}: {p['epochs']} epochs, {p['steps']} steps, expected {p['expected_s']:.0f} s: "
              f"{p['command']}")
    stopped = set()
    while any(pr.poll() is None for pr, _ in procs.values()):
        if s.elapsed() > deadline:
            for name, (pr, _) in procs.items():
                if pr.poll() is None and name not in stopped:
                    pr.send_signal(signal.SIGTERM)
                    stopped.add(name)
            if s.elapsed() > deadline + s.cfg["grace_s"]:
                for pr, _ in procs.values():
                    if pr.poll() is None:
                        pr.kill()
                break
        time.sleep(0.5)
    for pr, _ in procs.values():
        pr.wait()
    out = {}
    for p in plans:
        pr, t0 = procs[p["name"]]
        r = {k: p[k] for k in ("command", "epochs", "eval_every", "steps", "img_per_s_expected", "expected_s",
                               "model", "image_size", "gram_start") if k in p}
        r.update(returncode=pr.returncode, stopped_at_deadline=p["name"] in stopped)
        d = p["dir"]
        if os.path.exists(os.path.join(d, "summary.json")):
            sm = json.load(open(os.path.join(d, "summary.json")))
            r.update({k: sm.get(k) for k in ("knn_acc", "knn_acc_raw_pixels", "knn_acc_random_init", "images_per_s",
                                            "wall_s", "steps")})
        recs = [json.loads(x) for x in open(os.path.join(d, "log.jsonl"))] if os.path.exists(
            os.path.join(d, "log.jsonl")) else []
        r["evals"] = [x for x in recs if x.get("type") == "eval"]
        st = [x for x in recs if x.get("type") == "step"]
        keep = st[::max(1, len(st) // 60)]  # at most ~60 points of the loss curve
        r["loss_curve"] = [{k: x.get(k) for k in ("step", "epoch", "loss", "dino_over_lnK", "ibot", "koleo", "gram",
                                                  "teacher_entropy", "img_per_s")} for x in keep]
        r["steps_done"] = st[-1]["step"] if st else 0
        r["alarms"] = [x["message"] for x in recs if x.get("type") == "alarm"]
        txt = open(os.path.join(d, "stdout.txt")).read()
        for line in txt.splitlines():  # the baselines, also when the run was stopped before summary.json
            if line.startswith("baselines: "):
                try:
                    r["baselines"] = {k: float(v) for k, v in (x.rsplit(" ", 1) for x in line[11:].split(", "))}
                except ValueError:
                    r["baselines"] = line
        for k in ("knn_acc_raw_pixels", "knn_acc_random_init"):
            if r.get(k) is None and isinstance(r.get("baselines"), dict):
                r[k] = r["baselines"].get(k)
        if pr.returncode not in (0, None) and not r.get("stopped_at_deadline"):
            r["error_tail"] = txt[-1500:]
        r["dir"] = d
        out[p["name"]] = r
        s.log(f"   {p['name']}: rc {pr.returncode}, {r['steps_done']} steps, {len(r['evals'])} evaluations, k-NN "
              f"{r['evals'][-1]['knn_acc'] if r['evals'] else None}")
    return out


# ---- part 5: summary -----------------------------------------------------------------------------

_TEST = {}


def storage_tokens(s, run_dir, n):
    """Norms of the final EMA teacher of a run on n test images: (metrics, patch/register/CLS norms, images)."""
    backbone, args, _ = dm.load_teacher(run_dir, s.device)
    key = (args.dataset, args.image_size, args.seed)
    if key not in _TEST:
        a2 = copy.copy(args)
        a2.num_images = args.batch_size  # only the test split is needed
        _TEST[key] = dm.load_data(a2)[3]
    x_test = _TEST[key]
    tok = dm.collect_tokens(backbone, x_test[:n], args.image_size, s.device)
    m, det = dm.analyze(tok, None, None)
    keep = ("outlier_fraction", "patch_norm_median", "patch_norm_max_ratio", "patch_norm_bimodality",
            "patch_write_median", "patch_write_max", "register_norm_mean", "register_cls_attention_share")
    return {k: m.get(k) for k in keep}, det, x_test[:n], tok["grid"][0]


def part_summary(s):
    from matplotlib.figure import Figure
    runs = s.res["parts"].get("learning", {}).get("runs", {})
    out = {"pngs": []}
    base = {k: v for k, v in runs.items() if not k.endswith("_s1")}

    def curve(ax, key, names, title=None):
        """One instrument per epoch for the runs `names`; with a title, also the axis label and legend."""
        for nm in names:
            ev = runs[nm]["evals"]
            pts = [(e["epoch"], e[key]) for e in ev if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=nm)
        lo, hi = ax.get_ylim()
        mid = (lo + hi) / 2
        ax.set_ylim(min(lo, mid - 0.02), max(hi, mid + 0.02))  # at least 0.04 tall: no wiggle drawn as a trend
        if title:
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
    # learning curves: k-NN of every run (with (a)'s baselines), DINO loss / ln K
    fig = Figure(figsize=(15, 4))
    ax = fig.subplots(1, 3)
    a = runs.get("a_default_tiny", {})
    curve(ax[0], "knn_acc", [k for k in ["a_default_tiny"] if k in runs])
    for key, ls in (("knn_acc_raw_pixels", "--"), ("knn_acc_random_init", ":")):
        if a.get(key) is not None:
            ax[0].axhline(a[key], color="k", ls=ls, lw=1, label=key.replace("knn_acc_", ""))
    ax[0].set_title("(a) default recipe, tiny: k-NN (CLS)")
    curve(ax[1], "knn_acc", list(base))
    ax[1].set_title("k-NN of every run")
    for nm in base:
        lc = runs[nm]["loss_curve"]
        if lc:
            ax[2].plot([x["epoch"] for x in lc], [x["dino_over_lnK"] for x in lc], label=nm)
    ax[2].set_title("DINO loss / ln K")
    for x in ax:
        x.set_xlabel("epoch")
        x.legend(fontsize=7)
    fig.suptitle(f"GPU suite: learning ({s.res['parts'].get('environment', {}).get('gpu', s.device)}, "
                 f"torch {torch.__version__}, {s.a.dataset})")
    fig.tight_layout()
    path = os.path.join(s.a.out, "learning_curves.png")
    fig.savefig(path, dpi=80)
    out["pngs"].append(path)
    # storage: (b)'s curves and the final teachers' norm histograms and maps
    bnames = [k for k in ("b_artifacts_r0", "b_artifacts_r4") if k in runs]
    if bnames:
        fig = Figure(figsize=(18, 7.5))
        ax = fig.subplots(2, 4)
        for j, (key, title) in enumerate((("outlier_fraction", "outlier fraction"), ("patch_norm_max_ratio",
                                          "max / median patch norm"), ("patch_write_median", "write ratio (median)"),
                                          ("register_norm_mean", "register norm (mean)"))):
            curve(ax[0, j], key, bnames, title)
        final = {}
        for i, nm in enumerate(bnames):
            if s.left() < 15:
                final[nm] = {"skipped": "too little time left"}
                continue
            try:
                m, det, images, g = storage_tokens(s, runs[nm]["dir"], min(500, s.cfg["analyze_images"]))
            except Exception as e:
                final[nm] = {"error": f"{type(e).__name__}: {e}"}
                continue
            final[nm] = m
            h = ax[1, 2 * i]
            for lab, v in (("patch", det["patch_norms"]), ("registers", det["register_norms"]), ("CLS", det["cls_norms"])):
                if v.numel():
                    h.hist(v.flatten().numpy(), bins=80, log=True, alpha=0.6, label=lab)
            h.axvline(2 * m["patch_norm_median"], color="k", ls="--", lw=1, label="2 x median")
            h.set_title(f"{nm}: outliers {m['outlier_fraction']:.2%}, max/median {m['patch_norm_max_ratio']:.1f}",
                        fontsize=9)
            h.set_xlabel("output token norm")
            h.legend(fontsize=7)
            order = det["patch_norms"].max(1).values.argsort(descending=True)[:4]
            mp = det["patch_norms"][order].reshape(-1, g, g).transpose(0, 1).reshape(g, -1)
            im = ax[1, 2 * i + 1].imshow(mp.numpy(), cmap="viridis", interpolation="nearest")
            fig.colorbar(im, ax=ax[1, 2 * i + 1], fraction=0.046)
            ax[1, 2 * i + 1].set_title("patch norms of the 4 images with the largest", fontsize=9)
            ax[1, 2 * i + 1].set_xticks([]), ax[1, 2 * i + 1].set_yticks([])
        out["storage_final"] = final
        fig.suptitle("(b) storage: --preset artifacts, 0 vs 4 registers (final EMA teachers, test images)")
        fig.tight_layout()
        path = os.path.join(s.a.out, "storage_norms.png")
        fig.savefig(path, dpi=80)
        out["pngs"].append(path)
    # signal: (c)'s dense curves
    cnames = [k for k in ("c_collapse_base", "c_collapse_gram") if k in runs]
    if cnames:
        fig = Figure(figsize=(18, 4))
        ax = fig.subplots(1, 4)
        for x, (key, title) in zip(ax, (("knn_acc", "k-NN (CLS)"), ("dense_fg_miou", "object/background mIoU"),
                                        ("dense_miou", "11-class dense mIoU"),
                                        ("similarity_locality", "similarity locality"))):
            g = runs.get("c_collapse_gram", {}).get("gram_start")
            if g is not None:
                x.axvline(g, color="gray", ls=":", lw=1, label="Gram teacher taken, Gram on")
            curve(x, key, cnames, title)
        fig.suptitle("(c) signal: --preset collapse, without and with Gram anchoring (early Gram teacher)")
        fig.tight_layout()
        path = os.path.join(s.a.out, "dense_curves.png")
        fig.savefig(path, dpi=80)
        out["pngs"].append(path)
    out["table"] = table(s)
    for line in out["table"]:
        s.log(line)
    out["pngs"] = [os.path.basename(p) for p in out["pngs"]]
    return out


def table(s):
    """The suite's figures as a few lines of text (also in gpu_log.txt)."""
    P, lines = s.res["parts"], []
    env = P.get("environment", {})
    lines.append(f"GPU {env.get('gpu', env.get('device'))}, torch {env.get('torch')}, CUDA {env.get('cuda')}: matmul "
                 f"peak {env.get('matmul_peak_tflops')} TFLOP/s ({env.get('matmul')})")
    c = P.get("correctness", {})
    r = c.get("bf16_vs_fp32")
    if r:
        lines.append("bf16 vs fp32 full-recipe step: " + ", ".join(f"{k} diff {v['abs_diff']:.2g}" for k, v in
                                                                    r["checks"].items())
                     + f"; grad cosine {r['grad_cosine']:.5f}; {'within tolerance' if r['ok'] else 'OUT OF TOLERANCE'}")
    comp = c.get("compile", {})
    if comp:
        lines.append(f"compile (tiny@32): {comp.get('compile_s', '-')} s to compile, "
                     f"{comp.get('train_img_per_s', comp.get('skipped', comp.get('returncode')))} img/s")
    sp = P.get("speed", {})
    for mode in ("eager", "compiled"):
        for k, v in sp.get(mode, {}).items():
            if v.get("train_img_per_s") is not None and "mfu" in v:
                lines.append(f"speed {k} {mode}: {v['train_img_per_s']} img/s (data {v['data_img_per_s']} img/s, "
                             f"{v['data_to_step_speed']}x the step), MFU {v.get('mfu_vs_part1_peak', v['mfu'])}, "
                             f"{v['peak_mem_mb']:.0f} MB")
    if "lightly" in sp:
        li = sp["lightly"]
        lines.append(f"vs lightly: {li.get('ratio', li.get('skipped', li.get('error')))}")
    le = P.get("learning", {})
    if le:
        lines.append(f"concurrency (total img/s by runs at once): {le.get('concurrency_curve')}; ran "
                     f"{le.get('runs_at_once')}")
        for name, r in le.get("runs", {}).items():
            ev = r.get("evals", [])
            last = ev[-1] if ev else {}
            lines.append(f"{name}: {r.get('steps_done')} steps, k-NN {last.get('knn_acc')} (raw pixels "
                         f"{r.get('knn_acc_raw_pixels')}), dense fg {last.get('dense_fg_miou')}, locality "
                         f"{last.get('similarity_locality')}, outliers {last.get('outlier_fraction')}, max/median "
                         f"{last.get('patch_norm_max_ratio')}: {r.get('command')}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser("bench/gpu_suite.py", description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=None, help="Wall-clock budget of the whole suite; it stops "
                   "inside it on its own. Default 480 (165 with --smoke).")
    p.add_argument("--out", default="gpu_suite_out", help="Where gpu_results.json, gpu_log.txt and the PNGs go "
                   "(nothing else, no subfolders).")
    p.add_argument("--work-dir", default=None, help="Where the runs of part 4 go (default: a temporary folder).")
    p.add_argument("--smoke", action="store_true", help="Every part at toy size on this machine's CPU, in a few "
                   "minutes: tests the script, measures nothing worth reporting.")
    p.add_argument("--dataset", default=DATASET, choices=dm.DATASETS, help="Dataset of every run.")
    p.add_argument("--device", default=None, help="Default: cuda (cpu with --smoke).")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one process of the probe
    p.add_argument("--probe-ready", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-go", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-window", type=float, default=5.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.probe:
        return probe_main(a)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.budget_s = a.budget_s or (165.0 if a.smoke else 480.0)
    a.device = a.device or ("cpu" if a.smoke else "cuda")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device is visible; on a CPU run the suite with --smoke (toy sizes).")
    s = Suite(a, SMOKE if a.smoke else FULL)
    s.log(f"gpu_suite: budget {a.budget_s:.0f} s, device {s.device}, dataset {a.dataset}, out {a.out}, runs in "
          f"{s.work}{' (smoke: toy sizes)' if a.smoke else ''}")
    s.part("environment", part_environment, s)
    s.part("correctness", part_correctness, s)
    s.part("speed", part_speed, s)
    s.part("learning", part_learning, s)
    s.part("summary", part_summary, s)
    s.log(f"done in {s.elapsed():.0f} s; errors: {s.res['errors'] or 'none'}; wrote {os.listdir(a.out)}")
    s.save()
    return s.res


if __name__ == "__main__":
    main()
