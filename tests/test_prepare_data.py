"""SMDM/scripts/prepare_data.py on question / answer files: one document = the prompt rendered by the project's
prompt rule + " " + the answer, packed with the tokenizer it records."""
import json
from pathlib import Path

import pytest

from lit_gpt.packed_dataset import PackedDataset
from lit_gpt.training import read_packed_meta
from remedi_patches.data import render_prompt
from remedi_patches.embedded import TOKENIZER_DIR
from remedi_patches.embedded import task as T
from remedi_patches.embedded.tokenizer import load_tokenizer
from trainer_helpers import prepare_data


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def stream(files) -> list[int]:
    ds = PackedDataset(files, block_size=1)
    return [int(ds[i]) for i in range(len(ds))]


def packed(tok, docs: list[str]) -> list[int]:
    out = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        out += ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids + [tok.eos_token_id]
    return out


def head_lines(src: Path, dst: Path, n: int) -> Path:
    with open(src) as f:
        dst.write_text("".join(next(f) for _ in range(n)))
    return dst


def test_gsm8k_and_math500_files_become_prompt_plus_answer(data_dir, tmp_path, tok):
    gsm = head_lines(data_dir / "gsm8k" / "train.jsonl", tmp_path / "gsm8k.jsonl", 30)
    math = head_lines(data_dir / "math500" / "test.jsonl", tmp_path / "math500.jsonl", 5)
    files = prepare_data.main(["--input", str(gsm), str(math), "--tokenizer", str(TOKENIZER_DIR),
                               "--out_dir", str(tmp_path / "out"), "--chunk_size", "4096"])
    docs = [f"{render_prompt(r['question'])} {r['answer']}" for r in map(json.loads, gsm.read_text().splitlines())]
    docs += [f"{render_prompt(r['problem'])} {r['solution']}" for r in map(json.loads, math.read_text().splitlines())]
    assert docs[0].startswith("Question: Natalia sold clips") and "\nAnswer: Natalia sold 48/2" in docs[0]
    assert stream(files) == packed(tok, docs)
    meta = read_packed_meta(tmp_path / "out")
    assert meta["documents"] == 35 and meta["vocab_size"] == len(tok)
    assert Path(meta["tokenizer"]) == TOKENIZER_DIR.resolve()


def test_embedded_task_files_pack_as_the_build_packs_them(tmp_path, tok):
    problems = T.make_split(40, 0, "train")
    T.write_jsonl(tmp_path / "train.jsonl", problems)
    files = prepare_data.main(["--input", str(tmp_path / "train.jsonl"), "--tokenizer", str(TOKENIZER_DIR),
                               "--out_dir", str(tmp_path / "out")])
    assert stream(files) == packed(tok, [f"{T.format_prompt(p.question)} {p.solution}" for p in problems])


def test_fields_and_template_flags(tmp_path, tok):
    rows = [{"q": "1+1?", "a": "2", "id": 3}, {"q": "2+2?", "a": "4", "id": 4}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--input", str(tmp_path / "qa.jsonl"), "--tokenizer", str(TOKENIZER_DIR)]
    with pytest.raises(ValueError, match=r"qa.jsonl, line 1: cannot tell which fields.*\['a', 'id', 'q'\]"):
        prepare_data.main([*base, "--out_dir", str(tmp_path / "o1")])
    files = prepare_data.main([*base, "--out_dir", str(tmp_path / "o2"), "--prompt_field", "q", "--answer_field", "a",
                               "--prompt_template", "Q: {question}\nA:"])
    assert stream(files) == packed(tok, ["Q: 1+1?\nA: 2", "Q: 2+2?\nA: 4"])
    with pytest.raises(ValueError, match="has no {question} placeholder"):
        prepare_data.parse_args([*base, "--out_dir", str(tmp_path / "o3"), "--prompt_template", "Q:"])
    with pytest.raises(ValueError, match="do not combine"):
        prepare_data.parse_args([*base, "--out_dir", str(tmp_path / "o3"), "--text_field", "q", "--answer_field", "a"])


@pytest.mark.slow
def test_cli_packs_a_question_answer_file(data_dir, tmp_path):
    from cli_helpers import run_cli

    gsm = head_lines(data_dir / "gsm8k" / "test.jsonl", tmp_path / "gsm8k.jsonl", 10)
    result = run_cli(["SMDM/scripts/prepare_data.py", "--input", gsm, "--tokenizer", TOKENIZER_DIR,
                      "--out_dir", tmp_path / "out"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "10 documents" in result.stdout and (tmp_path / "out" / "train_meta.json").is_file()
