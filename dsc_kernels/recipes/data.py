"""Real data that ships inside scikit-learn (nothing is downloaded): the 8x8 digits and the two sample photographs."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _validate as check
from . import _args

PHOTOS = ("china", "flower")


def _sklearn_datasets():
    try:
        from sklearn import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the training recipes need scikit-learn: pip install 'dsc_kernels[train]'") from err
    return datasets


def digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits as (B, 1, 8, 8) float32 in [0, 1] (pixels / 16) with int64 labels, split exactly
    ``train_test_split(images, target, test_size=0.25, stratify=target, random_state=seed)``.
    Returns x_train, y_train, x_test, y_test. ``seed`` is an int in [0, 2**32) (``_args.SEED_RANGE``)."""
    seed = _args.seed(seed)  # None would be an unreproducible split, True the split of seed 1
    # _sklearn_datasets first: it says which extra to install, a bare sklearn import did not
    data = _sklearn_datasets().load_digits()
    from sklearn.model_selection import train_test_split

    images = (data.images / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, data.target, test_size=0.25, stratify=data.target, random_state=seed
    )
    as_x = lambda a: torch.from_numpy(a).unsqueeze(1)  # noqa: E731
    return as_x(x_tr), torch.from_numpy(y_tr).long(), as_x(x_te), torch.from_numpy(y_te).long()


def photo(name: str) -> Tensor:
    """One of scikit-learn's sample photographs ("china", "flower"; 427x640) in grayscale: (H, W) float32 in [0, 1]
    (ITU-R 601 luma: 0.299 R + 0.587 G + 0.114 B)."""
    _args.one_of("name", name, PHOTOS)
    bunch = _sklearn_datasets().load_sample_images()
    index = [i for i, f in enumerate(bunch.filenames) if f.endswith(f"{name}.jpg")][0]
    rgb = bunch.images[index].astype(np.float32) / 255.0
    return torch.from_numpy(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def random_patches(image: Tensor, n: int, size: int, generator: torch.Generator | None) -> Tensor:
    """n >= 1 random size x size crops of a floating (H, W) image with H, W >= size: (n, 1, size, size).
    ``generator`` None draws from torch's global generator."""
    image = check.tensor("image", image, rank=2)
    n, size = check.count("n", n, 1), check.count("size", size, 1)
    h, w = image.shape
    if size > min(h, w):
        raise ValueError(f"size {size} is larger than the image, {h}x{w}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    # on the CPU whatever torch.set_default_device says: a meta default could not read the draws back, a CUDA one
    # refused the CPU generator
    rows = torch.randint(0, h - size + 1, (n,), generator=generator, device="cpu")
    cols = torch.randint(0, w - size + 1, (n,), generator=generator, device="cpu")
    return torch.stack([image[r : r + size, c : c + size] for r, c in zip(rows.tolist(), cols.tolist())]).unsqueeze(1)
