"""Shared fixtures: the real MNIST files (if this machine has them) and a tiny synthetic MNIST the tests write."""
import gzip
import hashlib
import os
import shutil
import socket
import struct

import matplotlib.image
import pytest
import torch
from torchvision import datasets

import utils
from machinery import hardware

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_FILES = [name for name, _ in datasets.MNIST.resources]


def real_mnist_dir():
    """Where the four original .gz files are: $MNIST_DIR, else ../shared/mnist beside the repo; None if absent."""
    folder = os.environ.get("MNIST_DIR") or os.path.join(REPO, "..", "shared", "mnist")
    return folder if all(os.path.isfile(os.path.join(folder, name)) for name in MNIST_FILES) else None


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory):
    """A data folder holding the real MNIST files, laid out as torchvision expects (DATA_DIR/MNIST/raw)."""
    source = real_mnist_dir()
    if source is None:
        pytest.skip("real MNIST files not found: set MNIST_DIR to a folder with the four .gz files "
                    "(default ../shared/mnist)")
    data_dir = tmp_path_factory.mktemp("data")
    raw = os.path.join(data_dir, "MNIST", "raw")
    os.makedirs(raw)
    for name in MNIST_FILES:
        shutil.copy(os.path.join(source, name), raw)
    return str(data_dir)


def closed_port():
    """A local TCP port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_network(monkeypatch):
    """torchvision's MNIST mirrors pointed at a closed local port, so a download fails at once and deterministically."""
    monkeypatch.setattr(datasets.MNIST, "mirrors", [f"http://127.0.0.1:{closed_port()}/"])


def idx_bytes(tensor):
    """The IDX format of MNIST's files: magic (0, 0, type 0x08 = ubyte, number of dims), big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, tensor.dim()) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    return header + tensor.to(torch.uint8).numpy().tobytes()


def write_tiny_mnist(data_dir, monkeypatch, train=64, test=32):
    """Writes a tiny MNIST (random strokes, labels 0-9 in turn) as the four .gz files into data_dir/MNIST/raw, and
    makes torchvision and utils accept their checksums. Returns {(split, 'images'|'labels'): tensor}."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    contents = {}
    for split, count in (("train", train), ("t10k", test)):
        contents[split, "images"] = (torch.rand(count, 28, 28, generator=generator) > 0.8).to(torch.uint8) * 255
        contents[split, "labels"] = torch.arange(count) % 10
    resources, decompressed = [], {}
    for (split, kind), tensor in contents.items():
        name = f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
        data = idx_bytes(tensor)
        packed = gzip.compress(data)
        with open(os.path.join(raw, name + ".gz"), "wb") as f:
            f.write(packed)
        resources.append((name + ".gz", hashlib.md5(packed).hexdigest()))
        decompressed[name] = hashlib.md5(data).hexdigest()
    monkeypatch.setattr(datasets.MNIST, "resources", resources)
    monkeypatch.setattr(utils, "DECOMPRESSED_MD5", decompressed)
    return contents


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch, no_network):
    """A data folder with a tiny synthetic MNIST (64 training and 32 test images) that loads with no network."""
    data_dir = tmp_path / "data"
    write_tiny_mnist(data_dir, monkeypatch)
    return str(data_dir)


@pytest.fixture(scope="session")
def trained_model(real_data_dir, tmp_path_factory):
    """The model.pt of a CompactNet trained for one epoch on real MNIST (about 99% on the test set), trained once
    for all the tests that read digits: 15 s on an idle 2-core CPU, a minute or more on a busy one."""
    import main_mnist
    folder = tmp_path_factory.mktemp("trained") / "run"
    main_mnist.main(["--model", "CompactNet", "--epochs", "1", "--data-dir", real_data_dir, "--out-dir", str(folder)])
    return str(folder / "model.pt")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture(autouse=True)
def quick_layout_timing(monkeypatch):
    """The layout timing of a test's run (LAYOUT = "auto"), which times real steps, kept to a few steps: a test
    checks that the choice is made and recorded, not which layout is faster here (test_hardware.py checks the
    rule on set speeds)."""
    monkeypatch.setattr(hardware, "LAYOUT_PROBE_SECONDS", 0.01)
