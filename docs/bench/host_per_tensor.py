"""python docs/bench/host_per_tensor.py [PRESET]

The host's share of the step's edges: the grad norm with the clip factor
(train.clip_in_optimizer), the fused AdamW step and zero_grad, timed on one-element
tensors as many as the preset has parameter tensors, so that what is left is the work per
tensor (Python, dispatch, grouping), not the arithmetic. On a GPU this host time is spent
while the device finishes the backward; where it is longer, the device waits. Medians of 30."""
import statistics, sys, time
import torch
sys.path.insert(0, ".")  # run from the repository root
from model import PRESETS, MicroDiT
from train import clip_in_optimizer

preset = sys.argv[1] if len(sys.argv) > 1 else "MicroDiT_XL_2"
with torch.device("meta"):  # the parameter list without allocating it
    count = len(list(MicroDiT(PRESETS[preset]).parameters()))
params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(count)]
optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)


def step():
    for p in params:
        p.grad = torch.ones(1)
    t0 = time.perf_counter()
    clip_in_optimizer(optimizer, 0.25)
    t1 = time.perf_counter()
    optimizer.step()
    t2 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


for _ in range(5):
    step()
times = [step() for _ in range(30)]
print(f"{preset}: {count} parameter tensors, {torch.__version__}, {torch.get_num_threads()} threads")
for i, name in enumerate(["grad norm and clip factor", "fused AdamW step", "zero_grad"]):
    print(f"  {name}: {1000 * statistics.median(t[i] for t in times):.2f} ms")
