"""Checkpoints: saving, loading and resuming a run, and reading any MicroDiT weights.

A train.py checkpoint (`ckpt_STEP.pt`) holds everything needed to resume exactly, as plain
types loadable with weights_only=True: the model, the EMA, the optimizer state, the step,
the run's config and the network's, the loader's position and every rank's RNG state. Files
are written atomically (a temporary file, fsync, rename), so a kill or a full disk at any
moment leaves the earlier checkpoints and never a half-written one. On GPUs the write runs
in a background thread from a snapshot in pinned CPU memory, so the training waits for a
copy, not for the disk; under FSDP the sharded tensors are gathered whole first.

Reading: a released .pt (a bare state_dict, its architecture recognised from the weights),
a train.py checkpoint (EMA weights preferred) or an exported .safetensors, each turned into
a network by build_dit. Also here: what a run does around its checkpoints (the run lock,
stop signals from a scheduler, the JSONL log resumed at the checkpoint's step, the record of
the code and versions a run started with).
"""
import dataclasses
import glob
import json
import math
import os
import pickle
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

import text as text_lib
import vae as vae_lib
from data import absolute_sources
from diffusion import SIGMA_BUCKETS, SIGMA_DATA
from model import PRESETS, DiTConfig, MicroDiT, check_mask_ratio, pos_embed_of, sincos_pos_embed

RELEASED_REPO = "VSehwag24/MicroDiT"
RELEASED_FILES = ("dit_4_channel_22M_real_only_data.pt",
                  "dit_4_channel_37M_real_and_synthetic_data.pt",
                  "dit_16_channel_37M_real_and_synthetic_data.pt",
                  "dit_4_channel_0.5B_synthetic_data.pt")
RELEASED_CKPT = f"ckpts/{RELEASED_FILES[1]}"  # the one sample.py uses by default
MICRODIT_KEYS = ("x_embedder.proj.weight", "pos_embed", "y_embedder.y_proj.fc1.weight")


# ----------------------------------------------------------------------------- atomic files

