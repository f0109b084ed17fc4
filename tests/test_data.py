"""Dataset loading, field layouts and SFT tokenisation (remedi_patches.data)."""
import json

import pytest
import torch

from remedi_patches import data
from remedi_patches.data import answer_mask, build_sft_examples, column_names, load_records, resolve_fields
from remedi_patches.embedded.task import format_prompt

from char_tokenizer import char_tokenizer


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_and_math500_layouts(data_dir):
    tok = char_tokenizer()
    gsm = load_records(str(data_dir / "gsm8k" / "test.jsonl"), limit=50)
    assert len(gsm) == 50
    f = resolve_fields(column_names(gsm))
    assert (f.kind, f.prompt, f.answer) == ("pair", "question", "answer")
    ex = build_sft_examples(gsm, tok, seq_len=512, fields=f)
    row = ex.input_ids[0]
    p = int(ex.prompt_len[0])
    expected_prompt = [tok.bos_token_id] + tok(format_prompt(gsm[0]["question"]), add_special_tokens=False)["input_ids"]
    assert row[:p].tolist() == expected_prompt
    answer = tok(gsm[0]["answer"], add_special_tokens=False)["input_ids"]
    assert row[p:p + len(answer)].tolist() == answer
    assert (row[p + len(answer):] == tok.eos_token_id).all()  # EOS padding
    assert torch.equal(ex.answer_len, 512 - ex.prompt_len)

    math = load_records(str(data_dir / "math500"), split="test", limit=20)  # folder: split picked by file name
    f = resolve_fields(column_names(math))
    assert (f.prompt, f.answer) == ("problem", "solution")  # the worked solution, not the short `answer`


def test_folder_split_selection_and_errors(data_dir, tmp_path):
    gsm_test = load_records(str(data_dir / "gsm8k"), split="test")
    assert len(gsm_test) == 1319
    with pytest.raises(ValueError, match="splits found"):
        load_records(str(data_dir / "gsm8k"), split="validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_s1k_layout_with_thinking_and_attempt(tmp_path):
    rows = [{"question": f"q{i}?", "solution": f"s{i}", "cot_type": "math", "gemini_thinking_trajectory": f"think {i}",
             "gemini_attempt": f"attempt {i}", "deepseek_thinking_trajectory": "x", "deepseek_attempt": "y"}
            for i in range(4)]
    recs = load_records(str(_write_jsonl(tmp_path / "s1k.jsonl", rows)))
    f = resolve_fields(column_names(recs))
    assert (f.prompt, f.answer) == ("question", "solution")
    f = resolve_fields(column_names(recs), thinking_field="gemini_thinking_trajectory", attempt_field="gemini_attempt")
    prompts, answers = data.prompts_and_answers(recs, f)
    assert prompts[1] == "q1?" and answers[1] == "Thinking: think 1\n\nAttempt: attempt 1"
    with pytest.raises(ValueError, match="go together"):
        resolve_fields(column_names(recs), thinking_field="gemini_thinking_trajectory")
    with pytest.raises(ValueError, match="'text'.*fields present.*gemini_attempt"):
        resolve_fields(column_names(recs), text_field="text")  # the seed's `--text_field text` on s1K-1.1


def test_opc_subset_folder_and_text_field(tmp_path):
    root = tmp_path / "opc-sft-stage2"
    for sub in ("educational_instruct", "evol_instruct"):
        (root / sub).mkdir(parents=True)
        _write_jsonl(root / sub / "train-00000-of-00001.jsonl",
                     [{"instruction": f"{sub} task {i}", "output": f"def f{i}(): pass", "tag": sub} for i in range(3)])
    recs = load_records(str(root), subset="educational_instruct")
    assert len(recs) == 3 and recs[0]["tag"] == "educational_instruct"
    f = resolve_fields(column_names(recs))
    assert (f.prompt, f.answer) == ("instruction", "output")
    with pytest.raises(FileNotFoundError, match="subsets found.*evol_instruct"):
        load_records(str(root), subset="mceval_instruct")

    f = resolve_fields(column_names(recs), text_field="output")  # answer-only training
    ex = build_sft_examples(recs, char_tokenizer(), seq_len=40, fields=f)
    assert ex.prompt_len.tolist() == [1, 1, 1]  # only the tokenizer's BOS stays clean


def test_missing_field_lists_the_fields(tmp_path):
    recs = load_records(str(_write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "body": "b"}])))
    with pytest.raises(ValueError, match=r"fields present: \['body', 'q'\]"):
        resolve_fields(column_names(recs))
    with pytest.raises(ValueError, match=r"'prompt'.*--prompt_field.*\['body', 'q'\]"):
        resolve_fields(column_names(recs), prompt_field="prompt", answer_field="body")


