"""Image data sets: MNIST from its offline package copy, Fashion-MNIST's idx files, a pickle reader that
refuses anything but arrays, and clear errors."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from papertrain.data import images, sources
from papertrain.data.images import ImageClassification
from papertrain.errors import PapertrainError


def test_mnist_has_the_standard_split_and_pixels_in_0_1() -> None:
    data = ImageClassification("mnist", train_examples=1000)
    assert (len(data.train), len(data.val), len(data.test)) == (1000, 10_000, 10_000)
    batch = data.train.batch(torch.arange(5))
    assert batch["image"].shape == (5, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["label"].tolist() == [5, 0, 4, 1, 9]  # the first digits of LeCun's training set
    assert 0.0 <= float(data.val.tensors["image"].min()) and float(data.val.tensors["image"].max()) <= 1.0
    assert sorted(data.test.tensors["label"].unique().tolist()) == list(range(10))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_the_pickle_reader_refuses_anything_but_arrays(tmp_path: Path) -> None:
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as file:
        pickle.dump(_Evil(), file)
    with pytest.raises(PapertrainError, match="refusing posix.system|refusing os.system"):
        images._read_nielsen_pickle(path)


def write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.to(torch.uint8).numpy().tobytes())


def test_fashion_mnist_reads_idx_files_and_holds_out_the_last_10000_for_validation(tmp_path: Path) -> None:
    pixels = torch.randint(0, 256, (10_050, 28, 28))
    labels = torch.arange(10_050) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", pixels)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels[:20])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:20])
    data = ImageClassification("fashion_mnist", path=str(tmp_path))
    assert (len(data.train), len(data.val), len(data.test)) == (50, 10_000, 20)
    torch.testing.assert_close(data.val.tensors["image"][0, 0], pixels[50].float() / 255)
    assert data.class_names[9] == "Ankle boot"


def test_a_truncated_idx_file_is_a_clear_error(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "bad.gz", "wb") as file:
        file.write(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 100) + bytes(10))
    with pytest.raises(PapertrainError, match="truncated"):
        images._read_idx(tmp_path / "bad.gz")


def test_bad_settings_and_missing_data_are_clear_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(PapertrainError, match="not an image classification set"):
        ImageClassification("cifar10")
    with pytest.raises(PapertrainError, match="train_examples=0"):
        ImageClassification("mnist", train_examples=0)
    # a machine without Debian's package (tests run offline): the error names both fixes
    absent = dataclasses.replace(sources.REGISTRY["fashion_mnist"],
                                 system=(sources.SystemCopy(str(tmp_path / "absent"), "apt install dataset-fashion-mnist"),))
    monkeypatch.setitem(sources.REGISTRY, "fashion_mnist", absent)
    with pytest.raises(PapertrainError, match="apt install dataset-fashion-mnist") as error:
        ImageClassification("fashion_mnist")
    assert "fashion-mnist.s3-website" in str(error.value)
