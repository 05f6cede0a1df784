"""Measure speed: training step, masking speedup, torch.compile, sampling, data loading.

    python bench.py                                     # MicroDiT_Tiny_2, batch 8, 32x32, CPU
    python bench.py --preset MicroDiT_XL_2 --phase 1 --batch-size 256 --compile on   # one H100
    python bench.py --compile both                      # eager and compiled, side by side
    python bench.py --quick                             # CI: tiny preset, a few steps
    python bench.py --preset MicroDiT_XL_2 --batch-size 256 --compile on --max-memory-gb 79
                                                        # does it fit 80 GB? (on a larger card)
    python bench.py --preset MicroDiT_XL_2 --batch-size 256 --attention --skip train sample data
                                                        # every attention shape, every backend
    python bench.py --compile on --inductor '{"coordinate_descent_tuning": true}'
                                                        # try Inductor's settings
    python bench.py --preset MicroDiT_XL_2 --checkpoint --skip train sample data
                                                        # the training's wait at a save
    python bench.py --skip train sample --data /tmp/fake --fake-samples 32768 --cache cold
                                                        # the loader, reading from the disk

Every comparison (mask 0.75 against mask 0, compiled against eager) is measured side by
side: the variants take turns, one timed step each, and each figure is the median over its
turns, so a slow spell of a noisy machine hits both alike. The training step is train.py's
own train_step (seeded noise, EDM loss with masking, backward, the clip inside the fused
AdamW, the statistics it logs, the same precision rule) on one batch of random latents,
without the loop around it (data loading, logging: train.py's log.jsonl times those). MFU
is model FLOPs (model.py's count, forward + backward) per second over the device's dense
bf16 peak; it is reported on CUDA, or anywhere with --peak-tflops.
"""
import argparse
import collections
import dataclasses
import functools
import glob
import itertools
import json
import os
import resource
import statistics
import tempfile
import time

import numpy as np
import torch

from checkpoint import HostSnapshot, gathered, optimizer_state
from data import CAPTION_COLUMN, LatentLoader
from diffusion import SIGMA_DATA, heun_sample
from mixer import num_kept
from model import (PRECISIONS, PRESETS, MicroDiT, block_ratios, count_params, precision,
                   qkv_hidden, train_flops_per_image)
from parallel import COMPILE_MODES, inductor_options, peak_flops, set_inductor_options
from prepare import finish_index, write_shard
from train import PHASES, RUN_DEFAULTS, json_flag, model_overrides, train_step

DEFAULTS = dict(preset="MicroDiT_Tiny_2", res=256, batch_size=8, rounds=8, warmup=2,
                sample_steps=30, sample_batch=8, data_batch=2048)
