r"""Tokenise text into the packed token files that train_mdm.py streams (LITPKDS format).

    python SMDM/scripts/prepare_data.py --input corpus/*.jsonl --tokenizer path/to/tokenizer \
        --out_dir data/packed/train --prefix train
    python SMDM/scripts/prepare_data.py --input ../shared/data/gsm8k/train.jsonl \
        --tokenizer remedi_patches/embedded/assets/tokenizer --out_dir out/packed/gsm8k    # question / answer

Inputs: .jsonl / .json (JSON lines or a JSON array of records) and .txt (one document per non-empty line);
folders are searched for such files. A record's document is its text field (--text_field, or a field named
"text"), or, for question / answer records (GSM8K, MATH, the embedded task's files, chat `messages`), the
prompt rendered by the project's one prompt rule (remedi_patches.data.render_prompt: "Question: ...
Answer:",
or --prompt_template), a space, and the answer: the text the SFT trainers and the samplers see. Fields are
found as the SFT trainers find them (remedi_patches.data.resolve_fields; --prompt_field / --answer_field to
choose). Each document becomes [BOS] ids EOS (BOS only when the tokenizer defines one); documents are
concatenated and cut into chunk files of --chunk_size tokens (the last file holds the remainder). Token dtype
is uint16 when the vocabulary (plus the mask id) fits, else int32. <prefix>_meta.json records the tokenizer
(train_mdm.py checks the model's vocabulary against it and ships it with its export). The tokenizer is loaded
with transformers.AutoTokenizer from a local folder (or a hub name where the hub is reachable).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from lit_gpt.packed_dataset import token_dtype, write_chunk
from lit_gpt.training import check_writable_dir, require_path, write_packed_meta
from remedi_patches.cli import ArgumentParser, UserError, add_config_args, arg, config_from_args, run_main
from remedi_patches.data import FieldSpec, json_records, prompts_and_answers, render_prompt, resolve_fields
from remedi_patches.run_lock import RunLock

SUFFIXES = (".jsonl", ".json", ".txt")


@dataclass
class PrepareConfig:
    input: Optional[list[Path]] = arg(None, ".jsonl/.json/.txt files or folders of them (required)")
    tokenizer: Optional[str] = arg(None, "tokenizer folder (AutoTokenizer.from_pretrained) (required)")
    out_dir: Optional[Path] = arg(None, "folder for the <prefix>_XXXXXXXXXX.bin files (required)")
    prefix: str = arg("train", "file name prefix")
    text_field: Optional[str] = arg(None, "field holding the whole document in json records; default: 'text' "
                                    "if present, else question / answer fields (see --prompt_field)")
    prompt_field: Optional[str] = arg(None, "prompt field of question / answer records; default: auto-detected "
                                      "(question, problem, instruction, prompt, ...)")
    answer_field: Optional[str] = arg(None, "answer field; default: auto-detected (solution, answer, output, ...)")
    prompt_template: Optional[str] = arg(None, "prompt text around {question}; default 'Question: "
                                         "{question}\\nAnswer:', the format of the SFT trainers and evaluators")
    chunk_size: int = arg(2048 * 1024, "tokens per file")
    batch_docs: int = arg(1000, "documents tokenised per tokenizer call")

    def check(self) -> "PrepareConfig":
        for name in ("input", "tokenizer", "out_dir"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required (see --help)")
        for path in self.input:
            require_path(path, "--input")
        require_path(self.tokenizer, "--tokenizer", kind="model")
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise UserError(f"--prompt_template {self.prompt_template!r} has no {{question}} placeholder; add one")
        if self.text_field is not None and (self.prompt_field or self.answer_field):
            raise UserError("--text_field takes the whole document; do not combine it with --prompt_field / "
                            "--answer_field")
        if self.chunk_size < 1 or self.batch_docs < 1:
            raise UserError(f"--chunk_size and --batch_docs must be >= 1, got {self.chunk_size}, {self.batch_docs}")
        return self


def parse_args(argv: Optional[list[str]] = None) -> PrepareConfig:
    parser = add_config_args(ArgumentParser(description=__doc__), PrepareConfig)
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


@dataclass(frozen=True)
class DocumentRule:
    """How a JSON record becomes one document (see the module docstring)."""

    text_field: Optional[str] = None
    prompt_field: Optional[str] = None
    answer_field: Optional[str] = None
    prompt_template: Optional[str] = None

    @classmethod
    def of(cls, cfg: "PrepareConfig") -> "DocumentRule":
        return cls(cfg.text_field, cfg.prompt_field, cfg.answer_field, cfg.prompt_template)

    def fields(self, record: dict, where: str) -> FieldSpec:
        """The fields of a file, from its first record (ValueError naming the flag and the fields present)."""
        try:
            return resolve_fields(sorted(record), self.text_field, self.prompt_field, self.answer_field)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def document(self, record: dict, spec: FieldSpec, where: str) -> str:
        missing = [f for f in (spec.text, spec.prompt, spec.answer, spec.chat) if f is not None and f not in record]
        if missing:
            raise ValueError(f"{where} has no field {missing[0]!r}; fields present: {sorted(record)}. Pass "
                             f"{'--text_field' if spec.kind == 'text' else '--prompt_field / --answer_field'}.")
        (prompt,), (answer,) = prompts_and_answers([record], spec)
        if prompt is None:
            return answer
        question = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
        return f"{render_prompt(question, self.prompt_template)} {answer}"


def documents(path: Path, rule: DocumentRule | str = DocumentRule()) -> Iterator[str]:
    """Documents of one input file: .txt lines, or one per record of a JSON-lines / JSON-array file (its text
    field, or its rendered prompt + " " + answer). A str `rule` is a text field name."""
    if isinstance(rule, str):
        rule = DocumentRule(text_field=rule)
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            yield from (line.strip() for line in f if line.strip())
        return
    spec = None
    for where, record in json_records(path):
        where = f"{path}, {where}"
        spec = spec or rule.fields(record, where)
        yield rule.document(record, spec, where)


def pack(files: list[Path], tokenizer, out_dir: Path, prefix: str, rule: DocumentRule | str, chunk_size: int,
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
        for text in documents(path, rule):
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
        written, n_docs, n_tokens = pack(files, tokenizer, args.out_dir, args.prefix, DocumentRule.of(args),
                                         args.chunk_size, args.batch_docs)
        write_packed_meta(args.out_dir, args.prefix, args.tokenizer, len(tokenizer), n_docs, n_tokens)
    print(f"{n_docs} documents, {n_tokens} tokens ({np.dtype(token_dtype(len(tokenizer))).name}, vocab "
          f"{len(tokenizer)}) -> {len(written)} files in {args.out_dir}")
    return written


if __name__ == "__main__":
    run_main(main)
