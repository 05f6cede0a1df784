"""The shard format, the training loader, and the built-in shapes set.

    python data.py info data/cc12m          # describe a prepared (or MosaicML MDS) folder
    python data.py demo --out data/shapes32 --n 4000 --res 32     # the shapes set, prepared

    loader = LatentLoader("data/cc12m:0.6,data/synthetic:0.4", resolution=256, batch_size=256)
    batch = next(loader)         # {"latents": (B, C, h, w) float32, "captions": (B, 77, D) float32}

prepare.py turns captioned images into shards (`python data.py prepare ...` runs it as well);
the loader reads those shards, or the paper's own MosaicML MDS latent shards, memory-mapped.

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
import json
import os
import queue
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

FORMAT = "microdit-shards"
FORMAT_VERSION = 1
CAPTION_COLUMN = "caption_feats"

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
# the shard format

def shard_name(i):
    return f"shard-{i:05d}"


def column_path(out, name, column):
    return os.path.join(out, f"{name}.{column}.npy")



def read_manifest(out, shard_id):
    """The manifest of a complete shard, or None."""
    try:
        with open(os.path.join(out, shard_name(shard_id) + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None



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
                                 f"`python prepare.py` to rewrite it") from None
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
        # every sample's size header at once (V = len(variable) uint32s): (n, 4V) uint8
        header = np.ascontiguousarray(data[offsets[:-1, None] + np.arange(4 * len(variable))])
        sizes = header.view(np.uint32).astype(np.int64).reshape(n, len(variable))  # (n, V)
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
                        for p in (0, 1)]                                # (bytes // 2,) each
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
            out[row].copy_(half.view(shape))                            # (C, h, w) or (77, D)

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
                        "interrupted: rerun the same `python prepare.py` to finish it.")
            raise FileNotFoundError(
                f"{path}: no index.json, so this is not a prepared dataset. Prepare one with "
                f"`python prepare.py --src IMAGES --out {path} ...` (or `python data.py "
                f"demo --out {path}`), or point at a MosaicML MDS folder.{hint}")
        try:
            with open(index_path) as f:
                index = json.load(f)
        except ValueError as e:
            raise ValueError(f"{index_path}: not valid JSON ({e}); the file is damaged: "
                             f"rerun the `python prepare.py` that made it (it rewrites "
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
                         f"resolutions, or prepare this one with `python prepare.py "
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


def data_std(sources, res, n=4096, seed=0):
    """The standard deviation of the data's values at `res`, over up to n samples drawn at
    random from the sources in proportion to their weights: EDM's sigma_data for a model
    trained on them (pixels in [-1, 1], or latents at whatever scale they were stored)."""
    sources = parse_sources(sources)
    total = sum(w for _, w in sources)
    rng = np.random.default_rng(seed)
    values = []
    for path, weight in sources:
        dataset = LatentDataset(path)
        column = dataset.image_column(res)
        count = max(1, min(dataset.num_samples, round(n * weight / total)))
        ids = np.sort(rng.choice(dataset.num_samples, count, replace=False))
        rows = torch.empty(count, *dataset.columns[column])             # (count, C, H, W)
        dataset.gather(column, ids, rows)
        values.append(rows.flatten())
    return round(torch.cat(values).double().std().item(), 4)  # an estimate: 4 decimals



# ----------------------------------------------------------------------------------------
# the training loader

def absolute_sources(sources):
    """The same sources with every folder absolute, as a run records them: its checkpoints
    then find their data from any working directory."""
    return ",".join(os.path.abspath(path) + ("" if weight == 1 else f":{weight!r}")
                    for path, weight in parse_sources(sources))



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

PREPARE_COMMANDS = {  # handed whole, flags and --help included, to prepare.py
    "prepare": "images + captions -> latent shards: `python prepare.py`, the same flags",
    "demo": "render the built-in shapes set and prepare it (pixels, random-words captions)",
}


@record  # under torchrun: an unexpected exception goes to the error file with its traceback
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in PREPARE_COMMANDS:
        import prepare  # here, not at the top: prepare.py imports this module
        return prepare.main(argv[1:], demo=argv[0] == "demo")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in PREPARE_COMMANDS.items():  # listed here, parsed by prepare.py
        commands.add_parser(name, help=help)
    i = commands.add_parser("info", help="describe a prepared (or MDS) dataset")
    i.add_argument("path")
    args = parser.parse_args(argv)
    try:
        info(args.path)
    except (FileNotFoundError, ValueError) as e:  # bad paths or inputs: say so
        return command_error(e)


def command_error(e):
    """A command's handled error: said on stderr and, under torchrun, written to this rank's
    error file, where torchrun's summary of a failed job looks for the cause. Returns the
    exit status."""
    get_error_handler().record_exception(e)
    print(f"error: {e}", file=sys.stderr)
    return 2


def info(path):
    dataset = LatentDataset(path)
    print(f"{path}: {dataset.kind} format, {dataset.num_samples:,} samples in "
          f"{len(dataset.shards)} shards")
    for column, shape in dataset.columns.items():
        print(f"  {column}: float16 {list(shape)}")
    print(f"  first caption: {dataset.caption(0)!r}")


if __name__ == "__main__":
    sys.exit(main())
