"""Upstream LLaDA's sampler written out with plain loops: the independent reference the tests hold
`remedi_patches.sampling.generate` to token for token, and the baseline of bench/bench_fast_decoding.py."""
import torch
import torch.nn.functional as F

EOS = 1  # the toy models' EOS (tests/toy_models); pass eos_id for another model


def logits_from(output):
    return output if isinstance(output, torch.Tensor) else output.logits


def reference_generate(model, prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale,
                       remasking, mask_id, logits_eos_inf=False, eos_id=EOS):
    """Upstream LLaDA's algorithm, written out with plain loops (per-row top-k, whole-sequence tensors)."""
    b, lp = prompt.shape
    x = torch.full((b, lp + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :lp] = prompt
    am = None
    if attention_mask is not None:
        am = torch.cat([attention_mask, attention_mask.new_ones(b, gen_length)], 1)
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for nb in range(num_blocks):
        end = lp + (nb + 1) * block_length
        masks = (x[:, end - block_length:end] == mask_id).sum(1).tolist()
        counts = [[m // per_block + (1 if s < m % per_block else 0) for s in range(per_block)] for m in masks]
        for s in range(per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                am2 = None if am is None else torch.cat([am, am])
                both = logits_from(model(torch.cat([x, un_x]), attention_mask=am2))
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = logits_from(model(x, attention_mask=am)).clone()
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            if temperature == 0:
                noisy = logits
            else:
                u = torch.rand_like(logits, dtype=torch.float64)
                noisy = logits.to(torch.float64).exp() / (-torch.log(u)) ** temperature
            x0 = noisy.argmax(dim=-1)
            if remasking == "low_confidence":
                conf = torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None])[..., 0]
            else:
                conf = torch.rand(x0.shape, device=x0.device)
            conf[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, -torch.inf)
            for j in range(b):
                chosen = torch.topk(conf[j], k=counts[j][s]).indices
                x[j, chosen] = x0[j, chosen]
    return x
