"""Shared fixtures: the real MNIST files, a finished FastNet run to read with, and main_mnist.py run in process."""
import os
import shutil
import sys

import pytest

import main_mnist


def mnist_files():
    """The folder of MNIST's four .gz files: $MNIST_DIR, else ../shared/mnist beside the clone, else the data folder
    where a run of main_mnist.py downloaded them."""
    if os.environ.get("MNIST_DIR"):
        return os.environ["MNIST_DIR"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folders = [os.path.join(repo, "..", "shared", "mnist"), os.path.join(repo, "data", "MNIST", "raw")]
    return next((f for f in folders if os.path.isfile(os.path.join(f, "train-images-idx3-ubyte.gz"))), folders[-1])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data folder holding MNIST's four .gz files, unpacked once for the whole suite."""
    source = mnist_files()
    if not os.path.isfile(os.path.join(source, "train-images-idx3-ubyte.gz")):
        if os.environ.get("CI"):
            pytest.fail(f"CI needs MNIST's four .gz files in {source}")
        pytest.skip(f"MNIST's .gz files are not in {source}: run `python3 main_mnist.py --dry-run` once to download "
                    f"them there, or set MNIST_DIR")
    folder = tmp_path_factory.mktemp("data")
    os.makedirs(folder / "MNIST" / "raw")
    for name in os.listdir(source):
        if name.endswith(".gz"):
            shutil.copy(os.path.join(source, name), folder / "MNIST" / "raw" / name)
    return str(folder)


def run_main(capsys, *args, main=main_mnist.main):
    """main_mnist.py (or another script's `main`) with these flags, in this process: (exit status, stdout, stderr)."""
    try:
        code = main([str(arg) for arg in args]) or 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def only_run(out_dir):
    """The one run folder main_mnist.py made under out_dir."""
    folders = [os.path.join(out_dir, name) for name in os.listdir(out_dir)]
    assert len(folders) == 1, folders
    return folders[0]


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """The folder of a finished FastNet run, its recipe as it is: one real epoch, seconds on a CPU."""
    out_dir = tmp_path_factory.mktemp("trained")
    assert main_mnist.main(["--model", "FastNet", "--data-dir", data_dir, "--out-dir", str(out_dir)]) in (0, None)
    return only_run(out_dir)
