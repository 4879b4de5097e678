"""The `mnist` source: the seed's own example, the canonical MNIST files.

Downloaded once into data/downloads/mnist/ (each file's md5 checked against the published
one, written through a temporary file and renamed: an interrupted download leaves nothing
half-written), then read from there. Offline, the first use says so in one line, and the
four files can be put there by hand. The official split is kept: the 60,000 training images
are the source, the 10,000 test images are the fixed test split.

The files are IDX: a 4-byte magic (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the values.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.validate import LABEL

log = logging.getLogger(__name__)

MIRRORS = (  # the canonical files, as torchvision fetches them
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
FILES = {  # name: md5 of the published file
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MnistUnavailable(RuntimeError):
    """The files are not cached and cannot be downloaded (one line for the user)."""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as an array of its shape."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: {len(data) - header} bytes of values, the header says {expected}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_files(
    cache_dir: Path, mirrors: tuple[str, ...] | None = None, files: dict[str, str] | None = None
) -> dict[str, Path]:
    """The four files in `cache_dir`, downloading (and checking) those missing."""
    mirrors = MIRRORS if mirrors is None else mirrors
    files = FILES if files is None else files
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = {}
    for name, expected in files.items():
        path = cache_dir / name
        if not (path.exists() and md5(path) == expected):
            _download(name, expected, path, mirrors, list(files))
        found[name] = path
    return found


def _download(
    name: str, expected: str, path: Path, mirrors: tuple[str, ...], names: list[str]
) -> None:
    import httpx

    problems = []
    for mirror in mirrors:
        url = mirror + name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                httpx.stream("GET", url, timeout=30, follow_redirects=True) as res,
            ):
                res.raise_for_status()
                for chunk in res.iter_bytes(1 << 20):
                    out.write(chunk)
            got = md5(tmp)
            if got != expected:
                problems.append(f"{url}: md5 {got}, expected {expected}")
                continue
            os.replace(tmp, path)
            log.info("downloaded %s (md5 verified)", url)
            return
        except httpx.HTTPError as exc:
            problems.append(f"{url}: {type(exc).__name__}: {str(exc)[:120]}")
        finally:
            tmp.unlink(missing_ok=True)
    raise MnistUnavailable(
        f"cannot download MNIST's {name} (offline?): {problems[0]}; put the four files "
        f"({', '.join(names)}) in {path.parent} to use them"
    )


def _frame(images: np.ndarray, labels: np.ndarray, path: Path) -> pd.DataFrame:
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"{path}: {images.shape} images for {labels.shape} labels")
    flat = images.reshape(len(images), -1).astype(np.float32)
    frame = pd.DataFrame(flat, columns=[f"pixel{i}" for i in range(flat.shape[1])])
    frame.insert(0, LABEL, labels.astype(np.int64))
    return frame


def load_mnist(cache_dir: Path, **download) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training images, official test images) as `label, pixel0..pixel783` frames, pixel
    values 0-255 as in the files."""
    files = ensure_files(cache_dir, **download)
    train = _frame(
        read_idx(files["train-images-idx3-ubyte.gz"]),
        read_idx(files["train-labels-idx1-ubyte.gz"]),
        cache_dir,
    )
    test = _frame(
        read_idx(files["t10k-images-idx3-ubyte.gz"]),
        read_idx(files["t10k-labels-idx1-ubyte.gz"]),
        cache_dir,
    )
    return train, test
