"""The experiments of docs/results.md: the two failures (and their fixes) at small scale, run, measured and drawn.

    python bench/results.py                 # every run below that is missing, then assets/results.json + PNGs
    python bench/results.py --only storage  # just the register sweep (or: collapse, learnable, storage_long, ...)
    python bench/results.py --seeds 1       # fewer seeds (docs/results.md has 3)
    python bench/results.py --redraw        # collapse_curves.png again from assets/results.json, nothing run
    python bench/results.py --draw-storage RUN_R0 RUN_R4   # storage_norms.png from two runs (0 and 4 registers)

Runs go to --runs-dir (default runs/results/<name>); a folder that already holds a finished run with the
same configuration is reused, so an interrupted sweep continues where it stopped. Every run is plain
`python dinov3_mini.py <flags>` (the command is printed and stored in results.json), then measured with
the instruments of dinov3_mini (analyze_run for the storage runs, log.jsonl for the collapse runs).

storage: `--dataset scenes --preset artifacts` with 0, 1, 2, 4 registers x seeds -> outlier fraction (mean, spread),
         where the outliers sit, bimodality and max/median of the patch norms, the registers' norms;
         assets/storage_norms.png (norm histograms and maps, 0 vs 4 registers).
collapse: `--dataset scenes --preset collapse` without Gram anchoring, with an early Gram teacher and with a late one (seeds 0; the
         first two also seed 1) ->
         k-NN and dense quality per epoch, peak and final; assets/collapse_curves.png and
         assets/collapse_maps.png (PCA and similarity maps: early teacher, baseline end, Gram ends).
storage_long / signal_long: the long runs of the two failures on `textures` (32 epochs, 4,992 steps; `LONG` below):
         artifacts preset with 0 and 4 registers; the default recipe with iBOT on and off. Every instrument at every
         evaluation -> results.json "storage_long" / "signal_long", assets/storage_long.png / signal_long.png.
storage_screens: 8-epoch screens of the conditions named for high-norm tokens (depth, weight decay, lr, 64 px).
signal_gram: the long run with Gram anchoring, the teacher from the dense (DSE) peak or from well after it.
recipe_screens: 10-epoch screens of the nano recipe on textures (teacher temperature held at 0.04, 256 prototypes,
                EMA momentum 0.99 held).
learnable: the default recipe on the built-in `textures` data, seeds 0 and 1, for 10 epochs (--eval-every 1) and 32
         (4,992 steps, --eval-every 2), and the default 3-epoch run on it (also with --prototypes 256) ->
         results.json "learnable_data" (one entry per run: k-NN against both baselines, and the curve of k-NN,
         dense probes and similarity locality) and assets/textures_curves.png. An entry whose folder is not in
         --runs-dir is kept as it was with --no-train. A run
         that has a checkpoint but no summary is resumed (--resume), or with --no-train recorded as far as it got
         (finished: false). Screens of other candidate datasets (bench/screen_data.py --ssl NAME) found in
         --runs-dir as screen_NAME are drawn beside them and stored under "learnable_data_screens".
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import dinov3_mini as dm  # noqa: E402

REGISTERS = (0, 1, 2, 4)
COLLAPSE = {  # name -> flags on top of --dataset scenes --preset collapse (3 epochs); *_s1: the same runs with another seed
    "collapse_base": [],
    "collapse_gram_early": ["--gram", "--gram-teacher-epoch", "1", "--gram-start", "1"],
    "collapse_gram_late": ["--gram", "--gram-teacher-epoch", "2", "--gram-start", "2"],
    "collapse_base_s1": ["--seed", "1"],
    "collapse_gram_early_s1": ["--gram", "--gram-teacher-epoch", "1", "--gram-start", "1", "--seed", "1"],
}
NO_TRAIN = False  # --no-train: measure only the runs that exist
IGNORED = {"out_dir", "no_progress", "overwrite", "resume", "device", "preset", "compile", "keep_teachers"}  # not part of a run's identity


def run(name, flags, runs_dir):
    """Train `python dinov3_mini.py <flags>` into runs_dir/name unless a finished run with the same
    configuration is there; returns (folder, summary, command)."""
    out = os.path.join(runs_dir, name)
    argv = flags + ["--out-dir", out, "--no-progress"]
    cmd = "python dinov3_mini.py " + " ".join(flags)
    want = {k: v for k, v in vars(dm.parse_args(dm.get_args_parser(), argv)).items() if k not in IGNORED}
    summary_path = os.path.join(out, "summary.json")
    if os.path.exists(summary_path):
        summary = json.load(open(summary_path))
        have = {k: v for k, v in summary["config"].items() if k not in IGNORED}
        norm = lambda d: json.loads(json.dumps(d))  # tuples -> lists, as stored  # noqa: E731
        if norm(have) == norm(want):
            print(f"reusing {out} ({cmd})")
            return out, summary, cmd
        diff = sorted(k for k in set(have) | set(want) if norm(have).get(k) != norm(want).get(k))
        sys.exit(f"error: {out} holds a finished run with another configuration (differs in {', '.join(diff)}). "
                 f"Move it away or give another --runs-dir; nothing was changed.")
    if NO_TRAIN:
        print(f"skipping {name} (not run yet, --no-train): {cmd}")
        return None, None, cmd
    print(f"== {name}: {cmd}", flush=True)
    dm.main(argv + (["--overwrite"] if os.path.exists(os.path.join(out, "checkpoint.pt")) else []))
    return out, json.load(open(summary_path)), cmd


def evals(out):
    """The per-epoch evaluation records of a run's log.jsonl."""
    return [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if r.get("type") == "eval"]


