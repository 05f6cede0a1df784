"""The paper's ablations at a scale a 2-core CPU finishes in well under an hour.

    python experiments.py                        # all four tables, runs/experiments/
    python experiments.py --tables 1 3 --steps 600
    python experiments.py --tables 4 --steps 20 --eval-images 16 --eval-steps 5   # a smoke run
    python experiments.py --tables 1 --res 32 --budget-s 840 --seeds 0 1 2   # equal wall-clock

Every run trains MicroDiT_CPU_2 with train.py on the built-in shapes data (16x16 pixels,
64 patches; --res 32: 256, the paper's count) from the same seed, data order and recipe;
only the switch under test changes.
Quality is read three ways, all without downloads:

- held-out loss: the EDM loss, unmasked, of 256 held-out images at 8 fixed noise levels
  from 0.05 to 20 with fixed noise, averaged over levels. Held out means unseen: the first
  256 images of another data seed whose captions no training image has (a caption names
  exactly one image; about half of a second seed's draws are training images). It is the
  most sensitive of the three at this scale: lower is better;
- shapes FD: eval.py's Frechet distance between 128 generated images (20 Heun steps,
  guidance 3; --eval-images, --eval-steps) and renderings of their captions, in a fixed
  random feature network;
- prompt following: eval.py's template matching, the fraction of those 128 images whose
  colour is right, and whose colour, shape, size and position are all right.

Cost is the model's training FLOPs per image (model.py) and the median measured ms/step.
With --budget-s, table 1 gives every run the same training wall-clock instead: the step
times of both architectures, masked and not, are measured side by side in one process
(OUT/step_times.json), and the steps fill the budget at those times; the masked runs spend
--finetune of it (0.15) unmasked, the paper's phase 2. OUT/equal_time.md gives each figure
as mean ± std over --seeds, beside its calibration: renderings of the captions (a perfect
model) and noise images for the sample metrics, the untrained network for the held-out
loss.
Table 1 also trains the masked models for the unmasked run's compute: steps scaled by the
FLOP ratio (measured step times on a shared VM drift by 20% between runs made one after the
other, so they would not give equal budgets); each run's measured training time is reported.
The results go to OUT/results.md (markdown tables), OUT/results.json and OUT/plot.png
(held-out loss against training compute, every run), rewritten after each run. Each run's
figures are also kept in its folder (result.json): a rerun, after a stop or with more
tables, reuses the runs done with the same settings and evaluation code instead of
evaluating them again.
"""
import argparse
import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import statistics

import numpy as np
import torch
from PIL import Image, ImageDraw

import train
from data import LatentDataset
from diffusion import SIGMA_DATA, edm_loss_per_sample
from eval import evaluate_shapes, file_identity, shapes_calibration, training_captions
from model import PRESETS, DiTConfig, MicroDiT, train_flops_per_image
from checkpoint import atomic_write, checkpoints, load_dit, phase_dir, write_json
from prepare import ensure_demo_data
from sample import slug

HELD_OUT_SIGMAS = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0]
HELD_OUT = 256  # images, drawn from HELD_OUT_DRAWS of data seed 1
HELD_OUT_DRAWS = 640
EVAL_IMAGES = 128
# the modules a run's figures come from, besides held_out_loss (see evaluation_code)
EVAL_CODE = ["checkpoint.py", "diffusion.py", "eval.py", "mixer.py", "model.py", "moe.py",
             "sample.py"]
PRESET = "MicroDiT_CPU_2"
RES = 16
NO_MIXER = {"patch_mixer_depth": 0}
# (table, name, mask ratio, DiTConfig overrides); the deferred-masking run is shared
RUNS = [
    (1, "no masking", 0.0, NO_MIXER),
    (1, "naive 75% (no mixer)", 0.75, NO_MIXER),
    (1, "deferred 75% (mixer)", 0.75, {}),
    (2, "mixer depth 2", 0.75, {"patch_mixer_depth": 2}),
    (2, "mixer depth 4", 0.75, {"patch_mixer_depth": 4}),
    (2, "mixer depth 1, width 64", 0.75, {"patch_mixer_dim": 64}),
    (3, "mask 0.50", 0.5, {}),
    (3, "mask 0.85", 0.85, {}),
    (3, "mask 0.90", 0.9, {}),
    (4, "token-choice top-2", 0.75, {"moe_routing": "token_choice"}),
    (4, "no layer-wise scaling", 0.75, {"qkv_ratio": [0.75, 0.75], "mlp_ratio": [2.25, 2.25]}),
]
# table 1 at equal training wall-clock (--budget-s): the masked runs end unmasked
EQUAL_TIME = [("no masking", 0.0, NO_MIXER),
              ("naive 75% (no mixer) + finetune", 0.75, NO_MIXER),
              ("deferred 75% (mixer) + finetune", 0.75, {})]
