"""The paper's ablations at a scale a 2-core CPU finishes in well under an hour.

    python experiments.py                        # all four tables, runs/experiments/
    python experiments.py --tables 1 3 --steps 600
    python experiments.py --tables 4 --steps 20 --eval-images 16 --eval-steps 5   # a smoke run

Every run trains MicroDiT_CPU_2 with train.py on the built-in shapes data (16x16 pixels,
64 patches) from the same seed, data order and recipe; only the switch under test changes.
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
import json
import os
import statistics

import numpy as np
import torch
from PIL import Image, ImageDraw

import train
from data import LatentDataset
from diffusion import SIGMA_DATA, edm_loss_per_sample
from eval import evaluate_shapes, file_identity
from model import PRESETS, DiTConfig, train_flops_per_image
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
SHARED = {2: ["deferred 75% (mixer)"], 3: ["deferred 75% (mixer)"], 4: ["deferred 75% (mixer)"]}
TITLES = {1: "Masking: none, naive, deferred (same steps; and same compute)",
          2: "Patch-mixer size at 75% masking",
          3: "Mask ratio with the patch-mixer",
          4: "Routing and layer-wise scaling (75% masking, mixer)"}


def run_folder(out, name, steps, batch, seed):
    """One folder per run and budget: a rerun with another --seed, --steps or --batch-size
    trains anew instead of resuming (or reusing) a run made with the old ones."""
    return os.path.join(out, f"{slug(name)}_steps{steps}_batch{batch}_seed{seed}")


def train_run(out, name, mask_ratio, overrides, steps, batch, data, seed):
    folder = run_folder(out, name, steps, batch, seed)
    argv = ["--demo", "--data", data, "--out", folder, "--steps", str(steps), "--seed", str(seed),
            "--batch-size", str(batch), "--micro-batch", str(batch),
            "--mask-ratio", str(mask_ratio), "--model", json.dumps(overrides),
            "--ema-decay", "0", "--warmup", str(max(1, steps // 15)),
            "--ckpt-every", str(steps), "--sample-every", str(steps), "--keep", "1"]
    train.cli(argv)  # resumes, or does nothing, when the folder holds this run already
    log = [json.loads(line) for line in open(os.path.join(folder, "phase1", "log.jsonl"))]
    ms = statistics.median(r["ms_per_step"] for r in log[5:] or log)
    return folder, {"ms_per_step": ms, "train_seconds": sum(r["ms_per_step"] for r in log) / 1000}


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
    on the held-out set's `rows`, weighted as the model was trained (its sigma_data)."""
    shard = os.path.join(held_out, "shard-00000")
    images = torch.from_numpy(np.load(f"{shard}.images_{RES}.npy"))[rows].float()      # (N, 3, H, W)
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


def evaluation_code():
    """A digest of the code that loads, samples and judges a checkpoint: EVAL_CODE's files
    and held_out_loss. Editing the tables or the runs here leaves it as it is."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256(inspect.getsource(held_out_loss).encode())
    for name in EVAL_CODE:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def evaluate(folder, held_out, rows, images, steps):
    """The run's figures, from its folder's result.json when they were made from the very
    same checkpoint file (path, size, modification time: a run trained again is judged
    again) by the same evaluation code with the same settings."""
    ckpt = checkpoints(phase_dir(folder, 1))[-1]
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


def model_config(overrides):
    return DiTConfig.from_dict({**dataclasses.asdict(PRESETS[PRESET]), "in_channels": 3,
                                "input_size": RES, **overrides})


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
    p.add_argument("--seed", type=int, default=0, help="initial weights, data order and noise "
                                                       "(the data and held-out set stay fixed)")
    p.add_argument("--eval-images", type=int, default=EVAL_IMAGES,
                   help="generated images per run for shapes FD and prompt following")
    p.add_argument("--eval-steps", type=int, default=20, help="Heun steps per generated image")
    args = p.parse_args(argv)
    if args.eval_images < 2 or args.eval_steps < 1:
        p.error("--eval-images must be at least 2 (a Frechet distance needs 2) and "
                "--eval-steps at least 1")
    data = ensure_demo_data(os.path.join(args.out, "data"), res=RES)
    held_out = ensure_demo_data(os.path.join(args.out, f"held_out_{HELD_OUT_DRAWS}"), res=RES,
                                n=HELD_OUT_DRAWS, seed=1)
    rows = unseen_rows(held_out, data, HELD_OUT)

    results, judged = [], (args.eval_images, args.eval_steps)
    wanted = {name for t, name, _, _ in RUNS if t in args.tables}
    wanted |= {name for t in args.tables for name in SHARED.get(t, [])}
    for t, name, mask, overrides in RUNS:
        if name not in wanted:
            continue
        folder, timing = train_run(args.out, name, mask, overrides, args.steps, args.batch_size,
                                   data, args.seed)
        results.append({"table": t, "name": name, "steps": args.steps, "batch": args.batch_size,
                        "mask": mask, "overrides": overrides,
                        "gflops": train_flops_per_image(model_config(overrides), RES, mask) / 1e9,
                        **timing, **evaluate(folder, held_out, rows, *judged)})
        print(json.dumps(results[-1]))
        report(args.out, args.tables, results)
    if 1 in args.tables:  # the masked runs again, with the unmasked run's training FLOPs
        base = next(r for r in results if r["name"] == "no masking")
        for r in [r for r in results if r["table"] == 1 and r["mask"] > 0]:
            steps = round(args.steps * base["gflops"] / r["gflops"])
            name = f"{r['name']}, same compute"
            folder, timing = train_run(args.out, name, r["mask"], r["overrides"], steps,
                                       args.batch_size, data, args.seed)
            results.append({**r, "name": name, "steps": steps, **timing,
                            **evaluate(folder, held_out, rows, *judged)})
            print(json.dumps(results[-1]))
            report(args.out, args.tables, results)
    print(f"tables in {args.out}/results.md, plot in {args.out}/plot.png")


def report(out, tables, results):
    """results.json, results.md and plot.png of the runs so far."""
    write_json(os.path.join(out, "results.json"), results)
    by_name = {r["name"]: r for r in results}
    text = ""
    for t in tables:
        rows = [by_name[n] for n in SHARED.get(t, []) if n in by_name]
        rows += [r for r in results if r["table"] == t]
        text += f"### {t}. {TITLES[t]}\n\n{table(rows)}\n"
    atomic_write(os.path.join(out, "results.md"), lambda f: f.write(text.encode()))
    plot(results, os.path.join(out, "plot.png"))


if __name__ == "__main__":
    main()
