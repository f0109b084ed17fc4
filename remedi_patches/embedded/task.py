"""The embedded task: seeded GSM8K-shaped word problems with short worked solutions.

    Question: Mia has 14 shells. She finds 7 more. She gives away 9. She doubles them. How many shells does
    Mia have now?
    Answer: 14+7=21. 21-9=12. 12*2=24. #### 24

Each solution line copies its operands (the previous line's result and a number from the question) and does
one small operation, so every step is local for a tiny bidirectional model, while later lines depend on earlier
results: exactly what goes wrong when a diffusion sampler commits many tokens per step.

Splits are disjoint by construction: a problem belongs to the split its solution hashes to (5% test, 5% val,
90% train), so no test solution, and hence no test question, can ever be drawn for train.
"""

import argparse
import hashlib
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from remedi_patches.cli import ArgumentParser, add_config_args, arg, config_from_args, run_main

NAMES = (
    ("Tom", "He"), ("Sam", "He"), ("Ben", "He"), ("Max", "He"), ("Leo", "He"), ("Jack", "He"),
    ("Ann", "She"), ("Mia", "She"), ("Lily", "She"), ("Zoe", "She"), ("Eva", "She"), ("Kate", "She"),
)
OBJECTS = (
    "apples", "pens", "books", "cards", "coins", "eggs", "toys", "shells", "stamps", "marbles", "cookies", "stickers",
)
ADD_PHRASES = ("buys {n} more", "finds {n} more", "gets {n} more", "wins {n} more")
SUB_PHRASES = ("gives away {n}", "loses {n}", "sells {n}", "uses {n}")
MUL_PHRASES = {2: "doubles them", 3: "triples them"}
OPS = ("add", "sub", "mul")
SPLITS = ("train", "val", "test")
SPLIT_BUCKETS = 20  # solution hash % 20: 0 -> test, 1 -> val, 2..19 -> train


@dataclass(frozen=True)
class TaskConfig:
    min_ops: int = arg(2, "fewest operations per problem (drawn uniformly in [min_ops, max_ops])")
    max_ops: int = arg(3, "most operations per problem")
    max_start: int = arg(20, "largest starting amount (drawn in [2, max_start])")
    max_operand: int = arg(9, "largest amount added or taken away (drawn in [1, max_operand])")
    max_value: int = arg(30, "largest intermediate result (every result stays in [0, max_value]; 99 is far "
                             "harder to learn)")
    mul: bool = arg(True, "'doubles / triples them' steps besides add and subtract", cli=False)  # --mul/--no-mul

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= --min_ops <= --max_ops, got {self.min_ops}, {self.max_ops}")
        if not 2 <= self.max_start <= self.max_value:
            raise ValueError(f"need 2 <= --max_start <= --max_value, got {self.max_start}, {self.max_value}")
        if self.max_operand < 1:
            raise ValueError(f"--max_operand must be >= 1, got {self.max_operand}")


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # worked solution ending in "#### N" (the GSM8K `answer` field)
    answer: int


def format_prompt(question: str) -> str:
    """The one prompt format of the embedded task; the solution follows after a single space."""
    return f"Question: {question}\nAnswer:"


def _allowed_ops(value: int, cfg: TaskConfig) -> list[str]:
    ok = {"add": value < cfg.max_value, "sub": value >= 1, "mul": cfg.mul and 1 <= value <= cfg.max_value // 2}
    return [op for op in OPS if ok[op]]


def generate_problem(rng: random.Random, config: TaskConfig = TaskConfig()) -> Problem:
    """One problem from `rng` (a `random.Random`); the same rng state always gives the same problem."""
    name, pronoun = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    value = rng.randint(2, config.max_start)
    sentences = [f"{name} has {value} {obj}."]
    lines = []
    for _ in range(rng.randint(config.min_ops, config.max_ops)):
        op = rng.choice(_allowed_ops(value, config))
        if op == "add":
            n = rng.randint(1, min(config.max_operand, config.max_value - value))
            new, symbol, phrase = value + n, "+", rng.choice(ADD_PHRASES).format(n=n)
        elif op == "sub":
            n = rng.randint(1, min(config.max_operand, value))
            new, symbol, phrase = value - n, "-", rng.choice(SUB_PHRASES).format(n=n)
        else:
            n = rng.choice([f for f in MUL_PHRASES if f * value <= config.max_value])
            new, symbol, phrase = value * n, "*", MUL_PHRASES[n]
        sentences.append(f"{pronoun} {phrase}.")
        lines.append(f"{value}{symbol}{n}={new}.")
        value = new
    sentences.append(f"How many {obj} does {name} have now?")
    return Problem(question=" ".join(sentences), solution=" ".join(lines + [f"#### {value}"]), answer=value)


def split_of(problem: Problem) -> str:
    """The split a problem belongs to, from a stable hash of its solution."""
    bucket = int.from_bytes(hashlib.blake2b(problem.solution.encode(), digest_size=8).digest(), "big") % SPLIT_BUCKETS
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def make_split(n: int, seed: int, split: str, config: TaskConfig = TaskConfig()) -> list[Problem]:
    """`n` problems of `split`, deterministic in (seed, split, config); splits never share a solution."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"remedi-embedded/{split}/{seed}")
    out = []
    while len(out) < n:
        problem = generate_problem(rng, config)
        if split_of(problem) == split:
            out.append(problem)
    return out


def write_jsonl(path: str | Path, problems: Iterable[Problem]) -> None:
    """GSM8K layout: {"question": ..., "answer": "<worked solution> #### N"} per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"question": p.question, "answer": p.solution}) + "\n")


