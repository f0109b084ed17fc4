"""generate(confidence_source=None) is upstream LLaDA's sampler: token equality with an independent
reference (bench/upstream_llada.reference_generate: plain loops, upstream's order of RNG draws), padded batches,
bad input, and the generate.py command line."""
import pytest
import torch
from lit_gpt.model import TransEncoder, save_smdm_folder

from generate import build_parser, generate, main
from remedi_patches.modeling_wrappers import save_ups_head
from remedi_patches.ups_head import UPSHead
from toy_models import EOS, MASK, PROMPT, SHORT, V, BareToyMDM, ToyMDM, padded_batch
from upstream_llada import reference_generate


@pytest.fixture(scope="module")
def toy():
    return ToyMDM().eval()


SHAPES = [(8, 8, 8), (8, 4, 4), (10, 5, 4), (6, 6, 4), (12, 4, 6)]  # (gen_length, block_length, steps)


@pytest.mark.parametrize("gen_length,block_length,steps", SHAPES)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("batch", ["single", "padded"])
def test_equals_upstream_reference(toy, gen_length, block_length, steps, temperature, cfg_scale, remasking, batch):
    prompt, am = (PROMPT, torch.ones_like(PROMPT)) if batch == "single" else padded_batch()
    eos_inf = (gen_length + steps) % 2 == 0  # logits_eos_inf on for half of the grid
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
              cfg_scale=cfg_scale, remasking=remasking, mask_id=MASK)
    torch.manual_seed(1234)
    expected = reference_generate(toy, prompt, am, logits_eos_inf=eos_inf, **kw)
    torch.manual_seed(1234)
    got = generate(toy, prompt, am, logits_eos_inf=eos_inf, eos_id=EOS, **kw)
    assert torch.equal(got, expected)
    assert not (got == MASK).any()
    assert torch.equal(got[:, :prompt.shape[1]], prompt)
    if eos_inf:
        assert not (got[:, prompt.shape[1]:] == EOS).any()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_bfloat16_ties_broken_as_upstream(temperature, cfg_scale):
    """bf16 probabilities tie often; the top-n must break ties exactly as upstream's per-row top-k.
    A shrunken head gives near-uniform predictions, so many candidates tie."""
    model = ToyMDM(seed=3).eval()
    with torch.no_grad():
        model.head.weight.mul_(0.01)
        model.head.bias.mul_(0.01)
    model = model.to(torch.bfloat16)
    ids, am = padded_batch()
    kw = dict(steps=8, gen_length=16, block_length=8, temperature=temperature, cfg_scale=cfg_scale,
              remasking="low_confidence", mask_id=MASK)
    torch.manual_seed(5)
    expected = reference_generate(model, ids, am, **kw)
    torch.manual_seed(5)
    assert torch.equal(generate(model, ids, am, **kw), expected)


def test_rng_stream_left_as_upstream(toy):
    """After generating, the global RNG is where upstream leaves it (same draws, same order)."""
    kw = dict(steps=4, gen_length=8, block_length=4, temperature=0.7, remasking="random", mask_id=MASK)
    torch.manual_seed(7)
    reference_generate(toy, PROMPT, None, cfg_scale=0.0, **kw)
    after_reference = torch.rand(3)
    torch.manual_seed(7)
    generate(toy, PROMPT, None, **kw)
    assert torch.equal(torch.rand(3), after_reference)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("gen_length,block_length,steps", [(8, 4, 4), (10, 5, 10)])
def test_padded_batch_equals_each_prompt_alone(toy, cfg_scale, gen_length, block_length, steps):
    ids, am = padded_batch()
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale, mask_id=MASK)
    batch = generate(toy, ids, am, **kw)
    alone_long = generate(toy, PROMPT, None, **kw)
    alone_short = generate(toy, SHORT, None, **kw)
    assert torch.equal(batch[0], alone_long[0])
    assert torch.equal(batch[1, 2:], alone_short[0])
    assert torch.equal(batch[1, :2], ids[1, :2])  # padding returned untouched


def test_cfg_without_attention_mask(toy):
    """Upstream crashes here (undefined name); ours runs and matches the reference."""
    kw = dict(steps=4, gen_length=8, block_length=4, temperature=0.0, cfg_scale=2.0, remasking="low_confidence",
              mask_id=MASK)
    assert torch.equal(generate(toy, PROMPT, None, **kw), reference_generate(toy, PROMPT, None, **kw))


def test_cfg_changes_the_answer(toy):
    """Guards against a CFG path that silently ignores the unconditional copy."""
    kw = dict(steps=8, gen_length=8, block_length=8, mask_id=MASK)
    assert not torch.equal(generate(toy, PROMPT, **kw), generate(toy, PROMPT, cfg_scale=3.0, **kw))


