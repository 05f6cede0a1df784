"""The test suite: CPU only, minutes. Numbers are checked against the golden vectors that
the paper's released code produced (fixtures/), against slow obviously-correct loops, and
against closed forms."""
import dataclasses
import errno
import glob
import hashlib
import json
import collections
import io
import math
import os
import re
import tarfile
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import checkpoint
import data
import model as model_lib
import prepare as prepare_lib
from data import LatentLoader
from diffusion import SIGMA_BUCKETS, denoise, edm_loss, guided, heun_sample, sigma_bucket, sigma_steps
from mixer import keep_tokens, num_kept, random_ids_keep, removed_mask, restore_tokens
from model import PRESETS, DiTConfig, MicroDiT, count_params, forward_flops
from moe import ExpertChoiceMoE, TokenChoiceMoE, num_tokens_per_expert
from prepare import PrepareConfig, prepare
import vae as vae_lib
from vae import VAE_PRESETS, AutoencoderKL, VAEConfig, load_vae

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "microdit_golden_small.safetensors"


def assert_close_rel(actual, expected, rel):
    """max |actual - expected| <= rel * max |expected|"""
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x {scale:.3g}"


@pytest.fixture(scope="module")
def golden():
    tensors = load_file(GOLDEN)
    config = json.loads(safe_open(GOLDEN, "pt").metadata()["config"])
    net = MicroDiT(DiTConfig.from_dict(config)).eval()
    net.load_state_dict({k[len("weights."):]: v for k, v in tensors.items()
                         if k.startswith("weights.")})
    return net, tensors, config


# ----------------------------------------------------------------------------- network

@pytest.mark.parametrize("name, params", [("MicroDiT_Tiny_2", 200_692_752),
                                          ("MicroDiT_XL_2", 1_165_442_320)])
def test_state_dict_matches_released_checkpoints(name, params):
    with torch.device("meta"):
        net = MicroDiT(PRESETS[name])
    lines = [f"{k}\t{list(v.shape)}" for k, v in net.state_dict().items()]
    assert lines == (FIXTURES / f"{name}.state_dict_shapes.txt").read_text().splitlines()
    assert count_params(net) == params


def test_forward_matches_released_code(golden):
    net, g, _ = golden
    with torch.no_grad():
        out, mask = net(g["in.x"], g["in.t"], g["in.y"])
    assert mask is None
    assert_close_rel(out, g["out.nomask"], 1e-5)


def test_masked_forward_matches_released_code(golden):
    net, g, _ = golden
    with torch.no_grad():
        out, mask = net(g["in.x"], g["in.t"], g["in.y"], mask_ratio=0.75, ids_keep=g["in.ids_keep"])
    assert_close_rel(out, g["out.masked75"], 1e-5)
    assert torch.equal(mask, g["in.mask"])


def test_pos_embed_rebuilt_for_512px(golden):
    _, g, config = golden
    net = MicroDiT(DiTConfig.from_dict({**config, "input_size": 16, "pos_interp_scale": 2.0}))
    assert_close_rel(net.pos_embed, g["out.pos_embed_16px_interp2"], 1e-6)
    assert torch.equal(golden[0].pos_embed, g["weights.pos_embed"])


def test_checkpoint_file_roundtrip(golden, tmp_path):
    """A released checkpoint is a plain torch.save of the state_dict; weights_only loading
    then load_state_dict(strict) must reproduce the network."""
    net, g, config = golden
    path = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), path)
    fresh = MicroDiT(DiTConfig.from_dict(config)).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(g["in.x"], g["in.t"], g["in.y"])[0],
                           net(g["in.x"], g["in.t"], g["in.y"])[0])


def test_caption_shape_and_scalar_t(golden):
    net, g, _ = golden
    with torch.no_grad():
        ref, _ = net(g["in.x"], g["in.t"][:1].expand(2), g["in.y"])
        out, _ = net(g["in.x"], g["in.t"][:1], g["in.y"].squeeze(1))
    assert torch.equal(out, ref)


def test_wrong_input_size_is_a_clear_error(golden):
    net, g, _ = golden
    with pytest.raises(ValueError, match="input_size"):
        net(torch.zeros(1, 4, 16, 16), g["in.t"][:1], g["in.y"][:1])


def test_initialisation_follows_the_spec():
    """adaLN-Zero: every gated branch starts at 0, so a fresh block adds only its (ungated)
    cross-attention, and the caption refinement is the identity; the stds are SPEC's
    (xavier, 0.02 for the embedders, 0.02 / sqrt(2 (i + 1)) for backbone block i's outputs,
    0.02 / sqrt(2 depth) for the mixer's), within the sampling error of a draw."""
    torch.manual_seed(0)
    cfg = PRESETS["MicroDiT_CPU_2"]
    net = MicroDiT(cfg)
    D = cfg.dim
    x, y, c = torch.randn(2, 64, D), torch.randn(2, 77, D), torch.randn(2, D)
    with torch.no_grad():
        for block in [*net.blocks, *net.patch_mixer]:
            assert torch.equal(block(x, y, c), x + block.cross_attn(block.norm2(x), y))
        assert torch.equal(net.y_emb_preprocess(y), y)
        assert torch.count_nonzero(net.final_layer.adaLN_modulation[-1].weight) == 0
    std = lambda w: w.float().std().item()  # noqa: E731
    for i, block in enumerate(net.blocks):
        assert std(block.attn.proj.weight) == pytest.approx(0.02 / math.sqrt(2 * (i + 1)),
                                                            rel=0.05)
    assert std(net.patch_mixer[0].attn.proj.weight) == pytest.approx(
        0.02 / math.sqrt(2 * cfg.depth), rel=0.05)
    assert std(net.t_embedder.mlp[0].weight) == pytest.approx(0.02, rel=0.05)
    w = net.x_embedder.proj.weight                                     # (D, C, p, p)
    assert std(w) == pytest.approx(math.sqrt(2 / (w[0].numel() + w.shape[0])), rel=0.05)


def test_fresh_model_outputs_zero_and_trains():
    """The zero-inits make a new model output exactly 0; one SGD step must move it."""
    torch.manual_seed(0)
    net = MicroDiT(PRESETS["MicroDiT_CPU_2"])
    x, y, t = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 256), torch.randn(2)
    out, _ = net(x, t, y, mask_ratio=0.5)
    assert torch.count_nonzero(out) == 0
    loss = (net(x, t, y)[0] - x).pow(2).mean()
    loss.backward()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    assert (net(x, t, y)[0] - x).pow(2).mean() < loss


def test_layerwise_scaling_widths():
    cfg = PRESETS["MicroDiT_XL_2"]
    ratios = model_lib.block_ratios(cfg.qkv_ratio, cfg.depth)
    assert ratios[0] == 0.5 and ratios[-1] == 1.0 and len(ratios) == 28
    assert model_lib.block_ratios([1.0, 2.0, 3.0, 4.0], 8) == [1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="spread evenly"):
        model_lib.block_ratios([1.0, 2.0, 3.0], 8)


# ----------------------------------------------------------------------------- masking

def test_masking_helpers():
    g = torch.Generator().manual_seed(0)
    ids_keep = random_ids_keep(3, 16, 0.75, "cpu", generator=g)
    assert ids_keep.shape == (3, 4)
    for row in ids_keep:
        assert len(set(row.tolist())) == 4
    x = torch.randn(3, 16, 5)
    kept = keep_tokens(x, ids_keep)
    for n in range(3):
        assert torch.equal(kept[n], x[n, ids_keep[n]])
    token = torch.full((1, 1, 5), 7.0)
    full = restore_tokens(kept, ids_keep, token, 16)
    mask = removed_mask(ids_keep, 16)
    assert mask.sum() == 3 * 12
    assert torch.equal(full[mask == 0], x[mask == 0])
    assert (full[mask == 1] == 7.0).all()
    # every image of a batch drops its own patches; the kept count rounds down
    ids = random_ids_keep(32, 64, 0.75, "cpu", generator=torch.Generator().manual_seed(0))
    assert len({tuple(sorted(row.tolist())) for row in ids}) == 32
    assert num_kept(100, 0.7) == 30 and num_kept(10, 0.75) == 2


def patch_sensitivity(cfg):
    """Does the output at a kept patch change when the content of a removed patch does?"""
    torch.manual_seed(0)
    net = MicroDiT(cfg)
    for p in net.parameters():  # undo the zero-inits so every path carries signal
        torch.nn.init.normal_(p, std=0.1)
    x, y, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 256), torch.randn(1)
    ids_keep = torch.arange(32).view(1, 32)      # keep the top half of the image
    x2 = x.clone()
    x2[:, :, 12:, :] += 1.0                      # change only removed patches
    with torch.no_grad():
        a, _ = net(x, t, y, ids_keep=ids_keep)
        b, _ = net(x2, t, y, ids_keep=ids_keep)
    return (a - b)[:, :, :8].abs().max().item()


def test_deferred_vs_naive_masking():
    base = PRESETS["MicroDiT_CPU_2"]
    assert patch_sensitivity(base) > 1e-4                     # the mixer saw every patch
    assert patch_sensitivity(dataclasses.replace(base, mask_before_mixer=True)) == 0
    assert patch_sensitivity(dataclasses.replace(base, patch_mixer_depth=0)) == 0


def test_mixer_width_and_depth():
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], patch_mixer_depth=3, patch_mixer_dim=64)
    net = MicroDiT(cfg)
    assert len(net.patch_mixer) == 3 and net.patch_mixer_map_xin[1].out_features == 64
    assert isinstance(net.patch_mixer[1].mlp, ExpertChoiceMoE)
    out, mask = net(torch.randn(2, 4, 16, 16), torch.randn(2), torch.randn(2, 77, 256),
                    mask_ratio=0.75)
    assert out.shape == (2, 4, 16, 16) and mask.sum() == 2 * 48


# ----------------------------------------------------------------------------- MoE

def random_moe(cls, *args):
    torch.manual_seed(0)
    moe = cls(*args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def test_expert_choice_equals_slow_loop():
    moe = random_moe(ExpertChoiceMoE, 16, 24, 4, 2.0)
    x = torch.randn(3, 10, 16)
    k = int(2.0 * 10 / 4)
    assert num_tokens_per_expert(2.0, 10, 4) == k == 5 and num_tokens_per_expert(2.0, 10, 8) == 2
    expected = torch.zeros_like(x)
    for n in range(3):
        probs = torch.softmax(x[n] @ moe.gate.weight.t(), dim=-1)         # (T, E)
        for e in range(4):
            gates, chosen = torch.topk(probs[:, e], k)
            for g, tok in zip(gates, chosen):
                h = F.gelu(x[n, tok] @ moe.w1[e]) @ moe.w2[e]
                expected[n, tok] += g * h
    assert_close_rel(moe(x), expected, 1e-5)


def test_expert_choice_tokens_picked_by_none_get_zero():
    moe = random_moe(ExpertChoiceMoE, 8, 8, 2, 0.5)   # 2 experts x 2 of 8 tokens
    out = moe(torch.randn(1, 8, 8))
    assert (out.abs().sum(-1) == 0).sum() >= 4


def test_token_choice_equals_slow_loop():
    moe = random_moe(TokenChoiceMoE, 16, 24, 4, 1.0, 2)
    x = torch.randn(3, 9, 16)
    probs = torch.softmax(x @ moe.gate.weight.t(), dim=-1)               # (N, T, E)
    gates, experts = torch.topk(probs, 2, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    capacity = math.ceil(1.0 * 9 * 2 / 4)     # per expert and image
    expected = torch.zeros_like(x)
    dropped = 0
    for n in range(3):
        load = [0] * 4
        for choice in range(2):               # all first choices before any second one
            for i in range(9):
                e = experts[n, i, choice].item()
                if load[e] < capacity:
                    load[e] += 1
                    h = F.gelu(x[n, i] @ moe.w1[e]) @ moe.w2[e]
                    expected[n, i] += gates[n, i, choice] * h
                else:
                    dropped += 1
    assert dropped > 0                        # the capacity limit is exercised
    assert_close_rel(moe(x), expected, 1e-5)
    f = torch.bincount(experts[..., 0].reshape(-1), minlength=4).float() / 27
    assert torch.allclose(moe.aux_loss, 4 * (f * probs.reshape(-1, 4).mean(0)).sum())


@pytest.mark.parametrize("layer", ["expert_choice", "token_choice"])
def test_moe_image_does_not_depend_on_its_batch_mates(layer):
    """Routing is per image for both kinds, so a sample is the same alone or in a batch
    (and the two halves of a guided batch do not compete for capacity)."""
    moe = (random_moe(ExpertChoiceMoE, 16, 24, 4, 1.0) if layer == "expert_choice" else
           random_moe(TokenChoiceMoE, 16, 24, 4, 1.0, 2))
    x = torch.randn(4, 9, 16)
    together = moe(x)
    for n in range(4):
        assert_close_rel(moe(x[n:n + 1])[0], together[n], 1e-5)


def test_token_choice_model_has_aux_loss():
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], moe_routing="token_choice")
    net = MicroDiT(cfg)
    assert net.aux_loss() == 0
    net(torch.randn(2, 4, 16, 16), torch.randn(2), torch.randn(2, 77, 256), mask_ratio=0.75)
    aux = net.aux_loss()
    assert aux.requires_grad and aux > 0


# ----------------------------------------------------------------------------- FLOPs

def math_sdpa(q, k, v, **_):
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return attn @ v


@pytest.mark.parametrize("change", [{}, {"patch_mixer_dim": 96, "moe_routing": "token_choice"},
                                    {"patch_mixer_depth": 0}, {"mask_before_mixer": True}])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
def test_flop_count_matches_torch_counter(change, mask_ratio, monkeypatch):
    """The analytic count equals torch's FLOP counter on a real forward (attention done
    with explicit matmuls so the counter sees it)."""
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(F, "scaled_dot_product_attention", math_sdpa)
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], **change)
    net = MicroDiT(cfg)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(2, 4, 16, 16), torch.randn(2), torch.randn(2, 77, 256),
            mask_ratio=mask_ratio)
    assert counter.get_total_flops() == 2 * forward_flops(cfg, 16, mask_ratio)


def test_flops_masking_ratio_for_released_sizes():
    tiny = PRESETS["MicroDiT_Tiny_2"]
    ratio = forward_flops(tiny, 32, 0.75) / forward_flops(tiny, 32, 0.0)
    assert 0.4 < ratio < 0.5     # the mixer and caption path are not masked


# ----------------------------------------------------------------------------- compile