QUICK = dict(preset="MicroDiT_CPU_2", res=128, batch_size=4, rounds=2, warmup=1,
             sample_steps=3, sample_batch=2, data_batch=64)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device):
    """Peak memory so far: CUDA allocator peak, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def cap_memory(device, gb):
    """Make the CUDA allocator refuse to hold more than `gb` GiB, so that a card with more
    memory shows whether a run fits a smaller one (an H200's 141 GB standing in for 80 GB)."""
    if device.type != "cuda":
        raise SystemExit("--max-memory-gb needs a CUDA device (it caps the CUDA allocator)")
    total = torch.cuda.get_device_properties(device).total_memory
    if gb * 2**30 > total:
        raise SystemExit(f"--max-memory-gb {gb} is more than the card's "
                         f"{total / 2**30:.1f} GiB")
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(gb * 2**30 / total, index)


def make_batch(cfg, batch_size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.input_size
    x = torch.randn(batch_size, cfg.in_channels, s, s, generator=g)
    y = torch.randn(batch_size, 77, cfg.caption_channels, generator=g)
    return x.to(device), y.to(device)


def alternate(variants, rounds, warmup, device):
    """Median seconds per call of each variant {name: fn}, calls interleaved round by round."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# What a kernel (CUDA) or an operator (CPU) does, read from its name; the first match wins.
# Inductor names its Triton kernels after the operators it fused ("triton_per_fused__to_copy_
# add_mul_native_layer_norm_12"), which is what splits the memory-bound rest of the step.
KINDS = [
    ("compiled graph (on CPU its C++ kernels are not timed one by one)",
     ("compiledfxgraph", "compiled region", "compiledfunction")),
    ("attention", ("attention", "sdpa", "flash", "fmha", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::baddbmm")),
    ("optimizer and grad clipping", ("multi_tensor", "adam", "_foreach_")),
    ("norm (+ modulation, residual)", ("layer_norm", "rsqrt", "var_mean")),
    ("activation (GELU, SwiGLU)", ("gelu", "silu", "sigmoid")),
    ("MoE dispatch: gathers, scatters, top-k", ("index", "scatter", "gather", "topk", "sort")),
    ("softmax", ("softmax", "amax")),
    ("other fused kernels (casts, adds, multiplies)", ("triton_", "cpp_fused")),
    ("copies and fills", ("memcpy", "memset", "copy", "fill", "cat")),
]


def kernel_kind(name):
    low = name.lower()
    for kind, marks in KINDS:
        if any(mark in low for mark in marks):
            return kind
    return "other"


def time_by_kind(prof, device, steps, top=4):
    """[{kind, ms per step, top: its `top` heaviest kernels {name: ms per step}}], heaviest
    kind first.
    On CUDA: the kernels' own time on the device, without the annotation ranges, which
    cover kernels already counted. On CPU: each operator's and range's self time (a
    compiled graph's C++ kernels count in its range)."""
    from torch.autograd import DeviceType
    totals, names = {}, {}
    for evt in prof.key_averages():
        if device.type == "cuda":
            annotation = (getattr(evt, "is_user_annotation", False) or "#" in evt.key
                          or evt.key.startswith("Torch-Compiled Region"))
            if evt.device_type != DeviceType.CUDA or annotation:
                continue
            us = evt.self_device_time_total
        else:
            us = evt.self_cpu_time_total
        kind = kernel_kind(evt.key)
        totals[kind] = totals.get(kind, 0.0) + us / 1000 / steps
        names.setdefault(kind, {})[evt.key] = us / 1000 / steps
    return [{"kind": kind, "ms": ms,
             "top": dict(sorted(names[kind].items(), key=lambda kv: -kv[1])[:top])}
            for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1])]


def kernel_intervals(prof):
    """[(start µs, end µs, name)] of the CUDA kernels a profile saw (not annotation ranges)."""
    from torch.autograd import DeviceType
    return [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if e.device_type == DeviceType.CUDA and "#" not in e.name
            and not getattr(e, "is_user_annotation", False)
            and not e.name.startswith("Torch-Compiled Region")]


def device_gaps(intervals, steps, top=5):
    """Where the device sat idle between kernels: {busy, span (first kernel's start to the
    last's end) and idle ms per step, the `top` longest gaps [{ms, after, before}]}.
    Kernels that overlap (several streams) count once."""
    merged = []  # [start, end, name of the kernel that ends last]
    for start, end, name in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1][1:] = [end, name]
        else:
            merged.append([start, end, name])
    busy = sum(end - start for start, end, _ in merged)
    span = merged[-1][1] - merged[0][0] if merged else 0.0
    gaps = [{"ms": (b[0] - a[1]) / 1000, "after": a[2], "before": b[2]}
            for a, b in zip(merged, merged[1:])]
    return {"busy_ms": busy / 1000 / steps, "span_ms": span / 1000 / steps,
            "idle_ms": (span - busy) / 1000 / steps,
            "gaps": sorted(gaps, key=lambda g: -g["ms"])[:top]}


def print_time_by_kind(by_kind):
    total = sum(row["ms"] for row in by_kind)
    print(f"time per step by kind ({total:.1f} ms in all):")
    for row in by_kind:
        print(f"  {row['ms']:9.2f} ms {100 * row['ms'] / total:5.1f}%  {row['kind']}")
        for name, each in row["top"].items():
            print(f"  {'':24s}{each:8.2f} ms  {name[:90]}")


