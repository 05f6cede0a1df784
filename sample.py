"""Text to image: python sample.py "a cat" ["a dog" ...]

Without --ckpt it uses the paper's released 512px model
(dit_4_channel_37M_real_and_synthetic_data.pt) with the SDXL VAE and DFN5B CLIP, fetched
from the Hugging Face hub on first use and read from the local cache afterwards.

The noise is one torch.randn of shape [N, C, latent, latent] for all N images, from a
generator seeded with --seed on the sampling device: the released code's draw, so the same
seed and prompt list give the same images as the paper's pipeline.
"""
import argparse
import collections
import dataclasses
import json
import os
import pickle
import re
import sys
from contextlib import nullcontext

import torch
from PIL import Image, PngImagePlugin

from diffusion import heun_sample
from model import PRESETS, DiTConfig, MicroDiT, pos_embed_of, sincos_pos_embed
import text as text_lib
import vae as vae_lib
from text import DEFAULT_CLIP, load_text_encoder
from vae import load_vae

RELEASED_REPO = "VSehwag24/MicroDiT"
RELEASED_FILES = ("dit_4_channel_22M_real_only_data.pt",
                  "dit_4_channel_37M_real_and_synthetic_data.pt",
                  "dit_16_channel_37M_real_and_synthetic_data.pt",
                  "dit_4_channel_0.5B_synthetic_data.pt")
RELEASED_CKPT = f"ckpts/{RELEASED_FILES[1]}"  # the one sample.py uses by default
# the VAE each released latent width was trained with
DEFAULT_VAES = {4: "stabilityai/stable-diffusion-xl-base-1.0", 16: "ostris/vae-kl-f8-d16"}
PIXEL_SPACE = "none"  # --vae none: the model works on pixels directly
Pipeline = collections.namedtuple("Pipeline", "net text_encoder vae device")


def download_instructions():
    return ("Download the released weights once (about 9 GB in all):\n"
            f"    hf download {RELEASED_REPO} {RELEASED_CKPT} --local-dir weights\n"
            f"    {vae_lib.DOWNLOAD}\n"
            f"    {text_lib.DOWNLOAD}\n"
            f"then: python sample.py \"a cat\" --ckpt weights/{RELEASED_CKPT} "
            f"--vae {vae_lib.DOWNLOADED} --clip {text_lib.DOWNLOADED}")


def hub_file(repo, filename):
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename)
    except Exception as e:  # offline and not cached, or no such file
        raise FileNotFoundError(f"cannot get {filename} from {repo} ({type(e).__name__}).\n"
                                + download_instructions()) from e