def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    net = MicroDiT(PRESETS["MicroDiT_CPU_2"]).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, y, t = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 256), torch.randn(2)
    ids_keep = random_ids_keep(2, 64, 0.75, "cpu", generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(net)
    with torch.no_grad():
        for kw in ({}, {"ids_keep": ids_keep}):
            assert_close_rel(compiled(x, t, y, **kw)[0], net(x, t, y, **kw)[0], 1e-4)


# ----------------------------------------------------------------------------- diffusion

def test_guidance_matches_released_code(golden):
    net, g, _ = golden
    with torch.no_grad():
        assert_close_rel(guided(net, g["in.x"], g["in.t"], g["in.y"], 4.0), g["out.cfg4"], 1e-5)
        assert torch.equal(guided(net, g["in.x"], g["in.t"], g["in.y"], 1.0),
                           net(g["in.x"], g["in.t"], g["in.y"])[0])


@pytest.mark.parametrize("cfg, key", [(1.0, "out.denoised"), (4.0, "out.denoised_cfg4")])
def test_denoiser_matches_released_code(golden, cfg, key):
    net, g, _ = golden
    with torch.no_grad():
        assert_close_rel(denoise(net, g["in.x_noisy"], g["in.sigma"], g["in.y"], cfg), g[key], 1e-5)


@pytest.mark.parametrize("mask_ratio, key", [(0.75, "out.loss_masked75"), (0.0, "out.loss_nomask")])
def test_loss_matches_released_code(golden, mask_ratio, key):
    net, g, _ = golden
    ids_keep = g["in.ids_keep"] if mask_ratio else None
    with torch.no_grad():
        for normal in (g["in.loss_rnd_normal"], g["in.loss_rnd_normal"].flatten()):
            loss = edm_loss(net, g["in.x"], g["in.y"], mask_ratio, -0.6, 1.2, normal=normal,
                            noise=g["in.loss_noise"], ids_keep=ids_keep)
            assert_close_rel(loss.reshape(1), g[key], 1e-5)


@pytest.mark.parametrize("steps, cfg, key", [(6, 3.0, "out.heun6_cfg3"), (4, 1.0, "out.heun4_nocfg")])
def test_sampler_matches_released_code(golden, steps, cfg, key):
    net, g, _ = golden
    assert_close_rel(heun_sample(net, g["in.sampler_noise"], g["in.y"], steps, cfg), g[key], 1e-4)


def test_sigma_schedule():
    s = sigma_steps(5)
    assert s.dtype == torch.float64 and len(s) == 6 and s[-1] == 0
    assert torch.allclose(s[[0, 4]], torch.tensor([80.0, 0.002], dtype=torch.float64))
    ramp = s[:5] ** (1 / 7)      # equally spaced in sigma^(1/rho)
    assert torch.allclose(ramp.diff(), ramp.diff()[:1].expand(4))


class IdealGaussianNet(torch.nn.Module):
    """The exact network for data ~ N(0, s^2): D(x; sigma) = x s^2 / (s^2 + sigma^2),
    written as the F the preconditioning expects."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x_in, c_noise, y, mask_ratio=0.0, ids_keep=None, generator=None):
        sigma = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
        var = sigma ** 2 + 0.9 ** 2
        x = x_in * var.sqrt()
        ideal = x * self.s ** 2 / (self.s ** 2 + sigma ** 2)
        c_skip, c_out = 0.9 ** 2 / var, sigma * 0.9 / var.sqrt()
        return (ideal - c_skip * x) / c_out, None


def test_heun_solves_the_probability_flow_ode():
    """For Gaussian data the ODE has the closed form x(sigma) = C sqrt(s^2 + sigma^2); Heun
    must converge to it at second order (error / 4 per doubling of steps; Euler gives / 2)."""
    s = 0.5
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = z * 80.0 * s / math.sqrt(s ** 2 + 80.0 ** 2)
    errors = []
    for steps in (40, 80, 160):
        out = heun_sample(IdealGaussianNet(s), z, torch.zeros(4, 6, 8), steps=steps, guidance=1.0)
        errors.append(((out - expected).abs().max() / expected.abs().max()).item())
    assert errors[-1] < 1e-3
    assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5


def test_masked_loss_averages_kept_patches_only(golden):
    """Changing the prediction on removed patches must not change the masked loss."""
    net, g, _ = golden
    ids_keep = g["in.ids_keep"]

    def poisoned(x, t, y, mask_ratio=0.0, ids_keep=None, generator=None):
        out, mask = net(x, t, y, mask_ratio, ids_keep)
        patches = mask.view(-1, 1, 4, 1, 4, 1).expand(-1, 4, 4, 2, 4, 2).reshape(out.shape)
        return out + 1e3 * patches, mask

    with torch.no_grad():
        kw = dict(normal=g["in.loss_rnd_normal"], noise=g["in.loss_noise"], ids_keep=ids_keep)
        a = edm_loss(net, g["in.x"], g["in.y"], 0.75, **kw)
        b = edm_loss(poisoned, g["in.x"], g["in.y"], 0.75, **kw)
    assert_close_rel(b, a, 1e-6)


# ----------------------------------------------------------------------------- VAE

TINY = ("vae_tiny_4ch", "vae_tiny_16ch")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def vae_golden(name):
    return load_file(os.path.join(FIXTURES, name, "golden.safetensors"))


def assert_matches_vae_golden(vae, g, rtol=1e-5, atol=1e-5):
    with torch.no_grad():
        posterior = vae.encode(g["in.image"])
        decoded = vae.decode(posterior.mean)
    torch.testing.assert_close(posterior.mean, g["out.mean"], rtol=rtol, atol=atol)
    torch.testing.assert_close(posterior.logvar, g["out.logvar"], rtol=rtol, atol=atol)
    torch.testing.assert_close(decoded, g["out.decoded_from_mean"], rtol=rtol, atol=atol)


def copy_config(name, folder):
    shutil.copy(os.path.join(FIXTURES, name, "config.json"), folder)


@pytest.mark.parametrize("name", TINY)
def test_vae_golden_diffusers_folder(name):
    assert_matches_vae_golden(load_vae(os.path.join(FIXTURES, name)), vae_golden(name))


@pytest.mark.parametrize("name", TINY)
def test_vae_golden_safetensors_file(name):
    path = os.path.join(FIXTURES, name, WEIGHTS)
    assert_matches_vae_golden(load_vae(path), vae_golden(name))


def test_vae_golden_ldm_single_file():
    vae = load_vae(os.path.join(FIXTURES, "vae_tiny_4ch", "vae_ldm_format.safetensors"))
    assert_matches_vae_golden(vae, vae_golden("vae_tiny_4ch"))


def test_vae_pipeline_folder_loads_its_vae_subfolder(tmp_path):
    """A whole diffusers pipeline folder (stable-diffusion-xl-base-1.0 as downloaded: a
    model_index.json and no config.json at its root) is read through its vae/ sub-folder, the
    same VAE as that sub-folder given directly."""
    pipe = tmp_path / "pipe"
    shutil.copytree(FIXTURES / "vae_tiny_4ch", pipe / "vae")
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert_matches_vae_golden(load_vae(str(pipe)), vae_golden("vae_tiny_4ch"))


def test_vae_ldm_ckpt_with_state_dict_wrapper_and_prefix(tmp_path):
    # the layout of a whole SD training checkpoint: pickled, wrapped, VAE under a prefix
    ldm = load_file(os.path.join(FIXTURES, "vae_tiny_4ch", "vae_ldm_format.safetensors"))
    wrapped = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    wrapped["model.diffusion_model.some.weight"] = torch.zeros(3)  # other parts of the checkpoint
    torch.save({"state_dict": wrapped, "global_step": 7}, tmp_path / "model.ckpt")
    copy_config("vae_tiny_4ch", tmp_path)
    assert_matches_vae_golden(load_vae(str(tmp_path / "model.ckpt")), vae_golden("vae_tiny_4ch"))


def test_vae_ldm_without_config_infers_architecture(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "vae_tiny_4ch", "vae_ldm_format.safetensors"), tmp_path)
    with pytest.warns(UserWarning, match="no config.json"):
        vae = load_vae(str(tmp_path / "vae_ldm_format.safetensors"))
    fixture = VAEConfig.from_json(os.path.join(FIXTURES, "vae_tiny_4ch", "config.json"))
    assert vae.config.block_out_channels == fixture.block_out_channels == (32, 64)
    assert vae.config.layers_per_block == fixture.layers_per_block == 1
    assert vae.config.latent_channels == 4
    # not in the weights: taken from the 4-channel preset (the fixture used 8 groups)
    assert vae.scaling_factor == VAE_PRESETS["sdxl"].scaling_factor
    assert vae.config.norm_num_groups == VAE_PRESETS["sdxl"].norm_num_groups


def test_vae_old_attention_names(tmp_path):
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    src = os.path.join(FIXTURES, "vae_tiny_4ch")
    state = load_file(os.path.join(src, WEIGHTS))
    renamed = {}
    for key, value in state.items():
        for new, old in old_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    assert any(".attentions.0.proj_attn." in k for k in renamed)
    save_file(renamed, tmp_path / WEIGHTS)
    copy_config("vae_tiny_4ch", tmp_path)
    new, old = load_vae(src), load_vae(str(tmp_path))
    image = vae_golden("vae_tiny_4ch")["in.image"]
    with torch.no_grad():
        torch.testing.assert_close(old.encode(image).mean, new.encode(image).mean, rtol=0, atol=0)
        z = new.encode(image).mean
        torch.testing.assert_close(old.decode(z), new.decode(z), rtol=0, atol=0)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_vae_half_precision_weights_load_as_float32(tmp_path, half):
    state = load_file(os.path.join(FIXTURES, "vae_tiny_16ch", WEIGHTS))
    save_file({k: v.to(half) for k, v in state.items()}, tmp_path / WEIGHTS)
    copy_config("vae_tiny_16ch", tmp_path)
    vae = load_vae(str(tmp_path), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    # only the weights were rounded: outputs stay within the rounding error of the format
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[half]
    assert_matches_vae_golden(vae, vae_golden("vae_tiny_16ch"), rtol=tol, atol=tol)


def test_vae_chunked_decode_equals_unchunked():
    vae = load_vae(os.path.join(FIXTURES, "vae_tiny_4ch"))
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vae.decode(latents, chunk_size=5)
        chunked = vae.decode(latents, chunk_size=2)  # 2 + 2 + 1
    assert chunked.shape == (5, 3, 16, 16)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_vae_scaled_latents_with_shift():
    vae = load_vae(os.path.join(FIXTURES, "vae_tiny_16ch"))
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.1)
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vae.to_scaled(z), (z - 0.1) * 0.5)
    torch.testing.assert_close(vae.from_scaled(vae.to_scaled(z)), z)
    g = vae_golden("vae_tiny_16ch")
    with torch.no_grad():
        decoded = vae.decode_from_scaled(vae.to_scaled(g["out.mean"]))
    torch.testing.assert_close(decoded, g["out.decoded_from_mean"], rtol=1e-5, atol=1e-5)


def test_vae_config_without_scaling_factor_takes_the_diffusers_default(tmp_path):
    """Early diffusers config.json files (SD 1.x VAEs) have no scaling_factor: diffusers then
    scales by its default, 0.18215 (not the SDXL value 0.13025), and no shift; the weights
    are the same as ever."""
    shutil.copy(FIXTURES / "vae_tiny_4ch" / WEIGHTS, tmp_path)
    config = json.loads((FIXTURES / "vae_tiny_4ch" / "config.json").read_text())
    del config["scaling_factor"], config["shift_factor"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    vae = load_vae(str(tmp_path))
    assert (vae.scaling_factor, vae.shift_factor) == (0.18215, 0.0)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vae.to_scaled(z), z * 0.18215, rtol=0, atol=0)
    assert_matches_vae_golden(vae, vae_golden("vae_tiny_4ch"))


def test_vae_posterior_sample_is_seeded_reparameterisation():
    vae = load_vae(os.path.join(FIXTURES, "vae_tiny_16ch"))
    image = vae_golden("vae_tiny_16ch")["in.image"]
    with torch.no_grad():
        posterior = vae.encode(image)
        sample = posterior.sample(generator=torch.Generator().manual_seed(3))
        scaled = vae.encode_to_scaled(image, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample, posterior.mean + posterior.std * noise)
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))
    torch.testing.assert_close(scaled, vae.to_scaled(sample))  # a sample, not the mean
    assert not torch.allclose(sample, posterior.mean)
    # one generator per row: each row's noise is what its generator alone draws
    rows = posterior.sample([torch.Generator().manual_seed(s) for s in (5, 6)])
    for row, s in enumerate((5, 6)):
        alone = torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(rows[row:row + 1], posterior.mean[row:row + 1]
                                   + posterior.std[row:row + 1] * alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        posterior.sample([torch.Generator()] * 3)


def test_vae_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_vae(str(tmp_path / "nope.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors: cannot read VAE weights"):
        load_vae(str(tmp_path / "garbage.safetensors"))
    # right file format, wrong keys: the message names the file and the offending keys
    state = load_file(os.path.join(FIXTURES, "vae_tiny_4ch", WEIGHTS))
    state["encoder.extra.weight"] = torch.zeros(1)
    del state["decoder.conv_out.bias"]
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, bad / WEIGHTS)
    copy_config("vae_tiny_4ch", bad)
    with pytest.raises(ValueError, match=r"bad/diffusion_pytorch_model.safetensors: .*"
                                         r"1 missing keys: decoder.conv_out.bias; "
                                         r"1 unexpected keys: encoder.extra.weight"):
        load_vae(str(bad))
    # a damaged config.json, or one that cannot scale the latents
    (bad / "config.json").write_text('{"latent_channels": 4,')
    with pytest.raises(ValueError, match="bad/config.json: not valid JSON"):
        load_vae(str(bad))
    (bad / "config.json").write_text('{"latent_channels": 4, "scaling_factor": null}')
    with pytest.raises(ValueError, match="scaling_factor is None"):
        load_vae(str(bad))


def test_text_encoder_bad_files_give_clear_errors(tmp_path, monkeypatch):
    import huggingface_hub
    from text import load_text_encoder
    vae_file = os.path.join(FIXTURES, "vae_tiny_4ch", WEIGHTS)  # weights, but not CLIP's
    with pytest.raises(ValueError, match="not the weights of an OpenCLIP model"):
        load_text_encoder(vae_file)
    cut = tmp_path / "clip.safetensors"
    cut.write_bytes(open(vae_file, "rb").read()[:100])
    with pytest.raises(ValueError, match="cannot be read as CLIP weights"):
        load_text_encoder(str(cut))
    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="weights/clip is no file or folder here"):
        load_text_encoder("weights/clip")


def test_vae_sdxl_preset_has_diffusers_names_and_shapes():
    with open(os.path.join(FIXTURES, "sdxl_vae.diffusers_state_dict_shapes.txt")) as f:
        expected = {name: json.loads(shape) for name, shape in
                    (line.rstrip("\n").split("\t") for line in f if line.strip())}
    with torch.device("meta"):
        vae = AutoencoderKL(VAE_PRESETS["sdxl"])
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == expected


def test_vae_fresh_init_any_multiple_of_downsampling():
    cfg = VAEConfig(latent_channels=16, block_out_channels=(16, 32, 32), layers_per_block=1,
                    norm_num_groups=8, scaling_factor=0.5, shift_factor=0.1)
    vae = AutoencoderKL(cfg)
    images = torch.rand(3, 3, 12, 20) * 2 - 1  # 2 downsamplings: multiples of 4 suffice
    with torch.no_grad():
        latents = vae.encode_to_scaled(images, chunk_size=2)
        decoded = vae.decode_from_scaled(latents, chunk_size=2)
    assert latents.shape == (3, 16, 3, 5)
    assert decoded.shape == images.shape
    assert torch.isfinite(decoded).all()


# ----------------------------------------------------------------------------- text features

@pytest.mark.parametrize("layout", ["bin", "safetensors", "module-prefixed bin"])
def test_text_features_are_open_clips_own_pre_pool_tokens(tmp_path, monkeypatch, layout):
    """Load a small open_clip CLIP through the real file path; our [N, 77, D] features,
    pooled at the end token and projected, must equal open_clip's encode_text. Our own
    loader reads the usual layouts; another (here a DDP 'module.' prefix) goes through
    open_clip's."""
    import open_clip
    import text
    from text import load_text_encoder
    arch = {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                         "layers": 2}}
    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    torch.manual_seed(0)
    reference = open_clip.create_model("tiny-clip-test", force_quick_gelu=True).eval()
    state = reference.state_dict()
    if layout == "safetensors":
        save_file(state, tmp_path / "open_clip_model.safetensors")
    else:
        prefix = "module." if layout == "module-prefixed bin" else ""
        torch.save({prefix + k: v for k, v in state.items()},
                   tmp_path / "open_clip_pytorch_model.bin")
    read = []
    real_text_weights = text.text_weights
    monkeypatch.setattr(text, "text_weights", lambda p: read.append(real_text_weights(p)) or read[-1])
    enc = load_text_encoder(str(tmp_path), arch="tiny-clip-test")
    if layout != "module-prefixed bin":  # read and used as they are, without open_clip's loader
        assert not any(k.startswith("visual.") for k in read[0])
        assert all(torch.equal(v, state[k]) for k, v in read[0].items())
        assert set(read[0]) == set(enc.tower.state_dict())
    assert type(enc.tower.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    prompts = ["a small red circle in the top left", "a cat"]
    feats = enc.encode(prompts)
    assert feats.shape == (2, 77, 64)
    ids = enc.tokenize(prompts)
    pooled = feats[torch.arange(2), ids.argmax(dim=-1)] @ reference.text_projection
    with torch.no_grad():
        assert_close_rel(pooled, reference.encode_text(ids), 1e-5)


def test_tiny_random_text_tower_is_fixed_by_its_seed():
    from text import TINY_WIDTH, load_text_encoder
    a = load_text_encoder("tiny-random").encode(["a blue square", "a red circle"])
    b = load_text_encoder("tiny-random").encode(["a blue square", "a red circle"])
    assert a.shape == (2, 77, TINY_WIDTH) and torch.equal(a, b)
    assert (a[0] - a[1]).abs().max() > 0.1       # different words, different features


def test_long_prompt_warns_about_truncation():
    from text import load_text_encoder
    with pytest.warns(UserWarning, match="truncated to 77"):
        load_text_encoder("tiny-random").tokenize(["word " * 100])


def test_caption_truncation_counts_the_start_and_end_tokens(tmp_path):
    """The tower reads 77 tokens, start and end tokens included: a caption of 75 BPE tokens
    is read whole, one of 76 loses its last word. The tokenizer's own output is the
    reference (does every BPE token reach the ids?); only the cut caption warns, and
    prepare.py counts it once in summary.json."""
    from text import load_text_encoder
    enc = load_text_encoder("tiny-random")
    fits, cut = " ".join(["cat"] * 75), " ".join(["cat"] * 76)
    for caption, whole in ((fits, True), (cut, False)):
        tokens = enc.tokenizer.encode(caption)
        ids = enc.tokenizer([caption])[0].tolist()
        assert len(tokens) == (75 if whole else 76) and len(ids) == 77
        assert (ids[1:1 + len(tokens)] == tokens) == whole
    assert enc.truncated([fits, cut]) == [(78, cut)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.tokenize([fits])
    with pytest.warns(UserWarning, match="prompt has 78 tokens and is truncated to 77"):
        enc.tokenize([cut])
    src = tmp_path / "imgs"
    src.mkdir()
    for stem, caption in (("fits", fits), ("cut", cut)):
        Image.new("RGB", (16, 16), (10, 200, 10)).save(src / f"{stem}.png")
        (src / f"{stem}.txt").write_text(caption)
    summary = run_prepare(src, tmp_path / "out")
    assert summary["samples_written"] == 2 and summary["converted"] == {"caption_truncated": 1}



SHAPES_CAPTION = "a small red circle in the top left on a blue background"


def one_word_different_captions(n):
    """Pairs of shapes captions (data.py's) that differ in exactly one word: each of the
    first n demo samples against every one-attribute change that is one word."""
    values = {"shape": data.SHAPES, "color": data.COLORS, "size": data.SIZES,
              "position": data.POSITIONS, "background": data.COLORS}
    pairs = []
    for i in range(n):
        a = data.demo_attributes(0, i)
        for field, options in values.items():
            for value in options:
                b = dataclasses.replace(a, **{field: value})
                words = [data.caption_of(x).split() for x in (a, b)]
                if (b.color != b.background and len(words[0]) == len(words[1])
                        and sum(u != v for u, v in zip(*words)) == 1):
                    pairs.append((data.caption_of(a), data.caption_of(b)))
    return pairs


def pair_cosines(encoder, pairs):
    """Cosine of the flattened [77, D] features of each pair."""
    a, b = (encoder.encode([p[k] for p in pairs]) for k in (0, 1))
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_random_words_is_fixed_float32_and_pinned():
    """Two loads, any thread count and any requested dtype give the same float32 features;
    a few pinned numbers catch any change to the tables or the recipe."""
    from text import RANDOM_WORDS, TINY_WIDTH, load_text_encoder
    prompts = [SHAPES_CAPTION, "a cat"]
    a = load_text_encoder(RANDOM_WORDS).encode(prompts)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = load_text_encoder(RANDOM_WORDS, dtype=torch.bfloat16).encode(prompts)
    finally:
        torch.set_num_threads(threads)
    assert a.shape == (2, 77, TINY_WIDTH) and a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    pinned = [[0.523414, -0.455955, -0.031884],    # start token: every caption's
              [-1.455355, -0.255678, -0.904437],   # "red"
              [0.868276, -1.213059, -0.978392]]    # padding: the whole caption's summary
    torch.testing.assert_close(a[0, [0, 3, 76], :3], torch.tensor(pinned), rtol=0, atol=1e-5)
    assert a[0].double().abs().sum().item() == pytest.approx(17348.297, abs=0.01)
    # normalised like CLIP's ln_final output: zero mean and unit variance per position
    torch.testing.assert_close(a.mean(-1), torch.zeros(2, 77), rtol=0, atol=1e-5)
    torch.testing.assert_close(a.var(-1, unbiased=False), torch.ones(2, 77), rtol=0, atol=1e-4)


def test_random_words_keeps_one_word_different_captions_apart():
    """The offline encoder must let a model tell prompts apart: captions that differ in one
    word end far apart (over all 77 positions, and in the token mean the DiT pools), where
    tiny-random leaves them nearly equal."""
    from text import RANDOM_WORDS, TINY_RANDOM, load_text_encoder
    pairs = one_word_different_captions(6)
    assert len(pairs) > 80
    words, tiny = load_text_encoder(RANDOM_WORDS), load_text_encoder(TINY_RANDOM)
    cosines = pair_cosines(words, pairs)
    assert cosines.max() < 0.6 and cosines.mean() < 0.4, (cosines.max(), cosines.mean())
    assert pair_cosines(tiny, pairs).min() > 0.9               # the contrast, measured
    a, b = (words.encode([p[k] for p in pairs]).mean(1) for k in (0, 1))
    assert F.cosine_similarity(a, b).max() < 0.6
    # word order counts: the shape's and the background's colours swapped
    swapped = [(SHAPES_CAPTION, "a small blue circle in the top left on a red background")]
    assert pair_cosines(words, swapped).item() < 0.6


def test_random_words_keep_each_words_identity():
    """Causal like CLIP's tower: the positions before the changed word are unchanged. The
    words after it keep their own vectors (a model composes unseen captions from them), so
    they stay closer than the same positions of unrelated captions, and captions that share
    words are closer than unrelated ones."""
    from text import RANDOM_WORDS, load_text_encoder
    enc = load_text_encoder(RANDOM_WORDS)
    pairs = one_word_different_captions(2)
    unrelated = [(a, "an old steam train crossing a stone bridge at night") for a, _ in pairs]
    ids = [enc.tokenize([p[k] for p in pairs]) for k in (0, 1)]
    first = (ids[0] != ids[1]).int().argmax(1)                    # the changed token
    end = ids[0].argmax(1)
    feats = [enc.encode([p[k] for p in ps]) for ps in (pairs, unrelated) for k in (0, 1)]
    same = F.cosine_similarity(feats[0], feats[1], dim=-1)       # (P, 77)
    other = F.cosine_similarity(feats[2], feats[3], dim=-1)      # (P, 77)
    for i in range(len(pairs)):
        assert torch.equal(feats[0][i, :first[i]], feats[1][i, :first[i]])
        after = slice(first[i] + 1, end[i])                       # shared words, end excluded
        if after.start < after.stop:
            assert same[i, after].mean() > other[i, after].mean() + 0.2
    assert pair_cosines(enc, pairs).mean() > pair_cosines(enc, unrelated).mean() + 0.15


def test_random_words_truncates_long_captions_and_encodes_the_empty_one():
    """As CLIP's tokenizer: a caption of more than 75 tokens keeps its first 75 and the end
    token, so it reads as those 75. The empty caption is the start and end tokens, then
    padding that holds their summary alone."""
    from text import RANDOM_WORDS, load_text_encoder
    enc = load_text_encoder(RANDOM_WORDS)
    with pytest.warns(UserWarning, match="truncated to 77"):
        feats = enc.encode([" ".join(["cat"] * n) for n in (75, 76, 100)])
    assert torch.equal(feats[0], feats[1]) and torch.equal(feats[0], feats[2])
    empty = enc.encode(["", "a"])
    assert torch.isfinite(empty).all() and not torch.equal(empty[0], empty[1])
    assert torch.equal(empty[0, 2:], empty[0, 2:3].expand(75, -1))


def test_demo_data_prepared_with_random_words(tmp_path):
    """data.py takes the name like any other --clip: the stored caption features are the
    encoder's (in float16)."""
    from text import RANDOM_WORDS, load_text_encoder
    out = tmp_path / "shapes"
    prepare(PrepareConfig(src="demo", out=str(out), res=[8], vae="none", clip=RANDOM_WORDS,
                          format="demo", n=6))
    dataset = data.LatentDataset(str(out))
    captions = [dataset.caption(i) for i in range(6)]
    assert json.load(open(out / "index.json"))["clip"] == RANDOM_WORDS
    np.testing.assert_allclose(shard_arrays(out, data.CAPTION_COLUMN).astype(np.float32),
                               load_text_encoder(RANDOM_WORDS).encode(captions).numpy(),
                               rtol=2e-3, atol=2e-3)

# ----------------------------------------------------------------------------- sample.py

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A CPU-preset model with random weights saved as a bare state_dict, like the
    released .pt files."""
    torch.manual_seed(0)
    net = MicroDiT(PRESETS["MicroDiT_CPU_2"])
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(net.state_dict(), path)
    return path, net


def run_sample(*args):
    import sample
    return sample.main([str(a) for a in args])


def test_sample_end_to_end_matches_the_pipeline(tiny_checkpoint, tmp_path):
    """PNG pixels equal the paper's pipeline done by hand: one seeded randn for all images,
    Heun with guidance, VAE decode of latents / scaling, (x / 2 + 0.5) clamped."""
    from PIL import Image
    from text import load_text_encoder
    path, net = tiny_checkpoint
    vae_dir = FIXTURES / "vae_tiny_4ch"
    prompts = ["a small red circle", "a large blue square"]
    rc = run_sample(*prompts, "--ckpt", path, "--vae", vae_dir, "--clip", "tiny-random",
                    "--steps", 3, "--cfg", 2.5, "--seed", 7, "--out", tmp_path)
    assert rc == 0
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    y = load_text_encoder("tiny-random").encode(prompts)
    latents = heun_sample(net.eval(), noise, y, steps=3, guidance=2.5)
    with torch.no_grad():
        decoded = load_vae(vae_dir).decode(latents / 0.13025)
    expected = ((decoded / 2 + 0.5).clamp(0, 1) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    for i, prompt in enumerate(prompts):
        png = Image.open(tmp_path / f"{i:04d}_{prompt.replace(' ', '_')}.png")
        got = torch.from_numpy(__import__("numpy").array(png)).permute(2, 0, 1)
        assert png.size == (32, 32)
        assert torch.equal(got, expected[i])
        assert png.text["prompt"] == prompt and png.text["seed"] == "7"
        assert png.text["steps"] == "3" and png.text["cfg"] == "2.5"
        assert png.text["checkpoint"] == str(path)
    # the grid shows the 32 px images side by side, each pixel as a 2 x 2 block (64 px tiles)
    grid = np.array(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (64, 128, 3)
    for i in range(2):
        tile = expected[i].permute(1, 2, 0).numpy().repeat(2, axis=0).repeat(2, axis=1)
        assert np.array_equal(grid[:, 64 * i:64 * (i + 1)], tile)


def test_sample_same_seed_same_image(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    common = ["a red circle", "--ckpt", path, "--vae", FIXTURES / "vae_tiny_4ch", "--clip",
              "tiny-random", "--steps", 2, "--no-grid"]
    for seed, out in ((1, "a"), (1, "b"), (2, "c")):
        assert run_sample(*common, "--seed", seed, "--out", tmp_path / out) == 0
    read = lambda d: (tmp_path / d / "0000_a_red_circle.png").read_bytes()
    assert read("a") == read("b") and read("a") != read("c")


def test_sample_compiles_the_network_once_for_all_steps(tiny_checkpoint, tmp_path):
    """--compile: one compilation serves every Heun step (a recompile would raise), and the
    images equal eager ones up to float rounding."""
    import torch._dynamo
    path, _ = tiny_checkpoint
    common = ["a red circle", "a blue square", "--ckpt", path, "--vae", FIXTURES / "vae_tiny_4ch",
              "--clip", "tiny-random", "--steps", 3, "--no-grid", "--seed", 3]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert run_sample(*common, "--compile", "--out", tmp_path / "compiled") == 0
    assert run_sample(*common, "--out", tmp_path / "eager") == 0
    for name in ("0000_a_red_circle.png", "0001_a_blue_square.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name)).astype(int) for d in ("compiled", "eager"))
        assert np.abs(a - b).max() <= 1


def test_sample_clear_errors(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    assert run_sample("a cat", "--ckpt", tmp_path / "missing.pt") == 2  # a typo
    assert "not found (under" in capsys.readouterr().err
    released = tmp_path / "weights" / "dit_4_channel_22M_real_only_data.pt"  # not downloaded
    assert run_sample("a cat", "--ckpt", released) == 2
    assert "hf download" in capsys.readouterr().err
    # a VAE path recorded relative to another folder (or mistyped) is said to be one
    assert run_sample("a cat", "--ckpt", path, "--vae", "elsewhere/vae", "--clip",
                      "tiny-random") == 2
    err = capsys.readouterr().err
    assert f"no file or folder of that name under {os.getcwd()}" in err and "--vae PATH" in err
    vae = FIXTURES / "vae_tiny_4ch"
    assert run_sample("", "--ckpt", path, "--vae", vae, "--clip", "tiny-random") == 2
    assert "empty" in capsys.readouterr().err
    assert run_sample("a cat", "--ckpt", path, "--preset", "MicroDiT_Tiny_2", "--vae", vae,
                      "--clip", "tiny-random") == 2
    assert "does not match MicroDiT_Tiny_2" in capsys.readouterr().err
    # damaged or foreign files, and places that cannot take the images: messages, and
    # before anything is generated
    cut = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64)}, str(cut))
    cut.write_bytes(cut.read_bytes()[:-40])
    foreign = tmp_path / "foreign.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    pickled = tmp_path / "module.pt"  # torch.save(model): Python objects, not a state_dict
    torch.save(nn.Linear(2, 2), pickled)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    text = tmp_path / "notes.pt"  # a wrong file given
    text.write_text("# some notes\n")
    for bad, says in [(text, "not a PyTorch checkpoint (its bytes do not unpickle)"),(cut, "cannot read it as safetensors"), (foreign, "not MicroDiT weights"),
                      (tensor, "not MicroDiT weights"),
                      (pickled, "holds Python objects, not only tensors"),
                      (damaged, "damaged (a disk error, a partial download or copy)")]:
        assert run_sample("a cat", "--ckpt", bad, "--vae", vae, "--clip", "tiny-random") == 2
        assert says in capsys.readouterr().err
    a_file = tmp_path / "taken"
    a_file.write_text("")
    assert run_sample("a cat", "--ckpt", path, "--out", a_file) == 2
    assert "is a file: name a folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_sample("a cat", "--ckpt", path, "--device", "cuda") == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_released_style_checkpoint_infers_its_preset(tiny_checkpoint):
    import sample
    path, net = tiny_checkpoint
    loaded, _ = checkpoint.load_dit(str(path))
    assert loaded.cfg == net.cfg
    x, t, y = torch.randn(1, 4, 16, 16), torch.randn(1), torch.randn(1, 77, 256)
    assert torch.equal(loaded(x, t, y)[0], net.eval()(x, t, y)[0])


def test_sample_at_another_resolution_rebuilds_pos_embed(tiny_checkpoint):
    import sample
    path, net = tiny_checkpoint
    loaded, _ = checkpoint.load_dit(str(path), latent_size=32)
    assert loaded.cfg.input_size == 32 and loaded.cfg.pos_interp_scale == 2.0
    assert loaded.pos_embed.shape == (1, 256, 128)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)


def test_train_checkpoint_samples_with_its_ema_weights(tmp_path):
    """A train.py checkpoint holds the trained weights ("model") and their EMA ("ema"):
    sampling uses the EMA, as the paper samples its EMA models; the raw weights only while
    there is no EMA yet (None before --ema-start)."""
    import sample
    cfg = PRESETS["MicroDiT_CPU_2"]
    torch.manual_seed(0)
    raw, ema = MicroDiT(cfg), MicroDiT(cfg)
    for p in [*raw.parameters(), *ema.parameters()]:
        torch.nn.init.normal_(p, std=0.05)
    common = {"model": raw.state_dict(), "model_config": dataclasses.asdict(cfg),
              "vae": None, "clip": "tiny-random", "step": 5}
    x, t, y = torch.randn(1, 4, 16, 16), torch.randn(1), torch.randn(1, 77, 256)
    for name, stored, expected in (("ema", ema.state_dict(), ema), ("none", None, raw)):
        torch.save({**common, "ema": stored}, tmp_path / f"{name}.pt")
        net, info = checkpoint.load_dit(str(tmp_path / f"{name}.pt"))
        assert info["step"] == 5
        want = expected.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
        assert torch.equal(net(x, t, y)[0], expected.eval()(x, t, y)[0])


def test_sampling_defaults_are_the_papers(monkeypatch):
    """Without flags sample.py runs the released pipeline's 30 Heun steps at guidance 5."""
    import sample
    seen = []
    monkeypatch.setattr(sample, "run", lambda args: seen.append(args) or 0)
    assert sample.main(["a cat"]) == 0
    assert (seen[0].steps, seen[0].guidance) == (30, 5.0)


def test_sample_batches_take_their_own_slice_of_the_seeded_noise(tiny_checkpoint, tmp_path):
    """One seeded randn for all the images; each --batch-size batch takes its own rows of it,
    so the images do not depend on the batch size: three prompts one at a time are the
    same PNGs as the three in one batch."""
    path, _ = tiny_checkpoint
    prompts = ["a red circle", "a blue square", "a green cross"]
    common = [*prompts, "--ckpt", path, "--vae", FIXTURES / "vae_tiny_4ch", "--clip",
              "tiny-random", "--steps", 1, "--no-grid", "--seed", 4]
    for batch in (1, 3):
        assert run_sample(*common, "--batch-size", batch, "--out", tmp_path / str(batch)) == 0
    names = [f"{i:04d}_{p.replace(' ', '_')}.png" for i, p in enumerate(prompts)]
    for name in names:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "3" / name).read_bytes()
    assert len({(tmp_path / "1" / n).read_bytes() for n in names}) == 3


def test_sample_n_groups_the_copies_of_each_prompt(tiny_checkpoint, tmp_path):
    """--n 2 with prompts a and b: the files are a, a, b, b in that order (each prompt's
    copies together, as the grid's rows of --n show them), each copy its own noise."""
    path, _ = tiny_checkpoint
    assert run_sample("a", "b", "--n", 2, "--ckpt", path, "--vae", FIXTURES / "vae_tiny_4ch",
                      "--clip", "tiny-random", "--steps", 1, "--no-grid",
                      "--out", tmp_path) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["0000_a.png", "0001_a.png", "0002_b.png", "0003_b.png"]
    assert [Image.open(tmp_path / n).text["prompt"] for n in names] == ["a", "a", "b", "b"]
    assert [Image.open(tmp_path / n).text["index"] for n in names] == ["0", "1", "2", "3"]
    assert (tmp_path / names[0]).read_bytes() != (tmp_path / names[1]).read_bytes()


def test_sample_res_with_a_vae_divides_by_its_downsampling(tiny_checkpoint, tmp_path):
    """--res is in pixels: the latent side is res / 2^(levels - 1) of the VAE (2 for the
    two-level fixture, 8 for SDXL's four levels). --res 48 on the 32 px model: 24x24 latents,
    a 48x48 PNG equal to the pipeline built by hand at that latent size."""
    import sample
    from text import load_text_encoder
    path, _ = tiny_checkpoint
    vae_dir = FIXTURES / "vae_tiny_4ch"
    assert run_sample("a red circle", "--ckpt", path, "--vae", vae_dir, "--clip", "tiny-random",
                      "--res", 48, "--steps", 1, "--seed", 2, "--no-grid",
                      "--out", tmp_path) == 0
    png = Image.open(tmp_path / "0000_a_red_circle.png")
    assert png.size == (48, 48)
    net, _ = checkpoint.load_dit(str(path), latent_size=24)
    images = sample.generate(net, load_text_encoder("tiny-random"), load_vae(vae_dir),
                             ["a red circle"], seed=2, steps=1, guidance=5.0, batch_size=16,
                             device="cpu")
    assert np.array_equal(np.asarray(png), np.asarray(sample.to_pil(images[0])))


def test_generate_returns_the_sampler_output_mapped_to_unit_range_and_clamped(pixel_checkpoint):
    """generate()'s images are (heun_sample(...) / 2 + 0.5) clamped to [0, 1] as tensors,
    before any PNG rounding (eval.py's shapes metric reads them as they are)."""
    import sample
    from text import load_text_encoder
    net, _ = checkpoint.load_dit(str(pixel_checkpoint))
    encoder = load_text_encoder("tiny-random")
    prompts = ["a red circle", "a blue square"]
    images = sample.generate(net, encoder, None, prompts, seed=3, steps=2, guidance=2.0,
                             batch_size=2, device="cpu")
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    raw = heun_sample(net, noise, encoder.encode(prompts), steps=2, guidance=2.0)
    assert (raw < -1).any() and (raw > 1).any()  # the clamp is exercised at both ends
    assert torch.equal(images, (raw / 2 + 0.5).clamp(0, 1))


# ----------------------------------------------------------------------------- data

VAE_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "vae_tiny_4ch")


def run_prepare(src, out, rank=0, world_size=1, **kw):
    kw = {"res": [16], "vae": "none", "clip": "tiny-random", "device": "cpu", "batch_size": 4,
          "workers": 2, **kw}
    return prepare(PrepareConfig(src=str(src), out=str(out), **kw), rank, world_size)


