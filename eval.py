"""Evaluation: FID and CLIP score, the COCO-30K protocol, and metrics for the built-in
shapes data that need no download.

    # COCO-30K: FID-30K and CLIP score, generation sharded over 8 GPUs; --num-images
    # 5000 gives FID-5K (--n also works, but not under torchrun, whose parser takes it)
    torchrun --nproc_per_node 8 eval.py coco --ckpt weights/ckpts/dit_4_channel_37M_real_and_synthetic_data.pt \\
        --vae weights/sdxl/vae --clip weights/clip/open_clip_model.safetensors \\
        --captions coco/annotations/captions_val2014.json --images coco/val2014 \\
        --num-images 30000 --steps 30 --cfg 5 --out runs/coco30k \\
        --ref-stats runs/coco_val2014_n30000_seed0_512px.npz \\
        --inception weights/pt_inception-2015-12-05-6726825d.pth \\
        --clip-score-model ViT-L-14-quickgelu:weights/clip-l14/open_clip_pytorch_model.bin

    python eval.py fid --real DIR --fake DIR [--ref-stats real.npz]   # two image folders
    python eval.py shapes --ckpt runs/microdit/phase1/ckpt_000001500.pt --n 200

Files. COCO 2014 (cocodataset.org): http://images.cocodataset.org/zips/val2014.zip (the
40,504 val images) and http://images.cocodataset.org/annotations/annotations_trainval2014.zip
(holds annotations/captions_val2014.json). The FID Inception weights: see inception.py.
The CLIP-score model is open_clip's ViT-L-14 'openai' tag (hub repo
timm/vit_large_patch14_clip_224.openai); offline: `hf download
timm/vit_large_patch14_clip_224.openai open_clip_pytorch_model.bin --local-dir
weights/clip-l14` and pass the file as in the command above (a weights file does not say its
activation: name the -quickgelu architecture).

FID is the Frechet distance between the Gaussians (mean and unbiased covariance, float64) of
the 2,048-d pool3 features of two image sets, with pytorch-fid's network, weights and
preprocessing: inception.py.

CLIP score follows torchmetrics' CLIPScore: the mean over images of max(100 cos(image
embedding, caption embedding), 0), here with open_clip's ViT-L-14 and OpenAI's weights (the
same weights as torchmetrics' default openai/clip-vit-large-patch14) and open_clip's
preprocessing (short side to 224 bicubic, centre crop, CLIP mean/std).

COCO-30K: n images of COCO-2014 val drawn with a seeded generator (a permutation of all
captioned images, so the first 5,000 of n=30,000 are the n=5,000 set) and one caption of each,
drawn alike. Generation is split into seed-batches of --batch-size consecutive indices; batch
k has its noise from seed (--seed, k) and rank r of W takes batches r, r + W, ...: an image
depends on its index, the seed and the batch size, never on the number of ranks. PNGs are
named by index, so a rerun only draws what is missing. The references are the n chosen
images, resized (short side, PIL bicubic, antialiased) and centre-cropped to the generation
resolution: prepare.py's resize_center_crop, the transform the model was trained with (but
without its EXIF rotation: images are read as pytorch-fid reads them). FID and CLIP score
are computed by rank 0 on the PNGs, each checked to carry the COCO id it was drawn for; a
rerun into the same --out refuses another checkpoint, VAE, text encoder or captions file
(by content: path, size and modification time, or the captions' sha256).

Shapes. Prompt following is read off each generated image by template matching: every
shape, colour, size and position is rendered on the caption's background, and the template
nearest the image (mean squared error) names what the image shows. An attribute counts as
followed when the nearest template has the caption's value. Chance is 1/5 for shape and
position, 1/7 for colour (the background colour is excluded) and 1/2 for size. The Frechet
distance is measured in the 64 features of a small convolutional network with random
weights fixed by a seed (four stride-2 3x3 convolutions with ReLU, 16-32-64-64 channels, on
the image resized to 32x32, then a global average; the zero padding lets them see where a
shape lies): random conv features separate image distributions well enough to rank models
and need no download. The references are renders of the captions asked for;
`frechet_real_vs_real` is the distance between two independent rendered sets of the same
size: the floor that sampling noise alone gives at this n.
"""
import argparse
import collections
import hashlib
import itertools
import json
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from torch.distributed.elastic.multiprocessing.errors import record

