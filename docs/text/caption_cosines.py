"""How far apart an offline text encoder puts captions: cosines of their [77, D] features.

    python docs/text/caption_cosines.py random-words tiny-random

Pairs: shapes captions that differ in one word (every one-word change of the first 40
demo samples), random pairs of shapes captions, and shapes captions against other
sentences. Columns: the flattened [77, D] features; the positions after the changed word
(their mean cosine; for the other pairs, after the first different token); the mean over
the 77 tokens (what the DiT pools)."""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from data import caption_of, demo_attributes  # noqa: E402
from test_all import one_word_different_captions  # noqa: E402
from text import load_text_encoder  # noqa: E402

OTHERS = ["a photo of a cat sleeping on a sofa", "two men playing football in the rain",
          "a bowl of soup with a spoon", "an old train crossing a bridge at night",
          "people walking down a busy city street", "a dog catching a frisbee in the park"]


def summary(x):
    return f"{x.mean():6.3f} {x.min():6.3f} {x.max():6.3f}"


shapes = [caption_of(demo_attributes(0, i)) for i in range(400)]
pair_sets = {"one word different": one_word_different_captions(40),
             "random shapes pairs": list(zip(shapes[:200], shapes[200:])),
             "shapes vs other": list(zip(shapes[:60], OTHERS * 10))}
print(f"{'encoder':13s}{'pairs':21s}{'n':>5s}   flattened (mean min max)   after the change"
      f"     token mean")
for name in sys.argv[1:] or ["random-words", "tiny-random"]:
    enc = load_text_encoder(name)
    for label, pairs in pair_sets.items():
        ids = [enc.tokenize([p[k] for p in pairs]) for k in (0, 1)]
        a, b = (enc.encode([p[k] for p in pairs]) for k in (0, 1))   # (P, 77, D) each
        first = (ids[0] != ids[1]).int().argmax(1)                    # (P,) first changed token
        per_position = F.cosine_similarity(a, b, dim=-1)              # (P, 77)
        after = torch.stack([per_position[i, first[i] + 1:].mean() for i in range(len(pairs))])
        flattened = F.cosine_similarity(a.flatten(1), b.flatten(1))
        pooled = F.cosine_similarity(a.mean(1), b.mean(1))
        print(f"{name:13s}{label:21s}{len(pairs):5d}   {summary(flattened)}      "
              f"{summary(after)}   {summary(pooled)}")
