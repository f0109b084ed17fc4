"""SFT data for the trainers: load records, find the prompt/answer fields, tokenise to fixed-length rows.

    records = load_records("../shared/data/gsm8k/train.jsonl")            # or a hub name, a folder, "embedded"
    fields = resolve_fields(column_names(records))                        # GSM8K: question -> answer
    ex = build_sft_examples(records, tokenizer, seq_len=256, fields=fields)
    ex.input_ids (N, seq_len), ex.prompt_len (N,), ex.answer_len (N,)

Layouts found without flags (first match wins): explicit flags; a pair of a prompt field
(question, problem, instruction, prompt, input, query) and an answer field (solution, answer, output, response,
completion): GSM8K question/answer, MATH-500 problem/solution, s1K-1.1 question/solution, OpenCoder
opc-sft-stage2 instruction/output; chat `messages` / `conversations`; plain `text`.
s1K reasoning traces: `thinking_field` + `attempt_field` make the answer "Thinking: ...\\n\\nAttempt: ...".

Rows are [prompt][answer][EOS ... EOS]: the EOS padding counts as answer (LLaDA SFT), so answer_len =
seq_len - prompt_len. Examples whose prompt leaves no room for an answer token are dropped (count logged);
longer answers are cut at seq_len (count logged).

Bad input: local .json/.jsonl files are checked line by line before `datasets` reads them (validate_json_file), so
an empty file, a line that is not UTF-8 or not a JSON object, or a field changing type names the file and line.
Rows with an empty / whitespace-only / null / missing prompt or answer are skipped, never trained on: a warning
gives their count and row numbers, and SFTExamples.skipped holds the count; if every row is empty it is an error.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from remedi_patches.embedded.task import format_prompt
from remedi_patches.sources import hub_reachable, missing_path_message, resolve_source

log = logging.getLogger(__name__)

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_WORDS = ("train", "test", "validation", "valid", "val", "dev", "eval")
PROMPT_FIELDS = ("question", "problem", "instruction", "prompt", "input", "query")
ANSWER_FIELDS = ("solution", "answer", "output", "response", "completion")
CHAT_FIELDS = ("messages", "conversations")
EMBEDDED_RECORDS = 4000  # problems drawn per split of the embedded task when no limit is given
EMBEDDED_SEED = 0
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ---------------------------------------------------------------- loading


def _split_of(path: Path, root: Path) -> Optional[str]:
    """The split a data file belongs to, from its own name or a folder name below `root` (None if none)."""
    names = [path.stem] + [p.name for p in path.relative_to(root).parents if p.name]
    for name in names:
        for word in SPLIT_WORDS:
            if name == word or name.startswith((word + "-", word + "_", word + ".")):
                return word
    return None


def _files_for_split(folder: Path, split: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))  # no .cache/
    if not files:
        raise FileNotFoundError(f"no .json/.jsonl/.parquet files under {folder}; point --dataset at a data file")
    splits = {p: _split_of(p, folder) for p in files}
    chosen = [p for p in files if splits[p] == split]
    if chosen:
        return chosen
    if all(s is None for s in splits.values()):  # the folder itself is one split
        return files
    found = sorted({s for s in splits.values() if s})
    raise ValueError(f"no files for split {split!r} under {folder}; splits found: {found}. Pass --split one of them")


_JSON_KINDS = {str: "a string", bool: "true/false", int: "a number", float: "a number", list: "a list",
               dict: "an object"}


def _json_kind(value) -> Optional[str]:
    return None if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def _check_types(path: Path, where: str, record: dict, kinds: dict) -> None:
    """Every field keeps one JSON type throughout the file (Arrow needs that)."""
    for key, value in record.items():
        kind = _json_kind(value)
        if kind is None:
            continue
        first = kinds.setdefault(key, (kind, where))
        if first[0] != kind:
            raise ValueError(f"{path}, {where}: field {key!r} is {kind} here but {first[0]} at {first[1]}; give every "
                             "value of a field one type (e.g. quote numbers meant as text)")


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line (of a gzipped file too); ValueError naming the first line that is not
    UTF-8."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}, line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                 f"{err.start + 1}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or "
                                 "delete the line") from None


def json_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every JSON object of a .json / .jsonl(.gz) file; `where` is "line N" or "record N".

    A `.json` file may be one JSON document (an array of objects); otherwise, and always for `.jsonl`, each
    non-blank line is one JSON object. ValueError naming the file and the (1-based) line for a line that is not
    UTF-8, not valid JSON or not a JSON object; an empty file yields nothing (callers say what they expected)."""
    path = Path(path)
    if path.suffix == ".json":
        lines = list(_utf8_lines(path))
        text = "".join(line for _, line in lines)
        try:
            document = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):  # one (broken) array; anything else is read as JSON lines below
                raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno}); fix "
                                 "the file (one JSON array of objects, or one JSON object per line)") from None
        else:
            for i, record in enumerate(document if isinstance(document, list) else [document], 1):
                yield _object(path, f"record {i}", record)
            return
    else:
        lines = _utf8_lines(path)
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}); fix or delete "
                             "the line (each line of a JSON-lines file is one JSON object)") from None
        yield _object(path, f"line {number}", record)


