"""SMDM TransEncoder: upstream shapes, an independent reference forward, padding, loading, the KV cache."""
import math

import pytest
import torch
import torch.nn.functional as F

from lit_gpt.config import Config, name_to_config, num_non_embedding_params
from lit_gpt.model import TransEncoder, load_smdm_folder, load_weights, save_smdm_folder
from remedi_patches.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")

# Non-embedding parameter counts (millions) that upstream SMDM's train_mdm.py tabulates per size.
UPSTREAM_N = {
    6: 6.294784, 19: 18.880896, 34: 33.563136, 48: 47.786688, 66: 65.54944, 85: 85.21408, 75: 75.38752,
    113: 113.265408, 142: 141.581568, 170: 169.897728, 180: 179.856768, 206: 205.550464, 231: 231.24416,
    268: 268.469248, 302: 302.027776, 336: 335.586304, 472: 471.90656, 551: 550.55744, 571: 571.001728,
    629: 629.20832, 666: 666.168448, 717: 717.285888, 761: 761.335168, 831: 830.541312, 944: 943.796736,
    1028: 1027.677952, 1233: 1233.213184, 1476: 1476.487168, 1678: 1677.826048, 2121: 2121.39328,
}


def expected_shapes(n_layer, d, n_head, groups, hidden, padded_vocab):
    hs = d // n_head
    shapes = {"lm_head.weight": (padded_vocab, d), "transformer.wte.weight": (padded_vocab + 1, d),
              "transformer.ln_f.weight": (d,)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "norm_1.weight": (d,), p + "norm_2.weight": (d,),
            p + "attn.attn.weight": ((n_head + 2 * groups) * hs, d), p + "attn.proj.weight": (d, d),
            p + "mlp.swiglu.w1.weight": (hidden, d), p + "mlp.swiglu.w2.weight": (hidden, d),
            p + "mlp.swiglu.w3.weight": (d, hidden),
        })
    return shapes


@pytest.mark.parametrize("name, n_layer, n_head, d, hidden", [
    ("Diff_LLaMA_113M", 12, 12, 768, 3072),
    ("Diff_LLaMA_1028M", 20, 14, 1792, 7168),
])
def test_upstream_sizes_on_meta(name, n_layer, n_head, d, hidden):
    with torch.device("meta"):
        model = TransEncoder(Config.from_name(name))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_shapes(n_layer, d, n_head, n_head, hidden, 32000)
    embeddings = ("lm_head.weight", "transformer.wte.weight")
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if n not in embeddings)
    assert non_embedding == round(UPSTREAM_N[int(name[len("Diff_LLaMA_"):-1])] * 1e6)
    assert model.config.mask_id == 32000 and model.config.block_size == 2048


def test_every_upstream_size_matches_its_parameter_count():
    for n, millions in UPSTREAM_N.items():
        assert num_non_embedding_params(Config.from_name(f"Diff_LLaMA_{n}M")) == round(millions * 1e6), n


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown SMDM model name 'Diff_LLaMA_7M'.*Diff_LLaMA_170M"):
        Config.from_name("Diff_LLaMA_7M")
    with pytest.raises(ValueError, match="Unknown SMDM config field"):
        Config.from_name("Diff_LLaMA_tiny", n_layers=3)
    with pytest.raises(ValueError, match="not divisible by n_query_groups"):
        Config.from_name("Diff_LLaMA_tiny", n_query_groups=3)
    with pytest.raises(ValueError, match="padding_multiple=0 must be a positive integer; n_layer=0 must be"):
        Config.from_name("Diff_LLaMA_tiny", n_layer=0, padding_multiple=0)
    assert "Diff_LLaMA_tiny" in name_to_config


