"""Train MicroDiT with the paper's four-phase recipe.

    python train.py --demo                                   # CPU, built-in shapes data, ~13 min
    torchrun --nproc_per_node=8 train.py --phase 1 --preset MicroDiT_XL_2 --data DIR --out runs/xl
    torchrun --nproc_per_node=8 train.py --phase 2 --out runs/xl   # phase 1's end, and its data

Read top to bottom: the recipe (PHASES), the arguments, the stages that set a run up, one
optimizer step (train_step) and the loop (train). Rerunning a command resumes from the
phase's latest checkpoint; SIGTERM or SIGUSR1 saves one at the next log point and exits 75.
One process or torchrun (DDP, or FSDP with --fsdp). Every random draw of a micro-batch
comes from one generator seeded by (seed, step, its index in the global batch), so a run
resumes exactly and gives the same weights on any number of processes.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from checkpoint import (PREEMPTED, Checkpointer, CheckpointWriteError, Log, StopSignals,
                        environment, export_weights, latest_note, load_start_weights,
                        model_config, phase_dir, record_run, restore, shard_as, sigma_data_of,
                        starting_point, take_run_lock)
from data import LatentLoader, absolute_sources, data_info, data_std
from diffusion import SIGMA_BUCKETS, edm_loss_per_sample, sigma_bucket
from model import (PRECISIONS, PRESETS, DiTConfig, MicroDiT, count_params, precision,
                   train_flops_per_image)
from parallel import (COMPILE_MODES, accumulating, clip_in_optimizer, command_line,
                      inductor_options, peak_flops, setup_distributed, shard, wrap)
from prepare import ensure_demo_data
from sample import SAMPLE_PROMPTS, grid_encoders, save_sample_grid
from text import RANDOM_WORDS

# The paper's recipe: steps, warmup and EMA start count from the start of the phase;
# micro_batch is the per-GPU batch the paper used on 8xH100.
PHASES = {
    1: dict(res=256, mask_ratio=0.75, steps=250_000, lr=2.4e-4, warmup=2_500, schedule="cosine",
            min_lr_ratio=0.33, grad_clip=0.25, p_mean=-0.6, p_std=1.2, ema_decay=0.0,
            ema_start=0, micro_batch=256, init="scratch"),
    2: dict(res=256, mask_ratio=0.0, steps=30_000, lr=8e-5, warmup=0, schedule="constant",
            min_lr_ratio=1.0, grad_clip=0.25, p_mean=-0.6, p_std=1.2, ema_decay=0.0,
            ema_start=0, micro_batch=64, init="full"),
    3: dict(res=512, mask_ratio=0.75, steps=50_000, lr=8e-5, warmup=500, schedule="constant",
            min_lr_ratio=1.0, grad_clip=0.5, p_mean=0.0, p_std=0.6, ema_decay=0.99975,
            ema_start=25_000, micro_batch=32, init="weights"),
    4: dict(res=512, mask_ratio=0.0, steps=5_000, lr=8e-5, warmup=0, schedule="constant",
            min_lr_ratio=1.0, grad_clip=0.5, p_mean=0.0, p_std=0.6, ema_decay=0.9975,
            ema_start=1_000, micro_batch=16, init="full"),
}
# the CPU demo: phase 1 shrunk to minutes on 2 cores, without masking (at 64 patches it
# saves little and slows learning) and with P_mean 0; every value can be overridden
DEMO = dict(res=16, mask_ratio=0.0, p_mean=0.0, steps=1500, lr=1e-3, warmup=100, micro_batch=64,
            schedule="cosine", min_lr_ratio=0.1, ema_decay=0.995, ema_start=500, batch_size=64,
            data="demo")
# what a run trains with besides the phase's recipe (sigma_data None: see load_data); a
# resumed run keeps its checkpoint's values of all these unless the command line sets them
RUN_DEFAULTS = dict(batch_size=2048, weight_decay=0.1, aux_loss_weight=0.01, seed=0,
                    sigma_data=None)
RECIPE_KEYS = (*[k for k in PHASES[1] if k != "init"], "base_res", *RUN_DEFAULTS, "data")
DATA_FIELDS = ("in_channels", "input_size", "caption_channels", "pos_interp_scale")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", type=int, default=1, choices=PHASES)
    p.add_argument("--preset", choices=PRESETS, help="architecture of a new model (default "
                   "MicroDiT_XL_2; --demo: MicroDiT_CPU_2); a checkpoint brings its own")
    p.add_argument("--data", help="prepared data: DIR or 'DIR_A:0.6,DIR_B:0.4' (weights), "
                   "or 'demo' (default when resuming or continuing from the previous phase: "
                   "the data it trained on)")
    p.add_argument("--out", default="runs/microdit", help="run directory (one folder per phase)")
    p.add_argument("--demo", action="store_true", help="CPU demo: MicroDiT_CPU_2 on the built-in "
                   "shapes data, 12 to 14 minutes on 2 cores")
    p.add_argument("--init", help="start from this checkpoint instead of the previous phase's end")
    p.add_argument("--resume", action="store_true", help="insist on resuming: stop if the phase "
                   "folder has no checkpoint (resuming is automatic when it has one)")
    p.add_argument("--export", metavar="FILE.safetensors", help="write the latest checkpoint's "
                   "weights (EMA when present) to FILE.safetensors and exit")
    for name, kind in [("res", int), ("base_res", int), ("mask_ratio", float), ("steps", int),
                       ("lr", float), ("warmup", int), ("min_lr_ratio", float),
                       ("grad_clip", float), ("p_mean", float), ("p_std", float),
                       ("ema_decay", float), ("ema_start", int), ("micro_batch", int)]:
        p.add_argument("--" + name.replace("_", "-"), type=kind, help="default: the phase's")
    p.add_argument("--schedule", choices=["cosine", "constant"])
    p.add_argument("--batch-size", type=int, help="global batch (default 2048; --demo: 64)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--aux-loss-weight", type=float, help="token-choice MoE only (default 0.01)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--sigma-data", type=lambda text: text if text == "data" else float(text),
                   help="EDM's data std, or 'data': the data's own, measured (default: a "
                   "checkpoint's own, else 0.9)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="max-autotune-no-cudagraphs: minutes more compiling, tunes the "
                        "matmuls and fuses their epilogues")
    p.add_argument("--inductor", default="{}", help="JSON of torch._inductor.config settings "
                   "for torch.compile, e.g. '{\"coordinate_descent_tuning\": true}'")
    p.add_argument("--dtype", choices=PRECISIONS, default="auto",
                   help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer "
                   "state over the processes (FSDP2) instead of replicating them (DDP)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each "
                   "block's activations in the backward: less memory, about a third more compute")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (default 1000; "
                   "--demo: 100)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept per phase (at least 1)")
    p.add_argument("--sample-every", type=int, help="steps between sample grids, 0: none "
                   "(default 5000; --demo: 500)")
    p.add_argument("--log-every", type=int, default=10, help="read the statistics from the "
                   "device every N steps (each read waits for the GPU); every step is logged")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many "
                   "non-finite steps in a row")
    p.add_argument("--vae", help="VAE for sample grids (default: the data's)")
    p.add_argument("--clip", help="text encoder for sample grids (default: the data's)")
    p.add_argument("--model", default="{}", help="JSON of DiTConfig overrides, e.g. "
                   "'{\"patch_mixer_depth\": 0}'")
    return p.parse_args(argv)


def resolve_config(args):
    """The phase recipe with every command-line override applied, as a plain dict."""
    run = dict(PHASES[args.phase], phase=args.phase, base_res=PHASES[1]["res"], **RUN_DEFAULTS,
               preset=args.preset or ("MicroDiT_CPU_2" if args.demo else "MicroDiT_XL_2"))
    if args.demo and args.phase != 1:
        raise ValueError(f"--demo is a phase-1 recipe: for phase {args.phase} of the demo run, "
                         f"drop --demo and give its --out and --data demo (and --steps, "
                         f"--batch-size, --micro-batch to fit a CPU)")
    if args.demo:
        run.update(DEMO)
    run.update({k: getattr(args, k) for k in RECIPE_KEYS if getattr(args, k, None) is not None})
    run.setdefault("data", None)
    if run["data"] and run["data"] != "demo":
        run["data"] = absolute_sources(run["data"])
    for key in ("out", "compile", "compile_mode", "dtype", "fsdp", "activation_checkpointing",
                "keep", "log_every", "max_bad_steps", "vae", "clip", "init", "demo"):
        run[key] = getattr(args, key)
    run["ckpt_every"] = (100 if args.demo else 1000) if args.ckpt_every is None else args.ckpt_every
    run["sample_every"] = ((500 if args.demo else 5000) if args.sample_every is None
                           else args.sample_every)
    run["model"] = model_overrides(args.model)
    run["inductor"] = inductor_options(json_flag("--inductor", args.inductor))
    check_numbers(run)
    return run


def json_flag(flag, text):
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{flag} {text!r} is not valid JSON ({e}); e.g. "
                         f"{flag} '{{\"depth\": 8}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} takes a JSON object {{\"name\": value, ...}}, got {text!r}")
    return value


def model_overrides(text):
    """--model JSON -> {DiTConfig field: value}, every name checked."""
    overrides = json_flag("--model", text)
    fields = [f.name for f in dataclasses.fields(DiTConfig)]
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"--model: {sorted(unknown)} are not DiTConfig fields; they are "
                         f"{fields}")
    from_data = sorted(set(overrides) & set(DATA_FIELDS))
    if from_data:
        raise ValueError(f"--model cannot set {from_data}: they follow from the data (latent "
                         f"channels and size, caption width) and --res")
    return overrides


def check_numbers(run):
    """Values that would crash mid-run or train nonsense, refused before anything starts."""
    def need(ok, key, rule):
        if not ok:
            raise ValueError(f"--{key.replace('_', '-')} {run[key]}: {rule}")
    for key, value in run.items():
        if isinstance(value, float):
            need(math.isfinite(value), key, "must be a finite number")
    for key in ("steps", "batch_size", "micro_batch", "res", "base_res", "ckpt_every", "keep",
                "log_every", "max_bad_steps"):
        need(run[key] >= 1, key, "must be at least 1")
    for key in ("warmup", "ema_start", "sample_every", "weight_decay", "aux_loss_weight", "lr"):
        need(run[key] >= 0, key, "must be 0 or more")
    for key in ("grad_clip", "p_std"):
        need(run[key] > 0, key, "must be positive")
    need(run["sigma_data"] in (None, "data") or run["sigma_data"] > 0, "sigma_data",
         "must be positive, or 'data'")
    need(0 <= run["mask_ratio"] < 1, "mask_ratio", "must be in [0, 1): the share of patches "
         "dropped")
    need(0 <= run["ema_decay"] < 1, "ema_decay", "must be in [0, 1) (0: no EMA)")
    need(0 <= run["min_lr_ratio"] <= 1, "min_lr_ratio", "must be in [0, 1]")


def learning_rate(run, phase_step):
    if phase_step < run["warmup"]:
        return run["lr"] * (phase_step + 1) / run["warmup"]
    if run["schedule"] == "constant":
        return run["lr"]
    progress = (phase_step - run["warmup"]) / max(1, run["steps"] - run["warmup"])
    floor = run["min_lr_ratio"]
    return run["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def batch_arithmetic(global_batch, micro_batch, world_size):
    """Gradient accumulation steps for a global batch; explains itself when they don't fit."""
    per_step = micro_batch * world_size
    if global_batch % per_step == 0:
        return global_batch // per_step
    if global_batch % world_size == 0:
        fix = f"--micro-batch {math.gcd(global_batch // world_size, micro_batch)}"
    else:  # no micro-batch fits: the batch itself must change
        below = global_batch // per_step * per_step
        fix = f"--batch-size {below} or {below + per_step}" if below else f"--batch-size {per_step}"
    raise ValueError(f"global batch {global_batch} must be a multiple of micro-batch "
                     f"{micro_batch} x {world_size} processes = {per_step}: e.g. {fix}")


