"""MicroDiT: the diffusion transformer of "Stretching Each Dollar" (arXiv 2407.15811).

A DiT conditioned on caption token features, with a patch-mixer before (deferred) patch
masking, layer-wise scaling of attention and MLP widths, and expert-choice MoE in every
second block. Parameter names and shapes match the released checkpoints exactly, so
`net.load_state_dict(torch.load(ckpt, weights_only=True))` just works.

    net(x, t, y, mask_ratio=0.0, ids_keep=None, generator=None) -> (out, mask)

x [N, C, H, W] latents, t [N] EDM noise conditioning c_noise, y [N, 1, L, Dc] or
[N, L, Dc] caption features. out has x's shape; mask [N, T] is 1 where a patch was removed
(None when nothing was masked). The kept patches are ids_keep when given, else drawn
with `generator` (the training step's, which also drew the loss's noise).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mixer import PatchMixer, keep_tokens, num_kept, random_ids_keep, removed_mask, restore_tokens
from moe import ExpertChoiceMoE, TokenChoiceMoE, num_slots_per_expert, num_tokens_per_expert


@dataclass
class DiTConfig:
    input_size: int = 32                # latent height/width the pos_embed is built for
    patch_size: int = 2
    in_channels: int = 4
    dim: int = 512
    depth: int = 16
    head_dim: int = 32
    multiple_of: int = 256              # MLP hidden widths are rounded up to this
    caption_channels: int = 1024
    pos_interp_scale: float = 1.0       # 1.0 at 256px, 2.0 at 512px
    norm_eps: float = 1e-6
    qkv_ratio: tuple = (0.5, 1.0)       # layer-wise scaling: linspace(first, last, depth)
    mlp_ratio: tuple = (0.5, 4.0)
    patch_mixer_depth: int = 4          # 0: no mixer (masking right after patch embedding)
    patch_mixer_dim: int = 512
    patch_mixer_qkv_ratio: float = 1.0
    patch_mixer_mlp_ratio: float = 4.0
    use_bias: bool = False
    num_experts: int = 8                # 0: no MoE blocks
    expert_capacity: float = 2.0
    experts_every_n: int = 2
    # ablation switches (not in the released configs)
    mask_before_mixer: bool = False     # "naive" masking: drop patches before the mixer
    moe_routing: str = "expert_choice"  # or "token_choice" (top-k, load-balancing loss)
    moe_top_k: int = 2                  # experts per token for token_choice

    @classmethod
    def from_dict(cls, d):
        """Build from a dict such as the released JSON configs; unknown keys (EDM
        constants, ...) are ignored."""
        names = {f.name for f in cls.__dataclass_fields__.values()}
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("qkv_ratio", "mlp_ratio"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


PRESETS = {
    "MicroDiT_Tiny_2": DiTConfig(dim=512, depth=16, head_dim=32, patch_mixer_depth=4,
                                 patch_mixer_dim=512),
    "MicroDiT_XL_2": DiTConfig(dim=1024, depth=28, head_dim=64, patch_mixer_depth=6,
                               patch_mixer_dim=768),
    # small enough to train on a laptop CPU in minutes (demos and tests)
    "MicroDiT_CPU_2": DiTConfig(input_size=16, dim=128, depth=4, head_dim=32,
                                multiple_of=32, caption_channels=256, patch_mixer_depth=1,
                                patch_mixer_dim=128, num_experts=4),
}


def linspace(first, last, n):
    """numpy.linspace in plain Python, to the same last bit, so the block widths derived
    with int(d * ratio) are those of the released models."""
    if n == 1:
        return [float(first)]
    step = (last - first) / (n - 1)
    return [i * step + first for i in range(n - 1)] + [float(last)]


def block_ratios(ratio, depth):
    """Per-block multipliers: two values are the ends of a linspace over the blocks (the
    paper's layer-wise scaling); `depth` values are taken as they are; otherwise each value
    covers an equal run of blocks."""
    ratio = [float(r) for r in (ratio if isinstance(ratio, (list, tuple)) else [ratio])]
    if len(ratio) == 2 and depth != 2:
        return linspace(ratio[0], ratio[1], depth)
    if depth % len(ratio):
        raise ValueError(f"{len(ratio)} multipliers cannot be spread evenly over {depth} blocks")
    return [r for r in ratio for _ in range(depth // len(ratio))]


def round_up(n, multiple):
    return multiple * ((n + multiple - 1) // multiple)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim, grid_size, base_size, interp_scale):
    """Fixed 2-D sin-cos embedding [grid_size**2, dim]. Coordinates are rescaled to the
    `base_size` grid and divided by `interp_scale`, so a 512px model sees the positions of
    the 256px model it was fine-tuned from."""
    coords = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)
    coords = (coords / interp_scale).double()
    grid_x, grid_y = torch.meshgrid(coords, coords, indexing="xy")      # (g, g) each
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos):
        out = pos.reshape(-1, 1) * omega                                # (g*g, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)       # (g*g, dim/2)

    return torch.cat([encode(grid_x), encode(grid_y)], dim=1).float()   # (g*g, dim)


def pos_embed_of(cfg):
    """The model's fixed position embedding [1, T, D] for cfg's input size and scale."""
    grid = cfg.input_size // cfg.patch_size
    return sincos_pos_embed(cfg.dim, grid, grid, cfg.pos_interp_scale).unsqueeze(0)


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                             # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)        # (N, dim)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> LayerNorm -> fc2, for the caption and pooled-caption paths."""

    def __init__(self, in_dim, dim, eps):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps, bias=False)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(self.norm(F.gelu(self.fc1(x), approximate="tanh")))