def test_chat_layout_with_and_without_template(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                          {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
            {"messages": [{"from": "human", "value": "x?"}, {"from": "gpt", "value": "y"}]}]  # ShareGPT style
    recs = load_records(str(_write_jsonl(tmp_path / "chat.jsonl", rows)))
    f = resolve_fields(column_names(recs))
    assert f.kind == "chat"
    tok = char_tokenizer()
    ex = build_sft_examples(recs, tok, seq_len=64, fields=f, chat_template=True)
    p = int(ex.prompt_len[0])
    assert tok.decode(ex.input_ids[0, :p]) == "<|startoftext|><user>hi<assistant>yo<|eot_id|><user>2+2?<assistant>"
    assert tok.decode(ex.input_ids[0, p:p + 2]) == "4<|eot_id|>"
    assert (ex.input_ids[0, p + 2:] == tok.eos_token_id).all()
    plain = build_sft_examples(recs, tok, seq_len=64, fields=f)
    assert tok.decode(plain.input_ids[1, :int(plain.prompt_len[1])]) == "<|startoftext|>Question: x?\nAnswer:"
    custom = build_sft_examples(recs, tok, seq_len=64, fields=f, prompt_template="Q: {question}\n")
    assert tok.decode(custom.input_ids[1, :int(custom.prompt_len[1])]) == "<|startoftext|>Q: x?\n"
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build_sft_examples(recs, tok, seq_len=64, fields=f, chat_template=True)


def test_long_prompts_dropped_and_answers_cut(tmp_path, caplog):
    rows = [{"question": "q" * 40, "answer": "a"}, {"question": "q", "answer": "a" * 40},
            {"question": "q", "answer": "a"}]
    recs = load_records(str(_write_jsonl(tmp_path / "d.jsonl", rows)))
    with caplog.at_level("WARNING", logger="remedi_patches.data"):
        ex = build_sft_examples(recs, char_tokenizer(), seq_len=40, fields=resolve_fields(column_names(recs)))
    assert (ex.dropped, ex.truncated, len(ex)) == (1, 1, 2)
    assert "dropped 1 of 3" in caplog.text
    assert ex.input_ids.shape == (2, 40)
    with pytest.raises(ValueError, match="raise --seq_len"):
        build_sft_examples(recs.select([0]), char_tokenizer(), seq_len=40, fields=resolve_fields(column_names(recs)))


def test_answer_mask():
    m = answer_mask(torch.tensor([1, 3]), 4)
    assert m.tolist() == [[False, True, True, True], [False, False, False, True]]


def test_embedded_records_use_the_task():
    from remedi_patches.embedded import task

    recs = load_records("embedded", split="val", limit=3)
    expected = task.make_split(3, data.EMBEDDED_SEED, "val")
    assert [r["answer"] for r in recs] == [p.solution for p in expected]
    assert resolve_fields(column_names(recs)).prompt == "question"


def test_hub_name_offline_gives_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="pass a local .json/.jsonl/.parquet"):
        load_records("no-such-org/no-such-dataset-remedi", split="train")


# ---------------------------------------------------------------- bad input: the error names the file and line


