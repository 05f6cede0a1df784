"""EDM diffusion (Karras et al. 2022) around any network called as net(x, t, y, ...).

The network F sees the noisy latents scaled to unit variance, c_in x, and the noise level
as c_noise = ln(sigma) / 4; it predicts a mix of signal and noise that the
preconditioning turns into the denoised estimate D(x; sigma) = c_skip x + c_out F. The
loss weight makes every noise level contribute equally at the start of training.

This file knows nothing of patches or experts: masking is the network's business, and the
loss only needs the [N, T] mask it returns.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIGMA_DATA = 0.9  # the paper's; a run records the one it trained with (train.py --sigma-data)
SIGMA_BUCKETS = [0.1, 0.5, 1.0, 2.0, 5.0]  # edges of the noise levels the loss is logged by


@dataclass
class EDMConfig:
    """The sampler's noise levels. The training noise, ln(sigma) ~ N(p_mean, p_std^2), is
    part of each phase's recipe (train.PHASES) and is passed to the loss."""
    sigma_data: float = SIGMA_DATA
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0         # step spacing; larger spends more steps at low noise


def guided(net, x, t, y, guidance):
    """Network output with classifier-free guidance: F_u + guidance (F_c - F_u), where F_u
    sees the all-zero caption. Both halves run as one batch."""
    if guidance == 1.0:
        return net(x, t, y)[0]
    N = x.shape[0]
    t = t.reshape(-1).expand(N)
    out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.zeros_like(y)]))[0]
    cond, uncond = out.chunk(2)                                         # (N, C, H, W) each
    return uncond + guidance * (cond - uncond)


def precondition(sigma, sigma_data=SIGMA_DATA):
    """c_skip, c_out, c_in, c_noise for noise levels sigma [N, 1, 1, 1]."""
    var = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / var, sigma * sigma_data / var.sqrt(), 1 / var.sqrt(), sigma.log() / 4


def denoise(net, x, sigma, y, guidance=1.0, sigma_data=SIGMA_DATA):
    """D(x; sigma): the preconditioned denoiser. sigma is a scalar or [N]."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = precondition(sigma, sigma_data)
    return c_skip * x + c_out * guided(net, c_in * x, c_noise.flatten(), y, guidance)


def edm_loss_per_sample(net, x, y, mask_ratio=0.0, p_mean=-0.6, p_std=1.2, generator=None,
                        sigma_data=SIGMA_DATA, normal=None, noise=None, ids_keep=None):
    """Training loss of each sample [N] and its noise level sigma [N].

    One generator serves the step's randomness: the standard-normal draws that set sigma,
    the noise eps, then (in the network) the kept patches. normal ([N] or [N, 1, 1, 1]),
    noise (like x) and ids_keep replace those draws where given (the golden tests pin them).
    With masking, the loss is averaged over the kept patches only: the removed ones were
    never predicted."""
    N = x.shape[0]
    if normal is None:
        normal = torch.randn(N, device=x.device, generator=generator)
    if noise is None:
        noise = torch.randn(x.shape, device=x.device, generator=generator)
    sigma = (normal.reshape(N, 1, 1, 1).to(x.dtype) * p_std + p_mean).exp()  # (N, 1, 1, 1)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    c_skip, c_out, c_in, c_noise = precondition(sigma, sigma_data)
    x_noisy = x + sigma * noise
    out, mask = net(c_in * x_noisy, c_noise.flatten(), y, mask_ratio=mask_ratio, ids_keep=ids_keep,
                    generator=generator)
    loss = weight * (c_skip * x_noisy + c_out * out - x) ** 2           # (N, C, H, W)
    if mask is None:
        return loss.mean(dim=(1, 2, 3)), sigma.flatten()
    patch = x.shape[-1] // int(round(mask.shape[1] ** 0.5))
    loss = F.avg_pool2d(loss.mean(dim=1), patch).flatten(1)             # (N, T)
    kept = 1 - mask
    return (loss * kept).sum(dim=1) / kept.sum(dim=1), sigma.flatten()


def edm_loss(net, x, y, mask_ratio=0.0, p_mean=-0.6, p_std=1.2, generator=None, **given):
    """The EDM training loss, averaged over the batch (see edm_loss_per_sample)."""
    return edm_loss_per_sample(net, x, y, mask_ratio, p_mean, p_std, generator, **given)[0].mean()


def sigma_bucket(sigma):
    """The noise-level bucket of each sigma [N]: how many SIGMA_BUCKETS edges it is above."""
    return sum(sigma > edge for edge in SIGMA_BUCKETS)


def sigma_steps(steps, edm=EDMConfig(), device=None):
    """The EDM noise schedule [steps + 1] in float64, ending with sigma = 0."""
    ramp = torch.arange(steps, dtype=torch.float64, device=device) / max(steps - 1, 1)
    lo, hi = edm.sigma_min ** (1 / edm.rho), edm.sigma_max ** (1 / edm.rho)
    sigmas = (hi + ramp * (lo - hi)) ** edm.rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def heun_sample(net, noise, y, steps=30, guidance=5.0, edm=EDMConfig()):
    """Deterministic Heun sampler (EDM Algorithm 1, no churn) from standard-normal noise
    [N, C, H, W]. The state is kept in float64 (its updates are small differences of
    large numbers at high noise); the network runs in float32 or the autocast dtype."""
    sigmas = sigma_steps(steps, edm, noise.device)
    x = noise.to(torch.float64) * sigmas[0]

    def slope(x, sigma):
        denoised = denoise(net, x.float(), sigma.float(), y, guidance, edm.sigma_data)
        return (x - denoised.double()) / sigma

    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = slope(x, sigma)
        x_next = x + (sigma_next - sigma) * d
        if i < steps - 1:  # trapezoid correction; skipped at sigma = 0
            x_next = x + (sigma_next - sigma) * 0.5 * (d + slope(x_next, sigma_next))
        x = x_next
    return x.float()