def read_jsonl(path: str | Path) -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write it with `python -m remedi_patches.embedded.task`")
    out = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            out.append(Problem(row["question"], row["answer"], int(row["answer"].split("####")[-1])))
    return out


def length_stats(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 2),
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max": ordered[-1],
    }


def _command(args: argparse.Namespace) -> str:
    """The command that rebuilds these files, output folders left as placeholders."""
    flags = [f"--{k} {v}" for k, v in vars(args).items() if k not in ("out_dir", "tokenizer_dir", "mul")]
    flags.append("--mul" if args.mul else "--no-mul")
    return "python -m remedi_patches.embedded.task --out_dir DIR --tokenizer_dir TOKENIZER_DIR " + " ".join(flags)


def main(argv=None):
    p = ArgumentParser(description="Write the embedded task (train/val/test jsonl in GSM8K layout) and train its "
                       "tokenizer.")
    p.add_argument("--out_dir", required=True, help="folder for train.jsonl, val.jsonl, test.jsonl, task.json")
    p.add_argument("--tokenizer_dir", default=None, help="where the tokenizer goes; None = OUT_DIR/tokenizer")
    p.add_argument("--n_train", type=int, default=50000, help="training problems")
    p.add_argument("--n_val", type=int, default=500, help="validation problems")
    p.add_argument("--n_test", type=int, default=500, help="held-out test problems")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator and the tokenizer trainer")
    p.add_argument("--vocab_size", type=int, default=512, help="tokenizer size incl. 256 byte pieces and 3 specials")
    add_config_args(p, TaskConfig)
    p.add_argument("--mul", action=argparse.BooleanOptionalAction, default=TaskConfig.mul,
                   help=TaskConfig.__dataclass_fields__["mul"].metadata["help"])
    args = p.parse_args(argv)
    config = config_from_args(TaskConfig, args)  # checked before anything is generated or written
    for s in SPLITS:
        if getattr(args, f"n_{s}") < (1 if s == "train" else 0):
            raise ValueError(f"--n_{s} must be >= {1 if s == 'train' else 0}, got {getattr(args, f'n_{s}')}")

    from remedi_patches.embedded.tokenizer import train_tokenizer

    out_dir = Path(args.out_dir)
    t0 = time.perf_counter()
    splits = {s: make_split(getattr(args, f"n_{s}"), args.seed, s, config) for s in SPLITS}
    t_gen = time.perf_counter() - t0
    for s, problems in splits.items():
        write_jsonl(out_dir / f"{s}.jsonl", problems)
    t0 = time.perf_counter()
    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else out_dir / "tokenizer"
    texts = [format_prompt(q.question) + " " + q.solution for q in splits["train"]]
    tokenizer = train_tokenizer(texts, tok_dir, args.vocab_size, args.seed)
    t_tok = time.perf_counter() - t0

    stats = {"generate_s": round(t_gen, 2), "tokenizer_s": round(t_tok, 2), "vocab_size": len(tokenizer)}
    for s, problems in splits.items():
        if problems:
            prompts = tokenizer([format_prompt(q.question) for q in problems])["input_ids"]
            solutions = tokenizer([q.solution for q in problems])["input_ids"]
            stats[s] = {"prompt_tokens": length_stats([len(x) for x in prompts]),
                        "solution_tokens": length_stats([len(x) for x in solutions])}
    meta = {"config": asdict(config), "seed": args.seed, "sizes": {s: len(v) for s, v in splits.items()},
            "command": _command(args), "stats": stats}
    for folder in (out_dir, tok_dir):  # the tokenizer keeps a copy: how it was made travels with it
        (folder / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    run_main(main)