from checkpoint import atomic_write, write_json
from data import COLORS, POSITIONS, SHAPES, SIZES, ShapeAttributes, caption_of, command_error
from data import render_shapes, sample_attributes
from prepare import IMAGE_EXTENSIONS, process_env, read_coco_captions, resize_center_crop
from prepare import settings_changes, to_rgb
from inception import INCEPTION_URL, RANDOM, he_init, load_inception, sha256_of
from sample import GUIDANCE_MEANING, check_device, check_guidance, load_pipeline
from text import TINY_RANDOM

ATTRIBUTES = ("shape", "color", "size", "position")
CLIP_SCORE_MODEL = "ViT-L-14:openai"
FEATURE_BATCH = 50  # images per Inception / CLIP forward; the results do not depend on it

Stats = collections.namedtuple("Stats", "mu sigma count")


# ----------------------------------------------------------------------------- Frechet distance

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64. The eigenvalues of
    S1 S2 are those of the symmetric S1^(1/2) S2 S1^(1/2), so two symmetric
    eigendecompositions give the trace of the square root (a general eigensolver on S1 S2 is
    many times slower at 2,048 dimensions). Only the numerical range of S1 counts: the
    square root is zero elsewhere, and a rank-r S1 leaves an r x r problem."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64)
                                for a in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    keep = w > w.max().clamp(min=0) * len(w) * torch.finfo(w.dtype).eps  # numpy's matrix_rank
    half = v[:, keep] * w[keep].sqrt()                                    # S1^(1/2) V: (D, r)
    eigenvalues = torch.linalg.eigvalsh(half.T @ sigma2 @ half).clamp(min=0)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace()
                 - 2 * eigenvalues.sqrt().sum())


def gaussian_stats(features):
    """Mean and covariance (unbiased, as numpy.cov) of [N, D] features, in float64."""
    features = torch.as_tensor(features, dtype=torch.float64)
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 images, got {len(features)}")
    return Stats(features.mean(dim=0), torch.cov(features.T), len(features))