def atomic_write(path, write):
    """write(f) to a private temporary name, then rename: readers and restarted runs see the
    whole file or none of it."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # pids repeat across hosts
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, an interrupt: leave no half file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    sync_folder(os.path.dirname(path) or ".")


def sync_folder(folder):
    """fsync a folder, which makes the renames in it survive a power cut (the file's own
    fsync does not cover its name). Best effort: the file itself is already whole and in
    place, so a folder that cannot be opened or synced (Windows, some network file systems)
    is left to the file system's own guarantees rather than failing the write."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj):
    """obj as indented JSON, written atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


# ----------------------------------------------------------------------------- reading

def download_instructions():
    return ("Download the released weights once (about 9 GB in all):\n"
            f"    hf download {RELEASED_REPO} {RELEASED_CKPT} --local-dir weights\n"
            f"    {vae_lib.DOWNLOAD}\n"
            f"    {text_lib.DOWNLOAD}\n"
            f"then: python sample.py \"a cat\" --ckpt weights/{RELEASED_CKPT} "
            f"--vae {vae_lib.DOWNLOADED} --clip {text_lib.DOWNLOADED}")


def with_stored_interp_scale(cfg, pos_embed):
    """cfg with the position interpolation a stored pos_embed was built with (1.0 for the
    256px models, 2.0 for the 512px ones fine-tuned from them), when one of those fits."""
    grid = cfg.input_size // cfg.patch_size
    if tuple(pos_embed.shape[1:]) != (grid * grid, cfg.dim):  # another architecture: the
        return cfg                                              # shape check will say so
    for scale in (cfg.input_size / 32, 1.0, 2.0):
        rebuilt = sincos_pos_embed(cfg.dim, grid, grid, scale)
        if torch.allclose(rebuilt, pos_embed[0].float(), atol=1e-5):
            return dataclasses.replace(cfg, pos_interp_scale=scale)
    return cfg


def fit_preset(preset, state):
    """A preset with the sizes a state_dict's weights show (latent channels, patch size,
    latent size, caption width) and the position interpolation its pos_embed was built
    with."""
    try:
        proj = state["x_embedder.proj.weight"]                         # (D, C, p, p)
        grid = int(round(state["pos_embed"].shape[1] ** 0.5))           # patches per side
        caption_channels = state["y_embedder.y_proj.fc1.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"not a MicroDiT state_dict: no {e}") from e
    cfg = dataclasses.replace(preset, in_channels=proj.shape[1], patch_size=proj.shape[2],
                              input_size=grid * proj.shape[2], caption_channels=caption_channels)
    return with_stored_interp_scale(cfg, state["pos_embed"])


def infer_config(state):
    """DiTConfig of a bare state_dict (a released .pt): sizes are read off the weights and
    the preset is the one whose every name and shape fits."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for preset in PRESETS.values():
        cfg = fit_preset(preset, state)
        with torch.device("meta"):
            net = MicroDiT(cfg)
        if {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes:
            return cfg
    raise ValueError(f"the weights (width {state['x_embedder.proj.weight'].shape[0]}, "
                     f"{len(shapes)} tensors) fit no preset in {list(PRESETS)}: use a "
                     f"checkpoint saved by train.py, which carries its config")


def load_checkpoint(path):
    """torch.load of a checkpoint (tensors and plain types only), a damaged file said in a
    message."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        # what torch's weights-only unpickler says of Python objects it will not build
        objects = ("Unsupported global", "unrecognized function", "Can only create new object")
        detail = next((line for line in str(e).splitlines()
                       if any(marker in line for marker in objects)), None)
        if detail is None:  # not a pickle at all (a text file, a cut-off download)
            raise ValueError(f"{path}: not a PyTorch checkpoint (its bytes do not unpickle); "
                             f"it is damaged or another kind of file") from None
        raise ValueError(f"{path}: holds Python objects, not only tensors, and is loaded with "
                         f"weights_only=True, which refuses them ({detail.strip()}); save the "
                         f"model's state_dict() instead of the model") from None
    except Exception as e:  # torch.load raises many kinds on a damaged file
        raise ValueError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); it is damaged (a disk "
                         f"error, a partial download or copy) or not a PyTorch "
                         f"checkpoint") from None


def weights_of(ckpt, path):
    """(state_dict, model config dict or None, extra info) of a loaded checkpoint: a
    train.py one (EMA weights preferred) or a bare state_dict (a released .pt)."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state = ckpt["ema"] if ckpt.get("ema") else ckpt["model"]
        info = {k: ckpt.get(k) for k in ("vae", "clip", "step")}
        info["data"] = (ckpt.get("config") or {}).get("data")  # what it was trained on
        info["sigma_data"] = sigma_data_of(ckpt)
        return check_weights(state, path), ckpt.get("model_config"), info
    return check_weights(ckpt, path), None, {"sigma_data": SIGMA_DATA}


def sigma_data_of(record):
    """The sigma_data a checkpoint (or an export's metadata) was trained with: weights that
    record none, released or saved before it was recorded, were trained with 0.9."""
    return record.get("sigma_data") or SIGMA_DATA


def check_weights(state, path):
    if not isinstance(state, dict) or not all(k in state for k in MICRODIT_KEYS):
        raise ValueError(f"{path}: not MicroDiT weights (a MicroDiT state_dict has "
                         f"{', '.join(MICRODIT_KEYS)}, ...)")
    return state


def read_checkpoint(path):
    """(state_dict, model config dict or None, extra info) from a released .pt (bare
    state_dict), a train.py checkpoint (EMA weights preferred) or an exported .safetensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found" + (
            ".\n" + download_instructions() if os.path.basename(path) in RELEASED_FILES
            else f" (under {os.getcwd()}); check the path, or leave --ckpt out for the paper's "
                 f"released model"))
    if not path.endswith(".safetensors"):
        return weights_of(load_checkpoint(path), path)
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        meta = safe_open(path, "pt").metadata() or {}
        info = json.loads(meta.get("info", "{}"))
        state, config = load_file(path), info.get("model_config")
    except Exception as e:  # SafetensorError on a cut-short or foreign file
        raise ValueError(f"{path}: cannot read it as safetensors weights "
                         f"({type(e).__name__}: {e}); download or export it again") from None
    info["sigma_data"] = sigma_data_of(info)
    return check_weights(state, path), config, info


def load_dit(path, preset=None, latent_size=None, device="cpu"):
    """The network of a checkpoint file, in eval mode, and the checkpoint's extra info."""
    state, config, info = read_checkpoint(path)
    return build_dit(state, config, preset, latent_size, device, source=path), info


def build_dit(state, config, preset=None, latent_size=None, device="cpu", source="checkpoint"):
    """MicroDiT holding `state`. `preset` forces an architecture (an error names the first
    mismatching tensors); `latent_size` rebuilds pos_embed for another resolution."""
    if preset is not None:
        cfg = fit_preset(PRESETS[preset], state)
    elif config is not None:
        cfg = DiTConfig.from_dict(config)
    else:
        cfg = infer_config(state)
    if latent_size and latent_size != cfg.input_size:
        scale = cfg.pos_interp_scale * latent_size / cfg.input_size
        cfg = dataclasses.replace(cfg, input_size=latent_size, pos_interp_scale=scale)
        state = {k: v for k, v in state.items() if k != "pos_embed"}
    with torch.device("meta"):  # no random initialisation to throw away (15 s for XL on a CPU)
        net = MicroDiT(cfg)
    expected = net.state_dict()
    bad = [f"missing {k}" for k in expected if k not in state and k != "pos_embed"]
    bad += [f"unexpected {k}" for k in state if k not in expected]
    bad += [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in expected.items()
            if k in state and state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source} does not match {preset or 'its config'}: "
                         f"{len(bad)} mismatches, first: {', '.join(bad[:4])}")
    # copies made on the device in the model's dtypes: nothing is shared with the caller's
    # tensors (train.py passes its live weights), half-precision files load as float32
    filled = {k: state[k].to(device, v.dtype, copy=True)
              for k, v in expected.items() if k in state}
    filled.setdefault("pos_embed", pos_embed_of(cfg).to(device))  # rebuilt for latent_size
    net.load_state_dict(filled, assign=True)
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- writing

