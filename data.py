"""Everything between a pile of captioned images and a training batch.

    python data.py demo --out data/shapes32 --n 4000 --res 32               # built-in set, pixels
    python data.py prepare --src imgs/ --out data/mine --res 256 512 --vae weights/sdxl/vae
    torchrun --nproc_per_node 8 data.py prepare --src shards/ --out data/cc12m --res 256 512 ...

    loader = LatentLoader("data/cc12m:0.6,data/synthetic:0.4", resolution=256, batch_size=256)
    batch = next(loader)         # {"latents": (B, C, h, w) float32, "captions": (B, 77, D) float32}

Inputs: a folder of images with same-named .txt captions, img2dataset WebDataset tars, COCO
captions JSON + image folder, or the built-in shapes set. `prepare` resizes (short side,
bicubic), centre-crops, encodes each resolution with the VAE (a posterior SAMPLE, scaled) or
keeps the pixels in [-1, 1] (`--vae none`), encodes the captions to [77, D] token features,
and writes float16 shards. The loader reads those shards, or the paper's own MosaicML MDS
latent shards, memory-mapped.

Shard format (one directory): `shard-NNNNN.<column>.npy` float16 arrays, one row per sample
(`latents_<res>` [n, C, h, w] (h = res/8 with the SDXL VAE), or `images_<res>` [n, 3, res,
res] in pixel mode, and
`caption_feats` [n, 77, D]); `shard-NNNNN.json` with the keys and caption strings, written
last, so its presence marks a complete shard; `index.json` (columns, shapes, sample counts,
encoders) and `summary.json` (what was skipped or converted), written when every shard is
done.
"""
import argparse
import atexit
import collections
import functools
import glob
import hashlib
import io
import json
import os
import queue
import re
import sys
import tarfile
import threading
import time
import uuid
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record
from tqdm import tqdm

import text as text_lib
import vae as vae_lib
from text import DEFAULT_CLIP, TINY_RANDOM, load_text_encoder
from vae import load_vae

FORMAT = "microdit-shards"
FORMAT_VERSION = 1
CAPTION_COLUMN = "caption_feats"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SOURCE_FORMATS = ("folder", "tar", "coco", "demo")

# ----------------------------------------------------------------------------------------
# built-in data: coloured shapes with captions that say what and where they are

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {  # far apart in RGB, and each has an everyday name
    "red": (230, 25, 25), "green": (25, 170, 45), "blue": (30, 70, 230),
    "yellow": (245, 215, 20), "purple": (140, 40, 190), "orange": (250, 130, 15),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
SIZES = {"small": 0.25, "large": 0.45}  # shape diameter as a fraction of the image side
POSITIONS = {  # shape centre as (x, y) fractions of the image side
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "center": (0.5, 0.5),
}


@dataclass(frozen=True)
class ShapeAttributes:
    shape: str
    color: str
    size: str
    position: str
    background: str


def sample_attributes(rng):
    """Random attributes from a numpy Generator; the background never has the shape's colour."""
    color = str(rng.choice(list(COLORS)))
    return ShapeAttributes(shape=str(rng.choice(SHAPES)), color=color,
                           size=str(rng.choice(list(SIZES))),
                           position=str(rng.choice(list(POSITIONS))),
                           background=str(rng.choice([c for c in COLORS if c != color])))


def demo_attributes(seed, i):
    """Attributes of sample i of the built-in set: a function of (seed, i) alone, so any
    slice of the set can be rendered without the rest."""
    return sample_attributes(np.random.default_rng([seed, i]))


def caption_of(a):
    article = "an" if a.background[0] in "aeiou" else "a"
    return (f"a {a.size} {a.color} {a.shape} in the {a.position} on {article} {a.background} "
            f"background")


def render_shapes(a, res, supersample=4):
    """attributes -> (res, res) RGB image. Drawn at `supersample` times the size and
    box-filtered down, so edges are anti-aliased the same way at every resolution."""
    s = res * supersample
    img = Image.new("RGB", (s, s), COLORS[a.background])
    draw = ImageDraw.Draw(img)
    cx, cy = (f * s for f in POSITIONS[a.position])
    r = SIZES[a.size] * s / 2  # every shape fits in the circle of radius r
    fill = COLORS[a.color]
    if a.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif a.shape == "square":
        h = r * 0.8  # a square inscribed in the circle looks small next to it; this reads alike
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif a.shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])  # equilateral, point up, centred on (cx, cy)
        draw.polygon([(cx + r * np.cos(t), cy + r * np.sin(t)) for t in angles], fill=fill)
    elif a.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif a.shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {a.shape!r}; choose from {SHAPES}")
    return img.reduce(supersample)


# ----------------------------------------------------------------------------------------
# inputs: every format becomes a list of work shards, each a list of records

Record = collections.namedtuple("Record", "key load_image caption")
# key: unique within the dataset; load_image: () -> PIL image, or None when the image is
# missing; caption: bytes (decoded later, so bad encodings are counted), str, None, or a
# () -> one of those (read in the decoding threads)


@dataclass
class WorkShard:
    origin: str              # where the records come from, for messages and the manifest
    size: int | None         # number of records, when known before reading
    records: object          # (counts) -> iterator of Record; counts takes input-level problems
    fingerprint: str         # changes when the input behind this shard changes


SOURCES = ("a folder of images with .txt captions, a .tar, a folder or glob of .tar shards, "
           "a COCO captions .json, or 'demo'")