def fid_of(a, b):
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def read_stats(path):
    """The arrays of a statistics file that cached_stats wrote."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in ("key", "mu", "sigma", "count")}
    except Exception as e:  # a folder, an .npy, pytorch-fid's npz (no key), not numpy
        raise ValueError(f"{path}: not a statistics file written by eval.py (one holds mu, "
                         f"sigma, count and key; {type(e).__name__}: {e}): pass another "
                         f"--ref-stats, or a path that does not exist yet to compute the "
                         f"statistics there") from None


def cached_stats(path, key, compute):
    """The Stats saved in `path` when it exists (it must have been computed for `key`),
    otherwise compute() saved there atomically; path None: compute() only."""
    if path and os.path.exists(path):
        saved = read_stats(path)
        if str(saved["key"]) != key:
            raise ValueError(f"{path} holds statistics of {saved['key']}, not of {key}: "
                             f"delete it or pass another --ref-stats")
        return Stats(torch.from_numpy(saved["mu"]), torch.from_numpy(saved["sigma"]),
                     int(saved["count"]))
    stats = compute()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, mu=stats.mu.numpy(), sigma=stats.sigma.numpy(),
                                               count=stats.count, key=key))
    return stats


# ----------------------------------------------------------------------------- images

def list_images(folder, flag):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {folder}: not a folder (FID compares two folders of "
                                f"images)")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if "grid.png" in names and any(re.match(r"\d{4}_", f) for f in names):
        names.remove("grid.png")  # sample.py's grid beside its images: not one of them
        print(f"{flag} {folder}: grid.png left out (sample.py's grid of the images; "
              f"sample.py --no-grid does not write it)")
    paths = [os.path.join(folder, f) for f in names]
    if not paths:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


DECODE_ERRORS = (OSError, SyntaxError, ValueError)  # PIL's errors for corrupt or cut files


def decode_rgb(path):
    with Image.open(path) as img:
        return to_rgb(img, collections.Counter())


def open_rgb(path):
    """The image as RGB, or None (with a warning) when it cannot be decoded: one bad file
    in a folder of thousands is skipped, and the counts in the result show it."""
    try:
        return decode_rgb(path)
    except DECODE_ERRORS as e:
        warnings.warn(f"{path}: cannot be decoded, skipped ({type(e).__name__}: {e})")
        return None


def strict_loader(advice):
    """A loader for sets that must be whole (COCO's reference and generated images): an
    undecodable file stops the evaluation, naming the file and what to do."""
    def load(path):
        try:
            return decode_rgb(path)
        except DECODE_ERRORS as e:
            raise ValueError(f"{path} cannot be decoded ({type(e).__name__}: {e}): {advice}")
    return load


def unit_tensor(img):
    """PIL RGB -> [3, H, W] float in [0, 1], as torchvision's ToTensor."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def image_batches(items, load, batch_size=FEATURE_BATCH):
    """Lists of up to batch_size images load(item), decoded in threads (PIL lets go of the
    GIL) one batch at a time, so memory stays bounded."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(items), batch_size):
            yield list(pool.map(load, items[start:start + batch_size]))


@torch.no_grad()
def inception_stats(net, items, load=open_rgb):
    """Stats of the pool3 features of the images load(item) (any sizes)."""
    device = next(net.parameters()).device
    features = []
    for batch in image_batches(items, load):
        pixels = [unit_tensor(img).to(device) for img in batch if img is not None]
        if not pixels:
            continue
        if len({p.shape for p in pixels}) == 1:
            features.append(net(torch.stack(pixels)).cpu())
        else:  # resizing to 299 is per image, so one image at a time gives the same numbers
            features += [net(p[None]).cpu() for p in pixels]
    decoded = sum(len(f) for f in features)
    if decoded < 2:
        raise ValueError(f"{decoded} of the {len(items)} images (first {items[0]}) could be "
                         f"decoded: the Frechet distance needs the covariance of at least 2")
    return gaussian_stats(torch.cat(features))


def files_signature(paths):
    """A digest of the files' names, sizes and modification times: cached statistics of a
    set are used again only for the same files, unchanged."""
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.path.abspath(p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def folder_fid(real, fake, inception, ref_stats=None):
    """FID between two image folders; the real side's stats are cached in ref_stats."""
    real_paths, fake_paths = list_images(real, "--real"), list_images(fake, "--fake")
    key = json.dumps({"folder": os.path.abspath(real), "images": len(real_paths),
                      "files": files_signature(real_paths), "feature_net": inception.name})
    ref = cached_stats(ref_stats, key, lambda: inception_stats(inception, real_paths))
    gen = inception_stats(inception, fake_paths)
    return {"fid": fid_of(ref, gen), "real": ref.count, "fake": gen.count,
            "feature_net": inception.name}


# ----------------------------------------------------------------------------- CLIP score

ClipScorer = collections.namedtuple("ClipScorer", "model preprocess tokenizer name")


def tiny_random_clip():
    """A small open_clip CLIP, both towers, weights fixed by a seed: FOR TESTS ONLY."""
    from open_clip import CLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIP(embed_dim=32, quick_gelu=True,
                    vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8,
                                             image_size=32),
                    text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64,
                                         heads=2, layers=2))


def clip_score_spec(spec):
    """'ARCH:TAG' or 'ARCH:FILE' -> (arch, weights, open_clip's pretrained cfg or {}),
    checked without loading anything."""
    import open_clip
    arch, _, weights = spec.partition(":")
    tag = open_clip.get_pretrained_cfg(arch, weights)
    if arch not in open_clip.list_models() or not (tag or os.path.isfile(weights)):
        raise FileNotFoundError(f"--clip-score-model {spec!r}: give ARCH:TAG (e.g. "
                                f"{CLIP_SCORE_MODEL}), ARCH:FILE or {TINY_RANDOM}")
    return arch, weights, tag