def phase_dir(out, phase):
    return os.path.join(out, f"phase{phase}")


def checkpoints(folder):
    """Complete checkpoints in a folder, oldest first (temporary files are never listed)."""
    return sorted(glob.glob(os.path.join(folder, "ckpt_*.pt")))


def latest_note(folder):
    """What a failed or stopped run leaves to resume from, for its message."""
    found = checkpoints(folder)
    if not found:
        return f"{folder} has no checkpoint yet: a rerun starts the phase again"
    return f"the latest checkpoint, {found[-1]}, is intact: a rerun resumes from it"


def save_checkpoint(folder, state, keep_last):
    """Atomic (temporary file, fsync, rename, fsync of the folder): a crash or power cut at any
    moment leaves the previous checkpoints and never a truncated one."""
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, "ckpt_*.pt.tmp-*")):  # a killed save's
        os.remove(stale)
    path = os.path.join(folder, f"ckpt_{state['step']:09d}.pt")
    atomic_write(path, lambda f: torch.save(state, f))
    for old in checkpoints(folder)[:-keep_last]:
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

    def save(self, folder, state, keep_last, ready=None):
        """state: in the background, a snapshot the training will not change; ready: called
        by the writer before it reads the state (HostSnapshot.wait: the copies into it may
        still be queued on the GPU)."""
        self.close()
        if not self.background:
            self.write(folder, state, keep_last, ready)
            return self.close()
        self.thread = threading.Thread(target=self.write, args=(folder, state, keep_last, ready))
        self.thread.start()

    def write(self, folder, state, keep_last, ready=None):
        try:
            if ready is not None:
                ready()
            save_checkpoint(folder, state, keep_last)
        except Exception as e:  # handed to the training thread
            self.error = CheckpointWriteError(
                f"writing the checkpoint of step {state['step']} to {folder} failed "
                f"({type(e).__name__}: {e}); {latest_note(folder)}")

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