def detect_format(src):
    if src == "demo":
        return "demo"
    if os.path.isdir(src):  # first: a folder's name may hold [ or * or end in .json
        if os.path.exists(os.path.join(src, "index.json")):
            raise ValueError(f"{src} already holds prepared shards (it has an index.json): "
                             f"pass it to training directly (--data {src})")
        names = os.listdir(src)
        tars = [f for f in names if f.endswith(".tar")]
        images = [f for f in names if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        if tars and images:
            raise ValueError(f"--src {src} holds both .tar files ({len(tars)}) and images "
                             f"({len(images)}); which is the data? Pass the tars as a glob "
                             f"('{os.path.join(src, '*.tar')}') or move them out of the folder")
        return "tar" if tars else "folder"
    if src.endswith(".json"):
        return "coco"
    if src.endswith(".tar") or any(c in src for c in "*?["):
        return "tar"
    if os.path.exists(src):
        raise ValueError(f"--src {src}: a file prepare does not read; expected {SOURCES}")
    raise FileNotFoundError(f"--src {src}: no such file or folder (expected {SOURCES})")


def _chunks(records, size, origin):
    return [WorkShard(f"{origin}[{i}:{i + len(part)}]", len(part),
                      lambda counts, part=part: iter(part), "\n".join(r.key for r in part))
            for i in range(0, len(records), size) for part in [records[i:i + size]]]


def _read_if_exists(path):
    """The caption file's bytes, or None when there is none. Other read errors (permissions,
    a symlink loop, a failing disk) propagate, for decode_caption to count."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):  # a folder named like a caption is none
        return None


def folder_shards(root, shard_size):
    """Every image under root (nested folders too), in sorted path order; its caption is the
    same path with .txt."""
    records = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            records.append(Record(os.path.relpath(path, root), functools.partial(Image.open, path),
                                  functools.partial(_read_if_exists,
                                                    os.path.join(dirpath, stem + ".txt"))))
    if not records:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return _chunks(records, shard_size, root)


def tar_shards(src):
    """One work shard per tar (img2dataset writes ~10k samples per tar). A folder means every
    .tar in it; a pattern is expanded with glob."""
    if os.path.isdir(src):
        paths = sorted(glob.glob(os.path.join(glob.escape(src), "*.tar")))
    else:
        paths = sorted(glob.glob(src))
    if not paths:
        raise FileNotFoundError(f"--src {src}: no .tar files")
    return [WorkShard(path, _img2dataset_count(path),
                      lambda counts, path=path: _tar_records(path, counts),
                      f"{path} {os.path.getsize(path)}") for path in paths]


def _img2dataset_count(tar_path):
    """img2dataset leaves NNNNN_stats.json next to NNNNN.tar; its count gives the progress bar
    a total. Without it the bar shows the rate only."""
    try:
        with open(tar_path[:-len(".tar")] + "_stats.json") as f:
            return int(json.load(f)["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tar_records(path, counts):
    """WebDataset grouping: consecutive members sharing a name up to the first dot of the
    basename form one sample (KEY.jpg, KEY.txt, KEY.json)."""
    tar_name = os.path.basename(path)
    group_key, files = None, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = os.path.split(member.name)
                stem, _, ext = base.partition(".")
                key = os.path.join(dirname, stem)
                if key != group_key and group_key is not None:
                    yield _tar_record(tar_name, group_key, files)
                    files = {}
                group_key = key
                files[ext.lower()] = tar.extractfile(member).read()
            # tarfile stops without a word when the file ends at or inside a header; a whole
            # archive ends with two zero blocks (1,024 bytes) after its last member
            if os.path.getsize(path) - tar.offset < 1024:
                raise EOFError("no end-of-archive blocks: the file was cut short")
    except (tarfile.TarError, EOFError, OSError) as e:
        counts["bad_tar"] += 1
        print(f"{path}: stopped reading after {group_key!r} ({type(e).__name__}: {e})")
        return  # the last group may be incomplete: drop it
    if group_key is not None:
        yield _tar_record(tar_name, group_key, files)


def _tar_record(tar_name, key, files):
    image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
    caption = files.get("txt")
    if caption is None and "json" in files:  # some writers keep the caption only in the json
        try:
            text, non_utf8 = files["json"].decode("utf-8"), False
        except UnicodeDecodeError:  # Windows-1252, as for a .txt caption
            text, non_utf8 = files["json"].decode("cp1252", errors="replace"), True
        try:
            caption = json.loads(text).get("caption")
        except (ValueError, AttributeError):  # not JSON, or not an object
            caption = None
        caption = caption if isinstance(caption, str) else None
        if caption is not None and non_utf8:  # as bytes, so that decode_caption counts it
            caption = caption.encode("cp1252", errors="replace")
    return Record(f"{tar_name}/{key}",
                  None if image is None else (lambda: Image.open(io.BytesIO(image))), caption)


def read_coco_captions(json_path, flag):
    """A COCO captions JSON -> ({image id: file name}, {image id: [(annotation id, caption)]})
    for the images that have a caption, each image's captions in annotation id order: its
    first caption is the one with the lowest id, whatever the order of the file. flag: the
    command-line option that named the file, for messages."""
    try:
        with open(json_path) as f:
            coco = json.load(f)
        captions = collections.defaultdict(list)
        for a in sorted(coco["annotations"], key=lambda a: a["id"]):
            caption = a["caption"]  # a null or non-text caption: a missing one (skipped)
            captions[a["image_id"]].append((a["id"], caption if isinstance(caption, str)
                                            else None))
        files = {im["id"]: im["file_name"] for im in coco["images"] if im["id"] in captions}
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {json_path}: no such file (COCO's captions file, "
                                f"annotations/captions_val2014.json in "
                                f"annotations_trainval2014.zip)") from None
    except ValueError as e:
        raise ValueError(f"{flag} {json_path}: not valid JSON ({e}); is the download "
                         f"complete?") from None
    except (KeyError, TypeError) as e:
        problem = f"no {e} key" if isinstance(e, KeyError) else e
        raise ValueError(f"{flag} {json_path}: not a COCO captions file (expected \"images\" "
                         f"with id and file_name, \"annotations\" with image_id, id and a "
                         f"caption string, as in annotations/captions_val2014.json; "
                         f"{problem})") from None
    return files, dict(captions)


def coco_shards(json_path, images_dir, which, shard_size):
    """COCO captions: one sample per image with its first caption (lowest annotation id), or
    one per caption (`which='all'`, in annotation id order). Images without a caption are
    left out."""
    files, captions = read_coco_captions(json_path, "--src")
    if images_dir is None:  # the usual layout: annotations/captions_X.json next to X/
        split = os.path.basename(json_path).removeprefix("captions_").removesuffix(".json")
        here = os.path.dirname(os.path.abspath(json_path))
        candidates = [os.path.join(here, split), os.path.join(os.path.dirname(here), split)]
        images_dir = next((c for c in candidates if os.path.isdir(c)), None)
        if images_dir is None:
            raise FileNotFoundError(f"{json_path}: cannot find its images (looked in "
                                    f"{' and '.join(candidates)}); pass --coco-images DIR")
    records = []
    for image_id in sorted(files):
        path = os.path.join(images_dir, files[image_id])
        for ann_id, caption in captions[image_id][:1 if which == "first" else None]:
            key = f"{image_id}" if which == "first" else f"{image_id}-{ann_id}"
            records.append(Record(key, lambda path=path: Image.open(path), caption))
    return _chunks(records, shard_size, json_path)


def demo_shards(n, seed, res, shard_size):
    records = [Record(f"shapes-{i:07d}",
                      lambda i=i: render_shapes(demo_attributes(seed, i), res),
                      lambda i=i: caption_of(demo_attributes(seed, i))) for i in range(n)]
    return _chunks(records, shard_size, f"demo(seed={seed})")


# ----------------------------------------------------------------------------------------
# one sample: decode, repair, resize; nothing here raises on bad input, it counts instead

CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def decode_caption(raw, counts):
    """bytes/str -> stripped str, or None when missing, unreadable or empty. UTF-16 with a
    byte-order mark (Windows Notepad's "Unicode") is read as such; other non-UTF-8 bytes as
    Windows-1252, the usual culprit (b'caf\\xe9' -> 'café'). Control characters (NULs, ...)
    are dropped."""
    if callable(raw):
        try:
            raw = raw()
        except OSError:  # permissions, a symlink loop, a failing disk
            counts["unreadable_caption"] += 1
            return None
    if raw is None:
        counts["missing_caption"] += 1
        return None
    if isinstance(raw, bytes):
        try:
            if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                raw = raw.decode("utf-16")
                counts["utf16_caption"] += 1
            else:
                raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            counts["non_utf8_caption"] += 1
            raw = raw.decode("cp1252", errors="replace")
    raw, removed = CONTROL_CHARACTERS.subn("", raw)
    if removed:
        counts["control_characters"] += 1
    text = raw.strip()
    if not text:
        counts["empty_caption"] += 1
        return None
    return text


def float_range(values):
    """The white level of a float image, which carries none: 1 if every value is at most 1
    (the usual convention), else 255 or 65535, the first that holds them."""
    top = float(np.nanmax(values)) if values.size else 0.0
    return next((white for white in (1.0, 255.0) if top <= white), 65535.0)


def to_rgb(img, counts):
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white. 16-bit and float
    values are scaled to 8 bits: PIL's own conversion clips 16-bit values above 255 to
    white and keeps floats in [0, 1] as 0 and 1, black."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        values = np.asarray(img, dtype=np.float64)                # (H, W)
        if img.mode == "F":
            counts["float_image"] += 1
            white = float_range(values)
        else:
            counts["high_bit_depth"] += 1
            white = 65535.0
        scaled = np.round(np.nan_to_num(values) * (255.0 / white)).clip(0, 255)
        grey = Image.fromarray(scaled.astype(np.uint8))
        key = img.info.get("transparency")  # a PNG's tRNS: one 16-bit grey value is clear
        if isinstance(key, int):
            alpha = np.where(values == key, 0, 255).astype(np.uint8)
            grey = Image.merge("LA", (grey, Image.fromarray(alpha)))
        img = grey
    if img.mode in ("P", "PA"):
        counts["palette"] += 1
    elif img.mode == "CMYK":
        counts["cmyk"] += 1
    elif img.mode in ("1", "L", "LA", "La"):
        counts["grayscale"] += 1
    elif img.mode not in ("RGB", "RGBA", "RGBa"):
        counts["other_mode"] += 1
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        counts["alpha_composited"] += 1
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


EXIF_ORIENTATION = 0x0112
MAX_ASPECT = 16  # longer side over shorter beyond which resize_center_crop resamples a box


def resize_center_crop(img, res):
    """Short side to `res` (bicubic), then the centre `res` x `res` square: torchvision's
    Resize(res) + CenterCrop(res), the paper's transform."""
    w, h = img.size
    if w <= h:
        size = (res, int(res * h / w))
    else:
        size = (int(res * w / h), res)
    left = int(round((size[0] - res) / 2.0))
    top = int(round((size[1] - res) / 2.0))
    if max(size) > MAX_ASPECT * res:
        # a strip (a 1 x 4,000 image would resize to 512 x 2,048,000: 3 GB): resample only
        # the square that survives the crop. PIL's box path differs from the whole resize in
        # the first row (by up to ~20 levels), so ordinary images take the exact path below
        sx, sy = w / size[0], h / size[1]
        box = (left * sx, top * sy, (left + res) * sx, (top + res) * sy)
        return img.resize((res, res), Image.BICUBIC, box=box)
    img = img.resize(size, Image.BICUBIC)
    return img.crop((left, top, left + res, top + res))


def to_unit_range(pixels):
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


Loaded = collections.namedtuple("Loaded", "key images caption counts")


def load_sample(record, resolutions, min_size=0):
    """Record -> Loaded with `images` one uint8 (res, res, 3) array per resolution, or None
    (then `counts` says why: exactly one skip reason per skipped record). Images whose short
    side is below `min_size` are skipped, not upscaled."""
    counts = collections.Counter()
    caption = decode_caption(record.caption, counts)
    if caption is None:  # checked first: no point decoding an image that will be dropped
        return Loaded(record.key, None, None, counts)
    if record.load_image is None:
        counts["missing_image"] += 1
        return Loaded(record.key, None, caption, counts)
    conversions = collections.Counter()  # kept only if the sample makes it
    try:
        img = record.load_image()
        if min(img.size) < min_size:  # known from the header: no need to decode it
            counts["too_small"] += 1
            return Loaded(record.key, None, caption, counts)
        img.load()  # truncated or corrupt files fail here, not at open
        if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # a phone photo, stored sideways
            conversions["exif_rotated"] += 1
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img, conversions)
        if min(img.size) < max(resolutions):
            conversions["upscaled"] += 1
        images = [np.asarray(resize_center_crop(img, r)) for r in resolutions]
    except FileNotFoundError:
        counts["missing_image"] += 1
        return Loaded(record.key, None, caption, counts)
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb errors)
        counts["unreadable_image"] += 1
        return Loaded(record.key, None, caption, counts)
    counts.update(conversions)
    return Loaded(record.key, images, caption, counts)