def unit(pixels):
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], written out independently of prepare.py"""
    return np.asarray(pixels, np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def shard_arrays(out, column):
    index = json.load(open(os.path.join(out, "index.json")))
    return np.concatenate([np.load(data.column_path(out, s["name"], column))
                           for s in index["shards"] if s["samples"]])


def shard_manifests(out):
    index = json.load(open(os.path.join(out, "index.json")))
    return [json.load(open(os.path.join(out, s["name"] + ".json"))) for s in index["shards"]]


def make_dataset(root, latents, caption_dim=8, shard_size=50, res=16, captions=None):
    """Our shard format written directly: a loader input whose rows we know."""
    os.makedirs(root, exist_ok=True)
    n = len(latents)
    if captions is None:  # distinct, nonzero caption features per sample
        captions = (np.arange(n)[:, None, None] % 97 + 1.0) * np.ones((1, 77, caption_dim))
    starts = range(0, n, shard_size)
    for i, a in enumerate(starts):
        keys = [f"s{j}" for j in range(a, min(a + shard_size, n))]
        columns = {f"latents_{res}": latents[a:a + shard_size].astype(np.float16),
                   data.CAPTION_COLUMN: captions[a:a + shard_size].astype(np.float16)}
        prepare_lib.write_shard(str(root), i, columns, keys, keys, "test",
                                collections.Counter(seen=len(keys)))
    assert prepare_lib.finish_index(str(root), len(starts), {"resolutions": [res]})
    return str(root)


def id_dataset(root, n, channels=4, **kw):
    """Latents that say which sample they are: every value of row i is i (exact in fp16)."""
    latents = np.arange(n)[:, None, None, None] * np.ones((1, channels, 2, 2))
    return make_dataset(root, latents, **kw)


def ids_of(batch):
    return batch["latents"][:, 0, 0, 0].long().tolist()


# ----------------------------------------------------------------------------------------
# built-in data

def test_demo_attributes_deterministic_and_captions_match():
    attrs = [data.demo_attributes(7, i) for i in range(200)]
    assert attrs == [data.demo_attributes(7, i) for i in range(200)]
    assert attrs != [data.demo_attributes(8, i) for i in range(200)]
    for a in attrs:
        assert a.shape in data.SHAPES and a.color in data.COLORS and a.size in data.SIZES
        assert a.position in data.POSITIONS and a.background in data.COLORS
        assert a.background != a.color
        caption = data.caption_of(a)
        article = "an" if a.background[0] in "aeiou" else "a"
        assert caption == (f"a {a.size} {a.color} {a.shape} in the {a.position} on {article} "
                           f"{a.background} background")
    # every value of every vocabulary shows up in 200 samples
    for vocab, name in [(data.SHAPES, "shape"), (data.COLORS, "color"), (data.SIZES, "size"),
                        (data.POSITIONS, "position")]:
        assert {getattr(a, name) for a in attrs} == set(vocab)
    assert len(data.SHAPES) >= 3 and len(data.COLORS) >= 6


def test_demo_seeds_give_unrelated_sets():
    """Sample i of seed s has a generator of its own, seeded by (s, i): another seed is
    another draw, not the same set again or shifted by a few samples (as seeding with i, or
    s + i, would give), and sample 0 differs across seeds."""
    a = [data.caption_of(data.demo_attributes(7, i)) for i in range(300)]
    b = [data.caption_of(data.demo_attributes(8, i)) for i in range(300)]
    for shift in range(-10, 11):  # 2,800 captions: about 0.1 coincide by chance
        pairs = zip(a[max(shift, 0):], b[max(-shift, 0):])
        assert sum(x == y for x, y in pairs) <= 3, shift
    firsts = {data.caption_of(data.demo_attributes(seed, 0)) for seed in range(20)}
    assert len(firsts) >= 18


def test_render_shows_the_captioned_colour_at_the_captioned_place():
    rng = np.random.default_rng(0)
    for _ in range(40):
        a = data.sample_attributes(rng)
        for res in (32, 64):
            img = np.asarray(data.render_shapes(a, res)).astype(int)
            assert img.shape == (res, res, 3)
            cx, cy = (int(f * res) for f in data.POSITIONS[a.position])
            assert np.abs(img[cy, cx] - data.COLORS[a.color]).max() <= 2, a
            corner_x = 0 if cx > res / 2 else res - 1  # the corner farthest from the shape
            corner_y = 0 if cy > res / 2 else res - 1
            assert np.abs(img[corner_y, corner_x] - data.COLORS[a.background]).max() <= 2, a
            # shape pixels sit in the captioned quadrant
            is_shape = (np.abs(img - data.COLORS[a.color]).max(-1) <= 2)
            ys, xs = np.nonzero(is_shape)
            assert abs(xs.mean() / res - data.POSITIONS[a.position][0]) < 0.1, a
            assert abs(ys.mean() / res - data.POSITIONS[a.position][1]) < 0.12, a
    small = data.ShapeAttributes("circle", "red", "small", "center", "blue")
    large = data.ShapeAttributes("circle", "red", "large", "center", "blue")
    red = lambda a: (np.abs(np.asarray(data.render_shapes(a, 64)).astype(int)
                            - data.COLORS["red"]).max(-1) <= 2).sum()
    assert red(large) > 2.5 * red(small)


def test_demo_prepare_is_deterministic_and_captions_match(tmp_path):
    run_prepare("demo", tmp_path / "a", res=[8, 16], n=10, shard_size=4, seed=3)
    run_prepare("demo", tmp_path / "b", res=[8, 16], n=10, shard_size=4, seed=3)
    for column in ("images_8", "images_16", data.CAPTION_COLUMN):
        np.testing.assert_array_equal(shard_arrays(tmp_path / "a", column),
                                      shard_arrays(tmp_path / "b", column))
    captions = [c for m in shard_manifests(tmp_path / "a") for c in m["captions"]]
    assert captions == [data.caption_of(data.demo_attributes(3, i)) for i in range(10)]


def test_pixel_mode_values_equal_the_resized_image(tmp_path):
    out = tmp_path / "px"
    run_prepare("demo", out, res=[8, 16], n=6, seed=1)
    images8, images16 = shard_arrays(out, "images_8"), shard_arrays(out, "images_16")
    assert images8.dtype == np.float16 and images8.shape == (6, 3, 8, 8)
    for i in range(6):
        rendered = data.render_shapes(data.demo_attributes(1, i), 16)  # drawn at the largest res
        np.testing.assert_allclose(images16[i], unit(rendered), atol=1e-3)
        np.testing.assert_allclose(images8[i], unit(rendered.resize((8, 8), Image.BICUBIC)),
                                   atol=1e-3)
    batch = next(LatentLoader(str(out), 8, 6, caption_drop_prob=0.0, prefetch=0))
    np.testing.assert_array_equal(batch["latents"].numpy(), images8.astype(np.float32))
    assert batch["latents"].min() >= -1 and batch["latents"].max() <= 1


# ----------------------------------------------------------------------------------------
# image and caption handling

def test_resize_center_crop_matches_direct_pil():
    rng = np.random.default_rng(0)
    noise = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    cases = [  # (w, h, res) -> the resize size and crop box by hand (torchvision's arithmetic)
        ((300, 200, 64), (96, 64), (16, 0, 80, 64)),
        ((200, 301, 64), (64, 96), (0, 16, 64, 80)),   # int(64 * 301 / 200) = 96
        ((64, 99, 32), (32, 49), (0, 8, 32, 40)),      # round(17 / 2) = 8 (round half to even)
        ((310, 200, 64), (99, 64), (18, 0, 82, 64)),   # round(35 / 2) = 18 (half to even)
        ((10, 7, 16), (22, 16), (3, 0, 19, 16)),       # upscaled: int(16 * 10 / 7) = 22
        ((50, 50, 50), (50, 50), (0, 0, 50, 50)),
    ]
    for (w, h, res), size, box in cases:
        img = noise(w, h)
        expected = np.asarray(img.resize(size, Image.BICUBIC).crop(box))
        np.testing.assert_array_equal(np.asarray(prepare_lib.resize_center_crop(img, res)),
                                      expected)


def test_resize_center_crop_of_a_strip_stays_small(monkeypatch):
    """A 1 x 4,000 strip at 512 would resize to 512 x 2,048,000 (3 GB) before the crop:
    such strips resample only the square they keep."""
    sizes = []
    real_resize = Image.Image.resize
    def recording(self, size, *args, **kwargs):
        sizes.append(size)
        return real_resize(self, size, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "resize", recording)
    strip = Image.new("RGB", (1, 4000), (200, 30, 90))
    out = prepare_lib.resize_center_crop(strip, 512)
    assert out.size == (512, 512) and sizes == [(512, 512)]
    assert np.all(np.asarray(out) == (200, 30, 90))
    wide = Image.fromarray(np.tile(np.arange(4000, dtype=np.uint8)[None, :, None] % 251, (3, 1, 3)))
    out = np.asarray(prepare_lib.resize_center_crop(wide, 16)).astype(int)
    # the centre of the strip, not its start: 16 pixels around column 2,000 of the upscaled row
    exact = np.asarray(wide.resize((int(16 * 4000 / 3), 16), Image.BICUBIC)).astype(int)
    left = round((int(16 * 4000 / 3) - 16) / 2)
    assert np.abs(out[1:] - exact[1:, left:left + 16]).max() <= 1


def test_prepare_that_skips_everything_explains_itself(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(src / f"{i}.png")
    (src / "0.caption").write_text("a caption under a name prepare does not read")
    (src / "1.txt").mkdir()                                       # a folder, not a caption
    rc = prepare_lib.main(["--src", str(src), "--out", str(tmp_path / "out"), "--res", "16",
                           "--vae", "none", "--clip", "tiny-random"])
    assert rc == 2 and "every one of the 3 records was skipped" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == {"missing_caption": 3} and summary["samples_written"] == 0
    rc = prepare_lib.main(["--src", str(tmp_path / "nothere"), "--out", str(tmp_path / "o2"),
                           "--res", "16", "--vae", "none", "--clip", "tiny-random"])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err
    # encoder weights not downloaded yet: the message says how to get them
    rc = prepare_lib.main(["--src", str(src), "--out", str(tmp_path / "o3"), "--res", "16",
                           "--vae", str(tmp_path / "weights" / "sdxl" / "vae"),
                           "--clip", "tiny-random"])
    err = capsys.readouterr().err
    assert rc == 2 and "no such file or folder" in err and vae_lib.DOWNLOAD in err


def test_decode_caption():
    counts = collections.Counter()
    assert prepare_lib.decode_caption(b"  a cat\n", counts) == "a cat"
    # the byte-order mark is dropped
    assert prepare_lib.decode_caption("\ufeffa dog".encode("utf-8"), counts) == "a dog"
    assert prepare_lib.decode_caption(b"caf\xe9 au lait", counts) == "café au lait"
    assert prepare_lib.decode_caption(b" \n ", counts) is None
    assert prepare_lib.decode_caption(None, counts) is None
    assert prepare_lib.decode_caption(lambda: b"lazy", counts) == "lazy"
    assert counts == {"non_utf8_caption": 1, "empty_caption": 1, "missing_caption": 1}
    counts.clear()
    # Notepad's "Unicode" is UTF-16 with a byte-order mark, either byte order
    assert prepare_lib.decode_caption("a cat".encode("utf-16"), counts) == "a cat"
    big_endian = b"\xfe\xff" + "a café".encode("utf-16-be")
    assert prepare_lib.decode_caption(big_endian, counts) == "a café"
    assert prepare_lib.decode_caption(b"a\x00 dog\x1b", counts) == "a dog"
    assert prepare_lib.decode_caption(b"\x00\x00", counts) is None  # nothing but control characters
    assert prepare_lib.decode_caption("tab\tand\nnewline".encode(), counts) == "tab\tand\nnewline"

    def unreadable():
        raise PermissionError(13, "Permission denied")
    assert prepare_lib.decode_caption(unreadable, counts) is None
    assert counts == {"utf16_caption": 2, "control_characters": 2, "empty_caption": 1,
                      "unreadable_caption": 1}


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_min_size_skips_small_images_instead_of_upscaling(tmp_path):
    """The paper's 512px phases train on images of at least 512px: --min-size drops the
    smaller ones (counted) rather than upscaling them, and binds the output folder."""
    src = tmp_path / "imgs"
    src.mkdir()
    sizes = {"a_wide": (40, 20), "b_small": (40, 12), "c_square": (16, 16), "d_tall": (15, 90)}
    for stem, size in sizes.items():
        _save(Image.new("RGB", size, (200, 10, 10)), src / f"{stem}.png")
        (src / f"{stem}.txt").write_text(f"a red {stem}")
    summary = run_prepare(src, tmp_path / "all", res=[16])
    assert summary["samples_written"] == 4 and summary["converted"] == {"upscaled": 2}
    assert "min_size" not in json.load(open(tmp_path / "all" / "prepare.json"))
    summary = run_prepare(src, tmp_path / "big", res=[16], min_size=16)
    assert summary["samples_written"] == 2 and summary["skipped"] == {"too_small": 2}
    assert "converted" not in summary or "upscaled" not in summary["converted"]
    assert [k for m in shard_manifests(tmp_path / "big") for k in m["keys"]] == \
        ["a_wide.png", "c_square.png"]
    with pytest.raises(ValueError, match="min_size: 16 then, None now"):
        run_prepare(src, tmp_path / "big", res=[16])
    with pytest.raises(ValueError, match="min_size: None then, 20 now"):
        run_prepare(src, tmp_path / "all", res=[16], min_size=20)
    with pytest.raises(ValueError, match="--min-size -1: must be 0"):
        run_prepare(src, tmp_path / "neg", res=[16], min_size=-1)


def test_upscaled_counts_each_image_once_against_the_largest_resolution(tmp_path):
    """An image counts as upscaled when its short side is below the largest --res: with
    --res 8 16 a 12 px image counts once (it is only shrunk for 8), a 6 px one once too
    though both resolutions enlarge it, 16 and 20 px ones not at all."""
    src = tmp_path / "imgs"
    src.mkdir()
    for stem, size in {"a12": (12, 30), "b6": (6, 6), "c16": (16, 16), "d20": (24, 20)}.items():
        _save(Image.new("RGB", size, (20, 20, 200)), src / f"{stem}.png")
        (src / f"{stem}.txt").write_text(f"a blue {stem}")
    summary = run_prepare(src, tmp_path / "out", res=[8, 16])
    assert summary["samples_written"] == 4 and summary["converted"] == {"upscaled": 2}
    only = src.parent / "only"
    only.mkdir()
    for f in ("a12.png", "a12.txt"):
        shutil.copy(src / f, only)
    assert run_prepare(only, tmp_path / "one", res=[8, 16])["converted"] == {"upscaled": 1}


def test_to_rgb_scales_float_and_16bit_images(tmp_path):
    from prepare import to_rgb
    # float TIFFs: PIL's own conversion made [0, 1] floats black
    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    for white, stored in ((1, ramp), (255, ramp * 255), (65535, ramp * 65535)):
        _save(Image.fromarray(stored), tmp_path / "f.tif")
        counts = collections.Counter()
        rgb = np.asarray(to_rgb(Image.open(tmp_path / "f.tif"), counts))
        np.testing.assert_array_equal(rgb, np.repeat(np.round(ramp * 255)[..., None], 3, -1),
                                      err_msg=f"white {white}")
        assert counts == {"float_image": 1, "grayscale": 1}
    # 16-bit grey with a transparent value (PNG tRNS): that value composites to white
    values = np.array([[0, 1000, 65535, 25700]], np.uint16).repeat(2, 0)
    _save(Image.fromarray(values), tmp_path / "t.png", transparency=1000)
    counts = collections.Counter()
    rgb = np.asarray(to_rgb(Image.open(tmp_path / "t.png"), counts))[..., 0]
    np.testing.assert_array_equal(rgb, np.array([[0, 255, 255, 100]]).repeat(2, 0))
    assert counts == {"high_bit_depth": 1, "grayscale": 1, "alpha_composited": 1}


def test_a_caption_without_its_image_is_counted_and_named(tmp_path, capsys):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    for stem in ("a", "b", os.path.join("sub", "c")):
        Image.new("RGB", (16, 16), (200, 0, 0)).save(src / f"{stem}.png")
        (src / f"{stem}.txt").write_text(f"picture {stem}")
    (src / "sub" / "x.txt").write_text("the image of this caption was never copied")
    (src / "sub" / "y.png.txt").write_text("a caption named after the image's whole name")
    Image.new("RGB", (16, 16)).save(src / "sub" / "y.png")
    summary = run_prepare(src, tmp_path / "out", shard_size=2)
    assert summary["samples_written"] == 3 and summary["records_seen"] == 6
    assert summary["skipped"] == {"missing_caption": 1, "missing_image": 2}
    assert summary["skipped_first"] == {
        "missing_caption": [os.path.join("sub", "y.png")],
        "missing_image": [os.path.join("sub", "x.txt"), os.path.join("sub", "y.png.txt")]}
    assert os.path.join("sub", "x.txt") in capsys.readouterr().out  # the printed summary


def test_folder_with_nasty_inputs(tmp_path):
    src = tmp_path / "imgs"
    (src / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def add(stem, img, caption=b"a picture", fmt="PNG", **kw):
        path = src / f"{stem}.{'jpg' if fmt == 'JPEG' else 'png'}"
        _save(img, path, format=fmt, **kw)
        if caption is not None:
            (src / f"{stem}.txt").write_bytes(caption)
        return path

    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    add("a_rgb", Image.fromarray(rgb), caption=b"plain rgb")
    add("b_gray", Image.new("L", (16, 16), 100))
    add("c_cmyk", Image.new("CMYK", (16, 16), (0, 255, 0, 0)), fmt="JPEG", quality=100)
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    add("d_palette", palette)
    bands = np.repeat(np.array([0, 25700, 51400, 65535], np.uint16), 4)[:, None]  # / 257
    add("e_16bit", Image.fromarray(np.broadcast_to(bands, (16, 16)).copy()))
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128  # half-transparent red
    add("f_rgba", Image.fromarray(rgba, "RGBA"))
    add("g_tiny", Image.new("RGB", (4, 4), (10, 20, 30)))
    add("sub/h_empty_caption", Image.fromarray(rgb), caption=b"   ")
    add("sub/i_no_caption", Image.fromarray(rgb), caption=None)
    add("sub/deeper/j_latin1", Image.fromarray(rgb), caption=b"caf\xe9")
    good_jpeg = add("sub/deeper/k_truncated", Image.fromarray(rgb), fmt="JPEG")
    good_jpeg.write_bytes(good_jpeg.read_bytes()[:200])
    (src / "l_not_an_image.png").write_bytes(b"this is not a png")
    (src / "l_not_an_image.txt").write_bytes(b"garbage")

    out = tmp_path / "out"
    summary = run_prepare(src, out, res=[16], shard_size=4)
    assert summary == {
        "samples_written": 8, "records_seen": 12,
        "skipped": {"missing_caption": 1, "empty_caption": 1, "unreadable_image": 2},
        # the 16-bit image is grayscale too: counts are tags, one image can have several
        "converted": {"alpha_composited": 1, "cmyk": 1, "grayscale": 2, "high_bit_depth": 1,
                      "non_utf8_caption": 1, "palette": 1, "upscaled": 1},
        # the skipped records by name, so that they can be found and mended
        "skipped_first": {"empty_caption": [os.path.join("sub", "h_empty_caption.png")],
                          "missing_caption": [os.path.join("sub", "i_no_caption.png")],
                          "unreadable_image": ["l_not_an_image.png",
                                               os.path.join("sub", "deeper", "k_truncated.jpg")]},
        "skipped_all": 'the "skipped" list of each shard-NNNNN.json'}
    assert json.load(open(out / "summary.json")) == summary
    assert sorted(k for m in shard_manifests(out) for k, _ in m["skipped"]) == sorted(
        k for keys in summary["skipped_first"].values() for k in keys)
    keys = [k for m in shard_manifests(out) for k in m["keys"]]
    captions = [c for m in shard_manifests(out) for c in m["captions"]]
    assert keys == ["a_rgb.png", "b_gray.png", "c_cmyk.jpg", "d_palette.png", "e_16bit.png",
                    "f_rgba.png", "g_tiny.png", os.path.join("sub", "deeper", "j_latin1.png")]
    assert captions[0] == "plain rgb" and captions[-1] == "café"
    px = shard_arrays(out, "images_16").astype(np.float32)
    expected = {
        "a_rgb.png": unit(rgb),
        "b_gray.png": unit(np.full((16, 16, 3), 100)),
        "c_cmyk.jpg": unit(np.asarray(Image.open(src / "c_cmyk.jpg").convert("RGB"))),
        "d_palette.png": unit(np.broadcast_to([10, 200, 30], (16, 16, 3))),
        "e_16bit.png": unit(np.broadcast_to(np.repeat([0, 100, 200, 255], 4)[:, None, None],
                                        (16, 16, 3))),
        # alpha 128 over white: 255 * 128/255 + 255 * (1 - 128/255) for red, 255 * 127/255 else
        "f_rgba.png": unit(np.broadcast_to([255, 127, 127], (16, 16, 3))),
        "g_tiny.png": unit(np.broadcast_to([10, 20, 30], (16, 16, 3))),  # constant stays so
        os.path.join("sub", "deeper", "j_latin1.png"): unit(rgb),
    }
    rounding = {"f_rgba.png", "g_tiny.png"}  # blending and bicubic weights may round either way
    for i, key in enumerate(keys):
        atol = 1.01 / 127.5 if key in rounding else 1e-3  # else: float16 storage only
        np.testing.assert_allclose(px[i], expected[key], atol=atol, err_msg=key)


def test_odd_paths_rotated_photos_and_unreadable_captions(tmp_path):
    src = tmp_path / "photos [2024]"  # glob characters in a folder's name
    src.mkdir()
    # 32 x 16, left half red, right half blue, tagged "rotate 90 clockwise to display"
    # (EXIF orientation 6: the stored left column is the displayed top row)
    sideways = np.zeros((16, 32, 3), np.uint8)
    sideways[:, :16, 0], sideways[:, 16:, 2] = 255, 255
    exif = Image.Exif()
    exif[prepare_lib.EXIF_ORIENTATION] = 6
    Image.fromarray(sideways).save(src / "a_phone.png", exif=exif)
    (src / "a_phone.txt").write_bytes("a red and blue flag".encode("utf-16"))
    plain = np.full((16, 16, 3), 90, np.uint8)
    # a file name that is not UTF-8 (Latin-1 'café'), as old archives have
    with open(os.fsencode(src) + b"/b_caf\xe9.png", "wb") as f:
        Image.fromarray(plain).save(f, format="PNG")
    with open(os.fsencode(src) + b"/b_caf\xe9.txt", "wb") as f:
        f.write(b"a grey square")
    Image.fromarray(plain).save(src / "c_loop.png")
    os.symlink("c_loop.txt", src / "c_loop.txt")  # a caption that cannot be opened
    out = tmp_path / "out"
    summary = run_prepare(src, out, res=[16])
    assert summary["samples_written"] == 2
    assert summary["skipped"] == {"unreadable_caption": 1}
    assert summary["converted"] == {"exif_rotated": 1, "utf16_caption": 1}
    manifest = shard_manifests(out)[0]
    assert manifest["captions"] == ["a red and blue flag", "a grey square"]
    assert manifest["keys"][1] == os.fsdecode(b"b_caf\xe9.png")
    px = shard_arrays(out, "images_16").astype(np.float32)
    # displayed upright (16 x 32), the centre square: red above blue
    upright = np.zeros((16, 16, 3), np.uint8)
    upright[:8, :, 0], upright[8:, :, 2] = 255, 255
    np.testing.assert_allclose(px[0], unit(upright), atol=1.01 / 127.5)
    np.testing.assert_allclose(px[1], unit(plain), atol=1e-3)


def test_sources_that_cannot_be_read_are_explained(tmp_path):
    bad = tmp_path / "images.tar.gz"
    bad.write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match="a file prepare does not read"):
        prepare_lib.detect_format(str(bad))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    (mixed / "stray.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="both .tar files.*and images"):
        prepare_lib.detect_format(str(mixed))
    not_coco = tmp_path / "notcoco.json"
    not_coco.write_text('{"categories": []}')
    with pytest.raises(ValueError, match="notcoco.json: not a COCO captions file"):
        run_prepare(not_coco, tmp_path / "o1")
    cut = tmp_path / "cut.json"
    cut.write_text('{"images": [')
    with pytest.raises(ValueError, match="cut.json: not valid JSON"):
        run_prepare(cut, tmp_path / "o2")
    for flag, value in [("res", [0]), ("shard_size", 0), ("batch_size", -1)]:
        with pytest.raises(ValueError, match="must be at least 1"):
            run_prepare(mixed / "a.png", tmp_path / "o3", **{flag: value})
    with pytest.raises(ValueError, match="multiple of 8"):
        run_prepare("demo", tmp_path / "o3", format="demo", res=[20], vae="fixtures/vae_tiny_4ch")
    # a mistyped --vae stops the run before its first shard: the folder binds nothing yet
    with pytest.raises(FileNotFoundError):
        run_prepare("demo", tmp_path / "o4", format="demo", n=3, vae="weights/typo-vae")
    assert run_prepare("demo", tmp_path / "o4", format="demo", n=3)["samples_written"] == 3
    # once a shard exists, other settings are refused as before
    with pytest.raises(ValueError, match="other settings"):
        run_prepare("demo", tmp_path / "o4", format="demo", n=3, seed=1)


def test_tar_shards_as_img2dataset_writes_them(tmp_path):
    src = tmp_path / "tars"
    src.mkdir()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(5)]

    def encoded(array, fmt):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        return buf.getvalue()

    def write_tar(path, members):
        with tarfile.open(path, "w") as tar:
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    write_tar(src / "00000.tar", [
        ("000000000.jpg", encoded(images[0], "JPEG")), ("000000000.txt", b"first"),
        ("000000000.json", b'{"caption": "first", "url": "x"}'),
        ("000000001.png", encoded(images[1], "PNG")), ("000000001.txt", b"second"),
        ("000000002.webp", encoded(images[2], "WEBP")),
        ("000000002.json", b'{"caption": "from the json"}'),
        ("000000003.txt", b"caption without an image"),
    ])
    write_tar(src / "00001.tar", [
        ("000010000.png", encoded(images[3], "PNG")), ("000010000.txt", b"fourth"),
        ("000010001.png", encoded(images[4], "PNG")), ("000010001.txt", b"fifth"),
    ])
    write_tar(src / "00002.tar", [
        ("000020000.png", encoded(images[0], "PNG")),
        ("000020000.json", '{"caption": "caf\u00e9 in the json"}'.encode("cp1252")),
        ("000020001.png", encoded(images[1], "PNG")), ("000020001.txt", b"cut off"),
    ])
    (src / "00001_stats.json").write_text(json.dumps({"successes": 2}))
    # cut the second tar inside its last image: the samples before it survive
    with tarfile.open(src / "00001.tar") as tar:
        cut = tar.getmembers()[-2].offset_data + 10
    (src / "00001.tar").write_bytes((src / "00001.tar").read_bytes()[:cut])
    # cut the third exactly before a header, where tarfile itself stops without a word
    with tarfile.open(src / "00002.tar") as tar:
        cut = tar.getmembers()[-1].offset
    (src / "00002.tar").write_bytes((src / "00002.tar").read_bytes()[:cut])

    out = tmp_path / "out"
    summary = run_prepare(src, out, res=[16])
    assert summary["skipped"] == {"missing_image": 1, "bad_tar": 2}
    assert summary["converted"]["non_utf8_caption"] == 1
    manifests = shard_manifests(out)
    assert [m["origin"] for m in manifests] == [str(src / f"0000{i}.tar") for i in range(3)]
    assert [c for m in manifests for c in m["captions"]] == ["first", "second", "from the json",
                                                              "fourth", "caf\u00e9 in the json"]
    assert manifests[0]["keys"][0] == "00000.tar/000000000"
    px = shard_arrays(out, "images_16")
    for i, (array, fmt) in enumerate([(images[0], "JPEG"), (images[1], "PNG"),
                                      (images[2], "WEBP"), (images[3], "PNG")]):
        decoded = Image.open(io.BytesIO(encoded(array, fmt))).convert("RGB")
        ref = decoded.resize((19, 16), Image.BICUBIC).crop((2, 0, 18, 16))  # int(16*24/20)=19
        np.testing.assert_allclose(px[i], unit(ref), atol=1e-3)


def test_coco_first_or_every_caption(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2014").mkdir()
    rng = np.random.default_rng(2)
    for image_id in (3, 1, 2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / "train2014" / f"COCO_train2014_{image_id:012d}.jpg")
    coco = {"images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg"} for i in (3, 1, 2)],
            "annotations": [{"image_id": 1, "id": 10, "caption": "one a"},
                            {"image_id": 3, "id": 13, "caption": "three b"},  # first in the
                            {"image_id": 1, "id": 12, "caption": "one b"},    # file, but the
                            {"image_id": 3, "id": 11, "caption": "three a"}]}  # lowest id wins
    json_path = root / "annotations" / "captions_train2014.json"
    json_path.write_text(json.dumps(coco))
    run_prepare(json_path, tmp_path / "first")
    first = shard_manifests(tmp_path / "first")
    assert [k for m in first for k in m["keys"]] == ["1", "3"]  # image 2 has no caption
    assert [c for m in first for c in m["captions"]] == ["one a", "three a"]
    run_prepare(json_path, tmp_path / "all", coco_captions="all")
    every = shard_manifests(tmp_path / "all")
    assert [c for m in every for c in m["captions"]] == ["one a", "one b", "three a", "three b"]
    assert [k for m in every for k in m["keys"]] == ["1-10", "1-12", "3-11", "3-13"]
    px = shard_arrays(tmp_path / "all", "images_16")
    np.testing.assert_array_equal(px[0], px[1])  # same image, two captions
    # a null caption is a missing one: skipped and counted, never the end of the run
    coco["annotations"][0]["caption"] = None
    json_path.write_text(json.dumps(coco))
    summary = run_prepare(json_path, tmp_path / "null", coco_captions="all")
    assert summary["samples_written"] == 3 and summary["skipped"] == {"missing_caption": 1}


# ----------------------------------------------------------------------------------------
# encoders

def test_vae_latents_equal_encode_to_scaled_and_caption_features_equal_the_encoder(tmp_path):
    from text import load_text_encoder
    from vae import load_vae
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(3)
    sizes = [(20, 16), (16, 30), (16, 16)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"image number {i}")
    out = tmp_path / "out"
    run_prepare(src, out, res=[16], vae=VAE_TINY, seed=5, batch_size=2)
    index = json.load(open(out / "index.json"))
    assert index["scaling_factor"] == 0.13025 and index["vae"] == VAE_TINY
    latents = shard_arrays(out, "latents_16")
    assert latents.dtype == np.float16 and latents.shape == (3, 4, 8, 8)
    vae = load_vae(VAE_TINY)
    for i in range(3):
        img = Image.open(src / f"{i}.png").convert("RGB")
        x = torch.from_numpy(unit(prepare_lib.resize_center_crop(img, 16)))[None]
        generator = prepare_lib.posterior_generator(5, f"{i}.png", 16)
        expected = vae.encode_to_scaled(x, generator=generator)
        np.testing.assert_allclose(latents[i].astype(np.float32), expected[0].numpy(),
                                   rtol=2e-3, atol=2e-3)
    # the noise really is a sample: another seed gives other latents
    other = vae.encode_to_scaled(x, generator=prepare_lib.posterior_generator(6, "2.png", 16))
    assert not np.allclose(latents[2].astype(np.float32), other[0].numpy(), atol=1e-2)
    # and each image (and resolution) has noise of its own, not one draw for all
    def draw(*key):
        return torch.randn(8, generator=prepare_lib.posterior_generator(*key))
    assert not torch.equal(draw(5, "0.png", 16), draw(5, "1.png", 16))
    assert not torch.equal(draw(5, "0.png", 16), draw(5, "0.png", 32))
    features = load_text_encoder("tiny-random").encode([f"image number {i}" for i in range(3)])
    np.testing.assert_allclose(shard_arrays(out, data.CAPTION_COLUMN).astype(np.float32),
                               features.numpy(), rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------------------
# resume and ranks

def _all_outputs(out):
    """Every file a finished prepare leaves, as comparable values."""
    result = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        result[name] = np.load(path).tobytes() if name.endswith(".npy") else open(path).read()
    return result


def test_prepare_resumes_after_a_crash_and_never_trusts_a_half_written_shard(tmp_path,
                                                                              monkeypatch):
    settings = dict(res=[16], vae=VAE_TINY, n=12, shard_size=4, seed=2)
    run_prepare("demo", tmp_path / "whole", **settings)

    real_write_shard = prepare_lib.write_shard
    calls = []

    def crash_on_second_shard(out, shard_id, columns, *args):
        calls.append(shard_id)
        if len(calls) == 2:  # die in the middle of writing: one column and a temp file
            name = data.shard_name(shard_id)
            np.save(data.column_path(out, name, "latents_16"), np.zeros(3, np.float16))
            open(os.path.join(out, f"{name}.caption_feats.npy.tmp-999"), "wb").write(b"\x93NUM")
            raise KeyboardInterrupt("killed")
        return real_write_shard(out, shard_id, columns, *args)

    monkeypatch.setattr(prepare_lib, "write_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_prepare("demo", tmp_path / "resumed", **settings)
    assert calls == [0, 1]
    assert data.read_manifest(str(tmp_path / "resumed"), 1) is None
    with pytest.raises(FileNotFoundError, match="interrupted"):
        data.LatentDataset(str(tmp_path / "resumed"))

    calls.clear()
    monkeypatch.setattr(prepare_lib, "write_shard", lambda *a: (calls.append(a[1]),
                                                         real_write_shard(*a)))
    run_prepare("demo", tmp_path / "resumed", **settings)
    assert calls == [1, 2]  # shard 0 was kept, the half-written shard 1 was redone
    assert _all_outputs(tmp_path / "whole") == _all_outputs(tmp_path / "resumed")

    with pytest.raises(ValueError, match="other settings"):
        run_prepare("demo", tmp_path / "resumed", **{**settings, "res": [8]})


@pytest.mark.parametrize("fails, error", [
    # a full disk as the OS reports it, on the manifest: every column of the shard is whole
    ("shard-00002.json", OSError(errno.ENOSPC, "No space left on device")),
    # numpy's own words for a short write, on the second column: the first one is whole
    ("shard-00002.caption_feats.npy", OSError("137984 requested and 22464 written"))])
def test_prepare_on_a_full_disk_says_so_and_the_same_command_resumes(tmp_path, monkeypatch,
                                                                     capsys, fails, error):
    def command(out):
        return ["--src", "demo", "--out", str(out), "--n", "10", "--shard-size", "4",
                "--res", "16", "--vae", "none", "--clip", "tiny-random", "--workers", "2"]

    assert not prepare_lib.main(command(tmp_path / "whole"))
    real_atomic_write = checkpoint.atomic_write

    def disk_fills_up(path, write):
        def part_then_fail(f):  # some bytes land before the disk is full
            f.write(b"\x93NUMPY half")
            raise error
        return real_atomic_write(path, part_then_fail if path.endswith(fails) else write)

    for module in (checkpoint, prepare_lib):  # write_json writes the manifests
        monkeypatch.setattr(module, "atomic_write", disk_fills_up)
    out = tmp_path / "full"
    assert prepare_lib.main(command(out)) == 2  # a message, not a traceback
    err = capsys.readouterr().err
    assert "the disk is full" in err and f"shard-00002 in {out}" in err
    assert "2 of its 3 shards complete (8 images" in err and "rerun the same command" in err
    assert not glob.glob(str(out / "*.tmp-*"))  # no half file left behind
    assert prepare_lib.read_manifest(str(out), 2) is None
    monkeypatch.undo()
    assert not prepare_lib.main(command(out))
    assert "2 already done" in capsys.readouterr().out  # resumed, not started over
    assert _all_outputs(tmp_path / "whole") == _all_outputs(out)


def test_prepare_split_over_ranks_equals_one_process(tmp_path):
    settings = dict(res=[16], n=10, shard_size=3)
    run_prepare("demo", tmp_path / "one", **settings)
    assert run_prepare("demo", tmp_path / "two", rank=1, world_size=2, **settings) is None
    assert not (tmp_path / "two" / "index.json").exists()  # rank 0's shards are missing
    names = sorted(os.listdir(tmp_path / "two"))
    assert "shard-00001.json" in names and "shard-00000.json" not in names
    assert run_prepare("demo", tmp_path / "two", rank=0, world_size=2, **settings) is not None
    assert _all_outputs(tmp_path / "one") == _all_outputs(tmp_path / "two")


def test_prepare_rank_writes_exactly_its_own_shards(tmp_path, monkeypatch):
    """Shard i belongs to rank i % world_size: rank 1 of 2 writes shards 1 and 3 of 4 and
    nothing of rank 0's (two ranks writing one shard would race for its files)."""
    written = []
    real_write_shard = prepare_lib.write_shard
    monkeypatch.setattr(prepare_lib, "write_shard", lambda out, i, *a: (written.append(i),
                                                                 real_write_shard(out, i, *a)))
    assert run_prepare("demo", tmp_path / "two", rank=1, world_size=2, n=10,
                       shard_size=3) is None
    assert written == [1, 3]
    assert sorted(f for f in os.listdir(tmp_path / "two") if f.startswith("shard-")
                  and f.endswith(".json")) == ["shard-00001.json", "shard-00003.json"]
    keys = [json.loads((tmp_path / "two" / f"shard-0000{i}.json").read_text())["keys"]
            for i in (1, 3)]
    assert keys == [[f"shapes-{i:07d}" for i in range(3, 6)], ["shapes-0000009"]]


