"""Train MicroDiT with the paper's four-phase recipe.

    python train.py --demo                                   # CPU, built-in shapes data, ~13 min
    torchrun --nproc_per_node=8 train.py --phase 1 --preset MicroDiT_XL_2 --data DIR --out runs/xl
    torchrun --nproc_per_node=8 train.py --phase 2 --out runs/xl   # phase 1's end, and its data

Rerunning a command resumes from the phase's latest checkpoint, with the recipe the
checkpoint was trained with except what the command line sets again. SIGTERM or SIGUSR1 (a
scheduler about to kill the job) saves a checkpoint at the next log point and exits with
status 75: rerun with --resume.

One loop, top to bottom: schedule, micro-steps, step (and EMA), log, checkpoint/samples.
The log is read every --log-every steps, and always before a checkpoint or a grid. The same
file runs as one process or under torchrun (DDP; NCCL on GPU, gloo on CPU).

Every random draw of a micro-batch (noise levels, noise, kept patches) comes from a
generator seeded by (seed, step, micro-batch index in the global batch), so a run resumes
exactly and gives the same weights on any number of processes for the same global batch.
"""
import argparse
import dataclasses
import glob
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, nullcontext

import numpy
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (LatentLoader, absolute_sources, atomic_write, data_info, ensure_demo_data,
                  write_json)
from diffusion import edm_loss_per_sample
from mixer import random_ids_keep
from model import PRESETS, DiTConfig, MicroDiT, count_params, train_flops_per_image
from sample import (PRECISIONS, build_dit, generate, grid_image, infer_config, load_checkpoint,
                    load_encoders, precision, read_checkpoint, to_pil, weights_of)

# SPEC section 5. Steps, warmup and EMA start count from the start of the phase;
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
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16
COMPILE_MODES = ["default", "max-autotune-no-cudagraphs"]  # CUDA graphs: not with DDP/FSDP
SIGMA_BUCKETS = [0.1, 0.5, 1.0, 2.0, 5.0]  # edges: loss per noise level shows what is learnt
SAMPLE_PROMPTS = ["a photo of a cat", "a red sports car on a mountain road",
                  "a bowl of fruit on a wooden table", "an astronaut riding a horse"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", type=int, default=1, choices=PHASES)
    p.add_argument("--preset", choices=PRESETS, help="architecture of a new model (default "
                   "MicroDiT_XL_2; --demo: MicroDiT_CPU_2); a checkpoint brings its own")
    p.add_argument("--data", help="prepared data: DIR or 'DIR_A:0.6,DIR_B:0.4' (weights), "
                                  "or 'demo' (default when resuming or continuing from the "
                                  "previous phase: the data it trained on)")
    p.add_argument("--out", default="runs/microdit", help="run directory (one folder per phase)")
    p.add_argument("--demo", action="store_true", help="CPU demo: MicroDiT_CPU_2 on the built-in "
                                                       "shapes data, 12 to 14 minutes on 2 "
                                                       "cores")
    p.add_argument("--init", help="start from this checkpoint instead of the previous phase's end")
    p.add_argument("--resume", action="store_true", help="insist on resuming: stop if the phase "
                                                         "folder has no checkpoint (resuming is "
                                                         "automatic when it has one)")
    p.add_argument("--export", metavar="FILE.safetensors", help="write the latest checkpoint's "
                   "weights (EMA when present) to FILE.safetensors and exit")
    # recipe overrides (default: the phase's value)
    for name, kind in [("res", int), ("base_res", int), ("mask_ratio", float), ("steps", int),
                       ("lr", float),
                       ("warmup", int), ("min_lr_ratio", float), ("grad_clip", float),
                       ("p_mean", float), ("p_std", float), ("ema_decay", float),
                       ("ema_start", int), ("micro_batch", int)]:
        p.add_argument("--" + name.replace("_", "-"), type=kind)
    p.add_argument("--schedule", choices=["cosine", "constant"])
    p.add_argument("--batch-size", type=int, help="global batch (default 2048; --demo: 64)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--aux-loss-weight", type=float, help="token-choice MoE only (default 0.01)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="max-autotune-no-cudagraphs: minutes more compiling, tunes the "
                        "matmuls and fuses their epilogues")
    p.add_argument("--inductor", default="{}",
                   help='JSON of torch._inductor.config settings for torch.compile, e.g. '
                        '\'{"coordinate_descent_tuning": true}\'')
    p.add_argument("--dtype", choices=PRECISIONS, default="auto",
                   help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer "
                                                       "state over the processes (FSDP2) "
                                                       "instead of replicating them (DDP)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward: less memory, "
                        "about a third more compute")
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept per phase (at least 1)")
    p.add_argument("--sample-every", type=int, default=5000,
                   help="steps between sample grids (0: none)")
    p.add_argument("--log-every", type=int, default=10, help="read the statistics from the "
                   "device every N steps (each read waits for the GPU); every step is logged")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many "
                                                                "non-finite steps in a row")
    p.add_argument("--vae", help="VAE for sample grids (default: the data's)")
    p.add_argument("--clip", help="text encoder for sample grids (default: the data's)")
    p.add_argument("--model", default="{}", help="JSON of DiTConfig overrides, e.g. "
                                                 "'{\"patch_mixer_depth\": 0}'")
    return p.parse_args(argv)


# What a run trains with, besides the phase's recipe: a resumed run keeps the values its
# checkpoint holds for these unless the command line sets them again
RUN_DEFAULTS = dict(batch_size=2048, weight_decay=0.1, aux_loss_weight=0.01, seed=0)
RECIPE_KEYS = (*[k for k in PHASES[1] if k != "init"], "base_res", *RUN_DEFAULTS, "data")
DATA_FIELDS = ("in_channels", "input_size", "caption_channels", "pos_interp_scale")


def given_flags(args):
    """The recipe keys the command line sets."""
    return {k for k in RECIPE_KEYS if getattr(args, k, None) is not None}


def json_flag(flag, text):
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{flag} {text!r} is not valid JSON ({e}); e.g. "
                         f"{flag} '{{\"depth\": 8}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} takes a JSON object {{\"name\": value, ...}}, got {text!r}")
    return value


