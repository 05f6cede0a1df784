"""Caption features from an OpenCLIP text tower: [N, 77, width] token features.

The paper uses `ViT-H-14-378-quickgelu` with Apple's DFN5B weights and keeps ALL 77 token
features after the final LayerNorm (no pooling, no projection): the DiT cross-attends to
them. QuickGELU must be forced: a local weights file does not say which activation it was
trained with, and plain GELU gives silently different features.

    enc = load_text_encoder("hf-hub:apple/DFN5B-CLIP-ViT-H-14-378")   # or a local file / folder
    feats = enc.encode(["a cat", "a dog"])                              # (2, 77, 1024)

Offline (nothing to download), `random-words` gives 256-wide features from fixed random
tables: no meaning learned from images, but each word keeps its own vector and captions
that differ in one word are far apart (see RandomWords), so a model learns prompts from
them. FOR DEMOS AND TESTS ONLY. `tiny-random`, a small randomly initialised open_clip
tower (same tokenizer, width 256), is kept only for the tests that need open_clip's code
path: it maps captions that differ in one word to nearly the same features. Both are fixed
by a seed, so data prepared with them and a model sampled with them agree.
"""
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_CLIP = "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
CLIP_ARCH = "ViT-H-14-378-quickgelu"
TINY_RANDOM = "tiny-random"
RANDOM_WORDS = "random-words"
RANDOM_WORDS_SEED = 2407  # any constant: the features must be the same everywhere
# the paper's text tower, for a machine that works offline afterwards, and where it lands
DOWNLOAD = ("hf download apple/DFN5B-CLIP-ViT-H-14-378 open_clip_model.safetensors "
            "--local-dir weights/clip")
DOWNLOADED = "weights/clip/open_clip_model.safetensors"
TINY_WIDTH = 256
CONTEXT_LENGTH = 77
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def download_hint(repo):
    return (f"download the weights once with\n"
            f"    hf download {repo} {WEIGHT_FILES[0]} --local-dir weights/clip\n"
            f"and pass --clip weights/clip/{WEIGHT_FILES[0]}")


class CaptionEncoder(nn.Module):
    """Captions -> CLIP's 77 BPE token ids -> float32 token features [N, 77, width]; a
    subclass says how ids become features (`features`)."""

    def __init__(self, tokenizer, name, width):
        super().__init__()
        self.tokenizer = tokenizer
        self.name = name
        self.width = width

    def truncated(self, prompts):
        """(token count, prompt) for each prompt longer than the 77 tokens the tower reads
        (start and end tokens included): those are cut."""
        counts = [(len(self.tokenizer.encode(p)) + 2, p) for p in prompts]
        return [(n, p) for n, p in counts if n > CONTEXT_LENGTH]

    def tokenize(self, prompts):
        """Token ids [N, 77]; warns about prompts longer than 77 tokens (they are cut)."""
        for n, prompt in self.truncated(prompts):
            warnings.warn(f"prompt has {n} tokens and is truncated to {CONTEXT_LENGTH}: "
                          f"{prompt[:60]!r}...")
        return self.tokenizer(list(prompts))

    @torch.no_grad()
    def encode(self, prompts):
        """Prompts -> float32 token features [N, 77, width]."""
        return self.features(self.tokenize(prompts)).float()


class TextEncoder(CaptionEncoder):
    """An OpenCLIP text tower's token features after its final LayerNorm."""

    def __init__(self, tower, tokenizer, name):
        super().__init__(tokenizer, name, tower.ln_final.weight.shape[0])
        self.tower = tower  # an open_clip CLIP or TextTransformer: the text parts are used

    def features(self, ids):
        t = self.tower
        ids = ids.to(t.ln_final.weight.device)
        x = t.token_embedding(ids) + t.positional_embedding                # (N, 77, width)
        if getattr(t.transformer, "batch_first", True):
            x = t.transformer(x, attn_mask=t.attn_mask)
        else:  # open_clip before 2.23 ran its transformer sequence-first
            x = t.transformer(x.transpose(0, 1), attn_mask=t.attn_mask).transpose(0, 1)
        return t.ln_final(x)                                                 # (N, 77, width)


class RandomWords(CaptionEncoder):
    """Caption features from fixed random tables, no meaning learned from images, that keep
    captions differing in one word far apart. Each position holds, like the output of
    CLIP's causal tower after ln_final:
    - its token's random vector plus its position's: captions that share words share
      these, so a model can compose an unseen caption from words it has seen;
    - a summary of the caption up to there: the tokens so far, each bound to its position
      (so word order counts), summed, and sent through random Fourier features (Rahimi and
      Recht, 2007), whose cosines follow the kernel exp(-sharpness^2 |a - b|^2 / 2) of the
      unit-length sums. One changed token of t moves such a sum by |a - b|^2 ~ 2/t, leaving
      its summary a cosine of ~exp(-sharpness^2 / t): 0.2 for a 15-token shapes caption.
    The positions after the end token hold the summary of the whole caption alone. Every
    table comes from uniform draws (exact on any machine, unlike normal ones, which go
    through log and cos) of a generator seeded with a constant."""

    def __init__(self, tokenizer, width=TINY_WIDTH, sharpness=5.0):
        super().__init__(tokenizer, RANDOM_WORDS, width)
        g = torch.Generator().manual_seed(RANDOM_WORDS_SEED)

        def uniform(*shape):  # zero mean, unit variance
            return (torch.rand(shape, generator=g) * 2 - 1) * 3 ** 0.5

        self.register_buffer("token_vectors", uniform(tokenizer.vocab_size, width))
        self.register_buffer("position_vectors", uniform(CONTEXT_LENGTH, width))
        self.register_buffer("position_keys", uniform(CONTEXT_LENGTH, width))
        self.register_buffer("frequencies", uniform(width, width) * sharpness)
        self.register_buffer("phases", torch.rand(width, generator=g) * 2 * math.pi)

    def features(self, ids):
        ids = ids.to(self.token_vectors.device)
        end = ids.argmax(-1, keepdim=True)  # the end token has the largest id, as CLIP pools
        is_word = (torch.arange(CONTEXT_LENGTH, device=ids.device) <= end)[..., None]
        tokens = self.token_vectors[ids] * is_word                            # (N, 77, D)
        so_far = F.normalize((tokens * self.position_keys).cumsum(1), dim=-1) # (N, 77, D)
        # sqrt(2) cos(.) has unit variance, like the token and position vectors
        summary = 2 ** 0.5 * torch.cos(so_far @ self.frequencies + self.phases)
        x = tokens + self.position_vectors * is_word + summary                # (N, 77, D)
        return F.layer_norm(x, x.shape[-1:])


