"""The FID Inception network: TensorFlow's 2015 Inception graph as FID defines it, built
from torchvision's Inception3 blocks.

FID follows pytorch-fid (whose Inception weights torch-fidelity also uses): TensorFlow's
2015 Inception graph ported to PyTorch, pt_inception-2015-12-05-6726825d.pth, 1008 classes;
its average pools leave the padding out of the mean (count_include_pad=False) and the last
block max-pools, as the graph does. Images are read as 8-bit RGB, scaled to [0, 1], resized
to 299x299 bilinearly (align_corners=False, no antialiasing) and mapped to [-1, 1]; the
features are the 2,048-d pool3 outputs; mean and covariance (unbiased) in float64. Numbers
are comparable to pytorch-fid's for 8-bit RGB images without transparency (others are
converted as prepare.py does: alpha over white, 16-bit scaled, where pytorch-fid's
convert('RGB') drops alpha and clips); torch-fidelity resizes with its own TF1-style bilinear and
clean-fid with PIL bicubic, so theirs can differ in the decimals.

Weights: INCEPTION_URL below is fetched into torch.hub's cache on first use when online;
offline, download the file once and pass its path (eval.py --inception PATH), or put it in
$TORCH_HOME/hub/checkpoints/.
"""
import hashlib
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
# building blocks of torchvision's Inception3 (torchvision comes with open_clip)
from torchvision.models.inception import (BasicConv2d, InceptionA, InceptionB, InceptionC,
                                          InceptionD, InceptionE)

INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256_PREFIX = "6726825d"  # the file's sha256 starts so (torch.hub's naming)
INCEPTION_SIZE = 299  # the graph's input side
RANDOM = "random"  # seeded random weights, for tests


def tf_avg_pool(x):
    """TensorFlow's 3x3 'SAME' average pool: the mean over the pixels inside the image."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def _forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(tf_avg_pool(x))]


class FIDInceptionC(InceptionC):
    def _forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(tf_avg_pool(x))]


class FIDInceptionE(InceptionE):
    """pool 'avg' (Mixed_7b) or 'max' (Mixed_7c: the TF graph max-pools there, unlike the
    Inception paper; FID numbers are defined by the graph)."""

    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        self.pool = pool

    def _forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl),
                                  self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)]


class FIDInception(nn.Module):
    """The FID Inception: [N, 3, H, W] in [0, 1] -> pool3 features [N, 2048]. Module names
    are torchvision's Inception3 (no aux head), so pytorch-fid's weights load as they are."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # the graph's classifier: unused by FID, part of the file
        self.name = "untrained"

    def init_random(self, seed=0):
        """Random weights fixed by the seed, for tests. He-normal convolutions keep the
        activations near unit scale through the 94 layers, whose batch norms hold mean 0
        and variance 1."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            he_init(self)
        self.name = f"{RANDOM}-{seed}"

    def forward(self, x):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1                                                   # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                    # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                   # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                    # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))              # (N, 288, 35, 35)
        x = self.Mixed_6a(x)                                            # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))              # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                       # (N, 2048)


def he_init(net):
    """He-normal weights for every convolution and linear layer, zero biases, fresh batch
    norms: ReLU activations keep about unit scale however deep the net. Draws from torch's
    global generator, which the caller seeds (in a fork_rng) for fixed weights."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()


def inception_weights_hint():
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
    return (f"download the FID Inception weights once:\n    {INCEPTION_URL}\n"
            f"and pass --inception PATH, or put the file at {cache}")


def load_inception(weights=None, device="cpu"):
    """The FID Inception in eval mode: weights None downloads INCEPTION_URL into torch.hub's
    cache (read from there afterwards), a path loads that file, 'random' is seeded noise."""
    with torch.device("meta"):  # every tensor is filled below: nothing drawn, nothing twice
        net = FIDInception()
    net = net.to_empty(device="cpu")
    if weights == RANDOM:
        net.init_random()
        return net.to(device).eval().requires_grad_(False)
    net.name = "pt_inception-2015-12-05"
    if weights is None:
        try:  # check_hash: the file's sha256 starts with the 6726825d in its name
            state = torch.hub.load_state_dict_from_url(INCEPTION_URL, map_location="cpu",
                                                       weights_only=True, check_hash=True)
        except Exception as e:  # offline and not cached
            raise FileNotFoundError(f"cannot get {INCEPTION_URL} ({type(e).__name__}): "
                                    + inception_weights_hint()) from e
    elif os.path.isfile(weights):
        digest = sha256_of(weights)[:len(INCEPTION_SHA256_PREFIX)]
        if digest != INCEPTION_SHA256_PREFIX:  # other weights: other features, other FIDs
            warnings.warn(f"--inception {weights}: sha256 {digest}..., not the published "
                          f"file's {INCEPTION_SHA256_PREFIX}...: its FIDs are not comparable "
                          f"with published ones")
            net.name = f"inception weights {os.path.basename(weights)} sha256 {digest}"
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"--inception {weights}: cannot be read ({type(e).__name__}); "
                             + inception_weights_hint()) from None
    else:
        raise FileNotFoundError(f"--inception {weights}: no such file; " + inception_weights_hint())
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # e.g. torchvision's ImageNet weights
        raise ValueError(f"--inception {weights or INCEPTION_URL}: not the FID Inception "
                         f"weights ({str(e).splitlines()[0]} ...); "
                         + inception_weights_hint()) from None
    return net.to(device).eval().requires_grad_(False)


def sha256_of(path):
    """The file's sha256 (hex), read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