# ----------------------------------------------------------------------------- the stages


def load_data(run, start, rank, world, device, master):
    """The loader of this rank's micro-batches, and what the data records (encoders, ...)."""
    if not run["data"]:
        sys.exit("no training data: give --data, a folder made by `python prepare.py` (or "
                 "'DIR_A:0.6,DIR_B:0.4' to mix several), or --data demo for the shapes set")
    if run["data"] == "demo":  # one folder per resolution: a later --res finds its own
        name = f"demo_data_{run['res']}px_{RANDOM_WORDS}"
        folder = os.path.abspath(os.path.join(run["out"], name))
        run["data"] = ensure_demo_data(folder, master, res=run["res"])
        if world > 1:
            dist.barrier()
    # pinned batches on CUDA: a copy from pageable memory may wait for the stream to finish
    # the work queued before it, a sync every step
    loader = LatentLoader(run["data"], run["res"], run["micro_batch"], rank=rank,
                          world_size=world, seed=run["seed"], pin_memory=device.type == "cuda")
    if run["base_res"] is None:  # the starting weights' own position grid, in pixels here
        own = DiTConfig.from_dict(start["model_config"])
        grid = own.input_size / own.pos_interp_scale                   # latents per side
        run["base_res"] = round(grid * run["res"] / loader.latent_shape[1])
    if run["sigma_data"] in (None, "data"):  # None: the start's own, else 0.9 (README)
        run["sigma_data"] = (data_std(run["data"], run["res"]) if run["sigma_data"] == "data"
                             else sigma_data_of(start or {}))
    return loader, data_info(run["data"])


