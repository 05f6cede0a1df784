"""Tests for data.py: inputs, prepare, shard format, MDS reading, the training loader.
CPU only; every test makes its own small data in a tmp dir."""
import collections
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import LatentLoader, PrepareConfig, prepare

VAE_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "vae_tiny_4ch")


def run_prepare(src, out, rank=0, world_size=1, **kw):
    kw = {"res": [16], "vae": "none", "clip": "tiny-random", "device": "cpu", "batch_size": 4,
          "workers": 2, **kw}
    return prepare(PrepareConfig(src=str(src), out=str(out), **kw), rank, world_size)


def unit(pixels):
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], written out independently of data.py"""
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
        data.write_shard(str(root), i, columns, keys, keys, "test",
                         collections.Counter(seen=len(keys)))
    assert data.finish_index(str(root), len(starts), {"resolutions": [res]})
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
        ((10, 7, 16), (22, 16), (3, 0, 19, 16)),       # upscaled: int(16 * 10 / 7) = 22
        ((50, 50, 50), (50, 50), (0, 0, 50, 50)),
    ]
    for (w, h, res), size, box in cases:
        img = noise(w, h)
        expected = np.asarray(img.resize(size, Image.BICUBIC).crop(box))
        np.testing.assert_array_equal(np.asarray(data.resize_center_crop(img, res)), expected)


def test_decode_caption():
    counts = collections.Counter()
    assert data.decode_caption(b"  a cat\n", counts) == "a cat"
    assert data.decode_caption("\ufeffa dog".encode("utf-8"), counts) == "a dog"  # BOM dropped
    assert data.decode_caption(b"caf\xe9 au lait", counts) == "café au lait"
    assert data.decode_caption(b" \n ", counts) is None
    assert data.decode_caption(None, counts) is None
    assert data.decode_caption(lambda: b"lazy", counts) == "lazy"
    assert counts == {"non_utf8_caption": 1, "empty_caption": 1, "missing_caption": 1}


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


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
                      "non_utf8_caption": 1, "palette": 1, "upscaled": 1}}
    assert json.load(open(out / "summary.json")) == summary
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
    (src / "00001_stats.json").write_text(json.dumps({"successes": 2}))
    # cut the second tar inside its last image: the samples before it survive
    with tarfile.open(src / "00001.tar") as tar:
        cut = tar.getmembers()[-2].offset_data + 10
    (src / "00001.tar").write_bytes((src / "00001.tar").read_bytes()[:cut])

    out = tmp_path / "out"
    summary = run_prepare(src, out, res=[16])
    assert summary["skipped"] == {"missing_image": 1, "bad_tar": 1}
    manifests = shard_manifests(out)
    assert [m["origin"] for m in manifests] == [str(src / "00000.tar"), str(src / "00001.tar")]
    assert [c for m in manifests for c in m["captions"]] == ["first", "second", "from the json",
                                                              "fourth"]
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
                            {"image_id": 3, "id": 11, "caption": "three a"},
                            {"image_id": 1, "id": 12, "caption": "one b"},
                            {"image_id": 3, "id": 13, "caption": "three b"}]}
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
        x = torch.from_numpy(unit(data.resize_center_crop(img, 16)))[None]
        expected = vae.encode_to_scaled(x, generator=data.posterior_generator(5, f"{i}.png", 16))
        np.testing.assert_allclose(latents[i].astype(np.float32), expected[0].numpy(),
                                   rtol=2e-3, atol=2e-3)
    # the noise really is a sample: another seed gives other latents
    other = vae.encode_to_scaled(x, generator=data.posterior_generator(6, "2.png", 16))
    assert not np.allclose(latents[2].astype(np.float32), other[0].numpy(), atol=1e-2)
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

    real_write_shard = data.write_shard
    calls = []

    def crash_on_second_shard(out, shard_id, columns, *args):
        calls.append(shard_id)
        if len(calls) == 2:  # die in the middle of writing: one column and a temp file
            name = data.shard_name(shard_id)
            np.save(data.column_path(out, name, "latents_16"), np.zeros(3, np.float16))
            open(os.path.join(out, f"{name}.caption_feats.npy.tmp-999"), "wb").write(b"\x93NUM")
            raise KeyboardInterrupt("killed")
        return real_write_shard(out, shard_id, columns, *args)

    monkeypatch.setattr(data, "write_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_prepare("demo", tmp_path / "resumed", **settings)
    assert calls == [0, 1]
    assert data.read_manifest(str(tmp_path / "resumed"), 1) is None
    with pytest.raises(FileNotFoundError, match="interrupted"):
        data.LatentDataset(str(tmp_path / "resumed"))

    calls.clear()
    monkeypatch.setattr(data, "write_shard", lambda *a: (calls.append(a[1]),
                                                         real_write_shard(*a)))
    run_prepare("demo", tmp_path / "resumed", **settings)
    assert calls == [1, 2]  # shard 0 was kept, the half-written shard 1 was redone
    assert _all_outputs(tmp_path / "whole") == _all_outputs(tmp_path / "resumed")

    with pytest.raises(ValueError, match="other settings"):
        run_prepare("demo", tmp_path / "resumed", **{**settings, "res": [8]})


def test_prepare_split_over_ranks_equals_one_process(tmp_path):
    settings = dict(res=[16], n=10, shard_size=3)
    run_prepare("demo", tmp_path / "one", **settings)
    assert run_prepare("demo", tmp_path / "two", rank=1, world_size=2, **settings) is None
    assert not (tmp_path / "two" / "index.json").exists()  # rank 0's shards are missing
    names = sorted(os.listdir(tmp_path / "two"))
    assert "shard-00001.json" in names and "shard-00000.json" not in names
    assert run_prepare("demo", tmp_path / "two", rank=0, world_size=2, **settings) is not None
    assert _all_outputs(tmp_path / "one") == _all_outputs(tmp_path / "two")


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


def _write_mds(root, shards, compression=None):
    """A tiny MosaicML MDS writer (format version 2, uncompressed): the paper's columns, each
    shard in its own sub-folder the way merge_index lays out the paper's precompute output."""
    columns = {"caption": "str", "caption_latents": "bytes", "latents_256": "bytes",
               "latents_512": "bytes"}
    names = sorted(columns)
    config = {"version": 2, "format": "mds", "compression": compression, "hashes": [],
              "size_limit": 1 << 26, "column_names": names,
              "column_encodings": [columns[n] for n in names],
              "column_sizes": [None] * len(names)}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    infos = []
    for i, samples in enumerate(shards):
        encoded = []
        for sample in samples:
            fields = [sample[n].encode() if isinstance(sample[n], str) else sample[n].tobytes()
                      for n in names]
            encoded.append(np.array([len(f) for f in fields], np.uint32).tobytes()
                           + b"".join(fields))
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
    dataset = data.LatentDataset(mds)
    assert dataset.kind == "mds" and dataset.num_samples == 11
    assert dataset.columns == {data.CAPTION_COLUMN: (77, 8), "latents_256": (4, 32, 32),
                               "latents_512": (4, 64, 64)}
    assert [dataset.caption(i) for i in range(11)] == [s["caption"] for s in samples]
    for res in (256, 512):
        # one batch of everything: ids come sorted, so it is the dataset in order
        batch = next(LatentLoader(mds, res, 11, caption_drop_prob=0.0, prefetch=0))
        expected = np.stack([s[f"latents_{res}"] for s in samples]).astype(np.float32)
        np.testing.assert_array_equal(batch["latents"].numpy(), expected)
        expected = np.stack([s["caption_latents"] for s in samples]).astype(np.float32)
        np.testing.assert_array_equal(batch["captions"].numpy(), expected)
    # the same loader mixes MDS with our shards
    ours = make_dataset(tmp_path / "ours", np.full((20, 4, 32, 32), 7.0), res=256)
    mixed = LatentLoader(f"{mds}:1,{ours}:1", 256, 32, prefetch=0, caption_drop_prob=0.0)
    latents = next(mixed)["latents"]
    from_ours = (latents == 7).flatten(1).all(1)
    assert 0 < from_ours.sum() < 32
    compressed = _write_mds(tmp_path / "zstd", [samples[:3]], compression="zstd")
    with pytest.raises(ValueError, match="compressed"):
        data.LatentDataset(compressed)


def test_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no index.json.*data.py prepare"):
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
    out = data.ensure_demo_data(str(tmp_path / "demo"), master=True, res=8, n=5)
    first = os.path.getmtime(os.path.join(out, "index.json"))
    assert data.ensure_demo_data(out, master=True, res=8, n=5) == out  # there already: kept
    assert os.path.getmtime(os.path.join(out, "index.json")) == first
    info = data.data_info(f"{out}:2")
    assert info["vae"] == "none" and info["clip"] == "tiny-random" and info["pixel_space"]
    assert info["resolutions"] == [8] and info["num_samples"] == 5
    assert info["sample_prompts"] == [data.caption_of(data.demo_attributes(0, i))
                                      for i in range(5)]


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
