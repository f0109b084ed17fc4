"""Remask SFT rows (remedi_patches.block_layout) and the per-block noise of the block-diffusion layout."""
import math

import pytest
import torch

from remedi_patches.block_layout import build_rows, padded_answer_len
from remedi_patches.noise import block_remask_noise, block_times, realised_p_mask

EOS = 99


def sft_rows(prompts: list[int], answers: list[int], seq_len: int):
    """SFT rows like remedi_patches.data.build_sft_examples: prompt ids 10.., answer ids 50.. (its last token the
    EOS), EOS to seq_len."""
    rows = []
    for p, a in zip(prompts, answers):
        row = list(range(10, 10 + p)) + list(range(50, 50 + a - 1)) + [EOS]
        rows.append(row + [EOS] * (seq_len - len(row)))
    return torch.tensor(rows), torch.tensor(prompts), torch.tensor(answers)


def brute_force_block_rows(prompt: int, answer: int, block: int, total: int):
    """One block-diffusion row built token by token from the layout's description: (ids, attend[q][k], positions,
    scored, block of each scored position)."""
    a_b = math.ceil(answer / block) * block
    clean = list(range(50, 50 + answer - 1)) + [EOS] * (a_b - answer + 1)
    ids = list(range(10, 10 + prompt)) + clean + clean
    kinds = [("prompt", -1)] * prompt + [("clean", i // block) for i in range(a_b)] + \
            [("noisy", i // block) for i in range(a_b)]
    positions = list(range(prompt + a_b)) + list(range(prompt, prompt + a_b))
    pad = total - len(ids)
    ids, kinds, positions = ids + [EOS] * pad, kinds + [("pad", -1)] * pad, positions + [0] * pad

    def sees(q: int, k: int) -> bool:
        (rq, bq), (rk, bk) = kinds[q], kinds[k]
        if rq == "pad":
            return q == k
        if rk == "prompt":
            return True
        if rq == "clean" and rk == "clean":
            return bk <= bq
        if rq == "noisy" and rk == "clean":
            return bk < bq
        if rq == "noisy" and rk == "noisy":
            return bk == bq
        return False

    attend = [[sees(q, k) for k in range(total)] for q in range(total)]
    scored = [r == "noisy" for r, _ in kinds]
    blocks = [b if r == "noisy" else -1 for r, b in kinds]
    return ids, attend, positions, scored, blocks


@pytest.mark.parametrize("block", [1, 3, 4])
def test_block_causal_rows_equal_brute_force(block):
    prompts, answers = [3, 5, 2], [5, 1, 7]  # odd lengths, a one-token answer, rows of different lengths
    ids, plen, atok = sft_rows(prompts, answers, seq_len=12)  # 2 + 7 + padding reads past seq_len: EOS
    rows = build_rows(ids, plen, atok, "block_diffusion", block, EOS)
    total = rows.input_ids.shape[1]
    assert total == max(p + 2 * math.ceil(a / block) * block for p, a in zip(prompts, answers))
    for r, (p, a) in enumerate(zip(prompts, answers)):
        want_ids, attend, positions, scored, blocks = brute_force_block_rows(p, a, block, total)
        assert rows.input_ids[r].tolist() == want_ids
        assert rows.attention_mask[r, 0].tolist() == attend
        assert rows.position_ids[r].tolist() == positions
        assert rows.answer_mask[r].tolist() == scored
        assert rows.block_index[r].tolist() == blocks
        assert int(rows.answer_len[r]) == math.ceil(a / block) * block == sum(scored)


def test_sequence_rows_pad_answers_to_blocks_and_the_batch_to_its_longest_row():
    ids, plen, atok = sft_rows([3, 6], [5, 2], seq_len=16)
    rows = build_rows(ids, plen, atok, "sequence", 4, EOS)
    assert rows.length.tolist() == [11, 10] and rows.input_ids.shape[1] == 11
    assert rows.answer_len.tolist() == [8, 4]
    assert rows.attention_mask.tolist()[1] == [True] * 10 + [False]
    assert rows.answer_mask[0].tolist() == [False] * 3 + [True] * 8
    assert rows.input_ids[0].tolist() == ids[0, :11].tolist()
    assert rows.block_index[0].tolist() == [-1] * 3 + [0] * 4 + [1] * 4 and rows.position_ids is None
    assert padded_answer_len(torch.tensor([1, 4, 5]), 4).tolist() == [4, 4, 8]


def test_trimmed_micro_batch_drops_only_batch_padding():
    ids, plen, atok = sft_rows([2, 9], [3, 9], seq_len=20)
    rows = build_rows(ids, plen, atok, "block_diffusion", 4, EOS)
    short = rows.rows(slice(0, 1)).trimmed()
    alone = build_rows(ids[:1], plen[:1], atok[:1], "block_diffusion", 4, EOS)
    for got, want in zip(short, alone):
        assert torch.equal(got, want)


def test_block_noise_draws_one_t_per_block_and_its_masked_share():
    torch.manual_seed(0)
    b, n_blocks, size = 400, 3, 16
    block_index = torch.arange(n_blocks).repeat_interleave(size).expand(b, -1)  # (B, 48)
    g = torch.Generator().manual_seed(0)
    t = block_times(block_index, generator=g)
    assert torch.equal(t.view(b, n_blocks, size), t.view(b, n_blocks, size)[..., :1].expand(-1, -1, size))
    ids = torch.randint(0, 90, block_index.shape)
    noise = block_remask_noise(ids, torch.ones_like(ids, dtype=torch.bool), block_index, mask_id=98,
                               r_incorrect=0.1, vocab_size=97, special_ids=[EOS],
                               generator=torch.Generator().manual_seed(1))
    # the masked share of every block follows its own t: sum over blocks of (hits - size t) / sqrt(var) ~ N(0, 1)
    hits = noise.masked.view(b, n_blocks, size).sum(-1).float()
    tb = noise.t.view(b, n_blocks, size)[..., 0]
    z = (hits - size * tb).sum() / (size * tb * (1 - tb)).sum().sqrt()
    assert abs(float(z)) < 4
    # blocks of one row are independent: their t are not all equal
    assert (tb.max(-1).values - tb.min(-1).values).gt(0).all()
    share = noise.p_mask[noise.masked]
    want = (hits / size).repeat_interleave(size, -1).view(b, -1)[noise.masked]
    torch.testing.assert_close(share, want)


def test_realised_p_mask_floors_blocks_without_masks():
    masked = torch.tensor([[True, False, False, False, False, True]])
    block_index = torch.tensor([[0, 0, 1, 1, -1, 2]])
    p = realised_p_mask(masked, block_index)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5, 1.0]]))
