"""Captioned images -> the shards data.py's loader reads.

    python prepare.py --src imgs/ --out data/mine --res 256 512 --vae weights/sdxl/vae
    torchrun --nproc_per_node 8 prepare.py --src shards/ --out data/cc12m --res 256 512 ...
    python prepare.py --src demo --out data/shapes32 --res 32 --vae none --clip random-words

Inputs: a folder of images with same-named .txt captions, img2dataset WebDataset tars, COCO
captions JSON + image folder, or the built-in shapes set ('demo'). Each image is resized
(short side, bicubic), centre-cropped, and encoded at each resolution with the VAE (a
posterior SAMPLE, scaled) or kept as pixels in [-1, 1] (`--vae none`); each caption becomes
[77, D] token features. The shards are float16, in data.py's format; a stopped run resumes
where it stopped when given the same command again.
"""
import argparse
import collections
import contextlib
import errno
import functools
import glob
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

import text as text_lib
import vae as vae_lib
from checkpoint import atomic_write, write_json
from data import (CAPTION_COLUMN, FORMAT, FORMAT_VERSION, caption_of, column_path, command_error,
                  demo_attributes, read_manifest, render_shapes, shard_name)
from text import DEFAULT_CLIP, RANDOM_WORDS, load_text_encoder
from vae import load_vae

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SOURCE_FORMATS = ("folder", "tar", "coco", "demo")

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
    same path with .txt. A .txt that no image claims is a record without an image, so that
    the summary counts and names it (missing_image), as it does a tar's caption alone."""
    records = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        image_stems = {os.path.splitext(name)[0] for name in filenames
                       if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS}
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            path = os.path.join(dirpath, name)
            if ext.lower() in IMAGE_EXTENSIONS:
                caption = os.path.join(dirpath, stem + ".txt")
                records.append(Record(os.path.relpath(path, root),
                                      functools.partial(Image.open, path),
                                      functools.partial(_read_if_exists, caption)))
            elif ext == ".txt" and stem not in image_stems:
                records.append(Record(os.path.relpath(path, root), None,
                                      functools.partial(_read_if_exists, path)))
    if not any(r.load_image for r in records):
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