# ----------------------------------------------------------------------------------------
# encoders

def posterior_generator(seed, key, res):
    """The generator for one sample's VAE posterior noise: a function of (seed, sample key,
    resolution) alone, so latents do not depend on batch size, rank count or restarts."""
    digest = hashlib.sha256(f"{seed}/{res}/{key}".encode("utf-8", "surrogateescape")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class Encoders:
    """The VAE (None in pixel mode) and the text encoder, on one device."""

    def __init__(self, vae, clip, device, dtype):
        self.device, self.dtype = device, dtype
        try:
            self.vae = None if vae == "none" else load_vae(vae, device=device, dtype=dtype)
            self.text = load_text_encoder(clip, device=device, dtype=dtype)
        except FileNotFoundError as e:  # weights not downloaded yet, most often
            raise FileNotFoundError(f"{e}\nThe paper's encoders, downloaded once:\n"
                                    f"    {vae_lib.DOWNLOAD}\n    {text_lib.DOWNLOAD}\nthen give "
                                    f"--vae {vae_lib.DOWNLOADED} --clip "
                                    f"{text_lib.DOWNLOADED}") from None

    @torch.inference_mode()
    def images(self, pixels, keys, res, seed):
        """uint8 (N, res, res, 3) -> float16 (N, C, h, w): scaled VAE posterior samples, each
        with its own posterior_generator; or the pixels in [-1, 1]."""
        x = to_unit_range(pixels)                                       # (N, 3, res, res)
        if self.vae is None:
            return x.half().numpy()
        generators = [posterior_generator(seed, k, res) for k in keys]
        latents = self.vae.encode_to_scaled(x.to(self.device, self.dtype), generators)
        return latents.half().cpu().numpy()                             # (N, C, h, w)

    @torch.inference_mode()
    def captions(self, captions, counts):
        """str list -> float16 (N, 77, D); counts captions cut at 77 tokens."""
        counts["caption_truncated"] += len(self.text.truncated(captions))
        with warnings.catch_warnings():  # counted above instead of one warning per caption
            warnings.simplefilter("ignore")
            return self.text.encode(captions).half().cpu().numpy()


# ----------------------------------------------------------------------------------------
# output shards

def shard_name(i):
    return f"shard-{i:05d}"


def column_path(out, name, column):
    return os.path.join(out, f"{name}.{column}.npy")


def atomic_write(path, write):
    """write(f) to a private temporary name, then rename: readers and restarted runs see the
    whole file or none of it."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # pids repeat across hosts
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, an interrupt: leave no half file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    sync_folder(os.path.dirname(path) or ".")


def sync_folder(folder):
    """fsync a folder, which makes the renames in it survive a power cut (the file's own
    fsync does not cover its name). Best effort: the file itself is already whole and in
    place, so a folder that cannot be opened or synced (Windows, some network file systems)
    is left to the file system's own guarantees rather than failing the write."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj):
    """obj as indented JSON, written atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_shard(out, shard_id, columns, keys, captions, origin, counts, skipped=()):
    """Column arrays (n rows each) first, the manifest last: a shard is complete exactly when
    its manifest exists. skipped: [key, reason] of the records left out."""
    name = shard_name(shard_id)
    for stale in glob.glob(os.path.join(out, f"{name}.*.tmp-*")):  # left by a killed run
        os.remove(stale)
    for column, array in columns.items():
        assert len(array) == len(keys), (column, array.shape, len(keys))
        atomic_write(column_path(out, name, column), lambda f, a=array: np.save(f, a))
    write_json(os.path.join(out, name + ".json"),
               {"samples": len(keys), "origin": origin, "keys": keys, "captions": captions,
                "columns": sorted(columns), "counts": dict(sorted(counts.items())),
                "skipped": list(skipped)})


def read_manifest(out, shard_id):
    """The manifest of a complete shard, or None."""
    try:
        with open(os.path.join(out, shard_name(shard_id) + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


SKIPPED_NAMED = 10  # skipped records named per reason in summary.json
SKIP_REASONS = ("missing_caption", "empty_caption", "unreadable_caption", "missing_image",
                "unreadable_image", "too_small",  # too_small: below --min-size
                "bad_tar")  # bad_tar: a tar that could not be read to its end


def finish_index(out, num_shards, info):
    """Write index.json and summary.json if every shard is complete; returns whether it did.
    Every rank calls this when it is done, so the last one to finish writes the index
    (identical content, atomic rename: two ranks racing do no harm)."""
    manifests = [read_manifest(out, i) for i in range(num_shards)]
    if any(m is None for m in manifests):
        return False
    columns = {}
    for i, m in enumerate(manifests):
        if m["samples"]:
            for column in m["columns"]:
                a = np.load(column_path(out, shard_name(i), column), mmap_mode="r")
                columns[column] = {"dtype": str(a.dtype), "shape": list(a.shape[1:])}
            break
    counts = collections.Counter()
    for m in manifests:
        counts.update(m["counts"])
    num_samples = sum(m["samples"] for m in manifests)
    summary = {"samples_written": num_samples, "records_seen": counts.pop("seen", 0),
               "skipped": {k: counts[k] for k in SKIP_REASONS if counts[k]},
               "converted": {k: v for k, v in sorted(counts.items())
                             if k not in SKIP_REASONS and v}}
    named = collections.defaultdict(list)  # the first few of each reason; manifests: all
    for m in manifests:
        for key, reason in m.get("skipped", []):  # folders prepared before had no list
            if len(named[reason]) < SKIPPED_NAMED:
                named[reason].append(key)
    if named:
        summary["skipped_first"] = dict(sorted(named.items()))
        summary["skipped_all"] = "the \"skipped\" list of each shard-NNNNN.json"
    write_json(os.path.join(out, "summary.json"), summary)  # also when it explains a failure
    if not columns:
        raise ValueError(f"{out}: every one of the {summary['records_seen']} records was "
                         f"skipped ({summary['skipped']}); summary.json has the counts")
    write_json(os.path.join(out, "index.json"),
               {"format": FORMAT, "version": FORMAT_VERSION, "num_samples": num_samples,
                "columns": columns,
                "shards": [{"name": shard_name(i), "samples": m["samples"]}
                           for i, m in enumerate(manifests)], **info})
    return True


# ----------------------------------------------------------------------------------------
# prepare

@dataclass
class PrepareConfig:
    src: str                        # folder, .tar / folder of tars / glob, COCO .json, 'demo'
    out: str
    res: list = field(default_factory=lambda: [256])
    vae: str = "none"               # VAE folder/file for vae.load_vae, or 'none' for pixels
    clip: str = DEFAULT_CLIP        # an OpenCLIP hub id, a local file, or 'tiny-random'
    format: str | None = None       # detected from src when None
    batch_size: int = 64
    device: str | None = None       # cuda:LOCAL_RANK when there is a GPU, else cpu
    dtype: str | None = None        # bfloat16 on GPU, float32 on CPU
    shard_size: int = 2000          # samples per output shard (tar inputs: one shard per tar)
    min_size: int = 0               # skip images whose short side is smaller (0: upscale them)
    seed: int = 0                   # VAE posterior noise (and the demo set's content)
    workers: int = 8                # image decoding threads
    coco_images: str | None = None
    coco_captions: str = "first"    # or 'all'
    n: int = 2000                   # size of the demo set


def work_shards(cfg):
    fmt = cfg.format or detect_format(cfg.src)
    if fmt == "folder":
        return fmt, folder_shards(cfg.src, cfg.shard_size)
    if fmt == "tar":
        return fmt, tar_shards(cfg.src)
    if fmt == "coco":
        return fmt, coco_shards(cfg.src, cfg.coco_images, cfg.coco_captions, cfg.shard_size)
    if fmt == "demo":
        return fmt, demo_shards(cfg.n, cfg.seed, max(cfg.res), cfg.shard_size)
    raise ValueError(f"--format {fmt!r}: choose from {SOURCE_FORMATS}")


def _bounded_map(pool, fn, items, window):
    """pool.map that keeps at most `window` results in flight, so decoded images do not pile
    up in memory while the encoders are slower than the decoders."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _settings(cfg, fmt, shards, dtype):
    """What decides the content of the shards; a restarted run must match it."""
    return {"format": fmt, "src": cfg.src if fmt == "demo" else os.path.abspath(cfg.src),
            "resolutions": sorted(cfg.res), "vae": cfg.vae, "clip": cfg.clip, "seed": cfg.seed,
            "shard_size": cfg.shard_size, "coco_captions": cfg.coco_captions,
            "n": cfg.n if fmt == "demo" else None, "num_shards": len(shards),
            "dtype": dtype,
            # only when set, so that folders prepared before --min-size existed still resume
            **({"min_size": cfg.min_size} if cfg.min_size else {}),
            "inputs_sha256": hashlib.sha256(
                "\n".join(s.fingerprint for s in shards).encode("utf-8", "surrogateescape")
            ).hexdigest()}


def settings_changes(old, new):
    """What differs between two settings dicts, as 'key: old then, new now' lines."""
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now"
            for k in {**old, **new} if old.get(k) != new.get(k)]