def tiny_random_tower():
    from open_clip.transformer import TextTransformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TextTransformer(context_length=CONTEXT_LENGTH, width=TINY_WIDTH, heads=4,
                               layers=2, output_dim=TINY_WIDTH)


def resolve_clip_weights(name):
    """A local file, a folder holding one of WEIGHT_FILES, or a hub id ('hf-hub:org/repo'
    or 'org/repo') fetched once and then read from the local cache."""
    if os.path.isfile(name):
        return name
    if os.path.isdir(name):
        for f in WEIGHT_FILES:
            if os.path.isfile(os.path.join(name, f)):
                return os.path.join(name, f)
        raise FileNotFoundError(f"{name}: no CLIP weights in this folder (looked for "
                                f"{', '.join(WEIGHT_FILES)})")
    repo = name.removeprefix("hf-hub:")
    if repo.count("/") != 1:
        raise FileNotFoundError(f"--clip {name!r}: not a file, a folder or a hub id "
                                f"(org/repo); or use '{RANDOM_WORDS}' offline")
    local = "" if name.startswith("hf-hub:") else f"{name} is no file or folder here, and as "
    from huggingface_hub import hf_hub_download
    errors = []
    for f in WEIGHT_FILES:
        try:
            return hf_hub_download(repo, f)
        except Exception as e:  # offline, not cached, or not in this repo
            errors.append(f"{f}: {type(e).__name__}")
    raise FileNotFoundError(f"{local}a hub id: cannot get CLIP weights for {name} "
                            f"({'; '.join(errors)}): " + download_hint(repo))


def text_weights(path):
    """The tensors of an open_clip weights file but the image tower's, which are not read
    (2.5 of DFN5B's 3.9 GB)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("visual.")}
        else:
            try:  # mapped, so the image tower's bytes are never read
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a cut-short or foreign file
        raise ValueError(f"--clip {path}: cannot be read as CLIP weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); download it "
                         f"again") from None
    if not isinstance(state, dict) or not any(k.endswith("token_embedding.weight")
                                              for k in state):
        raise ValueError(f"--clip {path}: not the weights of an OpenCLIP model (no text "
                         f"tower's token_embedding.weight)")
    return {k: v for k, v in state.items() if not k.startswith("visual.")}


def load_text_tower(arch, path):
    """open_clip's CLIP for `arch` with the text weights of `path` and no image tower. Built
    on the meta device and filled with the file's tensors: no random initialisation of 1B
    parameters to throw away. A file in another layout goes through open_clip's loader."""
    import open_clip
    with torch.device("meta"):
        tower = open_clip.create_model(arch, force_quick_gelu=True, device="meta")
    tower.visual = None  # 632M parameters the captions never need
    state = text_weights(path)
    if set(state) != set(tower.state_dict()):  # e.g. an older key layout open_clip converts
        try:
            tower = open_clip.create_model(arch, pretrained=path, force_quick_gelu=True)
        except RuntimeError as e:  # another architecture's weights
            raise ValueError(f"--clip {path}: not {arch} weights "
                             f"({str(e).splitlines()[0]} ...)") from None
        tower.visual = None
        return tower
    tower.load_state_dict(state, assign=True)
    # the one buffer not in the file: open_clip's additive causal mask, -inf above the diagonal
    tower.attn_mask = torch.full(tower.attn_mask.shape, float("-inf")).triu_(1)
    return tower


def load_text_encoder(name=DEFAULT_CLIP, device="cpu", dtype=torch.float32, arch=CLIP_ARCH):
    """A frozen caption encoder from a hub id, a local file or folder, 'random-words' or
    'tiny-random' (see above).
    `arch` is the open_clip architecture the weights belong to."""
    import open_clip
    tokenizer = open_clip.get_tokenizer(CLIP_ARCH)  # the same BPE for every OpenAI-style tower
    if name == RANDOM_WORDS:  # float32 whatever `dtype`: cheap, and the same on every device
        return RandomWords(tokenizer).to(device).eval()
    if name == TINY_RANDOM:
        tower = tiny_random_tower()
    else:
        tower = load_text_tower(arch, resolve_clip_weights(name))
    return TextEncoder(tower, tokenizer, name).to(device, dtype).eval().requires_grad_(False)