def _object(path: Path, where: str, record) -> tuple[str, dict]:
    if not isinstance(record, dict):
        raise ValueError(f"{path}, {where}: expected a JSON object {{...}} per record, found {_json_kind(record)}; "
                         "fix or delete it")
    return where, record


def validate_json_file(path: Path) -> int:
    """Check a .json / .jsonl data file before `datasets` reads it; returns its number of records.

    Raises ValueError naming the file and the (1-based) line for: an empty file, a line that is not UTF-8, a
    line that is not valid JSON or not a JSON object (json_records), and a field whose JSON type changes between
    records."""
    kinds: dict = {}
    count = 0
    for where, record in json_records(path):
        _check_types(path, where, record, kinds)
        count += 1
    if count == 0:
        raise ValueError(f"{path} is empty (no records); point --dataset at a file of JSON records (one JSON object "
                         "per line, or a JSON array of objects)")
    return count


def _load_local(path: Path, split: str, subset: Optional[str]):
    import datasets

    if path.is_dir():
        if subset is not None:
            if not (path / subset).is_dir():
                subs = sorted(p.name for p in path.iterdir() if p.is_dir())
                raise FileNotFoundError(f"subset {subset!r} is not a folder of {path}; subsets found: {subs}")
            path = path / subset
        files = _files_for_split(path, split)
    elif path.suffix in DATA_SUFFIXES:
        files = [path]
    else:
        raise ValueError(f"{path} is not a .json, .jsonl or .parquet file; convert it or pass a folder of such files")
    builders = {DATA_SUFFIXES[p.suffix] for p in files}
    if len(builders) > 1:
        raise ValueError(f"{path} mixes json and parquet files; keep one format per folder")
    builder = builders.pop()
    if builder == "json":
        for p in files:
            validate_json_file(p)
    import pyarrow

    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as err:  # corrupt parquet, ...
        cause = err.__cause__ or err.__context__ or err
        detail = next(iter(str(cause).splitlines()), "")
        names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
        raise ValueError(f"could not read {names} ({type(cause).__name__}: {detail}); check that the files are "
                         "complete (re-download them) and share one set of fields and types") from err


@contextlib.contextmanager
def _offline_unless_reachable():
    """datasets' offline mode (cached copies only) while the hub is unreachable: the error comes at once, not after
    half a minute of download retries."""
    import datasets
    import huggingface_hub.constants

    if hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _load_hub(name: str, split: str, subset: Optional[str]):
    import datasets

    try:
        with _offline_unless_reachable():
            return datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # noqa: BLE001  hub / connection errors come from several libraries
        if isinstance(err, (ImportError, MemoryError)):
            raise
        raise FileNotFoundError(
            f"could not load dataset {name!r} (subset={subset!r}, split={split!r}) from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). If the hub is unreachable "
            "from this machine, download the data elsewhere and pass a local .json/.jsonl/.parquet file or folder, "
            "e.g. --dataset ../shared/data/gsm8k/train.jsonl"
        ) from err


def _load_embedded(split: str, n: int) -> list[dict]:
    from remedi_patches.embedded import task

    return [{"question": p.question, "answer": p.solution} for p in task.make_split(n, EMBEDDED_SEED, split)]