class HostSnapshot:
    """CPU buffers that the state is copied into for a background checkpoint write, made at
    the first save and reused by every later one (while a write reads them, the next save
    waits for it first: CheckpointWriter.close). Copying MicroDiT_XL_2's 14 GB state into
    new memory at each save stalls the training for seconds (fresh pages fault in one at a
    time, and a copy to pageable memory is slow; BENCHMARKS.md). On CUDA the buffers are
    pinned and the copies queued on the training stream without the host waiting; the steps
    after the save change the tensors in place only after the copies (same stream), and the
    writer calls wait() before it reads. The first save also pins the buffers. PyTorch's
    pinned allocator rounds each buffer up to a power of two: about a third more host memory
    than the state, kept for the run."""

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

    def mark_copied(self):
        """After the last copy of a save: marks on the stream where the copies end."""
        if self.pin:
            self.copied = torch.cuda.Event(blocking=True)  # the writer sleeps, not spins
            self.copied.record()

    def wait(self):
        """Until the copies queued before mark_copied() have landed in the buffers."""
        if self.copied is not None:
            self.copied.synchronize()


def gathered(state, wanted=True, snapshot=None, prefix=""):
    """A state dict with its FSDP-sharded tensors made whole, on the CPU; others as they
    are, or with snapshot (a HostSnapshot) copied into its buffers (keys: prefix + the
    state's key): a copy that the training does not change while a background thread writes
    it. A collective under FSDP: every rank must call it, and the ranks that do not want the
    result (all but the one that saves) get None and copy nothing."""
    whole = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            v = v.full_tensor()  # freed at once where it is not wanted
            if wanted:
                v = snapshot.copy(prefix + k, v) if snapshot is not None else v.to("cpu")
            else:
                v = None
        elif snapshot is not None and wanted and isinstance(v, torch.Tensor):
            v = snapshot.copy(prefix + k, v)
        whole[k] = v
    return whole if wanted else None


def shard_as(tensor, like):
    """A whole tensor cut (and placed) the way `like` is."""
    if isinstance(like, DTensor):
        return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements)
    return tensor.to(like.device)


def optimizer_state(optimizer, wanted=True, snapshot=None):
    """optimizer.state_dict() with whole tensors: one format with and without FSDP (None on
    the ranks that do not want it; snapshot as for gathered)."""
    state = optimizer.state_dict()
    per_param = {i: gathered(s, wanted, snapshot, f"optimizer.{i}.")
                 for i, s in state["state"].items()}
    return {**state, "state": per_param} if wanted else None


def load_optimizer_state(optimizer, state):
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {i: {k: shard_as(v, params[int(i)]) if v.shape == params[int(i)].shape else v
                     for k, v in s.items()} for i, s in state["state"].items()}
    optimizer.load_state_dict({**state, "state": per_param})


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class NonFiniteWeights(ValueError):
    """The weights hold NaN or infinity: a checkpoint of them would resume nothing."""


def weights_finite(net, world):
    """Whether every weight is finite, on every rank (a collective under torchrun)."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in net.parameters()]
    # a NaN or infinite weight makes its tensor's norm, and so the sum, non-finite
    finite = torch.stack(torch._foreach_norm(local)).sum().isfinite().float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


class Checkpointer:
    """The training loop's saves. On GPUs the state is copied into a HostSnapshot and written
    by a CheckpointWriter in the background; on a CPU it is written before save() returns.
    Every rank calls save() and weights() (they gather FSDP shards); rank 0 writes."""

    def __init__(self, folder, keep_last, device, master, world):
        self.folder, self.keep_last, self.master, self.world = folder, keep_last, master, world
        self.writer = CheckpointWriter(background=device.type == "cuda")
        self.snapshot = (HostSnapshot(pin=device.type == "cuda")
                         if self.writer.background and master else None)

    def weights(self, net, ema, snapshot=None):
        """(model, EMA or None) state dicts, whole, on rank 0 (None elsewhere)."""
        model_state = gathered(net.state_dict(), self.master, snapshot, "model.")
        ema_state = gathered(ema.state, self.master, snapshot, "ema.") if ema else None
        return model_state, ema_state

    def save(self, net, ema, optimizer, record):
        """Checkpoint the model, EMA, optimizer and every rank's RNG with `record` (step,
        configs, loader position, ...); returns the weights as weights() does. Refuses
        non-finite weights: the checkpoints already there stay the latest."""
        start = time.perf_counter()
        if not weights_finite(net, self.world):
            raise NonFiniteWeights(
                f"the weights are not finite at step {record['step']} (the learning rate "
                f"or the data made them overflow), so no checkpoint was written; "
                f"{latest_note(self.folder)}, with a lower --lr or --grad-clip")
        if self.snapshot is not None:
            self.writer.close()  # the last write has read the buffers the snapshot reuses
        model_state, ema_state = self.weights(net, ema, self.snapshot)
        rng = [rng_state()]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, rng_state())
        opt_state = optimizer_state(optimizer, self.master, self.snapshot)
        if self.master:
            if self.snapshot is not None:
                self.snapshot.mark_copied()
            state = {"model": model_state, "ema": ema_state, "optimizer": opt_state,
                     "rng": rng, **record}
            self.writer.save(self.folder, state, self.keep_last,
                             ready=self.snapshot.wait if self.snapshot else None)
            took = f"{time.perf_counter() - start:.1f} s"  # the training's wait
            tqdm.write(f"step {record['step']}: checkpoint " + (
                f"queued in {took}, written in the background" if self.writer.background
                else f"written in {took}"))
        return model_state, ema_state

    def landed(self):
        """Until the last save's copies are in the snapshot (a grid may read them)."""
        if self.snapshot is not None:
            self.snapshot.wait()