def resolve_vae(name):
    """A local VAE path as it is, or a hub repo fetched (config and safetensors only)."""
    if os.path.exists(name):
        return name
    if name.count("/") != 1:
        raise FileNotFoundError(f"--vae {name!r}: no such file or folder, and not a hub id")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, allow_patterns=[
            "config.json", "diffusion_pytorch_model.safetensors",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors"])
    except Exception as e:  # offline and not cached, or no such repo
        raise FileNotFoundError(f"cannot get the VAE {name!r}: no file or folder of that name "
                                f"under {os.getcwd()}, and as a hub id it could not be fetched "
                                f"({type(e).__name__}); give --vae PATH.\n"
                                + download_instructions()) from e


def with_stored_interp_scale(cfg, pos_embed):
    """cfg with the position interpolation a stored pos_embed was built with (1.0 for the
    256px models, 2.0 for the 512px ones fine-tuned from them), when one of those fits."""
    grid = cfg.input_size // cfg.patch_size
    if tuple(pos_embed.shape[1:]) != (grid * grid, cfg.dim):  # another architecture: the
        return cfg                                              # shape check will say so
    for scale in (cfg.input_size / 32, 1.0, 2.0):
        rebuilt = sincos_pos_embed(cfg.dim, grid, grid, scale)
        if torch.allclose(rebuilt, pos_embed[0].float(), atol=1e-5):
            return dataclasses.replace(cfg, pos_interp_scale=scale)
    return cfg


MICRODIT_KEYS = ("x_embedder.proj.weight", "pos_embed", "y_embedder.y_proj.fc1.weight")


def fit_preset(preset, state):
    """A preset with the sizes a state_dict's weights show (latent channels, patch size,
    latent size, caption width) and the position interpolation its pos_embed was built
    with."""
    try:
        proj = state["x_embedder.proj.weight"]                         # (D, C, p, p)
        grid = int(round(state["pos_embed"].shape[1] ** 0.5))           # patches per side
        caption_channels = state["y_embedder.y_proj.fc1.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"not a MicroDiT state_dict: no {e}") from e
    cfg = dataclasses.replace(preset, in_channels=proj.shape[1], patch_size=proj.shape[2],
                              input_size=grid * proj.shape[2], caption_channels=caption_channels)
    return with_stored_interp_scale(cfg, state["pos_embed"])


def infer_config(state):
    """DiTConfig of a bare state_dict (a released .pt): sizes are read off the weights and
    the preset is the one whose every name and shape fits."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for preset in PRESETS.values():
        cfg = fit_preset(preset, state)
        with torch.device("meta"):
            net = MicroDiT(cfg)
        if {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes:
            return cfg
    raise ValueError(f"the weights (width {state['x_embedder.proj.weight'].shape[0]}, "
                     f"{len(shapes)} tensors) fit no preset in {list(PRESETS)}: use a "
                     f"checkpoint saved by train.py, which carries its config")


def load_checkpoint(path):
    """torch.load of a checkpoint (tensors and plain types only), a damaged file said in a
    message."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        # what torch's weights-only unpickler says of Python objects it will not build
        objects = ("Unsupported global", "unrecognized function", "Can only create new object")
        detail = next((line for line in str(e).splitlines()
                       if any(marker in line for marker in objects)), None)
        if detail is None:  # not a pickle at all (a text file, a cut-off download)
            raise ValueError(f"{path}: not a PyTorch checkpoint (its bytes do not unpickle); "
                             f"it is damaged or another kind of file") from None
        raise ValueError(f"{path}: holds Python objects, not only tensors, and is loaded with "
                         f"weights_only=True, which refuses them ({detail.strip()}); save the "
                         f"model's state_dict() instead of the model") from None
    except Exception as e:  # torch.load raises many kinds on a damaged file
        raise ValueError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); it is damaged (a disk "
                         f"error, a partial download or copy) or not a PyTorch "
                         f"checkpoint") from None


def weights_of(ckpt, path):
    """(state_dict, model config dict or None, extra info) of a loaded checkpoint: a
    train.py one (EMA weights preferred) or a bare state_dict (a released .pt)."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state = ckpt["ema"] if ckpt.get("ema") else ckpt["model"]
        info = {k: ckpt.get(k) for k in ("vae", "clip", "step")}
        info["data"] = (ckpt.get("config") or {}).get("data")  # what it was trained on
        return check_weights(state, path), ckpt.get("model_config"), info
    return check_weights(ckpt, path), None, {}


def check_weights(state, path):
    if not isinstance(state, dict) or not all(k in state for k in MICRODIT_KEYS):
        raise ValueError(f"{path}: not MicroDiT weights (a MicroDiT state_dict has "
                         f"{', '.join(MICRODIT_KEYS)}, ...)")
    return state


def read_checkpoint(path):
    """(state_dict, model config dict or None, extra info) from a released .pt (bare
    state_dict), a train.py checkpoint (EMA weights preferred) or an exported .safetensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found" + (
            ".\n" + download_instructions() if os.path.basename(path) in RELEASED_FILES
            else f" (under {os.getcwd()}); check the path, or leave --ckpt out for the paper's "
                 f"released model"))
    if not path.endswith(".safetensors"):
        return weights_of(load_checkpoint(path), path)
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        meta = safe_open(path, "pt").metadata() or {}
        info = json.loads(meta.get("info", "{}"))
        state, config = load_file(path), info.get("model_config")
    except Exception as e:  # SafetensorError on a cut-short or foreign file
        raise ValueError(f"{path}: cannot read it as safetensors weights "
                         f"({type(e).__name__}: {e}); download or export it again") from None
    return check_weights(state, path), config, info


def load_dit(path, preset=None, latent_size=None, device="cpu"):
    """The network of a checkpoint file, in eval mode, and the checkpoint's extra info."""
    state, config, info = read_checkpoint(path)
    return build_dit(state, config, preset, latent_size, device, source=path), info


