"""The stdlib byte corpus: deterministic content, splits and batches."""

import sysconfig
from pathlib import Path

import pytest
import torch

from moe_core import ByteCorpus
from moe_core.data import stdlib_source_files


@pytest.fixture(scope="module")
def corpus():
    return ByteCorpus.from_stdlib(max_bytes=200_000)


def test_corpus_reads_exactly_max_bytes_of_stdlib_source(corpus):
    assert len(corpus) == 200_000 and corpus.data.dtype == torch.uint8
    assert corpus.num_files > 1
    assert b"def " in bytes(corpus.data.tolist())


def test_corpus_is_deterministic_across_loads(corpus):
    assert torch.equal(ByteCorpus.from_stdlib(max_bytes=200_000).data, corpus.data)


def test_corpus_starts_with_the_first_sorted_stdlib_file():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    first = stdlib_source_files(stdlib)[0]
    head = first.read_bytes()[:1000]
    assert bytes(ByteCorpus.from_stdlib(max_bytes=len(head)).data.tolist()) == head


def test_stdlib_files_are_sorted_and_skip_site_packages():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_source_files(stdlib)
    relative = [f.relative_to(stdlib).as_posix() for f in files]
    assert relative == sorted(relative)
    assert not any("site-packages" in path for path in relative)
    assert "os.py" in relative


def test_validation_split_is_the_last_five_percent(corpus):
    train, val = corpus.split("train"), corpus.split("val")
    assert (train.numel(), val.numel()) == (190_000, 10_000)
    assert torch.equal(torch.cat([train, val]), corpus.data)


def test_batches_are_shifted_windows_of_the_split(corpus):
    x, y = next(corpus.batches("val", 4, 16, seed=0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    val = bytes(corpus.split("val").tolist())
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        assert bytes(row_x + row_y[-1:]) in val


def test_batches_are_deterministic_given_the_seed(corpus):
    a, b, c = (corpus.batches("train", 8, 32, seed=s) for s in (5, 5, 6))
    for _ in range(3):
        xa, xb, xc = next(a)[0], next(b)[0], next(c)[0]
        assert torch.equal(xa, xb)
        assert not torch.equal(xa, xc)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("test", 4, 16, 0), "split"),
        (("train", 0, 16, 0), "batch_size"),
        (("train", 4, -1, 0), "seq_len"),
        (("val", 4, 10_000, 0), "seq_len"),  # val holds exactly 10_000 bytes: one too few
    ],
)
def test_batches_reject_bad_arguments_before_iterating(corpus, args, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        corpus.batches(*args)


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"max_bytes": 0}, "max_bytes"), ({"val_fraction": 1.0}, "val_fraction")]
)
def test_from_stdlib_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        ByteCorpus.from_stdlib(**kwargs)


def test_from_stdlib_rejects_a_directory_without_sources(tmp_path):
    with pytest.raises(ValueError, match="root"):
        ByteCorpus.from_stdlib(root=str(tmp_path))


def test_batches_from_a_start_position_continue_the_same_stream() -> None:
    corpus = ByteCorpus.from_bytes(bytes(range(256)) * 40)
    full = corpus.batches("train", 3, 16, seed=5)
    expected = [next(full) for _ in range(7)][4:]
    resumed = corpus.batches("train", 3, 16, seed=5, start=4)
    for want_x, _ in expected:
        got_x, _ = next(resumed)
        assert torch.equal(got_x, want_x)
