"""AutoencoderKL: the Stable Diffusion / SDXL VAE (and ostris/vae-kl-f8-d16), written with
torch only. Parameter names equal the diffusers state_dict names, so a diffusers
`diffusion_pytorch_model.safetensors` loads with strict=True; `load_vae` also reads the
original single-file (LDM / CompVis) layout and older diffusers attention names.

    vae = load_vae("path/to/vae")                       # folder, .safetensors or .ckpt
    latents = vae.encode_to_scaled(images)              # images [N, 3, H, W] in [-1, 1]
    images = vae.decode_from_scaled(latents)            # latents [N, C, H/8, W/8]

Stored latents are (z - shift_factor) * scaling_factor with z SAMPLED from the posterior,
as the paper's pipeline does (not the posterior mean).
"""
import json
import os
import re
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)  # one down/up level per entry
    layers_per_block: int = 2           # resnets per encoder level; the decoder has one more
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    shift_factor: float = 0.0
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @classmethod
    def from_json(cls, path):
        """Read a diffusers AutoencoderKL config.json; keys this class does not know
        (sample_size, force_upcast, block types, ...) are ignored."""
        try:
            with open(path) as f:
                d = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); download it again") from None
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"{path}: _class_name is {d['_class_name']!r}, "
                             f"expected 'AutoencoderKL'")
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        kw["block_out_channels"] = tuple(kw.get("block_out_channels", cls.block_out_channels))
        # early diffusers configs have no scaling_factor: diffusers then uses its default,
        # the SD 1.x value
        if "scaling_factor" in d and not isinstance(d["scaling_factor"], (int, float)):
            raise ValueError(f"{path}: scaling_factor is {d['scaling_factor']!r}; a VAE's "
                             f"latents cannot be scaled without it: use the config.json the "
                             f"weights came with")
        kw["scaling_factor"] = float(d.get("scaling_factor", 0.18215))
        kw["shift_factor"] = float(d.get("shift_factor") or 0.0)  # null means no shift
        return cls(**kw)


# the paper's VAE (SDXL 1.0's), for a machine that works offline afterwards, and where it lands
DOWNLOAD = ("hf download stabilityai/stable-diffusion-xl-base-1.0 vae/config.json "
            "vae/diffusion_pytorch_model.safetensors --local-dir weights/sdxl")
DOWNLOADED = "weights/sdxl/vae"

VAE_PRESETS = {
    "sdxl": VAEConfig(),  # vae/ of stabilityai/stable-diffusion-xl-base-1.0, as in the paper
    # ostris/vae-kl-f8-d16: scaling_factor and shift_factor (null) of its config.json as
    # seen in a duplicate of that repository (otinpo/vae-kl-f8-d16), not in the original;
    # a config.json next to the weights always wins over this preset
    "ostris-f8-d16": VAEConfig(latent_channels=16, block_out_channels=(128, 128, 256, 512),
                               scaling_factor=0.24447420268654824, shift_factor=0.0),
}


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Identity has no parameters, so the state_dict only has conv_shortcut when it is real
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Sequential(nn.Linear(channels, channels))  # named to_out.0 in diffusers

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)               # (N, H*W, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        h = self.to_out(h).transpose(1, 2).reshape(N, C, H, W)          # (N, C, H, W)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        # asymmetric padding (right and bottom only), as the weights were trained with
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
             for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
             for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels, groups, add_attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block, groups,
                       downsample=i < len(widths) - 1)
             for i in range(len(widths))])
        self.mid_block = MidBlock(widths[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(widths[-1], groups)
        # mean and logvar of the posterior, stacked on the channel axis
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [UpBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block + 1, groups,
                     upsample=i < len(widths) - 1)
             for i in range(len(widths))])
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior q(z | x): independent normals per latent element."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)                     # (N, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite for untrained/odd inputs
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """z = mean + std * noise, in float32 whatever the encoder's dtype (noise drawn in
        bfloat16 keeps 8 significant bits). generator: None, one torch.Generator for the
        batch, or a list of one per row, so that a row's noise depends on its own generator
        alone and not on the batch it came in (prepare.py seeds one per sample)."""
        def noise(shape, g):  # on g's device: a seeded CPU generator gives the same z anywhere
            return torch.randn(shape, generator=g, device=self.mean.device if g is None
                               else g.device)
        if isinstance(generator, (list, tuple)):
            if len(generator) != len(self.mean):
                raise ValueError(f"{len(generator)} generators for a batch of {len(self.mean)}: "
                                 f"pass one per row, or a single one")
            eps = torch.cat([noise((1, *self.mean.shape[1:]), g) for g in generator])
        else:
            eps = noise(self.mean.shape, generator)                     # (N, C, h, w)
        return self.mean.float() + self.std.float() * eps.to(self.mean.device)


