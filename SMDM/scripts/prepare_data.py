"""Tokenise text into the packed token files that train_mdm.py streams (LITPKDS format).

    python SMDM/scripts/prepare_data.py --input corpus/*.jsonl --tokenizer path/to/tokenizer \
        --out_dir data/packed/train --prefix train

Inputs: .jsonl / .json (JSON lines or a JSON array of records, text in --text_field) and .txt
(one document per non-empty line); folders are searched for such files. Each document becomes [BOS] ids EOS (BOS
only when the tokenizer defines one); documents are concatenated and cut into chunk files of
--chunk_size tokens (the last file holds the remainder). Token dtype is uint16 when the
vocabulary (plus the mask id) fits, else int32. The tokenizer is loaded with
transformers.AutoTokenizer from a local folder (or a hub name where the hub is reachable).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from lit_gpt.packed_dataset import token_dtype, write_chunk
from lit_gpt.training import check_writable_dir, require_path, write_packed_meta
from remedi_patches.cli import ArgumentParser, UserError, add_config_args, arg, config_from_args, run_main
from remedi_patches.data import json_records
from remedi_patches.run_lock import RunLock

SUFFIXES = (".jsonl", ".json", ".txt")


@dataclass
class PrepareConfig:
    input: Optional[list[Path]] = arg(None, ".jsonl/.json/.txt files or folders of them (required)")
    tokenizer: Optional[str] = arg(None, "tokenizer folder (AutoTokenizer.from_pretrained) (required)")
    out_dir: Optional[Path] = arg(None, "folder for the <prefix>_XXXXXXXXXX.bin files (required)")
    prefix: str = arg("train", "file name prefix")
    text_field: str = arg("text", "field holding the text in json records")
    chunk_size: int = arg(2048 * 1024, "tokens per file")
    batch_docs: int = arg(1000, "documents tokenised per tokenizer call")

    def check(self) -> "PrepareConfig":
        for name in ("input", "tokenizer", "out_dir"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required (see --help)")
        for path in self.input:
            require_path(path, "--input")
        require_path(self.tokenizer, "--tokenizer", kind="model")
        if self.chunk_size < 1 or self.batch_docs < 1:
            raise UserError(f"--chunk_size and --batch_docs must be >= 1, got {self.chunk_size}, {self.batch_docs}")
        return self


def parse_args(argv: Optional[list[str]] = None) -> PrepareConfig:
    parser = add_config_args(ArgumentParser(description=__doc__.split("\n")[0]), PrepareConfig)
    return config_from_args(PrepareConfig, parser.parse_args(argv)).check()


def input_files(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        elif path.is_file() and path.suffix in SUFFIXES:
            files.append(path)
        elif path.exists():
            raise ValueError(f"{path} is not a .jsonl, .json or .txt file; convert it or pass a folder of such files.")
        else:
            raise FileNotFoundError(f"Input {path} does not exist; check --input.")
    if not files:
        raise FileNotFoundError(f"No .jsonl/.json/.txt files under {', '.join(map(str, paths))}.")
    return files


def documents(path: Path, text_field: str) -> Iterator[str]:
    """Texts of one input file: .txt lines, or the `text_field` of each record of a JSON-lines / JSON-array file."""
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            yield from (line.strip() for line in f if line.strip())
        return
    for where, record in json_records(path):
        yield _text(record, text_field, f"{path}, {where}")


def _text(record: dict, text_field: str, where: str) -> str:
    if text_field not in record:
        fields = sorted(record)
        raise ValueError(f"{where} has no field {text_field!r}; fields present: {fields}. Pass --text_field.")
    return str(record[text_field])


def pack(files: list[Path], tokenizer, out_dir: Path, prefix: str, text_field: str, chunk_size: int,
         batch_docs: int) -> tuple[list[Path], int, int]:
    """Write chunk files; returns (files written, documents, tokens)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token, which separates documents; set tokenizer.eos_token.")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    dtype = token_dtype(len(tokenizer))
    buf = np.empty(chunk_size, dtype=dtype)
    fill, written, n_docs, n_tokens = 0, [], 0, 0

    def flush(n: int) -> None:
        path = out_dir / f"{prefix}_{len(written):010d}.bin"
        write_chunk(path, buf[:n])
        written.append(path)

    def add(ids: list[int]) -> None:
        nonlocal fill
        arr = np.asarray(ids, dtype=dtype)
        while len(arr):
            take = min(chunk_size - fill, len(arr))
            buf[fill:fill + take] = arr[:take]
            fill, arr = fill + take, arr[take:]
            if fill == chunk_size:
                flush(chunk_size)
                fill = 0

    batch: list[str] = []
    for path in files:
        for text in documents(path, text_field):
            batch.append(text)
            if len(batch) == batch_docs:
                n_docs, n_tokens = n_docs + len(batch), n_tokens + _add_batch(tokenizer, batch, bos, add)
                batch = []
    if batch:
        n_docs, n_tokens = n_docs + len(batch), n_tokens + _add_batch(tokenizer, batch, bos, add)
    if fill:
        flush(fill)
    return written, n_docs, n_tokens


def _add_batch(tokenizer, texts: list[str], bos: list[int], add) -> int:
    n = 0
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        doc = bos + ids + [tokenizer.eos_token_id]
        add(doc)
        n += len(doc)
    return n


def main(argv: Optional[list[str]] = None) -> list[Path]:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    files = input_files(args.input)
    existing = sorted(args.out_dir.glob(f"{args.prefix}_*.bin"))
    if existing:
        raise UserError(f"{args.out_dir} already holds {len(existing)} '{args.prefix}_*.bin' files; remove them or "
                        "choose another --out_dir / --prefix so datasets do not mix.")
    check_writable_dir(args.out_dir, "--out_dir")
    with RunLock(args.out_dir):
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        written, n_docs, n_tokens = pack(files, tokenizer, args.out_dir, args.prefix, args.text_field,
                                         args.chunk_size, args.batch_docs)
        write_packed_meta(args.out_dir, args.prefix, args.tokenizer, len(tokenizer), n_docs, n_tokens)
    print(f"{n_docs} documents, {n_tokens} tokens ({np.dtype(token_dtype(len(tokenizer))).name}, vocab "
          f"{len(tokenizer)}) -> {len(written)} files in {args.out_dir}")
    return written


if __name__ == "__main__":
    run_main(main)
