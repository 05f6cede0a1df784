"""python docs/bench/clip_in_optimizer.py [PRESET]

Optimizer step with the clip as before (clip_grad_norm_, then fused AdamW) against
train.clip_in_optimizer (the clip inside the fused AdamW), interleaved, medians."""
import statistics, sys, time
import torch
sys.path.insert(0, ".")  # run from the repository root
from model import PRESETS, MicroDiT, count_params
from train import clip_in_optimizer

preset = sys.argv[1] if len(sys.argv) > 1 else "MicroDiT_Tiny_2"
torch.manual_seed(0)
nets = [MicroDiT(PRESETS[preset]) for _ in range(2)]
opts = [torch.optim.AdamW(n.parameters(), lr=1e-4, fused=True) for n in nets]
for n in nets:
    for p in n.parameters():
        p.grad = torch.randn_like(p)

def before():
    norm = torch.nn.utils.clip_grad_norm_(nets[0].parameters(), 0.25)
    opts[0].found_inf = (~torch.isfinite(norm)).float()
    opts[0].step()

def after():
    clip_in_optimizer(opts[1], 0.25)
    opts[1].step()

times = {"clip_grad_norm_ + AdamW": [], "clip inside AdamW": []}
for r in range(23):
    for name, fn in zip(times, (before, after)):
        t0 = time.perf_counter(); fn(); dt = time.perf_counter() - t0
        if r >= 3:
            times[name].append(dt)
print(f"{preset}: {count_params(nets[0]):,} parameters, {torch.get_num_threads()} threads")
for name, t in times.items():
    print(f"  {name}: {1000 * statistics.median(t):.1f} ms (median of {len(t)})")