def test_ddp_ranks_are_disjoint_and_cover_each_epoch(tmp_path):
    root = id_dataset(tmp_path / "ids", 120)
    world = 3
    loaders = [LatentLoader(root, 16, 8, rank=r, world_size=world, prefetch=0)
               for r in range(world)]
    for epoch in range(2):
        seen = [sum((ids_of(next(l)) for _ in range(5)), []) for l in loaders]  # 40 = 120 / 3
        for r in range(world):
            assert len(set(seen[r])) == 40
            for q in range(r):
                assert not set(seen[r]) & set(seen[q])
        assert sorted(sum(seen, [])) == list(range(120))
        if epoch == 0:
            first = seen
    assert first != seen  # a new permutation every epoch
    states = [l.state_dict() for l in loaders]
    assert states[0] == states[1] == states[2]


def test_ranks_together_read_what_one_process_reads_in_micro_batches(tmp_path):
    """W ranks' k-th batches are one process's batches kW .. kW + W - 1, captions dropped
    alike, even across an epoch boundary and with two mixed sources: what makes a torchrun
    run equal a one-process run with the same global batch."""
    a = id_dataset(tmp_path / "a", 50)
    b = make_dataset(tmp_path / "b", -np.arange(1, 31)[:, None, None, None] * np.ones((1, 4, 2, 2)))
    sources = f"{a}:0.7,{b}:0.3"
    single = LatentLoader(sources, 16, 8, prefetch=0, caption_drop_prob=0.3)
    ranks = [LatentLoader(sources, 16, 8, rank=r, world_size=2, prefetch=0,
                          caption_drop_prob=0.3) for r in range(2)]
    for _ in range(8):
        for r in range(2):
            expected, got = next(single), next(ranks[r])
            assert torch.equal(expected["latents"], got["latents"])
            assert torch.equal(expected["captions"], got["captions"])


# ----------------------------------------------------------------------------------------
# loader

def test_state_dict_restores_the_exact_position(tmp_path):
    a = id_dataset(tmp_path / "a", 50)
    b = make_dataset(tmp_path / "b", -np.arange(1, 31)[:, None, None, None] * np.ones((1, 4, 2, 2)))
    sources = f"{a}:0.7,{b}:0.3"
    loader = LatentLoader(sources, 16, 16, seed=4, caption_drop_prob=0.3, prefetch=2)
    for _ in range(7):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # plain types only
    expected = [next(loader) for _ in range(9)]  # crosses epoch boundaries of both sources
    restored = LatentLoader(sources, 16, 16, seed=4, caption_drop_prob=0.3, prefetch=2)
    next(restored)  # a loader that already moved on is rewound as well
    restored.load_state_dict(state)
    synchronous = LatentLoader(sources, 16, 16, seed=4, caption_drop_prob=0.3, prefetch=0)
    synchronous.load_state_dict(state)
    for want in expected:  # batches held in a list stay intact: buffers are reused only once free
        for other in (restored, synchronous):
            got = next(other)
            torch.testing.assert_close(got["latents"], want["latents"], rtol=0, atol=0)
            torch.testing.assert_close(got["captions"], want["captions"], rtol=0, atol=0)
    assert len({tuple(ids_of(b)) for b in expected}) == len(expected)
    loader.close()
    restored.close()


def test_mixing_weights_are_observed(tmp_path):
    a = id_dataset(tmp_path / "a", 100)
    b = make_dataset(tmp_path / "b", -np.ones((40, 4, 2, 2)))
    for sources in (f"{a}:0.7,{b}:0.3", [(a, 7), (b, 3)]):
        loader = LatentLoader(sources, 16, 64, prefetch=0, caption_drop_prob=0.0)
        from_a = sum((next(loader)["latents"][:, 0, 0, 0] >= 0).sum().item() for _ in range(200))
        assert abs(from_a / (200 * 64) - 0.7) < 0.02
    equal = LatentLoader(f"{a},{b}", 16, 64, prefetch=0)  # weights default to 1 each
    from_a = sum((next(equal)["latents"][:, 0, 0, 0] >= 0).sum().item() for _ in range(100))
    assert abs(from_a / (100 * 64) - 0.5) < 0.03


def test_caption_drop_rate_and_kept_captions_are_the_stored_ones(tmp_path):
    root = id_dataset(tmp_path / "ids", 200)
    loader = LatentLoader(root, 16, 64, seed=1, caption_drop_prob=0.1, prefetch=0)
    dropped = total = 0
    for _ in range(300):
        batch = next(loader)
        zero = (batch["captions"] == 0).all(dim=2).all(dim=1)
        dropped, total = dropped + zero.sum().item(), total + len(zero)
        ids = torch.tensor(ids_of(batch))
        kept = batch["captions"][~zero][:, 0, 0]
        torch.testing.assert_close(kept, (ids[~zero] % 97 + 1).float())
    assert abs(dropped / total - 0.1) < 0.01
    never = LatentLoader(root, 16, 64, caption_drop_prob=0.0, prefetch=0)
    assert all((next(never)["captions"] != 0).any(dim=2).all() for _ in range(20))


def _write_mds(root, shards, compression=None, encodings=None):
    """A tiny MosaicML MDS writer (format version 2, uncompressed): the paper's columns, each
    shard in its own sub-folder the way merge_index lays out the paper's precompute output.
    `encodings` overrides a column's: 'ndarray:float16:<shape>' makes it a fixed-size column,
    whose size is in column_sizes and not in each sample's header, as MDSWriter writes it."""
    columns = {"caption": "str", "caption_latents": "bytes", "latents_256": "bytes",
               "latents_512": "bytes", **(encodings or {})}
    names = sorted(columns)
    sizes = [2 * math.prod(int(d) for d in columns[n].split(":")[2].split(","))
             if columns[n].startswith("ndarray:float16:") else None for n in names]
    config = {"version": 2, "format": "mds", "compression": compression, "hashes": [],
              "size_limit": 1 << 26, "column_names": names,
              "column_encodings": [columns[n] for n in names],
              "column_sizes": sizes}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    infos = []
    for i, samples in enumerate(shards):
        encoded = []
        for sample in samples:
            fields = [sample[n].encode() if isinstance(sample[n], str) else sample[n].tobytes()
                      for n in names]
            assert all(size in (None, len(f)) for size, f in zip(sizes, fields))
            encoded.append(np.array([len(f) for f, size in zip(fields, sizes) if size is None],
                                    np.uint32).tobytes() + b"".join(fields))
        n = len(encoded)
        offsets = (4 + 4 * (n + 1) + len(config_bytes)
                   + np.concatenate([[0], np.cumsum([len(e) for e in encoded])]))
        raw = (np.uint32(n).tobytes() + offsets.astype(np.uint32).tobytes() + config_bytes
               + b"".join(encoded))
        basename = f"{i}/shard.00000.mds"
        os.makedirs(os.path.join(root, str(i)), exist_ok=True)
        with open(os.path.join(root, basename), "wb") as f:
            f.write(raw)
        zip_data = ({"basename": basename + ".zstd", "bytes": 1, "hashes": {}}
                    if compression else None)
        infos.append({"samples": n, "raw_data": {"basename": basename, "bytes": len(raw),
                                                 "hashes": {}}, "zip_data": zip_data, **config})
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"version": 2, "shards": infos}, f)
    return str(root)


def test_mds_shards_read_like_ours(tmp_path):
    rng = np.random.default_rng(5)
    samples = [{"caption": "x" * int(rng.integers(1, 40)) + f" {i}",  # odd lengths: odd offsets
                "caption_latents": rng.standard_normal((77, 8)).astype(np.float16),
                "latents_256": rng.standard_normal((4, 32, 32)).astype(np.float16),
                "latents_512": rng.standard_normal((4, 64, 64)).astype(np.float16)}
               for i in range(11)]
    mds = _write_mds(tmp_path / "mds", [samples[:6], samples[6:]])
    assert data.LatentDataset(mds).kind == "mds"
    assert_mds_reads_back(mds, samples)
    # the same loader mixes MDS with our shards
    ours = make_dataset(tmp_path / "ours", np.full((20, 4, 32, 32), 7.0), res=256)
    mixed = LatentLoader(f"{mds}:1,{ours}:1", 256, 32, prefetch=0, caption_drop_prob=0.0)
    latents = next(mixed)["latents"]
    from_ours = (latents == 7).flatten(1).all(1)
    assert 0 < from_ours.sum() < 32
    compressed = _write_mds(tmp_path / "zstd", [samples[:3]], compression="zstd")
    with pytest.raises(ValueError, match="compressed"):
        data.LatentDataset(compressed)


def assert_mds_reads_back(mds, samples):
    """Every column of every sample of an MDS folder reads back as the array stored."""
    dataset = data.LatentDataset(mds)
    assert dataset.num_samples == len(samples)
    assert dataset.columns == {data.CAPTION_COLUMN: (77, 8), "latents_256": (4, 32, 32),
                               "latents_512": (4, 64, 64)}
    assert [dataset.caption(i) for i in range(len(samples))] == [s["caption"] for s in samples]
    for res in (256, 512):
        # one batch of everything: ids come sorted, so it is the dataset in order
        batch = next(LatentLoader(mds, res, len(samples), caption_drop_prob=0.0, prefetch=0))
        expected = np.stack([s[f"latents_{res}"] for s in samples]).astype(np.float32)
        np.testing.assert_array_equal(batch["latents"].numpy(), expected)
        expected = np.stack([s["caption_latents"] for s in samples]).astype(np.float32)
        np.testing.assert_array_equal(batch["captions"].numpy(), expected)


def test_mds_fixed_size_ndarray_columns_read_like_bytes_ones(tmp_path):
    """MDSWriter's 'ndarray:float16:<shape>' columns have a fixed size: it is in the
    shard's column_sizes, not in each sample's header, and the shape is in the encoding.
    Between variable-size columns (the caption before, latents_512 after), every row must
    read back as the array stored."""
    rng = np.random.default_rng(8)
    samples = [{"caption": "y" * int(rng.integers(1, 30)) + f" {i}",  # odd offsets again
                "caption_latents": rng.standard_normal((77, 8)).astype(np.float16),
                "latents_256": rng.standard_normal((4, 32, 32)).astype(np.float16),
                "latents_512": rng.standard_normal((4, 64, 64)).astype(np.float16)}
               for i in range(7)]
    fixed = {"caption_latents": "ndarray:float16:77,8", "latents_256": "ndarray:float16:4,32,32"}
    mds = _write_mds(tmp_path / "mds", [samples[:4], samples[4:]], encodings=fixed)
    index = json.loads((tmp_path / "mds" / "index.json").read_text())
    assert index["shards"][0]["column_sizes"] == [None, 77 * 8 * 2, 4 * 32 * 32 * 2, None]
    assert_mds_reads_back(mds, samples)


def test_damaged_shards_are_found_when_the_data_opens(tmp_path, capsys):
    """Not hours into a run, when a batch first draws from the damaged shard."""
    rng = np.random.default_rng(6)
    samples = [{"caption": f"c{i}", "caption_latents": rng.standard_normal((77, 8)).astype(np.float16),
                "latents_256": rng.standard_normal((4, 32, 32)).astype(np.float16),
                "latents_512": rng.standard_normal((4, 64, 64)).astype(np.float16)}
               for i in range(6)]
    mds = _write_mds(tmp_path / "mds", [samples[:3], samples[3:]])
    shard = glob.glob(os.path.join(mds, "*", "shard.00000.mds"))[-1]
    with open(shard, "r+b") as f:  # a partial download
        f.truncate(os.path.getsize(shard) - 100)
    with pytest.raises(ValueError, match="cut short or not an MDS shard"):
        data.LatentDataset(mds)
    with open(shard, "r+b") as f:
        f.truncate(30)  # shorter than its own header
    with pytest.raises(ValueError, match=f"{re.escape(shard)}: 30 bytes"):
        data.LatentDataset(mds)

    ours = id_dataset(tmp_path / "ours", 120, shard_size=50)
    assert data.LatentDataset(ours).num_samples == 120
    last = data.column_path(ours, data.shard_name(2), "latents_16")
    np.save(last, np.zeros((20, 1, 2, 2), np.float16))  # broadcasts over the 4 channels
    with pytest.raises(ValueError, match=r"float16 \[20, 1, 2, 2\], index.json says float16 \[20, 4, 2, 2\]"):
        data.LatentDataset(ours)
    whole = np.zeros((20, 4, 2, 2), np.float16)
    np.save(last, whole)
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) - 8)
    with pytest.raises(ValueError, match="shard-00002.latents_16.npy: cannot be read"):
        data.LatentDataset(ours)
    os.remove(last)
    with pytest.raises(ValueError, match="shard-00002.latents_16.npy: cannot be read.*rerun"):
        data.LatentDataset(ours)
    np.save(last, whole)
    index = os.path.join(ours, "index.json")
    with open(index, "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="index.json: not valid JSON"):
        data.LatentDataset(ours)
    assert data.main(["info", str(tmp_path / "nothere")]) == 2  # a message, not a traceback
    assert "nothere: no such data folder" in capsys.readouterr().err


def test_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no index.json.*prepare.py --src"):
        LatentLoader(str(tmp_path / "empty"), 16, 4)
    four = id_dataset(tmp_path / "four", 10, channels=4)
    sixteen = id_dataset(tmp_path / "sixteen", 10, channels=16)
    with pytest.raises(ValueError, match="do not agree on latent or caption shapes") as e:
        LatentLoader(f"{four},{sixteen}", 16, 4)
    assert four in str(e.value) and sixteen in str(e.value)
    with pytest.raises(ValueError, match="no latents at resolution 512.*latents_16"):
        LatentLoader(four, 512, 4)
    wide = id_dataset(tmp_path / "wide", 10, caption_dim=16)
    with pytest.raises(ValueError, match="do not agree"):
        LatentLoader([four, wide], 16, 4)
    with pytest.raises(ValueError, match="weights > 0"):
        LatentLoader(f"{four}:0", 16, 4)
    saved = LatentLoader(four, 16, 4).state_dict()
    with pytest.raises(ValueError, match="changed size"):
        LatentLoader(id_dataset(tmp_path / "other", 12), 16, 4).load_state_dict(saved)


def test_data_info_and_ensure_demo_data(tmp_path):
    out = prepare_lib.ensure_demo_data(str(tmp_path / "demo"), master=True, res=8, n=5)
    first = os.path.getmtime(os.path.join(out, "index.json"))
    assert prepare_lib.ensure_demo_data(out, master=True, res=8, n=5) == out  # kept: it is there
    assert os.path.getmtime(os.path.join(out, "index.json")) == first
    info = data.data_info(f"{out}:2")
    assert info["vae"] == "none" and info["clip"] == "random-words" and info["pixel_space"]
    assert info["resolutions"] == [8] and info["num_samples"] == 5
    assert info["sample_prompts"] == [data.caption_of(data.demo_attributes(0, i))
                                      for i in range(5)]
    # a folder made with another encoder is refused, not reused with the wrong features
    with pytest.raises(ValueError, match="holds the shapes set with 'random-words' caption "
                                         "features, not 'tiny-random': move it away"):
        prepare_lib.ensure_demo_data(out, res=8, n=5, clip="tiny-random")


def test_cli_demo_info_and_errors_from_the_prefetch_thread(tmp_path, capsys):
    out = str(tmp_path / "cli")
    data.main(["demo", "--out", out, "--num-samples", "6", "--res", "8", "--shard-size", "4"])
    data.main(["info", out])
    printed = capsys.readouterr().out
    assert "6 samples in 2 shards" in printed and "images_8: float16 [3, 8, 8]" in printed
    with pytest.raises(SystemExit):  # prepare without --vae is refused, not guessed
        data.main(["prepare", "--src", "demo", "--out", str(tmp_path / "x")])
    loader = LatentLoader(out, 8, 4, prefetch=2)
    os.remove(data.column_path(out, "shard-00001", "images_8"))  # opened lazily: not yet
    with pytest.raises(FileNotFoundError):
        for _ in range(3):
            next(loader)


# ----------------------------------------------------------------------------- train.py

import parallel  # noqa: E402  (after the data tests, which do not need it)
import train  # noqa: E402


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """The built-in shapes set in pixel space at 8 and 16 px, tiny-random captions."""
    out = tmp_path_factory.mktemp("train_data") / "shapes"
    prepare(PrepareConfig(src="demo", out=str(out), res=[8, 16], vae="none",
                          clip="tiny-random", format="demo", n=96))
    return str(out)


def train_args(data_dir, out, *extra):
    """A tiny phase-1 recipe on the CPU preset: seconds per run."""
    return ["--preset", "MicroDiT_CPU_2", "--data", data_dir, "--out", str(out), "--res", "8",
            "--base-res", "8", "--batch-size", "8", "--micro-batch", "8", "--steps", "6",
            "--warmup", "2", "--lr", "1e-3", "--ckpt-every", "3", "--sample-every", "1000",
            "--no-compile", *map(str, extra)]


def logged(out, phase=1):
    lines = (Path(out) / f"phase{phase}" / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def final_checkpoint(out, phase=1):
    return checkpoint.load_checkpoint(checkpoint.checkpoints(str(Path(out) / f"phase{phase}"))[-1])


def test_batch_arithmetic():
    assert train.batch_arithmetic(2048, 256, 8) == 1
    assert train.batch_arithmetic(2048, 32, 8) == 8
    with pytest.raises(ValueError, match=r"multiple of micro-batch 48 x 8 processes = 384: "
                                         r"e.g. --micro-batch 16"):
        train.batch_arithmetic(2048, 48, 8)
    # the README's 16-GPU case: micro-batch 256 is too big, 128 fits
    with pytest.raises(ValueError, match=r"e.g. --micro-batch 128"):
        train.batch_arithmetic(2048, 256, 16)
    with pytest.raises(ValueError, match=r"e.g. --batch-size 1536 or 2304"):  # 3 processes
        train.batch_arithmetic(2048, 256, 3)
    with pytest.raises(ValueError, match=r"e.g. --batch-size 16$"):  # no smaller batch fits
        train.batch_arithmetic(6, 4, 4)
    for batch, micro, world in [(2048, 48, 8), (2048, 256, 16), (2048, 64, 2)]:
        try:
            train.batch_arithmetic(batch, micro, world)
        except ValueError as e:
            suggested = int(str(e).split("--micro-batch ")[1])
            assert train.batch_arithmetic(batch, suggested, world) >= 1


def test_learning_rate_schedules():
    cfg = dict(train.PHASES[1])
    assert train.learning_rate(cfg, 0) == pytest.approx(2.4e-4 / 2500)
    assert train.learning_rate(cfg, 2499) == pytest.approx(2.4e-4)
    assert train.learning_rate(cfg, 250_000) == pytest.approx(0.33 * 2.4e-4)
    middle = 2500 + (250_000 - 2500) // 2
    assert train.learning_rate(cfg, middle) == pytest.approx(2.4e-4 * (0.33 + 0.67 / 2), rel=1e-4)
    cfg3 = dict(train.PHASES[3])
    assert train.learning_rate(cfg3, 250) == pytest.approx(8e-5 * 251 / 500)
    assert train.learning_rate(cfg3, 40_000) == 8e-5
    # constant means constant, whatever min_lr_ratio says (phase 1's is 0.33)
    assert train.learning_rate({**cfg, "schedule": "constant"}, 200_000) == cfg["lr"]


def test_sigma_buckets_match_bucketize():
    """sigma_bucket's counting of edges is torch.bucketize's bucket, edges included."""
    assert SIGMA_BUCKETS == [0.1, 0.5, 1.0, 2.0, 5.0]
    sigma = torch.tensor([0.05, 0.1, 0.3, 0.5, 0.7, 1.0, 3.0, 5.0, 10.0])
    assert sigma_bucket(sigma).tolist() == [0, 0, 1, 1, 2, 2, 4, 4, 5]
    assert torch.equal(sigma_bucket(sigma), torch.bucketize(sigma, torch.tensor(SIGMA_BUCKETS)))


def test_resume_after_interruption_is_exact(train_data, tmp_path, monkeypatch):
    train.main(train_args(train_data, tmp_path / "a"))
    original = train.learning_rate

    def crash_at_step_4(cfg, phase_step):
        if phase_step == 4:
            raise KeyboardInterrupt("killed")
        return original(cfg, phase_step)

    monkeypatch.setattr(train, "learning_rate", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(train_data, tmp_path / "b"))
    monkeypatch.setattr(train, "learning_rate", original)
    train.main(train_args(train_data, tmp_path / "b"))        # resumes from step 3
    a, b = logged(tmp_path / "a"), logged(tmp_path / "b")
    # step 4 ran twice (after the checkpoint at 3, before the crash); it is logged once
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ca, cb = final_checkpoint(tmp_path / "a"), final_checkpoint(tmp_path / "b")
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])


