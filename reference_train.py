"""The simplest correct MicroDiT training loop: the yardstick that train.py is held to.

    python data.py demo --out data/shapes16 --res 16
    python reference_train.py --data data/shapes16 --res 16 --steps 1500 --lr 1e-3 --out ref.pt

train.py carries what long runs on many GPUs need (phases, resuming, DDP/FSDP, compile,
mixed precision, EMA, fused clipping, per-micro-batch generators, prefetching), and each of
those is a place for a bug that a falling loss curve would not show. This file has none of
them: one process, float32, random batches, the EDM loss, AdamW and gradient clipping with
the paper's values. Trained on the same data for the same steps, train.py's final model
must score the held-out loss of this one's within the spread over seeds (test_all.py,
reference trainer). Equal in distribution, not bit for bit: train.py reads shuffled epochs
and draws each micro-batch's noise from its own generator.

The output, {"model": state_dict, "model_config": ...}, loads in sample.py and eval.py.
"""
import argparse
import dataclasses
import json
import math
import sys

import numpy as np
import torch

from data import CAPTION_COLUMN, LatentDataset, data_std
from diffusion import edm_loss
from model import PRESETS, DiTConfig, MicroDiT, count_params

CAPTION_DROP = 0.1  # captions zeroed: the all-zero one is what guidance takes as unconditional


def learning_rate(args, step):
    """Linear warmup to --lr, then a cosine down to --min-lr-ratio of it: train.py's phase 1
    schedule, so that a comparison checks its cosine too (1: constant, as its later phases)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.min_lr_ratio
    return args.lr * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a folder made by `python prepare.py`")
    p.add_argument("--res", type=int, default=256, help="which of the data's resolutions")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2.4e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=1.0)
    p.add_argument("--grad-clip", type=float, default=0.25)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--p-mean", type=float, default=-0.6, help="ln(sigma) ~ N(p_mean, p_std^2)")
    p.add_argument("--p-std", type=float, default=1.2)
    p.add_argument("--mask-ratio", type=float, default=0.0)
    p.add_argument("--sigma-data", type=float, default=0.9, help="EDM's data std (0: the "
                   "data's own, measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=PRESETS, default="MicroDiT_CPU_2")
    p.add_argument("--model", default="{}", help='JSON of DiTConfig overrides: \'{"depth": 2}\'')
    p.add_argument("--out", default="reference.pt")
    args = p.parse_args(argv)
    try:
        overrides = json.loads(args.model)
    except ValueError:
        overrides = None
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    if not isinstance(overrides, dict) or set(overrides) - fields:
        p.error(f"--model {args.model}: give a JSON object of DiTConfig fields {sorted(fields)}")

    torch.manual_seed(args.seed)  # initial weights, noise levels and noise
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = LatentDataset(args.data)
    column = dataset.image_column(args.res)
    shape, caption_shape = dataset.columns[column], dataset.columns[CAPTION_COLUMN]
    if args.batch_size > dataset.num_samples:
        p.error(f"--batch-size {args.batch_size}: the data has {dataset.num_samples} samples")
    cfg = DiTConfig.from_dict({**dataclasses.asdict(PRESETS[args.preset]), **overrides,
                               "in_channels": shape[0], "input_size": shape[1],
                               "caption_channels": caption_shape[-1]})  # the data's sizes
    net = MicroDiT(cfg).to(device)
    sigma_data = args.sigma_data or data_std(args.data, args.res)  # 0: train.py's 'data'
    print(f"{cfg}\n{count_params(net):,} parameters")
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args.weight_decay)
    batches = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        ids = torch.randperm(dataset.num_samples, generator=batches)[:args.batch_size]
        ids = np.sort(ids.numpy())  # gather reads in disk order
        x = torch.empty(args.batch_size, *shape)                        # (B, C, H, W)
        y = torch.empty(args.batch_size, *caption_shape)                # (B, 77, D)
        dataset.gather(column, ids, x)
        dataset.gather(CAPTION_COLUMN, ids, y)
        y[torch.rand(args.batch_size, generator=batches) < CAPTION_DROP] = 0
        lr = learning_rate(args, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = edm_loss(net, x.to(device), y.to(device), args.mask_ratio, args.p_mean, args.p_std,
                        sigma_data=sigma_data)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step + 1} loss {loss.item():.4f} grad norm {grad_norm:.3f} lr {lr:.2e}")
    torch.save({"model": net.state_dict(), "model_config": dataclasses.asdict(cfg),
                "vae": dataset.info.get("vae"), "clip": dataset.info.get("clip"),
                "step": args.steps, "sigma_data": sigma_data}, args.out)
    print(f"weights in {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # data that is missing or not prepared
        sys.exit(f"error: {e}")
