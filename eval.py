"""Evaluation that needs no download: does a model trained on the built-in shapes data
draw what its prompts ask for?

    python eval.py shapes --ckpt runs/demo/phase1/ckpt_000001500.pt --n 200

Prompt following is read off each generated image by template matching: every shape,
colour, size and position is rendered on the caption's background, and the template
nearest the image (mean squared error) names what the image shows. An attribute counts as
followed when the nearest template has the caption's value. Chance is 1/5 for shape and
position, 1/7 for colour (the background colour is excluded) and 1/2 for size.

Also here: the Frechet distance between two Gaussians, the core of FID.
"""
import argparse
import itertools
import json

import numpy as np
import torch

from data import COLORS, POSITIONS, SHAPES, SIZES, ShapeAttributes, caption_of, render_shapes
from data import sample_attributes

ATTRIBUTES = ("shape", "color", "size", "position")


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64. The eigenvalues of
    S1 S2 are those of the symmetric S1^(1/2) S2 S1^(1/2), so they are real and >= 0 up to
    rounding, and the trace of the square root is the sum of their square roots."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64)
                                for a in (mu1, mu2, sigma1, sigma2))
    eigenvalues = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp(min=0)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace()
                 - 2 * eigenvalues.sqrt().sum())


def templates(background, res):
    """Every (shape, colour, size, position) on this background: (attributes, [K, 3, res, res])."""
    attrs = [ShapeAttributes(s, c, z, p, background)
             for s, c, z, p in itertools.product(SHAPES, COLORS, SIZES, POSITIONS)
             if c != background]
    images = np.stack([np.asarray(render_shapes(a, res)) for a in attrs])
    return attrs, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def read_attributes(image, background):
    """What a [3, H, W] image in [0, 1] shows: the attributes of its nearest template."""
    attrs, bank = templates(background, image.shape[-1])
    errors = (bank - image.float().cpu()).square().mean(dim=(1, 2, 3))
    return attrs[int(errors.argmin())]


def prompt_following(images, asked):
    """Per-attribute accuracy and the fraction of images with all four right."""
    seen = [read_attributes(im, a.background) for im, a in zip(images, asked)]
    right = {k: [getattr(s, k) == getattr(a, k) for s, a in zip(seen, asked)] for k in ATTRIBUTES}
    scores = {k: float(np.mean(v)) for k, v in right.items()}
    scores["all"] = float(np.mean([all(r) for r in zip(*right.values())]))
    return scores


def evaluate_shapes(ckpt, n, seed, steps, cfg, device):
    from sample import generate, load_dit
    from text import load_text_encoder
    net, info = load_dit(ckpt, device=device)
    if info.get("vae") not in (None, "none"):
        raise ValueError(f"{ckpt} was trained on VAE latents; the shapes metric expects a "
                         f"pixel-space model (data.py demo --vae none)")
    rng = np.random.default_rng([seed, 7])  # held out: the data uses default_rng([seed, i])
    asked = [sample_attributes(rng) for _ in range(n)]
    images = generate(net, load_text_encoder(info.get("clip") or "tiny-random", device), None,
                      [caption_of(a) for a in asked], seed=seed, steps=steps, cfg=cfg,
                      batch_size=64, device=device)
    return prompt_following(images, asked), images, asked


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("shapes", help="prompt following on the built-in shapes data")
    shapes.add_argument("--ckpt", required=True)
    shapes.add_argument("--n", type=int, default=200)
    shapes.add_argument("--seed", type=int, default=1234)
    shapes.add_argument("--steps", type=int, default=30)
    shapes.add_argument("--cfg", type=float, default=3.0)
    shapes.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    shapes.add_argument("--grid", help="also save the first 32 images as a grid PNG here")
    args = parser.parse_args(argv)
    scores, images, _ = evaluate_shapes(args.ckpt, args.n, args.seed, args.steps, args.cfg,
                                        args.device)
    if args.grid:
        from sample import grid_image, to_pil
        grid_image([to_pil(im) for im in images[:32]], 8).save(args.grid)
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