def resolve_config(args):
    """The phase recipe with every command-line override applied, as a plain dict."""
    cfg = dict(PHASES[args.phase], phase=args.phase, base_res=PHASES[1]["res"], **RUN_DEFAULTS)
    cfg["preset"] = args.preset or "MicroDiT_XL_2"
    if args.demo and args.phase != 1:
        raise ValueError(f"--demo is a phase-1 recipe (the CPU demo); mixing it with phase "
                         f"{args.phase}'s values would train neither. For phase {args.phase} "
                         f"of the demo run, drop --demo and give its --out and --data demo "
                         f"(and --steps, --batch-size, --micro-batch to fit a CPU)")
    if args.demo:  # a recipe a 2-core CPU finishes in minutes; still overridable below
        # no masking: at 64 patches it saves little and slows learning; P_mean 0 trains more
        # at the noise levels where the layout (which shape, where) is decided
        cfg.update(res=16, mask_ratio=0.0, p_mean=0.0, steps=1500, lr=1e-3,
                   warmup=100, micro_batch=64, schedule="cosine", min_lr_ratio=0.1,
                   ema_decay=0.995, ema_start=500, batch_size=64, data="demo",
                   preset=args.preset or "MicroDiT_CPU_2")
        args.sample_every = min(args.sample_every, 500)
        args.ckpt_every = min(args.ckpt_every, 500)
    for key in RECIPE_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg.setdefault("data", None)
    if cfg["data"] and cfg["data"] != "demo":
        cfg["data"] = absolute_sources(cfg["data"])
    for key in ("out", "compile", "compile_mode", "dtype", "fsdp", "activation_checkpointing",
                "ckpt_every", "keep", "sample_every", "log_every", "max_bad_steps", "vae",
                "clip", "init", "demo"):
        cfg[key] = getattr(args, key)
    cfg["model"] = model_overrides(args.model)
    cfg["inductor"] = inductor_options(args.inductor)
    check_numbers(cfg)
    return cfg


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


def check_numbers(cfg):
    """Values that would crash mid-run or train nonsense, refused before anything starts."""
    def need(ok, key, rule):
        if not ok:
            raise ValueError(f"--{key.replace('_', '-')} {cfg[key]}: {rule}")
    for key in ("steps", "batch_size", "micro_batch", "res", "base_res", "ckpt_every", "keep",
                "log_every", "max_bad_steps"):
        need(cfg[key] >= 1, key, "must be at least 1")
    for key in ("warmup", "ema_start", "sample_every", "weight_decay", "aux_loss_weight", "lr"):
        need(cfg[key] >= 0, key, "must be 0 or more")
    for key in ("grad_clip", "p_std"):
        need(cfg[key] > 0, key, "must be positive")
    need(0 <= cfg["mask_ratio"] < 1, "mask_ratio", "must be in [0, 1): the share of patches "
         "dropped, and at least one must stay")
    need(0 <= cfg["ema_decay"] < 1, "ema_decay", "must be in [0, 1) (0: no EMA)")
    need(0 <= cfg["min_lr_ratio"] <= 1, "min_lr_ratio", "must be in [0, 1]")


def recorded_config(start):
    """The run config a starting checkpoint recorded ({} for bare weights), with its --data
    absolute: runs before 2026-11-26 recorded it as given."""
    saved = dict((start or {}).get("config") or {})
    if saved.get("data") not in (None, "demo"):
        saved["data"] = absolute_sources(saved["data"])
    return saved


def resumed_config(cfg, given, saved, note):
    """A resumed run trains on with its checkpoint's recipe, except for what the command line
    sets again: a command without the original --steps or --lr does not change the
    schedule. Changes asked for are listed."""
    cfg = dict(cfg)
    changed = []
    for key in RECIPE_KEYS:
        if key not in saved:
            continue
        if key not in given:
            cfg[key] = saved[key]
        elif cfg[key] != saved[key]:
            changed.append(f"{key} {saved[key]!r} -> {cfg[key]!r}")
    if changed and note:
        print(f"resuming with a changed recipe: {', '.join(changed)}")
    return cfg


def inductor_setting(name):
    """(object, attribute) of a torch._inductor.config setting; dotted names reach its
    sub-configs, e.g. "triton.unique_kernel_names"."""
    import torch._inductor.config as owner
    *path, attr = name.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    if owner is None or not hasattr(owner, attr):
        raise ValueError(f"--inductor: {name!r} is not a torch._inductor.config setting "
                         f"(they are listed in torch/_inductor/config.py)")
    return owner, attr


def inductor_options(text):
    """--inductor JSON -> {setting: value}, every name checked."""
    options = json_flag("--inductor", text)
    for name in options:
        inductor_setting(name)
    return options


def set_inductor_options(options):
    """Apply the settings to every torch.compile from here on."""
    for name, value in options.items():
        setattr(*inductor_setting(name), value)