def build_dit(state, config, preset=None, latent_size=None, device="cpu", source="checkpoint"):
    """MicroDiT holding `state`. `preset` forces an architecture (an error names the first
    mismatching tensors); `latent_size` rebuilds pos_embed for another resolution."""
    if preset is not None:
        cfg = fit_preset(PRESETS[preset], state)
    elif config is not None:
        cfg = DiTConfig.from_dict(config)
    else:
        cfg = infer_config(state)
    if latent_size and latent_size != cfg.input_size:
        scale = cfg.pos_interp_scale * latent_size / cfg.input_size
        cfg = dataclasses.replace(cfg, input_size=latent_size, pos_interp_scale=scale)
        state = {k: v for k, v in state.items() if k != "pos_embed"}
    with torch.device("meta"):  # no random initialisation to throw away (15 s for XL on a CPU)
        net = MicroDiT(cfg)
    expected = net.state_dict()
    bad = [f"missing {k}" for k in expected if k not in state and k != "pos_embed"]
    bad += [f"unexpected {k}" for k in state if k not in expected]
    bad += [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in expected.items()
            if k in state and state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source} does not match {preset or 'its config'}: "
                         f"{len(bad)} mismatches, first: {', '.join(bad[:4])}")
    # copies made on the device in the model's dtypes: nothing is shared with the caller's
    # tensors (train.py passes its live weights), half-precision files load as float32
    filled = {k: state[k].to(device, v.dtype, copy=True)
              for k, v in expected.items() if k in state}
    filled.setdefault("pos_embed", pos_embed_of(cfg).to(device))  # rebuilt for latent_size
    net.load_state_dict(filled, assign=True)
    return net.eval().requires_grad_(False)


def slug(text, length=40):
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:length] or "empty"