def load_records(dataset: str, split: str = "train", subset: Optional[str] = None, limit: Optional[int] = None):
    """Records as a `datasets.Dataset` (files, hub) or a list of dicts ("embedded"), at most `limit` of them.

    dataset: "embedded" (the project's own GSM8K-shaped task, splits train/val/test, `limit` problems or
    EMBEDDED_RECORDS), a local .json/.jsonl/.parquet file, a folder of them (files picked by split from their
    names, e.g. test.jsonl or data/train-00000-of-00001.parquet; `subset` selects a sub-folder, as in
    opc-sft-stage2/educational_instruct), or a hub name (needs the hub).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of records, got {limit}")
    if dataset == "embedded":
        return _load_embedded(split, limit or EMBEDDED_RECORDS)
    if Path(str(dataset)).suffix in DATA_SUFFIXES and not Path(str(dataset)).expanduser().exists():
        raise FileNotFoundError(missing_path_message(dataset, "dataset"))  # a file name is never a hub repo
    source = resolve_source(dataset, "dataset")
    records = _load_hub(source, split, subset) if isinstance(source, str) else _load_local(source, split, subset)
    if len(records) == 0:
        raise ValueError(f"dataset {str(dataset)!r} (split {split!r}) holds no records; check --dataset / --split")
    return records.select(range(min(limit, len(records)))) if limit else records


def column_names(records) -> list[str]:
    if hasattr(records, "column_names"):
        return list(records.column_names)
    if not records:
        raise ValueError("the dataset is empty; check --dataset / --split")
    return list(records[0].keys())


def _column(records, name: str) -> list:
    if hasattr(records, "column_names"):
        return list(records[name])
    return [r[name] for r in records]


# ---------------------------------------------------------------- fields


@dataclass(frozen=True)
class FieldSpec:
    kind: str  # "pair" (prompt/answer), "chat" (messages) or "text" (answer only)
    prompt: Optional[str] = None
    answer: Optional[str] = None
    thinking: Optional[str] = None  # with attempt: answer = "Thinking: ...\n\nAttempt: ..."
    attempt: Optional[str] = None
    text: Optional[str] = None
    chat: Optional[str] = None


def _require(columns: Sequence[str], name: str, flag: str) -> str:
    if name not in columns:
        raise ValueError(f"field {name!r} (from {flag}) is not in the dataset; fields present: {sorted(columns)}")
    return name


def _first(columns: Sequence[str], candidates: Sequence[str]) -> Optional[str]:
    return next((c for c in candidates if c in columns), None)


def resolve_fields(
    columns: Sequence[str],
    text_field: Optional[str] = None,
    prompt_field: Optional[str] = None,
    answer_field: Optional[str] = None,
    thinking_field: Optional[str] = None,
    attempt_field: Optional[str] = None,
) -> FieldSpec:
    """Which fields hold the prompt and the answer. Explicit flags win; otherwise the known layouts are tried.

    Raises ValueError naming the missing field and listing the fields that exist.
    """
    if text_field is not None:
        if prompt_field or answer_field or thinking_field or attempt_field:
            raise ValueError("--text_field trains on the whole text; do not combine it with prompt/answer fields")
        return FieldSpec(kind="text", text=_require(columns, text_field, "--text_field"))
    if (thinking_field is None) != (attempt_field is None):
        raise ValueError("--thinking_field and --attempt_field go together (the answer is thinking + attempt)")
    prompt = _require(columns, prompt_field, "--prompt_field") if prompt_field else _first(columns, PROMPT_FIELDS)
    if thinking_field is not None:
        if answer_field is not None:
            raise ValueError("--answer_field and --thinking_field/--attempt_field both define the answer; pick one")
        if prompt is None:
            raise ValueError(f"no prompt field found; pass --prompt_field (fields present: {sorted(columns)})")
        return FieldSpec(kind="pair", prompt=prompt,
                         thinking=_require(columns, thinking_field, "--thinking_field"),
                         attempt=_require(columns, attempt_field, "--attempt_field"))
    answer = _require(columns, answer_field, "--answer_field") if answer_field else _first(columns, ANSWER_FIELDS)
    if prompt and answer:
        return FieldSpec(kind="pair", prompt=prompt, answer=answer)
    if prompt_field or answer_field:
        missing = "--answer_field" if prompt else "--prompt_field"
        raise ValueError(f"found no field for {missing}; pass it explicitly (fields present: {sorted(columns)})")
    chat = _first(columns, CHAT_FIELDS)
    if chat:
        return FieldSpec(kind="chat", chat=chat)
    if "text" in columns:
        return FieldSpec(kind="text", text="text")
    raise ValueError(
        f"cannot tell which fields hold the prompt and the answer; fields present: {sorted(columns)}. "
        "Pass --prompt_field and --answer_field, or --text_field"
    )


def _as_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    return "" if value is None else str(value)


def _chat_turns(messages) -> tuple[list[dict], str]:
    """(prompt messages, last assistant reply) of one conversation, roles normalised to user/assistant/system."""
    turns = []
    for m in messages:
        role = ROLE_ALIASES.get(str(m.get("role") or m.get("from")).lower())
        if role is None:
            raise ValueError(f"unknown chat role in {m!r}; expected user/assistant/system (or human/gpt)")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        turns.append({"role": role, "content": _as_text(content)})
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None:  # nothing to train on: an empty answer, skipped and counted by build_sft_examples
        return turns, ""
    return turns[:last], turns[last]["content"]


def prompts_and_answers(records, fields: FieldSpec) -> tuple[list, list[str]]:
    """Per record: the prompt (a string, a list of chat messages for kind "chat", None for kind "text") and
    the answer text."""
    if fields.kind == "text":
        texts = [_as_text(v) for v in _column(records, fields.text)]
        return [None] * len(texts), texts
    if fields.kind == "chat":
        pairs = []
        for row, messages in enumerate(_column(records, fields.chat), 1):
            try:
                pairs.append(_chat_turns(messages or []))
            except (ValueError, TypeError, AttributeError) as err:
                raise ValueError(f"row {row}, field {fields.chat!r}: {err}; fix the conversation (a list of "
                                 "{'role': ..., 'content': ...} messages)") from None
        return [p for p, _ in pairs], [a for _, a in pairs]
    prompts = [_as_text(v) for v in _column(records, fields.prompt)]
    if fields.thinking is not None:
        thinking = _column(records, fields.thinking)
        attempt = _column(records, fields.attempt)
        answers = [f"Thinking: {_as_text(t)}\n\nAttempt: {_as_text(a)}" if _as_text(a).strip() else ""
                   for t, a in zip(thinking, attempt)]  # no attempt: nothing to learn the answer from
    else:
        answers = [_as_text(v) for v in _column(records, fields.answer)]
    return prompts, answers


def _blank(prompt) -> bool:
    if prompt is None:  # answer-only text has no prompt by design
        return False
    if isinstance(prompt, list):  # chat messages before the reply
        return not any(str(m.get("content") or "").strip() for m in prompt)
    return not str(prompt).strip()


def _field_names(fields: FieldSpec) -> str:
    if fields.kind == "chat":
        return f"conversation field {fields.chat!r}"
    if fields.kind == "text":
        return f"text field {fields.text!r}"
    answer = f"{fields.thinking!r} + {fields.attempt!r}" if fields.thinking else repr(fields.answer)
    return f"prompt field {fields.prompt!r}, answer field {answer}"


def drop_empty_rows(prompts: list, answers: list[str], fields: FieldSpec) -> tuple[list, list[str], int]:
    """Rows whose prompt or answer is empty, whitespace-only, null or missing are left out, never trained on:
    their count (and first row numbers, 1-based) is logged as a warning and returned. All rows empty: ValueError."""
    empty = [i for i, (p, a) in enumerate(zip(prompts, answers)) if _blank(p) or not str(a or "").strip()]
    if not empty:
        return prompts, answers, 0
    rows = ", ".join(str(i + 1) for i in empty[:10]) + (" ..." if len(empty) > 10 else "")
    if len(empty) == len(prompts):
        raise ValueError(f"every one of the {len(prompts)} rows has an empty or missing prompt or answer "
                         f"({_field_names(fields)}); check --prompt_field / --answer_field (or --text_field) name the "
                         "fields that hold the text, or fix the data")
    log.warning("skipped %d of %d rows with an empty or missing prompt or answer (%s; rows %s)", len(empty),
                len(prompts), _field_names(fields), rows)
    keep = sorted(set(range(len(prompts))) - set(empty))
    return [prompts[i] for i in keep], [answers[i] for i in keep], len(empty)


# ---------------------------------------------------------------- tokenisation


@dataclass
class SFTExamples:
    input_ids: torch.Tensor  # (N, seq_len) long
    prompt_len: torch.Tensor  # (N,) long
    answer_len: torch.Tensor  # (N,) long, seq_len - prompt_len (EOS padding counted)
    answer_tokens: torch.Tensor  # (N,) long, the answer with its closing EOS (cut at seq_len), no padding
    dropped: int  # prompts that left no room for an answer
    truncated: int  # answers cut at seq_len
    skipped: int = 0  # rows with an empty or missing prompt or answer (never trained on)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def answer_mask(prompt_len: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B,) prompt lengths -> (B, seq_len) bool, True on answer positions."""
    return torch.arange(seq_len, device=prompt_len.device)[None, :] >= prompt_len[:, None]