def learning_rate(cfg, phase_step):
    if phase_step < cfg["warmup"]:
        return cfg["lr"] * (phase_step + 1) / cfg["warmup"]
    if cfg["schedule"] == "constant":
        return cfg["lr"]
    progress = (phase_step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    floor = cfg["min_lr_ratio"]
    return cfg["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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


def micro_generator(seed, step, index, device):
    """The generator for micro-batch `index` (of the global batch) at `step`."""
    return torch.Generator(device).manual_seed(((seed * 1_000_003 + step) * 1_000_003 + index)
                                               % 2 ** 63)


# ----------------------------------------------------------------------------- checkpoints

CODE_FILES = ("model.py", "mixer.py", "moe.py", "diffusion.py", "data.py", "train.py")


def environment(device):
    """Versions, device and code revision: what a run's numbers depend on besides its config."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
            return None
    commit = git("rev-parse", "HEAD")
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "cuda": torch.version.cuda,
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"),
            "git_commit": commit,
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None}


def record_run(folder, step, record):
    """phaseN/config.json, and a copy of the code that trains as it is at this start, in
    phaseN/code/start_STEP/: the run can be read and repeated whatever the files become."""
    code = os.path.join(folder, "code", f"start_{step:09d}")
    os.makedirs(code, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in CODE_FILES:
        shutil.copy2(os.path.join(here, name), code)
    for path in (os.path.join(folder, "config.json"), os.path.join(code, "config.json")):
        write_json(path, record)


def phase_dir(out, phase):
    return os.path.join(out, f"phase{phase}")


def checkpoints(folder):
    """Complete checkpoints in a folder, oldest first (temporary files are never listed)."""
    return sorted(glob.glob(os.path.join(folder, "ckpt_*.pt")))


def save_checkpoint(folder, state, keep):
    """Atomic (temporary file, fsync, rename, fsync of the folder): a crash or power cut at any
    moment leaves the previous checkpoints and never a truncated one."""
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, "ckpt_*.pt.tmp-*")):  # a killed save's
        os.remove(stale)
    path = os.path.join(folder, f"ckpt_{state['step']:09d}.pt")
    atomic_write(path, lambda f: torch.save(state, f))
    for old in checkpoints(folder)[:-keep]:
        os.remove(old)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a folder that cannot be made)."""


class CheckpointWriter:
    """Writes checkpoints from a background thread when training on GPUs: the step waits for
    the state to be copied into CPU buffers (HostSnapshot), not for the disk (a MicroDiT_XL_2
    checkpoint is 14 to 18.6 GB). One write at a time; a failed write is raised at the next
    save or at close(). On a CPU the thread would compete with the training for the same
    cores (BENCHMARKS.md: no gain on 2 cores), so there it writes before returning and the
    state needs no copy."""

    def __init__(self, background=True):
        self.background = background
        self.thread, self.error = None, None

    def save(self, folder, state, keep, ready=None):
        """state: in the background, a snapshot the training will not change; ready: called
        by the writer before it reads the state (HostSnapshot.wait: the copies into it may
        still be queued on the GPU)."""
        self.close()
        if not self.background:
            self.write(folder, state, keep, ready)
            return self.close()
        self.thread = threading.Thread(target=self.write, args=(folder, state, keep, ready))
        self.thread.start()

    def write(self, folder, state, keep, ready=None):
        try:
            if ready is not None:
                ready()
            save_checkpoint(folder, state, keep)
        except Exception as e:  # handed to the training thread
            self.error = CheckpointWriteError(
                f"writing the checkpoint of step {state['step']} to {folder} failed "
                f"({type(e).__name__}: {e}); the earlier checkpoints there are intact")

    def wait(self):
        """Wait for the write in flight (on the way out of a failed run: its error, if any,
        is not raised over the one that ended the run)."""
        if self.thread is not None:
            self.thread.join()

    def close(self):
        """Wait for the write in flight, and raise its error if it failed."""
        self.wait()
        self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def open_log(path, step):
    """The JSONL log for appending from `step` on: lines of steps after it (written before a
    crash, and about to be run again) are dropped first, so each step has one line. A line
    cut short by a kill or a full disk is dropped too."""
    if os.path.exists(path):
        kept, torn = [], 0
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    torn += line.strip() != ""
        if torn:
            print(f"{path}: dropped {torn} line(s) that are not whole log records")
        atomic_write(path, lambda f: f.write("".join(kept).encode()))
    return open(path, "a")


def finite_or_null(record):
    """NaN and infinity as null: strict JSON readers (jq, JavaScript) refuse NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def init_checkpoint(path):
    """--init: a train.py checkpoint as it is (whatever its file name ends in), or bare
    weights (a released .pt, an exported .safetensors) as a start that has weights only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init {path}: no such file")
    if path.endswith(".safetensors"):
        state, config, _ = read_checkpoint(path)
    else:
        ckpt = load_checkpoint(path)  # read once: a released one is 4.7 GB
        if isinstance(ckpt, dict) and "optimizer" in ckpt:
            if not {"model", "model_config", "step"} <= set(ckpt):
                raise ValueError(f"--init {path}: holds an optimizer but is no train.py "
                                 f"checkpoint (no model, model_config or step); give its "
                                 f"bare weights (a state_dict) instead")
            return ckpt
        state, config, _ = weights_of(ckpt, f"--init {path}")
    return {"model": state, "model_config": config or dataclasses.asdict(infer_config(state))}


def previous_phase_checkpoint(cfg):
    """Phase N > 1 starts from the final checkpoint of phase N - 1 in the same run."""
    prev = cfg["phase"] - 1
    found = checkpoints(phase_dir(cfg["out"], prev))
    if not found:
        sys.exit(f"phase {cfg['phase']} starts from phase {prev}, but "
                 f"{phase_dir(cfg['out'], prev)} has no checkpoint: run --phase {prev} first, "
                 f"or give --init CKPT")
    ckpt = load_checkpoint(found[-1])
    if ckpt["phase_step"] < ckpt["config"]["steps"]:
        sys.exit(f"phase {prev} stopped at step {ckpt['phase_step']} of "
                 f"{ckpt['config']['steps']}: resume it (--phase {prev}) before starting phase "
                 f"{cfg['phase']}, or give --init")
    return ckpt


def export_weights(cfg, path):
    from safetensors.torch import save_file
    if not path.endswith(".safetensors"):
        raise ValueError(f"--export {path}: name the file FILE.safetensors (sample.py and "
                         f"--init tell the format by that ending)")
    found = checkpoints(phase_dir(cfg["out"], cfg["phase"]))
    if not found:
        sys.exit(f"nothing to export: no checkpoint in {phase_dir(cfg['out'], cfg['phase'])}")
    ckpt = load_checkpoint(found[-1])
    weights = ckpt["ema"] or ckpt["model"]
    info = {k: ckpt[k] for k in ("model_config", "vae", "clip", "step")}
    info["weights"] = "ema" if ckpt["ema"] else "model"
    # atomic: never a half-written file under that name (save_file streams to the temporary
    # file by its name; atomic_write's fsync covers it all the same)
    atomic_write(path, lambda f: save_file({k: v.contiguous() for k, v in weights.items()},
                                           f.name, metadata={"info": json.dumps(info)}))
    print(f"exported {info['weights']} weights of {found[-1]} to {path}")


# ----------------------------------------------------------------------------- helpers

def setup_distributed():
    """(rank, world_size, local_rank, device) for python train.py or torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, local, device


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def shard(raw, world, device):
    """FSDP2: each transformer block (and the patch-mixer) becomes one unit whose weights
    are gathered just before it runs and freed after; the root holds the rest."""
    mesh = init_device_mesh(device.type, (world,))
    for block in [*raw.blocks, *([raw.patch_mixer] if raw.cfg.patch_mixer_depth else [])]:
        fully_shard(block, mesh=mesh)
    fully_shard(raw, mesh=mesh)


class HostSnapshot:
    """CPU buffers that the state is copied into for a background checkpoint write, made at
    the first save and reused by every later one (while a write reads them, the next save
    waits for it first: CheckpointWriter.close). Copying MicroDiT_XL_2's 14 GB state into
    new memory at each save stalled the training about 12.6 s on an H100 (BENCHMARKS.md;
    fresh pages fault in one at a time, and a copy to pageable memory is slow). On CUDA the
    buffers are pinned and the copies queued on the training stream without the host
    waiting (XL on an H100: 0.1 s for the host, 0.26 s of copies for the GPU), the
    steps after the save change the tensors in place only after the copies (same stream),
    and the writer calls wait() before it reads. The first save also pins the buffers.
    PyTorch's pinned allocator rounds each buffer up to a power of two: 35% more host memory
    than the state (19 GB for XL's phase 1, kept for the run)."""

    def __init__(self, pin):
        self.pin, self.buffers, self.copied = pin, {}, None

    def copy(self, key, tensor):
        """A CPU copy of tensor in the buffer kept under key."""
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self.buffers[key] = self.new_buffer(tensor)
        return buffer.copy_(tensor.detach(), non_blocking=self.pin)

    def new_buffer(self, tensor):
        if self.pin:
            try:
                return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                   pin_memory=True)
            except RuntimeError as e:  # pinned memory is limited (containers, cgroups)
                self.pin = False  # every copy from here on waits until it has landed
                print(f"checkpoints: pinning CPU memory for the snapshot failed ({e}); it "
                      f"goes to ordinary memory instead, and each save waits for its copy",
                      file=sys.stderr)
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")

    def taken(self):
        """After the last copy of a save: marks on the stream where the copies end."""
        if self.pin:
            self.copied = torch.cuda.Event(blocking=True)  # the writer sleeps, not spins
            self.copied.record()

    def wait(self):
        """Until the copies queued before taken() have landed in the buffers."""
        if self.copied is not None:
            self.copied.synchronize()


def gathered(state, keep=True, into=None, name=""):
    """A state dict with its FSDP-sharded tensors made whole, on the CPU; others as they
    are, or with into (a HostSnapshot) copied into its buffers (keys: name + the state's
    key): a snapshot that the training does not change while a background thread writes
    it. A collective under FSDP: every rank must call it, and the ranks that do not keep the
    result (all but the one that saves) get None and copy nothing."""
    whole = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            v = v.full_tensor()  # freed at once where it is not kept
            if keep:
                v = into.copy(name + k, v) if into is not None else v.to("cpu")
            else:
                v = None
        elif into is not None and keep and isinstance(v, torch.Tensor):
            v = into.copy(name + k, v)
        whole[k] = v
    return whole if keep else None


def shard_as(tensor, like):
    """A whole tensor cut (and placed) the way `like` is."""
    if isinstance(like, DTensor):
        return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements)
    return tensor.to(like.device)


def optimizer_state(optimizer, keep=True, into=None):
    """optimizer.state_dict() with whole tensors: one format with and without FSDP (None on
    the ranks that do not keep it; into as for gathered)."""
    state = optimizer.state_dict()
    per_param = {i: gathered(s, keep, into, f"optimizer.{i}.")
                 for i, s in state["state"].items()}
    return {**state, "state": per_param} if keep else None


def load_optimizer_state(optimizer, state):
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {i: {k: shard_as(v, params[int(i)]) if v.shape == params[int(i)].shape else v
                     for k, v in s.items()} for i, s in state["state"].items()}
    optimizer.load_state_dict({**state, "state": per_param})


def clip_in_optimizer(optimizer, max_norm):
    """clip_grad_norm_ (same norm, same factor) without its own pass over the gradients: the
    fused AdamW divides each gradient by `optimizer.grad_scale` as it reads it (GradScaler's
    unscaling). Clipping cost a read and a write of every gradient (2.6 ms of the 210 ms
    MicroDiT_XL_2 step on an H200); the fused kernel then writes the divided gradient back,
    so what is saved is one read (4 of 40 bytes per parameter, the norm's read included).
    A non-finite norm (the same on every rank: gradients are all-reduced) sets `found_inf`,
    on which the fused AdamW skips the update on the device, so the host need not look at
    the norm first; the skip is counted when the statistics are read. Returns the norm
    before clipping."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    optimizer.grad_scale = ((grad_norm + 1e-6) / max_norm).clamp(min=1.0)
    optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
    return grad_norm


def accumulating(model, raw, sync):
    """Skips the gradient all-reduce (DDP) or reduce-scatter (FSDP) on all but the last
    micro-batch of a step: gradients accumulate locally and are reduced once."""
    if isinstance(raw, FSDPModule):
        raw.set_requires_gradient_sync(sync)
    if isinstance(model, DDP) and not sync:
        return model.no_sync()
    return nullcontext()


def bucket_losses(per_sample, sigma, edges):
    """Sums and counts of the per-sample loss in each noise-level bucket, [2, B+1]."""
    ids = torch.bucketize(sigma.detach().float(), edges)
    sums = torch.zeros(len(SIGMA_BUCKETS) + 1, device=sigma.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, ids, per_sample.detach().float())
    counts.index_add_(0, ids, torch.ones_like(sigma, dtype=torch.float))
    return torch.stack([sums, counts])


def bucket_names():
    edges = ["0", *map(str, SIGMA_BUCKETS), "inf"]
    return [f"sigma_{a}-{b}" for a, b in zip(edges[:-1], edges[1:])]


def grid_encoders(cfg, info, model_cfg):
    """The text encoder and VAE for sample grids, loaded once on the CPU at the start, so
    that one the run cannot have stops it before its first step, not at its first grid."""
    vae_name, clip_name = cfg["vae"] or info.get("vae"), cfg["clip"] or info.get("clip")
    if not (vae_name and clip_name):
        sys.exit(f"sample grids need the VAE and text encoder the data was made with, and "
                 f"{cfg['data']} does not record them (MDS shards never do): pass --vae and "
                 f"--clip as for sample.py, or --sample-every 0 to train without grids")
    try:
        return load_encoders(vae_name, clip_name, model_cfg.in_channels,
                             model_cfg.caption_channels)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"sample grids: {e}\n(--sample-every 0 trains without grids)")


@torch.no_grad()
def save_sample_grid(net_state, model_cfg, encoders, prompts, path, device, dtype):
    """A grid of samples for fixed prompts, for watching training progress, in the run's
    precision (--dtype)."""
    text_encoder, vae = (m if m is None else m.to(device) for m in encoders)
    net = build_dit(net_state, dataclasses.asdict(model_cfg), device=device)
    images = generate(net, text_encoder, vae, prompts, seed=0, steps=20, cfg=3.0,
                      batch_size=16, device=device, dtype=dtype)
    grid_image([to_pil(im) for im in images], min(8, len(prompts))).save(path)
    for m in encoders:  # back to the CPU: the training step wants the GPU's memory
        if m is not None:
            m.to("cpu")


PREEMPTED = 75  # exit status after a stop by signal: EX_TEMPFAIL, "try again" (with --resume)


class StopSignals:
    """SIGTERM and SIGUSR1, what schedulers send before they kill a job (preemption, a time
    limit with Slurm's --signal, a spot machine reclaimed): the run saves a checkpoint at the
    next log point (every --log-every steps) and exits with status PREEMPTED. The handlers
    only note the signal; the ranks agree on it at the log points (one all-reduce there), as
    a signal may reach some ranks only. Handlers can only be set from the main thread; the
    previous ones come back when `held` closes."""

    NAMES = ("SIGTERM", "SIGUSR1")

    def __init__(self, held):
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.NAMES:
            if hasattr(signal, name):  # Windows has no SIGUSR1
                sig = getattr(signal, name)
                held.callback(signal.signal, sig, signal.signal(sig, self.note))

    def note(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, device, world):
        """The signal any rank received, or None: a collective under torchrun."""
        if world == 1:
            return self.received
        flag = torch.tensor([self.NAMES.index(self.received) + 1 if self.received else 0],
                            device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        return self.NAMES[agreed - 1] if agreed else None


def take_run_lock(held, out, phase):
    """An exclusive lock on a phase of a run, held until `held` (an ExitStack) closes: a
    second run on the same --out (started twice by hand, or requeued by a scheduler while
    the first is still alive) would resume from the same checkpoint and overwrite the other's
    checkpoints and log. The lock file sits beside the phase folders (out/.phaseN.lock), so
    a run refused or stopped before it begins leaves no phase folder. The operating system
    drops the lock when the process ends, however it ends. Where the file system has no
    locks (Windows, some network file systems) the run goes on without one. Returns None,
    or why the phase cannot be taken."""
    os.makedirs(out, exist_ok=True)
    f = held.enter_context(open(os.path.join(out, f".phase{phase}.lock"), "w"))
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return (f"{phase_dir(out, phase)} is in use by another train.py run (it holds "
                f"{f.name}); wait for it to end or stop it, or give another --out")
    except (ImportError, OSError):
        pass
    return None


# ----------------------------------------------------------------------------- main

def main(argv=None):
    """Train one phase, or export weights (--export); the phase's lock (take_run_lock) is
    held until this returns or raises."""
    with ExitStack() as held:
        return train_phase(argv, held)


def train_phase(argv, held):
    args = parse_args(argv)
    given = given_flags(args)
    cfg = resolve_config(args)
    if args.export:
        return export_weights(cfg, args.export)

    rank, world, local_rank, device = setup_distributed()
    master = rank == 0
    # rank 0 takes the phase before reading anything, and every rank hears whether it did
    refused = [take_run_lock(held, cfg["out"], cfg["phase"]) if master else None]
    if world > 1:
        dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        sys.exit(refused[0])

    # --- where this phase starts from: its own latest checkpoint (a resume), --init, or the
    # previous phase's end
    folder = phase_dir(cfg["out"], cfg["phase"])
    existing = checkpoints(folder)
    resume = bool(existing)
    if args.resume and not resume:
        sys.exit(f"--resume: {folder} has no checkpoint to resume from (is --out right?)")
    start = None
    if resume:
        try:
            start = load_checkpoint(existing[-1])
        except ValueError as e:  # a checkpoint of this run, damaged after it was written
            raise ValueError(f"{e}. Checkpoints are written whole or not at all, so it was "
                             f"damaged after: move it away to resume from the one "
                             f"before") from None
        cfg = resumed_config(cfg, given, recorded_config(start), note=master)
        if cfg["init"] and master:
            print(f"--init {cfg['init']} left unused: phase {cfg['phase']} resumes from its "
                  f"own latest checkpoint, {existing[-1]}")
    elif cfg["init"]:
        start = init_checkpoint(cfg["init"])
    elif PHASES[cfg["phase"]]["init"] != "scratch":
        start = previous_phase_checkpoint(cfg)
    # the position grid is that of the run's first phase (1.0 at its resolution, 2.0 at
    # twice it, as released): a fresh run's own --res, else the run it continues; weights
    # without a run's config (a released .pt, an export) bring their own grid, worked out
    # once the data's latent size is known
    saved = recorded_config(start)
    if "base_res" not in given:
        cfg["base_res"] = saved.get("base_res") or (cfg["res"] if start is None else None)
    # a phase that continues a run keeps its scale: phases 1 and 2 at the run's base
    # resolution, 3 and 4 at twice it (256 and 512px in the paper; 16 and 32 for a 16px run)
    if saved.get("base_res") and not resume and "res" not in given:
        cfg["res"] = saved["base_res"] * PHASES[cfg["phase"]]["res"] // PHASES[1]["res"]
    if not cfg["data"] and saved.get("data"):
        cfg["data"] = saved["data"]
        if master:
            print(f"--data: {cfg['data']}, the data the starting checkpoint trained on")
            if cfg["res"] > saved.get("res", cfg["res"]):
                print(f"  at {cfg['res']}px now: the paper changes the data for its 512px "
                      f"phases (no DiffusionDB, CC12M images of at least 512px only: "
                      f"`data.py prepare --min-size 512` on CC12M; README, Training)")

    autocast, _ = precision(device, cfg["dtype"])
    use_compile = cfg["compile"] if cfg["compile"] is not None else device.type == "cuda"
    accum = batch_arithmetic(cfg["batch_size"], cfg["micro_batch"], world)

    # --- data
    if not cfg["data"]:
        sys.exit("no training data: give --data, a folder made by `python data.py prepare` "
                 "(or 'DIR_A:0.6,DIR_B:0.4' to mix several, MDS folders included), or "
                 "--data demo for the built-in shapes set (--demo runs the whole CPU demo)")
    if cfg["data"] == "demo":
        # one folder per resolution: a later --res finds its own, not the other's
        demo_folder = os.path.abspath(os.path.join(cfg["out"], f"demo_data_{cfg['res']}px"))
        cfg["data"] = ensure_demo_data(demo_folder, master, res=cfg["res"])
        if world > 1:
            dist.barrier()
    info = data_info(cfg["data"])
    # pinned batches on CUDA: CUDA copies pageable memory through a staging buffer and may
    # wait for the stream to finish the work queued before the copy, a sync every step
    loader = LatentLoader(cfg["data"], cfg["res"], cfg["micro_batch"], rank=rank,
                          world_size=world, seed=cfg["seed"], pin_memory=device.type == "cuda")
    C, H, _ = loader.latent_shape
    if cfg["base_res"] is None:  # the starting weights' own position grid, in pixels here
        own = DiTConfig.from_dict(start["model_config"])
        grid = own.input_size / own.pos_interp_scale                   # latents per side
        cfg["base_res"] = round(grid * cfg["res"] / H)

    # --- model and optimizer
    pos_interp = cfg["res"] / cfg["base_res"]
    from_data = dict(in_channels=C, input_size=H, caption_channels=loader.caption_shape[-1],
                     pos_interp_scale=pos_interp)
    # from_dict: JSON's lists become the config's tuples, so that a resume compares equal
    asked = DiTConfig.from_dict({**dataclasses.asdict(PRESETS[cfg["preset"]]), **from_data,
                                 **cfg["model"]})
    if start is not None:
        model_cfg = DiTConfig.from_dict({**start["model_config"], "input_size": H,
                                         "pos_interp_scale": pos_interp})
        misfit = [f"{name} {getattr(model_cfg, name)} (the data's: {from_data[name]})"
                  for name in ("in_channels", "caption_channels")
                  if getattr(model_cfg, name) != from_data[name]]
        if misfit:
            raise ValueError(f"the starting weights do not fit --data {cfg['data']}: they take "
                             f"{', '.join(misfit)}. Give data prepared with the checkpoint's "
                             f"VAE and text encoder (`data.py prepare --vae/--clip`), or "
                             f"weights trained on this data")
        if (args.preset or cfg["model"]) and asked != model_cfg:
            diff = [f"{f.name} {getattr(model_cfg, f.name)!r} (asked: {getattr(asked, f.name)!r})"
                    for f in dataclasses.fields(DiTConfig)
                    if getattr(model_cfg, f.name) != getattr(asked, f.name)]
            sys.exit(f"--preset/--model ask for another architecture than the checkpoint this "
                     f"phase starts from, which has {', '.join(diff)}. A checkpoint brings its "
                     f"own architecture: drop --preset/--model, or use a new --out")
    else:
        model_cfg = asked
    if H % model_cfg.patch_size:
        raise ValueError(f"--res {cfg['res']}: the data's {H} x {H} latents do not split into "
                         f"{model_cfg.patch_size} x {model_cfg.patch_size} patches; use a "
                         f"--res whose latent size is a multiple of {model_cfg.patch_size}")
    encoders = grid_encoders(cfg, info, model_cfg) if master and cfg["sample_every"] else None
    prompts = info.get("sample_prompts") or SAMPLE_PROMPTS
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank (FSDP keeps its own)
    raw = MicroDiT(model_cfg).to(device)
    torch.manual_seed(cfg["seed"] + rank)
    raw.activation_checkpointing = cfg["activation_checkpointing"]
    if start is not None:
        # pos_embed is a function of the resolution: the 512px phase rebuilds its own
        missing, unexpected = raw.load_state_dict(
            {k: v for k, v in start["model"].items() if k != "pos_embed"}, strict=False)
        if missing != ["pos_embed"] or unexpected:  # anything else would train from noise
            raise ValueError(f"the starting weights do not fit the model: missing "
                             f"{[k for k in missing if k != 'pos_embed'][:4]}, unexpected "
                             f"{unexpected[:4]}")
    fsdp = cfg["fsdp"] and world > 1
    if cfg["fsdp"] and not fsdp and master:
        print("--fsdp: one process has nothing to shard over; training unsharded")
    if fsdp:
        shard(raw, world, device)
    # fused: one kernel for all parameters, on CUDA and CPU (4.6x faster than the default
    # on the CPU for the Tiny preset, BENCHMARKS.md)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg["weight_decay"], fused=True)
    step, phase_start, ema = 0, 0, None
    if start is not None:
        # the phase's own start (PHASES "init"), --init or not: phases 2 and 4 carry the
        # optimizer and step on, phase 3 (and phase 1 from given weights) only the weights
        full_state = resume or (PHASES[cfg["phase"]]["init"] == "full" and "optimizer" in start)
        if full_state:
            load_optimizer_state(optimizer, start["optimizer"])
            for group in optimizer.param_groups:  # the saved groups carry the old run's value
                group["weight_decay"] = cfg["weight_decay"]
            step = start["step"]
        if resume:  # same phase: everything continues
            phase_start = start["phase_start"]
            ema = start["ema"] and dict(start["ema"])
            loader.load_state_dict(start["loader"])
            restore_rng(start["rng"][rank % len(start["rng"])])
        else:
            phase_start = step
    ema_obj = None
    if ema is not None:
        ema_obj = EMA(raw)
        ema_obj.state = {k: shard_as(ema[k], v) for k, v in ema_obj.state.items()}

    if use_compile:
        set_inductor_options(cfg["inductor"])
    model = torch.compile(raw, mode=cfg["compile_mode"]) if use_compile else raw
    if world > 1 and not fsdp:
        # gradients as views into DDP's all-reduce buckets: no second copy of them (4.7 GB
        # for MicroDiT_XL_2) and no copy into the buckets after each backward
        # (buffers not broadcast before every forward: pos_embed and mask_token are constants)
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True, broadcast_buffers=False)

    flops_per_image = train_flops_per_image(model_cfg, H, cfg["mask_ratio"])
    peak = peak_flops(device)
    if master:
        record_run(folder, step, {"run": cfg, "model": dataclasses.asdict(model_cfg),
                                  "world_size": world, "accumulation": accum,
                                  **environment(device)})
        print(json.dumps(cfg, indent=2))
        print(model_cfg)
        print(f"{count_params(raw):,} parameters; global batch {cfg['batch_size']} = micro-batch "
              f"{cfg['micro_batch']} x {world} processes{' (FSDP)' if fsdp else ''} x {accum} "
              f"accumulation steps; "
              f"{flops_per_image / 1e9:.1f} GFLOPs per training image; starting at step {step}")

    # --- the loop
    end = phase_start + cfg["steps"]
    log_file = open_log(os.path.join(folder, "log.jsonl"), step) if master else None
    bar = tqdm(total=cfg["steps"], initial=step - phase_start, disable=not master, unit="step",
               dynamic_ncols=True)
    bad_in_a_row, skipped = 0, 0
    T = (H // model_cfg.patch_size) ** 2
    bucket_edges = torch.tensor(SIGMA_BUCKETS, device=device)
    # each step's statistics stay on the device until --log-every steps have gathered (or a
    # checkpoint, grid or the end comes): reading them makes the host wait for the GPU, and
    # every wait leaves the GPU idle while the host queues the next step
    pending, t_read = [], time.perf_counter()
    writer = CheckpointWriter(background=device.type == "cuda")
    held.callback(writer.wait)  # a write in flight ends before the lock is let go
    signals = StopSignals(held)

    def leave():  # the end of the loop, whichever it is
        try:
            writer.close()  # the checkpoint in flight is on disk (or its error raised)
        finally:
            bar.close()
            if world > 1:
                # no rank exits before rank 0's write ends: torchrun takes a rank's non-zero
                # exit for a failure and kills the other ranks 30 s later
                dist.barrier()
                dist.destroy_process_group()
    host = HostSnapshot(pin=device.type == "cuda") if writer.background and master else None
    while step < end:
        phase_step = step - phase_start
        lr = learning_rate(cfg, phase_step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        buckets = torch.zeros(2, len(SIGMA_BUCKETS) + 1, device=device)
        sums = torch.zeros(2, device=device)
        loss_sum, aux_sum = sums  # views of it: the loss and the aux loss over micro-batches
        for micro in range(accum):
            batch = next(loader)
            x = batch["latents"].to(device, non_blocking=True)
            y = batch["captions"].to(device, non_blocking=True)
            N = x.shape[0]
            # rank r reads micro-batches r, r + W, ... of the global batch (data.py): the noise
            # of each follows its index there, so any world size draws the same
            g = micro_generator(cfg["seed"], step, micro * world + rank, device)
            normal = torch.randn(N, generator=g, device=device)
            noise = torch.randn(x.shape, generator=g, device=device)
            ids_keep = (random_ids_keep(N, T, cfg["mask_ratio"], device, generator=g)
                        if cfg["mask_ratio"] > 0 else None)
            sync = micro == accum - 1 or world == 1
            with accumulating(model, raw, sync), autocast:
                per_sample, sigma = edm_loss_per_sample(
                    model, x, y, cfg["mask_ratio"], cfg["p_mean"], cfg["p_std"],
                    normal=normal, noise=noise, ids_keep=ids_keep)
                loss = per_sample.mean()
                if model_cfg.moe_routing == "token_choice":
                    aux = raw.aux_loss()
                    loss = loss + cfg["aux_loss_weight"] * aux
                    aux_sum += aux.detach()
            (loss / accum).backward()
            loss_sum += per_sample.detach().mean()
            buckets += bucket_losses(per_sample, sigma, bucket_edges)

        grad_norm = clip_in_optimizer(optimizer, cfg["grad_clip"])
        stats = torch.cat([sums / accum, buckets.flatten()])
        if world > 1:
            dist.all_reduce(stats)
            stats[:2] /= world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        phase_step += 1

        if cfg["ema_decay"] > 0 and phase_step >= cfg["ema_start"]:
            if ema_obj is None:
                ema_obj = EMA(raw)  # starts from the weights at ema_start
            else:
                ema_obj.update(raw, cfg["ema_decay"])

        # --- log: one host-device sync per --log-every steps, and one line per step
        pending.append((step, lr, torch.cat([grad_norm.reshape(1).float(), stats])))
        save_now = step % cfg["ckpt_every"] == 0 or step == end
        sample_now = cfg["sample_every"] > 0 and (step % cfg["sample_every"] == 0
                                                  or step == end)
        if len(pending) < cfg["log_every"] and not (save_now or sample_now):
            continue  # nothing to read, write or draw this step
        stop_by = signals.agreed(device, world) if step < end else None  # the same on all ranks
        if stop_by is not None:  # save now; no grid: a scheduler gives little time
            save_now, sample_now = True, False
        elif step == end and signals.received:  # too late to stop: the phase ends here
            sample_now = False
        rows = torch.stack([values for *_, values in pending]).tolist()
        dt = (time.perf_counter() - t_read) / len(pending)  # the mean over the steps read
        stop_at = None
        for (at, lr_at, _), (norm_at, loss_at, aux_at, *by_sigma) in zip(pending, rows):
            if math.isfinite(norm_at):
                bad_in_a_row = 0
            else:  # the update was skipped; the run stops below after too many in a row
                skipped += 1
                bad_in_a_row += 1
                if bad_in_a_row >= cfg["max_bad_steps"] and stop_at is None:
                    stop_at = at
            images_per_s = cfg["batch_size"] / dt
            sums, counts = by_sigma[:len(SIGMA_BUCKETS) + 1], by_sigma[len(SIGMA_BUCKETS) + 1:]
            record = {"step": at, "loss": loss_at, "grad_norm": norm_at, "lr": lr_at,
                      "ms_per_step": 1000 * dt, "images_per_s": images_per_s,
                      "mfu": flops_per_image * images_per_s / (peak * world) if peak else None,
                      "skipped": skipped,
                      # null for a bucket no sample of the step fell in: every line, one schema
                      **{name: s / c if c else None
                         for name, s, c in zip(bucket_names(), sums, counts)}}
            if model_cfg.moe_routing == "token_choice":  # optimised with the loss, not in it
                record["aux_loss"] = aux_at
            if master:
                log_file.write(json.dumps(finite_or_null(record)) + "\n")
        if master:
            log_file.flush()
            mfu = f" mfu {100 * record['mfu']:.1f}%" if peak else ""
            bar.set_postfix_str(f"loss {loss_at:.4f} gnorm {norm_at:.3f} lr {lr_at:.2e} "
                                f"{1000 * dt:.0f}ms {images_per_s:.0f}img/s{mfu}", refresh=False)
            bar.update(len(pending))
        pending = []
        if stop_at is not None:
            leave()
            sys.exit(f"stopping: {cfg['max_bad_steps']} steps in a row with non-finite "
                     f"gradients at step {stop_at}. The last good checkpoint in {folder} is "
                     f"intact; lower --lr or --grad-clip and resume from it.")

        # --- checkpoint and samples
        t_save = time.perf_counter()
        if save_now and host is not None:
            writer.close()  # the last write has read the buffers the snapshot reuses
        if save_now or sample_now:
            # a background write needs a snapshot: the next steps change the tensors in place
            into = host if save_now else None
            model_state = gathered(raw.state_dict(), master, into, "model.")
            ema_state = gathered(ema_obj.state, master, into, "ema.") if ema_obj else None
        if save_now:
            rng = [rng_state()]
            if world > 1:
                rng = [None] * world
                dist.all_gather_object(rng, rng_state())
            opt_state = optimizer_state(optimizer, master, host)
            if master:
                if host is not None:
                    host.taken()
                writer.save(folder, {
                    "model": model_state, "ema": ema_state,
                    "optimizer": opt_state, "step": step,
                    "phase_step": phase_step, "phase_start": phase_start,
                    "model_config": dataclasses.asdict(model_cfg), "config": cfg,
                    "loader": loader.state_dict(), "rng": rng, "vae": info.get("vae"),
                    "clip": info.get("clip")}, cfg["keep"],
                    ready=host.wait if host is not None else None)
                took = f"{time.perf_counter() - t_save:.1f} s"  # the training's wait
                tqdm.write(f"step {step}: checkpoint " + (
                    f"queued in {took}, written in the background"
                    if writer.background else f"written in {took}"))
        if master and sample_now:
            if host is not None:
                host.wait()  # the grid may read the snapshot's buffers
            path = os.path.join(folder, f"samples_{step:09d}.png")
            save_sample_grid(ema_state or model_state, model_cfg, encoders, prompts, path, device,
                             cfg["dtype"])
            tqdm.write(f"step {step}: samples in {path}")
        if stop_by is not None:
            leave()  # the checkpoint is on disk before the process ends
            if master:
                print(f"stopped by {stop_by} at step {step}, phase {cfg['phase']} not finished: "
                      f"the checkpoint of this step is in {folder}; to go on, run the same "
                      f"command with --resume", file=sys.stderr)
            sys.exit(PREEMPTED)
        t_read = time.perf_counter()  # checkpoints and grids are not training time
    leave()
    if master:
        log_file.close()
        print(f"done: phase {cfg['phase']} finished at step {step}; checkpoints in {folder}")


OUT_OF_MEMORY_ADVICE = """\
train.py ran out of GPU memory (above). Checkpoints already written are intact: change the
command and run it again to resume from the latest. To use less memory per GPU:
  --micro-batch N            smaller micro-batches; the global --batch-size stays the same,
                             reached with more accumulation steps
  --compile                  on by default on CUDA: phase 1 of MicroDiT_XL_2 at micro-batch
                             256 needs about 66 GiB compiled and 87 GiB eager (BENCHMARKS.md)
  --activation-checkpointing recompute activations in the backward (about 1/3 more compute)
  --fsdp                     shard weights, gradients and optimizer state over the GPUs"""


@record  # under torchrun: any other exception goes to the error file, traceback included
def cli(argv=None):
    """main(), with a missing file, a bad flag or input, a checkpoint that cannot be written
    or running out of GPU memory said in a message instead of a stack trace. Under torchrun
    the message also goes to the rank's error file, so that torchrun's summary of a failed
    job names the cause instead of `error_file: <N/A>`."""
    try:
        main(argv)
    except SystemExit as e:  # main's own stops (non-finite steps, a phase not finished, ...)
        if isinstance(e.code, str):
            get_error_handler().record_exception(e)
        raise
    except (FileNotFoundError, ValueError, CheckpointWriteError) as e:  # in the message
        get_error_handler().record_exception(e)
        sys.exit(f"error: {e}")
    except torch.cuda.OutOfMemoryError as e:
        get_error_handler().record_exception(e)
        sys.exit(f"{str(e).splitlines()[0]}\n\n{OUT_OF_MEMORY_ADVICE}")


if __name__ == "__main__":
    cli()