# ----------------------------------------------------------------------------- starting a phase

def load_start_weights(net, state):
    """A phase's starting weights into net, all but pos_embed, a function of the resolution
    (the 512px phases rebuild their own); anything else missing would train from noise."""
    missing, unexpected = net.load_state_dict(
        {k: v for k, v in state.items() if k != "pos_embed"}, strict=False)
    if missing != ["pos_embed"] or unexpected:
        raise ValueError(f"the starting weights do not fit the model: missing "
                         f"{[k for k in missing if k != 'pos_embed'][:4]}, unexpected "
                         f"{unexpected[:4]}")


def restore(start, resume, carry_optimizer, net, optimizer, loader, rank, weight_decay):
    """(step, phase_start, EMA state or None) of a phase starting from `start`, with the
    optimizer state loaded where it carries on: on a resume (which also restores the
    loader's position and this rank's RNG), or when carry_optimizer and start has one. Else
    only the weights carry over (net holds them already) and the phase starts at step 0."""
    step = 0
    if start is not None and (resume or (carry_optimizer and "optimizer" in start)):
        load_optimizer_state(optimizer, start["optimizer"])
        for group in optimizer.param_groups:  # the saved groups carry the old run's value
            group["weight_decay"] = weight_decay
        step = start["step"]
    if not resume:
        return step, step, None
    loader.load_state_dict(start["loader"])
    restore_rng(start["rng"][rank % len(start["rng"])])
    return step, start["phase_start"], start["ema"]


def recorded_config(start):
    """The run config a starting checkpoint recorded ({} for bare weights), with its --data
    made absolute (older checkpoints recorded it as given)."""
    saved = dict((start or {}).get("config") or {})
    if saved.get("data") not in (None, "demo"):
        saved["data"] = absolute_sources(saved["data"])
    return saved