def build(run, model_cfg, start, resume, loader, device, rank, world):
    """(net, optimizer, step, phase_start, ema): the network with its starting weights
    (sharded under --fsdp), AdamW, and on a resume everything else the checkpoint holds."""
    torch.manual_seed(run["seed"])  # the same initial weights on every rank (FSDP keeps its own)
    net = MicroDiT(model_cfg).to(device)
    torch.manual_seed(run["seed"] + rank)
    net.activation_checkpointing = run["activation_checkpointing"]
    if start is not None:
        load_start_weights(net, start["model"])
    if run["fsdp"] and world > 1:
        shard(net, world, device)
    # fused: one kernel for all parameters, on CUDA and CPU (BENCHMARKS.md)
    optimizer = torch.optim.AdamW(net.parameters(), lr=run["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=run["weight_decay"], fused=True)
    # phases 2 and 4 carry the optimizer and step on, phase 3 only the weights
    carry_optimizer = PHASES[run["phase"]]["init"] == "full"
    step, phase_start, ema_state = restore(start, resume, carry_optimizer, net, optimizer,
                                           loader, rank, run["weight_decay"])
    ema = None
    if ema_state:
        ema = EMA(net)
        ema.state = {k: shard_as(ema_state[k], v) for k, v in ema.state.items()}
    return net, optimizer, step, phase_start, ema


class EMA:
    """Exponential moving average of the weights, in float32, updated after each step."""

    def __init__(self, net):
        self.state = {k: v.detach().clone().float() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def update(self, net, decay):
        # multi-tensor kernels, as torch.optim.swa_utils does, not a launch per tensor; one
        # call for FSDP's sharded tensors and one for the rest (its buffers stay whole)
        groups = {False: [], True: []}
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                groups[isinstance(v, DTensor)].append((self.state[k], v.float()))
        for pairs in groups.values():
            if pairs:
                torch._foreach_lerp_([ema for ema, _ in pairs], [now for _, now in pairs],
                                     1 - decay)
        return self


# ----------------------------------------------------------------------------- one step

def micro_generator(seed, step, index, device):
    """The generator of micro-batch `index` (of the global batch) at `step`."""
    return torch.Generator(device).manual_seed(((seed * 1_000_003 + step) * 1_000_003 + index)
                                               % 2 ** 63)


def train_step(model, net, optimizer, batches, run, step, accum=1, rank=0, world=1,
               autocast=nullcontext()):
    """One optimizer step over `accum` micro-batches from `batches` (this rank's), the
    gradients clipped to run["grad_clip"]. Returns the step's statistics, on the device
    (reading them waits for it), averaged over all ranks: loss, aux_loss (token-choice MoE),
    grad_norm (before clipping; non-finite: the update was skipped), bucket_sums and
    bucket_counts (the per-sample loss summed and counted by noise level, SIGMA_BUCKETS:
    the loss per noise level shows what is learnt)."""
    device = next(net.parameters()).device
    totals = torch.zeros(2, device=device)  # loss, aux loss: summed over the micro-batches
    buckets = torch.zeros(2, len(SIGMA_BUCKETS) + 1, device=device)  # sums, counts
    for micro in range(accum):
        batch = next(batches)
        x = batch["latents"].to(device, non_blocking=True)
        y = batch["captions"].to(device, non_blocking=True)
        # rank r reads micro-batches r, r + W, ... of the global batch (data.py): the noise
        # of each follows its index there, so any world size draws the same
        generator = micro_generator(run["seed"], step, micro * world + rank, device)
        with accumulating(model, net, sync=micro == accum - 1 or world == 1), autocast:
            per_sample, sigma = edm_loss_per_sample(model, x, y, run["mask_ratio"],
                                                    run["p_mean"], run["p_std"],
                                                    generator=generator,
                                                    sigma_data=run["sigma_data"])
            loss = per_sample.mean()
            if net.cfg.moe_routing == "token_choice":
                aux = net.aux_loss()
                loss = loss + run["aux_loss_weight"] * aux
                totals[1] += aux.detach()
        (loss / accum).backward()
        totals[0] += per_sample.detach().mean()
        bucket = sigma_bucket(sigma.detach().float())                   # (N,)
        buckets[0].index_add_(0, bucket, per_sample.detach().float())
        buckets[1].index_add_(0, bucket, torch.ones_like(sigma, dtype=torch.float))
    grad_norm = clip_in_optimizer(optimizer, run["grad_clip"])
    stats = torch.cat([totals / accum, buckets.flatten()])
    if world > 1:
        dist.all_reduce(stats)
        stats[:2] /= world
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    bucket_sums, bucket_counts = stats[2:].view(2, -1)                  # (2, buckets)
    return dict(loss=stats[0], aux_loss=stats[1], grad_norm=grad_norm,
                bucket_sums=bucket_sums, bucket_counts=bucket_counts)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    """Train one phase, or export weights (--export). The phase's lock (take_run_lock), the
    signal handlers and a checkpoint write in flight are all let go when this returns."""
    args = parse_args(argv)
    run = resolve_config(args)
    if args.export:
        return export_weights(run["out"], run["phase"], args.export)
    with ExitStack() as exit_stack:
        train(setup(args, run, exit_stack), exit_stack)


def setup(args, run, exit_stack):
    """Everything the loop needs, as a namespace: the stages above, in order."""
    rank, world, local_rank, device = setup_distributed()
    master = rank == 0
    take_run_lock(exit_stack, run["out"], run["phase"], master, world)
    given = {k for k in RECIPE_KEYS if getattr(args, k, None) is not None}
    run, start, resume = starting_point(run, given, args.resume, master, PHASES, RECIPE_KEYS)
    loader, info = load_data(run, start, rank, world, device, master)
    model_cfg = model_config(run, start, loader, args.preset is not None)
    accum = batch_arithmetic(run["batch_size"], run["micro_batch"], world)
    encoders = None
    if master and run["sample_every"]:
        encoders = grid_encoders(run["vae"] or info.get("vae"), run["clip"] or info.get("clip"),
                                 model_cfg, run["data"])
    net, optimizer, step, phase_start, ema = build(run, model_cfg, start, resume, loader, device,
                                                   rank, world)
    model = wrap(net, device, local_rank, world, run["compile"], run["compile_mode"],
                 run["inductor"])
    folder = phase_dir(run["out"], run["phase"])
    flops_per_image = train_flops_per_image(model_cfg, model_cfg.input_size, run["mask_ratio"])
    if master:
        record_run(folder, step, {"run": run, "model": dataclasses.asdict(model_cfg),
                                  "world_size": world, "accumulation": accum,
                                  **environment(device)})
        sharding = (" (FSDP)" if isinstance(net, FSDPModule)
                    else " (no FSDP: one process has nothing to shard)" if run["fsdp"] else "")
        print(f"{json.dumps(run, indent=2)}\n{model_cfg}\n{count_params(net):,} parameters; "
              f"global batch {run['batch_size']} = micro-batch {run['micro_batch']} x {world} "
              f"processes{sharding} x {accum} accumulation steps; {flops_per_image / 1e9:.1f} "
              f"GFLOPs per training image; starting at step {step}")
    return SimpleNamespace(
        run=run, model_cfg=model_cfg, net=net, model=model, optimizer=optimizer, ema=ema,
        step=step, phase_start=phase_start, loader=loader, accum=accum, info=info,
        rank=rank, world=world, device=device, master=master, folder=folder,
        autocast=precision(device, run["dtype"])[0], encoders=encoders,
        prompts=info.get("sample_prompts") or SAMPLE_PROMPTS,  # the data's own captions
        log=Log(os.path.join(folder, "log.jsonl"), step, run, model_cfg, flops_per_image,
                peak_flops(device), world, master),
        saver=Checkpointer(folder, run["keep"], device, master, world))


def train(s, exit_stack):
    """The loop, until the phase's last step, a stop signal or too many non-finite steps."""
    run, net, optimizer, log, saver, step, ema = (s.run, s.net, s.optimizer, s.log, s.saver,
                                                  s.step, s.ema)
    exit_stack.callback(saver.writer.wait)  # a write in flight ends before the lock is let go
    signals = StopSignals(exit_stack)
    bar = tqdm(total=run["steps"], initial=step - s.phase_start, disable=not s.master,
               unit="step", dynamic_ncols=True)
    end = s.phase_start + run["steps"]
    while step < end:
        lr = learning_rate(run, step - s.phase_start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = train_step(s.model, net, optimizer, s.loader, run, step, s.accum, s.rank,
                           s.world, s.autocast)
        step += 1
        if run["ema_decay"] > 0 and step - s.phase_start >= run["ema_start"]:
            ema = ema.update(net, run["ema_decay"]) if ema else EMA(net)  # from ema_start on

        # --- log: one wait for the device per --log-every steps, and one line per step
        log.add(step, lr, stats)
        save_now = step % run["ckpt_every"] == 0 or step == end
        sample_now = run["sample_every"] > 0 and (step % run["sample_every"] == 0 or step == end)
        if len(log.pending) < run["log_every"] and not (save_now or sample_now):
            continue
        stop_by = signals.agreed(s.device, s.world) if step < end else None  # on all ranks
        if stop_by is not None:  # save now; no grid: a scheduler gives little time
            save_now, sample_now = True, False
        elif step == end and signals.received:  # too late to stop: the phase ends here
            sample_now = False
        bar.update(log.read())
        bar.set_postfix_str(log.summary(), refresh=False)
        if log.too_many_at is not None:
            finish(s, bar, f"stopping: {run['max_bad_steps']} steps in a row with non-finite "
                           f"gradients at step {log.too_many_at}")

        # --- checkpoint and samples
        if save_now:
            weights = saver.save(net, ema, optimizer, {
                "step": step, "phase_step": step - s.phase_start, "phase_start": s.phase_start,
                "model_config": dataclasses.asdict(s.model_cfg), "config": run,
                "loader": s.loader.state_dict(), "vae": s.info.get("vae"),
                "clip": s.info.get("clip"), "sigma_data": run["sigma_data"]})
        elif sample_now:
            weights = saver.weights(net, ema)
        if s.master and sample_now:
            saver.landed()  # the grid may read the snapshot's buffers
            path = os.path.join(s.folder, f"samples_{step:09d}.png")
            save_sample_grid(weights[1] or weights[0], s.model_cfg, s.encoders, s.prompts, path,
                             s.device, run["dtype"], run["sigma_data"])
            tqdm.write(f"step {step}: samples in {path}")
        if stop_by is not None:
            finish(s, bar, f"stopped by {stop_by} at step {step}, phase {run['phase']} not "
                           f"finished: the checkpoint of this step is in {s.folder}; to go on, "
                           f"run the same command with --resume", PREEMPTED)
        log.since = time.perf_counter()  # checkpoints and grids are not training time
    if log.bad_in_a_row:  # a run whose last steps were skipped has not succeeded
        finish(s, bar, f"phase {run['phase']} ended with {log.bad_in_a_row} step(s) in a row "
                       f"with non-finite gradients")
    finish(s, bar, f"done: phase {run['phase']} finished at step {step}; checkpoints in "
                   f"{s.folder}", status=0)


def finish(s, bar, message, status=1):
    """The end of the loop, whichever it is: the checkpoint in flight is on disk (or its
    error raised) and every rank has got here before the process exits with `status`. A
    failure (status 1) names the checkpoint to resume from."""
    try:
        s.saver.writer.close()
    finally:
        bar.close()
        if s.world > 1:
            # no rank exits before rank 0's write ends: torchrun takes a rank's non-zero exit
            # for a failure and kills the other ranks 30 s later
            dist.barrier()
            dist.destroy_process_group()
    if s.master:
        s.log.file.close()
    if status == 1:  # sys.exit(str): the message goes to stderr and torchrun's error file
        sys.exit(f"{message}; {latest_note(s.folder)}, with a lower --lr or --grad-clip")
    if s.master:
        print(message, file=sys.stderr if status else sys.stdout)
    if status:
        sys.exit(status)


cli = command_line(main, CheckpointWriteError)  # main(), bad input said in a message

if __name__ == "__main__":
    cli()