def _chunked(fn, x, chunk_size):
    """fn over slices of the batch, so peak memory grows with chunk_size instead of N."""
    return torch.cat([fn(part) for part in x.split(chunk_size)])


class AutoencoderKL(nn.Module):
    """Weights normally come from `load_vae`; a fresh instance has torch's default init,
    which is enough for tests and offline demos."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    @property
    def shift_factor(self):
        return self.config.shift_factor

    def _moments(self, images):
        h = self.encoder(images)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, images, chunk_size=8):
        """images [N, in_channels, H, W] in [-1, 1], H and W multiples of
        2 ** (len(block_out_channels) - 1) -> posterior over z [N, latent_channels, h, w]."""
        return DiagonalGaussian(_chunked(self._moments, images, chunk_size))

    def decode(self, latents, chunk_size=8):
        """Unscaled z [N, latent_channels, h, w] -> images [N, out_channels, H, W], about
        [-1, 1]."""
        return _chunked(self._decode, latents, chunk_size)

    def to_scaled(self, z):
        return (z - self.shift_factor) * self.scaling_factor

    def from_scaled(self, latents):
        return latents / self.scaling_factor + self.shift_factor

    def encode_to_scaled(self, images, generator=None, chunk_size=8):
        """The latents the diffusion model is trained on: a posterior sample, scaled, in
        float32. generator: one, or a list of one per image (see DiagonalGaussian.sample)."""
        return self.to_scaled(self.encode(images, chunk_size).sample(generator))

    def decode_from_scaled(self, latents, chunk_size=8):
        return self.decode(self.from_scaled(latents), chunk_size)


# ----------------------------------------------------------------------------------------
# loading

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")
# leaf names of the mid-block attention in the LDM layout and in older diffusers files
ATTENTION_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                     "proj_out": "to_out.0", "query": "to_q", "key": "to_k",
                     "value": "to_v", "proj_attn": "to_out.0"}


def _find_files(path):
    """(weights file, config.json or None) for a folder, a pipeline folder with vae/, or a file."""
    if os.path.isdir(path):
        # a whole pipeline folder (e.g. stable-diffusion-xl-base-1.0) keeps its VAE in vae/
        pipeline_vae = os.path.join(path, "vae")
        if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(pipeline_vae):
            path = pipeline_vae
        weights = [os.path.join(path, n) for n in WEIGHT_NAMES
                   if os.path.exists(os.path.join(path, n))]
        if not weights:
            raise FileNotFoundError(f"{path}: no VAE weights in this folder "
                                    f"(looked for {', '.join(WEIGHT_NAMES)})")
        weights_file = weights[0]
    elif os.path.isfile(path):
        weights_file = path
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    config_file = os.path.join(os.path.dirname(weights_file), "config.json")
    return weights_file, config_file if os.path.exists(config_file) else None


def _read_state_dict(path):
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, not weights, or a pickle with code in it
        raise ValueError(f"{path}: cannot read VAE weights ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning / LDM training checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    # a whole Stable Diffusion checkpoint keeps its VAE under this prefix
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _ldm_key(key, num_levels):
    """One LDM (CompVis) key -> its diffusers name; attention leaves are renamed later."""
    def up(m):  # LDM numbers decoder levels from the highest resolution, diffusers from the lowest
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}."
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.",
                 key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: up(m) + "resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: up(m) + "upsamplers.0.", key)
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    key = key.replace(".mid.attn_1.", ".mid_block.attentions.0.")
    key = key.replace(".norm_out.", ".conv_norm_out.")
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def to_diffusers_names(state):
    """A VAE state_dict in any supported layout -> diffusers names and shapes."""
    if any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.")) for k in state):
        num_levels = len({k.split(".")[2] for k in state if k.startswith("decoder.up.")})
        state = {_ldm_key(k, num_levels): v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        head, sep, tail = key.partition(".mid_block.attentions.0.")
        if sep:
            leaf, _, param = tail.partition(".")
            key = head + sep + ATTENTION_RENAMES.get(leaf, leaf) + "." + param
            if value.ndim == 4:
                value = value.flatten(1)  # (C, C, 1, 1) -> (C, C): a 1x1 conv is a linear map
        out[key] = value
    return out


def infer_config(state, source="state_dict"):
    """VAEConfig from diffusers-named weight shapes. norm_num_groups, scaling_factor and
    shift_factor are not in the weights: they come from the preset with the same number of
    latent channels, with a warning."""
    try:
        levels = 1 + max(int(k.split(".")[2]) for k in state
                         if k.startswith("encoder.down_blocks."))
        widths = tuple(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                       for i in range(levels))
        layers = 1 + max(int(k.split(".")[4]) for k in state
                         if k.startswith("encoder.down_blocks.0.resnets."))
        latent = state["decoder.conv_in.weight"].shape[1]
        in_channels = state["encoder.conv_in.weight"].shape[1]
        out_channels = state["decoder.conv_out.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"{source}: not an AutoencoderKL state_dict (cannot infer its config: "
                         f"{type(e).__name__} {e}); put its config.json next to it") from e
    matches = [name for name, c in VAE_PRESETS.items() if c.latent_channels == latent]
    if not matches:
        raise ValueError(f"{source}: no config.json and no preset with {latent} latent "
                         f"channels to take scaling_factor/shift_factor from; put its "
                         f"config.json next to it")
    # among presets with the right latent width, prefer one whose block widths also match
    name = next((n for n in matches if VAE_PRESETS[n].block_out_channels == widths), matches[0])
    preset = VAE_PRESETS[name]
    warnings.warn(f"{source}: no config.json; architecture inferred from the weight shapes, "
                  f"norm_num_groups={preset.norm_num_groups}, "
                  f"scaling_factor={preset.scaling_factor}, shift_factor={preset.shift_factor} "
                  f"taken from preset '{name}'. Those are not stored in the weights (SD 1.x "
                  f"VAEs, for one, use scaling_factor 0.18215): put the VAE's config.json next "
                  f"to the file if they are wrong.")
    return replace(preset, in_channels=in_channels, out_channels=out_channels,
                   latent_channels=latent, block_out_channels=widths, layers_per_block=layers,
                   mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in state,
                   use_quant_conv="quant_conv.weight" in state,
                   use_post_quant_conv="post_quant_conv.weight" in state)


def _check_keys(state, expected, source, config):
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {what}: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                for what, keys in [("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", wrong_shape)] if keys]
    if problems:
        raise ValueError(f"{source}: weights do not fit an AutoencoderKL with {config}; "
                         + "; ".join(problems))


def load_vae(path, device="cpu", dtype=torch.float32):
    """Frozen AutoencoderKL (eval mode, no grads) from a diffusers folder, its
    .safetensors file, or a single-file LDM checkpoint (.safetensors / .ckpt / .pt).
    Weights stored in fp16/bf16 are cast to `dtype`. Note the SDXL VAE overflows in fp16:
    use bfloat16 or float32 for it."""
    weights_file, config_file = _find_files(path)
    state = to_diffusers_names(_read_state_dict(weights_file))
    config = (VAEConfig.from_json(config_file) if config_file
              else infer_config(state, source=weights_file))
    with torch.device("meta"):  # no memory or init time spent on weights about to be replaced
        vae = AutoencoderKL(config)
    _check_keys(state, vae.state_dict(), weights_file, config)
    vae.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return vae.to(device).eval().requires_grad_(False)