def load_clip_scorer(spec=CLIP_SCORE_MODEL, device="cpu"):
    """'ARCH:TAG' (an open_clip pretrained tag, downloaded once), 'ARCH:FILE' or 'tiny-random'."""
    import open_clip
    from open_clip.pretrained import download_pretrained
    if spec == TINY_RANDOM:
        model, arch = tiny_random_clip(), "ViT-L-14"  # the same BPE tokenizer as every OpenAI CLIP
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    else:
        arch, weights, tag = clip_score_spec(spec)
        if tag:
            try:  # here, so that being offline gives instructions; then read from the cache
                download_pretrained(tag)
            except Exception as e:  # offline and not cached
                hub = tag.get("hf_hub", "").rstrip("/")
                suffix = "-quickgelu" if tag.get("quick_gelu") else ""
                raise FileNotFoundError(
                    f"cannot get the CLIP weights {spec} ({type(e).__name__}): download them "
                    f"once with\n    hf download {hub} open_clip_pytorch_model.bin "
                    f"--local-dir weights/clip-score\nand pass --clip-score-model "
                    f"{arch}{suffix}:weights/clip-score/open_clip_pytorch_model.bin") from e
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=weights, force_quick_gelu=bool(tag.get("quick_gelu")))
    model = model.to(device).eval().requires_grad_(False)
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(arch), spec)


@torch.no_grad()
def clip_cosines(scorer, images, captions):
    """100 cos(image embedding, caption embedding) for PIL images and their captions: [N]."""
    device = scorer.model.logit_scale.device
    pixels = torch.stack([scorer.preprocess(img) for img in images]).to(device)
    image_embeds = F.normalize(scorer.model.encode_image(pixels).float(), dim=-1)
    text_embeds = F.normalize(scorer.model.encode_text(scorer.tokenizer(list(captions)).to(device))
                              .float(), dim=-1)
    return 100 * (image_embeds * text_embeds).sum(dim=-1)


def clip_score(scorer, items, captions, load=open_rgb):
    """Mean over images of max(100 cos, 0), the images being load(item); an image that
    cannot be decoded (load gives None) is left out together with its caption."""
    if len(items) != len(captions):
        raise ValueError(f"{len(items)} images but {len(captions)} captions")
    cosines = []
    # each image travels with its caption: no batch arithmetic to keep the two in step
    for batch in image_batches(list(zip(items, captions)), lambda ic: (load(ic[0]), ic[1])):
        kept = [(image, caption) for image, caption in batch if image is not None]
        if kept:
            images, texts = zip(*kept)
            cosines.append(clip_cosines(scorer, list(images), list(texts)).cpu())
    if not cosines:
        raise ValueError("no image could be decoded: nothing to score")
    return float(torch.cat(cosines).clamp(min=0).mean())


# ----------------------------------------------------------------------------- COCO-30K

def choose_captions(captions_json, n, seed=0):
    """n [index, image_id, file_name, caption] of distinct COCO images: a seeded permutation
    of the captioned images (sorted by id) and one caption of each (sorted by annotation id)
    drawn with the same generator. The draws cover every image, so a smaller n picks the
    first images of a larger one."""
    files, captions = read_coco_captions(captions_json, "--captions")
    captions = {i: usable for i, cs in captions.items()
                if (usable := [c for c in cs if c[1] and c[1].strip()])}  # no blank captions
    files = {i: f for i, f in files.items() if i in captions}
    ids = sorted(files)
    if n > len(ids):
        raise ValueError(f"--n {n}: {captions_json} has only {len(ids)} captioned images")
    rng = np.random.default_rng(seed)
    order = [ids[j] for j in rng.permutation(len(ids))]
    picks = rng.integers(0, [len(captions[i]) for i in order])
    return [{"index": k, "image_id": i, "file_name": files[i],
             "caption": captions[i][p][1].strip()}
            for k, (i, p) in enumerate(zip(order[:n], picks[:n].tolist()))]


def batch_seed(seed, k):
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def image_path(out, index):
    return os.path.join(out, "images", f"{index:05d}.png")