def test_crash_while_saving_leaves_previous_checkpoint(train_data, tmp_path, monkeypatch):
    train.main(train_args(train_data, tmp_path, "--steps", "3"))
    folder = str(tmp_path / "phase1")
    before = checkpoint.checkpoints(folder)
    real_save = torch.save

    def dies_half_way(obj, f, *a, **kw):
        f.write(b"partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        train.main(train_args(train_data, tmp_path, "--steps", "6"))
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.checkpoints(folder) == before
    assert not glob.glob(os.path.join(folder, "*.tmp-*"))      # no half file left behind
    assert checkpoint.load_checkpoint(before[-1])["step"] == 3
    # a process killed mid-save leaves its temporary file: the next save removes it
    stale = os.path.join(folder, "ckpt_000000006.pt.tmp-999999")
    Path(stale).write_bytes(b"partial")
    train.main(train_args(train_data, tmp_path, "--steps", "6"))
    assert not os.path.exists(stale) and checkpoint.load_checkpoint(
        checkpoint.checkpoints(folder)[-1])["step"] == 6


def test_phase_chaining(train_data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--steps", "2", "--ckpt-every", "2"]
    train.main(train_args(train_data, out, *common))
    args = train_args(train_data, out, *common, "--phase", "2")
    args[args.index("--data"):args.index("--data") + 2] = []   # the previous phase's data
    train.main(args)
    printed = capsys.readouterr().out
    assert f"--data: {train_data}, the data the starting checkpoint trained on" in printed
    assert "at least 512px" not in printed                      # same resolution: no note
    p2 = final_checkpoint(out, 2)
    assert p2["step"] == 4 and p2["phase_start"] == 2           # full state: the count goes on
    assert p2["optimizer"]["state"][0]["step"] == 4             # AdamW moments carried over
    # phase 3: 16 px from phase 2's weights only; pos_embed rebuilt at interpolation 2.0
    args = train_args(train_data, out, *common, "--phase", "3", "--res", "16",
                      "--ema-start", "1", "--ema-decay", "0.5")
    args[args.index("--data"):args.index("--data") + 2] = []
    train.main(args)
    assert "at 16px now: the paper changes the data for its 512px phases" \
        in capsys.readouterr().out                              # the paper changes data here
    p3 = final_checkpoint(out, 3)
    assert p3["step"] == 2 and p3["phase_start"] == 0
    assert p3["model_config"]["input_size"] == 16 and p3["model_config"]["pos_interp_scale"] == 2.0
    assert p3["model"]["pos_embed"].shape == (1, 64, 128)
    assert p3["optimizer"]["state"][0]["step"] == 2             # a fresh optimizer
    assert p3["ema"] is not None
    train.main(train_args(train_data, out, *common, "--phase", "4", "--res", "16"))
    assert final_checkpoint(out, 4)["step"] == 4
    # and a phase cannot start before the previous one has finished
    with pytest.raises(SystemExit, match="run --phase 1 first"):
        train.main(train_args(train_data, tmp_path / "empty", "--phase", "2"))


def test_starting_weights_that_do_not_fit_are_refused(train_data, tmp_path):
    """Loading is not strict (pos_embed is rebuilt per resolution), but any other missing or
    unexpected tensor would leave part of the network at its random initialisation."""
    common = ["--steps", "2", "--ckpt-every", "2"]
    train.main(train_args(train_data, tmp_path / "run", *common))
    ckpt = final_checkpoint(tmp_path / "run")
    dropped = next(k for k in ckpt["model"] if k != "pos_embed")
    ckpt["model"]["extra.weight"] = ckpt["model"].pop(dropped)
    torch.save(ckpt, tmp_path / "edited.pt")
    foreign = {"optimizer": {}, "weights": ckpt["model"]}  # another trainer's checkpoint
    torch.save(foreign, tmp_path / "foreign.pt")
    with pytest.raises(SystemExit, match="holds an optimizer but is no train.py checkpoint"):
        train.cli(train_args(train_data, tmp_path / "f", "--init", tmp_path / "foreign.pt"))
    with pytest.raises(SystemExit, match=rf"do not fit the model: missing \['{re.escape(dropped)}'\], "
                                         r"unexpected \['extra.weight'\]"):
        train.cli(train_args(train_data, tmp_path / "p2", *common, "--phase", "2",
                             "--init", tmp_path / "edited.pt"))


def test_later_phases_keep_the_run_scale_and_weights_keep_their_grid(train_data, tmp_path):
    """Without --res, phases 2 to 4 go on at the scale of the run they continue (1 and 2 at
    its base resolution, 3 and 4 at twice it), and weights without a run's config bring the
    position grid their pos_embed was built on."""
    args = train_args(train_data, tmp_path / "run", "--steps", "2", "--ckpt-every", "2")
    no_res = [a for i, a in enumerate(args)
              if a not in ("--res", "--base-res") and args[i - 1] not in ("--res", "--base-res")]
    train.main(args)                                            # phase 1 at 8 px
    for phase, res, interp in [(2, 8, 1.0), (3, 16, 2.0), (4, 16, 2.0)]:
        train.main(no_res + ["--phase", str(phase)])
        ckpt = final_checkpoint(tmp_path / "run", phase)
        assert (ckpt["config"]["res"], ckpt["config"]["base_res"]) == (res, 8), phase
        assert ckpt["model_config"]["pos_interp_scale"] == interp
    # an export of the 16 px phase (built on the 8 px grid) starts a new run on that grid
    export = str(tmp_path / "p4.safetensors")
    train.main(no_res + ["--phase", "4", "--export", export])
    train.main(no_res + ["--phase", "3", "--res", "16", "--init", export, "--out",
                         str(tmp_path / "new")])
    ckpt = final_checkpoint(tmp_path / "new", 3)
    assert ckpt["config"]["base_res"] == 8 and ckpt["model_config"]["pos_interp_scale"] == 2.0


def test_records_name_local_paths_absolutely(train_data, tmp_path, monkeypatch, capsys):
    """A run started in one folder and continued (or sampled) from another: the data folder
    in its checkpoints and the encoders in index.json are absolute, hub ids and 'none' as
    given."""
    monkeypatch.chdir(Path(train_data).parent)
    rel = Path(train_data).name
    train.main(train_args(rel, tmp_path / "run", "--steps", "2", "--ckpt-every", "2"))
    assert final_checkpoint(tmp_path / "run")["config"]["data"] == train_data
    # a checkpoint of before, with the folder as given, resumes without a change to report
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "run", old)
    path = checkpoint.checkpoints(str(old / "phase1"))[-1]
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["data"] = rel
    torch.save(ckpt, path)
    capsys.readouterr()
    train.main(train_args(rel, old, "--steps", "3"))
    assert "resuming with a changed recipe: steps 2 -> 3\n" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    args = train_args("unused", tmp_path / "run", "--steps", "2", "--phase", "2")
    train.main(args[:args.index("--data")] + args[args.index("--data") + 2:])
    assert final_checkpoint(tmp_path / "run", 2)["config"]["data"] == train_data
    assert data.absolute_sources("a:0.6,b") == f"{tmp_path}/a:0.6,{tmp_path}/b"
    assert data.absolute_sources("a:0.123456789") == f"{tmp_path}/a:0.123456789"
    assert data.parse_sources(data.absolute_sources("a:0.6,b")) == [
        (f"{tmp_path}/a", 0.6), (f"{tmp_path}/b", 1.0)]
    # prepare: the VAE by its absolute path
    monkeypatch.chdir(FIXTURES.parent)
    run_prepare("demo", tmp_path / "latents", format="demo", n=4,
                vae="fixtures/vae_tiny_4ch")
    info = json.loads((tmp_path / "latents" / "index.json").read_text())
    assert info["vae"] == str(FIXTURES / "vae_tiny_4ch") and info["clip"] == "tiny-random"


def test_a_second_run_on_the_same_folder_is_refused(train_data, tmp_path, monkeypatch):
    """Two runs on one --out would resume from the same checkpoint and overwrite each other's
    checkpoints and log: while one holds the phase, another stops before it reads or writes
    anything."""
    import fcntl
    train.main(train_args(train_data, tmp_path, "--steps", "3"))
    folder = tmp_path / "phase1"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with open(tmp_path / ".phase1.lock", "w") as other:  # what the other run's process holds
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with monkeypatch.context() as m:
            m.setattr(checkpoint, "load_checkpoint", lambda path: 1 / 0)  # not even read
            with pytest.raises(SystemExit, match="phase1 is in use by another train.py run"):
                train.main(train_args(train_data, tmp_path, "--steps", "6"))
        # under torchrun every rank stops with the message (and torchrun's summary names it
        # for each), not only the rank holding the lock while the others die waiting on it
        done = run_train(train_args(train_data, "OUT", "--steps", "6"), tmp_path, processes=2,
                         expect=1)
        for rank in (0, 1):
            summary = done.stderr.split(f"rank      : {rank}")[1].split("=====")[0]
            assert "SystemExit: " in summary and "is in use by another train.py run" in summary
        assert "Connection closed" not in done.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    train.main(train_args(train_data, tmp_path, "--steps", "6"))  # the other one ended
    assert [r["step"] for r in logged(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_stop_signal_saves_the_step_and_the_run_resumes_exactly(train_data, tmp_path,
                                                                   monkeypatch):
    """SIGTERM (a scheduler's warning before it kills the job) mid-phase: the run logs and
    saves at the next log point, exits with status 75, and --resume goes on to the same
    weights as a run never stopped. The previous handler is back afterwards."""
    import signal
    common = ("--steps", "8", "--ckpt-every", "100", "--log-every", "2")
    train.main(train_args(train_data, tmp_path / "whole", *common))
    before = signal.getsignal(signal.SIGTERM)
    real_lr = train.learning_rate

    def lr_then_signal(cfg, phase_step):
        if phase_step == 2:  # during step 3: the log point after step 4 stops the run
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr(cfg, phase_step)

    with monkeypatch.context() as m:
        m.setattr(train, "learning_rate", lr_then_signal)
        with pytest.raises(SystemExit) as stop:
            train.main(train_args(train_data, tmp_path / "stopped", *common))
    assert stop.value.code == checkpoint.PREEMPTED == 75
    assert signal.getsignal(signal.SIGTERM) is before
    folder = tmp_path / "stopped" / "phase1"
    assert [Path(c).name for c in checkpoint.checkpoints(str(folder))] == ["ckpt_000000004.pt"]
    assert [r["step"] for r in logged(tmp_path / "stopped")] == [1, 2, 3, 4]
    assert not list(folder.glob("samples_*.png"))
    train.main(train_args(train_data, tmp_path / "stopped", *common, "--resume"))
    whole, resumed = final_checkpoint(tmp_path / "whole"), final_checkpoint(tmp_path / "stopped")
    assert resumed["step"] == 8
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step(train_data, tmp_path):
    """Under torchrun a signal may reach one worker only: the ranks agree at the next log
    point, both save the same step and stop."""
    import signal
    import subprocess
    import time as time_module
    args = train_args(train_data, tmp_path, "--steps", "400", "--ckpt-every", "1000",
                      "--log-every", "2", "--micro-batch", "4")
    # train.py with a slow disk on rank 0, and each rank's exit time recorded: no rank may
    # leave before the checkpoint is written (torchrun kills the rest 30 s after one exits)
    wrapper = tmp_path / "slow_train.py"
    wrapper.write_text(f"""import atexit, os, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
import checkpoint, train
real_save = checkpoint.save_checkpoint
def slow_save(folder, state, keep_last):
    time.sleep(2)
    real_save(folder, state, keep_last)
    open({str(tmp_path / "written")!r}, "w").write(repr(time.time()))
checkpoint.save_checkpoint = slow_save
atexit.register(lambda: open({str(tmp_path)!r} + "/exit" + os.environ["RANK"], "w").write(
    repr(time.time())))
train.cli(sys.argv[1:])
""")
    run = subprocess.Popen([*launcher(2), str(wrapper), *args],
                           cwd=Path(__file__).parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "phase1" / "log.jsonl"

    def rank(pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(kv.split(b"=", 1) for kv in environ if b"=" in kv).get(b"RANK")

    workers = []
    try:
        deadline = time_module.time() + 120
        while time_module.time() < deadline and not (log.exists()
                                                     and log.read_text().count("\n") >= 2):
            time_module.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True,
                                 text=True).stdout.split()
        assert sorted(rank(pid) for pid in workers) == [b"0", b"1"], workers
        os.kill(int(next(pid for pid in workers if rank(pid) == b"1")), signal.SIGTERM)
        _, err = run.communicate(timeout=300)
    finally:  # the workers have sessions of their own: killing torchrun leaves them running
        for pid in [run.pid, *workers]:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert run.returncode != 0 and "exitcode  : 75" in err, err[-3000:]
    (saved,) = checkpoint.checkpoints(str(tmp_path / "phase1"))
    step = checkpoint.load_checkpoint(saved)["step"]
    assert 2 <= step < 400 and step % 2 == 0
    assert logged(tmp_path)[-1]["step"] == step
    assert f"stopped by SIGTERM at step {step}" in err
    written = float((tmp_path / "written").read_text())
    assert all(float((tmp_path / f"exit{r}").read_text()) >= written for r in (0, 1))


def test_init_follows_the_phase_and_takes_bare_weights(train_data, tmp_path):
    out = tmp_path / "run"
    common = ["--steps", "2", "--ckpt-every", "2"]
    train.main(train_args(train_data, out, *common))
    p1 = checkpoint.checkpoints(str(out / "phase1"))[-1]
    # phase 3 from --init: weights only, as phase 3 starts without --init
    train.main(train_args(train_data, tmp_path / "p3", *common, "--phase", "3", "--res", "16",
                          "--init", p1))
    p3 = final_checkpoint(tmp_path / "p3", 3)
    assert p3["step"] == 2 and p3["optimizer"]["state"][0]["step"] == 2  # a fresh optimizer
    # phase 2 from --init: the full state, as phase 2 starts without --init
    train.main(train_args(train_data, tmp_path / "p2", *common, "--phase", "2", "--init", p1))
    assert final_checkpoint(tmp_path / "p2", 2)["optimizer"]["state"][0]["step"] == 4
    # a train.py checkpoint is one by its content, not by its name's ending
    pth = str(tmp_path / "phase1_end.pth")
    shutil.copy(p1, pth)
    train.main(train_args(train_data, tmp_path / "p2pth", *common, "--phase", "2", "--init", pth))
    assert final_checkpoint(tmp_path / "p2pth", 2)["optimizer"]["state"][0]["step"] == 4
    # bare weights (an export; a released .pt is a bare state_dict) start with those weights
    export = str(tmp_path / "weights.safetensors")
    train.main(train_args(train_data, out, *common, "--export", export))
    bare = str(tmp_path / "bare.pt")
    torch.save(load_file(export), bare)
    for path, name in [(export, "from_export"), (bare, "from_bare")]:
        train.main(train_args(train_data, tmp_path / name, "--steps", "1", "--lr", "0",
                              "--init", path))
        ckpt = final_checkpoint(tmp_path / name)
        assert ckpt["step"] == 1                                  # weights only: step 0 + 1
        weights = load_file(export)
        assert all(torch.equal(ckpt["model"][k], weights[k]) for k in weights)  # lr 0
    # weights for latents (4 channels) on pixel data (3): refused before anything runs
    weights = load_file(export)
    latent_cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], in_channels=4,
                                     caption_channels=weights["y_embedder.y_proj.fc1.weight"].shape[1])
    torch.save(MicroDiT(latent_cfg).state_dict(), bare)
    with pytest.raises(ValueError, match=r"do not fit --data .*in_channels 4 \(the data's: 3\)"):
        train.main(train_args(train_data, tmp_path / "latent", "--init", bare))


def test_ema_update_and_start():
    net = torch.nn.Linear(3, 2)
    ema = train.EMA(net)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, 0.9)
    assert torch.allclose(ema.state["weight"], 0.9 * start["weight"] + 0.1 * net.weight)
    assert torch.equal(ema.state["bias"], start["bias"])


def test_ema_starts_at_its_phase_step_and_resumes(train_data, tmp_path):
    # at ema_start the EMA is a copy of the weights
    train.main(train_args(train_data, tmp_path / "a", "--ema-decay", "0.5", "--ema-start", "3"))
    at3 = checkpoint.load_checkpoint(checkpoint.checkpoints(str(tmp_path / "a" / "phase1"))[0])
    assert at3["step"] == 3 and all(torch.equal(at3["ema"][k], at3["model"][k].float())
                                    for k in at3["model"])
    # a resumed run carries its EMA on: the same as running straight through
    args = ["--ema-decay", "0.5", "--ema-start", "1", "--ckpt-every", "2"]
    train.main(train_args(train_data, tmp_path / "b", "--steps", "4", *args))
    train.main(train_args(train_data, tmp_path / "c", "--steps", "2", *args))
    train.main(train_args(train_data, tmp_path / "c", "--steps", "4", *args))
    b, c = final_checkpoint(tmp_path / "b"), final_checkpoint(tmp_path / "c")
    assert all(torch.equal(b["ema"][k], c["ema"][k]) for k in b["ema"])
    # ema_start counts the phase's steps, not the run's (phase 4's starts 1K into phase 4)
    train.main(train_args(train_data, tmp_path / "b", "--phase", "2", "--steps", "2",
                          "--ckpt-every", "2", "--ema-decay", "0.5", "--ema-start", "3"))
    assert final_checkpoint(tmp_path / "b", 2)["ema"] is None   # phase step 2, run step 6


def test_ema_runs_in_training(train_data, tmp_path):
    train.main(train_args(train_data, tmp_path, "--ema-decay", "0.5", "--ema-start", "4"))
    ckpts = [checkpoint.load_checkpoint(p) for p in checkpoint.checkpoints(str(tmp_path / "phase1"))]
    at3, at6 = ckpts
    assert at3["ema"] is None                                   # before ema_start
    ema, model = at6["ema"], at6["model"]
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(ema[w], model[w])                    # lags the weights


def test_atomic_write_syncs_the_file_then_its_folder_after_the_rename(tmp_path, monkeypatch):
    """A rename is durable only once the folder is synced: a power cut after save_checkpoint
    deleted the old checkpoints must not lose the new one's name."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", b)),
                                                     real_replace(a, b)))
    checkpoint.save_checkpoint(str(tmp_path), {"step": 5}, keep_last=1)
    path = os.path.join(str(tmp_path), "ckpt_000000005.pt")
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]
    assert events[0][1].startswith(path + ".tmp-") and events[1][1] == path
    assert events[2][1] == os.path.realpath(tmp_path)


def test_a_folder_that_cannot_be_synced_does_not_fail_the_write(tmp_path, monkeypatch):
    """Some file systems refuse to fsync a folder; the file is whole and in place by then."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSYS, "Function not implemented")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.save_checkpoint(str(tmp_path), {"step": 5}, keep_last=1)
    assert checkpoint.load_checkpoint(checkpoint.checkpoints(str(tmp_path))[-1]) == {"step": 5}


def test_checkpoint_snapshot_is_written_as_of_the_save_into_reused_buffers(tmp_path,
                                                                          monkeypatch):
    """The write runs in a background thread while the training changes the weights in
    place: the file must hold the values of the moment of the save. The snapshot (gathered
    into a HostSnapshot) is the only copy: the writer hands its tensors to the disk as they
    are, after calling `ready` (on CUDA: the queued copies have landed), and the next save
    copies into the same buffers instead of new memory."""
    import threading
    stepped, real_save, written, waited = threading.Event(), checkpoint.save_checkpoint, [], []

    def slow_disk(folder, state, keep):  # the write starts only after the weights changed
        stepped.wait(10)
        written.append(state)
        real_save(folder, state, keep)

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow_disk)
    weight, moment = torch.arange(6.0).reshape(2, 3), torch.ones(3)
    model = {"w": weight, "step_count": 5}
    assert checkpoint.gathered(model)["w"] is weight  # no copy unless asked (sample grids, CPU)
    host = checkpoint.HostSnapshot(pin=False)
    # the ranks that do not save copy nothing (a meta tensor cannot be copied: it would raise)
    assert checkpoint.gathered({"w": torch.empty(3, device="meta")}, False, host) is None
    assert host.buffers == {}
    snapshot = checkpoint.gathered(model, snapshot=host, prefix="model.")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    opt.state[opt.param_groups[0]["params"][0]]["exp_avg"] = moment
    opt_snapshot = checkpoint.optimizer_state(opt, snapshot=host)
    host.mark_copied()
    writer = checkpoint.CheckpointWriter(background=True)
    writer.save(str(tmp_path), {"model": snapshot, "optimizer": opt_snapshot,
                                "rng": [checkpoint.rng_state()], "step": 7}, keep_last=2,
                ready=lambda: waited.append(len(written)))
    weight.add_(100.0)  # the next optimizer step
    moment.mul_(3.0)
    stepped.set()
    writer.close()
    assert waited == [0]  # before the write
    assert written[0]["model"]["w"] is snapshot["w"] is host.buffers["model.w"]  # one copy
    assert written[0]["optimizer"]["state"][0]["exp_avg"] is host.buffers["optimizer.0.exp_avg"]
    saved = checkpoint.load_checkpoint(checkpoint.checkpoints(str(tmp_path))[-1])
    assert torch.equal(saved["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert saved["model"]["step_count"] == 5 and saved["step"] == 7
    assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    # the next save: the same memory, the new values
    again = checkpoint.gathered(model, snapshot=host, prefix="model.")
    assert again["w"] is host.buffers["model.w"] and torch.equal(again["w"], weight)
    assert again["w"].data_ptr() == snapshot["w"].data_ptr()


def test_snapshot_goes_to_ordinary_memory_when_pinning_fails(monkeypatch, capsys):
    """Pinned memory is limited in containers: a save must not crash the run over it."""
    real_empty = torch.empty

    def empty(*shape, pin_memory=False, **kwargs):
        if pin_memory:
            raise torch.OutOfMemoryError("CUDA error: out of memory")
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    host = checkpoint.HostSnapshot(pin=True)
    weight = torch.arange(4.0)
    snapshot = checkpoint.gathered({"w": weight, "b": weight + 1}, snapshot=host, prefix="model.")
    host.mark_copied()
    host.wait()
    assert not host.pin and host.copied is None  # copies wait until they land
    assert torch.equal(snapshot["w"], weight) and torch.equal(snapshot["b"], weight + 1)
    err = capsys.readouterr().err
    assert err.count("pinning CPU memory for the snapshot failed") == 1 and "out of memory" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_snapshot_holds_the_values_of_the_save_on_cuda():
    """On CUDA the copies into the pinned buffers are queued without waiting: the in-place
    updates queued after them (the next optimizer step) must not reach the snapshot, at the
    first save (new buffers) or a later one (reused)."""
    host = checkpoint.HostSnapshot(pin=True)
    state = {f"w{i}": torch.randn(1024, 1024, device="cuda") for i in range(8)}
    before = {k: v.cpu() for k, v in state.items()}  # waited-for copies: the reference
    for _ in range(2):
        torch.cuda._sleep(200_000_000)  # the copies queue behind ~0.1 s of GPU work
        snapshot = checkpoint.gathered(state, snapshot=host, prefix="model.")
        host.mark_copied()
        for v in state.values():
            v.mul_(2.0).add_(1.0)
        host.wait()
        assert host.pin and all(b.is_pinned() for b in host.buffers.values())
        for k in state:
            assert torch.equal(snapshot[k], before[k]), k
        before = {k: v.cpu() for k, v in state.items()}


def test_background_checkpoints_of_a_run_equal_the_synchronous_ones(train_data, tmp_path,
                                                                     monkeypatch):
    """train.py's loop with the GPU's writer (a background thread reading reused snapshot
    buffers) on a slow disk, with an EMA and a sample grid at the last save: the buffers are
    never refilled while a write reads them, each save's copies are marked copied before the
    writer waits for them (its first act) and the grid waits for them too; and every
    checkpoint equals the one the synchronous writer saves."""
    import threading
    import time as time_module
    ema = ("--ema-decay", "0.9", "--ema-start", "0")
    train.cli(train_args(train_data, tmp_path / "sync", *ema))
    real_init, real_save = checkpoint.CheckpointWriter.__init__, checkpoint.save_checkpoint
    real_grid, Host = train.save_sample_grid, checkpoint.HostSnapshot
    real_copy, real_copied, real_wait = Host.copy, Host.mark_copied, Host.wait
    events, writing = {"main": [], "writer": []}, threading.Event()

    def log(event):
        main = threading.current_thread() is threading.main_thread()
        events["main" if main else "writer"].append(event)

    def copy(self, key, tensor):
        assert not writing.is_set(), "snapshot buffers refilled while a write reads them"
        if not events["main"] or events["main"][-1] != "copy":
            log("copy")  # one entry per run of copies
        return real_copy(self, key, tensor)

    def slow_disk(folder, state, keep):
        writing.set()
        log("write")
        try:
            time_module.sleep(1.5)  # longer than the 3 steps to the next save
            real_save(folder, state, keep)
        finally:
            writing.clear()

    monkeypatch.setattr(checkpoint.CheckpointWriter, "__init__",
                        lambda self, background=False: real_init(self, background=True))
    monkeypatch.setattr(checkpoint, "save_checkpoint", slow_disk)
    monkeypatch.setattr(Host, "copy", copy)
    monkeypatch.setattr(Host, "mark_copied", lambda self: (log("copied"), real_copied(self))[1])
    monkeypatch.setattr(Host, "wait", lambda self: (log("wait"), real_wait(self))[1])
    monkeypatch.setattr(train, "save_sample_grid",
                        lambda *args: (log("grid"), real_grid(*args))[1])
    train.cli(train_args(train_data, tmp_path / "background", *ema))
    # saves at steps 3 and 6 (the last, with the grid)
    assert events["main"] == ["copy", "copied", "copy", "copied", "wait", "grid"]
    assert events["writer"] == ["wait", "write", "wait", "write"]
    for name in ("ckpt_000000003.pt", "ckpt_000000006.pt"):
        sync, background = (checkpoint.load_checkpoint(str(tmp_path / run / "phase1" / name))
                            for run in ("sync", "background"))
        for part in ("model", "ema"):
            for key, value in sync[part].items():
                assert torch.equal(value, background[part][key]), (name, part, key)
        for i, moments in sync["optimizer"]["state"].items():
            for key, value in moments.items():
                assert torch.equal(value, background["optimizer"]["state"][i][key]), (name, key)


def test_checkpoint_writer_hands_a_failed_background_write_to_the_training(tmp_path):
    (tmp_path / "a_file").write_text("")  # a folder that cannot be made
    writer = checkpoint.CheckpointWriter(background=True)
    writer.save(str(tmp_path / "a_file" / "phase1"), {"step": 3}, keep_last=1)
    with pytest.raises(checkpoint.CheckpointWriteError, match="checkpoint of step 3 .* failed"):
        writer.close()
    writer.close()  # raised once


def test_torchrun_error_file_names_the_cause(train_data, tmp_path, monkeypatch):
    """torchrun's summary of a failed job reads each rank's error file: the message (or, for
    an unexpected exception, the traceback) must be there, not `error_file: <N/A>`."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    with pytest.raises(SystemExit, match="--init .*nope.pt: no such file"):
        train.cli(train_args(train_data, tmp_path, "--init", tmp_path / "nope.pt"))
    message = json.loads(error_file.read_text())["message"]["message"]
    assert message.startswith("FileNotFoundError: --init") and "nope.pt: no such file" in message
    error_file.unlink()
    # and main's own stops (a phase not finished, non-finite steps, ...)
    with pytest.raises(SystemExit, match="--resume: .* has no checkpoint"):
        train.cli(train_args(train_data, tmp_path / "empty", "--resume"))
    assert "has no checkpoint" in json.loads(error_file.read_text())["message"]["message"]
    error_file.unlink()
    # prepare.py and eval.py, the other commands run under torchrun, say theirs the same way
    assert prepare_lib.main(["--src", str(tmp_path / "missing"), "--out",
                      str(tmp_path / "out"), "--vae", "none"]) == 2
    assert "missing" in json.loads(error_file.read_text())["message"]["message"]
    error_file.unlink()

    def broken(argv=None):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # train.cli is main under command_line
        parallel.command_line(broken, checkpoint.CheckpointWriteError)([])
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["message"] == "RuntimeError: a bug"
    assert "in broken" in recorded["extraInfo"]["py_callstack"]


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_a_message(train_data, tmp_path,
                                                                          monkeypatch):
    def full_disk(folder, state, keep):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    with pytest.raises(SystemExit, match=r"writing the checkpoint of step 3 to .*phase1 failed "
                                         r"\(OSError: \[Errno 28\] No space left on device\)"):
        train.cli(train_args(train_data, tmp_path))
    assert logged(tmp_path)[-1]["step"] <= 6  # it stopped at the next save, or the end


def test_one_precision_rule_for_training_sampling_and_benchmarks():
    from model import precision
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    for device, asked, expected in [("cpu", "auto", torch.float32),
                                    ("cpu", "float32", torch.float32),
                                    ("cpu", "bfloat16", torch.bfloat16)]:
        context, dtype = precision(device, asked)
        with context:
            assert (a @ b).dtype == expected == dtype, (device, asked)
    with pytest.raises(ValueError, match="precision 'fp16': choose from auto, float32, bfloat16"):
        precision("cpu", "fp16")


@pytest.mark.parametrize("max_norm", [0.05, 1e3], ids=["clipped", "not clipped"])
def test_clipping_inside_the_fused_optimizer_equals_clip_grad_norm(max_norm):
    """train.py hands the clip to the fused AdamW (grad_scale) instead of rescaling every
    gradient first: the same norm and, to float rounding, the same weights after 3 steps as
    clip_grad_norm_ followed by a plain AdamW step."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.AdamW(nets[0].parameters(), lr=1e-2, weight_decay=0.1),
            torch.optim.AdamW(nets[1].parameters(), lr=1e-2, weight_decay=0.1, fused=True)]
    for _ in range(3):
        x = torch.randn(32, 8)
        for net in nets:
            net(x).pow(2).mean().backward()
        expected = torch.nn.utils.clip_grad_norm_(nets[0].parameters(), max_norm)
        assert (expected > max_norm) == (max_norm < 1)  # both cases are exercised
        norm = parallel.clip_in_optimizer(opts[1], max_norm)
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_a_non_finite_gradient_leaves_the_weights_alone():
    """The fused AdamW skips the step on the device when the norm is not finite: the weights
    must not take a NaN (the log says 'skipped')."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    net(torch.randn(5, 4)).sum().backward()
    net.weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]
    assert not math.isfinite(parallel.clip_in_optimizer(opt, 0.25).item())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_resuming_phase_2_continues_its_own_count(train_data, tmp_path):
    """Phases 2 and 4 carry the run's step on: a resumed phase 2 must end at its own
    --steps, counted from where the phase began, not from 0."""
    common = ["--ckpt-every", "2"]
    train.main(train_args(train_data, tmp_path, "--steps", "2", *common))
    train.main(train_args(train_data, tmp_path, "--phase", "2", "--steps", "2", *common))
    train.main(train_args(train_data, tmp_path, "--phase", "2", "--steps", "4", *common))
    ckpt = final_checkpoint(tmp_path, 2)
    assert (ckpt["phase_start"], ckpt["step"], ckpt["phase_step"]) == (2, 6, 4)
    assert [r["step"] for r in logged(tmp_path, 2)] == [3, 4, 5, 6]


def test_every_micro_batch_and_step_draws_its_own_noise(train_data, tmp_path, monkeypatch):
    seeds, kept = [], []
    real_loss, real_ids = train.edm_loss_per_sample, model_lib.random_ids_keep

    def loss_spy(net, x, y, mask_ratio, p_mean, p_std, generator, **kw):
        seeds.append(generator.initial_seed())
        return real_loss(net, x, y, mask_ratio, p_mean, p_std, generator, **kw)

    def ids_spy(*a, **kw):
        kept.append(real_ids(*a, **kw))
        return kept[-1]

    monkeypatch.setattr(train, "edm_loss_per_sample", loss_spy)
    monkeypatch.setattr(model_lib, "random_ids_keep", ids_spy)
    train.main(train_args(train_data, tmp_path, "--micro-batch", "4", "--steps", "2",
                          "--mask-ratio", "0.75"))
    assert len(seeds) == len(kept) == 4                         # 2 steps x 2 micro-batches
    assert seeds == [train.micro_generator(0, step, i, "cpu").initial_seed()
                     for step in (0, 1) for i in (0, 1)]
    assert len(set(seeds)) == 4
    assert len({tuple(ids.flatten().tolist()) for ids in kept}) == 4


def test_one_generator_draws_the_noise_level_the_noise_and_the_kept_patches(golden):
    """edm_loss_per_sample with a generator equals the loss with the draws given explicitly,
    taken from a generator of the same seed in the order: noise levels, noise, kept patches
    (the network draws the last)."""
    net, g, config = golden
    x, y = g["in.x"], g["in.y"]
    N, T = x.shape[0], (config["input_size"] // config["patch_size"]) ** 2
    same = torch.Generator().manual_seed(11)
    normal = torch.randn(N, generator=same)
    noise = torch.randn(x.shape, generator=same)
    ids_keep = random_ids_keep(N, T, 0.5, "cpu", generator=same)
    with torch.no_grad():
        drawn = edm_loss(net, x, y, 0.5, generator=torch.Generator().manual_seed(11))
        given = edm_loss(net, x, y, 0.5, normal=normal, noise=noise, ids_keep=ids_keep)
        other = edm_loss(net, x, y, 0.5, generator=torch.Generator().manual_seed(12))
    assert torch.equal(drawn, given) and not torch.equal(drawn, other)


def test_the_training_loader_drops_captions_for_guidance(train_data, tmp_path, monkeypatch):
    """train.py relies on the loader's default: 10% of captions zeroed (the null caption the
    sampler's guidance uses)."""
    made, real = [], train.LatentLoader

    def spy(*a, **kw):
        made.append((a, kw))
        return real(*a, **kw)

    monkeypatch.setattr(train, "LatentLoader", spy)
    train.main(train_args(train_data, tmp_path, "--steps", "1", "--sample-every", "0"))
    (args, kwargs), = made
    loader = real(*args, **kwargs)
    rows = torch.cat([next(loader)["captions"] for _ in range(250)])  # (2000, 77, D)
    dropped = (rows.flatten(1) == 0).all(dim=1).float().mean().item()
    loader.close()
    assert 0.08 < dropped < 0.12, dropped                       # 3 sigma: 0.0866 to 0.1134


def test_the_aux_loss_weight_reaches_the_router(train_data, tmp_path):
    token_choice = ["--model", '{"moe_routing": "token_choice"}', "--steps", "1"]
    for weight in ("0", "100"):
        train.main(train_args(train_data, tmp_path / weight, *token_choice,
                              "--aux-loss-weight", weight))
    a, b = final_checkpoint(tmp_path / "0"), final_checkpoint(tmp_path / "100")
    gates = [k for k in a["model"] if k.endswith("mlp.gate.weight")]
    assert gates and not all(torch.equal(a["model"][k], b["model"][k]) for k in gates)


def test_non_finite_steps_are_skipped_then_stop(train_data, tmp_path, monkeypatch):
    train.main(train_args(train_data, tmp_path, "--steps", "3"))
    folder = str(tmp_path / "phase1")
    good = checkpoint.load_checkpoint(checkpoint.checkpoints(folder)[-1])
    real = train.edm_loss_per_sample

    def nan_loss(*a, **kw):
        per_sample, sigma = real(*a, **kw)
        return per_sample * float("nan"), sigma

    monkeypatch.setattr(train, "edm_loss_per_sample", nan_loss)
    with pytest.raises(SystemExit, match="3 steps in a row with non-finite gradients"):
        train.main(train_args(train_data, tmp_path, "--steps", "6", "--max-bad-steps", "3"))
    after = checkpoint.load_checkpoint(checkpoint.checkpoints(folder)[-1])
    assert after["step"] == 3
    assert all(torch.equal(good["model"][k], after["model"][k]) for k in good["model"])
    assert [r["skipped"] for r in logged(tmp_path)[-3:]] == [1, 2, 3]
    assert [r["loss"] for r in logged(tmp_path)[-3:]] == [None] * 3  # strict JSON: null


def test_the_step_does_not_wait_for_the_device(train_data, tmp_path, monkeypatch):
    """Statistics are read once per --log-every steps (and before a checkpoint), not every
    step; a non-finite step is skipped on the device without the host reading the norm. The
    weights and the per-step log are those of reading every step."""
    reads, items, looping = [], [], []
    real_tolist, real_item, real_lr = torch.Tensor.tolist, torch.Tensor.item, train.learning_rate

    def tolist(t):
        reads.append(tuple(t.shape))
        return real_tolist(t)

    def item(t):
        items.extend(looping[-1:])  # the steps in which a tensor was read with .item()
        return real_item(t)

    def learning_rate(cfg, phase_step):  # called once at the start of every step
        looping.append(phase_step)
        return real_lr(cfg, phase_step)

    extra = ("--steps", "9", "--ckpt-every", "8", "--sample-every", "0")
    train.main(train_args(train_data, tmp_path / "every", *extra, "--log-every", "1"))
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(train, "learning_rate", learning_rate)
    train.main(train_args(train_data, tmp_path / "batched", *extra, "--log-every", "3"))
    width = 3 + 2 * (len(SIGMA_BUCKETS) + 1)  # loss, aux, grad norm, bucket sums, counts
    assert [r for r in reads if r[-1:] == (width,)] == [(3, width), (3, width), (2, width),
                                                       (1, width)]  # 3, 6, 8 (ckpt), 9 (end)
    # .item() only where a checkpoint is written (weights_finite): phase steps 7 and 8
    assert looping == list(range(9)) and items == [7, 8]
    every, batched = logged(tmp_path / "every"), logged(tmp_path / "batched")
    assert [r["step"] for r in batched] == list(range(1, 10))
    for a, b in zip(every, batched):
        assert {k: v for k, v in a.items() if k not in ("ms_per_step", "images_per_s")} == \
            {k: v for k, v in b.items() if k not in ("ms_per_step", "images_per_s")}
    a, b = final_checkpoint(tmp_path / "every"), final_checkpoint(tmp_path / "batched")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_training_on_mds_data_needs_the_encoders_for_sample_grids(tmp_path):
    """MDS shards do not record their VAE and text encoder: a run that would draw sample
    grids must be told them, and says so before its first step, not at its first grid."""
    rng = np.random.default_rng(0)

    def mds(name, width):
        samples = [{"caption": f"caption {i}",
                    "caption_latents": rng.standard_normal((77, width)).astype(np.float16),
                    "latents_256": rng.standard_normal((4, 32, 32)).astype(np.float16),
                    "latents_512": rng.standard_normal((4, 64, 64)).astype(np.float16)}
                   for i in range(16)]
        return _write_mds(tmp_path / name, [samples])

    def args(data_dir, out, *extra):
        return train_args(data_dir, tmp_path / out, "--res", "256", "--base-res", "256",
                          "--steps", "2", *extra)
    wide, narrow = mds("mds256", 256), mds("mds8", 8)
    encoders = ["--vae", str(FIXTURES / "vae_tiny_4ch"), "--clip", "tiny-random"]
    with pytest.raises(SystemExit, match="--vae and --clip.*--sample-every 0"):
        train.main(args(wide, "a"))
    assert not (tmp_path / "a" / "phase1").exists()  # stopped before the run began
    with pytest.raises(SystemExit, match="256-wide features but the model expects 8"):
        train.main(args(narrow, "b", *encoders))
    train.main(args(wide, "c", "--sample-every", "0"))
    assert [r["step"] for r in logged(tmp_path / "c")] == [1, 2]
    assert not list((tmp_path / "c" / "phase1").glob("samples_*.png"))
    train.main(args(wide, "d", *encoders))
    grid = Image.open(tmp_path / "d" / "phase1" / "samples_000000002.png")
    vae_config = json.loads((FIXTURES / "vae_tiny_4ch" / "config.json").read_text())
    side = 32 * 2 ** (len(vae_config["block_out_channels"]) - 1)  # latents decoded to pixels
    assert grid.mode == "RGB" and grid.size == (8 * side, side)  # 8 of the data's captions


def test_compile_mode_reaches_torch_compile(train_data, tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    train.main(train_args(train_data, tmp_path, "--steps", "1", "--compile", "--compile-mode",
                          "max-autotune-no-cudagraphs"))
    assert modes == ["max-autotune-no-cudagraphs"]
    assert final_checkpoint(tmp_path)["config"]["compile_mode"] == "max-autotune-no-cudagraphs"


def test_inductor_settings_reach_torch_compile(train_data, tmp_path, monkeypatch):
    import bench
    import torch._inductor.config as inductor_config
    # set to their current values first, so that the test leaves them as it found them
    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning",
                        inductor_config.coordinate_descent_tuning)
    monkeypatch.setattr(inductor_config.triton, "unique_kernel_names",
                        inductor_config.triton.unique_kernel_names)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(
        (inductor_config.coordinate_descent_tuning, inductor_config.triton.unique_kernel_names))
        or model)
    settings = {"coordinate_descent_tuning": not inductor_config.coordinate_descent_tuning,
                "triton.unique_kernel_names": not inductor_config.triton.unique_kernel_names}
    train.main(train_args(train_data, tmp_path, "--steps", "1", "--compile", "--inductor",
                          json.dumps(settings)))
    assert seen == [tuple(settings.values())]
    assert final_checkpoint(tmp_path)["config"]["inductor"] == settings
    for bad, said in [('{"no_such_setting": 1}', "'no_such_setting' is not a torch._inductor"),
                      ('{"triton.nope": 1}', "'triton.nope' is not"),
                      ('["coordinate_descent_tuning"]', "takes a JSON object")]:
        with pytest.raises(SystemExit, match=said):
            train.cli(train_args(train_data, tmp_path / "bad", "--inductor", bad))
        with pytest.raises(SystemExit, match=said):
            bench.main(["--quick", "--inductor", bad, "--skip", "train", "sample", "data"])