def _check_settings(out, settings):
    """Refuse to add to shards made with other settings. A prepare.json without any shard
    (a run stopped before its first one, by a mistyped --vae, say) binds nothing."""
    path = os.path.join(out, "prepare.json")
    if os.path.exists(path) and glob.glob(os.path.join(out, "shard-*.json")):
        with open(path) as f:
            old = json.load(f)
        diff = settings_changes(old, settings)
        if diff:
            raise ValueError(f"{out} holds shards prepared with other settings or from a "
                             f"changed source ({'; '.join(diff)}): use a new --out, or "
                             f"delete {out} to start over")
    else:
        write_json(path, settings)


def prepare_shard(shard_id, shard, cfg, encoders, pool, progress):
    resolutions = sorted(cfg.res)
    counts = collections.Counter()
    keys, captions = [], []
    parts = collections.defaultdict(list)

    def encode(batch):
        if not batch:
            return
        batch_keys = [b.key for b in batch]
        for i, res in enumerate(resolutions):
            pixels = np.stack([b.images[i] for b in batch])             # (N, res, res, 3)
            column = f"latents_{res}" if encoders.vae is not None else f"images_{res}"
            parts[column].append(encoders.images(pixels, batch_keys, res, cfg.seed))
        parts[CAPTION_COLUMN].append(encoders.captions([b.caption for b in batch], counts))
        keys.extend(batch_keys)
        captions.extend(b.caption for b in batch)

    batch, skipped = [], []
    loaded = _bounded_map(pool, lambda r: load_sample(r, resolutions, cfg.min_size),
                          shard.records(counts),
                          window=2 * cfg.batch_size)
    for sample in loaded:
        progress.update(1)
        counts["seen"] += 1
        counts.update(sample.counts)
        if sample.images is not None:
            batch.append(sample)
        else:  # named in the manifest, so that a skipped image can be found and mended
            skipped.append([sample.key, next(r for r in SKIP_REASONS if sample.counts[r])])
        if len(batch) == cfg.batch_size:
            encode(batch)
            batch = []
    encode(batch)
    # written even when every record was bad: an empty shard is complete, reruns skip it
    write_shard(cfg.out, shard_id, {c: np.concatenate(p) for c, p in parts.items()}, keys,
                captions, shard.origin, counts, skipped)


ProcessEnv = collections.namedtuple("ProcessEnv", "rank world_size device")


def process_env(device=None):
    """This process's rank, world size and device, from torchrun's environment (RANK,
    WORLD_SIZE, LOCAL_RANK; 0, 1 and 0 without torchrun). device None means cuda when there
    is a GPU, else cpu; a bare 'cuda' means this rank's own GPU, cuda:LOCAL_RANK, not GPU 0
    for every rank; any other device is kept as given."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return ProcessEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      device)


def prepare(cfg, rank=None, world_size=None):
    """Prepare this rank's shards (shard i belongs to rank i % world_size), skipping complete
    ones; the last rank to finish writes the index. Returns the summary dict when this call
    wrote the index, else None."""
    env = process_env(cfg.device)
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    device = env.device
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    if cfg.coco_captions not in ("first", "all"):
        raise ValueError(f"--coco-captions {cfg.coco_captions!r}: 'first' or 'all'")
    for flag, value in [("--batch-size", cfg.batch_size), ("--shard-size", cfg.shard_size),
                        ("--workers", cfg.workers), ("--n", cfg.n),
                        *[("--res", r) for r in cfg.res]]:
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    if cfg.min_size < 0:
        raise ValueError(f"--min-size {cfg.min_size}: must be 0 (keep every image) or more")
    if cfg.vae != "none" and any(r % 8 for r in cfg.res):
        raise ValueError(f"--res {' '.join(map(str, cfg.res))}: with a VAE every resolution "
                         f"must be a multiple of 8 (its latents are res / 8 on a side)")
    fmt, shards = work_shards(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    settings = _settings(cfg, fmt, shards, str(dtype).removeprefix("torch."))
    _check_settings(cfg.out, settings)
    mine = [i for i in range(rank, len(shards), world_size)]
    todo = [i for i in mine if read_manifest(cfg.out, i) is None]
    print(f"rank {rank}/{world_size}: {len(shards)} shards from {fmt} input {cfg.src}; "
          f"{len(mine)} are this rank's, {len(mine) - len(todo)} already done")
    if todo:
        encoders = Encoders(cfg.vae, cfg.clip, device, dtype)
        sizes = [shards[i].size for i in todo]
        total = None if None in sizes else sum(sizes)
        with ThreadPoolExecutor(cfg.workers) as pool, tqdm(
                total=total, unit="img", desc=f"rank {rank}", disable=rank != 0,
                smoothing=0.05, dynamic_ncols=True) as progress:
            for i in todo:
                prepare_shard(i, shards[i], cfg, encoders, pool, progress)
    info = {"resolutions": sorted(cfg.res), "pixel_space": cfg.vae == "none",
            "vae": recorded_path(cfg.vae), "clip": recorded_path(cfg.clip), "seed": cfg.seed,
            "min_size": cfg.min_size,
            "source": settings["src"], "source_format": fmt}
    if cfg.vae != "none":
        vae_cfg = (encoders.vae if todo else load_vae(cfg.vae)).config
        info.update(scaling_factor=vae_cfg.scaling_factor, shift_factor=vae_cfg.shift_factor)
    if not finish_index(cfg.out, len(shards), info):
        print(f"rank {rank}: done; another rank is still working, the last one to finish "
              f"writes {os.path.join(cfg.out, 'index.json')}")
        return None
    with open(os.path.join(cfg.out, "summary.json")) as f:
        summary = json.load(f)
    print(f"wrote {os.path.join(cfg.out, 'index.json')}: {json.dumps(summary)}")
    return summary


# ----------------------------------------------------------------------------------------
# reading shards: ours and MosaicML MDS, the same interface

def _tensor(array):
    """A torch view of a read-only memory map (torch warns about non-writable arrays; these
    are only ever read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class NpyShard:
    """One of our shards: a memory-mapped .npy per column, opened on first use."""

    def __init__(self, root, name, num_samples):
        self.root, self.name, self.num_samples = root, name, num_samples
        self._columns = {}
        self._manifest = None

    def check(self, columns):
        """Each column file against index.json ({column: (dtype, row shape)}): a missing,
        cut short or replaced file is reported when the data set opens, not when a batch
        first draws from it hours into a run."""
        for column, (dtype, shape) in columns.items():
            path = column_path(self.root, self.name, column)
            try:
                array = np.load(path, mmap_mode="r")  # reads the header, maps the whole length
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: cannot be read ({e}); the shard is missing or "
                                 f"damaged: delete {self.name}.* and rerun the same "
                                 f"`python data.py prepare` to rewrite it") from None
            expected = (self.num_samples, *shape)
            if array.shape != expected or str(array.dtype) != dtype:
                raise ValueError(f"{path}: {array.dtype} {list(array.shape)}, index.json says "
                                 f"{dtype} {list(expected)}; the shard was changed after "
                                 f"indexing")

    def column(self, column):
        if column not in self._columns:
            # checked against index.json when the data set opened (check)
            array = np.load(column_path(self.root, self.name, column), mmap_mode="r")
            self._columns[column] = _tensor(array)
        return self._columns[column]

    def gather(self, column, local_ids, out):
        """Rows local_ids of `column` into out (float32), converting on the way. A row loop
        of copy_ does gather and fp16->fp32 in one pass; index_select then a cast is two."""
        rows = self.column(column)
        for row, i in enumerate(local_ids.tolist()):
            out[row].copy_(rows[i])

    def caption(self, i):
        if self._manifest is None:
            with open(os.path.join(self.root, self.name + ".json")) as f:
                self._manifest = json.load(f)
        return self._manifest["captions"][i]