class TimestepEmbedder(nn.Module):
    freq_dim = 512

    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.freq_dim, dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_dim, dim, eps):
        super().__init__()
        self.y_proj = Mlp(caption_dim, dim, eps)

    def forward(self, y):
        return self.y_proj(y)


def qk_norm(x, eps):
    # over the full attention width, not per head, as in the released models
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def attention(q, k, v, heads):
    """q [N, Tq, h], k and v [N, Tk, h] -> [N, Tq, h] with `heads` heads."""
    N, Tq, h = q.shape
    q, k, v = (z.view(N, -1, heads, h // heads) for z in (q, k, v))     # (N, T, H, hd) each
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))                    # (N, H, T, hd) each
    out = F.scaled_dot_product_attention(q, k, v)                       # (N, H, Tq, hd)
    return out.transpose(1, 2).reshape(N, Tq, h)                        # (N, Tq, h)


class SelfAttention(nn.Module):
    def __init__(self, dim, hidden, head_dim, eps, bias):
        super().__init__()
        self.heads, self.eps = hidden // head_dim, eps
        self.qkv = nn.Linear(dim, 3 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)                          # (N, T, h) each
        return self.proj(attention(qk_norm(q, self.eps), qk_norm(k, self.eps), v, self.heads))


class CrossAttention(nn.Module):
    def __init__(self, dim, head_dim, eps, bias):
        super().__init__()
        self.heads, self.eps = dim // head_dim, eps
        self.q_linear = nn.Linear(dim, dim, bias=bias)
        self.kv_linear = nn.Linear(dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, y):
        q = self.q_linear(x)                                            # (N, T, d)
        k, v = self.kv_linear(y).chunk(2, dim=-1)                       # (N, L, d) each
        return self.proj(attention(qk_norm(q, self.eps), qk_norm(k, self.eps), v, self.heads))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def swiglu_hidden(dim, ratio, multiple_of):
    # 2/3 keeps the parameter count of a GELU MLP of the same ratio
    return round_up(int(2 * int(dim * ratio) / 3), multiple_of)


def moe_hidden(dim, ratio, multiple_of):
    # the experts are GELU MLPs, so no 2/3
    return round_up(int(dim * ratio), multiple_of)


def qkv_hidden(dim, ratio, head_dim):
    if ratio == 1:
        return dim
    return round_up(int(dim * ratio), 2 * head_dim)


class CaptionBlock(nn.Module):
    """One pre-norm transformer block that refines the projected caption tokens."""

    def __init__(self, dim, head_dim, multiple_of, eps, bias):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn = SelfAttention(dim, dim, head_dim, eps, bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, 4.0, multiple_of), bias)

    def forward(self, y):
        y = y + self.attn(self.norm1(y))
        return y + self.mlp(self.norm2(y))


