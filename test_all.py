"""The test suite: CPU only, minutes. Numbers are checked against the golden vectors that
the paper's released code produced (fixtures/), against slow obviously-correct loops, and
against closed forms."""
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import model as model_lib
from diffusion import denoise, edm_loss, guided, heun_sample, sigma_steps
from mixer import keep_tokens, random_ids_keep, removed_mask, restore_tokens
from model import PRESETS, DiTConfig, MicroDiT, count_params, forward_flops
from moe import ExpertChoiceMoE, TokenChoiceMoE
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
    x = torch.randn(2, 9, 16)
    xs = x.reshape(-1, 16)
    probs = torch.softmax(xs @ moe.gate.weight.t(), dim=-1)
    gates, experts = torch.topk(probs, 2, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    capacity = math.ceil(1.0 * 18 * 2 / 4)
    load = [0] * 4
    expected = torch.zeros_like(xs)
    for choice in range(2):                   # all first choices before any second one
        for i in range(18):
            e = experts[i, choice].item()
            if load[e] < capacity:
                load[e] += 1
                expected[i] += gates[i, choice] * (F.gelu(xs[i] @ moe.w1[e]) @ moe.w2[e])
    assert_close_rel(moe(x).reshape(-1, 16), expected, 1e-5)
    f = torch.bincount(experts[:, 0], minlength=4).float() / 18
    assert torch.allclose(moe.aux_loss, 4 * (f * probs.mean(0)).sum())


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

    def forward(self, x_in, c_noise, y, mask_ratio=0.0, ids_keep=None):
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
        out = heun_sample(IdealGaussianNet(s), z, torch.zeros(4, 6, 8), steps=steps, cfg=1.0)
        errors.append(((out - expected).abs().max() / expected.abs().max()).item())
    assert errors[-1] < 1e-3
    assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5


def test_masked_loss_averages_kept_patches_only(golden):
    """Changing the prediction on removed patches must not change the masked loss."""
    net, g, _ = golden
    ids_keep = g["in.ids_keep"]

    def poisoned(x, t, y, mask_ratio=0.0, ids_keep=None):
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

def test_text_features_are_open_clips_own_pre_pool_tokens(tmp_path):
    """Load a small open_clip CLIP through the real file path; our [N, 77, D] features,
    pooled at the end token and projected, must equal open_clip's encode_text."""
    import open_clip
    from text import load_text_encoder
    arch = {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                         "layers": 2}}
    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    torch.manual_seed(0)
    reference = open_clip.create_model("tiny-clip-test", force_quick_gelu=True).eval()
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    enc = load_text_encoder(str(tmp_path), arch="tiny-clip-test")
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
    latents = heun_sample(net.eval(), noise, y, steps=3, cfg=2.5)
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
    assert (tmp_path / "grid.png").exists()


def test_sample_same_seed_same_image(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    common = ["a red circle", "--ckpt", path, "--vae", FIXTURES / "vae_tiny_4ch", "--clip",
              "tiny-random", "--steps", 2, "--no-grid"]
    for seed, out in ((1, "a"), (1, "b"), (2, "c")):
        assert run_sample(*common, "--seed", seed, "--out", tmp_path / out) == 0
    read = lambda d: (tmp_path / d / "0000_a_red_circle.png").read_bytes()
    assert read("a") == read("b") and read("a") != read("c")


def test_sample_clear_errors(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    assert run_sample("a cat", "--ckpt", tmp_path / "missing.pt") == 2
    assert "huggingface-cli download" in capsys.readouterr().err
    assert run_sample("", "--ckpt", path, "--vae", "none", "--clip", "tiny-random") == 2
    assert "empty" in capsys.readouterr().err
    assert run_sample("a cat", "--ckpt", path, "--preset", "MicroDiT_Tiny_2", "--vae", "none",
                      "--clip", "tiny-random") == 2
    assert "does not match MicroDiT_Tiny_2" in capsys.readouterr().err


def test_released_style_checkpoint_infers_its_preset(tiny_checkpoint):
    import sample
    path, net = tiny_checkpoint
    loaded, _ = sample.load_dit(str(path))
    assert loaded.cfg == net.cfg
    x, t, y = torch.randn(1, 4, 16, 16), torch.randn(1), torch.randn(1, 77, 256)
    assert torch.equal(loaded(x, t, y)[0], net.eval()(x, t, y)[0])


def test_sample_at_another_resolution_rebuilds_pos_embed(tiny_checkpoint):
    import sample
    path, net = tiny_checkpoint
    loaded, _ = sample.load_dit(str(path), latent_size=32)
    assert loaded.cfg.input_size == 32 and loaded.cfg.pos_interp_scale == 2.0
    assert loaded.pos_embed.shape == (1, 256, 128)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)