@pytest.mark.parametrize("name,content,fragments", [
    ("empty.jsonl", b"", ["empty.jsonl is empty"]),
    ("blank.jsonl", b"\n  \n", ["blank.jsonl is empty"]),
    ("empty.json", b"[]", ["empty.json is empty"]),
    ("latin1.jsonl", b'{"question": "a", "answer": "b"}\n{"question": "caf\xe9", "answer": "b"}\n',
     ["latin1.jsonl, line 2", "not UTF-8", "byte 0xe9", "iconv"]),
    ("broken.jsonl", b'{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": }\n',
     ["broken.jsonl, line 3", "not valid JSON", "fix or delete the line"]),
    ("list.jsonl", b'{"question": "a", "answer": "b"}\n[1, 2]\n', ["list.jsonl, line 2", "JSON object"]),
    ("types.jsonl", b'{"question": "a", "answer": "b"}\n{"question": "c", "answer": 7}\n',
     ["types.jsonl, line 2", "'answer' is a number here but a string at line 1"]),
    ("broken.json", b'[{"question": "a", "answer": "b"},\n {"question": "c" "answer": "d"}]\n',
     ["broken.json, line 2", "not valid JSON"]),
])
def test_bad_json_files_name_the_file_and_line(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_records(str(path))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_good_json_layouts_still_load(tmp_path):
    rows = [{"question": "a", "answer": "b"}, {"question": "c", "answer": None}]
    (tmp_path / "arr.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n\n" for r in rows))  # blank lines are fine
    assert len(load_records(str(tmp_path / "arr.json"))) == 2
    assert len(load_records(str(tmp_path / "lines.json"))) == 2
    assert data.validate_json_file(tmp_path / "lines.json") == 2


def test_corrupt_parquet_names_the_file(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="could not read .*train.parquet"):
        load_records(str(tmp_path / "train.parquet"))


def test_rows_with_empty_prompt_or_answer_are_skipped_and_counted(tmp_path, caplog):
    rows = [{"question": "q1", "answer": "a1"}, {"question": "", "answer": "a2"}, {"question": "q3", "answer": "  "},
            {"question": "q4", "answer": None}, {"question": "q5"}, {"question": "q6", "answer": "a6"}]
    recs = load_records(str(_write_jsonl(tmp_path / "d.jsonl", rows)))
    with caplog.at_level("WARNING", logger="remedi_patches.data"):
        ex = build_sft_examples(recs, char_tokenizer(), seq_len=32, fields=resolve_fields(column_names(recs)))
    assert ex.skipped == 4 and len(ex) == 2
    assert "skipped 4 of 6 rows" in caplog.text and "rows 2, 3, 4, 5" in caplog.text
    tok = char_tokenizer()
    assert tok.decode(ex.input_ids[1, int(ex.prompt_len[1]):int(ex.prompt_len[1]) + 2]) == "a6"

    chat = [{"messages": [{"role": "user", "content": "hi"}]},  # no reply to learn
            {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "yo"}]},  # no prompt
            {"messages": [{"role": "user", "content": "x?"}, {"role": "assistant", "content": "y"}]}]
    recs = load_records(str(_write_jsonl(tmp_path / "chat.jsonl", chat)))
    ex = build_sft_examples(recs, tok, seq_len=48, fields=resolve_fields(column_names(recs)), chat_template=True)
    assert (ex.skipped, len(ex)) == (2, 1)

    empty = load_records(str(_write_jsonl(tmp_path / "e.jsonl", [{"question": "q", "answer": ""}] * 3)))
    with pytest.raises(ValueError, match="every one of the 3 rows.*answer field 'answer'.*--answer_field"):
        build_sft_examples(empty, tok, seq_len=32, fields=resolve_fields(column_names(empty)))


def test_missing_dataset_path_is_not_a_hub_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./nope", str(tmp_path / "nope"), "runs/train", "nope.jsonl", "~/no/such/data.jsonl"):
        with pytest.raises(FileNotFoundError, match="dataset path .* does not exist"):
            load_records(name)
