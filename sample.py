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
import os
import re
import sys

import torch
from PIL import Image, PngImagePlugin

from checkpoint import (RELEASED_CKPT, RELEASED_REPO, build_dit, download_instructions,
                        read_checkpoint)
from diffusion import SIGMA_DATA, EDMConfig, heun_sample
from model import PRESETS, precision
from text import DEFAULT_CLIP, load_text_encoder
from vae import load_vae

# the VAE each released latent width was trained with
DEFAULT_VAES = {4: "stabilityai/stable-diffusion-xl-base-1.0", 16: "ostris/vae-kl-f8-d16"}
PIXEL_SPACE = "none"  # --vae none: the model works on pixels directly
Pipeline = collections.namedtuple("Pipeline", "net text_encoder vae device sigma_data")
# train.py's sample grids, for data that records no captions of its own
SAMPLE_PROMPTS = ["a photo of a cat", "a red sports car on a mountain road",
                  "a bowl of fruit on a wooden table", "an astronaut riding a horse"]
GUIDANCE_MEANING = "1: none, 0: the unconditional model alone, above 1: more guidance"


def check_guidance(guidance, flag="--cfg"):
    if not guidance >= 0:  # NaN too
        raise ValueError(f"{flag} {guidance}: the guidance scale must be 0 or more ("
                         f"{GUIDANCE_MEANING}; the paper samples at 5)")


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


@torch.no_grad()
def generate(net, text_encoder, vae, prompts, seed, steps, guidance, batch_size, device,
             dtype="auto", sigma_data=SIGMA_DATA):
    """Images [N, 3, H, W] in [0, 1] for the prompts (vae None: pixel-space model); `dtype`
    as for precision(); sigma_data the one the model was trained with."""
    c = net.cfg
    generator = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(len(prompts), c.in_channels, c.input_size, c.input_size,
                        generator=generator, device=device)
    autocast, _ = precision(device, dtype)
    images = []
    for start in range(0, len(prompts), batch_size):
        y = text_encoder.encode(prompts[start:start + batch_size])
        with autocast:  # latents, or the image itself for a pixel-space model
            out = heun_sample(net, noise[start:start + batch_size], y, steps, guidance,
                              EDMConfig(sigma_data=sigma_data))
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
    parser.add_argument("--clip", help=f"CLIP weights file/folder/hub id or 'random-words' "
                                       f"(default: the checkpoint's, else {DEFAULT_CLIP})")
    parser.add_argument("--steps", type=int, default=30, help="Heun steps (default 30)")
    parser.add_argument("--cfg", dest="guidance", type=float, default=5.0,
                        help=f"classifier-free guidance scale, {GUIDANCE_MEANING} (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
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
    return Pipeline(net, text_encoder, vae, device, info["sigma_data"])


def check_device(device):
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA GPU that torch can "
                         f"use; --device cpu runs anywhere (slowly: minutes per image for XL)")


def run(args):
    for name in ("steps", "n", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    check_guidance(args.guidance)
    check_device(args.device)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file: name a folder for the images")
    prompts = read_prompts(args)
    ckpt = args.ckpt or hub_file(RELEASED_REPO, RELEASED_CKPT)
    net, text_encoder, vae, _, sigma_data = load_pipeline(ckpt, args.vae, args.clip,
                                                          args.device, args.preset, args.res)
    if args.compile:  # every step calls it with the same shapes: one compilation serves all
        net = torch.compile(net)
    images = generate(net, text_encoder, vae, prompts, args.seed, args.steps, args.guidance,
                      args.batch_size, args.device, sigma_data=sigma_data)
    os.makedirs(args.out, exist_ok=True)
    pil_images = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        meta = PngImagePlugin.PngInfo()
        for key, value in [("prompt", prompt), ("seed", args.seed), ("index", i),
                           ("steps", args.steps), ("cfg", args.guidance), ("checkpoint", ckpt)]:
            meta.add_text(key, str(value))
        pil = to_pil(image)
        pil.save(os.path.join(args.out, f"{i:04d}_{slug(prompt)}.png"), pnginfo=meta)
        pil_images.append(pil)
    if not args.no_grid:
        grid_image(pil_images, args.n if args.n > 1 else min(len(pil_images), 8)).save(
            os.path.join(args.out, "grid.png"))
    print(f"wrote {len(pil_images)} images to {args.out}/")
    return 0


# ----------------------------------------------------------------------------- during training

def grid_encoders(vae_name, clip_name, model_cfg, data):
    """The text encoder and VAE for train.py's sample grids, loaded once on the CPU when the
    run starts, so that one the run cannot have stops it before its first step."""
    if not (vae_name and clip_name):
        sys.exit(f"sample grids need the VAE and text encoder the data was made with, and "
                 f"{data} does not record them (MDS shards never do): pass --vae and "
                 f"--clip as for sample.py, or --sample-every 0 to train without grids")
    try:
        return load_encoders(vae_name, clip_name, model_cfg.in_channels,
                             model_cfg.caption_channels)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"sample grids: {e}\n(--sample-every 0 trains without grids)")


@torch.no_grad()
def save_sample_grid(net_state, model_cfg, encoders, prompts, path, device, dtype, sigma_data):
    """A grid of samples for fixed prompts, for watching a training run's progress, in its
    precision (dtype as for precision())."""
    text_encoder, vae = (m if m is None else m.to(device) for m in encoders)
    net = build_dit(net_state, dataclasses.asdict(model_cfg), device=device)
    images = generate(net, text_encoder, vae, prompts, seed=0, steps=20, guidance=3.0,
                      batch_size=16, device=device, dtype=dtype, sigma_data=sigma_data)
    grid_image([to_pil(im) for im in images], min(8, len(prompts))).save(path)
    for m in encoders:  # back to the CPU: the training step wants the GPU's memory
        if m is not None:
            m.to("cpu")


if __name__ == "__main__":
    sys.exit(main())