def bench_training(args, cfg, device, autocast, peak):
    """Step time of eager and/or compiled training at mask 0 and the phase's mask ratio."""
    phase = PHASES[args.phase]
    torch.manual_seed(0)
    raw = MicroDiT(cfg).to(device)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=1e-5, fused=True)
    x, y = make_batch(cfg, args.batch_size, device)
    batches = itertools.repeat({"latents": x, "captions": y})
    models = {"eager": raw, "compiled": torch.compile(raw, mode=args.compile_mode)}
    kinds = {"off": ["eager"], "on": ["compiled"], "both": ["eager", "compiled"]}[args.compile]
    masks = args.masks
    variants = {}
    for kind in kinds:
        for m in masks:
            run = dict(phase, **{**RUN_DEFAULTS, "sigma_data": SIGMA_DATA}, mask_ratio=m)
            variants[(kind, m)] = (lambda model=models[kind], run=run: train_step(
                model, raw, optimizer, batches, run, step=0, autocast=autocast))
    if args.profile:  # where the time of a step goes, by operator (compiled when compiling)
        from torch.profiler import ProfilerActivity, profile
        fn = variants[(kinds[-1], masks[-1])]
        fn()
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        # the Python stack, for a trace: what the host was doing while the device waited
        with profile(activities=activities, with_stack=bool(args.trace)) as prof:
            fn()
            fn()
        if args.trace:  # a .gz name is compressed; opens in ui.perfetto.dev
            prof.export_chrome_trace(args.trace)
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=30))
        by_kind = time_by_kind(prof, device, steps=2)
        print_time_by_kind(by_kind)
        gaps = device_gaps(kernel_intervals(prof), steps=2) if device.type == "cuda" else None
        if gaps:
            print(f"device idle between kernels: {gaps['idle_ms']:.2f} ms per step of "
                  f"{gaps['span_ms']:.2f} from the first kernel to the last; the longest gaps:")
            for g in gaps["gaps"]:
                print(f"  {g['ms']:8.3f} ms after {g['after'][:60]}, before {g['before'][:60]}")
    t0 = time.perf_counter()
    seconds = alternate(variants, args.rounds, args.warmup, device)
    rows = []
    for (kind, m), s in seconds.items():
        flops = train_flops_per_image(cfg, mask_ratio=m) * args.batch_size
        rows.append({"compile": kind, "mask_ratio": m, "ms_per_step": 1000 * s,
                     "images_per_s": args.batch_size / s, "tflops_per_s": flops / s / 1e12,
                     "mfu": flops / s / peak if peak else None})
    result = {"rows": rows, "wall_s": time.perf_counter() - t0,
              "peak_memory_gb": peak_memory_gb(device)}
    if args.profile:
        result["profile"] = {"variant": {"compile": kinds[-1], "mask_ratio": masks[-1]},
                             "ms_per_step_by_kind": by_kind, "device_gaps": gaps}
    if device.type == "cuda":  # what the allocator held: the figure that decides a fit
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    masked = max(masks)
    if 0.0 in masks and masked > 0:
        flop_ratio = (train_flops_per_image(cfg, mask_ratio=0.0)
                      / train_flops_per_image(cfg, mask_ratio=masked))
        result["masking"] = {}
        for kind in kinds:
            speedup = seconds[(kind, 0.0)] / seconds[(kind, masked)]
            result["masking"][kind] = {"speedup": speedup, "flop_ratio": flop_ratio,
                                       "fraction_of_flop_ratio": speedup / flop_ratio}
    if args.compile == "both":
        result["compile_speedup"] = {m: seconds[("eager", m)] / seconds[("compiled", m)]
                                     for m in masks}
    return result