def init_checkpoint(path):
    """--init: a train.py checkpoint as it is (whatever its file name ends in), or bare
    weights (a released .pt, an exported .safetensors) as a start that has weights only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init {path}: no such file")
    info = {}
    if path.endswith(".safetensors"):
        state, config, info = read_checkpoint(path)
    else:
        ckpt = load_checkpoint(path)  # read once: a released one is 4.7 GB
        if isinstance(ckpt, dict) and "optimizer" in ckpt:
            if not {"model", "model_config", "step"} <= set(ckpt):
                raise ValueError(f"--init {path}: holds an optimizer but is no train.py "
                                 f"checkpoint (no model, model_config or step); give its "
                                 f"bare weights (a state_dict) instead")
            return ckpt
        state, config, _ = weights_of(ckpt, f"--init {path}")
    return {"model": state, "model_config": config or dataclasses.asdict(infer_config(state)),
            "sigma_data": info.get("sigma_data")}


def previous_phase_checkpoint(out, phase):
    """Phase N > 1 starts from the final checkpoint of phase N - 1 in the same run."""
    prev = phase - 1
    found = checkpoints(phase_dir(out, prev))
    if not found:
        sys.exit(f"phase {phase} starts from phase {prev}, but {phase_dir(out, prev)} has no "
                 f"checkpoint: run --phase {prev} first, or give --init CKPT")
    ckpt = load_checkpoint(found[-1])
    if ckpt["phase_step"] < ckpt["config"]["steps"]:
        sys.exit(f"phase {prev} stopped at step {ckpt['phase_step']} of "
                 f"{ckpt['config']['steps']}: resume it (--phase {prev}) before starting phase "
                 f"{phase}, or give --init")
    return ckpt


def export_weights(out, phase, path):
    """--export: the latest checkpoint's weights (EMA when it has them) as safetensors, with
    the model config, encoders and step in the metadata (what sample.py and --init read)."""
    from safetensors.torch import save_file
    if not path.endswith(".safetensors"):
        raise ValueError(f"--export {path}: name the file FILE.safetensors (sample.py and "
                         f"--init tell the format by that ending)")
    found = checkpoints(phase_dir(out, phase))
    if not found:
        sys.exit(f"nothing to export: no checkpoint in {phase_dir(out, phase)}")
    ckpt = load_checkpoint(found[-1])
    weights = ckpt["ema"] or ckpt["model"]
    info = {k: ckpt.get(k) for k in ("model_config", "vae", "clip", "step", "sigma_data")}
    info["weights"] = "ema" if ckpt["ema"] else "model"
    # atomic: never a half-written file under that name (save_file streams to the temporary
    # file by its name; atomic_write's fsync covers it all the same)
    atomic_write(path, lambda f: save_file({k: v.contiguous() for k, v in weights.items()},
                                           f.name, metadata={"info": json.dumps(info)}))
    print(f"exported {info['weights']} weights of {found[-1]} to {path}")


def starting_point(run, given, insist, master, phases, recipe_keys):
    """(run, start, resume): where a phase starts from, its own latest checkpoint (a resume:
    the recipe_keys as the checkpoint has them, except those the command line sets again,
    `given`), --init, the previous phase's end (phases[N]["init"]), or nothing (None).
    insist: --resume, which stops if there is nothing to resume."""
    folder = phase_dir(run["out"], run["phase"])
    existing = checkpoints(folder)
    if insist and not existing:
        sys.exit(f"--resume: {folder} has no checkpoint to resume from (is --out right?)")
    start = None
    if existing:
        try:
            start = load_checkpoint(existing[-1])
        except ValueError as e:  # a checkpoint of this run, damaged after it was written
            raise ValueError(f"{e}. Checkpoints are written whole or not at all, so it was "
                             f"damaged after: move it away to resume from the one "
                             f"before") from None
        saved = recorded_config(start)
        changed = [f"{k} {saved[k]!r} -> {run[k]!r}" for k in recipe_keys
                   if k in saved and k in given and run[k] != saved[k]]
        run = {**run, **{k: saved[k] for k in recipe_keys if k in saved and k not in given}}
        if changed and master:
            print(f"resuming with a changed recipe: {', '.join(changed)}")
        if run["init"] and master:
            print(f"--init {run['init']} left unused: phase {run['phase']} resumes from its "
                  f"own latest checkpoint, {existing[-1]}")
    elif run["init"]:
        start = init_checkpoint(run["init"])
    elif phases[run["phase"]]["init"] != "scratch":
        start = previous_phase_checkpoint(run["out"], run["phase"])
    # the position grid is the run's first phase's (1.0 at its resolution, 2.0 at twice it,
    # as released); weights without a run's config bring their own grid (load_data)
    saved = recorded_config(start)
    if "base_res" not in given:
        run["base_res"] = saved.get("base_res") or (run["res"] if start is None else None)
    # a phase that continues a run keeps its scale: phases 1 and 2 at the run's base
    # resolution, 3 and 4 at twice it (256 and 512px in the paper)
    if saved.get("base_res") and not existing and "res" not in given:
        run["res"] = saved["base_res"] * phases[run["phase"]]["res"] // phases[1]["res"]
    if not run["data"] and saved.get("data"):
        run["data"] = saved["data"]
        if master:
            print(f"--data: {run['data']}, the data the starting checkpoint trained on")
            if run["res"] > saved.get("res", run["res"]):
                print(f"  at {run['res']}px now: the paper changes the data for its 512px "
                      f"phases (no DiffusionDB, CC12M images of at least 512px only: "
                      f"`prepare.py --min-size 512` on CC12M; README, Training)")
    return run, start, bool(existing)


def model_config(run, start, loader, preset_given):
    """The network's config: a starting checkpoint's (it brings its own architecture) at this
    resolution, or the preset's with --model; sized to the data. Refuses weights and data
    that do not fit each other, and a mask ratio that keeps no patch."""
    C, H, _ = loader.latent_shape
    from_data = dict(in_channels=C, input_size=H, caption_channels=loader.caption_shape[-1],
                     pos_interp_scale=run["res"] / run["base_res"])
    # from_dict: JSON's lists become the config's tuples, so that a resume compares equal
    asked = DiTConfig.from_dict({**dataclasses.asdict(PRESETS[run["preset"]]), **from_data,
                                 **run["model"]})
    model_cfg = asked
    if start is not None:
        model_cfg = DiTConfig.from_dict({**start["model_config"], "input_size": H,
                                         "pos_interp_scale": from_data["pos_interp_scale"]})
        misfit = [f"{name} {getattr(model_cfg, name)} (the data's: {from_data[name]})"
                  for name in ("in_channels", "caption_channels")
                  if getattr(model_cfg, name) != from_data[name]]
        if misfit:
            raise ValueError(f"the starting weights do not fit --data {run['data']}: they take "
                             f"{', '.join(misfit)}. Give data prepared with the checkpoint's "
                             f"VAE and text encoder (`prepare.py --vae/--clip`), or "
                             f"weights trained on this data")
        if (preset_given or run["model"]) and asked != model_cfg:
            diff = [f"{f.name} {getattr(model_cfg, f.name)!r} (asked: {getattr(asked, f.name)!r})"
                    for f in dataclasses.fields(DiTConfig)
                    if getattr(model_cfg, f.name) != getattr(asked, f.name)]
            sys.exit(f"--preset/--model ask for another architecture than the checkpoint this "
                     f"phase starts from, which has {', '.join(diff)}. A checkpoint brings its "
                     f"own architecture: drop --preset/--model, or use a new --out")
    if H % model_cfg.patch_size:
        raise ValueError(f"--res {run['res']}: the data's {H} x {H} latents do not split into "
                         f"{model_cfg.patch_size} x {model_cfg.patch_size} patches; use a "
                         f"--res whose latent size is a multiple of {model_cfg.patch_size}")
    try:
        check_mask_ratio(model_cfg, run["mask_ratio"])
    except ValueError as e:
        raise ValueError(f"--mask-ratio: {e}") from None
    return model_cfg


# ----------------------------------------------------------------------------- a run's files

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


def bucket_names():
    """The log's names of the noise-level buckets: sigma_0-0.1, ..., sigma_5.0-inf."""
    edges = ["0", *map(str, SIGMA_BUCKETS), "inf"]
    return [f"sigma_{a}-{b}" for a, b in zip(edges[:-1], edges[1:])]


