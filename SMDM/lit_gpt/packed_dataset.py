"""Packed token files (the TinyLlama / SMDM `LITPKDS` format) and a deterministic sample order.

File layout (little endian), one file per chunk, named `<prefix>_<counter:010d>.bin`:

    b"LITPKDS"  | version u64 (=1) | dtype code u8 | chunk_size u64 | chunk_size tokens

dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float32, 7 float64, 8 uint16.
Documents are concatenated (each ending with EOS) and cut into chunks; a reader cuts every chunk
into blocks of `block_size` tokens (a trailing remainder shorter than a block is unused).

Unlike upstream's buffered iterable stream, samples here are addressed by index: sample `g` of
the infinite stream is block `perm_e[g mod N]` of epoch `e = g // N`, where `perm_e` is a
permutation seeded by (seed, e). A trainer asks for the samples of optimizer step `s` directly,
so the data order depends only on the seed and the global batch size, never on the number of
processes, workers or on where a run was resumed.
"""
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch

HDR_MAGIC = b"LITPKDS"
HDR_SIZE = 24  # 7 + 8 + 1 + 8 bytes
VERSION = 1
MAX_OPEN_FILES = 64
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16}


def dtype_code(dtype) -> int:
    for code, dt in DTYPES.items():
        if np.dtype(dt) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {dtype} has no LITPKDS code; use one of {[np.dtype(d).name for d in DTYPES.values()]}")


def token_dtype(vocab_size: int):
    """uint16 when every id (including the mask id = vocab_size) fits, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def write_chunk(path: Union[str, Path], tokens: np.ndarray) -> None:
    """Write one chunk file holding `tokens` (1-D, its dtype is recorded in the header)."""
    tokens = np.ascontiguousarray(tokens)
    with open(path, "wb") as f:
        f.write(HDR_MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", dtype_code(tokens.dtype)))
        f.write(struct.pack("<Q", tokens.shape[0]))
        f.write(tokens.tobytes(order="C"))


def read_header(path: Union[str, Path]) -> tuple[np.dtype, int]:
    """(dtype, chunk_size) of a chunk file; ValueError if it is not a complete LITPKDS file."""
    path = Path(path)
    with open(path, "rb") as f:
        header = f.read(HDR_SIZE)
    if len(header) < HDR_SIZE or header[:7] != HDR_MAGIC:
        raise ValueError(f"{path} is not a packed token file (no LITPKDS header); "
                         "make packed files with SMDM/scripts/prepare_data.py.")
    (version,) = struct.unpack("<Q", header[7:15])
    (code,) = struct.unpack("<B", header[15:16])
    (chunk_size,) = struct.unpack("<Q", header[16:24])
    if version != VERSION or code not in DTYPES:
        raise ValueError(f"{path}: unsupported LITPKDS version {version} / dtype code {code}.")
    dtype = np.dtype(DTYPES[code])
    expected = HDR_SIZE + chunk_size * dtype.itemsize
    if path.stat().st_size != expected:
        raise ValueError(f"{path} is truncated ({path.stat().st_size} bytes, header says {expected}); "
                         "re-run prepare_data.py for this data.")
    return dtype, chunk_size


class PackedDataset(torch.utils.data.Dataset):
    """Map-style view of packed chunk files as blocks of `block_size` tokens (int64 tensors)."""

    def __init__(self, filenames: Sequence[Union[str, Path]], block_size: int) -> None:
        if not filenames:
            raise FileNotFoundError("No packed token files given; make them with SMDM/scripts/prepare_data.py.")
        self.filenames = [Path(f) for f in filenames]
        self.block_size = block_size
        self._open: OrderedDict[int, np.memmap] = OrderedDict()
        self._dtypes, counts = [], []
        for f in self.filenames:
            dtype, chunk_size = read_header(f)
            self._dtypes.append(dtype)
            counts.append(chunk_size // block_size)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])  # block index where each file starts
        if self._offsets[-1] == 0:
            raise ValueError(f"No file in {self.filenames[0].parent} holds a full block of {block_size} tokens; "
                             "lower --seq_len or pack more text per chunk (prepare_data.py --chunk_size).")

    @classmethod
    def from_dir(cls, data_dir: Union[str, Path], block_size: int, pattern: str = "*.bin") -> "PackedDataset":
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data folder {str(data_dir)!r} does not exist (looked for {data_dir.resolve()}); "
                                    "check the path, or make packed token files with SMDM/scripts/prepare_data.py "
                                    f"--out_dir {data_dir}.")
        files = sorted(data_dir.glob(pattern))
        if not files:
            raise FileNotFoundError(f"No packed token files matching {pattern!r} in {data_dir}; "
                                    "make them with SMDM/scripts/prepare_data.py --out_dir " f"{data_dir}.")
        return cls(files, block_size)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _mmap(self, file_idx: int) -> np.memmap:
        """Memory map of one file; at most MAX_OPEN_FILES stay open (least recently used closed)."""
        if file_idx in self._open:
            self._open.move_to_end(file_idx)
        else:
            if len(self._open) >= MAX_OPEN_FILES:
                self._open.popitem(last=False)
            self._open[file_idx] = np.memmap(self.filenames[file_idx], dtype=self._dtypes[file_idx],
                                             mode="r", offset=HDR_SIZE)
        return self._open[file_idx]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        f = int(np.searchsorted(self._offsets, i, side="right") - 1)
        start = (i - int(self._offsets[f])) * self.block_size
        return torch.from_numpy(self._mmap(f)[start:start + self.block_size].astype(np.int64))

    def batch(self, indices: Iterable[int]) -> torch.Tensor:
        """Blocks `indices` stacked: (len(indices), block_size) int64."""
        return torch.stack([self[int(i)] for i in indices])


class SampleOrder:
    """Infinite, seeded, epoch-wise shuffled stream of dataset indices (see module docstring)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        """Dataset indices of stream samples start .. start + count - 1."""
        out = []
        for g in range(start, start + count):
            epoch, pos = divmod(g, self.n)
            out.append(int(self._permutation(epoch)[pos]) if self.shuffle else pos)
        return out