MDS_COLUMNS = {CAPTION_COLUMN: "caption_latents"}  # our column name -> the paper's


class MDSShard:
    """One uncompressed MosaicML MDS shard (streaming's format 'mds', index version 2):
    uint32 sample count n, uint32 offsets[n + 1] (absolute byte positions, end included), the
    shard's config JSON, then the samples. A sample is a uint32 size for each variable-size
    column, in column order, then each column's bytes in column order (columns sorted by
    name). The paper writes caption (str) and caption_latents, latents_256, latents_512
    (bytes: raw float16). `shapes` (ours -> (C, h, w)) is filled in by LatentDataset."""

    def __init__(self, root, info, shapes):
        basename = info.get("raw_data", {}).get("basename")
        if info.get("format") != "mds" or info.get("version") != 2:
            raise ValueError(f"{root}: shard {basename} is format {info.get('format')!r} "
                             f"version {info.get('version')}; only MDS version 2 is readable")
        if info.get("compression"):
            raise ValueError(f"{root}: shard {info['zip_data']['basename']} is compressed "
                             f"({info['compression']}), which this reader does not support: "
                             f"rewrite the shards with MDSWriter(compression=None), or "
                             f"decompress each to its raw_data basename and set compression "
                             f"and zip_data to null in index.json")
        self.path = os.path.join(root, basename)
        self.num_samples = info["samples"]
        self.names = info["column_names"]
        self.encodings = dict(zip(self.names, info["column_encodings"]))
        self.fixed_sizes = dict(zip(self.names, info["column_sizes"]))
        self.shapes = shapes
        self._data = None  # uint8 memory map, opened on first use
        self._starts, self._sizes = {}, {}

    def check(self):
        """The file's length against its own last offset, reading 8 bytes: a missing or cut
        short shard (a partial download) is reported when the data set opens."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = int(np.frombuffer(f.read(4), np.uint32)[0]) if size >= 4 else None
                if n is not None and size >= 4 * (n + 2):
                    f.seek(4 * (n + 1))
                    end = int(np.frombuffer(f.read(4), np.uint32)[0])
                else:
                    end = None
        except OSError as e:
            raise ValueError(f"{self.path}: cannot be read ({e}); download the shard "
                             f"again") from None
        if end != size:
            raise ValueError(f"{self.path}: {size:,} bytes, but its header says "
                             f"{'more' if end is None else f'{end:,}'}: the file is cut short "
                             f"or not an MDS shard; download it again")

    def _open(self):
        if self._data is not None:
            return
        data = np.memmap(self.path, np.uint8, mode="r")
        n = int(data[:4].view(np.uint32)[0])
        if n != self.num_samples:
            raise ValueError(f"{self.path}: holds {n} samples, index.json says "
                             f"{self.num_samples}")
        offsets = data[4:4 * (n + 2)].view(np.uint32).astype(np.int64)  # (n + 1,)
        variable = [c for c in self.names if not self.fixed_sizes[c]]
        # every sample's size header at once: (n, len(variable)) uint32
        header = np.ascontiguousarray(data[offsets[:-1, None] + np.arange(4 * len(variable))])
        sizes = header.view(np.uint32).astype(np.int64).reshape(n, len(variable))
        start = offsets[:-1] + 4 * len(variable)
        for c in self.names:
            size = (sizes[:, variable.index(c)] if c in variable
                    else np.full(n, self.fixed_sizes[c], np.int64))
            self._starts[c], self._sizes[c] = start, size
            start = start + size
        if not np.array_equal(start, offsets[1:]):
            raise ValueError(f"{self.path}: sample sizes do not add up to the offsets; "
                             f"the file is damaged or not an MDS shard")
        # float16 views at byte phase 0 and 1: a row after a str column can start at an odd
        # byte, and torch cannot view an odd offset as float16
        self._halves = [_tensor(data[p:p + 2 * ((len(data) - p) // 2)].view(np.float16))
                        for p in (0, 1)]
        self._data = data

    def row_bytes(self, mds_column):
        """Bytes per row of a tensor column (all rows must be equal)."""
        self._open()
        sizes = self._sizes[mds_column]
        if (sizes != sizes[0]).any():
            raise ValueError(f"{self.path}: column {mds_column} has rows of different sizes "
                             f"({sizes.min()} to {sizes.max()} bytes)")
        return int(sizes[0])

    def gather(self, column, local_ids, out):
        mds_column = MDS_COLUMNS.get(column, column)
        self._open()
        shape = self.shapes[column]
        count = int(np.prod(shape))
        if self.row_bytes(mds_column) != 2 * count:
            raise ValueError(f"{self.path}: {mds_column} rows are "
                             f"{self.row_bytes(mds_column)} bytes, not float16 {shape}")
        for row, s in enumerate(self._starts[mds_column][local_ids].tolist()):
            half = self._halves[s % 2][s // 2:s // 2 + count]
            out[row].copy_(half.view(shape))

    def caption(self, i):
        self._open()
        s, n = self._starts["caption"][i], self._sizes["caption"][i]
        return bytes(self._data[s:s + n]).decode("utf-8")

    def infer_shapes(self):
        """Our columns and shapes from this shard's first row sizes: caption_latents is
        (77, D), latents_<res> is (C, res/8, res/8) (the paper's f8 VAEs)."""
        shapes = {}
        for name in self.names:
            if name != "caption_latents" and not name.startswith("latents_"):
                continue
            encoding = self.encodings[name]
            if encoding.startswith("ndarray:float16:"):
                shape = tuple(int(d) for d in encoding.split(":")[2].split(","))
            elif encoding == "bytes":
                values = self.row_bytes(name) // 2
                if name == "caption_latents":
                    shape = (77, values // 77)
                else:
                    side = int(name.removeprefix("latents_")) // 8
                    shape = (values // (side * side), side, side)
                if int(np.prod(shape)) != values:
                    raise ValueError(f"{self.path}: column {name} has {values} float16 "
                                     f"values per row, which is not a {shape} array")
            else:
                raise ValueError(f"{self.path}: column {name} has encoding {encoding!r}; "
                                 f"tensor columns must be 'bytes' (raw float16, as the "
                                 f"paper's precompute.py writes) or 'ndarray:float16:<shape>'")
            shapes[CAPTION_COLUMN if name == "caption_latents" else name] = shape
        return shapes


class LatentDataset:
    """One prepared directory, ours or MDS: random access by global sample index.
    `columns` maps column name -> per-row shape."""

    def __init__(self, path):
        index_path = os.path.join(path, "index.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such data folder (under {os.getcwd()}); is "
                                    f"the path right?")
        if not os.path.exists(index_path):
            hint = ""
            if glob.glob(os.path.join(path, "*", "index.json")):
                hint = (" It has sub-folders with an index.json each (the per-process output "
                        "of the paper's precompute.py?): merge them with "
                        "streaming.base.util.merge_index, or list each sub-folder as a source.")
            elif glob.glob(os.path.join(path, "shard-*.json")):
                hint = (" It has shard manifests, so preparation is still running or was "
                        "interrupted: rerun the same `python data.py prepare` to finish it.")
            raise FileNotFoundError(
                f"{path}: no index.json, so this is not a prepared dataset. Prepare one with "
                f"`python data.py prepare --src IMAGES --out {path} ...` (or `python data.py "
                f"demo --out {path}`), or point at a MosaicML MDS folder.{hint}")
        try:
            with open(index_path) as f:
                index = json.load(f)
        except ValueError as e:
            raise ValueError(f"{index_path}: not valid JSON ({e}); the file is damaged: "
                             f"rerun the `python data.py prepare` that made it (it rewrites "
                             f"the index from the shards), or download it again") from None
        self.path = path
        self.info = {}  # the index's metadata (encoders, resolutions, ...); MDS has none
        if index.get("format") == FORMAT:
            self.kind = "npy"
            self.info = {k: v for k, v in index.items() if k not in ("shards", "columns")}
            shards = [NpyShard(path, s["name"], s["samples"]) for s in index["shards"]]
            self.columns = {c: tuple(v["shape"]) for c, v in index["columns"].items()}
        elif index.get("version") == 2 and index.get("shards"):
            self.kind = "mds"
            self.columns = {}
            shards = [MDSShard(path, s, self.columns) for s in index["shards"]]
        else:
            raise ValueError(f"{index_path}: neither a {FORMAT} index nor a MosaicML MDS "
                             f"(version 2) index")
        self.shards = [s for s in shards if s.num_samples > 0]
        if not self.shards:
            raise ValueError(f"{path}: the index lists no samples")
        if self.kind == "mds":
            for shard in self.shards:
                shard.check()
            self.columns.update(self.shards[0].infer_shapes())
        else:
            expected = {c: (v["dtype"], tuple(v["shape"])) for c, v in index["columns"].items()}
            for shard in self.shards:
                shard.check(expected)
        self.offsets = np.cumsum([0] + [s.num_samples for s in self.shards])
        self.num_samples = int(self.offsets[-1])

    def image_column(self, resolution):
        for column in (f"latents_{resolution}", f"images_{resolution}"):
            if column in self.columns:
                return column
        have = sorted(c for c in self.columns if c != CAPTION_COLUMN)
        raise ValueError(f"{self.path}: no latents at resolution {resolution} (it has "
                         f"{', '.join(have) or 'no image columns'}); train at one of those "
                         f"resolutions, or prepare this one with `python data.py prepare "
                         f"... --res {resolution}`")

    def gather(self, column, ids, out):
        """Rows `ids` (sorted) of `column` into the float32 tensor out [len(ids), *shape],
        one shard at a time."""
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        bounds = np.searchsorted(shard_of, np.arange(len(self.shards) + 1))
        for s in np.unique(shard_of):
            a, b = bounds[s], bounds[s + 1]
            self.shards[s].gather(column, ids[a:b] - self.offsets[s], out[a:b])

    def caption(self, i):
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.shards[s].caption(int(i - self.offsets[s]))


def data_info(sources, num_prompts=8):
    """What training and sampling need to know about prepared data: the first source's index
    metadata (vae, clip, resolutions, scaling_factor, ...; nothing for MDS, which does not
    record its encoders) and `sample_prompts`, captions spread evenly over it."""
    dataset = LatentDataset(parse_sources(sources)[0][0])
    picks = np.linspace(0, dataset.num_samples - 1, min(num_prompts, dataset.num_samples))
    return {**dataset.info, "sample_prompts": [dataset.caption(int(i)) for i in picks]}


def ensure_demo_data(out, master=True, res=32, n=PrepareConfig.n, seed=0):
    """The built-in shapes set in pixel space with tiny-random caption features, prepared in
    `out` unless it is there already; returns out. Only the master prepares: other ranks
    must wait (e.g. at a barrier) before reading it."""
    if master and not os.path.exists(os.path.join(out, "index.json")):
        prepare(PrepareConfig(src="demo", out=out, res=[res], vae="none", clip=TINY_RANDOM,
                              format="demo", n=n, seed=seed), rank=0, world_size=1)
    return out


# ----------------------------------------------------------------------------------------
# the training loader

def absolute_sources(sources):
    """The same sources with every folder absolute, as a run records them: its checkpoints
    then find their data from any working directory."""
    return ",".join(os.path.abspath(path) + ("" if weight == 1 else f":{weight!r}")
                    for path, weight in parse_sources(sources))


def recorded_path(name):
    """A local file or folder as an absolute path, for the records a later command reads
    from elsewhere; hub ids and names such as 'none' as they are."""
    return os.path.abspath(name) if name and os.path.exists(name) else name


def parse_sources(sources):
    """'dirA:0.6,dirB:0.4' (weights optional, default 1) or [(path, weight)] or [path]."""
    if isinstance(sources, str):
        parsed = []
        for part in filter(None, (p.strip() for p in sources.split(","))):
            path, _, weight = part.rpartition(":")
            try:
                parsed.append((path, float(weight)) if path else (part, 1.0))
            except ValueError:  # the colon belongs to the path
                parsed.append((part, 1.0))
        sources = parsed
    sources = [(s, 1.0) if isinstance(s, str) else (s[0], float(s[1])) for s in sources]
    if not sources or any(w <= 0 for _, w in sources):
        raise ValueError(f"sources {sources!r}: need at least one path, and weights > 0")
    return sources


class _BufferPool:
    """Reuses batch memory once nothing refers to a batch any more: a fresh 650 MB
    allocation (2048 x 77 x 1024 float32) costs more in page faults than filling it."""

    def __init__(self, keep):
        self.keep = keep
        self.free = collections.defaultdict(list)
        self.lock = threading.Lock()

    def tensor(self, shape, pin_memory):
        if pin_memory:  # torch's pinned allocator caches blocks itself, and knows about streams
            return torch.empty(shape, pin_memory=True)
        with self.lock:
            base = self.free[shape].pop() if self.free[shape] else None
        if base is None:
            base = np.empty(shape, np.float32)
        view = base[...]  # the tensor keeps this view alive; when it dies, base comes back
        weakref.finalize(view, self._release, shape, base)
        return torch.from_numpy(view)

    def _release(self, shape, base):
        with self.lock:
            if len(self.free[shape]) < self.keep:
                self.free[shape].append(base)


class _Plan:
    """Which samples each batch holds: a pure function of (state, seed, rank), so a restored
    state gives the same batches.

    Every source is an endless stream of samples, one fresh permutation per epoch from
    (seed, source, epoch). Batches are cut from these streams in one global sequence; global
    batch g's per-source counts come from a multinomial seeded by g. Rank r of W reads
    global batches r, r + W, r + 2W, ...: so W processes together read exactly what one
    process reads in W successive micro-batches, and a global batch of B x W samples is the
    same whatever W is. State: the next global batch index of rank 0 and, per source, the
    stream position before it; identical on every rank."""

    def __init__(self, sizes, weights, batch_size, rank, world_size, seed, caption_drop_prob):
        self.sizes, self.batch_size = sizes, batch_size
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.caption_drop_prob = caption_drop_prob
        self._orders = {}

    def order(self, k, epoch):
        """Source k's permutation for that epoch (the last two are cached)."""
        if (k, epoch) not in self._orders:
            perm = np.random.default_rng([self.seed, k, epoch]).permutation(self.sizes[k])
            self._orders = {key: v for key, v in self._orders.items()
                            if key[0] != k or key[1] == epoch - 1}
            self._orders[k, epoch] = perm
        return self._orders[k, epoch]

    def counts(self, g):
        return np.random.default_rng([self.seed, 1, g]).multinomial(self.batch_size, self.weights)

    def take(self, k, start, count):
        """Samples [start, start + count) of source k's stream."""
        parts = [np.zeros(0, np.int64)]
        while count > 0:
            epoch, offset = divmod(start, self.sizes[k])
            part = self.order(k, epoch)[offset:offset + count]
            parts.append(part)
            start, count = start + len(part), count - len(part)
        return np.concatenate(parts)

    def next(self, state):
        """state -> (sorted ids per source, caption drop mask [B], next state)."""
        g0, consumed = state["batch"], list(state["consumed"])
        counts = [self.counts(g0 + j) for j in range(self.world_size)]
        start = np.sum([np.zeros(len(self.sizes), np.int64)] + counts[:self.rank], axis=0)
        ids = [np.sort(self.take(k, consumed[k] + int(start[k]), int(c)))
               for k, c in enumerate(counts[self.rank])]
        total = np.sum(counts, axis=0)
        drop = (np.random.default_rng([self.seed, 2, g0 + self.rank]).random(self.batch_size)
                < self.caption_drop_prob)
        return ids, drop, {"batch": g0 + self.world_size,
                           "consumed": [c + int(t) for c, t in zip(consumed, total)]}


def _read_batch(datasets, columns, latent_shape, caption_shape, pool, pin_memory, ids, drop):
    """Sorted ids per source -> the batch dict, captions zeroed where drop is set."""
    n = len(drop)
    latents = pool.tensor((n, *latent_shape), pin_memory)               # (B, C, h, w)
    captions = pool.tensor((n, *caption_shape), pin_memory)             # (B, 77, D)
    at = 0
    for dataset, column, source_ids in zip(datasets, columns, ids):
        dataset.gather(column, source_ids, latents[at:at + len(source_ids)])
        dataset.gather(CAPTION_COLUMN, source_ids, captions[at:at + len(source_ids)])
        at += len(source_ids)
    # index_fill_ with row numbers: a boolean-mask assignment is 10x slower at this size
    captions.index_fill_(0, torch.from_numpy(np.flatnonzero(drop)), 0.0)
    return {"latents": latents, "captions": captions}


_PREFETCH_THREADS = weakref.WeakKeyDictionary()  # live prefetch thread -> its stop event


@atexit.register
def _stop_prefetch_threads():
    """A daemon thread still inside a torch op when the interpreter tears down aborts the
    process: stop them first."""
    for thread, stop in list(_PREFETCH_THREADS.items()):
        stop.set()
        thread.join()


def _prefetch(plan, read, state, out_queue, stop):
    """Background thread: makes batches ahead. Holds no reference to the loader, so a dropped
    loader is collected, and its __del__ stops this thread."""
    def put(item):  # gives up when stopped, so close() never waits on a full queue
        while not stop.is_set():
            try:
                return out_queue.put(item, timeout=0.1)
            except queue.Full:
                pass

    try:
        while not stop.is_set():
            ids, drop, state = plan.next(state)
            put((read(ids, drop), state))
    except BaseException as e:  # handed to the consumer, which re-raises it
        put((e, None))


class LatentLoader:
    """Endless batches of (latents, caption features) from one or more prepared datasets
    (ours or MDS), memory-mapped.

    sources: "dirA:0.6,dirB:0.4" or [(path, weight)]; each batch draws its per-source counts
    from a multinomial with these weights. resolution picks the latents_<res> column (or
    images_<res> in pixel space). Every epoch of every source is a fresh permutation from
    (seed, source, epoch); rank r reads global batches r, r + W, ... of one sequence (see
    _Plan), so ranks are disjoint. Captions are zeroed with probability caption_drop_prob,
    decided by (seed, global batch number), so a restored state repeats them exactly.

    batch = next(loader): {"latents": float32 (B, C, h, w), "captions": float32 (B, 77, D)}.
    Batches are made `prefetch` ahead in a background thread (0: in the caller's thread);
    pin_memory=True returns pinned tensors for non_blocking copies to the GPU. Within a batch
    samples are grouped by source and sorted by position on disk, which helps reads: which
    samples are in a batch is random, their order within it is not.
    """

    def __init__(self, sources, resolution, batch_size, rank=0, world_size=1, seed=0,
                 caption_drop_prob=0.1, prefetch=2, pin_memory=False):
        specs = parse_sources(sources)
        self.sources = [path for path, _ in specs]
        self.datasets = [LatentDataset(path) for path in self.sources]
        self.columns = [d.image_column(resolution) for d in self.datasets]
        for d in self.datasets:
            if CAPTION_COLUMN not in d.columns:
                raise ValueError(f"{d.path}: no caption features column ({CAPTION_COLUMN} "
                                 f"or MDS caption_latents)")
        shapes = {(d.columns[c], d.columns[CAPTION_COLUMN])
                  for d, c in zip(self.datasets, self.columns)}
        if len(shapes) > 1:
            listing = "; ".join(f"{d.path}: {c} {d.columns[c]}, captions "
                                f"{d.columns[CAPTION_COLUMN]}"
                                for d, c in zip(self.datasets, self.columns))
            raise ValueError(f"sources do not agree on latent or caption shapes ({listing}). "
                             f"Mixed sources must come from the same VAE (channels), "
                             f"resolution and text encoder (width): re-prepare the odd one "
                             f"out with the others' --vae and --clip")
        (self.latent_shape, self.caption_shape), = shapes
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        for d in self.datasets:
            if d.num_samples < world_size:
                raise ValueError(f"{d.path}: {d.num_samples} samples cannot be split over "
                                 f"{world_size} ranks")
        self.world_size, self.seed = world_size, seed
        self.num_samples = [d.num_samples for d in self.datasets]
        self.weights = [w for _, w in specs]
        self._plan = _Plan(self.num_samples, self.weights, batch_size, rank, world_size, seed,
                           caption_drop_prob)
        # batches alive at once: `prefetch` queued, one being made, and up to two held by
        # the caller (the previous one is still referenced while next() runs)
        self._read = functools.partial(_read_batch, self.datasets, self.columns,
                                       self.latent_shape, self.caption_shape,
                                       _BufferPool(keep=prefetch + 3), pin_memory)
        self.prefetch = prefetch
        self._state = {"batch": 0, "consumed": [0] * len(specs)}
        self._thread = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.prefetch == 0:
            ids, drop, state = self._plan.next(self._state)
            batch = self._read(ids, drop)
        else:
            if self._thread is None:
                self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
                self._thread = threading.Thread(
                    target=_prefetch, daemon=True, name="LatentLoader-prefetch",
                    args=(self._plan, self._read, self._state, self._queue, self._stop))
                _PREFETCH_THREADS[self._thread] = self._stop
                self._thread.start()
            batch, state = self._queue.get()
            if isinstance(batch, BaseException):
                self._thread = None
                raise batch
        self._state = state
        return batch

    def close(self):
        """Stop the prefetch thread and drop the batches it made ahead."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __del__(self):
        if getattr(self, "_thread", None) is not None:
            self._stop.set()

    def state_dict(self):
        """Plain types: the position after the last batch returned (prefetched batches do not
        count). Identical on every rank, and valid for any world size."""
        return {"version": 2, "batch": self._state["batch"],
                "consumed": list(self._state["consumed"]), "seed": self.seed,
                "world_size": self.world_size, "sources": list(self.sources),
                "num_samples": list(self.num_samples)}

    def load_state_dict(self, state):
        """After this, next() gives exactly the batches the saved loader would have given.
        The position is global, so resuming on another number of ranks continues the same
        sample stream."""
        if state.get("version") != 2 or len(state["consumed"]) != len(self.sources):
            raise ValueError(f"loader state for sources {state.get('sources')} does not fit "
                             f"this loader's sources {self.sources}")
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"the sources changed size since the state was saved "
                             f"({state['num_samples']} samples then, {self.num_samples} now), "
                             f"so the saved position means nothing in them")
        if state["seed"] != self.seed:
            warnings.warn(f"loader state was saved with seed {state['seed']}, this loader has "
                          f"seed {self.seed}: the order will differ from the saved run")
        self.close()
        self._state = {"batch": int(state["batch"]),
                       "consumed": [int(c) for c in state["consumed"]]}


# ----------------------------------------------------------------------------------------
# command line

def bench_shards(out, res, n, caption_dim, shard_size=4096):
    """Write n random samples (float16 latents [4, res/8, res/8], captions [77, caption_dim])
    as a prepared source, for timing the loader."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    starts = range(0, n, shard_size)
    for i, start in enumerate(starts):
        k = min(shard_size, n - start)
        columns = {f"latents_{res}": rng.standard_normal((k, 4, res // 8, res // 8),
                                                         np.float32).astype(np.float16),
                   CAPTION_COLUMN: rng.standard_normal((k, 77, caption_dim),
                                                       np.float32).astype(np.float16)}
        keys = [f"fake-{start + j}" for j in range(k)]
        write_shard(out, i, columns, keys, keys, "random", collections.Counter(seen=k))
    finish_index(out, len(starts), {"resolutions": [res], "pixel_space": False, "vae": None,
                                    "clip": None, "source_format": "fake"})


def bench(data, res, batch_size, batches, fake_samples, caption_dim, prefetch, cache):
    """Loader throughput, printed and returned as a dict; with fake_samples, first writes
    that many random samples to data. cache 'warm': read the shards once first; 'cold':
    evict them from the page cache (posix_fadvise) and time only the rest of the first
    epoch, so every timed read comes from the disk; 'as-is': neither."""
    if fake_samples and not os.path.exists(os.path.join(data, "index.json")):
        if os.path.isdir(data) and os.listdir(data):  # a prepare in progress, or anything else
            raise ValueError(f"--fake-samples: {data} is not empty and holds no finished data "
                             f"set (no index.json); random samples go only into a new or "
                             f"empty folder, so give another --data")
        bench_shards(data, res, fake_samples, caption_dim)
    for path in glob.glob(os.path.join(data, "*.npy")) if cache != "as-is" else []:
        with open(path, "rb") as f:
            if cache == "cold":
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:  # warm: read it once, so the timed reads find it in the page cache
                while f.read(1 << 24):
                    pass
    loader = LatentLoader(data, res, batch_size, prefetch=prefetch)
    print(f"{data}: {sum(loader.num_samples):,} samples, latents {loader.latent_shape}, "
          f"captions {loader.caption_shape}, batch {batch_size}, prefetch {prefetch}, "
          f"{torch.get_num_threads()} torch threads")

    def rate(n):
        """(samples/s, ms/batch) over the next n batches."""
        t0 = time.perf_counter()
        for _ in range(n):
            next(loader)
        dt = time.perf_counter() - t0
        return n * batch_size / dt, dt / n * 1e3

    warmup = prefetch + 3  # every batch buffer the pool will hold gets allocated once here
    startup = rate(warmup)
    print(f"first {warmup} batches (start-up: buffer allocation, first mappings): "
          f"{startup[0]:,.0f} samples/s ({startup[1]:.1f} ms/batch)")
    if cache == "cold":  # the rest of the first epoch: a second one would hit the page cache
        batches = min(batches, sum(loader.num_samples) // batch_size - warmup)
    timed = rate(batches)
    print(f"next {batches} batches, page cache {cache}: {timed[0]:,.0f} samples/s "
          f"({timed[1]:.1f} ms/batch)")
    loader.close()
    return {"batch": batch_size, "prefetch": prefetch, "cache": cache,
            "startup_batches": warmup, "startup_samples_per_s": startup[0],
            "batches": batches, "samples_per_s": timed[0], "ms_per_batch": timed[1]}


@record  # under torchrun: an unexpected exception goes to the error file with its traceback
def main(argv=None):
    defaults = PrepareConfig(src="", out="")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def encoder_flags(p, vae, clip, res):
        p.add_argument("--out", required=True, help="output folder for shards and index.json")
        p.add_argument("--res", type=int, nargs="+", default=res,
                       help="image resolutions to encode (a latents_<res> column each)")
        p.add_argument("--vae", default=vae, help="VAE folder or file (see vae.py), or 'none' "
                       "for pixel space")
        p.add_argument("--clip", default=clip, help="OpenCLIP hub id, local weights, or "
                       "'tiny-random' (offline tests and demos)")
        p.add_argument("--batch-size", type=int, default=defaults.batch_size)
        p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available")
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                       help="encoder precision; default bfloat16 on GPU, float32 on CPU")
        p.add_argument("--shard-size", type=int, default=defaults.shard_size)
        p.add_argument("--seed", type=int, default=defaults.seed)
        p.add_argument("--workers", type=int, default=defaults.workers,
                       help="image decoding threads")

    p = commands.add_parser("prepare", help="images + captions -> latent shards")
    p.add_argument("--src", required=True, help="folder of images with .txt captions; .tar "
                   "file, folder of .tar or glob; COCO captions .json; or 'demo'")
    p.add_argument("--format", choices=SOURCE_FORMATS, default=None,
                   help="detected from --src when omitted")
    p.add_argument("--coco-images", default=None, help="COCO image folder (default: found "
                   "next to the json)")
    p.add_argument("--coco-captions", choices=["first", "all"], default="first")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=defaults.n,
                   help="size of the demo set (spell it --num-samples under torchrun)")
    p.add_argument("--min-size", type=int, default=defaults.min_size,
                   help="skip images whose short side is below this many pixels (counted as "
                   "skipped.too_small) instead of upscaling them; the paper's 512px phases "
                   "keep only the CC12M images of at least 512px")
    encoder_flags(p, vae=None, clip=defaults.clip, res=defaults.res)

    d = commands.add_parser("demo", help="render the built-in shapes set and prepare it")
    d.add_argument("--n", "--num-samples", dest="n", type=int, default=defaults.n,
                   help="how many images (spell it --num-samples under torchrun)")
    encoder_flags(d, vae="none", clip=TINY_RANDOM, res=[32])

    i = commands.add_parser("info", help="describe a prepared (or MDS) dataset")
    i.add_argument("path")

    b = commands.add_parser("bench", help="time the loader")
    b.add_argument("--data", required=True)
    b.add_argument("--res", type=int, default=256)
    b.add_argument("--batch-size", type=int, default=2048)
    b.add_argument("--batches", type=int, default=20)
    b.add_argument("--prefetch", type=int, default=2)
    b.add_argument("--fake-samples", type=int, default=0,
                   help="first write this many random samples to --data (if it has no index)")
    b.add_argument("--caption-dim", type=int, default=1024)
    b.add_argument("--cache", choices=["warm", "cold", "as-is"], default="warm",
                   help="warm: read the data once first; cold: evict it from the page cache "
                   "and time the rest of the first epoch only, so reads come from the disk")

    args = parser.parse_args(argv)
    try:
        return run_command(parser, args)
    except (FileNotFoundError, ValueError) as e:  # bad paths, settings or inputs: say so
        return command_error(e)


def command_error(e):
    """A command's handled error: said on stderr and, under torchrun, written to this rank's
    error file, where torchrun's summary of a failed job looks for the cause. Returns the
    exit status."""
    get_error_handler().record_exception(e)
    print(f"error: {e}", file=sys.stderr)
    return 2


def run_command(parser, args):
    if args.command == "info":
        dataset = LatentDataset(args.path)
        print(f"{args.path}: {dataset.kind} format, {dataset.num_samples:,} samples in "
              f"{len(dataset.shards)} shards")
        for column, shape in dataset.columns.items():
            print(f"  {column}: float16 {list(shape)}")
        print(f"  first caption: {dataset.caption(0)!r}")
        return
    if args.command == "bench":
        bench(args.data, args.res, args.batch_size, args.batches, args.fake_samples,
              args.caption_dim, args.prefetch, args.cache)
        return
    if args.command == "prepare" and args.vae is None:
        parser.error("prepare needs --vae (a VAE folder or file, e.g. the SDXL VAE's), or "
                     "--vae none for pixel space")
    kw = {k: v for k, v in vars(args).items() if k in PrepareConfig.__dataclass_fields__}
    if args.command == "demo":
        kw.update(src="demo", format="demo")
    cfg = PrepareConfig(**kw)
    print(json.dumps(asdict(cfg)))
    prepare(cfg)


if __name__ == "__main__":
    sys.exit(main())