CALIBRATION_NAMES = {"real": "renderings of the captions (the same n)",
                     "noise": "uniform noise images"}
SHARED = {2: ["deferred 75% (mixer)"], 3: ["deferred 75% (mixer)"], 4: ["deferred 75% (mixer)"]}
TITLES = {1: "Masking: none, naive, deferred (same steps; and same compute)",
          2: "Patch-mixer size at 75% masking",
          3: "Mask ratio with the patch-mixer",
          4: "Routing and layer-wise scaling (75% masking, mixer)"}


def run_folder(out, name, steps, batch, seed, res=RES, finetune=0):
    """One folder per run and budget: a rerun with another --seed, --steps, --batch-size,
    --res or finetune trains anew instead of resuming (or reusing) a run made with the old
    ones."""
    budget = f"steps{steps}" + (f"+{finetune}" if finetune else "")
    return os.path.join(out, f"{slug(name)}_{budget}_batch{batch}_seed{seed}"
                             + (f"_{res}px" if res != RES else ""))


def train_run(out, name, mask_ratio, overrides, steps, batch, data, seed, res=RES, finetune=0):
    """Phase 1 with the demo's recipe for `steps`; with `finetune` steps, then phase 2: the
    same weights and optimizer, unmasked, at phase 1's final learning rate held constant
    (the paper's phase 2 at the scale of its phase 1). Returns the folder, the phase to
    judge and the measured timing."""
    folder = run_folder(out, name, steps, batch, seed, res, finetune)
    common = ["--data", data, "--out", folder, "--seed", str(seed), "--batch-size", str(batch),
              "--micro-batch", str(batch), "--ema-decay", "0", "--keep", "1"]
    train.cli(["--demo", *common, "--res", str(res), "--steps", str(steps),
               "--mask-ratio", str(mask_ratio), "--model", json.dumps(overrides),
               "--warmup", str(max(1, steps // 15)), "--ckpt-every", str(steps),
               "--sample-every", str(steps)])  # resumes, or does nothing, when it is done
    if finetune:
        train.cli(["--phase", "2", *common, "--steps", str(finetune), "--mask-ratio", "0",
                   "--lr", str(train.DEMO["lr"] * train.DEMO["min_lr_ratio"]),
                   "--schedule", "constant", "--warmup", "0", "--p-mean", str(train.DEMO["p_mean"]),
                   "--p-std", str(train.PHASES[1]["p_std"]), "--ckpt-every", str(finetune),
                   "--sample-every", "0"])
    logs = [[json.loads(line) for line in open(os.path.join(folder, f"phase{p}", "log.jsonl"))]
            for p in ([1, 2] if finetune else [1])]
    ms = statistics.median(r["ms_per_step"] for r in logs[0][5:] or logs[0])
    seconds = sum(r["ms_per_step"] for log in logs for r in log) / 1000
    return folder, 2 if finetune else 1, {"ms_per_step": ms, "train_seconds": seconds}


def unseen_rows(held_out, data, n):
    """The first n rows of the held-out set whose captions no training image has."""
    seen = LatentDataset(data)
    seen = {seen.caption(i) for i in range(seen.num_samples)}
    candidates = LatentDataset(held_out)
    rows = [i for i in range(candidates.num_samples) if candidates.caption(i) not in seen][:n]
    if len(rows) < n:
        raise ValueError(f"{held_out}: only {len(rows)} of its images are unseen in training, "
                         f"not {n}: draw more (HELD_OUT_DRAWS)")
    return torch.tensor(rows)


@torch.no_grad()
def held_out_loss(net, held_out, rows, sigma_data=SIGMA_DATA):
    """Mean EDM loss over HELD_OUT_SIGMAS with fixed noise: a deterministic quality score,
    on the held-out set's `rows` at the network's resolution, weighted as the model was
    trained (its sigma_data)."""
    shard = os.path.join(held_out, "shard-00000")
    res = net.cfg.input_size  # pixels: the network sees the images themselves
    images = torch.from_numpy(np.load(f"{shard}.images_{res}.npy"))[rows].float()      # (N, 3, H, W)
    captions = torch.from_numpy(np.load(f"{shard}.caption_feats.npy"))[rows].float()  # (N, 77, Dc)
    g = torch.Generator().manual_seed(0)
    losses = []
    for sigma in HELD_OUT_SIGMAS:
        noise = torch.randn(images.shape, generator=g)
        normal = torch.full((len(images),), float(np.log(sigma)))  # p_mean 0, p_std 1: sigma
        per_sample, _ = edm_loss_per_sample(net, images, captions, 0.0, 0.0, 1.0,
                                            sigma_data=sigma_data, normal=normal, noise=noise)
        losses.append(per_sample.mean().item())
    return float(np.mean(losses)), losses


# read when the module loads: getsource reads the file when first asked, and a file edited
# above the function since then would give other lines (a run judged again for nothing)
HELD_OUT_SOURCE = inspect.getsource(held_out_loss)


def evaluation_code():
    """A digest of the code that loads, samples and judges a checkpoint: EVAL_CODE's files
    and held_out_loss. Editing the tables or the runs here leaves it as it is."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256(HELD_OUT_SOURCE.encode())
    for name in EVAL_CODE:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def evaluate(folder, held_out, rows, images, steps, phase=1):
    """The run's figures (its last checkpoint of `phase`), from its folder's result.json
    when they were made from the very same checkpoint file (path, size, modification time:
    a run trained again is judged again) by the same evaluation code with the same settings."""
    ckpt = checkpoints(phase_dir(folder, phase))[-1]
    settings = {"checkpoint": file_identity(ckpt), "code": evaluation_code(),
                "eval_images": images, "eval_steps": steps, "held_out": HELD_OUT,
                "held_out_sigmas": HELD_OUT_SIGMAS}
    cache = os.path.join(folder, "result.json")
    if os.path.exists(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved["settings"] == settings:
            return saved["result"]
    net, info = load_dit(ckpt)
    loss, per_sigma = held_out_loss(net.eval(), held_out, rows, info["sigma_data"])
    scores, _, _ = evaluate_shapes(ckpt, n=images, seed=1234, steps=steps, guidance=3.0,
                                   device="cpu")
    result = {"held_out_loss": loss, "held_out_per_sigma": per_sigma, **scores}
    write_json(cache, {"settings": settings, "result": result})
    return result


def model_config(overrides, res=RES):
    return DiTConfig.from_dict({**dataclasses.asdict(PRESETS[PRESET]), "in_channels": 3,
                                "input_size": res, **overrides})


def table(rows):
    head = ("| run | steps | mask | GFLOPs/img | ms/step | train s | held-out loss | "
            "at sigma 0.05 | at sigma 20 | shapes FD | colour right | all right |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['name']} | {r['steps']} | {r['mask']:.2f} | {r['gflops']:.3f} | "
        f"{r['ms_per_step']:.0f} | {r['train_seconds']:.0f} | {r['held_out_loss']:.4f} | "
        f"{r['held_out_per_sigma'][0]:.3f} | {r['held_out_per_sigma'][-1]:.3f} | "
        f"{r['frechet']:.3f} | "
        f"{r['color']:.2f} | {r['all']:.2f} |\n" for r in rows)


def plot(results, path):
    """Held-out loss against total training compute (log scale), one labelled dot per run."""
    W, H, m = 900, 560, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [np.log10(r["gflops"] * r["steps"] * r["batch"]) for r in results]
    ys = [r["held_out_loss"] for r in results]
    x0, x1 = min(xs) - 0.05, max(xs) + 0.05
    y0, y1 = min(ys) - 0.01, max(ys) + 0.01

    def at(x, y):
        return m + (x - x0) / (x1 - x0) * (W - 2 * m), H - m - (y - y0) / (y1 - y0) * (H - 2 * m)
    d.rectangle([m, m, W - m, H - m], outline="black")
    colours = {1: (200, 30, 30), 2: (30, 110, 200), 3: (30, 150, 60), 4: (150, 60, 170)}
    for r, x, y in zip(results, xs, ys):
        px, py = at(x, y)
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colours[r["table"]])
        d.text((px + 6, py - 6), r["name"], fill=colours[r["table"]])
    d.text((m, H - m + 10), f"log10 training GFLOPs (total)  {x0:.2f} .. {x1:.2f}", fill="black")
    d.text((m, m - 20), f"held-out EDM loss (lower is better)  {y0:.3f} .. {y1:.3f}", fill="black")
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/experiments")
    p.add_argument("--tables", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--res", type=int, default=RES, help="image side in pixels; patches of 2: "
                   "16 gives 64 per image, 32 gives 256 (the paper's count)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="initial weights, data "
                   "order and noise, one set of runs each (the data and held-out set stay fixed)")
    p.add_argument("--budget-s", type=float, help="table 1 at equal training wall-clock: "
                   "this many seconds per run at the step times measured side by side "
                   "(instead of --steps); the masked runs spend --finetune of it unmasked")
    p.add_argument("--finetune", type=float, default=0.15, help="with --budget-s: the share "
                   "of the budget of the unmasked finetune after masked training")
    p.add_argument("--eval-images", type=int, default=EVAL_IMAGES,
                   help="generated images per run for shapes FD and prompt following")
    p.add_argument("--eval-steps", type=int, default=20, help="Heun steps per generated image")
    args = p.parse_args(argv)
    if args.eval_images < 2 or args.eval_steps < 1:
        p.error("--eval-images must be at least 2 (a Frechet distance needs 2) and "
                "--eval-steps at least 1")
    if args.budget_s is not None and (args.tables != [1] or args.budget_s <= 0
                                      or not 0 < args.finetune < 1):
        p.error("--budget-s runs table 1 only (--tables 1), with a positive budget and "
                "--finetune between 0 and 1")
    data = ensure_demo_data(os.path.join(args.out, "data"), res=args.res)
    held_out = ensure_demo_data(os.path.join(args.out, f"held_out_{HELD_OUT_DRAWS}"),
                                res=args.res, n=HELD_OUT_DRAWS, seed=1)
    rows = unseen_rows(held_out, data, HELD_OUT)
    judge = lambda folder, phase=1: evaluate(folder, held_out, rows, args.eval_images,  # noqa: E731
                                             args.eval_steps, phase)
    if args.budget_s is not None:
        return equal_time(args, data, judge, held_out, rows)
    for seed in args.seeds:
        ablations(args, data, judge, seed)
    print(f"tables in {args.out}/results.md, plot in {args.out}/plot.png")


def ablations(args, data, judge, seed):
    """Tables 2 to 4, and table 1 at equal steps and at equal FLOPs, for one seed; its
    results.md, .json and plot.png."""
    results = []

    def trained(t, name, mask, overrides, steps):
        folder, phase, timing = train_run(args.out, name, mask, overrides, steps,
                                          args.batch_size, data, seed, args.res)
        gflops = train_flops_per_image(model_config(overrides, args.res), args.res, mask) / 1e9
        results.append({"table": t, "name": name, "steps": steps, "batch": args.batch_size,
                        "seed": seed, "mask": mask, "overrides": overrides, "gflops": gflops,
                        **timing, **judge(folder, phase)})
        print(json.dumps(results[-1]))
        report(args.out, args.tables, results, seed)

    wanted = {name for t, name, _, _ in RUNS if t in args.tables}
    wanted |= {name for t in args.tables for name in SHARED.get(t, [])}
    for t, name, mask, overrides in RUNS:
        if name in wanted:
            trained(t, name, mask, overrides, args.steps)
    if 1 in args.tables:  # the masked runs again, with the unmasked run's training FLOPs
        base = next(r for r in results if r["name"] == "no masking")
        for r in [r for r in results if r["table"] == 1 and r["mask"] > 0]:
            trained(1, f"{r['name']}, same compute", r["mask"], r["overrides"],
                    round(args.steps * base["gflops"] / r["gflops"]))
    return results


def step_key(overrides, mask):
    return f"{'no mixer' if overrides == NO_MIXER else 'mixer'}, mask {mask}"


def side_by_side(out, res, batch, rounds=8):
    """Median seconds per training step (train.train_step, random data) of both
    architectures at mask 0 and 0.75, measured in one process with the calls interleaved
    (bench.alternate), so that a change of the machine's speed hits all four alike. Kept in
    OUT/step_times.json: every seed and every rerun trains the same step counts."""
    from bench import alternate, make_batch
    path = os.path.join(out, "step_times.json")
    settings = {"res": res, "batch": batch, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "rounds": rounds}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["settings"] == settings:
            return saved["seconds"]
    variants = {}
    for overrides in (NO_MIXER, {}):
        cfg = model_config(overrides, res)
        torch.manual_seed(0)
        net = MicroDiT(cfg)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
        x, y = make_batch(cfg, batch, torch.device("cpu"))
        batches = itertools.repeat({"latents": x, "captions": y})
        for mask in (0.0, 0.75):
            run = dict(train.PHASES[1], **train.RUN_DEFAULTS)
            run.update(mask_ratio=mask, sigma_data=SIGMA_DATA, p_mean=train.DEMO["p_mean"])
            variants[step_key(overrides, mask)] = (
                lambda net=net, optimizer=optimizer, batches=batches, run=run:
                train.train_step(net, net, optimizer, batches, run, step=0))
    seconds = alternate(variants, rounds, 2, torch.device("cpu"))
    write_json(path, {"settings": settings, "seconds": seconds})
    return seconds


def equal_time_steps(seconds, budget, share, mask, overrides):
    """(masked steps, unmasked finetune steps) that fill `budget` seconds of training: all
    of it unmasked for an unmasked run, else `share` of it in the finetune; at least a step."""
    if mask == 0:
        return max(1, round(budget / seconds[step_key(overrides, 0.0)])), 0
    return (max(1, round((1 - share) * budget / seconds[step_key(overrides, mask)])),
            max(1, round(share * budget / seconds[step_key(overrides, 0.0)])))


def equal_time(args, data, judge, held_out, rows):
    """Table 1 at equal training wall-clock, each masked run with its unmasked finetune,
    every seed; OUT/equal_time.md and .json, with the calibration of each metric."""
    seconds = side_by_side(args.out, args.res, args.batch_size)
    print("seconds per step, side by side:", json.dumps(seconds))
    # an untrained network outputs zeros (its last layer starts at zero), with or without the
    # mixer: D(x) = c_skip x, the held-out loss of having learnt nothing
    untrained = MicroDiT(model_config(NO_MIXER, args.res)).eval()
    calibration = {"untrained": held_out_loss(untrained, held_out, rows)[1],
                   **shapes_calibration(args.eval_images, 1234, training_captions(
                       None, {"data": data}), args.res)}
    results = []
    for seed in args.seeds:
        for name, mask, overrides in EQUAL_TIME:
            steps, finetune = equal_time_steps(seconds, args.budget_s, args.finetune, mask,
                                               overrides)
            folder, phase, timing = train_run(args.out, name, mask, overrides, steps,
                                              args.batch_size, data, seed, args.res, finetune)
            results.append({"name": name, "seed": seed, "mask": mask, "steps": steps,
                            "finetune_steps": finetune, **timing, **judge(folder, phase)})
            print(json.dumps(results[-1]))
            summary = {"settings": vars(args),
                       "seconds_per_step": seconds, "calibration": calibration,
                       "runs": results}
            write_json(os.path.join(args.out, "equal_time.json"), summary)
            text = equal_time_tables(summary)
            atomic_write(os.path.join(args.out, "equal_time.md"), lambda f: f.write(text.encode()))
            plot_per_sigma(results, os.path.join(args.out, "equal_time.png"))
    print(f"tables in {args.out}/equal_time.md, plot in {args.out}/equal_time.png")


def spread(values, digits):
    """'mean ± std' over seeds (the std with n - 1), or the one value."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def equal_time_tables(summary):
    """equal_time.json as markdown: the runs' means ± seed std, and the calibration."""
    runs, cal, seconds = summary["runs"], summary["calibration"], summary["seconds_per_step"]
    text = ("Seconds per training step, measured side by side: " + ", ".join(
        f"{k} {1000 * v:.0f} ms" for k, v in seconds.items()) + "\n\n")
    text += ("| run | steps (masked + unmasked) | seeds | train s | held-out loss | "
             "all four right | shape | colour | size | position | Frechet |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|\n")
    for name, _, _ in EQUAL_TIME:
        rs = [r for r in runs if r["name"] == name]
        if not rs:
            continue
        col = lambda key, digits=2: spread([r[key] for r in rs], digits)  # noqa: E731
        steps = f"{rs[0]['steps']} + {rs[0]['finetune_steps']}"
        text += (f"| {name} | {steps} | {','.join(str(r['seed']) for r in rs)} | "
                 f"{np.mean([r['train_seconds'] for r in rs]):.0f} | "
                 f"{col('held_out_loss', 4)} | {col('all')} | {col('shape')} | {col('color')} | "
                 f"{col('size')} | {col('position')} | {col('frechet', 3)} |\n")
    for name in ("real", "noise"):
        c = cal[name]
        text += (f"| calibration: {CALIBRATION_NAMES[name]} | | | | | {c['all']:.2f} | "
                 f"{c['shape']:.2f} | {c['color']:.2f} | {c['size']:.2f} | "
                 f"{c['position']:.2f} | {c['frechet']:.3f} |\n")
    text += ("\nHeld-out loss per noise level (mean ± std over seeds):\n\n| run | "
             + " | ".join(f"sigma {s}" for s in HELD_OUT_SIGMAS) + " |\n|---|"
             + "---|" * len(HELD_OUT_SIGMAS) + "\n")
    for name, _, _ in EQUAL_TIME:
        rs = [r for r in runs if r["name"] == name]
        if rs:
            per = np.array([r["held_out_per_sigma"] for r in rs])           # (seeds, levels)
            text += f"| {name} | " + " | ".join(spread(list(v), 3) for v in per.T) + " |\n"
    text += ("| calibration: untrained network | "
             + " | ".join(f"{v:.3f}" for v in cal["untrained"]) + " |\n")
    return text


def plot_per_sigma(runs, path):
    """Held-out loss against the noise level (log scale), one line per run of EQUAL_TIME: the
    mean over seeds, with a bar of ± one std at each level."""
    W, H, m = 900, 560, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lines = {}
    for name, _, _ in EQUAL_TIME:
        per = np.array([r["held_out_per_sigma"] for r in runs if r["name"] == name])  # (seeds, levels)
        if len(per):
            lines[name] = (per.mean(0), per.std(0, ddof=1) if len(per) > 1 else 0 * per[0])
    xs = np.log10(HELD_OUT_SIGMAS)
    y1 = max(float((mean + std).max()) for mean, std in lines.values()) * 1.05

    def at(x, y):
        return (m + (x - xs[0]) / (xs[-1] - xs[0]) * (W - 2 * m), H - m - y / y1 * (H - 2 * m))
    d.rectangle([m, m, W - m, H - m], outline="black")
    colours = [(30, 30, 30), (200, 30, 30), (30, 110, 200)]
    for k, (name, (mean, std)) in enumerate(lines.items()):
        points = [at(x, y) for x, y in zip(xs, mean)]
        d.line(points, fill=colours[k], width=2)
        for x, y, e in zip(xs, mean, std):
            d.line([at(x, y - e), at(x, y + e)], fill=colours[k], width=1)
        d.text((W - m - 260, m + 10 + 16 * k), name, fill=colours[k])
    for x, sigma in zip(xs, HELD_OUT_SIGMAS):
        d.text((at(x, 0)[0] - 10, H - m + 8), f"{sigma:g}", fill="black")
    d.text((m, H - m + 28), "noise level sigma (log scale)", fill="black")
    d.text((m, m - 20), f"held-out EDM loss, mean ± std over seeds (0 .. {y1:.3f})", fill="black")
    img.save(path)


def report(out, tables, results, seed=0):
    """results.json, results.md and plot.png of one seed's runs so far (seed 0's without
    a suffix, others' as results_seed1.md, ...)."""
    suffix = f"_seed{seed}" if seed else ""
    write_json(os.path.join(out, f"results{suffix}.json"), results)
    by_name = {r["name"]: r for r in results}
    text = ""
    for t in tables:
        rows = [by_name[n] for n in SHARED.get(t, []) if n in by_name]
        rows += [r for r in results if r["table"] == t]
        text += f"### {t}. {TITLES[t]}\n\n{table(rows)}\n"
    atomic_write(os.path.join(out, f"results{suffix}.md"), lambda f: f.write(text.encode()))
    plot(results, os.path.join(out, f"plot{suffix}.png"))


if __name__ == "__main__":
    main()