SKIPPED_NAMED = 10  # skipped records named per reason in summary.json
SKIP_REASONS = ("missing_caption", "empty_caption", "unreadable_caption",
                "missing_image",  # also a folder's caption (.txt) that no image claims
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
    clip: str = DEFAULT_CLIP        # an OpenCLIP hub id, a local file, or an offline one (text.py)
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


class WriteFailed(Exception):
    """The output could not be written: a full disk, most often."""


@contextlib.contextmanager
def writing(out, num_shards, what):
    """Turns an OSError while writing `what` into a WriteFailed that says what went wrong,
    what `out` holds, and that the same command resumes: complete shards are kept, and a shard
    cut short has no manifest, so it is done again."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            cause = "the disk is full"
        elif e.errno is None and "requested and" in str(e):  # numpy's words for a short write
            cause = "the disk is full, most likely: a write was cut short"
        else:
            cause = "a write failed"
        done = {i: m for i in range(num_shards) if (m := read_manifest(out, i)) is not None}
        size = sum(os.path.getsize(p) for i in done
                   for p in glob.glob(os.path.join(glob.escape(out), shard_name(i) + ".*")))
        fix = "free some space or give another --out" if "full" in cause else "mend that"
        raise WriteFailed(
            f"{cause} ({type(e).__name__}: {e}) while writing {what} in {out}. It holds "
            f"{len(done)} of its {num_shards} shards complete "
            f"({sum(m['samples'] for m in done.values()):,} images, {size / 2**20:,.1f} MiB); "
            f"{fix}, then rerun the same command: it resumes where this run stopped") from e


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
    settings = _settings(cfg, fmt, shards, str(dtype).removeprefix("torch."))
    with writing(cfg.out, len(shards), "prepare.json"):
        os.makedirs(cfg.out, exist_ok=True)
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
                with writing(cfg.out, len(shards), shard_name(i)):
                    prepare_shard(i, shards[i], cfg, encoders, pool, progress)
    info = {"resolutions": sorted(cfg.res), "pixel_space": cfg.vae == "none",
            "vae": recorded_path(cfg.vae), "clip": recorded_path(cfg.clip), "seed": cfg.seed,
            "min_size": cfg.min_size,
            "source": settings["src"], "source_format": fmt}
    if cfg.vae != "none":
        vae_cfg = (encoders.vae if todo else load_vae(cfg.vae)).config
        info.update(scaling_factor=vae_cfg.scaling_factor, shift_factor=vae_cfg.shift_factor)
    with writing(cfg.out, len(shards), "index.json and summary.json"):
        done = finish_index(cfg.out, len(shards), info)
    if not done:
        print(f"rank {rank}: done; another rank is still working, the last one to finish "
              f"writes {os.path.join(cfg.out, 'index.json')}")
        return None
    with open(os.path.join(cfg.out, "summary.json")) as f:
        summary = json.load(f)
    print(f"wrote {os.path.join(cfg.out, 'index.json')}: {json.dumps(summary)}")
    return summary


def ensure_demo_data(out, master=True, res=32, n=PrepareConfig.n, seed=0, clip=RANDOM_WORDS):
    """The built-in shapes set in pixel space with offline caption features (`clip`),
    prepared in `out` unless it is there already; returns out. Only the master prepares:
    other ranks must wait (e.g. at a barrier) before reading it."""
    index = os.path.join(out, "index.json")
    if os.path.exists(index):
        with open(index) as f:
            made_with = json.load(f).get("clip")
        if made_with != clip:
            raise ValueError(f"{out} holds the shapes set with {made_with!r} caption features, "
                             f"not {clip!r}: move it away (or give another folder) to prepare "
                             f"it again")
    elif master:
        prepare(PrepareConfig(src="demo", out=out, res=[res], vae="none", clip=clip,
                              format="demo", n=n, seed=seed), rank=0, world_size=1)
    return out



def recorded_path(name):
    """A local file or folder as an absolute path, for the records a later command reads
    from elsewhere; hub ids and names such as 'none' as they are."""
    return os.path.abspath(name) if name and os.path.exists(name) else name



# ----------------------------------------------------------------------------------------
# command line

@record  # under torchrun: an unexpected exception goes to the error file with its traceback
def main(argv=None, demo=False):
    """`python prepare.py ...`; demo: `python data.py demo ...`, the built-in shapes set with
    defaults for a quick pixel-space run (no --src, --vae none, --clip random-words)."""
    defaults = PrepareConfig(src="", out="")
    parser = argparse.ArgumentParser(prog="data.py demo" if demo else "prepare.py",
                                     description="the built-in shapes set, prepared" if demo
                                     else __doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p = parser.add_argument
    if demo:
        p("--n", "--num-samples", dest="n", type=int, default=defaults.n,
          help="how many images (spell it --num-samples under torchrun)")
    else:
        p("--src", required=True, help="folder of images with .txt captions; .tar file, "
          "folder of .tar or glob; COCO captions .json; or 'demo'")
        p("--format", choices=SOURCE_FORMATS, default=None,
          help="detected from --src when omitted")
        p("--coco-images", default=None, help="COCO image folder (default: found next to "
          "the json)")
        p("--coco-captions", choices=["first", "all"], default="first")
        p("--n", "--num-samples", dest="n", type=int, default=defaults.n,
          help="size of the demo set (spell it --num-samples under torchrun)")
        p("--min-size", type=int, default=defaults.min_size,
          help="skip images whose short side is below this many pixels (counted as "
          "skipped.too_small) instead of upscaling them; the paper's 512px phases keep only "
          "the CC12M images of at least 512px")
    p("--out", required=True, help="output folder for shards and index.json")
    p("--res", type=int, nargs="+", default=[32] if demo else defaults.res,
      help="image resolutions to encode (a latents_<res> column each)")
    p("--vae", default="none" if demo else None, help="VAE folder or file (see vae.py), or "
      "'none' for pixel space")
    p("--clip", default=RANDOM_WORDS if demo else defaults.clip, help="OpenCLIP hub id, local "
      "weights, or 'random-words' (offline: no download; 'tiny-random' only where a test "
      "needs open_clip's code path)")
    p("--batch-size", type=int, default=defaults.batch_size)
    p("--device", default=None, help="default: cuda:LOCAL_RANK if available")
    p("--dtype", default=None, choices=["float32", "bfloat16"],
      help="encoder precision; default bfloat16 on GPU, float32 on CPU")
    p("--shard-size", type=int, default=defaults.shard_size)
    p("--seed", type=int, default=defaults.seed)
    p("--workers", type=int, default=defaults.workers, help="image decoding threads")
    args = parser.parse_args(argv)
    if args.vae is None:
        parser.error("--vae is required: a VAE folder or file (e.g. the SDXL VAE's), or "
                     "--vae none for pixel space")
    kw = {k: v for k, v in vars(args).items() if k in PrepareConfig.__dataclass_fields__}
    if demo:
        kw.update(src="demo", format="demo")
    cfg = PrepareConfig(**kw)
    print(json.dumps(asdict(cfg)))
    try:
        prepare(cfg)
    except (FileNotFoundError, ValueError, WriteFailed) as e:  # bad inputs, a full disk
        return command_error(e)


if __name__ == "__main__":
    sys.exit(main())
