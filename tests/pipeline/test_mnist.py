"""The `mnist` source with the real IDX parser and downloader, on small files the test
writes and serves from a real HTTP server on loopback (no internet here)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import mnist
from pipeline.ingest import DataFileError, fixed_test_path, ingest, read_fixed_test
from pipeline.preprocess import preprocess


def _idx(array: np.ndarray) -> bytes:
    """IDX bytes: two zero bytes, 0x08 (unsigned byte), ndim, big-endian dims, values."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 'digits': a bar whose position is the label."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 30, size=(n, 28, 28))
    for k, label in enumerate(labels):
        images[k, 2 + 2 * label : 4 + 2 * label, 4:24] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture
def mnist_files(tmp_path: Path) -> dict[str, bytes]:
    train_x, train_y = _images(300, 0)
    test_x, test_y = _images(60, 1)
    return {
        "train-images-idx3-ubyte.gz": gzip.compress(_idx(train_x)),
        "train-labels-idx1-ubyte.gz": gzip.compress(_idx(train_y)),
        "t10k-images-idx3-ubyte.gz": gzip.compress(_idx(test_x)),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(_idx(test_y)),
    }


def _md5s(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.md5(data).hexdigest() for name, data in files.items()}


@pytest.fixture
def mirror(tmp_path: Path, mnist_files):
    """A real HTTP server on loopback serving the files, counting the requests."""
    root = tmp_path / "mirror"
    root.mkdir()
    for name, data in mnist_files.items():
        (root / name).write_bytes(data)
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=str(root), **kw)

        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", hits, root
    server.shutdown()


def test_idx_files_parse_to_their_shape(tmp_path, mnist_files):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(mnist_files["train-images-idx3-ubyte.gz"])
    images = mnist.read_idx(path)
    assert images.shape == (300, 28, 28) and images.dtype == np.uint8
    assert (images[3, 8:10, 4:24] == 255).all()  # label 3's bar
    raw = tmp_path / "labels-idx1-ubyte"
    raw.write_bytes(_idx(np.arange(5)))
    assert mnist.read_idx(raw).tolist() == [0, 1, 2, 3, 4]
    broken = tmp_path / "broken-idx1-ubyte"
    broken.write_bytes(_idx(np.arange(5))[:-2])
    with pytest.raises(ValueError, match="the header says 5"):
        mnist.read_idx(broken)
    with pytest.raises(ValueError, match="not an IDX file"):
        mnist.read_idx(_write(tmp_path / "x-idx1-ubyte", b"PK\x03\x04"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_downloads_once_with_checksums_then_uses_the_cache(tmp_path, mirror, mnist_files):
    url, hits, _ = mirror
    cache = tmp_path / "cache"
    train, test = mnist.load_mnist(cache, mirrors=(url,), files=_md5s(mnist_files))
    assert train.shape == (300, 785) and test.shape == (60, 785)
    assert list(train.columns[:3]) == ["label", "pixel0", "pixel1"]
    assert train["pixel0"].max() <= 255 and len(hits) == 4
    mnist.load_mnist(cache, mirrors=(url,), files=_md5s(mnist_files))
    assert len(hits) == 4  # cached: nothing downloaded again
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files left


def test_a_wrong_checksum_or_no_network_is_one_clear_line(tmp_path, mirror, mnist_files):
    url, _, _ = mirror
    wrong = {**_md5s(mnist_files), "t10k-labels-idx1-ubyte.gz": "0" * 32}
    with pytest.raises(mnist.MnistUnavailable, match="md5 .*, expected 0{32}"):
        mnist.ensure_files(tmp_path / "a", mirrors=(url,), files=wrong)
    assert not (tmp_path / "a" / "t10k-labels-idx1-ubyte.gz").exists()  # nothing half-trusted
    with pytest.raises(mnist.MnistUnavailable, match=r"offline\?.*put the four files"):
        mnist.ensure_files(tmp_path / "b", mirrors=("http://127.0.0.1:9/",))


def _cache_mnist(settings, mnist_files, monkeypatch) -> None:
    """The test's IDX files in the project's MNIST cache, trusted by their md5s."""
    cache = settings.downloads_dir / "mnist"
    cache.mkdir(parents=True)
    for name, data in mnist_files.items():
        (cache / name).write_bytes(data)
    monkeypatch.setattr(mnist, "FILES", _md5s(mnist_files))


def _ingest_mnist(settings, params):
    return ingest(
        "mnist",
        settings.raw_dir,
        settings.quarantine_dir,
        params,
        download_dir=settings.downloads_dir,
    )


def test_mnist_ingests_with_its_official_test_split(settings, params, mnist_files, monkeypatch):
    """`--source mnist` from the cache: 784 pixels (a CNN), the official test images kept as
    the test split, the training images split into train and validation only."""
    _cache_mnist(settings, mnist_files, monkeypatch)
    report = _ingest_mnist(settings, params)
    assert report.rows_ok == 300 and report.fixed_test_rows == 60
    assert report.schema["feature_names"][-1] == "pixel783"
    assert fixed_test_path(settings.raw_dir / "dataset.parquet").exists()
    split = preprocess(settings.raw_dir / "dataset.parquet", settings.processed_dir, params)
    assert split["rows"]["test"] == 60 and split["rows"]["train"] + split["rows"]["val"] == 300
    assert split["image_side"] == 28

    monkeypatch.setattr(
        mnist, "FILES", {**_md5s(mnist_files), "t10k-images-idx3-ubyte.gz": "1" * 32}
    )
    monkeypatch.setattr(mnist, "MIRRORS", ("http://127.0.0.1:9/",))
    with pytest.raises(DataFileError, match="^mnist: cannot download"):
        _ingest_mnist(settings, params)


def test_a_source_without_an_official_split_replaces_mnists(
    settings, params, mnist_files, monkeypatch
):
    """The stage always writes `<name>.test.parquet` (dvc.yaml names it as an output): after
    mnist, a CSV source leaves zero rows there, so its test split is carved from its own data."""
    _cache_mnist(settings, mnist_files, monkeypatch)
    _ingest_mnist(settings, params)
    snapshot = settings.raw_dir / "dataset.parquet"
    assert read_fixed_test(snapshot) is not None
    frame = pd.read_parquet(snapshot).head(200)
    csv = settings.root / "mine.csv"
    frame.to_csv(csv, index=False)
    report = ingest(str(csv), settings.raw_dir, settings.quarantine_dir, params)
    assert report.fixed_test_rows == 0
    assert len(pd.read_parquet(fixed_test_path(snapshot))) == 0
    assert read_fixed_test(snapshot) is None
    split = preprocess(snapshot, settings.processed_dir, params)
    assert sum(split["rows"].values()) == 200
