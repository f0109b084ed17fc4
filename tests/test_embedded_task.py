import dataclasses
import json
import random
import re

import pytest
import sentencepiece as spm
import transformers

from remedi_patches.embedded import ASSETS_DIR, TOKENIZER_DIR
from remedi_patches.embedded import task as T
from remedi_patches.embedded.tokenizer import SPM_FILE, load_tokenizer, train_tokenizer
from remedi_patches.graders import extract_gsm8k_answer, grade_gsm8k

LINE = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)\.$")


def _texts(problems):
    return [T.format_prompt(p.question) + " " + p.solution for p in problems]


# ---------------------------------------------------------------------------------------------------- task


def test_generation_is_deterministic_and_seed_dependent():
    assert T.make_split(50, 0, "train") == T.make_split(50, 0, "train")
    assert T.make_split(50, 0, "train") != T.make_split(50, 1, "train")
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [T.generate_problem(rng_a) for _ in range(20)] == [T.generate_problem(rng_b) for _ in range(20)]


@pytest.mark.parametrize("config", [T.TaskConfig(), T.TaskConfig(min_ops=1, max_ops=4, max_value=99, mul=False)])
def test_solutions_are_correct_worked_chains(config):
    for p in T.make_split(2000, 0, "train", config):
        parts = p.solution.split(" ")
        assert parts[-2] == "####" and int(parts[-1]) == p.answer
        steps = [LINE.match(x) for x in parts[:-2]]
        assert all(steps), p.solution
        assert config.min_ops <= len(steps) <= config.max_ops
        question_numbers = [int(n) for n in re.findall(r"\d+", p.question)]
        value = question_numbers.pop(0)
        assert 2 <= value <= config.max_start
        for m in steps:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a == value  # each line starts from the previous result
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert 0 <= c <= config.max_value
            if op == "*":
                assert b in (2, 3) and config.mul
            else:
                assert 1 <= b <= config.max_operand and b == question_numbers.pop(0)  # operands in question order
            value = c
        assert not question_numbers and value == p.answer


def test_splits_are_disjoint():
    train = T.make_split(20000, 0, "train")
    for split in ("val", "test"):
        held_out = T.make_split(500, 0, split)
        assert all(T.split_of(p) == split for p in held_out)
        assert not {p.question for p in held_out} & {p.question for p in train}
        assert not {p.solution for p in held_out} & {p.solution for p in train}
    assert all(T.split_of(p) == "train" for p in train)


def test_gsm8k_grader_grades_embedded_gold_and_rejects_wrong(tmp_path):
    problems = T.make_split(300, 0, "test")
    T.write_jsonl(tmp_path / "test.jsonl", problems)
    rows = [json.loads(line) for line in open(tmp_path / "test.jsonl")]
    assert [set(r) for r in rows] == [{"question", "answer"}] * len(problems)
    for row, p in zip(rows, problems):
        assert (row["question"], row["answer"]) == (p.question, p.solution)
        assert extract_gsm8k_answer(row["answer"]) == str(p.answer)
        assert grade_gsm8k(row["answer"], row["answer"])
        assert not grade_gsm8k(row["answer"].replace(f"#### {p.answer}", f"#### {p.answer + 1}"), row["answer"])
    assert T.read_jsonl(tmp_path / "test.jsonl") == problems


def test_format_prompt():
    assert T.format_prompt("Tom has 3 pens. How many pens does Tom have now?") == (
        "Question: Tom has 3 pens. How many pens does Tom have now?\nAnswer:"
    )


@pytest.mark.parametrize(
    "kwargs", [dict(min_ops=0), dict(min_ops=3, max_ops=2), dict(max_start=1), dict(max_start=50, max_value=40),
               dict(max_operand=0)]
)
def test_bad_config_is_a_value_error(kwargs):
    with pytest.raises(ValueError):
        T.TaskConfig(**kwargs)


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        T.make_split(3, 0, "dev")
    with pytest.raises(ValueError, match="n must be"):
        T.make_split(-1, 0, "train")
    with pytest.raises(FileNotFoundError):
        T.read_jsonl("/nonexistent/embedded.jsonl")