def tokens(backbone, args, n=1000):
    """Instrument tokens of a teacher on the first n test images of its dataset: (tok, details, metrics, images, masks)."""
    _, _, _, x_test, y_test, masks = dm.load_data(args)
    tok = dm.collect_tokens(backbone, x_test[:n], args.image_size, "cpu")
    m, details = dm.analyze(tok, y_test[:n], masks[:n])
    return tok, details, m, x_test[:n], masks[:n]


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def storage(runs_dir, registers, seeds, assets, table):
    by_r = {}
    for r in registers:
        rows = []
        for s in range(seeds):
            flags = ["--dataset", "scenes", "--preset", "artifacts", "--registers", str(r), "--seed", str(s)]
            out, summary, cmd = run(f"artifacts_r{r}_s{s}", flags, runs_dir)
            if out is None:
                continue
            mpath = os.path.join(out, "analysis", "metrics.json")
            m = json.load(open(mpath)) if os.path.exists(mpath) else {}
            if "patch_write_median" not in m:  # not measured yet, or by an older version of the instruments
                m = dm.analyze_run(out, "cpu")
            rows.append({"seed": s, "command": cmd, "wall_s": summary["wall_s"], "knn_acc": summary["knn_acc"],
                         **{k: m.get(k) for k in ("outlier_fraction", "outlier_background_share", "background_share",
                                                  "outlier_cls_attention_share", "outlier_knn_acc",
                                                  "normal_patch_knn_acc", "patch_norm_bimodality",
                                                  "patch_norm_max_ratio", "patch_norm_median",
                                                  "patch_write_median", "patch_write_max",
                                                  "register_norm_mean", "register_cls_attention_share",
                                                  "cls_norm_mean")}})
            by_r.setdefault(r, out)
        if not rows:
            continue
        table[str(r)] = {"runs": rows, **{k: mean_sd([x[k] for x in rows]) for k in (
            "outlier_fraction", "outlier_background_share", "patch_norm_bimodality", "patch_norm_max_ratio",
            "patch_write_median", "patch_write_max",
            "register_norm_mean", "register_cls_attention_share", "knn_acc", "wall_s")}}
        print(f"registers {r}: outlier fraction {table[str(r)]['outlier_fraction']}")
    if 0 in by_r and 4 in by_r:
        draw_storage({r: by_r[r] for r in (0, 4)}, os.path.join(assets, "storage_norms.png"))
    return dict(sorted(table.items(), key=lambda kv: int(kv[0])))


def load_backbone(out):
    """The backbone a run folder measures: the EMA teacher of a dinov3_mini run, or the ViT of a
    bench/supervised_control.py run (its checkpoint holds "vit"). Returns (backbone in eval mode, args)."""
    ck = dm.safe_load(os.path.join(out, "checkpoint.pt"))
    if "vit" not in ck:
        backbone, args, _ = dm.load_teacher(out)
        return backbone, args
    args = argparse.Namespace(**ck["args"])
    backbone = dm.build_backbone(args)
    backbone.load_state_dict(ck["vit"])
    return backbone.eval(), args