def bench_checkpoint(args, cfg, device):
    """The training's wait for the snapshot a background checkpoint write needs (weights and
    Adam moments), two ways taking turns: copies into new CPU memory at each save (train.py
    before HostSnapshot: fresh pages, on CUDA pageable copies) against HostSnapshot's buffers
    made at the first save and reused (on CUDA pinned, the copies queued without the host
    waiting; timed to the queueing, the training's wait, and to the copies' landing)."""
    torch.manual_seed(0)
    raw = MicroDiT(cfg).to(device)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=1e-5, fused=True)
    for p in raw.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # the moments exist from here on
    optimizer.zero_grad(set_to_none=True)
    host = HostSnapshot(pin=device.type == "cuda")

    def new_memory():
        model = {k: v.detach().to("cpu", copy=True) for k, v in raw.state_dict().items()}
        moments = {i: {k: v.to("cpu", copy=True) for k, v in s.items()}
                   for i, s in optimizer.state_dict()["state"].items()}
        return model, moments

    def reused():
        snapshot = gathered(raw.state_dict(), True, host, "model."), optimizer_state(
            optimizer, True, host)
        host.mark_copied()
        return snapshot

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        queued = time.perf_counter() - t0
        host.wait()
        sync(device)
        return out, queued, time.perf_counter() - t0

    first = timed(reused)[2]  # makes (and on CUDA pins) the buffers
    times = {"new_memory_s": [], "reused_queued_s": [], "reused_landed_s": []}
    for _ in range(args.rounds):
        times["new_memory_s"].append(timed(new_memory)[2])
        (model, _), queued, landed = timed(reused)
        times["reused_queued_s"].append(queued)
        times["reused_landed_s"].append(landed)
    state = raw.state_dict()
    assert all(torch.equal(model[k], state[k].cpu()) for k in state)  # what was copied
    nbytes = sum(b.numel() * b.element_size() for b in host.buffers.values())
    return {"state_gb": nbytes / 1e9, "pinned": host.pin, "rounds": args.rounds,
            "reused_first_s": first,
            **{k: statistics.median(v) for k, v in times.items()}}


