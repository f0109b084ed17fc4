"""Training rows of Remask SFT (DESIGN.md 10): the sequence layout and the paper's block-diffusion layout.

Both start from SFT rows (prompt, answer, EOS) and pad each answer with EOS to a multiple of `block_length`
(A_b tokens) and the batch to its longest row (never to the full --seq_len). Batch padding is EOS too; it is
neither attended to nor scored.

  sequence         [prompt | answer]                      bidirectional attention over the row's real tokens
  block_diffusion  [prompt | clean answer | noisy answer]  block-causal attention (True = attend):
      prompt            -> prompt
      clean block k     -> prompt, clean blocks <= k
      noisy block j     -> prompt, clean blocks < j, noisy block j
      batch padding     -> itself only (never read; keeps softmax rows finite)
  Positions of the noisy copy equal those of the clean answer: [0 .. P + A_b) ++ [P .. P + A_b) ++ 0 (padding).

A noisy block therefore sees exactly what block decoding gives it (remedi_patches.block_decoding: the prompt and
the finished blocks in the KV cache, then the block being denoised), so the decoder runs the model as it was trained.
The scored positions (answer_mask) are the answer in the sequence layout and the noisy copy in the block-diffusion
layout; the noise of remedi_patches.noise applies there only.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from remedi_patches.cli import UserError
from remedi_patches.noise import RemaskBatch

LAYOUTS = ("sequence", "block_diffusion")
PROMPT, CLEAN, NOISY, PAD = 0, 1, 2, 3  # regions of a block-diffusion row


class RemaskRows(NamedTuple):
    input_ids: torch.Tensor  # (B, L) long, clean tokens: the targets (and the model input outside answer_mask)
    answer_mask: torch.Tensor  # (B, L) bool, positions noised and scored
    answer_len: torch.Tensor  # (B,) long, scored positions per row (A_b: the answer with its EOS block padding)
    block_index: torch.Tensor  # (B, L) long, answer block of each scored position, -1 elsewhere
    length: torch.Tensor  # (B,) long, real tokens per row (the rest is batch padding)
    attention_mask: Optional[torch.Tensor]  # (B, L) bool padding mask, (B, 1, L, L) bool True = attend, or None
    position_ids: Optional[torch.Tensor]  # (B, L) long (block_diffusion) or None (0 .. L-1)

    def trimmed(self) -> "RemaskRows":
        """The same rows without the columns of batch padding beyond the longest row (e.g. after slicing a
        micro-batch out of a global batch): nothing attended or scored is dropped."""
        n = int(self.length.max())
        mask = self.attention_mask
        if mask is not None:
            mask = mask[..., :n] if mask.dim() == 2 else mask[..., :n, :n]
        return RemaskRows(self.input_ids[:, :n], self.answer_mask[:, :n], self.answer_len, self.block_index[:, :n],
                          self.length, mask, None if self.position_ids is None else self.position_ids[:, :n])

    def rows(self, index) -> "RemaskRows":
        """Rows `index` (a slice or index tensor) of every field."""
        return RemaskRows(*(None if x is None else x[index] for x in self))

    def to(self, device) -> "RemaskRows":
        return RemaskRows(*(None if x is None else x.to(device) for x in self))


def micro_batch(rows: RemaskRows, noise: RemaskBatch, index) -> tuple[RemaskRows, RemaskBatch]:
    """Rows `index` (a slice) of a batch and their noise, without the padding columns beyond their longest row."""
    part = rows.rows(index).trimmed()
    n = part.input_ids.shape[1]
    return part, RemaskBatch(*(x[index] if x.dim() == 1 else x[index, :n] for x in noise))


def plain_rows(input_ids: torch.Tensor, answer_mask: torch.Tensor) -> RemaskRows:
    """Rows used as they are (no padding, full attention): input_ids (B, L), answer_mask (B, L) bool."""
    b, n = input_ids.shape
    block_index = torch.where(answer_mask, torch.zeros_like(input_ids), torch.full_like(input_ids, -1))
    return RemaskRows(input_ids, answer_mask.bool(), answer_mask.sum(1), block_index,
                      torch.full((b,), n, device=input_ids.device), None, None)


def padded_answer_len(answer_tokens: torch.Tensor, block_length: int) -> torch.Tensor:
    """(B,) answer tokens (with their EOS) -> A_b, rounded up to a multiple of block_length (at least one block)."""
    return (answer_tokens.clamp(min=1) + block_length - 1) // block_length * block_length


def row_lengths(prompt_len: torch.Tensor, answer_tokens: torch.Tensor, layout: str,
                block_length: int) -> torch.Tensor:
    """(B,) real tokens per row of `layout`: prompt + (1 or 2) x the answer padded to a multiple of block_length."""
    copies = 2 if layout == "block_diffusion" else 1
    return prompt_len.long() + copies * padded_answer_len(answer_tokens.long(), block_length)


def require_rows_fit(longest: int, layout: str, block_length: int, context: Optional[int]) -> None:
    """UserError when rows of `longest` tokens exceed the model's `context` (None: unknown, not checked)."""
    if context is not None and longest > context:
        raise UserError(f"--layout {layout} makes rows of up to {longest} tokens (prompt + "
                        f"{'2 x ' if layout == 'block_diffusion' else ''}the answer padded to --block_length "
                        f"{block_length}), beyond the model's context of {context}; lower --seq_len or "
                        "--block_length")