def to_pil(image):
    """[3, H, W] in [0, 1] -> PIL image, rounded as torchvision's save_image does."""
    array = (image * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def grid_image(images, columns, min_side=64):
    """The images in rows of `columns`. Images smaller than min_side (the 16 px demo's) are
    enlarged by a whole factor, each pixel a square block, so the grid can be seen at 100%;
    the images saved one by one keep their own size."""
    factor = max(1, -(-min_side // min(images[0].size)))  # ceil
    if factor > 1:
        images = [im.resize((im.width * factor, im.height * factor), Image.NEAREST)
                  for im in images]
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


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


@torch.no_grad()
def generate(net, text_encoder, vae, prompts, seed, steps, cfg, batch_size, device,
             dtype="auto"):
    """Images [N, 3, H, W] in [0, 1] for the prompts (vae None: pixel-space model); `dtype`
    as for precision()."""
    c = net.cfg
    generator = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(len(prompts), c.in_channels, c.input_size, c.input_size,
                        generator=generator, device=device)
    autocast, _ = precision(device, dtype)
    images = []
    for start in range(0, len(prompts), batch_size):
        y = text_encoder.encode(prompts[start:start + batch_size])
        with autocast:  # latents, or the image itself for a pixel-space model
            out = heun_sample(net, noise[start:start + batch_size], y, steps, cfg)
        if vae is not None:
            out = vae.decode_from_scaled(out.to(next(vae.parameters()).dtype))
        images.append((out.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)


def read_prompts(args):
    prompts = list(args.prompts)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError('no prompt given: python sample.py "a cat" (or --prompt-file FILE)')
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i + 1} is empty: give each image a caption")
    return [p for p in prompts for _ in range(args.n)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="one image per prompt (times --n)")
    parser.add_argument("--prompt-file", help="a text file with one prompt per line")
    parser.add_argument("--ckpt", help="released .pt, train.py checkpoint or exported "
                                       ".safetensors (default: the paper's 512px model)")
    parser.add_argument("--preset", choices=PRESETS, help="force the architecture")
    parser.add_argument("--vae", help="VAE folder/file/hub id, or 'none' for a pixel-space "
                                      "model (default: the checkpoint's, else by latent width)")
    parser.add_argument("--clip", help=f"CLIP weights file/folder/hub id or 'tiny-random' "
                                       f"(default: the checkpoint's, else {DEFAULT_CLIP})")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0, help="guidance scale (1: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=1, help="images per prompt")
    parser.add_argument("--res", type=int, help="image resolution (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network once "
                                                               "for all sampling steps")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def load_encoders(vae_name, clip_name, latent_channels, caption_width, device="cpu"):
    """(text encoder, VAE or None for pixel space) for a model on `latent_channels`-channel
    latents and `caption_width`-wide caption features; names default to the released
    models'. Refuses encoders that do not fit the model, before anything is generated."""
    vae = None
    if vae_name == PIXEL_SPACE and latent_channels != 3:
        raise ValueError(f"--vae {PIXEL_SPACE} is for pixel-space models, whose 3 channels are "
                         f"RGB; this one works on {latent_channels}-channel latents: pass the "
                         f"--vae it was trained with")
    if vae_name != PIXEL_SPACE:
        if not vae_name and latent_channels not in DEFAULT_VAES:
            raise ValueError(f"no released VAE has {latent_channels}-channel latents: pass "
                             f"--vae (or --vae {PIXEL_SPACE} for a pixel-space model)")
        _, dtype = precision(device)
        vae = load_vae(resolve_vae(vae_name or DEFAULT_VAES[latent_channels]), device, dtype)
        if vae.config.latent_channels != latent_channels:
            raise ValueError(f"the VAE {vae_name!r} has {vae.config.latent_channels}-channel "
                             f"latents but the model works on {latent_channels}: pass the "
                             f"--vae the model was trained with")
    clip_name = clip_name or DEFAULT_CLIP
    text_encoder = load_text_encoder(clip_name, device)
    if text_encoder.width != caption_width:
        raise ValueError(f"the text encoder {clip_name!r} gives {text_encoder.width}-wide "
                         f"features but the model expects {caption_width}: pass the --clip "
                         f"the model was trained with")
    return text_encoder, vae


def load_pipeline(ckpt, vae_name=None, clip_name=None, device="cpu", preset=None, res=None):
    """The DiT of a checkpoint with its text encoder and VAE (None: pixel space); names
    default to those the checkpoint records, then to the released models'."""
    state, config, info = read_checkpoint(ckpt)
    text_encoder, vae = load_encoders(vae_name or info.get("vae"), clip_name or info.get("clip"),
                                      state["x_embedder.proj.weight"].shape[1],
                                      state["y_embedder.y_proj.fc1.weight"].shape[1], device)
    factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    patch = state["x_embedder.proj.weight"].shape[-1]
    if res and res % (factor * patch):
        raise ValueError(f"--res {res} must be a multiple of {factor * patch} (the VAE's "
                         f"{factor}x downsampling times the {patch}x{patch} patches)")
    latent_size = res // factor if res else None
    net = build_dit(state, config, preset, latent_size, device, source=ckpt)
    return Pipeline(net, text_encoder, vae, device)


def check_device(device):
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA GPU that torch can "
                         f"use; --device cpu runs anywhere (slowly: minutes per image for XL)")


def run(args):
    for name in ("steps", "n", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    check_device(args.device)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file: name a folder for the images")
    prompts = read_prompts(args)
    ckpt = args.ckpt or hub_file(RELEASED_REPO, RELEASED_CKPT)
    net, text_encoder, vae, _ = load_pipeline(ckpt, args.vae, args.clip, args.device,
                                              args.preset, args.res)
    if args.compile:  # every step calls it with the same shapes: one compilation serves all
        net = torch.compile(net)
    images = generate(net, text_encoder, vae, prompts, args.seed, args.steps, args.cfg,
                      args.batch_size, args.device)
    os.makedirs(args.out, exist_ok=True)
    pil_images = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        meta = PngImagePlugin.PngInfo()
        for key, value in [("prompt", prompt), ("seed", args.seed), ("index", i),
                           ("steps", args.steps), ("cfg", args.cfg), ("checkpoint", ckpt)]:
            meta.add_text(key, str(value))
        pil = to_pil(image)
        pil.save(os.path.join(args.out, f"{i:04d}_{slug(prompt)}.png"), pnginfo=meta)
        pil_images.append(pil)
    if not args.no_grid:
        grid_image(pil_images, args.n if args.n > 1 else min(len(pil_images), 8)).save(
            os.path.join(args.out, "grid.png"))
    print(f"wrote {len(pil_images)} images to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