def draw_storage(folders, path, n_maps=4, how=None):
    """folders: {registers: run folder} (0 and 4 registers, seed 0). Top row: the same n_maps test images for
    every run, those whose largest patch norm is highest in the run with the most outliers. Then one row per
    run: its norm histogram (log) and the patch-norm map of each of those images (one colour scale per row,
    outlier patches ringed)."""
    from matplotlib.figure import Figure
    C = dm.TOKEN_COLORS
    runs = {}
    for r, out in folders.items():
        backbone, args = load_backbone(out)
        tok, d, m, images, _ = tokens(backbone, args)
        runs[r] = (tok, d, m, images)
    first = next(iter(runs.values()))[3]
    for r, (_, _, _, images) in runs.items():  # the runs must see the same test images for a column to compare
        if images.shape != first.shape or not torch.equal(images, first):
            raise ValueError(f"draw_storage: the run with {r} registers has other test images than the first run")
    worst = max(runs, key=lambda r: runs[r][2]["outlier_fraction"])  # ties: the first (0 registers)
    order = runs[worst][1]["patch_norms"].max(1).values.argsort(descending=True)[:n_maps].tolist()
    allv = torch.cat([torch.cat([d["patch_norms"].flatten(), d["register_norms"].flatten(), d["cls_norms"].flatten()])
                      for _, d, _, _ in runs.values()])
    bins = torch.logspace(float(allv.clamp_min(1e-6).min().log10()), float((allv.max() * 1.01).log10()), 81).numpy()

    fig = Figure(figsize=(3.0 * n_maps + 5.5, 3.0 * (len(runs) + 1)))
    gs = fig.add_gridspec(len(runs) + 1, n_maps + 2, width_ratios=[5.5] + [3.0] * n_maps + [0.25])
    for j, i in enumerate(order):
        a = fig.add_subplot(gs[0, 1 + j])
        a.imshow(first[i].permute(1, 2, 0).numpy())
        a.set_title(f"test image {i}", fontsize=10)
        a.set_xticks([]), a.set_yticks([])
    note = fig.add_subplot(gs[0, 0])
    note.axis("off")
    note.text(0.5, 0.5, f"The same {len(order)} test images in every row:\nthose with the highest patch norm\n"
              f"in the {worst}-register run.\nBelow: each run's patch-norm map\n(one colour scale per row;\n"
              "rings: outlier patches).", ha="center", va="center", fontsize=10)
    for row, (r, (tok, d, m, _)) in enumerate(runs.items(), start=1):
        pn, g = d["patch_norms"], tok["grid"][0]
        a = fig.add_subplot(gs[row, 0])
        a.hist(pn.flatten().numpy(), bins=bins, log=True, alpha=0.7, color=C["patch"], label="patch tokens")
        if d["outliers"].any():
            a.hist(pn[d["outliers"]].numpy(), bins=bins, log=True, alpha=0.9, color=C["outlier"],
                   label="outlier patches")
        if d["register_norms"].numel():
            a.hist(d["register_norms"].flatten().numpy(), bins=bins, log=True, alpha=0.7, color=C["register"],
                   label="registers")
        a.hist(d["cls_norms"].numpy(), bins=bins, log=True, alpha=0.7, color=C["CLS"], label="CLS")
        a.axvline(2 * m["patch_norm_median"], color="k", ls="--", lw=1, label="outlier floor (2 x median)")
        a.set_xscale("log")
        a.set_xlabel("output token norm (last block, before the final norm)", fontsize=8)
        a.set_ylabel("tokens (log)")
        a.set_title(f"{r} registers: outliers {m['outlier_fraction']:.2%}, bimodality "
                    f"{m['patch_norm_bimodality']:.2f}, max/median {m['patch_norm_max_ratio']:.1f}", fontsize=9)
        a.legend(fontsize=7)
        vmax = pn[order].max().item()
        for j, i in enumerate(order):
            a = fig.add_subplot(gs[row, 1 + j])
            im = a.imshow(pn[i].reshape(g, g).numpy(), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
            yx = d["outliers"][i].reshape(g, g).nonzero()
            if len(yx):
                a.plot(yx[:, 1].numpy(), yx[:, 0].numpy(), "o", ms=9, mfc="none", mec=C["outlier"], mew=2)
            a.set_title(f"{r} reg: patch norms, image {i}", fontsize=9)
            a.set_xticks([]), a.set_yticks([])
        fig.colorbar(im, cax=fig.add_subplot(gs[row, -1])).set_label("patch norm", fontsize=8)
    how = how or "trained with --preset artifacts (EMA teacher)"
    fig.suptitle(f"Storage: output norms of a nano ViT {how}, {' vs '.join(str(r) for r in runs)} registers "
                 f"({len(first)} test images)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


KEYS = ("knn_acc", "dense_miou", "dense_fg_miou", "similarity_locality", "patch_effective_rank")


def init_point(out, knn0=None):
    """Epoch 0: the instruments of the run's ViT at initialisation (train() seeds, then builds the student's
    backbone first, so this is the very same network), and the run's random-init k-NN."""
    _, args, _ = dm.load_teacher(out)
    torch.manual_seed(args.seed)
    backbone = dm.build_backbone(args)
    _, _, _, x_test, y_test, masks = dm.load_data(args)
    inst = dm.eval_instruments(backbone, x_test, y_test, masks, args, "cpu")
    if knn0 is None:
        knn0 = json.load(open(os.path.join(out, "summary.json")))["knn_acc_random_init"]
    return {"type": "eval", "epoch": 0, "knn_acc": knn0, **inst}


def collapse(runs_dir, assets):
    res, folders, zeros = {}, {}, {}
    for name, extra in COLLAPSE.items():
        out, summary, cmd = run(name, ["--dataset", "scenes", "--preset", "collapse"] + extra, runs_dir)
        if out is None:
            continue
        seed = name.endswith("_s1")  # runs of one seed share data, shape and init: one epoch 0 per seed
        if seed not in zeros:
            zeros[seed] = init_point(out)
        ev = [zeros[seed]] + evals(out)
        r = {"command": cmd, "wall_s": summary["wall_s"], "epochs": [e["epoch"] for e in ev],
             **{k: [e.get(k) for e in ev] for k in KEYS}}
        for k in ("dense_miou", "dense_fg_miou", "similarity_locality", "knn_acc"):
            v = r[k]
            best = max(range(len(v)), key=lambda i: v[i])
            r[f"{k}_peak"], r[f"{k}_peak_epoch"], r[f"{k}_final"] = v[best], r["epochs"][best], v[-1]
        res[name], folders[name] = r, out
    draw_curves(res, os.path.join(assets, "collapse_curves.png"))
    draw_maps({k: v for k, v in folders.items() if not k.endswith("_s1")}, os.path.join(assets, "collapse_maps.png"))
    return res


MARKERS = {"collapse_base": "o", "collapse_gram_early": "s", "collapse_gram_late": "^"}  # one shape per recipe


def draw_curves(res, path):
    """k-NN and dense quality per epoch of the collapse runs. Runs that coincide (gram_late is the baseline until
    its Gram anchoring starts) stay visible: each recipe has its own marker shape, each run a small x offset."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(16, 4.4))
    ax = fig.subplots(1, 4)
    names = list(res)
    width = 0.3  # total spread of the x offsets, in epochs
    for a, (k, lab) in zip(ax, (("knn_acc", "k-NN accuracy (CLS)"), ("dense_fg_miou", "object/background probe mIoU"),
                                ("dense_miou", "11-class dense probe mIoU"), ("similarity_locality", "similarity locality"))):
        for n_run, (name, r) in enumerate(res.items()):
            seed1 = name.endswith("_s1")
            base = name[:-3] if seed1 else name
            color = f"C{list(COLLAPSE).index(base)}"  # a seed-1 run: its seed-0 twin's colour
            dx = (n_run - (len(names) - 1) / 2) * width / max(len(names) - 1, 1)
            a.plot([e + dx for e in r["epochs"]], r[k], ls="--" if seed1 else "-", marker=MARKERS.get(base, "o"),
                   ms=6, color=color, mfc="none" if seed1 else color, lw=1.2, alpha=0.9,
                   label=name.replace("collapse_", "").replace("_s1", ", seed 1"))
        min_span(a, 0.1)
        a.set_xticks(sorted({e for r in res.values() for e in r["epochs"]}))
        a.set_title(lab)
        a.set_xlabel("epoch (runs drawn slightly apart)")
        a.legend(fontsize=7)
    fig.suptitle("Signal: --preset collapse, baseline vs Gram anchoring", fontsize=12, y=0.99)
    fig.text(0.5, 0.925, "nano ViT, 4 registers, LayerScale off, lr 1e-2; 10k scenes, 3 epochs. Gram teacher: the EMA "
             "teacher of epoch 1 (gram_early) or 2 (gram_late; identical to the baseline until then).\n"
             "Dashed, hollow markers: seed 1. Each run is shifted a little along x so that coinciding curves stay "
             "visible.", ha="center", va="top", fontsize=8.5, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def draw_maps(folders, path, n=4):
    """PCA (RGB) and similarity maps of n test images from: the early EMA teacher (the Gram-early run's Gram
    teacher), and the final teachers of each run."""
    from matplotlib.figure import Figure
    models = []
    early = dm.load_checkpoint(os.path.join(folders["collapse_gram_early"], "checkpoint.pt"))
    args = argparse.Namespace(**early["args"])
    b = dm.build_backbone(args, student=False)
    b.load_state_dict(early["gram_teacher"])
    models.append((f"EMA teacher, epoch {args.gram_teacher_epoch}", b.eval(), args))
    for name, out in folders.items():
        backbone, a, _ = dm.load_teacher(out)
        models.append((f"{name.replace('collapse_', '')}, epoch {a.epochs}", backbone, a))
    fig = Figure(figsize=(1.7 * (2 * len(models) + 1), 1.9 * n))
    ax = fig.subplots(n, 2 * len(models) + 1, squeeze=False)  # rows: images; columns: image, then PCA + similarity per model
    for col, (title, backbone, a) in enumerate(models):
        tok, _, m, images, masks = tokens(backbone, a, n=256)
        g = tok["grid"][0]
        lab = dm.patch_labels(masks[:n], g)
        q = torch.stack([(l > 0).nonzero()[:, 0].float().mean().round().long() if (l > 0).any()
                         else torch.tensor(len(l) // 2) for l in lab])  # a patch near the middle of the objects
        f = F.normalize(tok["patches"][:n], dim=-1)
        sim = (f * f[torch.arange(n), q][:, None]).sum(-1).reshape(n, g, g)
        pca = dm._pca_rgb(tok["patches"][:n], fit=tok["patches"]).reshape(n, g, g, 3)
        for i in range(n):
            if col == 0:
                ax[i, 0].imshow(images[i].permute(1, 2, 0).numpy())
            ax[i, 1 + 2 * col].imshow(pca[i].numpy())
            ax[i, 2 + 2 * col].imshow(sim[i].numpy(), cmap="coolwarm", vmin=-1, vmax=1)
            ax[i, 2 + 2 * col].plot(q[i] % g, q[i] // g, "kx")
        ax[0, 1 + 2 * col].set_title(f"{title}\nPCA", fontsize=8)
        ax[0, 2 + 2 * col].set_title(f"similarity (locality\n{m['similarity_locality']:.3f} on 256 images)", fontsize=8)
    ax[0, 0].set_title("test image", fontsize=8)
    for a in ax.flat:
        a.set_xticks([]), a.set_yticks([])
    fig.suptitle("PCA of patch features (RGB) and cosine similarity to a query patch (x; colour scale -1 to 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


LEARNABLE = {**{f"textures_s{s}": ["--dataset", "textures", "--epochs", "10", "--eval-every", "1", "--seed", str(s)]
                for s in (0, 1)},
             "default_textures": ["--dataset", "textures"],  # the default run (3 epochs) on textures
             "default_textures_k256": ["--dataset", "textures", "--prototypes", "256"],  # ... with K = 256
             **{f"long_textures_s{s}": ["--dataset", "textures", "--epochs", "32", "--eval-every", "2", "--seed", str(s),
                                        "--keep-teachers"] for s in (0, 1)}}  # 32 epochs = 4,992 steps
# The long runs of the two failures on textures, 32 epochs (4,992 steps) each: name -> flags.
LONG = {"storage_long": {f"long_artifacts_r{r}": ["--dataset", "textures", "--preset", "artifacts", "--registers",
                                                  str(r), "--epochs", "32", "--eval-every", "4", "--keep-teachers"]
                                 for r in (0, 4)},
        "signal_long": {"long_textures_s0": LEARNABLE["long_textures_s0"],  # the default recipe: iBOT on
                        "long_textures_noibot": LEARNABLE["long_textures_s0"] + ["--ibot-weight", "0"]}}
# Gram anchoring on the long run, its teacher taken at the DSE peak of the baseline (epoch 6, step 936) or well after
# it (epoch 20); same seed as the baseline, and the local-crop norm kept tied as there.
# Seed 1 (names ending _s1) repeats both anchors; each late run is its seed's baseline up to step 3,120.
LONG["signal_gram"] = {f"long_gram_{at}{'_s1' if s else ''}": LEARNABLE[f"long_textures_s{s}"] + [
    "--gram", "--no-untie-local-norm", "--gram-teacher-epoch", e, "--gram-start", e]
    for s in (0, 1) for at, e in (("peak", "6"), ("late", "20"))}
# Short screens of the conditions the literature names for high-norm tokens (8 epochs, 1,248 steps, 0 registers):
# the free-writing setting as it is, 12 blocks at nano width, a high constant weight decay, a 3x higher lr (same
# warmup), and 64 px images (256 patches, 4x the flat background; 5,000 images to keep the time).
SCREEN = ["--dataset", "textures", "--preset", "artifacts", "--registers", "0", "--epochs", "8", "--eval-every", "2",
          "--keep-teachers"]
# Screens of the nano recipe on textures, from the literature on a DINO loss stuck at ln K (docs/data.md "What
# next"): the teacher temperature held at 0.04, then also 256 prototypes; a faster EMA teacher (0.99 held, the
# small-data ports' value) (10 epochs, 1,560 steps each).
RECIPE = ["--dataset", "textures", "--epochs", "10", "--eval-every", "2"]
LONG["recipe_screens"] = {"recipe_base": RECIPE, "recipe_t04": RECIPE + ["--teacher-temp", "0.04"],
                          "recipe_t04_k256": RECIPE + ["--teacher-temp", "0.04", "--prototypes", "256"],
                          "recipe_m099": RECIPE + ["--momentum", "0.99", "0.99"]}
LONG["storage_screens"] = {"screen_base": SCREEN, "screen_depth12": SCREEN + ["--depth", "12"],
                           "screen_wd": SCREEN + ["--weight-decay", "0.4", "0.4"], "screen_lr": SCREEN + ["--lr", "3e-2"],
                           "screen_64px": SCREEN + ["--image-size", "64", "--num-images", "5000"]}
SCREENS = ("shapes", "scenes", "glyphs", "fractals")  # bench/screen_data.py --ssl NAME runs, if present


def run_or_resume(name, flags, runs_dir):
    """Like run(), but a run that stopped part-way (checkpoint, no summary) is resumed, not restarted; with
    --no-train it is measured as far as it got. Returns (folder or None, summary or None, command)."""
    out = os.path.join(runs_dir, name)
    cmd = "python dinov3_mini.py " + " ".join(flags)
    if os.path.exists(os.path.join(out, "summary.json")):  # finished: measured as it is (options added to the
        print(f"reusing {out} ({cmd})")                     # file since then keep their defaults)
        return out, json.load(open(os.path.join(out, "summary.json"))), cmd
    if not os.path.exists(os.path.join(out, "checkpoint.pt")):
        return run(name, flags, runs_dir)
    if not NO_TRAIN:
        print(f"== {name}: resuming {cmd}", flush=True)
        dm.main(flags + ["--out-dir", out, "--no-progress", "--resume"])
        return out, json.load(open(os.path.join(out, "summary.json"))), cmd
    print(f"measuring {name} as far as it got (--no-train): {cmd}")
    return out, None, cmd


def log_evals(out, ck):
    """A run's evaluation records, each with the mean DINO loss / ln K and the training time since the one before."""
    ev, since, a = [], [], ck["args"]
    for r in map(json.loads, open(os.path.join(out, "log.jsonl"))):
        if r.get("type") == "step":
            since.append(r)
        elif r.get("type") == "eval":  # the ratio recomputed: logs older than the Gram-phase correction hold the raw one
            ratio = [dm.dino_over_lnk(x["dino"], x.get("dino_local_weight", 1.0), a["local_crops"], a["prototypes"])
                     for x in since]
            ev.append(dict(r, dino_over_lnK=round(statistics.fmean(ratio), 4) if since else None, train_s=round(
                sum(a["log_every"] * a["batch_size"] / x["img_per_s"] for x in since), 1)))
            since = []
    return ev


def curve(out, summary, cmd, seed, old=None):
    """One learnable_data entry: the run's k-NN against its baselines and its curve (epoch 0 = the ViT at init;
    taken from `old`, the entry of an earlier results.json for the same command, when there is one)."""
    ck = dm.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    base = summary or ck["baselines"]
    ev, pts = log_evals(out, ck), []
    zero = (dict(old["curve"][0], type="eval") if old and old.get("command") == cmd and old["curve"][0]["step"] == 0
            else init_point(out, base["knn_acc_random_init"]))
    for e in [zero] + ev:
        pts.append({"step": e.get("step", 0), "epoch": e["epoch"], **{k: e.get(k) for k in KEYS},
                    "dino_over_lnK": e.get("dino_over_lnK"), "train_s": e.get("train_s")})
    args = ck["args"]
    last = pts[-1]
    return {"command": cmd, "seed": seed, "steps": last["step"], "epochs_run": last["epoch"],
            "epochs_planned": args["epochs"], "finished": summary is not None,
            "wall_s": summary["wall_s"] if summary else None,
            "train_s_from_log": round(sum(p["train_s"] or 0 for p in pts), 1),
            "knn_acc": last["knn_acc"], "knn_acc_random_init": base["knn_acc_random_init"],
            "knn_acc_raw_pixels": base["knn_acc_raw_pixels"],
            "knn_acc_best": max(p["knn_acc"] for p in pts),
            "goal_met": last["knn_acc"] >= base["knn_acc_random_init"] + 0.20 and
            last["knn_acc"] >= base["knn_acc_raw_pixels"] + 0.05,
            "curve": pts}


def learnable(runs_dir, assets, old):
    runs, screens = [], {}
    before = {r["command"]: r for r in old.get("learnable_data", []) + list(old.get("learnable_data_screens", {})
                                                                               .get("ssl", {}).values())}
    for name, flags in LEARNABLE.items():
        cmd = "python dinov3_mini.py " + " ".join(flags)
        if NO_TRAIN and not os.path.exists(os.path.join(runs_dir, name)) and cmd in before:
            runs.append(dict(before[cmd], name=name))  # measured before, its folder is not here: kept as it was
            print(f"{name}: kept from results.json (no folder in {runs_dir})")
            continue
        out, summary, cmd = run_or_resume(name, flags, runs_dir)
        if out is not None:
            seed = int(flags[flags.index("--seed") + 1]) if "--seed" in flags else 0
            r = curve(out, summary, cmd, seed, before.get(cmd))
            if len(r["curve"]) > 1:  # an evaluation after step 0 to report
                runs.append(dict(name=name, **r))
            else:
                print(f"{name}: no evaluation yet, left out")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import screen_data  # the candidates that are not in dinov3_mini
    screens = dict(old.get("learnable_data_screens", {}).get("ssl", {}))  # measured before: kept unless found here
    for cand in SCREENS:
        out = os.path.join(runs_dir, f"screen_{cand}")
        if os.path.exists(os.path.join(out, "checkpoint.pt")):
            screen_data.install(cand)
            ck_args = dm.load_checkpoint(os.path.join(out, "checkpoint.pt"))["args"]
            cmd = (f"python bench/screen_data.py --ssl {cand} --epochs {ck_args['epochs']} --eval-every "
                   f"{ck_args['eval_every']} --seed {ck_args['seed']}")
            sp = os.path.join(out, "summary.json")
            screens[cand] = curve(out, json.load(open(sp)) if os.path.exists(sp) else None, cmd, ck_args["seed"],
                                  before.get(cmd))
    table = os.path.join(runs_dir, "screen.json")  # bench/screen_data.py's table: baselines, supervised ViT
    screens = {"table": json.load(open(table)) if os.path.exists(table) else
               old.get("learnable_data_screens", {}).get("table", {}), "ssl": screens}
    draw_learnable(runs, screens["ssl"], os.path.join(assets, "textures_curves.png"))
    return runs, screens


def min_span(a, span):
    """Make the y axis at least `span` tall, so that a wiggle is not drawn as a trend."""
    lo, hi = a.get_ylim()
    mid = (lo + hi) / 2
    a.set_ylim(min(lo, mid - span / 2), max(hi, mid + span / 2))


def draw_learnable(runs, screens, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(16, 5.0))
    ax = fig.subplots(1, 4)
    entries = [(r["command"].replace("python dinov3_mini.py --dataset ", ""), r, "-") for r in runs] + \
              [(f"{c} (screen, seed {r['seed']})", r, ":") for c, r in screens.items()]
    for a, (k, lab) in zip(ax, (("knn_acc", "k-NN accuracy (CLS)"), ("dense_fg_miou", "object/background probe mIoU"),
                                ("dense_miou", "11-class dense probe mIoU"), ("similarity_locality", "similarity locality"))):
        for i, (name, r, ls) in enumerate(entries):
            steps = [p["step"] for p in r["curve"]]
            a.plot(steps, [p[k] for p in r["curve"]], "o" + ls, ms=3, color=f"C{i}", label=name)
            if k == "knn_acc":
                a.axhline(r["knn_acc_raw_pixels"], color=f"C{i}", ls="--", lw=0.8)
                a.axhline(r["knn_acc_random_init"], color=f"C{i}", ls="-.", lw=0.8)
        min_span(a, 0.1)
        a.set_title(lab + ("\n(dashed: raw pixels, dash-dot: random-init ViT)" if k == "knn_acc" else ""), fontsize=9)
        a.set_xlabel("step (64 images each)")
    fig.suptitle("The default recipe (nano ViT, 4 registers) on `--dataset textures` (epochs of 10k images), "
                 "and screens of other candidates")
    fig.legend(*ax[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)  # one legend, below
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


GRAM_KEYS = ("gram", "gram_weight", "gram_start", "gram_teacher_epoch", "gram_refresh_every", "gram_hires")


def long_runs(kind, runs_dir, assets, old):
    """storage_long / signal_long: one entry per run with every instrument at every evaluation (epoch 0 = the ViT at
    init), the run's settings and baselines; a run that stopped part-way is resumed (or, with --no-train, recorded
    as far as it got)."""
    before = {r["command"]: r for r in old.get(kind, [])}
    res = []
    for name, flags in LONG[kind].items():
        cmd = "python dinov3_mini.py " + " ".join(flags)
        if not os.path.exists(os.path.join(runs_dir, name)) and cmd in before and NO_TRAIN:
            res.append(before[cmd])
            continue
        out, summary, cmd = run_or_resume(name, flags, runs_dir)
        if out is None:
            continue
        ck = dm.load_checkpoint(os.path.join(out, "checkpoint.pt"))
        args, base, ev = ck["args"], summary or ck["baselines"], log_evals(out, ck)
        if not ev:
            print(f"{name}: no evaluation yet, left out")
            continue
        prev = before.get(cmd, {}).get("evals", [{}])[0]
        zero = prev if prev.get("step") == 0 else dict(init_point(out, base["knn_acc_random_init"]), step=0)
        res.append({"name": name, "command": cmd, "seed": args["seed"], "steps": ev[-1]["step"],
                    "epochs_run": ev[-1]["epoch"], "epochs_planned": args["epochs"], "finished": summary is not None,
                    "wall_s": summary["wall_s"] if summary else None,
                    "train_s_from_log": round(sum(e["train_s"] for e in ev), 1),
                    "registers": args["registers"], "ibot_weight": args["ibot_weight"],
                    **{k: args.get(k) for k in GRAM_KEYS},
                    "knn_acc_random_init": base["knn_acc_random_init"], "knn_acc_raw_pixels": base["knn_acc_raw_pixels"],
                    "evals": [zero] + ev})
    if res:  # the Gram runs are drawn beside the baseline they branch from (signal_long's first run)
        ref = old.get("signal_long", [])[:1] if kind == "signal_gram" else []
        draw_long(kind, ref + res, os.path.join(assets, f"{kind}.png"))
    return res


LONG_PANELS = {"storage_long": (("knn_acc", "k-NN accuracy (CLS)"), ("outlier_fraction", "high-norm outlier fraction"),
                                ("patch_norm_max_ratio", "max / median patch norm (output)"),
                                ("patch_write_max", "largest write of the blocks / embedding"),
                                ("register_cls_attention_share", "CLS attention on the registers")),
               "signal_long": (("knn_acc", "k-NN accuracy (CLS)"), ("dense_fg_miou", "object/background probe mIoU"),
                               ("similarity_locality", "similarity locality"), ("dse", "DSE (label-free)"),
                               ("patch_cls_cosine", "patch-CLS cosine"))}
LONG_PANELS["storage_screens"] = LONG_PANELS["storage_long"][:-1]  # 0 registers: no register panel
LONG_PANELS["storage_supervised"] = (("test_acc", "test accuracy (linear head)"), ("knn_acc", "k-NN accuracy (CLS)"),
                                     ("outlier_fraction", "high-norm outlier fraction"),
                                     ("patch_norm_max_ratio", "max / median patch norm (output)"),
                                     ("patch_norm_bimodality", "bimodality of patch norms"),
                                     ("register_cls_attention_share", "CLS attention on the registers"))
LONG_PANELS["recipe_screens"] = LONG_PANELS["signal_gram"] = LONG_PANELS["signal_long"]


# The supervised control of the storage failure (bench/supervised_control.py): the same nano ViT trained with the
# labels of `textures`, DeiT-III style, 5,000 steps, without and with 4 registers.
SUPERVISED = {f"sup_textures_r{r}": ["--dataset", "textures", "--steps", "5000", "--registers", str(r)] for r in (0, 4)}


def supervised(runs_dir, assets, old):
    """storage_supervised: one entry per supervised-control run found in runs_dir (or kept from results.json):
    its evaluations (every instrument), and the final ViT measured like --analyze (where the outliers sit, what
    they hold); the norm figure of the two runs -> assets/storage_supervised_norms.png."""
    before = {r["command"]: r for r in old.get("storage_supervised", [])}
    res, folders = [], {}
    for name, flags in SUPERVISED.items():
        cmd = "python bench/supervised_control.py " + " ".join(flags)
        out = os.path.join(runs_dir, name)
        if not os.path.exists(os.path.join(out, "log.jsonl")):
            if cmd in before:
                res.append(before[cmd])
            continue
        ev = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        backbone, args = load_backbone(out)
        _, _, m, _, _ = tokens(backbone, args)
        keys = ("outlier_fraction", "outlier_background_share", "background_share", "outlier_cls_attention_share",
                "outlier_knn_acc", "normal_patch_knn_acc", "patch_norm_max_ratio", "patch_norm_bimodality")
        res.append({"name": name, "command": cmd, "steps": ev[-1]["step"],
                    "planned_steps": int(flags[flags.index("--steps") + 1]),
                    "wall_s": round(sum(e["train_s"] for e in ev), 1), "registers": args.registers,
                    "final_analysis": {k: m.get(k) for k in keys}, "evals": ev})
        folders[args.registers] = out
    if res:
        draw_long("storage_supervised", res, os.path.join(assets, "storage_supervised.png"))
    if set(folders) == {0, 4}:
        draw_storage(folders, os.path.join(assets, "storage_supervised_norms.png"),
                     how="trained with labels (bench/supervised_control.py)")
    return res


def draw_long(kind, runs, path):
    """The long runs' instruments per step, one panel per instrument; storage adds the per-layer max/median norm."""
    from matplotlib.figure import Figure
    panels = LONG_PANELS[kind]
    extra = kind.startswith("storage")
    fig = Figure(figsize=(3.3 * (len(panels) + extra), 3.6))
    ax = fig.subplots(1, len(panels) + extra)
    for a, (k, lab) in zip(ax, panels):
        for i, r in enumerate(runs):
            ev = [e for e in r["evals"] if e.get(k) is not None]
            a.plot([e["step"] for e in ev], [e[k] for e in ev], "o-", ms=3, color=f"C{i}", label=r["name"])
            if k == "knn_acc" and "knn_acc_raw_pixels" in r:
                a.axhline(r["knn_acc_raw_pixels"], color=f"C{i}", ls="--", lw=0.8)
                a.axhline(r["knn_acc_random_init"], color=f"C{i}", ls="-.", lw=0.8)
        min_span(a, 1.0 if "ratio" in k else 0.1)
        base = k == "knn_acc" and "knn_acc_raw_pixels" in runs[0]
        a.set_title(lab + ("\n(dashed: raw pixels, dash-dot: random init)" if base else ""), fontsize=9)
        a.set_xlabel("step (64 images each)")
    ax[0].legend(fontsize=7)
    if extra:  # where in depth: max/median patch norm per layer at the last evaluation (registers paper Fig. 4)
        a = ax[-1]
        for i, r in enumerate(runs):
            last = [e for e in r["evals"] if e.get("patch_norm_max_ratio_per_layer")]
            if last:
                a.plot(last[-1]["patch_norm_max_ratio_per_layer"], "o-", ms=3, color=f"C{i}",
                       label=f"{r['name']}, step {last[-1]['step']}")
        min_span(a, 1.0)
        a.set_title("max / median patch norm per layer\n(last evaluation; 0 = embedding)", fontsize=9)
        a.set_xlabel("layer")
        a.legend(fontsize=7)
    length = (f"up to {max(r['epochs_planned'] for r in runs)} epochs" if "epochs_planned" in runs[0] else
              f"supervised (bench/supervised_control.py), up to {max(r['steps'] for r in runs)} steps")
    fig.suptitle(f"{kind}: nano ViT on --dataset textures, {length}; "
                 f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", fontsize=10)
    fig.legend(*ax[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)  # one legend, below
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def redraw(assets):
    """The pictures that results.json alone holds the data for (collapse_curves.png), drawn again from it."""
    path = os.path.join(assets, "results.json")
    if not os.path.exists(path):
        sys.exit(f"--redraw: there is no {path}")
    runs = json.load(open(path)).get("collapse", {}).get("runs")
    if not runs:
        sys.exit(f"--redraw: {path} has no collapse runs")
    draw_curves(runs, os.path.join(assets, "collapse_curves.png"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "results"), help="Where the runs go (one "
                   "folder each); finished runs with the same configuration are reused.")
    p.add_argument("--assets", default=os.path.join(ROOT, "assets"), help="Where results.json and the PNGs go.")
    p.add_argument("--only", choices=("storage", "collapse", "learnable", "storage_supervised", *LONG), default=None,
                   help="One of the experiments.")
    p.add_argument("--seeds", type=int, default=3, help="Seeds per register count (docs/results.md has 3).")
    p.add_argument("--registers", type=int, nargs="+", default=list(REGISTERS), help="Register counts to run "
                   "now; the others keep their entries of an existing results.json.")
    p.add_argument("--no-train", action="store_true", help="Measure only the runs that exist; train nothing.")
    p.add_argument("--redraw", action="store_true", help="Redraw collapse_curves.png from the stored "
                   "results.json in --assets; run and measure nothing.")
    p.add_argument("--draw-storage", nargs=2, metavar=("RUN_R0", "RUN_R4"), default=None, help="Draw "
                   "storage_norms.png from two run folders (0 and 4 registers, the same data); run nothing else.")
    a = p.parse_args()
    if a.redraw:
        redraw(a.assets)
        return
    if a.draw_storage:
        draw_storage(dict(zip((0, 4), a.draw_storage)), os.path.join(a.assets, "storage_norms.png"))
        return
    global NO_TRAIN
    NO_TRAIN = a.no_train
    os.makedirs(a.assets, exist_ok=True)
    path = os.path.join(a.assets, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    t0 = time.time()
    if a.only in (None, "storage"):
        old = results.get("storage", {}).get("registers", {})
        results["storage"] = {"preset": dm.PRESETS["artifacts"],
                              "registers": storage(a.runs_dir, a.registers, a.seeds, a.assets, old)}
    if a.only in (None, "collapse"):
        results["collapse"] = {"preset": dm.PRESETS["collapse"], "runs": collapse(a.runs_dir, a.assets)}
    if a.only in (None, "learnable"):
        results["learnable_data"], results["learnable_data_screens"] = learnable(a.runs_dir, a.assets, results)
    if a.only in (None, "storage_supervised"):
        results["storage_supervised"] = supervised(a.runs_dir, a.assets, results)
    for kind in LONG:
        if a.only in (None, kind):
            results[kind] = long_runs(kind, a.runs_dir, a.assets, results)
    results["hardware"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    results["outlier_rule"] = f"norm > median + {dm.OUTLIER_K:g} x 1.4826 x MAD and > 2 x median (patch output norms)"
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
