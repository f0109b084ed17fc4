"""The embedded tokenizer: a sentencepiece BPE model trained on the task corpus, served as a transformers tokenizer.

Digits are always single tokens (`split_digits`), unseen characters fall back to bytes, ids 0/1/2 are
`<unk>`/`<s>`/`</s>` and `</s>` doubles as the pad. The diffusion mask id is `len(tokenizer)` (= the vocab size):
it is not in the vocabulary, and decoding skips it like any other unknown id.

The transformers side is built from the trained model's pieces with the `tokenizers` library (no protobuf
needed) and saved as `tokenizer.json`, so `AutoTokenizer.from_pretrained(folder)` loads it anywhere;
`sentencepiece.model` is kept beside it as the trained artifact.
"""

import io
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from remedi_patches.embedded import TOKENIZER_DIR

SPM_FILE = "sentencepiece.model"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPACE = "\u2581"  # sentencepiece's visible space


def train_sentencepiece(texts: Iterable[str], vocab_size: int, seed: int = 0) -> bytes:
    """Train a BPE sentencepiece model on `texts`; returns the serialized model. Deterministic for fixed inputs."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        _train(texts, model, vocab_size)
    except RuntimeError as e:
        too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", str(e))
        if too_high is None:
            raise
        raise ValueError(
            f"vocab_size={vocab_size} is more than this corpus supports ({too_high.group(2)} pieces); "
            "lower vocab_size or train on more text"
        ) from e
    return model.getvalue()


def _train(texts: Iterable[str], model: io.BytesIO, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        split_digits=True,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # keep text as written: exact round trips
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        max_sentence_length=1 << 16,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )


def tokenizers_from_sentencepiece(model_proto: bytes) -> Tokenizer:
    """A `tokenizers.Tokenizer` that segments exactly like the sentencepiece BPE model."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    specials = {UNK, BOS, EOS}
    # spm BPE scores pieces by merge order (higher = earlier); bytes and specials never merge
    scores = {
        piece: sp.get_score(i)
        for piece, i in vocab.items()
        if piece not in specials and not sp.is_byte(i) and len(piece) > 1
    }
    merges = generate_merges(vocab, scores)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    # as sentencepiece: a dummy-prefix space always, spaces made visible, pieces never cross a word start
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = pre_tokenizers.Split(SPACE, behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS, padding_side="left"
    )


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, seed: int = 0):
    """Train on `texts`, save (sentencepiece.model + transformers files) into `out_dir`, return the tokenizer."""
    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size} is too small: 256 byte pieces + 3 specials come first; use >= 260")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_proto = train_sentencepiece(texts, vocab_size, seed)
    (out_dir / SPM_FILE).write_bytes(model_proto)
    tokenizer = wrap(tokenizers_from_sentencepiece(model_proto))
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(folder: str | Path = TOKENIZER_DIR):
    """The embedded tokenizer (default: the one shipped in assets/), via `AutoTokenizer`."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {folder}; build it with `python -m remedi_patches.embedded.task --out_dir DIR` "
            "and pass DIR/tokenizer"
        )
    return AutoTokenizer.from_pretrained(str(folder))
