"""A character-level transformers tokenizer with LLaDA's special tokens, for the data and trainer tests (no hub)."""
import string

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>", "[UNK]"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer(bos: bool = True):
    """A character-level transformers tokenizer with LLaDA's special tokens (BOS prepended when `bos`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set(string.whitespace) | {" ", "\n"})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A", special_tokens=[
            ("<|startoftext|>", vocab["<|startoftext|>"])])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="[UNK]", mask_token="<|mdm_mask|>",
                                  additional_special_tokens=["<|eot_id|>"])
    out.chat_template = CHAT_TEMPLATE
    return out