def render_prompt(question: str, template: Optional[str] = None) -> str:
    """The project's one plain-prompt rule (training, evaluation, sampling): `template` with {question}
    filled in, or by default the embedded task's "Question: ...\nAnswer:"."""
    if template is None:
        return format_prompt(question)
    if "{question}" not in template:
        raise ValueError(f"--prompt_template {template!r} has no {{question}} placeholder; add one")
    return template.replace("{question}", question)


def _encode_plain(tokenizer, prompts: list, answers: list[str], prompt_template: Optional[str]):
    def render(p) -> str:
        if p is None:  # answer-only text: no prompt beyond the tokenizer's own special tokens
            return ""
        return render_prompt(p if isinstance(p, str) else "\n\n".join(m["content"] for m in p), prompt_template)

    texts = [render(p) for p in prompts]
    prompt_ids = tokenizer(texts)["input_ids"]  # the tokenizer's own special tokens (e.g. LLaDA's BOS)
    answer_ids = [a + [tokenizer.eos_token_id] for a in tokenizer(answers, add_special_tokens=False)["input_ids"]]
    return prompt_ids, answer_ids


def _encode_chat(tokenizer, prompts: list, answers: list[str]):
    prompt_ids, answer_ids = [], []
    for p, a in zip(prompts, answers):
        msgs = p if isinstance(p, list) else [{"role": "user", "content": p or ""}]
        head = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": a}], tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template renders the prompt differently with and without the reply; "
                             "train without --chat_template or fix the template")
        prompt_ids.append(tokenizer(head, add_special_tokens=False)["input_ids"])
        answer_ids.append(tokenizer(full[len(head):], add_special_tokens=False)["input_ids"])
    return prompt_ids, answer_ids