def test_a_run_records_its_code_and_versions(train_data, tmp_path):
    import subprocess
    train.main(train_args(train_data, tmp_path, "--steps", "3"))
    train.main(train_args(train_data, tmp_path, "--steps", "6"))  # resumes at step 3
    folder = tmp_path / "phase1"
    record = json.loads((folder / "config.json").read_text())
    assert record["run"]["steps"] == 6 and record["torch"] == torch.__version__
    here = Path(train.__file__).parent
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
    assert record["git_commit"] == (git.stdout.strip() if git.returncode == 0 else None)
    starts = sorted(p.name for p in (folder / "code").iterdir())
    assert starts == ["start_000000000", "start_000000003"]
    for start in starts:
        for name in checkpoint.CODE_FILES:
            assert (folder / "code" / start / name).read_bytes() == (here / name).read_bytes()
    first = json.loads((folder / "code" / starts[0] / "config.json").read_text())
    assert first["run"]["steps"] == 3  # each start keeps its own record


def test_missing_data_is_a_message_not_a_stack_trace(tmp_path):
    with pytest.raises(SystemExit, match="--demo is a phase-1 recipe"):
        train.cli(["--demo", "--phase", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no training data: give --data"):
        train.cli(["--out", str(tmp_path), "--no-compile"])
    with pytest.raises(SystemExit, match=r"error: .*nowhere: no such data folder"):
        train.cli(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--no-compile"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"error: .*empty: no index.json.*prepare.py --src"):
        train.cli(["--data", str(tmp_path / "empty"), "--out", str(tmp_path), "--no-compile"])


def test_bad_flags_are_messages_not_stack_traces(train_data, tmp_path):
    with pytest.raises(SystemExit, match=r"error: --model: \['depht'\] are not DiTConfig"):
        train.cli(train_args(train_data, tmp_path, "--model", '{"depht": 2}'))
    with pytest.raises(SystemExit, match="error: --model '{depth: 2}' is not valid JSON"):
        train.cli(train_args(train_data, tmp_path, "--model", "{depth: 2}"))
    with pytest.raises(SystemExit, match=r"--model cannot set \['caption_channels'\]"):
        train.cli(train_args(train_data, tmp_path, "--model", '{"caption_channels": 128}'))
    with pytest.raises(SystemExit, match="error: --inductor takes a JSON object"):
        train.cli(train_args(train_data, tmp_path, "--inductor", "[1]"))
    with pytest.raises(SystemExit, match="error: global batch 8 must be a multiple"):
        train.cli(train_args(train_data, tmp_path, "--micro-batch", "3"))
    # numbers that used to crash mid-run (a modulo by zero), delete every checkpoint (keep
    # -1) or train nonsense (mask ratio 1: no patch left)
    for flag, value, rule in [("--keep", -1, "at least 1"), ("--ckpt-every", 0, "at least 1"),
                              ("--micro-batch", 0, "at least 1"), ("--batch-size", 0, "at least 1"),
                              ("--steps", 0, "at least 1"), ("--mask-ratio", 1.0, r"\[0, 1\)"),
                              ("--ema-decay", 1.0, r"\[0, 1\)"), ("--warmup", -5, "0 or more")]:
        with pytest.raises(SystemExit, match=f"error: {flag} {value}: must be.*{rule}"):
            train.cli(train_args(train_data, tmp_path, flag, value))
    with pytest.raises(SystemExit, match="name the file FILE.safetensors"):
        train.cli(train_args(train_data, tmp_path, "--export", str(tmp_path / "w.pt")))
    with pytest.raises(SystemExit, match="--resume: .* has no checkpoint to resume from"):
        train.cli(train_args(train_data, tmp_path / "typo", "--resume"))
    with pytest.raises(SystemExit, match="error: --init .*nope.pt: no such file"):
        train.cli(train_args(train_data, tmp_path, "--init", str(tmp_path / "nope.pt")))
    assert not os.path.exists(tmp_path / "phase1" / "log.jsonl")  # nothing ran
    with pytest.raises(SystemExit, match="8 x 8 latents do not split into 3 x 3 patches"):
        train.cli(train_args(train_data, tmp_path, "--model", '{"patch_size": 3}'))


@pytest.mark.parametrize("flag", ["--lr", "--mask-ratio", "--min-lr-ratio", "--grad-clip",
                                  "--p-mean", "--p-std", "--ema-decay", "--weight-decay",
                                  "--aux-loss-weight"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_flag_must_be_finite(train_data, tmp_path, flag, value):
    with pytest.raises(SystemExit, match=f"error: {flag} {value}: must be a finite number"):
        train.cli(train_args(train_data, tmp_path, f"{flag}={value}"))
    assert not os.path.exists(tmp_path / "phase1")


def test_a_mask_ratio_that_keeps_no_patch_is_refused(train_data, tmp_path):
    """At 8 px in 2 x 2 patches there are 16 patches: 0.99 keeps int(0.16) = 0 of them, which
    trained NaN losses with a zero gradient norm. The largest ratio that keeps one is 15/16."""
    with pytest.raises(SystemExit, match=r"--mask-ratio: mask ratio 0.99 keeps none of the 16 "
                                         r"patches .* the largest ratio that keeps one is 0.9375"):
        train.cli(train_args(train_data, tmp_path, "--mask-ratio", "0.99"))
    assert not os.path.exists(tmp_path / "phase1")
    train.main(train_args(train_data, tmp_path, "--mask-ratio", "0.9375", "--steps", "1"))
    assert all(math.isfinite(r["loss"]) for r in logged(tmp_path))


@pytest.mark.parametrize("size, patch", [(8, 2), (12, 2), (30, 3), (14, 7)])
def test_the_largest_mask_ratio_named_keeps_exactly_one_patch(size, patch):
    """(T - 1) / T can round so that it keeps none (T = 36: int(36 x 0.0277...) = 0); the
    ratio the message names must keep one, and the next float above it none."""
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], input_size=size, patch_size=patch)
    T = (size // patch) ** 2
    with pytest.raises(ValueError) as refused:
        model_lib.check_mask_ratio(cfg, 1 - 0.5 / T)
    largest = float(re.search(r"keeps one is (\S+)$", str(refused.value)).group(1))
    assert num_kept(T, largest) == 1 and num_kept(T, math.nextafter(largest, 1)) == 0
    model_lib.check_mask_ratio(cfg, largest)
    # the masking itself refuses it too, for callers that do not check first
    assert random_ids_keep(2, T, largest, "cpu").shape == (2, 1)
    with pytest.raises(ValueError, match=f"keeps none of {T} tokens"):
        random_ids_keep(2, T, math.nextafter(largest, 1), "cpu")


def test_non_finite_weights_are_never_checkpointed(train_data, tmp_path, monkeypatch):
    """An infinite learning rate (from a schedule, or data that overflows) makes the weights
    NaN while the gradient norm of that step is finite: the run must not save them, must
    not exit 0, and must say which checkpoint is there (none yet, here)."""
    monkeypatch.setattr(train, "learning_rate", lambda run, phase_step: float("inf"))
    with pytest.raises(SystemExit, match=r"error: the weights are not finite at step 3 .* no "
                                         r"checkpoint was written; .*phase1 has no checkpoint "
                                         r"yet: a rerun starts the phase again"):
        train.cli(train_args(train_data, tmp_path, "--steps", "3"))
    assert checkpoint.checkpoints(str(tmp_path / "phase1")) == []


def test_a_run_that_ends_on_non_finite_steps_does_not_succeed(train_data, tmp_path,
                                                              monkeypatch):
    train.main(train_args(train_data, tmp_path, "--steps", "3"))
    real = train.edm_loss_per_sample

    def nan_loss(*a, **kw):
        per_sample, sigma = real(*a, **kw)
        return per_sample * float("nan"), sigma

    monkeypatch.setattr(train, "edm_loss_per_sample", nan_loss)
    with pytest.raises(SystemExit, match=r"phase 1 ended with 2 step\(s\) in a row with "
                                         r"non-finite gradients; the latest checkpoint, "
                                         r".*ckpt_000000005.pt, is intact"):
        train.main(train_args(train_data, tmp_path, "--steps", "5", "--max-bad-steps", "9"))
    # the weights of step 5 are step 3's: both updates were skipped
    last, first = final_checkpoint(tmp_path), checkpoint.load_checkpoint(
        str(tmp_path / "phase1" / "ckpt_000000003.pt"))
    assert all(torch.equal(last["model"][k], first["model"][k]) for k in first["model"])


def test_stop_messages_name_the_checkpoint_that_is_there(tmp_path):
    folder = str(tmp_path / "phase1")
    assert checkpoint.latest_note(folder).startswith(f"{folder} has no checkpoint yet")
    (tmp_path / "a_file").write_text("")  # a folder that cannot be made
    writer = checkpoint.CheckpointWriter(background=False)
    with pytest.raises(checkpoint.CheckpointWriteError, match="has no checkpoint yet"):
        writer.save(str(tmp_path / "a_file" / "phase1"), {"step": 3}, keep_last=1)
    checkpoint.save_checkpoint(folder, {"step": 4}, keep_last=1)
    assert checkpoint.latest_note(folder) == (f"the latest checkpoint, {folder}/ckpt_000000004"
                                              f".pt, is intact: a rerun resumes from it")


def test_the_demo_checkpoints_every_100_steps():
    demo = train.resolve_config(train.parse_args(["--demo"]))
    assert (demo["ckpt_every"], demo["sample_every"], demo["steps"]) == (100, 500, 1500)
    assert train.resolve_config(train.parse_args(["--demo", "--ckpt-every", "700"]))[
        "ckpt_every"] == 700
    full = train.resolve_config(train.parse_args(["--data", "x"]))
    assert (full["ckpt_every"], full["sample_every"]) == (1000, 5000)


def test_position_grid_follows_the_runs_first_resolution(train_data, tmp_path):
    """Without --base-res: a fresh run's positions are on its own grid (1.0), and later
    phases interpolate from it (2.0 at twice the resolution), as the released models do."""
    def run(*extra):
        args = train_args(train_data, tmp_path, "--steps", "2", "--ckpt-every", "2", *extra)
        i = args.index("--base-res")
        train.main(args[:i] + args[i + 2:])
    run()
    assert final_checkpoint(tmp_path, 1)["model_config"]["pos_interp_scale"] == 1.0
    run("--phase", "2")
    assert final_checkpoint(tmp_path, 2)["model_config"]["pos_interp_scale"] == 1.0
    run("--phase", "3", "--res", "16")
    ckpt = final_checkpoint(tmp_path, 3)
    assert ckpt["model_config"]["pos_interp_scale"] == 2.0 and ckpt["config"]["base_res"] == 8


def test_a_resume_keeps_its_recipe_and_survives_a_torn_log(train_data, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(train_data, out, "--steps", "4", "--ckpt-every", "2", "--lr", "2e-3",
                          "--weight-decay", "0.05"))
    log = out / "phase1" / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 5, "loss": 0.8')  # a kill in the middle of a write
    # the resumed command forgets --lr and --weight-decay and asks for 2 more steps
    args = train_args(train_data, out, "--steps", "6", "--ckpt-every", "2")
    args[args.index("--lr"):args.index("--lr") + 2] = []
    train.main(args)
    printed = capsys.readouterr().out
    assert "dropped 1 line(s)" in printed and "resuming with a changed recipe: steps 4 -> 6" in printed
    records = logged(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["lr"] == pytest.approx(train.learning_rate(
        {"lr": 2e-3, "warmup": 2, "schedule": "cosine", "steps": 6, "min_lr_ratio": 0.33}, 4))
    ckpt = final_checkpoint(out)
    assert ckpt["config"]["lr"] == 2e-3 and ckpt["config"]["weight_decay"] == 0.05
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    # the next phase takes a new weight decay even though it carries the optimizer on, and
    # its data from the phase it starts from
    phase2 = train_args(train_data, out, "--phase", "2", "--steps", "2", "--weight-decay", "0")
    phase2[phase2.index("--data"):phase2.index("--data") + 2] = []
    train.main(phase2)
    assert "--data: " + train_data in capsys.readouterr().out
    assert final_checkpoint(out, 2)["optimizer"]["param_groups"][0]["weight_decay"] == 0.0
    # another architecture asked for where a checkpoint sets it: refused, not ignored
    with pytest.raises(SystemExit, match="ask for another architecture.*dim 128 \\(asked: 256\\)"):
        train.main(train_args(train_data, out, "--phase", "2", "--steps", "4",
                              "--preset", "MicroDiT_Tiny_2", "--model", '{"dim": 256}'))
    # a damaged latest checkpoint is named, with what to do
    latest = checkpoint.checkpoints(str(out / "phase2"))[-1]
    with open(latest, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SystemExit, match=f"{re.escape(latest)}: cannot be read as a checkpoint.*move it away"):
        train.cli(train_args(train_data, out, "--phase", "2", "--steps", "4"))


def test_out_of_gpu_memory_gives_advice_and_keeps_checkpoints(train_data, tmp_path,
                                                               monkeypatch):
    train.main(train_args(train_data, tmp_path, "--steps", "3"))
    folder = str(tmp_path / "phase1")
    before = checkpoint.checkpoints(folder)

    def out_of_memory(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 224.00 MiB.")

    monkeypatch.setattr(train, "edm_loss_per_sample", out_of_memory)
    with pytest.raises(SystemExit) as stop:
        train.cli(train_args(train_data, tmp_path, "--steps", "6"))
    message = str(stop.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 224.00 MiB.")
    assert "--micro-batch N" in message and "--activation-checkpointing" in message
    assert checkpoint.checkpoints(folder) == before
    assert checkpoint.load_checkpoint(before[-1])["step"] == 3


def test_a_forced_preset_keeps_the_checkpoints_position_scale():
    """A 512px-style model (positions interpolated by 2.0) rebuilt at another size with
    --preset must scale from the stored 2.0, as it does from its config."""
    from checkpoint import build_dit
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], input_size=16, pos_interp_scale=2.0)
    state = MicroDiT(cfg).state_dict()
    forced = build_dit(state, None, preset="MicroDiT_CPU_2", latent_size=8)
    configured = build_dit(state, dataclasses.asdict(cfg), latent_size=8)
    assert forced.cfg.pos_interp_scale == configured.cfg.pos_interp_scale == 1.0
    assert torch.equal(forced.pos_embed, configured.pos_embed)


def test_build_dit_copies_the_state_it_is_given():
    """train.py builds its sample-grid network from its live weights: the network must own
    copies, and a half-precision file must give a float32 network, as before."""
    from checkpoint import build_dit
    cfg = PRESETS["MicroDiT_CPU_2"]
    torch.manual_seed(0)
    live = MicroDiT(cfg)
    state = live.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    net = build_dit(state, dataclasses.asdict(cfg))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in live.parameters())          # untouched
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert all(torch.equal(state[k], v) for k, v in before.items())  # the weights given stay
    half = build_dit({k: v.half() for k, v in state.items()}, dataclasses.asdict(cfg))
    assert all(p.dtype == torch.float32 for p in half.parameters())
    # another latent size rebuilds pos_embed as the model itself would build it
    bigger = build_dit(state, dataclasses.asdict(cfg), latent_size=2 * cfg.input_size)
    scale = cfg.pos_interp_scale * 2
    expected = MicroDiT(dataclasses.replace(cfg, input_size=2 * cfg.input_size,
                                            pos_interp_scale=scale)).pos_embed
    assert torch.equal(bigger.pos_embed, expected)


def test_export_loads_in_sample(train_data, tmp_path):
    import sample
    train.main(train_args(train_data, tmp_path, "--steps", "3", "--ema-decay", "0.9",
                          "--ema-start", "1"))
    path = str(tmp_path / "weights.safetensors")
    train.main(train_args(train_data, tmp_path, "--export", path))
    net, info = checkpoint.load_dit(path)
    ckpt = final_checkpoint(tmp_path)
    assert info["weights"] == "ema" and info["vae"] == "none" and info["clip"] == "tiny-random"
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in net.state_dict().items())


def test_data_std_is_the_std_of_the_data(train_data, tmp_path):
    """data_std against numpy over every value (n above the set's size takes all rows), and
    a mix of two sources weighted 3:1 against the pooled values of the rows it draws."""
    values = np.load(Path(train_data) / "shard-00000.images_8.npy").astype(np.float64)
    assert data.data_std(train_data, 8, n=10**6) == round(values.std(ddof=1), 4)
    bright = tmp_path / "bright"
    shutil.copytree(train_data, bright)
    column = bright / "shard-00000.images_8.npy"
    np.save(column, np.load(column) * 0.5 + 0.5)  # another scale: the mix must show both
    mixed = data.data_std(f"{train_data}:3,{bright}:1", 8, n=96, seed=0)
    rng = np.random.default_rng(0)
    first = values[np.sort(rng.choice(96, 72, replace=False))]
    second = np.load(column).astype(np.float64)[np.sort(rng.choice(96, 24, replace=False))]
    assert mixed == round(np.concatenate([first.ravel(), second.ravel()]).std(ddof=1), 4)


def test_sigma_data_travels_with_the_model(train_data, tmp_path, monkeypatch):
    """--sigma-data data trains with the data's std as EDM's sigma_data, records it in the
    checkpoints and exports, resumes and continues (phase 2) with it, and sampling reads it
    back; a number sets it; a new model without the flag, and weights that record none (the
    released ones), train with the paper's 0.9."""
    import sample
    seen, real = [], train.edm_loss_per_sample

    def spy(*args, **kwargs):
        seen.append(kwargs["sigma_data"])
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "edm_loss_per_sample", spy)
    std = data.data_std(train_data, 8)
    assert 0.5 < std < 0.9  # the shapes' pixels in [-1, 1]: not the released latents' 0.9
    train.main(train_args(train_data, tmp_path / "a", "--steps", "3", "--sigma-data", "data"))
    assert set(seen) == {std}
    assert final_checkpoint(tmp_path / "a")["sigma_data"] == std
    train.main(train_args(train_data, tmp_path / "a", "--steps", "4"))  # a resume, no flag
    train.main(train_args(train_data, tmp_path / "a", "--phase", "2", "--steps", "1"))
    assert set(seen) == {std} and final_checkpoint(tmp_path / "a", 2)["sigma_data"] == std
    export = str(tmp_path / "a.safetensors")
    train.main(train_args(train_data, tmp_path / "a", "--phase", "2", "--export", export))
    assert checkpoint.load_dit(export)[1]["sigma_data"] == std
    assert sample.load_pipeline(export, device="cpu").sigma_data == std
    seen.clear()
    train.main(train_args(train_data, tmp_path / "b", "--steps", "1", "--sigma-data", "0.5"))
    assert seen == [0.5] and final_checkpoint(tmp_path / "b")["sigma_data"] == 0.5
    seen.clear()
    bare = tmp_path / "bare.pt"  # like a released .pt: a state_dict, nothing recorded
    torch.save(final_checkpoint(tmp_path / "b")["model"], bare)
    train.main(train_args(train_data, tmp_path / "c", "--steps", "1", "--init", str(bare)))
    assert seen == [0.9] and final_checkpoint(tmp_path / "c")["sigma_data"] == 0.9
    seen.clear()
    train.main(train_args(train_data, tmp_path / "e", "--steps", "1"))
    assert seen == [0.9] and final_checkpoint(tmp_path / "e")["sigma_data"] == 0.9
    with pytest.raises(SystemExit, match="--sigma-data 0.0: must be positive, or 'data'"):
        train.cli(train_args(train_data, tmp_path / "d", "--sigma-data", "0"))


def test_sampling_uses_the_models_sigma_data(pixel_checkpoint):
    """generate() denoises with the sigma_data it is given: the same as heun_sample with
    that EDMConfig, and another image than with 0.9."""
    import sample
    from diffusion import EDMConfig
    from text import TINY_RANDOM, load_text_encoder
    net, _ = checkpoint.load_dit(str(pixel_checkpoint))
    encoder = load_text_encoder(TINY_RANDOM)
    images = sample.generate(net, encoder, None, ["a red circle"], seed=1, steps=3,
                             guidance=2.0, batch_size=1, device="cpu", sigma_data=0.5)
    size = net.cfg.input_size
    noise = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    direct = heun_sample(net, noise, encoder.encode(["a red circle"]), 3, 2.0,
                         EDMConfig(sigma_data=0.5))
    assert torch.equal(images, (direct / 2 + 0.5).clamp(0, 1))
    assert not torch.equal(images, sample.generate(net, encoder, None, ["a red circle"], seed=1,
                                                   steps=3, guidance=2.0, batch_size=1,
                                                   device="cpu"))


def test_sample_refuses_bad_numbers_with_a_message(pixel_checkpoint, tmp_path, capsys):
    import sample
    base = ["a cat", "--ckpt", str(pixel_checkpoint), "--out", str(tmp_path), "--steps", "2"]
    for extra, message in [(["--res", "17"], "--res 17 must be a multiple of 2"),
                           (["--steps", "0"], "--steps must be at least 1"),
                           (["--n", "0"], "--n must be at least 1"),
                           (["--cfg", "-1"], "--cfg -1.0: the guidance scale must be 0 or "
                                             "more (1: none, 0: the unconditional model"),
                           (["--cfg", "nan"], "--cfg nan: the guidance scale must be 0")]:
        assert sample.main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_help_shows_the_defaults_and_whole_descriptions(capsys):
    import sample
    import eval as evaluation
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ["Heun steps (default 30)", "(default 5)", "noise (default 0)",
                    "per prompt (default 1)"]:
        assert default in text
    with pytest.raises(SystemExit):
        evaluation.parse_args(["shapes", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ["(default 200)", "(default 1234)", "Heun steps (default 30)", "(default 3)"]:
        assert default in text
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("and metrics for the built-in shapes data that need no download." in text)


def test_sample_refuses_pixel_space_for_a_latent_model(tmp_path, capsys):
    import sample
    cfg = PRESETS["MicroDiT_CPU_2"]  # 4 latent channels
    path = tmp_path / "latent.pt"
    torch.save({"model": MicroDiT(cfg).state_dict(), "model_config": dataclasses.asdict(cfg),
                "vae": None, "clip": "tiny-random", "step": 0}, path)
    assert sample.main(["a cat", "--ckpt", str(path), "--vae", "none", "--out", str(tmp_path),
                        "--steps", "1"]) == 2
    assert "--vae none is for pixel-space models" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def launcher(processes):
    """python, or torchrun with `processes` workers on a free port (a fixed one fails when
    another suite runs)."""
    import socket
    import sys
    if processes == 1:
        return [sys.executable]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={port}"]


def run_train(args, out, processes=1, expect=0):
    import subprocess
    done = subprocess.run([*launcher(processes), "train.py",
                           *[a.replace("OUT", str(out)) for a in args]],
                          cwd=Path(__file__).parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    assert (done.returncode == 0) == (expect == 0), done.stderr[-3000:]
    return done


def assert_same_weights(a, b):
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["ddp", "ddp accumulating", "fsdp"])
def test_torchrun_two_processes_equal_one(train_data, tmp_path, mode):
    """gloo DDP (or FSDP2) on 2 CPU processes, micro-batch 4 each, equals one process
    accumulating 2 micro-batches of 4: the same global batch of 8 ('ddp accumulating': 2
    micro-batches of 2 per process, gradients all-reduced after the second only). FSDP
    checkpoints hold whole tensors, so a sharded run also resumes exactly from one."""
    micro = "2" if mode == "ddp accumulating" else "4"
    args = train_args(train_data, "OUT", "--steps", "4", "--ckpt-every", "2", "--micro-batch", micro,
                      "--ema-decay", "0.5", "--ema-start", "1",
                      *(["--fsdp"] if mode == "fsdp" else []))
    run_train(args, tmp_path / "one")
    run_train(args, tmp_path / "two", processes=2)
    one, two = final_checkpoint(tmp_path / "one"), final_checkpoint(tmp_path / "two")
    assert_same_weights(one, two)
    assert_same_weights({"model": one["ema"]}, {"model": two["ema"]})  # sharded EMA under FSDP
    for key in ("loss", "grad_norm"):  # the gradient of the global batch's mean loss
        assert [r[key] for r in logged(tmp_path / "one")] == pytest.approx(
            [r[key] for r in logged(tmp_path / "two")], rel=1e-5), key
    assert one["optimizer"]["state"].keys() == two["optimizer"]["state"].keys()
    if mode == "fsdp":  # lose the last checkpoint, resume the sharded run from step 2
        os.remove(checkpoint.checkpoints(str(tmp_path / "two" / "phase1"))[-1])
        run_train(args, tmp_path / "two", processes=2)
        resumed = final_checkpoint(tmp_path / "two")
        assert resumed["step"] == 4
        assert_same_weights(one, resumed)
        for i, state in one["optimizer"]["state"].items():
            torch.testing.assert_close(state["exp_avg_sq"], resumed["optimizer"]["state"][i]["exp_avg_sq"],
                                       rtol=1e-5, atol=1e-12)


def test_a_run_moves_between_world_sizes(train_data, tmp_path):
    """2 processes (DDP) to step 2, then one process (accumulating 2) to step 4, equals one
    process all the way: the checkpoint, the loader position and the noise are world-size
    free."""
    args = train_args(train_data, "OUT", "--steps", "4", "--ckpt-every", "2", "--micro-batch", "4")
    run_train(args, tmp_path / "one")
    run_train([*args, "--steps", "2"], tmp_path / "moved", processes=2)  # warmup: same lr
    assert final_checkpoint(tmp_path / "moved")["step"] == 2
    run_train(args, tmp_path / "moved")
    assert final_checkpoint(tmp_path / "moved")["step"] == 4
    assert_same_weights(final_checkpoint(tmp_path / "one"), final_checkpoint(tmp_path / "moved"))


def test_activation_checkpointing_gives_the_same_gradients():
    from diffusion import edm_loss
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], input_size=8)
    torch.manual_seed(0)
    net = MicroDiT(cfg)
    x, y = torch.randn(4, cfg.in_channels, 8, 8), torch.randn(4, 77, cfg.caption_channels)
    normal, noise = torch.randn(4), torch.randn_like(x)
    ids_keep = random_ids_keep(4, 16, 0.5, "cpu", generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        net.activation_checkpointing = checkpointing
        net.zero_grad()
        edm_loss(net, x, y, 0.5, normal=normal, noise=noise, ids_keep=ids_keep).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- eval.py

def test_frechet_distance_closed_forms():
    from eval import frechet_distance
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.t() + 0.1 * torch.eye(6, dtype=torch.float64)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-8
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    d1, d2 = torch.rand(6, generator=g, dtype=torch.float64) + 0.5, torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    expected = (mu ** 2).sum() + ((d1.sqrt() - d2.sqrt()) ** 2).sum()
    assert frechet_distance(mu, torch.diag(d1), torch.zeros(6), torch.diag(d2)) == pytest.approx(float(expected))
    # scaling a covariance by c^2 (same eigenvectors): tr(S)(1 - c)^2
    assert frechet_distance(mu, cov, mu, 4 * cov) == pytest.approx(float(cov.trace()), rel=1e-8)


def test_shapes_metric_reads_renderings_back():
    from eval import prompt_following, read_attributes
    rng = np.random.default_rng(3)
    asked = [data.sample_attributes(rng) for _ in range(30)]
    images = [torch.from_numpy(np.array(data.render_shapes(a, 16))).permute(2, 0, 1) / 255
              for a in asked]
    assert all(read_attributes(im, a.background) == a for im, a in zip(images, asked))
    noisy = [(im + 0.15 * torch.randn(im.shape, generator=torch.Generator().manual_seed(i))).clamp(0, 1)
             for i, im in enumerate(images)]
    assert prompt_following(noisy, asked)["all"] > 0.9
    shuffled = prompt_following(images[1:] + images[:1], asked)
    assert shuffled["all"] < 0.2 and shuffled["position"] < 0.5


def test_shapes_templates_leave_out_the_background_colour():
    """The templates of a background are every shape, size and position in each of the 7
    other colours (350), rendered: a shape in the background's own colour is no image."""
    from eval import templates
    attrs, bank = templates("blue", 16)
    expected = {data.ShapeAttributes(s, c, z, p, "blue") for s in data.SHAPES
                for c in data.COLORS if c != "blue" for z in data.SIZES for p in data.POSITIONS}
    assert len(attrs) == len(set(attrs)) == 5 * 7 * 2 * 5 and set(attrs) == expected
    assert bank.shape == (350, 3, 16, 16)
    for a, image in list(zip(attrs, bank))[::23]:
        pixels = torch.from_numpy(np.array(data.render_shapes(a, 16))).permute(2, 0, 1) / 255
        assert torch.equal(image, pixels)


import eval as ev  # noqa: E402
import inception  # noqa: E402


@pytest.fixture
def small_inception(monkeypatch):
    """The random FID Inception run at 75 px (its smallest input) instead of 299: the same
    code path at 1/16 of the cost."""
    monkeypatch.setattr(inception, "INCEPTION_SIZE", 75)
    return inception.load_inception(inception.RANDOM)


def write_images(folder, seed, sizes, brightness=1.0):
    """Smooth random RGB images (noise upsampled), saved as PNGs: the paths."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        coarse = torch.rand(1, 3, 4, 4, generator=g) * brightness
        pixels = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        path = os.path.join(folder, f"{i:03d}.png")
        array = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def test_fid_skips_an_undecodable_image_and_says_so(small_inception, tmp_path):
    real = write_images(tmp_path / "real", 0, [(40, 40)] * 6)
    fake = write_images(tmp_path / "fake", 1, [(40, 40)] * 6)
    clean = ev.folder_fid(str(tmp_path / "real"), str(tmp_path / "fake"), small_inception)
    Path(fake[0]).write_bytes(b"not a png")                       # one corrupt file
    with pytest.warns(UserWarning, match="000.png: cannot be decoded, skipped"):
        result = ev.folder_fid(str(tmp_path / "real"), str(tmp_path / "fake"), small_inception)
    assert result["real"] == 6 and result["fake"] == 5 and result["fid"] != clean["fid"]
    os.remove(fake[0])  # the same as leaving it out
    assert ev.folder_fid(str(tmp_path / "real"), str(tmp_path / "fake"),
                         small_inception)["fid"] == pytest.approx(result["fid"])
    assert len(real) == 6


def test_fid_leaves_out_sample_pys_grid(small_inception, tmp_path, capsys):
    """sample.py writes grid.png beside NNNN_prompt.png: it is no generated image."""
    fake = tmp_path / "fake"
    for i, path in enumerate(write_images(fake, 1, [(40, 40)] * 4)):
        os.rename(path, fake / f"{i:04d}_a_cat.png")
    write_images(tmp_path / "real", 0, [(40, 40)] * 4)
    alone = ev.folder_fid(str(tmp_path / "real"), str(fake), small_inception)
    Image.new("RGB", (160, 40), (255, 0, 0)).save(fake / "grid.png")
    beside = ev.folder_fid(str(tmp_path / "real"), str(fake), small_inception)
    assert beside == alone and "grid.png left out" in capsys.readouterr().out


@torch.no_grad()
def slow_features(net, paths, transform=lambda img: img):
    """One image at a time, read with plain PIL: [N, 2048] float64."""
    rows = []
    for p in paths:
        img = transform(Image.open(p).convert("RGB"))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        rows.append(net(x[None])[0].double())
    return torch.stack(rows).numpy()


def reference_fid(a, b):
    """FID of two [N, D] feature matrices with fewer rows than columns, by another route:
    the nonzero eigenvalues of S_a S_b are the squared singular values of A B^T / sqrt((Na -
    1)(Nb - 1)) for the centred features A and B, so tr (S_a S_b)^(1/2) is a nuclear norm."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    ca, cb = a - a.mean(0), b - b.mean(0)
    nuclear = torch.linalg.matrix_norm(ca @ cb.T, ord="nuc")
    trace_sqrt = nuclear / ((len(a) - 1) * (len(b) - 1)) ** 0.5
    return float((a.mean(0) - b.mean(0)).square().sum() + ca.square().sum() / (len(a) - 1)
                 + cb.square().sum() / (len(b) - 1) - 2 * trace_sqrt)


def run_main(capsys, *args):
    rc = ev.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else err)


# ----------------------------------------------------------------------------- FID

def test_fid_of_two_folders_with_cached_reference_stats(small_inception, tmp_path, capsys,
                                                         monkeypatch):
    real = write_images(tmp_path / "real", 0, [(32, 32)] * 8 + [(40, 24), (24, 40)])
    fake = write_images(tmp_path / "fake", 1, [(32, 32)] * 10, brightness=0.6)
    stats = tmp_path / "cache" / "real.npz"
    common = ["fid", "--inception", "random", "--device", "cpu", "--fake", tmp_path / "fake"]
    rc, first = run_main(capsys, *common, "--real", tmp_path / "real", "--ref-stats", stats)
    assert rc == 0 and first["real"] == 10 and first["fake"] == 10

    a, b = slow_features(small_inception, real), slow_features(small_inception, fake)
    assert first["fid"] == pytest.approx(reference_fid(a, b), rel=1e-4)
    assert first["fid"] > 1e-3
    with np.load(stats) as f:
        np.testing.assert_allclose(f["mu"], a.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(f["sigma"], np.cov(a, rowvar=False), rtol=1e-4, atol=1e-8)
        assert int(f["count"]) == 10

    # the cache is read, not recomputed: only the fake side goes through the network
    saved = stats.read_bytes()
    computed = []
    real_stats = ev.inception_stats
    monkeypatch.setattr(ev, "inception_stats", lambda net, items, *a: computed.append(items)
                        or real_stats(net, items, *a))
    rc, again = run_main(capsys, *common, "--real", tmp_path / "real", "--ref-stats", stats)
    assert rc == 0 and again["fid"] == first["fid"] and stats.read_bytes() == saved
    assert [len(items) for items in computed] == [10] and "fake" in computed[0][0]
    assert not [f for f in os.listdir(stats.parent) if ".tmp" in f]
    # new pixels behind the same names: the cached statistics no longer describe them
    write_images(tmp_path / "real", 5, [(32, 32)] * 10, brightness=0.3)
    rc, err = run_main(capsys, *common, "--real", tmp_path / "real", "--ref-stats", stats)
    assert rc == 2 and "delete it" in err

    # stats of another folder are refused, not silently reused
    rc, err = run_main(capsys, *common, "--real", tmp_path / "fake", "--ref-stats", stats)
    assert rc == 2 and "delete it" in err

    rc, same = run_main(capsys, *common, "--real", tmp_path / "fake")
    assert rc == 0 and abs(same["fid"]) < 1e-6


def test_fid_inception_has_the_weight_files_names_and_shapes():
    """pytorch-fid loads pt_inception-2015-12-05-6726825d.pth strictly into torchvision's
    inception_v3(num_classes=1008, aux_logits=False): ours must have its every name and shape."""
    import torchvision
    net = inception.load_inception(inception.RANDOM)
    tv = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False,
                                         init_weights=False)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    assert ours["fc.weight"] == (1008, 2048) and ours["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert ours["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert not any(k.startswith("AuxLogits") for k in ours)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960  # 21,785,568 + fc 2,065,392
    assert inception.INCEPTION_SIZE == 299


def test_fid_inception_weights_file_and_clear_errors(small_inception, tmp_path, monkeypatch,
                                                     capsys):
    torch.save(small_inception.state_dict(), tmp_path / "weights.pth")
    with pytest.warns(UserWarning, match="not the published file's 6726825d"):
        loaded = inception.load_inception(str(tmp_path / "weights.pth"))
    x = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), small_inception(x))
    # other weights than the published file: named apart, so cached statistics never mix
    digest = hashlib.sha256((tmp_path / "weights.pth").read_bytes()).hexdigest()[:8]
    assert loaded.name == f"inception weights weights.pth sha256 {digest}"
    # a foreign or cut-short file: a message with where to get the right one
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "imagenet.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "weights.pth").read_bytes()[:5000])
    for bad, says in [("imagenet.pth", "not the FID Inception weights"),
                      ("cut.pth", "cannot be read")]:
        with pytest.raises(ValueError, match=says) as e, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inception.load_inception(str(tmp_path / bad))
        assert inception.INCEPTION_URL in str(e.value)

    write_images(tmp_path / "a", 0, [(8, 8)] * 2)
    rc, err = run_main(capsys, "fid", "--real", tmp_path / "a", "--fake", tmp_path / "a",
                       "--inception", tmp_path / "missing.pth")
    assert rc == 2 and inception.INCEPTION_URL in err

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError) as e:
        inception.load_inception()
    assert inception.INCEPTION_URL in str(e.value) and "--inception PATH" in str(e.value)
    assert os.path.join(torch.hub.get_dir(), "checkpoints") in str(e.value)