def coco_generate(args, rank=0, world_size=1):
    """Rank `rank`'s seed-batches k = rank, rank + world_size, ...: batch k holds indices
    [k B, (k + 1) B) and draws its noise from batch_seed(seed, k). Batches whose PNGs all
    exist are skipped; the pipeline is loaded only when something is left to draw."""
    from tqdm import tqdm
    from sample import generate, to_pil
    coco_references(args, choose_captions(args.captions, args.n, args.seed))  # before hours of work
    check_evaluation_inputs(args)  # the evaluation's files too, before hours of work
    settings = {k: getattr(args, k) for k in ("seed", "steps", "cfg", "batch_size")}
    settings.update({k: file_identity(getattr(args, k)) for k in ("ckpt", "vae", "clip")})
    settings["captions"] = sha256_of(args.captions)
    settings_path = os.path.join(args.out, "generation.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            earlier = json.load(f)
        if earlier != settings:
            raise ValueError(f"{args.out} holds images made with other settings "
                             f"({'; '.join(settings_changes(earlier, settings))}): use "
                             f"another --out")
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    if rank == 0:
        write_json(settings_path, settings)

    chosen, B = choose_captions(args.captions, args.n, args.seed), args.batch_size
    batches = [range(k * B, min((k + 1) * B, args.n))
               for k in range(rank, -(-args.n // B), world_size)]
    todo = [b for b in batches if not all(os.path.exists(image_path(args.out, i)) for i in b)]
    if not todo:
        return
    pipe = load_pipeline(args.ckpt, args.vae, args.clip, process_env(args.device).device)
    for indices in tqdm(todo, disable=rank != 0, unit="batch", desc="generating"):
        images = generate(pipe.net, pipe.text_encoder, pipe.vae,
                          [chosen[i]["caption"] for i in indices],
                          seed=batch_seed(args.seed, indices.start // B), steps=args.steps,
                          guidance=args.cfg, batch_size=B, device=pipe.device,
                          sigma_data=pipe.sigma_data)
        for i, image in zip(indices, images):
            meta = PngImagePlugin.PngInfo()
            meta.add_text("caption", chosen[i]["caption"])
            meta.add_text("coco_image_id", str(chosen[i]["image_id"]))
            pil = to_pil(image)
            atomic_write(image_path(args.out, i),
                          lambda f: pil.save(f, format="PNG", pnginfo=meta))


def file_identity(name):
    """What a generation depends on in a --ckpt/--vae/--clip: a local file or folder as its
    absolute path with each file's size and modification time (a file replaced under the
    same name is noticed), anything else (a hub id, 'none', None) as given."""
    if name is None or not os.path.exists(name):
        return name
    files = ([name] if os.path.isfile(name) else
             sorted(os.path.join(d, f) for d, _, fs in os.walk(name) for f in fs))
    return {"path": os.path.abspath(name), "files": files_signature(files)}


def check_evaluation_inputs(args):
    """The Inception and CLIP-score weights and --ref-stats, checked before the generation
    (the models themselves are loaded after it, when they are needed)."""
    if args.inception not in (None, RANDOM) and not os.path.isfile(args.inception):
        raise FileNotFoundError(f"--inception {args.inception}: no such file")
    if args.clip_score_model != TINY_RANDOM:
        clip_score_spec(args.clip_score_model)
    if args.ref_stats and os.path.exists(args.ref_stats):
        read_stats(args.ref_stats)


def check_generated(out, chosen):
    """Each PNG carries the COCO image id it was drawn for: one drawn for another caption
    (another --captions or --seed into the same --out) is refused, not scored."""
    for c in chosen:
        path = image_path(out, c["index"])
        try:
            with Image.open(path) as img:
                said = img.text.get("coco_image_id")
        except DECODE_ERRORS as e:
            raise ValueError(f"{path} cannot be decoded ({type(e).__name__}: {e}): delete it "
                             f"and run the generation again, which redraws it") from None
        if said != str(c["image_id"]):
            raise ValueError(f"{path} was drawn for COCO image {said}, but index {c['index']} "
                             f"is image {c['image_id']} for these --captions and --seed: "
                             f"evaluate with the generation's, or generate into another --out")


def coco_references(args, chosen):
    """The chosen COCO images' paths; all must be there (checked before any generation)."""
    real = [os.path.join(args.images, c["file_name"]) for c in chosen]
    missing = [p for p in real if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(real)} chosen COCO images are not "
                                f"in --images {args.images}, first {missing[0]}: point --images "
                                f"at the extracted val2014 folder")
    return real


def coco_evaluate(args):
    """FID of the generated PNGs against the chosen COCO images (reference stats cached in
    --ref-stats), and their CLIP score; written to OUT/result.json."""
    chosen = choose_captions(args.captions, args.n, args.seed)
    fake = [image_path(args.out, c["index"]) for c in chosen]
    missing = [p for p in fake if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} generated images are missing, first "
                                f"{missing[0]}: run the generation again (it resumes)")
    check_generated(args.out, chosen)
    with Image.open(fake[0]) as img:
        res = img.size[0]
    device = process_env(args.device).device
    inception = load_inception(args.inception, device)
    scorer = load_clip_scorer(args.clip_score_model, device)  # both models before any work
    real = coco_references(args, chosen)
    key = json.dumps({"coco": sha256_of(args.captions), "n": args.n, "seed": args.seed,
                      "res": res, "feature_net": inception.name,
                      "images": files_signature(real)})
    load_real = strict_loader("the COCO file is damaged: extract val2014 again")
    # named by what it depends on, so an FID-5K and an FID-30K can share one --out
    default = os.path.join(args.out, f"reference_stats_n{args.n}_seed{args.seed}_{res}px.npz")
    ref = cached_stats(args.ref_stats or default, key,
                       lambda: inception_stats(inception, real,
                                               lambda p: resize_center_crop(load_real(p), res)))
    load_fake = strict_loader("delete it and run the generation again, which redraws it")
    gen = inception_stats(inception, fake, load_fake)
    result = {"fid": fid_of(ref, gen),
              "clip_score": clip_score(scorer, fake, [c["caption"] for c in chosen], load_fake),
              "n": args.n, "resolution": res, "feature_net": inception.name,
              "clip_score_model": scorer.name,
              **{k: getattr(args, k) for k in ("ckpt", "seed", "steps", "cfg", "batch_size")}}
    write_json(os.path.join(args.out, "captions.json"), chosen)
    write_json(os.path.join(args.out, "result.json"), result)
    return result


# ----------------------------------------------------------------------------- shapes

def templates(background, res):
    """Every (shape, colour, size, position) on this background: (attributes, [K, 3, res, res])."""
    attrs = [ShapeAttributes(s, c, z, p, background)
             for s, c, z, p in itertools.product(SHAPES, COLORS, SIZES, POSITIONS)
             if c != background]
    return attrs, torch.stack([unit_tensor(render_shapes(a, res)) for a in attrs])


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


def shapes_feature_net(seed=0):
    """The fixed random feature network of the shapes Frechet distance: 64 features."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers, width = [], 3
        for channels in (16, 32, 64, 64):
            layers += [nn.Conv2d(width, channels, 3, stride=2, padding=1), nn.ReLU()]
            width = channels
        net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        he_init(net)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def shapes_frechet(images_a, images_b):
    """Frechet distance between two sets of [3, H, W] images in [0, 1] in the random
    features of shapes_feature_net."""
    net = shapes_feature_net()
    stats = []
    for images in (images_a, images_b):
        x = torch.stack([im.float().cpu() for im in images])
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        stats.append(gaussian_stats(net(2 * x - 1)))                    # (N, 64)
    return fid_of(*stats)


def render_set(attrs, res):
    return [unit_tensor(render_shapes(a, res)) for a in attrs]


def training_captions(ckpt, info, train_data=None):
    """The captions a shapes model was trained on, to hold them out of its evaluation:
    those of `train_data`, else of the data folder its train.py checkpoint names (`info`,
    from sample.read_checkpoint). 'none': hold nothing out."""
    if train_data == "none":
        return set()
    if train_data is None:
        train_data = info.get("data")
        if not (train_data and os.path.isdir(train_data)):
            raise ValueError(f"{ckpt} does not name a training data folder that exists here: "
                             f"pass --train-data DIR so that the evaluation captions are held "
                             f"out of it (or --train-data none to draw from all captions)")
    from data import LatentDataset, parse_sources
    captions = set()
    for path, _ in parse_sources(train_data):
        dataset = LatentDataset(path)
        captions.update(dataset.caption(i) for i in range(dataset.num_samples))
    return captions


def held_out_attributes(rng, n, exclude):
    """n random attributes whose captions are not in `exclude`: a caption names exactly one
    image, so none of these was seen in training."""
    every = {caption_of(ShapeAttributes(s, c, z, p, b)) for s in SHAPES for c in COLORS
             for z in SIZES for p in POSITIONS for b in COLORS if b != c}
    left = len(every - exclude)
    if left == 0:
        raise ValueError("the training data holds every one of the shapes captions: none is "
                         "left to hold out (--train-data none evaluates on seen ones)")
    if left < n:
        warnings.warn(f"only {left} captions are not in the training data: the {n} asked "
                      f"for repeat some")
    asked = []
    while len(asked) < n:
        a = sample_attributes(rng)
        if caption_of(a) not in exclude:
            asked.append(a)
    return asked


def evaluate_shapes(ckpt, n, seed, steps, guidance, device, train_data=None):
    from checkpoint import load_dit
    from sample import generate
    from text import load_text_encoder
    net, info = load_dit(ckpt, device=device)
    if info.get("vae") not in (None, "none") or net.cfg.in_channels != 3:
        raise ValueError(f"{ckpt} was trained on VAE latents ({net.cfg.in_channels} channels); "
                         f"the shapes metric expects a pixel-space model (data.py demo --vae none)")
    text_encoder = load_text_encoder(info.get("clip") or TINY_RANDOM, device)
    if text_encoder.width != net.cfg.caption_channels:
        raise ValueError(f"{ckpt} takes {net.cfg.caption_channels}-wide caption features, and "
                         f"its text encoder {text_encoder.name!r} gives {text_encoder.width}: "
                         f"not a model of the shapes data")
    seen = training_captions(ckpt, info, train_data)
    asked, real, other = shapes_references(n, seed, seen, net.cfg.input_size)
    images = generate(net, text_encoder, None,
                      [caption_of(a) for a in asked], seed=seed, steps=steps, guidance=guidance,
                      batch_size=64, device=device, sigma_data=info["sigma_data"])
    scores = prompt_following(images, asked)
    scores["frechet"] = shapes_frechet(images, real)
    scores["frechet_real_vs_real"] = shapes_frechet(other, real)
    scores["training_captions_held_out"] = len(seen)
    return scores, images, asked


def shapes_references(n, seed, seen, res):
    """What evaluate_shapes(n, seed) asks for (n held-out attributes), their renderings (the
    Frechet references) and renderings of n other held-out captions."""
    asked = held_out_attributes(np.random.default_rng([seed, 7]), n, seen)
    other = held_out_attributes(np.random.default_rng([seed, 8]), n, seen)
    return asked, render_set(asked, res), render_set(other, res)


def shapes_calibration(n, seed, seen, res):
    """The shapes metrics' two ends, on the captions evaluate_shapes(n, seed) asks for:
    their renderings ('real': what a perfect model scores; its Frechet distance is that of
    renderings of other captions, a scale) and uniform noise images ('noise': chance)."""
    asked, real, other = shapes_references(n, seed, seen, res)
    noise = list(torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)))
    return {"real": {**prompt_following(real, asked), "frechet": shapes_frechet(other, real)},
            "noise": {**prompt_following(noise, asked), "frechet": shapes_frechet(noise, real)}}


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    shapes = sub.add_parser("shapes", help="prompt following and Frechet distance on the "
                                           "built-in shapes data (no download)")
    shapes.add_argument("--ckpt", required=True)
    shapes.add_argument("--n", type=int, default=200, help="held-out captions, one image "
                                                           "each (default 200)")
    shapes.add_argument("--seed", type=int, default=1234, help="picks the captions and the "
                                                               "noise (default 1234)")
    shapes.add_argument("--steps", type=int, default=30, help="Heun steps (default 30)")
    shapes.add_argument("--cfg", type=float, default=3.0,
                        help=f"guidance scale, {GUIDANCE_MEANING} (default 3)")
    shapes.add_argument("--grid", help="also save the first 32 images as a grid PNG here")
    shapes.add_argument("--train-data", help="the data the model was trained on, whose "
                                             "captions are held out (default: the folder its "
                                             "checkpoint names; 'none': hold nothing out)")

    fid = sub.add_parser("fid", help="FID between two image folders")
    fid.add_argument("--real", required=True, help="folder of reference images")
    fid.add_argument("--fake", required=True, help="folder of generated images")

    coco = sub.add_parser("coco", help="the COCO-30K protocol: generate, FID, CLIP score "
                                       "(under torchrun: generation sharded over ranks)")
    coco.add_argument("--ckpt", required=True)
    coco.add_argument("--vae", help="as sample.py: folder/file/hub id or 'none' "
                                    "(default: the checkpoint's)")
    coco.add_argument("--clip", help="as sample.py: the caption encoder "
                                     "(default: the checkpoint's)")
    coco.add_argument("--captions", required=True, help="annotations/captions_val2014.json")
    coco.add_argument("--images", required=True, help="the val2014/ image folder")
    coco.add_argument("--n", "--num-images", dest="n", type=int, default=30000,
                      help="images (5000: FID-5K); under torchrun spell it --num-images, as "
                           "torchrun's own parser reads --n as an abbreviation")
    coco.add_argument("--seed", type=int, default=0, help="picks the captions and the noise")
    coco.add_argument("--steps", type=int, default=30, help="Heun steps (default 30)")
    coco.add_argument("--cfg", type=float, default=5.0,
                      help=f"guidance scale, {GUIDANCE_MEANING} (default 5, as released)")
    coco.add_argument("--batch-size", type=int, default=32,
                      help="images per seed-batch: part of the protocol, like --seed")
    coco.add_argument("--out", required=True, help="images/, captions.json, result.json")
    coco.add_argument("--clip-score-model", default=CLIP_SCORE_MODEL,
                      help=f"ARCH:TAG, ARCH:FILE or {TINY_RANDOM} (default {CLIP_SCORE_MODEL})")

    for p in (fid, coco):
        p.add_argument("--ref-stats", help="reference feature statistics (.npz): read when "
                                           "the file exists, else computed and saved there "
                                           "(coco default: OUT/reference_stats_nN_seedS_RESpx.npz)")
        p.add_argument("--inception", help=f"FID Inception weights file, or '{RANDOM}' for "
                                           f"tests (default: download {INCEPTION_URL})")
    for p in (shapes, fid, coco):
        p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK) if there is one, else cpu")
    return parser.parse_args(argv)


@record  # under torchrun: an unexpected exception goes to the error file with its traceback
def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        return command_error(e)


def run(args):
    rank, world_size, device = process_env(args.device)
    check_device(device)
    least = {"shapes": {"n": 2, "steps": 1}, "coco": {"n": 1, "steps": 1, "batch_size": 1},
             "fid": {}}[args.command]
    for name, low in least.items():
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at "
                             f"least {low}" + (" (a Frechet distance needs 2 images)"
                                               if low == 2 else ""))
    if args.command != "fid":
        check_guidance(args.cfg)
    if args.command == "shapes":
        scores, images, _ = evaluate_shapes(args.ckpt, args.n, args.seed, args.steps, args.cfg,
                                            device, args.train_data)
        if args.grid:
            from sample import grid_image, to_pil
            grid_image([to_pil(im) for im in images[:32]], 8).save(args.grid)
        print(json.dumps(scores))
    elif args.command == "fid":
        print(json.dumps(folder_fid(args.real, args.fake, load_inception(args.inception, device),
                                    args.ref_stats)))
    else:
        if world_size > 1:  # a process group only to wait for every rank's images
            import datetime
            import torch.distributed as dist
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
        coco_generate(args, rank, world_size)
        if world_size > 1:
            dist.barrier()
            dist.destroy_process_group()
        if rank == 0:
            print(json.dumps(coco_evaluate(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
