"""Running the training step on one process or many, fast: torchrun's processes, DDP or
FSDP2, torch.compile with Inductor's settings, gradient accumulation that reduces the
gradients once per step, and gradient clipping folded into the fused AdamW.

train.py runs the same code under `python train.py` and `torchrun ... train.py`: the
process group, the device and this rank's place come from the environment torchrun sets.
"""
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16
COMPILE_MODES = ["default", "max-autotune-no-cudagraphs"]  # CUDA graphs: not with DDP/FSDP
OUT_OF_MEMORY_ADVICE = """\
train.py ran out of GPU memory (above). Checkpoints already written are intact: change the
command and run it again to resume from the latest. To use less memory per GPU:
  --micro-batch N            smaller micro-batches; the global --batch-size stays the same,
                             reached with more accumulation steps
  --compile                  on by default on CUDA: phase 1 of MicroDiT_XL_2 at micro-batch
                             256 needs about 66 GiB compiled and 87 GiB eager (BENCHMARKS.md)
  --activation-checkpointing recompute activations in the backward (about 1/3 more compute)
  --fsdp                     shard weights, gradients and optimizer state over the GPUs"""


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


def shard(net, world, device):
    """FSDP2: each transformer block (and the patch-mixer) becomes one unit whose weights
    are gathered just before it runs and freed after; the root holds the rest."""
    mesh = init_device_mesh(device.type, (world,))
    for block in [*net.blocks, *([net.patch_mixer] if net.cfg.patch_mixer_depth else [])]:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def wrap(net, device, local_rank, world, compile=None, mode="default", inductor=None):
    """The module the loop calls: torch.compile'd (compile None: on CUDA only) with the
    Inductor settings given, and DDP-wrapped across processes (FSDP shards instead).
    Checkpoints are saved from `net` itself, so their keys carry no wrapper's prefix."""
    model = net
    if compile if compile is not None else device.type == "cuda":
        set_inductor_options(inductor or {})
        model = torch.compile(net, mode=mode)
    if world > 1 and not isinstance(net, FSDPModule):
        # gradients as views into DDP's all-reduce buckets: no second copy of them; buffers
        # are not broadcast before every forward (pos_embed and mask_token are constants)
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True, broadcast_buffers=False)
    return model


def accumulating(model, net, sync):
    """Skips the gradient all-reduce (DDP) or reduce-scatter (FSDP) on all but the last
    micro-batch of a step: gradients accumulate locally and are reduced once."""
    if isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(sync)
    if isinstance(model, DDP) and not sync:
        return model.no_sync()
    return nullcontext()


def clip_in_optimizer(optimizer, max_norm):
    """clip_grad_norm_ (same norm, same factor) without its own pass over the gradients: the
    fused AdamW divides each gradient by `optimizer.grad_scale` as it reads it (GradScaler's
    unscaling), which saves a read and a write of every gradient. A non-finite norm (the
    same on every rank: gradients are all-reduced) sets `found_inf`, on which the fused
    AdamW skips the update on the device, so the host need not look at the norm first.
    Returns the norm before clipping."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    optimizer.grad_scale = ((grad_norm + 1e-6) / max_norm).clamp(min=1.0)
    optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
    return grad_norm


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


def inductor_options(options):
    """{setting: value} for torch._inductor.config, every name checked."""
    for name in options:
        inductor_setting(name)
    return options


def set_inductor_options(options):
    """Apply the settings to every torch.compile from here on."""
    for name, value in options.items():
        setattr(*inductor_setting(name), value)


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def command_line(main, *expected):
    """main(argv) as a command: a missing file, a bad flag or input (FileNotFoundError,
    ValueError, the `expected` errors) or running out of GPU memory said in a message
    instead of a stack trace. Under torchrun the message also goes to the rank's error file,
    so that torchrun's summary of a failed job names the cause instead of
    `error_file: <N/A>`; any other exception goes there with its traceback (@record)."""
    @record
    def cli(argv=None):
        try:
            return main(argv)
        except SystemExit as e:  # main's own stops (non-finite steps, a phase not finished)
            if isinstance(e.code, str):
                get_error_handler().record_exception(e)
            raise
        except (FileNotFoundError, ValueError, *expected) as e:
            get_error_handler().record_exception(e)
            sys.exit(f"error: {e}")
        except torch.cuda.OutOfMemoryError as e:
            get_error_handler().record_exception(e)
            sys.exit(f"{str(e).splitlines()[0]}\n\n{OUT_OF_MEMORY_ADVICE}")
    return cli