def bench_sampling(args, cfg, device, autocast):
    """Seconds per image of a full Heun run with guidance (both halves in one batch)."""
    torch.manual_seed(0)
    net = MicroDiT(cfg).to(device).eval()
    compiled = args.compile in ("on", "both")
    model = torch.compile(net, mode=args.compile_mode) if compiled else net
    noise, y = make_batch(cfg, args.sample_batch, device, seed=1)

    def run():
        with autocast:
            heun_sample(model, noise, y, args.sample_steps, guidance=5.0)
    s = alternate({"sample": run}, max(1, args.rounds // 4), 1, device)["sample"]
    return {"steps": args.sample_steps, "batch": args.sample_batch, "cfg": 5.0,
            "network_calls": 2 * args.sample_steps - 1, "seconds_per_batch": s,
            "seconds_per_image": s / args.sample_batch}


def attention_shapes(cfg, batch_size, mask_ratio):
    """(name, calls per step, batch, heads, query tokens, key tokens) of every attention in
    one forward of the model, grouped by shape."""
    T, L, hd = (cfg.input_size // cfg.patch_size) ** 2, 77, cfg.head_dim
    keep = num_kept(T, mask_ratio) if mask_ratio > 0 else T
    mixer_T = keep if cfg.mask_before_mixer else T
    shapes = {("caption self", L, L, cfg.dim // hd): 1}
    Dm, n = cfg.patch_mixer_dim, cfg.patch_mixer_depth
    if n:
        mixer_heads = qkv_hidden(Dm, cfg.patch_mixer_qkv_ratio, hd) // hd
        shapes[("mixer self", mixer_T, mixer_T, mixer_heads)] = n
        shapes[("mixer cross", mixer_T, L, Dm // hd)] = n
    for r in block_ratios(cfg.qkv_ratio, cfg.depth):
        key = ("backbone self", keep, keep, qkv_hidden(cfg.dim, r, hd) // hd)
        shapes[key] = shapes.get(key, 0) + 1
    shapes[("backbone cross", keep, L, cfg.dim // hd)] = cfg.depth
    return [(name, calls, batch_size, heads, tq, tk)
            for (name, tq, tk, heads), calls in shapes.items()]


def bench_attention(args, cfg, device, dtype):
    """Forward + backward time of scaled_dot_product_attention for each attention shape of
    the model, under each backend PyTorch has (a backend that refuses a shape is skipped)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = ["MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]
    rows = []
    for name, calls, N, H, tq, tk in attention_shapes(cfg, args.batch_size, max(args.masks)):
        q = torch.randn(N, H, tq, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(N, H, tk, cfg.head_dim, device=device, dtype=dtype,
                            requires_grad=True) for _ in range(2))
        grad = torch.randn_like(q)
        row = {"shape": name, "calls": calls, "q": [N, H, tq, cfg.head_dim], "keys": tk}
        for backend in backends:
            def run(backend=backend):
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                out.backward(grad)
            try:
                row[backend] = 1000 * alternate({"a": run}, args.rounds, args.warmup, device)["a"]
            except RuntimeError:  # "No available kernel": this backend refuses the shape
                row[backend] = None
        rows.append(row)
    return rows


def fake_shards(out, res, n, caption_dim, shard_size=4096):
    """Write n random samples (float16 latents [4, res/8, res/8], captions [77, caption_dim])
    as a prepared source, for timing the loader."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    starts = range(0, n, shard_size)
    for i, start in enumerate(starts):
        k = min(shard_size, n - start)
        columns = {f"latents_{res}": rng.standard_normal((k, 4, res // 8, res // 8),
                                                         np.float32).astype(np.float16),
                   CAPTION_COLUMN: rng.standard_normal((k, 77, caption_dim),
                                                       np.float32).astype(np.float16)}
        keys = [f"fake-{start + j}" for j in range(k)]
        write_shard(out, i, columns, keys, keys, "random", collections.Counter(seen=k))
    finish_index(out, len(starts), {"resolutions": [res], "pixel_space": False, "vae": None,
                                    "clip": None, "source_format": "fake"})


def bench_loader(data, res, batch_size, batches, fake_samples, caption_dim, prefetch, cache):
    """Loader throughput, printed and returned as a dict; with fake_samples, first writes
    that many random samples to data. cache 'warm': read the shards once first; 'cold':
    evict them from the page cache (posix_fadvise) and time only the rest of the first
    epoch, so every timed read comes from the disk; 'as-is': neither."""
    if fake_samples and not os.path.exists(os.path.join(data, "index.json")):
        if os.path.isdir(data) and os.listdir(data):  # a prepare in progress, or anything else
            raise ValueError(f"--fake-samples: {data} is not empty and holds no finished data "
                             f"set (no index.json); random samples go only into a new or "
                             f"empty folder, so give another --data")
        fake_shards(data, res, fake_samples, caption_dim)
    for path in glob.glob(os.path.join(data, "*.npy")) if cache != "as-is" else []:
        with open(path, "rb") as f:
            if cache == "cold":
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:  # warm: read it once, so the timed reads find it in the page cache
                while f.read(1 << 24):
                    pass
    loader = LatentLoader(data, res, batch_size, prefetch=prefetch)
    print(f"{data}: {sum(loader.num_samples):,} samples, latents {loader.latent_shape}, "
          f"captions {loader.caption_shape}, batch {batch_size}, prefetch {prefetch}, "
          f"{torch.get_num_threads()} torch threads")

    def rate(n):
        """(samples/s, ms/batch) over the next n batches."""
        t0 = time.perf_counter()
        for _ in range(n):
            next(loader)
        dt = time.perf_counter() - t0
        return n * batch_size / dt, dt / n * 1e3

    warmup = prefetch + 3  # every batch buffer the pool will hold gets allocated once here
    startup = rate(warmup)
    print(f"first {warmup} batches (start-up: buffer allocation, first mappings): "
          f"{startup[0]:,.0f} samples/s ({startup[1]:.1f} ms/batch)")
    if cache == "cold":  # the rest of the first epoch: a second one would hit the page cache
        batches = min(batches, sum(loader.num_samples) // batch_size - warmup)
    timed = rate(batches)
    print(f"next {batches} batches, page cache {cache}: {timed[0]:,.0f} samples/s "
          f"({timed[1]:.1f} ms/batch)")
    loader.close()
    return {"batch": batch_size, "prefetch": prefetch, "cache": cache,
            "startup_batches": warmup, "startup_samples_per_s": startup[0],
            "batches": batches, "samples_per_s": timed[0], "ms_per_batch": timed[1]}



def bench_data(args):
    """Loader samples/s on --data, or on 4 x --data-batch random samples written to a
    temporary folder."""
    run = functools.partial(bench_loader, res=args.res, batch_size=args.data_batch,
                            batches=args.data_batches, caption_dim=args.caption_dim,
                            prefetch=args.prefetch, cache=args.cache)
    if args.data:
        return run(args.data, fake_samples=args.fake_samples)
    with tempfile.TemporaryDirectory() as folder:
        return run(folder, fake_samples=args.fake_samples or 4 * args.data_batch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, choices=PRESETS, help="default MicroDiT_Tiny_2")
    p.add_argument("--phase", type=int, default=1, choices=PHASES,
                   help="takes P_mean/P_std, grad clip and the mask ratio from this phase")
    p.add_argument("--res", type=int, help="image resolution, latents res / 8 (default 256)")
    p.add_argument("--batch-size", type=int, help="default 8")
    p.add_argument("--masks", type=float, nargs="+", help="mask ratios to time (default: 0 and "
                                                           "the phase's; the masking speedup "
                                                           "compares 0 with the largest)")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    p.add_argument("--inductor", default="{}", help="JSON of torch._inductor.config settings, "
                                                    "as train.py's")
    p.add_argument("--model", default="{}", help="JSON of DiTConfig overrides, e.g. "
                                                 "'{\"depth\": 8}' to try a change on fewer "
                                                 "blocks, which compile faster")
    p.add_argument("--dtype", choices=PRECISIONS, default="auto",
                   help="auto: bfloat16 autocast on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, help="timed steps per variant (default 8)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (default 2)")
    p.add_argument("--sample-steps", type=int, help="default 30")
    p.add_argument("--sample-batch", type=int, help="default 8")
    p.add_argument("--data-batch", type=int, help="default 2048")
    p.add_argument("--data", help="time the loader on this prepared folder (default: random "
                   "latents in a temporary folder)")
    p.add_argument("--fake-samples", type=int, default=0, help="first write this many random "
                   "samples to --data, if it has no index.json (default without --data: 4 x "
                   "--data-batch)")
    p.add_argument("--data-batches", type=int, default=3, help="timed loader batches")
    p.add_argument("--prefetch", type=int, default=0, help="loader batches made ahead")
    p.add_argument("--caption-dim", type=int, default=1024, help="random captions' width")
    p.add_argument("--cache", choices=["warm", "cold", "as-is"], default="warm",
                   help="warm: read the data once first; cold: evict it from the page cache "
                   "and time the rest of the first epoch only, so reads come from the disk")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "sample", "data"])
    p.add_argument("--attention", action="store_true", help="time each attention shape of the "
                                                            "model under every SDPA backend")
    p.add_argument("--checkpoint", action="store_true", help="time the checkpoint snapshot: "
                   "new CPU memory per save against train.py's reused (on CUDA pinned) buffers")
    p.add_argument("--profile", action="store_true", help="profile two training steps first "
                                                           "(the last variant): the top "
                                                           "operators and the time by kind")
    p.add_argument("--trace", metavar="FILE.json.gz", help="profile as --profile does and "
                   "write the timeline (host Python, operators, kernels) for ui.perfetto.dev")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--max-memory-gb", type=float, help="CUDA: refuse allocations beyond this, "
                                                       "to check a fit on a smaller card")
    p.add_argument("--quick", action="store_true", help="CI smoke run: MicroDiT_CPU_2, 16x16 "
                                                        "input, 2 rounds, 3 sampling steps "
                                                        "(flags given as well still count)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():  # flags given win
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.masks = sorted(set(args.masks or [0.0, PHASES[args.phase]["mask_ratio"]]))
    args.profile = args.profile or bool(args.trace)
    try:
        if not all(0 <= m < 1 for m in args.masks):
            raise ValueError(f"--masks {args.masks}: each must be in [0, 1) (at least one "
                             f"patch must stay)")
        set_inductor_options(inductor_options(json_flag("--inductor", args.inductor)))
        overrides = model_overrides(args.model)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    device = torch.device(args.device)
    cfg = dataclasses.replace(PRESETS[args.preset], input_size=args.res // 8, **overrides)
    autocast, dtype = precision(device, args.dtype)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads")
    if args.max_memory_gb:
        cap_memory(device, args.max_memory_gb)
    with torch.device("meta"):  # counts without allocating
        params = count_params(MicroDiT(cfg))
    results = {"preset": args.preset, "model": json.loads(args.model), "params": params,
               "phase": args.phase, "compile_mode": args.compile_mode,
               "inductor": json.loads(args.inductor),
               "latent": f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}",
               "batch_size": args.batch_size, "dtype": str(dtype),
               "device": machine, "torch": torch.__version__,
               "peak_tflops": peak / 1e12 if peak else None,
               "max_memory_gb": args.max_memory_gb,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(results))
    if args.attention:
        results["attention"] = bench_attention(args, cfg, device, dtype)
        names = ["MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]
        print("attention, forward + backward, ms per call: shape, calls per step, q shape, "
              "keys, " + ", ".join(names))
        for row in results["attention"]:
            times = ", ".join("-" if row[b] is None else f"{row[b]:.3f}" for b in names)
            print(f"  {row['shape']}, {row['calls']}, {row['q']}, {row['keys']}: {times}")
    if args.checkpoint:
        results["checkpoint"] = c = bench_checkpoint(args, cfg, device)
        how = "pinned, queued without waiting" if c["pinned"] else "copied"
        print(f"checkpoint snapshot of {c['state_gb']:.2f} GB (weights, Adam moments), median "
              f"of {c['rounds']}: new memory per save {c['new_memory_s']:.3f} s; reused "
              f"buffers ({how}) {c['reused_queued_s']:.3f} s, landed {c['reused_landed_s']:.3f}"
              f" s; the first save, making them: {c['reused_first_s']:.3f} s")
    if "train" not in args.skip:
        results["train"] = bench_training(args, cfg, device, autocast, peak)
        for row in results["train"]["rows"]:
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else ""
            print(f"train {row['compile']:8s} mask {row['mask_ratio']:.2f}: "
                  f"{row['ms_per_step']:8.1f} ms/step, {row['images_per_s']:8.1f} images/s, "
                  f"{row['tflops_per_s']:.3f} TFLOP/s{mfu}")
        for kind, m in results["train"].get("masking", {}).items():
            print(f"masking {max(args.masks)} ({kind}): step {m['speedup']:.2f}x faster, "
                  f"FLOPs {m['flop_ratio']:.2f}x fewer: {100 * m['fraction_of_flop_ratio']:.0f}% "
                  f"of the FLOP ratio")
        for m, s in results["train"].get("compile_speedup", {}).items():
            print(f"torch.compile at mask {m}: {s:.2f}x eager")
        reserved = results["train"].get("peak_reserved_gb")
        print(f"peak memory {results['train']['peak_memory_gb']:.2f} GiB"
              + (f" allocated, {reserved:.2f} GiB reserved" if reserved else ""))
    if "sample" not in args.skip:
        results["sample"] = bench_sampling(args, cfg, device, autocast)
        s = results["sample"]
        print(f"sampling: {s['steps']} Heun steps, cfg 5, batch {s['batch']}: "
              f"{s['seconds_per_image']:.3f} s per image")
    if "data" not in args.skip:
        results["data"] = bench_data(args)
        print(f"data loader: {results['data']['samples_per_s']:,.0f} samples/s "
              f"(batch {args.data_batch}, {args.res}px latents, {args.caption_dim}-wide "
              f"captions, page cache {args.cache})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