class Log:
    """train.py's log.jsonl. Each step's statistics (train.train_step's) stay on the device
    until read(): reading makes the host wait for the GPU, and every wait leaves the GPU
    idle while the host queues the next step. So they are read every --log-every steps (and
    before a checkpoint, a grid or the end), then written one JSONL line per step (rank 0).
    Counts non-finite steps: their updates were skipped, and too many in a row stop the run."""

    def __init__(self, path, step, run, model_cfg, flops_per_image, peak, world, master):
        self.file = open_log(path, step) if master else None
        self.run, self.world, self.master = run, world, master
        self.aux = model_cfg.moe_routing == "token_choice"  # its aux loss is logged too
        self.flops_per_image, self.peak = flops_per_image, peak
        self.pending, self.since = [], time.perf_counter()
        self.skipped = self.bad_in_a_row = 0
        self.too_many_at = None  # the step at which max_bad_steps in a row were reached
        self.last = {}

    def add(self, step, lr, stats):
        self.pending.append((step, lr, stats))

    def read(self):
        """Write the pending steps' lines; returns how many were read."""
        names = list(self.pending[0][2])
        sizes = [v.numel() for v in self.pending[0][2].values()]
        # all of them copied to the host at once: one wait for the device
        rows = torch.stack([torch.cat([s[k].reshape(-1).float() for k in names])
                            for *_, s in self.pending]).tolist()       # (steps, values)
        ms = 1000 * (time.perf_counter() - self.since) / len(self.pending)  # mean per step
        images_per_s = self.run["batch_size"] * 1000 / ms
        peak = self.peak and self.peak * self.world
        for (step, lr, _), row in zip(self.pending, rows):
            values = iter(row)
            stats = {k: [next(values) for _ in range(n)] for k, n in zip(names, sizes)}
            if math.isfinite(stats["grad_norm"][0]):
                self.bad_in_a_row = 0
            else:  # the update was skipped
                self.skipped += 1
                self.bad_in_a_row += 1
                if self.bad_in_a_row >= self.run["max_bad_steps"] and self.too_many_at is None:
                    self.too_many_at = step
            by_sigma = zip(bucket_names(), stats["bucket_sums"], stats["bucket_counts"])
            self.last = {"step": step, "loss": stats["loss"][0],
                         "grad_norm": stats["grad_norm"][0], "lr": lr, "ms_per_step": ms,
                         "images_per_s": images_per_s,
                         "mfu": self.flops_per_image * images_per_s / peak if peak else None,
                         "skipped": self.skipped,
                         # null for a bucket no sample of the step fell in: one schema
                         **{name: s / c if c else None for name, s, c in by_sigma}}
            if self.aux:
                self.last["aux_loss"] = stats["aux_loss"][0]  # optimised, not in the loss
            if self.master:
                self.file.write(json.dumps(finite_or_null(self.last)) + "\n")
        if self.master:
            self.file.flush()
        read, self.pending = len(self.pending), []
        return read

    def summary(self):
        line = self.last
        mfu = f" mfu {100 * line['mfu']:.1f}%" if line["mfu"] is not None else ""
        return (f"loss {line['loss']:.4f} gnorm {line['grad_norm']:.3f} lr {line['lr']:.2e} "
                f"{line['ms_per_step']:.0f}ms {line['images_per_s']:.0f}img/s{mfu}")