def build_sft_examples(
    records,
    tokenizer,
    seq_len: int,
    fields: FieldSpec,
    chat_template: bool = False,
    prompt_template: Optional[str] = None,
) -> SFTExamples:
    """Tokenise records into rows of exactly `seq_len` tokens: prompt, answer, EOS padding.

    chat_template: render prompt and reply with the tokenizer's chat template (instruct models); otherwise the
    prompt is `render_prompt(prompt, prompt_template)` (default "Question: ...\nAnswer:", the format the
    evaluators use) tokenised with the tokenizer's special tokens, and the answer is followed by EOS.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token (it is the SFT padding token)")
    prompts, answers = prompts_and_answers(records, fields)
    prompts, answers, skipped = drop_empty_rows(prompts, answers, fields)
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat_template was given but the tokenizer has no chat template; drop the flag "
                             "(base model) or use the instruct model's tokenizer")
        prompt_ids, answer_ids = _encode_chat(tokenizer, prompts, answers)
    else:
        prompt_ids, answer_ids = _encode_plain(tokenizer, prompts, answers, prompt_template)

    rows, plens, alens = [], [], []
    dropped = truncated = 0
    for p, a in zip(prompt_ids, answer_ids):
        if len(p) >= seq_len:
            dropped += 1
            continue
        truncated += len(p) + len(a) > seq_len
        row = (p + a)[:seq_len]
        rows.append(row + [eos] * (seq_len - len(row)))
        plens.append(len(p))
        alens.append(len(row) - len(p))
    if dropped:
        log.warning("dropped %d of %d examples whose prompt alone fills seq_len=%d", dropped, len(prompt_ids), seq_len)
    if truncated:
        log.warning("cut %d answers at seq_len=%d", truncated, seq_len)
    if not rows:
        raise ValueError(f"no example fits in seq_len={seq_len} (all {dropped} prompts are too long); raise --seq_len")
    input_ids = torch.tensor(rows, dtype=torch.long)
    prompt_len = torch.tensor(plens, dtype=torch.long)
    return SFTExamples(input_ids=input_ids, prompt_len=prompt_len, answer_len=seq_len - prompt_len,
                       answer_tokens=torch.tensor(alens, dtype=torch.long), dropped=dropped, truncated=truncated,
                       skipped=skipped)
