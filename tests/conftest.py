import gzip
import importlib.util
import os
import pathlib
import struct
import sys

import numpy as np
import pytest
import torch

import adaptivision  # noqa: F401  (registers the models)
from adaptivision import AdaptiVision

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _text_cache(tmp_path_factory):
    """Tests never write to the user's cache; the default text model's embeddings of the
    Fashion-MNIST class names are seeded with a fake encoder (runs with guidance=text read them)."""
    from adaptivision.guidance import DEFAULT_TEMPLATE, DEFAULT_TEXT_MODEL, class_embeddings
    from fixtures import FMNIST_CLASSES, FakeTextEncoder
    old = os.environ.get("ADAPTIVISION_CACHE")
    os.environ["ADAPTIVISION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    class_embeddings(FMNIST_CLASSES, DEFAULT_TEXT_MODEL, DEFAULT_TEMPLATE, "fashion-mnist", encoder=FakeTextEncoder())
    yield
    if old is None:
        os.environ.pop("ADAPTIVISION_CACHE")
    else:
        os.environ["ADAPTIVISION_CACHE"] = old


def tiny_model(**kw) -> AdaptiVision:
    """A small AdaptiVision (16x16 input, patch 4 -> 16 patches) for fast unit tests."""
    args = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=4, num_heads=2,
                k_min=4, k_max=16, k_step=2)
    args.update(kw)
    args.setdefault("clustering", "paper")  # the unit tests exercise the paper's form unless they say
    if args.get("reduction", "dtc") == "dtc" and args.get("cmtf") is None:
        args["cmtf"] = True  # the unit tests pass guidance of width embed_dim
    return AdaptiVision(**args)


def perturb_zero_init(model: torch.nn.Module) -> None:
    """Give the zero-initialised output layers (AFA's v, CMTF's W_o) small random values, so that
    the factors multiplied by them receive gradient too (at the exact init they cannot)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modulator.fc_v." in name or ".w_o." in name:
                p.normal_(0, 0.02)


def textured_and_flat(n_tex: int = 3, n_flat: int = 3, size: int = 16, chans: int = 3) -> torch.Tensor:
    """``n_tex`` images whose textured (noise) area grows from a quarter to all of the image,
    then ``n_flat`` constant images. Complexity is about structure, not contrast: DTC measures
    it on LayerNorm'd tokens."""
    g = torch.Generator().manual_seed(1)
    tex = torch.zeros(n_tex, chans, size, size)
    for i in range(n_tex):
        rows = max(1, round(size * (0.25 + 0.75 * i / max(n_tex - 1, 1))))
        tex[i, :, :rows] = torch.randn(chans, rows, size, generator=g) * 2
    flat = torch.ones(n_flat, chans, size, size) * torch.linspace(-1, 1, n_flat).view(-1, 1, 1, 1)
    return torch.cat([tex, flat])


def read_fmnist(n: int = 64, split: str = "t10k"):
    """The first ``n`` real Fashion-MNIST images (uint8, (n, 28, 28)) from Debian's package."""
    path = os.path.join(FMNIST_DIR, f"{split}-images-idx3-ubyte.gz")
    if not os.path.exists(path):
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST_DIR} (apt-get install dataset-fashion-mnist)")
    with gzip.open(path, "rb") as f:
        _, count, rows, cols = struct.unpack(">IIII", f.read(16))
        data = np.frombuffer(f.read(n * rows * cols), dtype=np.uint8)
    return torch.from_numpy(data.copy()).view(n, rows, cols)


def benchmark_script(name: str):
    """benchmarks/<name>.py as a module. benchmarks/ is not a package: while the script loads,
    its folder is on sys.path so that it finds the neighbours it imports (assignment_stats)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return mod