class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, un-gated cross-attention to the caption, and a
    gated dense SwiGLU or MoE MLP."""

    def __init__(self, cfg, dim, qkv_ratio, mlp_ratio, moe):
        super().__init__()
        eps, bias = cfg.norm_eps, cfg.use_bias
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn = SelfAttention(dim, qkv_hidden(dim, qkv_ratio, cfg.head_dim), cfg.head_dim,
                                  eps, bias)
        self.cross_attn = CrossAttention(dim, cfg.head_dim, eps, bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.norm3 = nn.LayerNorm(dim, eps=eps, bias=False)
        if not moe:
            self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio, cfg.multiple_of), bias)
        elif cfg.moe_routing == "expert_choice":
            self.mlp = ExpertChoiceMoE(dim, moe_hidden(dim, mlp_ratio, cfg.multiple_of),
                                       cfg.num_experts, cfg.expert_capacity)
        elif cfg.moe_routing == "token_choice":
            self.mlp = TokenChoiceMoE(dim, moe_hidden(dim, mlp_ratio, cfg.multiple_of),
                                      cfg.num_experts, cfg.expert_capacity, cfg.moe_top_k)
        else:
            raise ValueError(f"moe_routing must be 'expert_choice' or 'token_choice', "
                             f"got {cfg.moe_routing!r}")
        self.adaLN_modulation = nn.Sequential(nn.GELU(approximate="tanh"),
                                              nn.Linear(cfg.dim, 6 * dim))

    def forward(self, x, y, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1))                   # (N, d) each
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm2(x), y)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim, eps):
        super().__init__()
        # definition order matches the released state_dict
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.GELU(approximate="tanh"),
                                              nn.Linear(dim, 2 * dim))
        self.norm_final = nn.LayerNorm(dim, eps=eps, bias=False)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def is_moe_backbone_block(cfg, i):
    return cfg.num_experts > 0 and (i + 1) % cfg.experts_every_n == 0 and i < cfg.depth - 1


def is_moe_mixer_block(cfg, i):
    return cfg.num_experts > 0 and i >= 1 and (i + 1) % cfg.experts_every_n == 0


def mixer_projection(cfg, in_dim, out_dim):
    """LayerNorm + Linear between backbone and mixer widths; identity when they agree."""
    if cfg.patch_mixer_dim == cfg.dim:
        return nn.Identity()
    return nn.Sequential(nn.LayerNorm(in_dim, eps=cfg.norm_eps, bias=False),
                         nn.Linear(in_dim, out_dim, bias=cfg.use_bias))


class MicroDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        # train.py --activation-checkpointing: keep only each block's input for the backward
        # and recompute the rest, about a third more compute for much less memory
        self.activation_checkpointing = False
        D, p, C = cfg.dim, cfg.patch_size, cfg.in_channels
        self.register_buffer("pos_embed", pos_embed_of(cfg))            # (1, T, D)
        self.register_buffer("mask_token", torch.zeros(1, 1, p * p * C))
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, D, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, D, cfg.norm_eps)
        self.y_emb_preprocess = CaptionBlock(D, cfg.head_dim, cfg.multiple_of, cfg.norm_eps,
                                             cfg.use_bias)
        self.pooled_y_emb_process = Mlp(D, D, cfg.norm_eps)

        if cfg.patch_mixer_depth > 0:
            Dm = cfg.patch_mixer_dim
            self.patch_mixer = PatchMixer([
                DiTBlock(cfg, Dm, cfg.patch_mixer_qkv_ratio, cfg.patch_mixer_mlp_ratio,
                         moe=is_moe_mixer_block(cfg, i))
                for i in range(cfg.patch_mixer_depth)])
            self.patch_mixer_map_xin = mixer_projection(cfg, D, Dm)
            self.patch_mixer_map_xout = mixer_projection(cfg, Dm, D)
            self.patch_mixer_map_y = mixer_projection(cfg, D, Dm)

        qkv_ratios = block_ratios(cfg.qkv_ratio, cfg.depth)
        mlp_ratios = block_ratios(cfg.mlp_ratio, cfg.depth)
        self.blocks = nn.ModuleList([
            DiTBlock(cfg, D, qkv_ratios[i], mlp_ratios[i], moe=is_moe_backbone_block(cfg, i))
            for i in range(cfg.depth)])
        self.final_layer = FinalLayer(D, p * p * C, cfg.norm_eps)
        self.initialize_weights()

    def initialize_weights(self):
        cfg = self.cfg
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # the patch embedding is a Linear applied to each patch: initialise it as one
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))                 # (D, C*p*p)
        nn.init.zeros_(self.x_embedder.proj.bias)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2],
                       self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2,
                       self.pooled_y_emb_process.fc1, self.pooled_y_emb_process.fc2):
            nn.init.normal_(linear.weight, std=0.02)

        def init_block(block, out_std):
            # inputs std 0.02; outputs shrink with depth so the residual stream stays tame
            mlp, attn = block.mlp, block.attn
            inputs, outputs = [attn.qkv.weight], [attn.proj.weight]
            if isinstance(mlp, SwiGLU):
                inputs += [mlp.w1.weight]
                outputs += [mlp.w2.weight, mlp.w3.weight]
            else:
                inputs += [mlp.gate.weight, mlp.w1]
                outputs += [mlp.w2]
            if isinstance(block, DiTBlock):
                inputs += [block.cross_attn.q_linear.weight, block.cross_attn.kv_linear.weight]
                outputs += [block.cross_attn.proj.weight]
            for weight in inputs:
                nn.init.trunc_normal_(weight, std=0.02)
            for weight in outputs:
                nn.init.trunc_normal_(weight, std=out_std)

        for i, block in enumerate(self.blocks):
            init_block(block, 0.02 / math.sqrt(2 * (i + 1)))
        for block in getattr(self, "patch_mixer", []):
            init_block(block, 0.02 / math.sqrt(2 * cfg.depth))
        init_block(self.y_emb_preprocess, 0.02)

        # zero-inits: every block starts as the identity and the output as 0
        for block in [*self.blocks, *getattr(self, "patch_mixer", [])]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.y_emb_preprocess.attn.proj.weight)
        nn.init.zeros_(self.y_emb_preprocess.mlp.w3.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.linear.weight)

    def forward(self, x, t, y, mask_ratio=0.0, ids_keep=None, generator=None):
        cfg = self.cfg
        N, C, H, W = x.shape
        p = cfg.patch_size
        h, w = H // p, W // p
        T = h * w
        if T != self.pos_embed.shape[1]:
            raise ValueError(f"input {H}x{W} gives {T} patches but the model was built for "
                             f"input_size {cfg.input_size} ({self.pos_embed.shape[1]} patches); "
                             f"build it with input_size={H}")
        if y.dim() == 4:
            y = y.squeeze(1)                                            # (N, L, Dc)

        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2)          # (N, T, D)
        x = x + self.pos_embed
        y = self.y_emb_preprocess(self.y_embedder(y))                   # (N, L, D)
        t = t.reshape(-1).expand(N)                                     # (N,); t may be one scalar
        t_emb = self.t_embedder(t)                                      # (N, D)
        c = t_emb + self.pooled_y_emb_process(y.mean(1))                # (N, D)

        if ids_keep is None and mask_ratio > 0:
            ids_keep = random_ids_keep(N, T, mask_ratio, x.device, generator)
        has_mixer = cfg.patch_mixer_depth > 0
        mask_early = ids_keep is not None and (not has_mixer or cfg.mask_before_mixer)
        if mask_early:
            x = keep_tokens(x, ids_keep)                                # (N, keep, D)
        if has_mixer:
            x = self.run(self.patch_mixer, self.patch_mixer_map_xin(x),
                         self.patch_mixer_map_y(y), c)
            if ids_keep is not None and not mask_early:
                x = keep_tokens(x, ids_keep)                            # (N, keep, Dm)
            x = self.patch_mixer_map_xout(x)                            # (N, keep, D)

        for block in self.blocks:
            x = self.run(block, x, y, c)                                # (N, keep, D)
        x = self.final_layer(x, c)                                      # (N, keep, p*p*C)

        mask = None
        if ids_keep is not None:
            x = restore_tokens(x, ids_keep, self.mask_token, T)         # (N, T, p*p*C)
            mask = removed_mask(ids_keep, T)
        x = x.view(N, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)          # (N, C, h, p, w, p)
        return x.reshape(N, C, H, W), mask                              # (N, C, H, W)

    def run(self, block, *inputs):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    def aux_loss(self):
        """Sum of the token-choice load-balancing losses of the last forward (0 when the
        model has none)."""
        losses = [m.aux_loss for m in self.modules()
                  if isinstance(m, TokenChoiceMoE) and m.aux_loss is not None]
        return sum(losses) if losses else torch.zeros((), device=self.pos_embed.device)


def check_mask_ratio(cfg, mask_ratio):
    """Refuses a mask ratio that would keep none of cfg's patches (num_kept rounds down)."""
    T = (cfg.input_size // cfg.patch_size) ** 2
    if mask_ratio > 0 and num_kept(T, mask_ratio) < 1:
        largest = (T - 1) / T
        while num_kept(T, largest) < 1:  # (T - 1) / T can round below one kept patch
            largest = math.nextafter(largest, 0)
        raise ValueError(f"mask ratio {mask_ratio} keeps none of the {T} patches of a "
                         f"{cfg.input_size} x {cfg.input_size} input in {cfg.patch_size} x "
                         f"{cfg.patch_size} patches; the largest ratio that keeps one is "
                         f"{largest!r}")


PRECISIONS = ("auto", "float32", "bfloat16")


def precision(device, dtype="auto"):
    """The project's one precision rule, for training, sampling and benchmarks: bf16 autocast
    on CUDA and float32 elsewhere ('auto'), or as asked. Returns (autocast context or a null
    one, the compute dtype); weights stay float32 either way."""
    if dtype not in PRECISIONS:
        raise ValueError(f"precision {dtype!r}: choose from {', '.join(PRECISIONS)}")
    device = torch.device(device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if dtype == torch.float32:
        return nullcontext(), dtype
    return torch.autocast(device.type, dtype=dtype), dtype


def count_params(net):
    return sum(p.numel() for p in net.parameters())


def forward_flops(cfg: DiTConfig, input_size=None, mask_ratio=0.0, caption_len=77):
    """Matmul and attention FLOPs (2 per multiply-add) of one forward pass for one image.
    Norms, activations and softmax are left out, as is usual for MFU."""
    size = input_size or cfg.input_size
    p, C, D, L = cfg.patch_size, cfg.in_channels, cfg.dim, caption_len
    T = (size // p) ** 2
    keep = num_kept(T, mask_ratio) if mask_ratio > 0 else T
    has_mixer = cfg.patch_mixer_depth > 0
    mixer_tokens = keep if cfg.mask_before_mixer else T

    def block(d, n, qkv_ratio, mlp_ratio, moe):
        hq = qkv_hidden(d, qkv_ratio, cfg.head_dim)
        f = 2 * D * 6 * d                                   # adaLN
        f += 2 * n * d * 3 * hq + 4 * n * n * hq + 2 * n * hq * d   # self-attention
        f += 4 * n * d * d + 4 * L * d * d + 4 * n * L * d          # cross-attention
        if not moe:
            f += 6 * n * d * swiglu_hidden(d, mlp_ratio, cfg.multiple_of)
        else:
            hidden = moe_hidden(d, mlp_ratio, cfg.multiple_of)
            E = cfg.num_experts
            routed = (E * num_tokens_per_expert(cfg.expert_capacity, n, E)
                      if cfg.moe_routing == "expert_choice"
                      else E * num_slots_per_expert(cfg.expert_capacity, n * cfg.moe_top_k, E))
            f += 2 * n * d * E + 4 * routed * d * hidden
        return f

    f = 2 * T * C * p * p * D                               # patch embedding
    f += 2 * (TimestepEmbedder.freq_dim * D + D * D)        # timestep MLP
    f += 2 * L * (cfg.caption_channels * D + D * D)         # caption projection
    hp = swiglu_hidden(D, 4.0, cfg.multiple_of)
    f += 2 * L * 4 * D * D + 4 * L * L * D + 6 * L * D * hp  # caption refinement block
    f += 2 * 2 * D * D                                      # pooled caption MLP
    if has_mixer:
        Dm = cfg.patch_mixer_dim
        if Dm != D:
            f += 2 * D * Dm * (mixer_tokens + L + keep)
        for i in range(cfg.patch_mixer_depth):
            f += block(Dm, mixer_tokens, cfg.patch_mixer_qkv_ratio, cfg.patch_mixer_mlp_ratio,
                       is_moe_mixer_block(cfg, i))
    qkv_ratios = block_ratios(cfg.qkv_ratio, cfg.depth)
    mlp_ratios = block_ratios(cfg.mlp_ratio, cfg.depth)
    for i in range(cfg.depth):
        f += block(D, keep, qkv_ratios[i], mlp_ratios[i], is_moe_backbone_block(cfg, i))
    f += 2 * D * 2 * D + 2 * keep * D * p * p * C          # final layer
    return f


def train_flops_per_image(cfg: DiTConfig, input_size=None, mask_ratio=0.0, caption_len=77):
    """Forward + backward ~ 3x forward (the backward computes two matmuls per forward one)."""
    return 3 * forward_flops(cfg, input_size, mask_ratio, caption_len)