def reference_forward(model: TransEncoder, idx, positions, keep):
    """Independent re-derivation: per-head loops, explicit softmax, rotation of (i, i + hs/2) pairs.
    keep: (T,) keys to attend to, or (T, T) per query."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    hs, nh, ng = cfg.head_size, cfg.n_head, cfg.n_query_groups
    r = nh // ng

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(x):  # x (T, hs) for one row and head
        half = hs // 2
        out = x.clone()
        for i in range(half):
            theta = positions.double() * cfg.rope_base ** (-2.0 * i / hs)
            a, b = x[:, i], x[:, i + half]
            out[:, i] = a * torch.cos(theta) - b * torch.sin(theta)
            out[:, i + half] = b * torch.cos(theta) + a * torch.sin(theta)
        return out

    x = sd["transformer.wte.weight"][idx]  # (T, d)
    for layer in range(cfg.n_layer):
        p = f"transformer.h.{layer}."
        h = rms(x, sd[p + "norm_1.weight"])
        W = sd[p + "attn.attn.weight"].view(ng, r + 2, hs, cfg.n_embd)
        heads = []
        for head in range(nh):
            g, j = divmod(head, r)
            q, k, v = h @ W[g, j].T, h @ W[g, r].T, h @ W[g, r + 1].T
            scores = rope(q) @ rope(k).T / math.sqrt(hs)
            scores = scores.masked_fill(~(keep if keep.dim() == 2 else keep[None, :]), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v)
        x = x + torch.cat(heads, -1) @ sd[p + "attn.proj.weight"].T
        h = rms(x, sd[p + "norm_2.weight"])
        gate = F.silu(h @ sd[p + "mlp.swiglu.w1.weight"].T) * (h @ sd[p + "mlp.swiglu.w2.weight"].T)
        x = x + gate @ sd[p + "mlp.swiglu.w3.weight"].T
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("name", ["Diff_LLaMA_tiny", "Diff_LLaMA_tiny_gqa"])
def test_forward_equals_reference(name):
    torch.manual_seed(0)
    model = TransEncoder(Config.from_name(name, vocab_size=100)).eval()
    for p in model.parameters():  # non-trivial norms
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    idx = torch.randint(0, 101, (2, 9))
    logits = model(idx)
    assert logits.shape == (2, 9, 128) and logits.dtype == torch.float32
    for b in range(2):
        ref = reference_forward(model, idx[b], torch.arange(9), torch.ones(9, dtype=torch.bool))
        assert (logits[b].double() - ref).abs().max() < 1e-5
    # with a padding mask: keys ignored, positions count real tokens only
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
    logits = model(idx, attention_mask=mask)
    ref = reference_forward(model, idx[0], (mask[0].cumsum(0) - 1).clamp(min=0), mask[0].bool())
    assert (logits[0, 3:].double() - ref[3:]).abs().max() < 1e-5


def test_left_padded_batch_equals_rows_alone():
    torch.manual_seed(1)
    model = TransEncoder(Config.from_name("Diff_LLaMA_tiny_gqa", vocab_size=100)).eval()
    rows = [torch.randint(0, 101, (n,)) for n in (7, 4, 1)]
    L = max(len(r) for r in rows)
    idx = torch.stack([F.pad(r, (L - len(r), 0), value=5) for r in rows])
    mask = torch.stack([F.pad(torch.ones(len(r), dtype=torch.long), (L - len(r), 0)) for r in rows])
    batched = model(idx, attention_mask=mask)
    for b, r in enumerate(rows):
        alone = model(r[None])
        assert torch.allclose(batched[b, L - len(r):], alone[0], atol=1e-5)
        assert torch.equal(model(r[None], attention_mask=torch.ones(1, len(r))), alone)


def test_too_long_input_is_a_clear_error():
    model = TransEncoder(Config.from_name("Diff_LLaMA_tiny", vocab_size=100, block_size=8))
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_upstream_checkpoint_dict_loads_strictly(tmp_path):
    torch.manual_seed(2)
    cfg = Config.from_name("Diff_LLaMA_tiny", vocab_size=100)
    src = TransEncoder(cfg)
    # upstream train_mdm.py's fabric.save(state) layout
    torch.save({"model": src.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "hparams": {"learning_rate": 2e-4, "model_name": "Diff_LLaMA_tiny"},
                "iter_num": 12, "step_count": 3}, tmp_path / "iter-000012-ckpt.pth")
    dst = TransEncoder(cfg)
    load_weights(dst, tmp_path / "iter-000012-ckpt.pth")
    idx = torch.randint(0, 101, (1, 6))
    assert torch.equal(src(idx), dst(idx))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])


def test_bad_weights_are_clear_errors(tmp_path):
    cfg = Config.from_name("Diff_LLaMA_tiny", vocab_size=100)
    model = TransEncoder(cfg)
    other = TransEncoder(Config.from_name("Diff_LLaMA_tiny", vocab_size=200))
    torch.save({"model": other.state_dict()}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="do not fit SMDM config.*transformer.wte.weight"):
        load_weights(model, tmp_path / "wrong.pth")
    save_smdm_folder(model, tmp_path / "folder")
    data = (tmp_path / "folder" / "model.safetensors").read_bytes()
    (tmp_path / "folder" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_smdm_folder(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="not an SMDM export folder"):
        load_smdm_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="No SMDM weights"):
        load_weights(model, tmp_path / "missing.pth")


def test_smdm_folder_round_trip(tmp_path):
    torch.manual_seed(3)
    model = TransEncoder(Config.from_name("Diff_LLaMA_tiny_gqa", vocab_size=100, block_size=32))
    save_smdm_folder(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.safetensors", "smdm_config.json"]
    loaded = load_smdm_folder(tmp_path / "export")
    assert loaded.config == model.config
    idx = torch.randint(0, 101, (2, 5))
    assert torch.equal(loaded(idx), model(idx))


def test_nonfinite_weights_refused_on_save_and_load(tmp_path):
    """A diverged model is never exported, and a file holding NaN / inf is refused at load naming file and tensor."""
    from safetensors.torch import save_file

    model = TransEncoder.from_name("Diff_LLaMA_tiny", vocab_size=64, block_size=16)
    folder = save_smdm_folder(model, tmp_path / "good")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        model.transformer.h[1].attn.proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save.*'transformer.h.1.attn.proj.weight'.*NaN or inf"):
        save_smdm_folder(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the good export is untouched
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "smdm_config.json"]  # no temp files

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"][0, 0] = float("inf")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"good/model.safetensors: tensor 'lm_head.weight' holds NaN or inf"):
        load_smdm_folder(folder)
    ckpt = tmp_path / "iter-000002-ckpt.pth"
    torch.save({"model": state, "iter_num": 2}, ckpt)
    with pytest.raises(ValueError, match=r"iter-000002-ckpt.pth: tensor 'lm_head.weight' holds NaN or inf.*earlier"):
        load_weights(TransEncoder.from_name("Diff_LLaMA_tiny", vocab_size=64, block_size=16), ckpt)


def test_first_nonfinite_is_exact_even_when_the_fast_sum_overflows():
    from lit_gpt.model import first_nonfinite

    big = torch.full((100_000,), 60000.0, dtype=torch.float16)  # finite, but its fp16 sum overflows
    assert first_nonfinite({"big": big, "ids": torch.arange(3)}) is None
    both = torch.zeros(4)
    both[0], both[1] = float("inf"), float("-inf")  # sums to NaN: still found
    assert first_nonfinite([("ok", torch.ones(2)), ("both", both)]) == "both"
    late = torch.zeros(10, dtype=torch.bfloat16)
    late[-1] = float("nan")
    assert first_nonfinite({"late": late}) == "late"
    assert first_nonfinite({"meta": torch.empty(3, device="meta")}) is None


# ---------------------------------------------------------------- block diffusion: KV cache, positions, 4-D mask


def block_causal(real, block: int, n_blocks: int):
    """Mask (B, 1, T, T) and positions (B, T) of [prompt | n_blocks blocks]: the prompt (left-padded, `real` (B, P))
    attends to its real tokens, block j to the prompt and blocks <= j; positions count real tokens."""
    B, P = real.shape
    group = torch.cat([torch.zeros(P, dtype=torch.long), 1 + torch.arange(n_blocks).repeat_interleave(block)])
    keys = torch.cat([real.bool(), torch.ones(B, n_blocks * block, dtype=torch.bool)], 1)
    mask = (group[None, :] <= group[:, None])[None] & keys[:, None, :]
    mask |= torch.eye(len(group), dtype=torch.bool)  # a pad query sees itself (no all-masked row: NaN-free)
    positions = torch.cat([(real.cumsum(-1) - 1).clamp(min=0),
                           real.sum(-1, keepdim=True) + torch.arange(n_blocks * block)], 1)
    return mask[:, None], positions


def outputs(out, cols=slice(None)) -> list:
    """The tensors a forward returns (the logits; and the confidences of a dual-stream model), columns `cols`."""
    return [t[:, cols] for t in ((out,) if torch.is_tensor(out) else (out.logits, out.confidences))]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def tiny_single():
    return TransEncoder(Config.from_name("Diff_LLaMA_tiny_gqa", vocab_size=100, block_size=32)).eval()


def tiny_dual():
    """A dual-stream RemeDi whose feedback is live (non-zero), UPS blocks after main layers 0 and 2 of 3."""
    from lit_gpt.dual_stream import RemeDiTransEncoder

    model = RemeDiTransEncoder(Config.from_name("Diff_LLaMA_tiny_gqa", vocab_size=100, block_size=32, n_layer=3,
                                                ups_positions=[0, 2]))
    with torch.no_grad():
        for p in model.ups.feedback.parameters():
            p.normal_(0, 0.2)
    return model.eval()


MODELS = {"single": tiny_single, "dual": tiny_dual}


def test_block_causal_full_forward_equals_reference():
    torch.manual_seed(4)
    model = tiny_single()
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    mask, positions = block_causal(real, 3, 2)
    idx = torch.randint(0, 101, (2, 11))
    logits = model(idx, attention_mask=mask, position_ids=positions)
    for b in range(2):
        ref = reference_forward(model, idx[b], positions[b], mask[b, 0])
        assert (logits[b].double() - ref)[2 * (1 - b):].abs().max() < 1e-5  # real positions


@pytest.mark.parametrize("kind", sorted(MODELS))
@torch.no_grad()
def test_cached_blocks_equal_block_causal_full_forward(kind):
    """Prompt written to the cache, then each block read from it (and appended) == one forward over
    [prompt | blocks] with the block-causal 4-D mask, for a left-padded batch and for its padded row alone."""
    torch.manual_seed(5)
    model = MODELS[kind]()
    P, block, n = 6, 4, 2
    real = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    prompt, blocks = torch.randint(0, 101, (2, P)), torch.randint(0, 101, (2, n * block))
    mask, positions = block_causal(real, block, n)
    full = model(torch.cat([prompt, blocks], 1), attention_mask=mask, position_ids=positions)

    def decode(prompt, pad_mask, rows):
        """Outputs of the prompt forward, then of each block read from the cache."""
        cache = KVCache()
        steps = [outputs(model(prompt, attention_mask=pad_mask, past_key_values=cache, use_cache=True))]
        for j in range(n):
            assert len(cache) == prompt.shape[1] + j * block
            ids, cols = blocks[rows, j * block:(j + 1) * block], slice(P + j * block, P + (j + 1) * block)
            steps.append(outputs(model(ids, past_key_values=cache)))
            written = model(ids, position_ids=positions[rows, cols], past_key_values=cache, use_cache=True)
            assert max_diff(outputs(written), steps[-1]) == 0  # explicit positions == the default count
        return steps

    first, *reads = decode(prompt, real, slice(None))
    assert max(float((x - y)[real.bool()].abs().max()) for x, y in zip(first, outputs(full, slice(0, P)))) < 1e-5
    for j, read in enumerate(reads):
        assert max_diff(read, outputs(full, slice(P + j * block, P + (j + 1) * block))) < 1e-5
    _, *alone = decode(prompt[:1, 3:], None, slice(0, 1))  # the padded row without its pads
    for j, read in enumerate(reads):
        assert max_diff(alone[j], [t[:1] for t in read]) < 1e-5


def test_cache_errors_are_clear():
    model = tiny_single()
    idx = torch.randint(0, 101, (2, 5))
    with pytest.raises(ValueError, match="use_cache=True needs past_key_values=KVCache()"):
        model(idx, use_cache=True)
    cache = KVCache()
    model(idx, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="filled for batch size 2 but this forward has 1 rows"):
        model(idx[:1], past_key_values=cache)
    with pytest.raises(ValueError, match=r"use_cache=True needs a \(batch, length\) key mask"):
        model(idx, attention_mask=torch.ones(2, 1, 5, 10, dtype=torch.bool), past_key_values=cache, use_cache=True)
    assert len(cache) == 5  # nothing written by the refused forward
    with pytest.raises(ValueError, match=r"4-D attention mask must have shape .* \(2, 1, 5, 10\)"):
        model(idx, attention_mask=torch.ones(2, 1, 5, 5, dtype=torch.bool), past_key_values=cache)
    with pytest.raises(ValueError, match=r"position_ids has shape \(5,\), expected \(batch, length\) = \(2, 5\)"):
        model(idx, position_ids=torch.arange(5), past_key_values=cache)
    with pytest.raises(ValueError, match="Sequence length 28 \\+ 5 cached exceeds block_size 32"):
        model(torch.zeros(2, 28, dtype=torch.long), past_key_values=cache)
