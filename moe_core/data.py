"""A real, offline byte-level corpus: the Python standard library's own source code.

Every machine with Python has it, so training needs no download, and the bytes are fixed for
a given Python installation, so runs are reproducible there.

Shape legend:
    N  bytes in a split
    B  batch
    T  sequence position (time)
"""

from __future__ import annotations

import math
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

SPLITS = ("train", "val")
# Third-party packages live under the stdlib directory; they are not part of the corpus.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_source_files(root: Path) -> list[Path]:
    """All .py files under ``root`` outside site-packages, sorted by relative path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def read_bytes(paths: list[Path], max_bytes: int) -> tuple[bytes, int]:
    """Concatenate files in order up to ``max_bytes``; return the bytes and files used."""
    parts: list[bytes] = []
    total = 0
    used = 0
    for path in paths:
        if total >= max_bytes:
            break
        try:
            content = path.read_bytes()
        except OSError:
            continue  # unreadable (permissions, broken link): skip, order stays deterministic
        parts.append(content[: max_bytes - total])
        total += len(parts[-1])
        used += 1
    return b"".join(parts), used


class ByteCorpus:
    """A byte stream split into train (first part) and val (last ``val_fraction``)."""

    def __init__(self, data_N: Tensor, *, val_fraction: float = 0.05, num_files: int = 0) -> None:
        if data_N.dtype != torch.uint8 or data_N.dim() != 1:
            raise ValueError(
                f"data: expected a 1-D uint8 tensor, got {data_N.dtype} {tuple(data_N.shape)}"
            )
        if not (isinstance(val_fraction, float) and 0.0 < val_fraction < 1.0):
            raise ValueError(f"val_fraction: must be a float in (0, 1), got {val_fraction!r}")
        if data_N.numel() == 0:
            raise ValueError("data: the corpus is empty")
        num_train = data_N.numel() - math.floor(data_N.numel() * val_fraction)
        self.data = data_N
        self.num_files = num_files
        self.splits = {"train": data_N[:num_train], "val": data_N[num_train:]}

    @classmethod
    def from_bytes(cls, data: bytes, *, val_fraction: float = 0.05) -> ByteCorpus:
        if not data:
            raise ValueError("data: the corpus is empty")
        # bytearray: torch.frombuffer wants a writable buffer; clone so the tensor owns memory.
        tensor_N = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
        return cls(tensor_N, val_fraction=val_fraction)

    @classmethod
    def from_stdlib(
        cls, max_bytes: int = 2_000_000, *, val_fraction: float = 0.05, root: str | None = None
    ) -> ByteCorpus:
        """Read the stdlib's .py files in sorted path order, up to ``max_bytes`` bytes."""
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"max_bytes: must be a positive integer, got {max_bytes!r}")
        stdlib = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
        data, num_files = read_bytes(stdlib_source_files(stdlib), max_bytes)
        if not data:
            raise ValueError(f"root: no readable .py files under {str(stdlib)!r}")
        corpus = cls.from_bytes(data, val_fraction=val_fraction)
        corpus.num_files = num_files
        return corpus

    def __len__(self) -> int:
        return self.data.numel()

    def split(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"split: must be one of {SPLITS}, got {name!r}")
        return self.splits[name]

    def batches(
        self, split: str, batch_size: int, seq_len: int, seed: int, start: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Infinite random windows ``(x [B, T] long, y [B, T] long)`` with y = x shifted by one.

        Arguments are checked here, before the first batch is asked for, and the stream is a
        pure function of (corpus, split, batch_size, seq_len, seed). ``start`` skips that many
        batches (the data position a checkpoint stores), so a resumed run sees the same stream.
        """
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start: must be a non-negative integer, got {start!r}")
        data_N = self.split(split)
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if data_N.numel() <= seq_len:
            raise ValueError(
                f"seq_len: {seq_len} needs at least {seq_len + 1} bytes, "
                f"split {split!r} has {data_N.numel()}"
            )
        generator = torch.Generator().manual_seed(seed)
        high = data_N.numel() - seq_len
        for _ in range(start):  # replays only the generator's draws, not the gathers
            torch.randint(0, high, (batch_size,), generator=generator)
        return _windows(data_N, batch_size, seq_len, generator)


def _windows(
    data_N: Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    offsets_T = torch.arange(seq_len + 1)
    while True:
        starts_B = torch.randint(0, data_N.numel() - seq_len, (batch_size,), generator=generator)
        window_BT = data_N[starts_B.unsqueeze(1) + offsets_T].long()
        yield window_BT[:, :-1], window_BT[:, 1:]