def test_fid_inception_is_torchvisions_trunk_with_the_fid_blocks(small_inception):
    """torchvision's Inception3 (stem, pools, order, final average) holding our blocks, on
    the input resized and scaled by hand, gives our features."""
    import torchvision
    net = small_inception
    tv = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False,
                                         init_weights=False)
    tv.load_state_dict(net.state_dict())
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7b", "Mixed_7c"):
        setattr(tv, name, getattr(net, name))
    tv.fc = torch.nn.Identity()
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tv.eval()(2 * F.interpolate(x, size=(75, 75), mode="bilinear") - 1)
        got = net(x)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got.std() > 0.01  # the random weights keep the features alive


def test_tf_average_pool_leaves_the_padding_out():
    x = torch.ones(1, 1, 4, 4)
    assert torch.equal(inception.tf_avg_pool(x), x)
    default = F.avg_pool2d(x, 3, stride=1, padding=1)
    assert default[0, 0, 0, 0] == pytest.approx(4 / 9)  # corner: 4 of 9 pixels inside
    assert default[0, 0, 0, 1] == pytest.approx(6 / 9)  # edge: 6 of 9
    x = torch.arange(16.).reshape(1, 1, 4, 4)
    assert inception.tf_avg_pool(x)[0, 0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)


@pytest.mark.parametrize("name, pool_channels", [("Mixed_5b", 32), ("Mixed_6b", 192),
                                                  ("Mixed_7b", 192), ("Mixed_7c", 192)])
def test_fid_blocks_differ_from_torchvision_only_in_their_pool(name, pool_channels):
    """Same weights in torchvision's block: the conv branches agree everywhere; the pool
    branch (the last channels) agrees inside and differs on the border for the average
    pools, and for Mixed_7c is the max pool's, everywhere."""
    from torchvision.models import inception as tvi
    ours = getattr(inception.load_inception(inception.RANDOM), name)
    cls = {"A": tvi.InceptionA, "C": tvi.InceptionC, "E": tvi.InceptionE}[type(ours).__name__[-1]]
    in_channels = ours.branch1x1.conv.in_channels
    kwargs = {"Mixed_5b": {"pool_features": 32}, "Mixed_6b": {"channels_7x7": 128}}.get(name, {})
    theirs = cls(in_channels, **kwargs).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, in_channels, 6, 6, generator=torch.Generator().manual_seed(0)).relu()
    with torch.no_grad():
        a, b = ours(x), theirs(x)
        expected_pool = ours.branch_pool(F.max_pool2d(x, 3, stride=1, padding=1)
                                         if name == "Mixed_7c" else inception.tf_avg_pool(x))
    torch.testing.assert_close(a[:, :-pool_channels], b[:, :-pool_channels], rtol=0, atol=0)
    torch.testing.assert_close(a[:, -pool_channels:], expected_pool, rtol=0, atol=0)
    inner = (slice(None), slice(-pool_channels, None), slice(1, -1), slice(1, -1))
    border_differs = (a[:, -pool_channels:] - b[:, -pool_channels:]).abs()[..., 0, :].max() > 1e-3
    assert border_differs
    if name == "Mixed_7c":
        assert (a[inner] - b[inner]).abs().max() > 1e-3
    else:
        torch.testing.assert_close(a[inner], b[inner], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- CLIP score

CAPTIONS = ["a red circle", "a dog on a sofa", "two cats", "a tall building at night", "x",
            "a plate of food", "blue sky", "a man riding a horse"]


def test_clip_score_equals_a_slow_reference_and_clamps_at_zero(tmp_path):
    import open_clip
    scorer = ev.load_clip_scorer(ev.TINY_RANDOM)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(CAPTIONS)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    raw = []
    with torch.no_grad():
        for path, caption in zip(paths, CAPTIONS):
            img = Image.open(path).convert("RGB").resize((32, 32), Image.BICUBIC)
            x = (torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1) / 255 - mean) / std
            u = scorer.model.encode_image(x[None])[0]
            v = scorer.model.encode_text(tokenizer([caption]))[0]
            raw.append(100 * float(u @ v / (u.norm() * v.norm())))
    assert min(raw) < -1 and max(raw) > 1  # both signs: the clamp matters here
    torch.testing.assert_close(ev.clip_cosines(scorer, [Image.open(p) for p in paths], CAPTIONS),
                               torch.tensor(raw), rtol=1e-4, atol=1e-4)
    assert ev.clip_score(scorer, paths, CAPTIONS) == pytest.approx(np.mean(np.maximum(raw, 0)),
                                                                   rel=1e-5)
    assert ev.clip_score(scorer, paths, CAPTIONS) > np.mean(raw)
    # the same images with captions shifted one place: a different, still clamped, score
    shifted = CAPTIONS[1:] + CAPTIONS[:1]
    assert ev.clip_score(scorer, paths, shifted) != pytest.approx(
        ev.clip_score(scorer, paths, CAPTIONS))


def test_clip_score_pairs_each_image_with_its_caption_across_feature_batches(tmp_path):
    """53 images go through the scorer as a batch of FEATURE_BATCH (50) and one of 3; every
    image, in either batch, is scored against its own caption: the score is the mean of the
    cosines computed one image at a time, each clamped at 0."""
    scorer = ev.load_clip_scorer(ev.TINY_RANDOM)
    assert ev.FEATURE_BATCH == 50
    rng = np.random.default_rng(1)
    paths, captions = [], [f"{CAPTIONS[i % len(CAPTIONS)]} number {i}" for i in range(53)]
    for i in range(53):
        paths.append(tmp_path / f"{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    images = [Image.open(p) for p in paths]

    def alone(i, caption):
        return float(ev.clip_cosines(scorer, [images[i]], [caption])[0])
    own = [alone(i, c) for i, c in enumerate(captions)]
    assert ev.clip_score(scorer, paths, captions) == pytest.approx(
        np.mean(np.maximum(own, 0)), rel=1e-5)
    # not vacuous: the last 3 scored with the first batch's first captions give another score
    mispaired = own[:50] + [alone(50 + j, captions[j]) for j in range(3)]
    assert np.mean(np.maximum(mispaired, 0)) != pytest.approx(np.mean(np.maximum(own, 0)),
                                                              rel=1e-4)
    # an image that cannot be decoded leaves with its own caption; the rest stay paired
    paths[10].write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="10.png: cannot be decoded, skipped"):
        score = ev.clip_score(scorer, paths, captions)
    assert score == pytest.approx(np.mean(np.maximum(own[:10] + own[11:], 0)), rel=1e-5)


def test_tiny_random_clip_is_fixed_by_its_seed_and_the_spec_is_checked():
    a, b = ev.tiny_random_clip(), ev.tiny_random_clip()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="ARCH:TAG"):
        ev.load_clip_scorer("ViT-L-14:no-such-tag-or-file")
    with pytest.raises(FileNotFoundError, match="ARCH:TAG"):
        ev.load_clip_scorer("NoSuchArch:openai")


# ----------------------------------------------------------------------------- COCO-30K

def fake_coco(root):
    """A captions JSON and 6 images of odd sizes; image 7 has no caption."""
    sizes = {1: (24, 18), 2: (18, 30), 3: (20, 20), 5: (30, 22), 8: (17, 25), 9: (26, 26),
             7: (20, 20)}
    images, annotations = [], []
    for image_id, (w, h) in sizes.items():
        write_images(root / "tmp", image_id, [(w, h)])
        os.replace(root / "tmp" / "000.png", root / f"COCO_val2014_{image_id:012d}.png")
        images.append({"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.png"})
    for ann_id, (image_id, caption) in enumerate(
            [(1, "a cat on a mat"), (2, "two dogs"), (1, " a cat sleeping "), (3, "a red bus"),
             (5, "a bowl of fruit"), (8, "a man surfing"), (9, "a clock tower"),
             (3, "a bus on a street"), (5, "apples and pears"), (2, "puppies playing")]):
        annotations.append({"id": 100 - ann_id, "image_id": image_id, "caption": caption})
    path = root / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, {i: [a["caption"].strip() for a in annotations if a["image_id"] == i]
                  for i in sizes}