def test_bare_tensor_model_matches_reference():
    model = BareToyMDM().eval()
    kw = dict(steps=6, gen_length=12, block_length=4, temperature=0.0, cfg_scale=0.0, remasking="low_confidence",
              mask_id=MASK)
    assert torch.equal(generate(model, PROMPT, None, **kw), reference_generate(model, PROMPT, None, **kw))


def test_smdm_trans_encoder_matches_reference():
    torch.manual_seed(0)
    model = TransEncoder.from_name("Diff_LLaMA_tiny", vocab_size=64).eval()
    mask_id = model.config.mask_id
    ids, am = padded_batch()
    kw = dict(steps=4, gen_length=8, block_length=4, temperature=0.7, cfg_scale=1.0, remasking="low_confidence",
              mask_id=mask_id)
    torch.manual_seed(3)
    expected = reference_generate(model, ids, am, **kw)
    torch.manual_seed(3)
    assert torch.equal(generate(model, ids, am, **kw), expected)


BAD_INPUTS = [
    (dict(gen_length=10, block_length=4), "not a multiple of block_length"),
    (dict(gen_length=8, block_length=4, steps=3), "not a multiple of the number of blocks"),
    (dict(gen_length=8, block_length=8, steps=16), "steps=16 > gen_length=8"),
    (dict(steps=0), "must be positive"),
    (dict(remasking="lowest"), "unknown remasking"),
    (dict(confidence_source="oracle"), "unknown confidence source"),
    (dict(temperature=-1.0), "must be >= 0"),
    (dict(cfg_scale=-0.5), "must be >= 0"),
    (dict(prompt=torch.tensor([[5, MASK, 7]])), "contains the mask id"),
    (dict(prompt=torch.zeros(1, 0, dtype=torch.long)), "prompt is empty"),
    (dict(prompt=torch.tensor([5, 6])), r"\(batch, length\)"),
    (dict(prompt=torch.tensor([[5.0, 6.0]])), "integer tensor"),
    (dict(attention_mask=torch.ones(1, 4)), "attention_mask has shape"),
    (dict(prompt=torch.tensor([[5, 6]]), attention_mask=torch.zeros(1, 2)), "all zeros"),
    (dict(logits_eos_inf=True, eos_id=None), "need eos_id"),
    (dict(logits_eos_inf=True, eos_id=V + 7), "outside the model's vocabulary"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS)
def test_bad_input_raises_clear_value_error(toy, overrides, message):
    kw = dict(prompt=PROMPT, steps=4, gen_length=8, block_length=8, mask_id=MASK, eos_id=EOS)
    kw.update(overrides)
    with pytest.raises(ValueError, match=message):
        generate(toy, **kw)


def test_cli_help_lists_every_flag():
    text = build_parser().format_help()
    for flag in ("--model", "--prompt", "--chat", "--steps", "--gen_length", "--block_length", "--temperature",
                 "--cfg_scale", "--remasking", "--mask_id", "--confidence_source", "--no_remask", "--ups_head",
                 "--lora_path", "--logits_eos_inf", "--confidence_eos_eot_inf", "--seed", "--show_trajectory",
                 "--device", "--dtype"):
        assert flag in text
    assert text.count("(default:") >= 20


def tiny_smdm_folder(path):
    """An SMDM export (lit_gpt TransEncoder) plus a word-level tokenizer, as load_backbone reads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(str(path))
    torch.manual_seed(0)
    save_smdm_folder(TransEncoder.from_name("Diff_LLaMA_tiny", vocab_size=64), path)
    return path


@pytest.mark.slow  # builds a tokenizer with transformers
def test_cli_runs_end_to_end(tmp_path, capsys):
    folder = tiny_smdm_folder(tmp_path / "model")
    head = save_ups_head(tmp_path / "ups.safetensors", UPSHead(64, 4), {"mask_id": 64, "backbone": "tiny"})
    base = ["--model", str(folder), "--prompt", "w3 w4 w5", "--prompt", "w9", "--steps", "4", "--gen_length", "8",
            "--block_length", "4", "--device", "cpu"]
    argv = base + ["--confidence_source", "ups", "--ups_head", str(head), "--show_trajectory", "--temperature", "0.5",
                   "--confidence_eos_eot_inf"]
    answers = main(argv)
    text = capsys.readouterr().out
    assert len(answers) == 2 and text.count("### answer") == 2
    assert all("<unk>" not in a and "</s>" not in a for a in answers)
    assert "row 1:" in text  # per row and step: the tokens committed / re-masked and the masks left
    assert "step   4 (block 1 step 2): masks 0 in block, 0 in answer | committed +" in text
    assert main(argv) == answers  # --seed makes it reproducible
    wrong = save_ups_head(tmp_path / "wide.safetensors", UPSHead(48), {})
    with pytest.raises(ValueError, match="hidden size 48.*hidden size 64"):
        main(base + ["--ups_head", str(wrong)])