# ---------------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def corpus():
    return _texts(T.make_split(5000, 0, "train"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return train_tokenizer(corpus, folder, vocab_size=384, seed=0), folder


def test_round_trip_is_exact_and_matches_sentencepiece(trained):
    tok, folder = trained
    sp = spm.SentencePieceProcessor(model_file=str(folder / SPM_FILE))
    texts = _texts(T.make_split(300, 0, "test")) + [
        "Janet\u2019s ducks lay 16 eggs  per day \u2014 $2 each \u00fc\n\n  and 1,234.5 ",
        " leading space",
        "",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids  # bytes cover anything unseen


def test_digits_are_single_tokens(trained):
    tok, _ = trained
    for d in "0123456789":
        assert tok.convert_tokens_to_ids(d) != tok.unk_token_id
    for n in (7, 42, 1234567890):
        pieces = [t for t in tok.tokenize(f"has {n} pens") if any(c.isdigit() for c in t)]
        assert pieces == list(str(n))


def test_prompt_and_solution_tokenise_apart_as_together(trained):
    tok, _ = trained
    for p in T.make_split(200, 0, "val"):
        prompt = T.format_prompt(p.question)
        joint = tok(prompt + " " + p.solution)["input_ids"]
        assert joint == tok(prompt)["input_ids"] + tok(p.solution)["input_ids"]


def test_special_ids_and_mask_id(trained):
    tok, _ = trained
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert len(tok) == 384
    mask_id = len(tok)
    ids = tok("Tom has 3 pens.")["input_ids"]
    assert ids[0] != tok.bos_token_id and tok.eos_token_id not in ids  # no automatic specials
    assert tok.decode(ids + [mask_id, tok.eos_token_id], skip_special_tokens=True) == "Tom has 3 pens."


def test_autotokenizer_reload_gives_identical_ids(trained, corpus, tmp_path):
    tok, folder = trained
    again = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert again.get_vocab() == tok.get_vocab()
    assert again(corpus[:200])["input_ids"] == tok(corpus[:200])["input_ids"]
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == (2, 2, 1)
    tok.save_pretrained(str(tmp_path / "resaved"))
    assert load_tokenizer(tmp_path / "resaved")(corpus[:50])["input_ids"] == tok(corpus[:50])["input_ids"]


def test_training_is_deterministic(corpus, trained, tmp_path):
    _, folder = trained
    train_tokenizer(corpus, tmp_path, vocab_size=384, seed=0)
    assert (tmp_path / SPM_FILE).read_bytes() == (folder / SPM_FILE).read_bytes()
    assert (tmp_path / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()


def test_tokenizer_bad_input(corpus, tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(corpus, tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="more than this corpus supports"):
        train_tokenizer(corpus[:20], tmp_path, vocab_size=4000)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------- assets / CLI


def test_cli_writes_splits_tokenizer_and_stats(tmp_path, capsys):
    T.main(["--out_dir", str(tmp_path), "--n_train", "3000", "--n_val", "20", "--n_test", "30", "--vocab_size", "320"])
    assert [len(T.read_jsonl(tmp_path / f"{s}.jsonl")) for s in T.SPLITS] == [3000, 20, 30]
    assert T.read_jsonl(tmp_path / "test.jsonl") == T.make_split(30, 0, "test")
    meta = json.loads((tmp_path / "task.json").read_text())
    assert meta["stats"]["vocab_size"] == 320 and meta["config"] == dataclasses.asdict(T.TaskConfig())
    tok = load_tokenizer(tmp_path / "tokenizer")
    assert len(tok) == 320
    solutions = tok([p.solution for p in T.read_jsonl(tmp_path / "test.jsonl")])["input_ids"]
    assert meta["stats"]["test"]["solution_tokens"]["max"] == max(len(x) for x in solutions)


@pytest.mark.slow
def test_shipped_tokenizer_is_reproduced_by_the_default_build(tmp_path):
    meta = json.loads((TOKENIZER_DIR / "task.json").read_text())
    config = T.TaskConfig(**meta["config"])
    train = T.make_split(meta["sizes"]["train"], meta["seed"], "train", config)
    train_tokenizer(_texts(train), tmp_path, vocab_size=meta["stats"]["vocab_size"], seed=meta["seed"])
    assert (tmp_path / SPM_FILE).read_bytes() == (TOKENIZER_DIR / SPM_FILE).read_bytes()
    shipped = load_tokenizer()
    texts = _texts(T.make_split(200, meta["seed"], "test", config))
    assert shipped(texts)["input_ids"] == load_tokenizer(tmp_path)(texts)["input_ids"]
    assert all(shipped.decode(ids) == text for ids, text in zip(shipped(texts)["input_ids"], texts))
    assert max(len(ids) for ids in shipped([T.format_prompt(p.question) for p in train[:5000]])["input_ids"]) <= 40
    assert max(len(ids) for ids in shipped([p.solution for p in train[:5000]])["input_ids"]) <= 31


def test_shipped_tokenizer_is_the_backbones_tokenizer():
    # the backbone export carries its own copy; the two must never drift apart
    for name in (SPM_FILE, "tokenizer.json"):
        assert (TOKENIZER_DIR / name).read_bytes() == (ASSETS_DIR / "backbone" / name).read_bytes()
    assert json.loads((TOKENIZER_DIR / "task.json").read_text())["config"] == dataclasses.asdict(T.TaskConfig())


def test_cli_bad_config_is_one_line_before_anything_is_written(tmp_path):
    from cli_helpers import assert_user_error, run_cli

    result = run_cli(["-m", "remedi_patches.embedded.task", "--out_dir", str(tmp_path / "out"), "--min_ops", "5",
                      "--max_ops", "2"])
    assert_user_error(result, "--min_ops", "--max_ops")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- build


def test_build_exports_under_out_and_replaces_the_shipped_backbone_only_with_install(tmp_path):
    from pathlib import Path

    from remedi_patches.cli import UserError
    from remedi_patches.embedded import build as B

    args = B.parse_args([])
    assert args.work_dir == Path("out/embedded_build") and B.export_dir(args) == Path("out/embedded_build/backbone")
    assert B.export_dir(B.parse_args(["--work_dir", str(tmp_path)])) == tmp_path / "backbone"
    assert B.export_dir(B.parse_args(["--out_dir", str(tmp_path / "bb")])) == tmp_path / "bb"
    assert B.export_dir(B.parse_args(["--install"])) == B.BACKBONE_DIR == ASSETS_DIR / "backbone"
    with pytest.raises(UserError, match="--install"):
        B.export_dir(B.parse_args(["--out_dir", str(B.BACKBONE_DIR)]))
    with pytest.raises(UserError, match="--out_dir"):
        B.export_dir(B.parse_args(["--install", "--out_dir", str(tmp_path)]))
    assert "--install" in B.__doc__ and "out/embedded_build" in B.__doc__
