"""Mixture-of-experts feed-forward layers.

ExpertChoiceMoE is the paper's layer: every expert picks its top-k tokens (Zhou et al.
2022), so the load is balanced by construction and no auxiliary loss is needed. A token
may be picked by several experts or by none.

TokenChoiceMoE is the usual alternative (every token picks its top-k experts, GShard /
Switch style, with a capacity limit and the load-balancing auxiliary loss). The paper
leaves open which is better; it is here so the two can be compared.

Both dispatch tokens with index_select and combine them with index_add_: memory is
O(tokens routed x D), never the one-hot [N, E, k, T] tensors of the released code.

The expert weights are left uninitialised here; MicroDiT.initialize_weights sets them.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def num_tokens_per_expert(capacity, num_tokens, num_experts):
    """Expert choice: how many of an image's tokens each expert picks."""
    return int(capacity * num_tokens / num_experts)


def num_slots_per_expert(capacity, num_routed, num_experts):
    """Token choice: how many of an image's token-to-expert assignments each expert serves;
    rounded up so that a capacity of 1.0 drops nothing when the load is balanced."""
    return math.ceil(capacity * num_routed / num_experts)


class MoE(nn.Module):
    """What both routings share: the router and E independent GELU MLPs."""

    def __init__(self, dim, hidden, num_experts, capacity):
        super().__init__()
        self.num_experts = num_experts
        self.capacity = capacity
        # parameter order (w1, w2, then gate) matches the released state_dict
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def experts(self, x_in):
        """x_in [E, n, D], row e holding expert e's tokens -> [E, n, D]."""
        return torch.bmm(F.gelu(torch.bmm(x_in, self.w1)), self.w2)


class ExpertChoiceMoE(MoE):
    def forward(self, x):
        N, T, D = x.shape
        E = self.num_experts
        tokens_per_expert = num_tokens_per_expert(self.capacity, T, E)         # k in shape comments
        probs = F.softmax(self.gate(x), dim=-1)                                # (N, T, E)
        scores = probs.transpose(1, 2)                                         # (N, E, T)
        gates, ids_token = torch.topk(scores, tokens_per_expert, dim=-1)       # (N, E, k)
        # row of each chosen token in x viewed as (N*T, D), expert-major so that every
        # expert's tokens are contiguous for the batched matmul
        offsets = torch.arange(N, device=x.device).view(N, 1, 1) * T           # (N, 1, 1)
        rows = (ids_token + offsets).transpose(0, 1).reshape(-1)               # (E*N*k,)
        x_in = x.reshape(N * T, D).index_select(0, rows)                       # (E*N*k, D)
        x_in = x_in.view(E, N * tokens_per_expert, D)                          # (E, N*k, D)
        gates = gates.transpose(0, 1).reshape(E, N * tokens_per_expert, 1)     # (E, N*k, 1)
        h = self.experts(x_in) * gates                                         # (E, N*k, D)
        out = torch.zeros_like(x).view(N * T, D)                               # (N*T, D)
        out.index_add_(0, rows, h.reshape(-1, D).to(out.dtype))                # h: (E*N*k, D)
        return out.view(N, T, D)                                               # (N, T, D)


class TokenChoiceMoE(MoE):
    """Top-k routing per token with a capacity per expert and image; overflowing tokens are
    dropped (their MLP output is 0). Each image is its own routing group, as each sequence
    is for expert-choice: an image's output never depends on the other images of the batch
    (nor, when sampling with guidance, on its other half). After each forward, `aux_loss`
    holds the Switch-Transformer load-balancing loss E * sum_e f_e P_e (1.0 when perfectly
    balanced)."""

    def __init__(self, dim, hidden, num_experts, capacity, top_k):
        super().__init__(dim, hidden, num_experts, capacity)
        self.top_k = top_k
        self.aux_loss = None

    def forward(self, x):
        N, T, D = x.shape
        E, K = self.num_experts, self.top_k
        slots_per_expert = num_slots_per_expert(self.capacity, T * K, E)       # S in shape comments
        num_slots = E * N * slots_per_expert
        probs = F.softmax(self.gate(x), dim=-1)                                # (N, T, E)
        gates, ids_expert = torch.topk(probs, K, dim=-1)                       # (N, T, K)
        gates = gates / gates.sum(dim=-1, keepdim=True)

        # choice-major order within each image: its tokens' first choices are served
        # before any second one
        ids_expert = ids_expert.transpose(1, 2).reshape(N, K * T)              # (N, K*T)
        gates = gates.transpose(1, 2).reshape(N, K * T)                        # (N, K*T)
        image = torch.arange(N, device=x.device).view(N, 1)                    # (N, 1)
        token = torch.arange(T, device=x.device).repeat(K)                     # (K*T,)
        rows = (image * T + token).reshape(-1)                                 # (N*K*T,)
        onehot = F.one_hot(ids_expert, E)                                      # (N, K*T, E)
        position = (onehot.cumsum(1) * onehot).sum(-1) - 1                     # slot within expert
        kept = position < slots_per_expert
        # slots laid out (E, N, S); dropped assignments all write to one spare slot that
        # is never read back
        slot = torch.where(kept, (ids_expert * N + image) * slots_per_expert + position,
                           num_slots).reshape(-1)                              # (N*K*T,)

        x_flat = x.reshape(N * T, D)                                           # (N*T, D)
        x_in = x.new_zeros(num_slots + 1, D).index_add_(0, slot, x_flat[rows])
        x_in = x_in[:-1].view(E, N * slots_per_expert, D)                      # (E, N*S, D)
        h = self.experts(x_in).reshape(num_slots, D)                           # (E*N*S, D)
        h = torch.cat([h, h.new_zeros(1, D)])[slot]                            # (N*K*T, D)
        weight = (gates * kept).reshape(-1, 1)                                 # (N*K*T, 1)
        out = torch.zeros_like(x_flat).index_add_(0, rows, (h * weight).to(x.dtype))

        top1_fraction = onehot[:, :T].float().mean((0, 1))                     # f_e
        self.aux_loss = E * (top1_fraction * probs.mean((0, 1))).sum()
        return out.view(N, T, D)                                               # (N, T, D)