CODE_FILES = ("model.py", "mixer.py", "moe.py", "diffusion.py", "data.py", "prepare.py",
              "checkpoint.py", "parallel.py", "train.py")


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


PREEMPTED = 75  # exit status after a stop by signal: EX_TEMPFAIL, "try again" (with --resume)


class StopSignals:
    """SIGTERM and SIGUSR1, what schedulers send before they kill a job (preemption, a time
    limit with Slurm's --signal, a spot machine reclaimed): the run saves a checkpoint at the
    next log point (every --log-every steps) and exits with status PREEMPTED. The handlers
    only note the signal; the ranks agree on it at the log points (one all-reduce there), as
    a signal may reach some ranks only. Handlers can only be set from the main thread; the
    previous ones come back when `exit_stack` closes."""

    NAMES = ("SIGTERM", "SIGUSR1")

    def __init__(self, exit_stack):
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.NAMES:
            if hasattr(signal, name):  # Windows has no SIGUSR1
                sig = getattr(signal, name)
                exit_stack.callback(signal.signal, sig, signal.signal(sig, self.note))

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


def take_run_lock(exit_stack, out, phase, master=True, world=1):
    """Rank 0 takes the phase's lock (phase_lock) before anything is read, and every rank
    stops with its message if the phase is another run's."""
    refused = [phase_lock(exit_stack, out, phase) if master else None]
    if world > 1:
        dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        sys.exit(refused[0])


def phase_lock(exit_stack, out, phase):
    """An exclusive lock on a phase of a run, held until `exit_stack` closes: a
    second run on the same --out (started twice by hand, or requeued by a scheduler while
    the first is still alive) would resume from the same checkpoint and overwrite the other's
    checkpoints and log. The lock file sits beside the phase folders (out/.phaseN.lock), so
    a run refused or stopped before it begins leaves no phase folder. The operating system
    drops the lock when the process ends, however it ends. Where the file system has no
    locks (Windows, some network file systems) the run goes on without one. Returns None,
    or why the phase cannot be taken."""
    os.makedirs(out, exist_ok=True)
    f = exit_stack.enter_context(open(os.path.join(out, f".phase{phase}.lock"), "w"))
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return (f"{phase_dir(out, phase)} is in use by another train.py run (it holds "
                f"{f.name}); wait for it to end or stop it, or give another --out")
    except (ImportError, OSError):
        pass
    return None