@pytest.fixture
def pixel_checkpoint(tmp_path):
    """A random pixel-space CPU model saved as train.py saves it, naming its encoders."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], in_channels=3)
    net = MicroDiT(cfg)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / "pixel.pt"
    torch.save({"model": net.state_dict(), "model_config": dataclasses.asdict(cfg),
                "vae": "none", "clip": "tiny-random", "step": 0}, path)
    return path


def test_coco_captions_are_a_seeded_nested_choice(tmp_path):
    captions_json, captions = fake_coco(tmp_path)
    chosen = ev.choose_captions(captions_json, 6, seed=0)
    assert [c["index"] for c in chosen] == list(range(6))
    assert sorted(c["image_id"] for c in chosen) == [1, 2, 3, 5, 8, 9]  # 7 has no caption
    assert all(c["caption"] in captions[c["image_id"]] for c in chosen)
    assert ev.choose_captions(captions_json, 6, seed=0) == chosen
    assert ev.choose_captions(captions_json, 4, seed=0) == chosen[:4]
    other = ev.choose_captions(captions_json, 6, seed=1)
    assert [c["image_id"] for c in other] != [c["image_id"] for c in chosen]
    with pytest.raises(ValueError, match="only 6 captioned images"):
        ev.choose_captions(captions_json, 7)
    # null and blank captions are no captions: never drawn; an image with only those has none
    coco = json.loads(Path(captions_json).read_text())
    first = min(coco["annotations"], key=lambda a: a["id"])
    for a in coco["annotations"]:
        if a["image_id"] == first["image_id"]:
            a["caption"] = None if a is first else "  "
    Path(captions_json).write_text(json.dumps(coco))
    remaining = ev.choose_captions(captions_json, 5, seed=0)
    assert first["image_id"] not in {c["image_id"] for c in remaining}
    with pytest.raises(ValueError, match="only 5 captioned images"):
        ev.choose_captions(captions_json, 6)


def test_coco_defaults_are_the_papers():
    """The COCO protocol samples as the released pipeline does unless told otherwise: 30 Heun
    steps, guidance 5, 30,000 images."""
    args = ev.parse_args(["coco", "--ckpt", "m.pt", "--captions", "c.json", "--images", "val",
                          "--out", "o"])
    assert (args.steps, args.cfg, args.n) == (30, 5.0, 30000)


def test_coco_protocol_end_to_end(small_inception, pixel_checkpoint, tmp_path, monkeypatch,
                                  capsys):
    from checkpoint import load_dit
    from sample import generate, to_pil
    from text import load_text_encoder
    captions_json, _ = fake_coco(tmp_path)
    common = ["coco", "--ckpt", pixel_checkpoint, "--captions", captions_json, "--images",
              tmp_path, "--n", 4, "--steps", 2, "--cfg", 2.0, "--batch-size", 3, "--seed", 5,
              "--device", "cpu"]
    args = {w: ev.parse_args([str(a) for a in common + ["--out", tmp_path / w]])
            for w in ("one", "two")}
    ev.coco_generate(args["one"], rank=0, world_size=1)
    ev.coco_generate(args["two"], rank=1, world_size=2)  # batch 1 = index 3 only
    assert os.listdir(tmp_path / "two" / "images") == ["00003.png"]
    ev.coco_generate(args["two"], rank=0, world_size=2)
    pngs = {w: [(tmp_path / w / "images" / f"{i:05d}.png").read_bytes() for i in range(4)]
            for w in ("one", "two")}
    assert pngs["one"] == pngs["two"]

    # image i of seed-batch k is sample.generate's for that batch's captions and seed
    chosen = ev.choose_captions(captions_json, 4, seed=5)
    net, _ = load_dit(str(pixel_checkpoint))
    encoder = load_text_encoder("tiny-random")
    # every batch has noise of its own: a seed per (--seed, batch index)
    assert len({ev.batch_seed(5, k) for k in range(4)} | {ev.batch_seed(6, 0)}) == 5
    for k, indices in enumerate([range(0, 3), range(3, 4)]):
        images = generate(net, encoder, None, [chosen[i]["caption"] for i in indices],
                          seed=ev.batch_seed(5, k), steps=2, guidance=2.0, batch_size=3, device="cpu")
        for i, image in zip(indices, images):
            png = Image.open(tmp_path / "one" / "images" / f"{i:05d}.png")
            assert np.array_equal(np.asarray(png), np.asarray(to_pil(image)))
            assert png.text["caption"] == chosen[i]["caption"]

    # the metrics: all images exist, so nothing is loaded or drawn again
    def no_generation(*a, **kw):
        raise AssertionError("generation should have been skipped")
    monkeypatch.setattr(ev, "load_pipeline", no_generation)
    stats = tmp_path / "ref.npz"
    metric_args = ["--inception", "random", "--clip-score-model", "tiny-random",
                   "--ref-stats", stats]
    rc, result = run_main(capsys, *common, "--out", tmp_path / "one", *metric_args)
    assert rc == 0 and stats.exists()
    assert json.loads((tmp_path / "one" / "result.json").read_text()) == result
    assert result["n"] == 4 and result["resolution"] == 16 and result["feature_net"] == "random-0"

    real = [tmp_path / c["file_name"] for c in chosen]
    fake = [tmp_path / "one" / "images" / f"{i:05d}.png" for i in range(4)]
    to_16 = lambda img: prepare_lib.resize_center_crop(img, 16)  # noqa: E731
    expected = reference_fid(slow_features(small_inception, real, to_16),
                             slow_features(small_inception, fake))
    assert result["fid"] == pytest.approx(expected, rel=1e-4)
    scorer = ev.load_clip_scorer("tiny-random")
    assert result["clip_score"] == pytest.approx(
        ev.clip_score(scorer, fake, [c["caption"] for c in chosen]), rel=1e-6)

    # resuming: a lost image is drawn again, the same; other settings are refused
    monkeypatch.undo()
    os.remove(fake[1])
    ev.coco_generate(args["one"])
    assert fake[1].read_bytes() == pngs["one"][1]
    with pytest.raises(ValueError, match=r"other settings \(seed: \d+ then, 6 now\): use "
                                         r"another --out$"):
        ev.coco_generate(ev.parse_args([str(a) for a in common + ["--seed", 6, "--out",
                                                                  tmp_path / "one"]]))

    # a damaged image stops the metrics with what to do, rather than a crash or a silent gap
    fake[2].write_bytes(fake[2].read_bytes()[:40])
    rc, err = run_main(capsys, *common, "--out", tmp_path / "one", *metric_args)
    assert rc == 2 and "00002.png cannot be decoded" in err and "delete it" in err
    # a reference image missing from --images is found before any generation
    os.remove(real[0])
    with pytest.raises(FileNotFoundError, match="chosen COCO images are not in --images"):
        ev.coco_generate(ev.parse_args([str(a) for a in common + ["--out", tmp_path / "new"]]))
    assert not (tmp_path / "new" / "images").exists()


def test_coco_resume_and_scoring_refuse_what_would_mix(small_inception, pixel_checkpoint,
                                                       tmp_path, capsys):
    captions_json, _ = fake_coco(tmp_path)
    ckpt = tmp_path / "model.pt"
    shutil.copy(pixel_checkpoint, ckpt)
    common = ["coco", "--ckpt", ckpt, "--captions", captions_json, "--images", tmp_path,
              "--n", 2, "--steps", 1, "--batch-size", 2, "--device", "cpu", "--out",
              tmp_path / "run"]
    ev.coco_generate(ev.parse_args([str(a) for a in common]))
    original, st = ckpt.read_bytes(), os.stat(ckpt)
    with pytest.raises(FileNotFoundError, match="--captions .*nope.json: no such file"):
        ev.coco_generate(ev.parse_args([str(a) for a in common[:4]] + [
            str(tmp_path / "nope.json")] + [str(a) for a in common[5:]]))
    # the same name, other weights: images from two models would mix in one FID
    state = torch.load(ckpt, weights_only=True)
    state["model"]["final_layer.linear.weight"] += 1
    torch.save(state, ckpt)
    more = [str(a) for a in common] + ["--n", "3"]
    with pytest.raises(ValueError, match="use another --out"):
        ev.coco_generate(ev.parse_args(more))
    ckpt.write_bytes(original)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    ev.coco_generate(ev.parse_args(more))  # the very file again: resumes
    # PNGs scored against captions they were not drawn for (another --seed picks others)
    metrics = ["--inception", "random", "--clip-score-model", "tiny-random"]
    with pytest.raises(ValueError, match="was drawn for COCO image"):
        ev.coco_evaluate(ev.parse_args([str(a) for a in common + ["--seed", 9, *metrics]]))
    # the default reference statistics are named by n, seed and resolution
    rc, result = run_main(capsys, *common, *metrics)
    assert rc == 0 and result["n"] == 2
    assert (tmp_path / "run" / "reference_stats_n2_seed0_16px.npz").exists()


def test_fid_refuses_what_would_give_a_wrong_number(small_inception, tmp_path, capsys):
    write_images(tmp_path / "two", 0, [(8, 8)] * 2)
    write_images(tmp_path / "one", 0, [(8, 8)])
    rc, err = run_main(capsys, "fid", "--real", tmp_path / "two", "--fake", tmp_path / "one",
                       "--inception", "random")
    assert rc == 2 and "1 of the 1 images" in err and "at least 2" in err  # not NaN
    np.save(tmp_path / "stats.npy", np.zeros(3))
    np.savez(tmp_path / "pytorch_fid.npz", mu=np.zeros(3), sigma=np.eye(3))
    for bad in ("stats.npy", "pytorch_fid.npz"):
        rc, err = run_main(capsys, "fid", "--real", tmp_path / "two", "--fake", tmp_path / "two",
                           "--inception", "random", "--ref-stats", tmp_path / bad)
        assert rc == 2 and "not a statistics file written by eval.py" in err
    rc, err = run_main(capsys, "fid", "--real", tmp_path / "stats.npy", "--fake",
                       tmp_path / "two", "--inception", "random")
    assert rc == 2 and "--real" in err and "not a folder" in err
    rc, err = run_main(capsys, "shapes", "--ckpt", "x.pt", "--n", "1")
    assert rc == 2 and "--n 1: must be at least 2" in err


# ----------------------------------------------------------------------------- shapes

def renders(seed, n=200, res=16, **change):
    rng = np.random.default_rng(seed)
    attrs = [dataclasses.replace(data.sample_attributes(rng), **change) for _ in range(n)]
    return ev.render_set(attrs, res)


def test_shapes_frechet_distance():
    real, other = renders(1), renders(2)
    assert abs(ev.shapes_frechet(real, real)) < 1e-4
    floor = ev.shapes_frechet(real, other)
    assert floor > 0
    for mismatched in (renders(2, position="center"), renders(2, size="small"),
                       [1 - x for x in other]):
        assert ev.shapes_frechet(real, mismatched) > 1.5 * floor
    weights = lambda seed: [p for p in ev.shapes_feature_net(seed).parameters()]  # noqa: E731
    assert all(torch.equal(p, q) for p, q in zip(weights(0), weights(0)))
    assert not torch.equal(weights(0)[0], weights(1)[0])


def test_shapes_features_see_the_images_mapped_to_minus_one_one():
    """The Frechet distance of shapes_frechet equals one computed here from features made
    step by step: the [0, 1] images resized to 32 px (bilinear), mapped to [-1, 1] by 2x - 1,
    through the four stride-2 3x3 convolutions with ReLU, averaged over positions."""
    real, other = renders(1, n=40), renders(2, n=40)
    convs = [m for m in ev.shapes_feature_net() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64]

    def features(images):
        x = F.interpolate(torch.stack(images), size=(32, 32), mode="bilinear",
                          align_corners=False)
        h = 2 * x - 1
        for conv in convs:
            h = F.conv2d(h, conv.weight, conv.bias, stride=2, padding=1).relu()
        return h.mean(dim=(2, 3)).double()                              # (N, 64)
    with torch.no_grad():
        expected = reference_fid(features(real), features(other))
    assert ev.shapes_frechet(real, other) == pytest.approx(expected, rel=1e-5)


def test_eval_shapes_reports_the_frechet_distance_and_its_floor(pixel_checkpoint):
    scores, images, asked = ev.evaluate_shapes(str(pixel_checkpoint), n=6, seed=3, steps=2,
                                               guidance=2.0, device="cpu", train_data="none")
    assert set(scores) == {"shape", "color", "size", "position", "all", "frechet",
                           "frechet_real_vs_real", "training_captions_held_out"}
    assert scores["training_captions_held_out"] == 0
    assert scores["frechet"] == ev.shapes_frechet(images, ev.render_set(asked, 16))
    assert 0 < scores["frechet_real_vs_real"] != scores["frechet"]


def test_held_out_draw_when_training_covers_nearly_every_caption():
    every = {data.caption_of(data.ShapeAttributes(s, c, z, p, b)) for s in data.SHAPES
             for c in data.COLORS for z in data.SIZES for p in data.POSITIONS
             for b in data.COLORS if b != c}
    assert len(every) == 5 * 8 * 2 * 5 * 7
    with pytest.raises(ValueError, match="none is left to hold out"):
        ev.held_out_attributes(np.random.default_rng(0), 3, every)
    last = sorted(every)[0]
    with pytest.warns(UserWarning, match="only 1 captions are not in the training data"):
        asked = ev.held_out_attributes(np.random.default_rng(0), 3, every - {last})
    assert [data.caption_of(a) for a in asked] == [last] * 3


def test_eval_shapes_holds_the_training_captions_out(pixel_checkpoint, tmp_path):
    folder = tmp_path / "train"
    prepare(PrepareConfig(src="demo", out=str(folder), res=[16], vae="none", clip="tiny-random",
                          format="demo", n=300))
    dataset = data.LatentDataset(str(folder))
    seen = {dataset.caption(i) for i in range(dataset.num_samples)}
    assert seen == {data.caption_of(data.demo_attributes(0, i)) for i in range(300)}
    assert ev.training_captions(str(pixel_checkpoint), {}, str(folder)) == seen
    asked = ev.held_out_attributes(np.random.default_rng([3, 7]), 400, seen)
    assert len(asked) == 400 and not {data.caption_of(a) for a in asked} & seen
    # without it, a draw of that size meets training captions: the check is not vacuous
    rng = np.random.default_rng([3, 7])
    drawn = {data.caption_of(data.sample_attributes(rng)) for _ in range(400)}
    assert drawn & seen
    with pytest.raises(ValueError, match="--train-data DIR"):
        ev.training_captions(str(pixel_checkpoint), {"data": None})  # names no data folder


# ----------------------------------------------------------------------------- bench.py

def test_bench_loader_prints_and_returns_its_figures(tmp_path, capsys):
    import bench
    figures = bench.bench_loader(str(tmp_path / "fake"), 16, 8, batches=2, fake_samples=40,
                                 caption_dim=8, prefetch=0, cache="warm")
    assert (figures["batch"], figures["batches"], figures["startup_batches"]) == (8, 2, 3)
    assert figures["samples_per_s"] > 0 and figures["ms_per_batch"] > 0
    assert "next 2 batches, page cache warm" in capsys.readouterr().out
    # a folder that holds anything but a finished data set (a prepare still running, whose
    # index.json comes last) is never filled with random samples
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "prepare.json").write_text("{}")
    with pytest.raises(ValueError, match="not empty and holds no finished data set"):
        bench.bench_loader(str(busy), 16, 8, batches=2, fake_samples=40, caption_dim=8,
                           prefetch=0, cache="warm")
    assert os.listdir(busy) == ["prepare.json"]
    # the same through bench.py's flags, into a folder kept for a later run
    kept = tmp_path / "kept"
    results = bench.main(["--quick", "--skip", "train", "sample", "--res", "16", "--data",
                          str(kept), "--fake-samples", "40", "--data-batch", "8",
                          "--caption-dim", "8", "--data-batches", "2"])
    assert (results["data"]["batch"], results["data"]["batches"]) == (8, 2)
    index = json.loads((kept / "index.json").read_text())
    assert index["num_samples"] == 40 and index["columns"]["caption_feats"]["shape"] == [77, 8]


def test_bench_quick_mode_runs_and_reports_consistent_figures(tmp_path):
    import bench
    out = tmp_path / "bench.json"
    results = bench.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text())["train"]["rows"] == results["train"]["rows"]
    rows = {row["mask_ratio"]: row for row in results["train"]["rows"]}
    assert sorted(rows) == [0.0, 0.75]
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], input_size=16)
    for m, row in rows.items():
        assert row["images_per_s"] * row["ms_per_step"] / 1000 == pytest.approx(4)
        expected = model_lib.train_flops_per_image(cfg, mask_ratio=m) * 4 / (row["ms_per_step"] / 1000)
        assert row["tflops_per_s"] * 1e12 == pytest.approx(expected)
        assert row["mfu"] is None  # no known peak on a CPU
    masking = results["train"]["masking"]["eager"]
    assert masking["flop_ratio"] == pytest.approx(forward_flops(cfg, mask_ratio=0) / forward_flops(cfg, mask_ratio=0.75))
    assert masking["speedup"] == pytest.approx(rows[0.0]["ms_per_step"] / rows[0.75]["ms_per_step"])
    assert results["sample"]["network_calls"] == 5 and results["sample"]["seconds_per_image"] > 0
    assert results["data"]["samples_per_s"] > 0


def test_bench_checkpoint_times_the_whole_state_both_ways(monkeypatch):
    """bench.py --checkpoint copies what a checkpoint holds: the weights (with buffers), both
    Adam moments and the step of each parameter; the reused buffers are copied into at
    every timed round (and once before, making them), the new-memory way never touches them."""
    import bench
    copies = []
    real_copy = checkpoint.HostSnapshot.copy
    monkeypatch.setattr(checkpoint.HostSnapshot, "copy",
                        lambda self, key, t: copies.append(key) or real_copy(self, key, t))
    c = bench.main(["--quick", "--checkpoint", "--rounds", "3",
                    "--skip", "train", "sample", "data"])["checkpoint"]
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], input_size=16)
    model = model_lib.MicroDiT(cfg)
    params = list(model.parameters())
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    expected = weights + 2 * sum(p.numel() * 4 for p in params) + 4 * len(params)
    assert c["state_gb"] * 1e9 == pytest.approx(expected)
    assert len(copies) == 4 * (len(model.state_dict()) + 3 * len(params))  # 1 + 3 rounds
    assert not c["pinned"] and c["rounds"] == 3
    assert c["reused_queued_s"] <= c["reused_landed_s"]
    assert all(c[k] > 0 for k in ("new_memory_s", "reused_landed_s", "reused_first_s"))


def test_bench_sampling_runs_with_guidance(monkeypatch):
    """The sampling figure is for the paper's sampler, guidance 5: every network call sees
    both halves of the guided batch, 2 x the sample batch, in 2 steps - 1 calls per run."""
    import bench
    batches = []
    forward = MicroDiT.forward

    def spy(self, x, *args, **kwargs):
        batches.append(x.shape[0])
        return forward(self, x, *args, **kwargs)
    monkeypatch.setattr(MicroDiT, "forward", spy)
    results = bench.main(["--quick", "--res", "64", "--sample-steps", "2", "--skip", "train",
                          "data"])
    s = results["sample"]
    assert (s["cfg"], s["batch"], s["network_calls"]) == (5.0, 2, 3)
    assert batches and set(batches) == {2 * 2} and len(batches) % 3 == 0


def test_bench_profile_splits_the_step_time_by_kind(capsys, tmp_path):
    import bench
    from torch.profiler import ProfilerActivity, profile
    # kernel names from the H200 profile of the compiled XL step (docs/bench)
    kinds = {
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wg": "attention",
        "void cudnn::fusion::convert_dq_to_16bits<true>(void": "attention",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel": "optimizer and grad clipping",
        "triton_poi_fused_gelu_gelu_backward_114": "activation (GELU, SwiGLU)",
        "triton_per_fused__to_copy_add_mul_native_layer_norm_12": "norm (+ modulation, residual)",
        "triton_poi_fused_index_select_7": "MoE dispatch: gathers, scatters, top-k",
        "triton_poi_fused__to_copy_add_mul_3": "other fused kernels (casts, adds, multiplies)",
        "Memcpy HtoD (Pageable -> Device)": "copies and fills",
    }
    assert {name: bench.kernel_kind(name) for name in kinds} == kinds

    # a CPU profile: each operator's self time is counted once, in its kind, per step
    a = torch.randn(384, 384)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            F.gelu(a @ a)
    by_kind = {row["kind"]: row for row in bench.time_by_kind(prof, torch.device("cpu"), steps=3)}
    self_ms = {e.key: e.self_cpu_time_total / 1000 / 3 for e in prof.key_averages()}
    assert by_kind["matmul"]["ms"] == pytest.approx(self_ms["aten::mm"])
    assert by_kind["activation (GELU, SwiGLU)"]["ms"] == pytest.approx(self_ms["aten::gelu"])
    assert sum(row["ms"] for row in by_kind.values()) == pytest.approx(sum(self_ms.values()))

    trace = tmp_path / "step.json.gz"
    results = bench.main(["--quick", "--trace", str(trace), "--masks", "0.75",
                          "--skip", "sample", "data"])  # --trace profiles too
    printed = capsys.readouterr().out
    profiled = results["train"]["profile"]
    assert profiled["variant"] == {"compile": "eager", "mask_ratio": 0.75}
    assert profiled["device_gaps"] is None  # no device kernels on a CPU
    kinds_seen = [row["kind"] for row in profiled["ms_per_step_by_kind"]]
    assert {"matmul", "attention", "optimizer and grad clipping"} <= set(kinds_seen)
    assert "time per step by kind" in printed and kinds_seen[0] in printed
    # the timeline of the two profiled steps, with the host's Python frames
    import gzip
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    names = collections.Counter(e.get("name") for e in events)
    assert names["aten::_fused_adamw_"] == 2 and names["aten::mm"] > 10
    assert any("train_step" in name for name in names if name)  # bench.py's own frame


def test_bench_device_gaps_merge_overlapping_kernels_and_name_the_longest_gaps():
    import bench
    # µs; b overlaps a (another stream), e lies inside d: each busy stretch counts once
    kernels = [(25, 30, "c"), (0, 10, "a"), (5, 20, "b"), (40, 50, "d"), (42, 45, "e"),
               (51, 52, "f")]
    gaps = bench.device_gaps(kernels, steps=2, top=2)
    assert gaps["busy_ms"] == pytest.approx((20 + 5 + 10 + 1) / 1000 / 2)
    assert gaps["span_ms"] == pytest.approx(52 / 1000 / 2)
    assert gaps["idle_ms"] == pytest.approx((5 + 10 + 1) / 1000 / 2)
    assert gaps["gaps"] == [{"ms": 0.010, "after": "c", "before": "d"},
                            {"ms": 0.005, "after": "b", "before": "c"}]
    assert bench.device_gaps([], steps=1) == {"busy_ms": 0.0, "span_ms": 0.0, "idle_ms": 0.0,
                                              "gaps": []}


@pytest.mark.parametrize("mask_before_mixer", [False, True])
def test_bench_attention_shapes_are_the_models_attention_calls(monkeypatch, mask_before_mixer):
    import bench
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], mask_before_mixer=mask_before_mixer)
    calls = collections.Counter()
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        calls[(*q.shape, k.shape[2])] += 1
        return sdpa(q, k, v, *args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        MicroDiT(cfg)(x, torch.ones(3), torch.randn(3, 77, cfg.caption_channels), mask_ratio=0.75)
    listed = collections.Counter()
    for name, n, N, H, tq, tk in bench.attention_shapes(cfg, 3, 0.75):
        listed[(N, H, tq, cfg.head_dim, tk)] += n
    assert listed == calls


def test_bench_attention_times_every_backend_the_device_has():
    import bench
    results = bench.main(["--quick", "--attention", "--skip", "train", "sample", "data",
                          "--masks", "0.75"])
    assert len(results["attention"]) == len(bench.attention_shapes(
        dataclasses.replace(PRESETS["MicroDiT_CPU_2"], input_size=16), 4, 0.75))
    for row in results["attention"]:
        assert row["MATH"] > 0 and row["CUDNN_ATTENTION"] is None  # no cuDNN on a CPU


def test_bench_model_overrides_and_compile_mode_reach_the_model(monkeypatch):
    import bench
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    results = bench.main(["--quick", "--model", '{"depth": 2, "num_experts": 0}', "--compile",
                          "on", "--compile-mode", "max-autotune-no-cudagraphs", "--skip", "data"])
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], input_size=16, depth=2, num_experts=0)
    assert results["params"] == count_params(MicroDiT(cfg))
    assert results["model"] == {"depth": 2, "num_experts": 0}
    for row in results["train"]["rows"]:
        expected = model_lib.train_flops_per_image(cfg, mask_ratio=row["mask_ratio"]) * 4
        assert row["tflops_per_s"] * 1e12 * row["ms_per_step"] / 1000 == pytest.approx(expected)
    assert modes == ["max-autotune-no-cudagraphs"] * 2  # the training and the sampling network
    # --quick fills in what is not given; what is given stays
    given = bench.main(["--quick", "--batch-size", "2", "--res", "64", "--skip", "train",
                        "sample", "data"])
    assert given["batch_size"] == 2 and given["latent"] == "4x8x8" and given["preset"] == "MicroDiT_CPU_2"
    for flags, says in [(["--model", "{depth: 2}"], "--model '{depth: 2}' is not valid JSON"),
                        (["--model", '{"dept": 2}'], r"\['dept'\] are not DiTConfig fields"),
                        (["--model", '{"input_size": 8}'], "cannot set"),
                        (["--masks", "0", "1.0"], r"must be in \[0, 1\)")]:
        with pytest.raises(SystemExit, match=says):
            bench.main(["--quick", *flags, "--skip", "train", "sample", "data"])


@pytest.mark.parametrize("mixer_dim, stream", [(96, torch.bfloat16), (128, torch.float32)])
def test_residual_stream_dtype_under_bf16_autocast(mixer_dim, stream):
    """Where the mixer's width differs from the backbone's (MicroDiT_XL_2: 768 and 1024), its
    width maps end in a Linear, so under autocast the whole residual stream, mixer and
    backbone, is bf16: the memory traffic BENCHMARKS.md's profiles assume. At equal widths
    (MicroDiT_Tiny_2) the maps are identities and the stream stays fp32 from the pos_embed
    add."""
    cfg = dataclasses.replace(PRESETS["MicroDiT_CPU_2"], patch_mixer_dim=mixer_dim)
    net = model_lib.MicroDiT(cfg)
    seen = {}
    for name, block in [("mixer", net.patch_mixer), ("block0", net.blocks[0]),
                        ("last", net.blocks[-1])]:
        block.register_forward_hook(lambda m, i, out, name=name: seen.update({name: out.dtype}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 77, 256), mask_ratio=0.75)
    assert seen == {"mixer": stream, "block0": stream, "last": stream}


def test_moe_layers_run_under_cpu_bf16_autocast():
    """bench.py / train.py --dtype bfloat16 on a CPU: the experts' bf16 output is added into
    a float32 buffer (on CUDA the float32 gates hid the mismatch)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    for layer in (ExpertChoiceMoE(32, 64, 4, 2.0), TokenChoiceMoE(32, 64, 4, 2.0, 2)):
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.1)
        reference = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert_close_rel(out.float(), reference, 5e-2)  # bf16 matmuls


def test_bench_memory_cap_needs_cuda():
    import bench
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main(["--quick", "--device", "cpu", "--max-memory-gb", "10",
                    "--skip", "train", "sample", "data"])


# ----------------------------------------------------------------------------- experiments.py

def test_experiments_pipeline_on_a_tiny_budget(tmp_path, monkeypatch):
    import experiments
    out = tmp_path / "exp"
    argv = ["--tables", "4", "--steps", "2", "--batch-size", "8", "--out", str(out),
            "--eval-images", "8", "--eval-steps", "3"]
    judged, real_evaluate = [], experiments.evaluate_shapes
    monkeypatch.setattr(experiments, "evaluate_shapes",
                        lambda *a, **k: judged.append((k["n"], k["steps"])) or real_evaluate(*a, **k))
    experiments.main(argv)
    results = json.loads((out / "results.json").read_text())
    assert judged == [(8, 3)] * 3  # --eval-images and --eval-steps reach every run's judging
    # a rerun reuses every run's figures (kept in its folder) instead of judging it again
    monkeypatch.setattr(experiments, "evaluate_shapes", lambda *a, **k: 1 / 0)
    experiments.main(argv)
    assert json.loads((out / "results.json").read_text()) == results
    # ... but not those of a run whose checkpoint is another file now (trained again)
    last = checkpoint.checkpoints(str(Path(experiments.run_folder(out, results[1]["name"], 2, 8, 0))
                                 / "phase1"))[-1]
    os.utime(last, ns=(0, os.stat(last).st_mtime_ns + 10 ** 9))
    with pytest.raises(ZeroDivisionError):
        experiments.main(argv)
    monkeypatch.undo()
    experiments.main(argv)  # judged again: the same file content gives the same figures
    assert json.loads((out / "results.json").read_text()) == results
    # ... nor those judged by other code: the digest reads the evaluation modules' contents
    extra = tmp_path / "judge.py"
    extra.write_text("# one version")
    monkeypatch.setattr(experiments, "EVAL_CODE", [*experiments.EVAL_CODE, str(extra)])
    before = experiments.evaluation_code()
    extra.write_text("# another")
    assert experiments.evaluation_code() != before
    monkeypatch.setattr(experiments, "evaluate_shapes", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        experiments.main(argv)
    monkeypatch.undo()
    assert [r["name"] for r in results] == ["deferred 75% (mixer)", "token-choice top-2",
                                            "no layer-wise scaling"]
    table = (out / "results.md").read_text()
    assert all(r["name"] in table for r in results)
    assert Image.open(out / "plot.png").size == (900, 560)
    # the switches reached the trained models
    folder_of = lambda r: experiments.run_folder(out, r["name"], 2, 8, 0)  # noqa: E731
    ckpt = lambda r: final_checkpoint(folder_of(r))
    assert ckpt(results[1])["model_config"]["moe_routing"] == "token_choice"
    # token choice logs its load-balancing loss (E sum f_e P_e: 1 when balanced, up to E);
    # every line carries every noise bucket, null where no sample fell
    for r, aux in zip(results[:2], [False, True]):
        for line in logged(folder_of(r)):
            assert ("aux_loss" in line) == aux and set(checkpoint.bucket_names()) <= set(line)
            assert not aux or 0.5 < line["aux_loss"] <= 8
    assert list(ckpt(results[2])["model_config"]["mlp_ratio"]) == [2.25, 2.25]
    # held-out loss: the mean over the fixed noise levels, recomputed here by hand
    from checkpoint import load_dit
    folder = Path(folder_of(results[0])) / "phase1"
    net, info = load_dit(checkpoint.checkpoints(str(folder))[-1])
    sigma_data = info["sigma_data"]  # the one the run trained with
    assert sigma_data == 0.9
    # on 256 held-out images none of whose captions is a training image's
    seen = {c for m in shard_manifests(out / "data") for c in m["captions"]}
    drawn = [c for m in shard_manifests(out / "held_out_640") for c in m["captions"]]
    rows = [i for i, c in enumerate(drawn) if c not in seen][:256]
    assert len(rows) == 256 and sum(c in seen for c in drawn) > 200  # half a seed's draws are seen
    shard = out / "held_out_640" / "shard-00000"
    x = torch.from_numpy(np.load(f"{shard}.images_16.npy"))[rows].float()
    y = torch.from_numpy(np.load(f"{shard}.caption_feats.npy"))[rows].float()
    g = torch.Generator().manual_seed(0)
    expected = []
    with torch.no_grad():
        for sigma in experiments.HELD_OUT_SIGMAS:
            noise = torch.randn(x.shape, generator=g)
            D = denoise(net.eval(), x + sigma * noise, sigma, y, sigma_data=sigma_data)
            weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
            expected.append(float((weight * (D - x) ** 2).mean()))
    assert results[0]["held_out_loss"] == pytest.approx(np.mean(expected), rel=1e-4)


def test_experiments_table_one_at_equal_wall_clock(tmp_path):
    """--budget-s: each run's steps fill the budget at the step times measured side by side
    (kept for every seed and rerun); the masked runs end with an unmasked finetune (phase 2,
    from phase 1's weights and optimizer, at its final learning rate), which is what is
    judged; the table gives each metric's seed spread and its calibration."""
    import experiments
    out = tmp_path / "exp"
    argv = ["--tables", "1", "--budget-s", "0.4", "--finetune", "0.2", "--seeds", "0", "1",
            "--batch-size", "8", "--out", str(out), "--eval-images", "8", "--eval-steps", "2"]
    experiments.main(argv)
    summary = json.loads((out / "equal_time.json").read_text())
    seconds = json.loads((out / "step_times.json").read_text())["seconds"]
    assert summary["seconds_per_step"] == seconds and len(seconds) == 4
    runs = summary["runs"]
    assert [(r["name"], r["seed"]) for r in runs] == [
        (name, seed) for seed in (0, 1) for name, _, _ in experiments.EQUAL_TIME]
    def fills(steps, seconds_per_step, share):  # within half a step, or the one step run
        return abs(steps * seconds_per_step - share) <= max(seconds_per_step / 2,
                                                            seconds_per_step - share)
    for r, (_, mask, overrides) in zip(runs, experiments.EQUAL_TIME * 2):
        masked = seconds[experiments.step_key(overrides, mask)]
        unmasked = seconds[experiments.step_key(overrides, 0.0)]
        if mask == 0:  # the whole budget unmasked
            assert r["finetune_steps"] == 0 and fills(r["steps"], unmasked, 0.4)
        else:  # 80% masked, 20% unmasked
            assert fills(r["steps"], masked, 0.32) and fills(r["finetune_steps"], unmasked, 0.08)
        folder = Path(experiments.run_folder(str(out), r["name"], r["steps"], 8, r["seed"],
                                             16, r["finetune_steps"]))
        last = final_checkpoint(folder, 2 if mask else 1)
        assert last["step"] == r["steps"] + r["finetune_steps"]
        assert last["model_config"]["patch_mixer_depth"] == (0 if overrides else 1)
        if mask:
            phase1, phase2 = final_checkpoint(folder)["config"], last["config"]
            assert phase1["mask_ratio"] == 0.75 and phase2["mask_ratio"] == 0.0
            assert phase2["lr"] == pytest.approx(phase1["lr"] * phase1["min_lr_ratio"])
            assert (phase2["schedule"], phase2["p_mean"]) == ("constant", phase1["p_mean"])
            assert [line["lr"] for line in logged(folder, 2)] == [phase2["lr"]] * r["finetune_steps"]
    # the seeds differ, and the table gives their mean and spread
    assert runs[0]["held_out_per_sigma"] != runs[3]["held_out_per_sigma"]
    table = (out / "equal_time.md").read_text()
    first = [r["held_out_loss"] for r in runs if r["name"] == "no masking"]
    assert f"{np.mean(first):.4f} ± {np.std(first, ddof=1):.4f}" in table
    # calibration: renderings of the asked captions follow them all, noise at chance, and
    # the untrained network's held-out loss is that of outputting zeros
    cal = summary["calibration"]
    assert all(cal["real"][k] == 1.0 for k in ("shape", "color", "size", "position", "all"))
    assert cal["noise"]["all"] < 0.2 and cal["noise"]["frechet"] > 2 * cal["real"]["frechet"]
    assert "calibration: uniform noise images" in table
    assert Image.open(out / "equal_time.png").size == (900, 560)
    # D = c_skip (x + sigma n): with E[x^2] = m2 the weighted error is
    # (sigma^2 m2 + sigma_data^4) / ((sigma^2 + sigma_data^2) sigma_data^2) (1 at m2 = sigma_data^2)
    rows = experiments.unseen_rows(str(out / "held_out_640"), str(out / "data"), 256)
    x = np.load(out / "held_out_640" / "shard-00000.images_16.npy")[rows.numpy()]
    m2, sd = float(np.mean(np.square(x.astype(np.float64)))), 0.9
    for sigma, loss in zip(experiments.HELD_OUT_SIGMAS, cal["untrained"]):
        assert loss == pytest.approx((sigma ** 2 * m2 + sd ** 4) / ((sigma ** 2 + sd ** 2) * sd ** 2),
                                     rel=0.02)
    # a rerun keeps the measured step times and the runs: nothing trains or is judged again
    stamp = (out / "step_times.json").stat().st_mtime_ns
    experiments.main(argv)
    assert (out / "step_times.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "equal_time.json").read_text())["runs"] == runs


# ----------------------------------------------------------------------------- reference trainer

PARITY_MODEL = {"dim": 32, "depth": 2, "head_dim": 16, "multiple_of": 32,
                "patch_mixer_depth": 0, "num_experts": 0}
# flags both trainers take: phase 1's values, with a budget and lr a CPU test affords; the
# cosine runs down to 0 so that the final weights are not one noisy step's
PARITY_RECIPE = ["--res", "16", "--steps", "200", "--batch-size", "16", "--lr", "5e-3",
                 "--warmup", "20", "--min-lr-ratio", "0", "--grad-clip", "0.25",
                 "--p-mean", "-0.6", "--p-std", "1.2", "--weight-decay", "0.1",
                 "--mask-ratio", "0", "--model", json.dumps(PARITY_MODEL)]
# The seed spread is the std over seeds of the correct trainers, train.py's and the
# reference's pooled (6 degrees of freedom). Student t for the difference of two means of 4
# seeds, at a 1% false alarm over the 8 noise levels together (Bonferroni: 0.125% each):
# |difference| <= 5.6 x its standard error, sqrt(2 / 4) spread, so k = 5.6 x 0.71 ~ 4
PARITY_K = 4.0
PARITY_FLOOR = 0.01  # a spread that happens to come out near 0 is not a promise of equality


def pooled_std(*groups):
    """Per noise level: the std over seeds of groups of [seeds, levels] losses, pooled."""
    squares = sum((len(g) - 1) * np.var(g, 0, ddof=1) for g in groups)
    return np.sqrt(squares / sum(len(g) - 1 for g in groups))


def off_the_reference(runs, ref_runs, spread):
    """Per noise level: |mean - reference mean| > PARITY_K x spread + PARITY_FLOOR; and the
    figures, as text."""
    gap = np.abs(np.mean(runs, 0) - np.mean(ref_runs, 0))
    text = (f"mean {np.mean(runs, 0).round(3)} std {np.std(runs, 0, ddof=1).round(3)}; "
            f"reference mean {np.mean(ref_runs, 0).round(3)} std "
            f"{np.std(ref_runs, 0, ddof=1).round(3)}; |gap| / spread {(gap / spread).round(1)}")
    return gap > PARITY_K * spread + PARITY_FLOOR, text


def test_train_matches_the_reference_trainer_within_the_seed_spread(tmp_path, monkeypatch):
    """train.py and reference_train.py, same data, recipe and seeds: their final models score
    the same held-out loss at every noise level within the spread over seeds, and both
    learned. train.py broken to train with another phase's noise levels (phase 3's, in
    phase 1) falls outside: the comparison can fail."""
    import experiments
    import reference_train
    from checkpoint import load_dit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matmuls this small gain nothing from two threads on shared cores
    try:
        shapes = prepare_lib.ensure_demo_data(str(tmp_path / "shapes"), res=16, n=256, seed=0)
        # another draw of the shapes set; rows whose captions no training image has
        held_out = prepare_lib.ensure_demo_data(str(tmp_path / "held_out"), res=16, n=192,
                                                seed=1)
        rows = experiments.unseen_rows(held_out, shapes, 128)

        def score(path):
            net, info = load_dit(path)
            return experiments.held_out_loss(net, held_out, rows, info["sigma_data"])[1]

        def train_py(seed, name):
            out = tmp_path / f"{name}{seed}"
            args = ["--data", shapes, "--out", str(out), "--seed", str(seed), "--micro-batch", "8",
                    "--schedule", "cosine", "--ema-decay", "0", "--ckpt-every", "200",
                    "--sample-every", "0", "--no-compile", *PARITY_RECIPE]
            train.main(args)
            train.main(args + ["--export", str(out / "final.safetensors")])
            return score(str(out / "final.safetensors"))

        def reference(seed):
            path = str(tmp_path / f"reference{seed}.pt")
            reference_train.main(["--data", shapes, "--seed", str(seed), "--out", path,
                                  *PARITY_RECIPE])
            return score(path)

        ref = [reference(seed) for seed in range(4)]
        ours = [train_py(seed, "train") for seed in range(4)]
        real_loss = train.edm_loss_per_sample

        def phase_3_noise(net, x, y, mask_ratio, p_mean, p_std, **kw):
            return real_loss(net, x, y, mask_ratio, train.PHASES[3]["p_mean"],
                             train.PHASES[3]["p_std"], **kw)
        monkeypatch.setattr(train, "edm_loss_per_sample", phase_3_noise)
        broken = [train_py(seed, "broken") for seed in range(2)]

        untrained, info = load_dit(str(tmp_path / "reference0.pt"))
        untrained = experiments.held_out_loss(MicroDiT(untrained.cfg).eval(), held_out, rows,
                                              info["sigma_data"])[1]
    finally:
        torch.set_num_threads(threads)
    mid = [experiments.HELD_OUT_SIGMAS.index(s) for s in (0.5, 1.0, 2.0)]
    for losses in (ref, ours):
        assert (np.mean(losses, 0)[mid] < 0.5 * np.array(untrained)[mid]).all(), (losses,
                                                                                  untrained)
    spread = pooled_std(ours, ref)
    off, text = off_the_reference(ours, ref, spread)
    print(f"train.py: {text}")
    assert not off.any(), f"train.py is off the reference at sigma {off}: {text}"
    off, text = off_the_reference(broken, ref, spread)
    print(f"train.py with phase 3's noise levels: {text}")
    assert off.any(), f"the broken train.py passes: {text}"