def build_rows(input_ids: torch.Tensor, prompt_len: torch.Tensor, answer_tokens: torch.Tensor, layout: str,
               block_length: int, eos_id: int) -> RemaskRows:
    """Training rows of `layout` from SFT rows.

    input_ids (B, S) long: prompt, answer, EOS to the right (remedi_patches.data.SFTExamples rows); prompt_len (B,);
    answer_tokens (B,) answer tokens including the EOS that ends it. Answers are padded with EOS to A_b (reading
    past S gives EOS), rows with EOS to the longest; see the module doc for the layouts."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    b, s = input_ids.shape
    p, a = prompt_len.long()[:, None], padded_answer_len(answer_tokens.long(), block_length)[:, None]  # (B, 1)
    copies = 1 if layout == "sequence" else 2
    length = row_lengths(prompt_len, answer_tokens, layout, block_length)  # (B,)
    n = int(length.max())
    pos = torch.arange(n, device=input_ids.device)[None, :].expand(b, n)  # (B, L)
    real = pos < length[:, None]
    noisy = real & (pos >= p + a) if copies == 2 else torch.zeros_like(real)
    source = torch.where(noisy, pos - a, pos)  # (B, L) column of input_ids each token comes from
    ids = torch.full((b, n), eos_id, dtype=input_ids.dtype, device=input_ids.device)
    inside = real & (source < s)
    ids[inside] = input_ids.gather(1, source.clamp(max=s - 1))[inside]
    answer_mask = (real & (pos >= p)) if copies == 1 else noisy
    start = p if copies == 1 else p + a
    block_index = torch.where(answer_mask, (pos - start) // block_length, torch.full_like(pos, -1))
    if copies == 1:
        return RemaskRows(ids, answer_mask, a.squeeze(1), block_index, length, real, None)
    region = torch.where(pos < p, PROMPT, torch.where(pos < p + a, CLEAN, torch.where(real, NOISY, PAD)))
    block = torch.where(region == CLEAN, (pos - p) // block_length, block_index)  # (B, L); -1 on prompt / padding
    return RemaskRows(ids, answer_mask, a.squeeze(1), block_index, length, block_causal_attention(region, block),
                      torch.where(real, source, torch.zeros_like(source)))


def block_causal_attention(region: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True = attend, from each position's region (PROMPT / CLEAN / NOISY / PAD) and answer block
    (B, L): the rules of the module doc."""
    rq, rk = region[:, :, None], region[:, None, :]  # (B, L, 1) queries, (B, 1, L) keys
    bq, bk = block[:, :, None], block[:, None, :]
    keep = (rk == PROMPT) & (rq != PAD)
    keep |= (rk == CLEAN) & (((rq == CLEAN) & (bk <= bq)) | ((rq == NOISY) & (bk < bq)))
    keep |= (rk == NOISY) & (rq == NOISY) & (bk == bq)
    keep |= (rq == PAD) & torch.eye(region.shape[1], dtype=torch.bool, device=region.device)
    return keep[:, None]
