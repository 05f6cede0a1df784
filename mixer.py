"""Patch masking and the patch-mixer ("deferred masking", the paper's key trick).

Masking 75% of the patches cuts the backbone's cost by ~4x, but a backbone that only ever
sees a quarter of the image learns poorly. The paper first runs a few cheap transformer
blocks (the patch-mixer) over ALL patches, so every kept token already carries information
about the removed ones, and only then drops tokens. The masking itself is MAE's: argsort
of uniform noise, keep the first `keep` indices.
"""
import torch
import torch.nn as nn


def num_kept(num_tokens, mask_ratio):
    """How many of num_tokens survive masking at mask_ratio (rounded down)."""
    return int(num_tokens * (1 - mask_ratio))


def random_ids_keep(batch, num_tokens, mask_ratio, device, generator=None):
    """Indices of the tokens to keep, [N, keep], drawn uniformly without replacement."""
    keep = num_kept(num_tokens, mask_ratio)
    if keep < 1:  # the loss over no kept patch is NaN, with a zero gradient
        raise ValueError(f"mask ratio {mask_ratio} keeps none of {num_tokens} tokens")
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)  # (N, T)
    # ascending: the tokens with the smallest noise are kept
    ids_shuffle = torch.argsort(noise, dim=1)                                  # (N, T)
    return ids_shuffle[:, :keep]


def keep_tokens(x, ids_keep):
    """x [N, T, D] -> the kept tokens [N, keep, D], in the order of ids_keep."""
    index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])                 # (N, keep, D)
    return torch.gather(x, 1, index)


def restore_tokens(x, ids_keep, mask_token, num_tokens):
    """Inverse of keep_tokens: [N, keep, P] -> [N, T, P], removed places filled with
    mask_token [1, 1, P]."""
    N, _, P = x.shape
    full = mask_token.to(x.dtype).expand(N, num_tokens, P).clone()             # (N, T, P)
    index = ids_keep.unsqueeze(-1).expand(-1, -1, P)                           # (N, keep, P)
    return full.scatter(1, index, x)


def removed_mask(ids_keep, num_tokens):
    """[N, T] with 1 where a token was removed, 0 where kept, in the original order."""
    mask = torch.ones(ids_keep.shape[0], num_tokens, device=ids_keep.device)
    return mask.scatter(1, ids_keep, 0.0)


class PatchMixer(nn.ModuleList):
    """The mixer blocks, run in sequence on (tokens, caption tokens, pooled condition).

    A ModuleList so that the state_dict names stay `patch_mixer.{i}.*` as released."""

    def forward(self, x, y, c):
        for block in self:
            # only the kept tokens when the patches were masked before the mixer
            x = block(x, y, c)                                                 # (N, T or keep, Dm)
        return x
