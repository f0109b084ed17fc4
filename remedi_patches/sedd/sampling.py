"""SEDD samplers (DESIGN.md 13; reference/sedd_fastdllm_d1.md part 1, "Samplers").

Reverse diffusion from the graph's limit distribution over timesteps linspace(1, eps, steps + 1), dt =
(1 - eps) / steps. Every step: project (write the prefix / suffix in), then one predictor step:
  * euler:     p = onehot(x) + dt * dsigma(t) * reverse_rate(x, s),   s = exp(log_score(x, sigma(t)))
  * analytic:  p ∝ staggered_score(s, d) ⊙ transp_transition(x, d),   d = sigma(t) - sigma(t - dt)   (Tweedie)
then x ~ Cat(p) per position. Finally the denoiser (the analytic formula with d = sigma(t_min); under the absorbing
graph the mask column is dropped so no mask remains) and a last projection.

temperature (absorbing graph; not upstream's, which samples at 1): sharpens which token an unmasking position
becomes, never when it unmasks: the non-mask columns of p keep their total and are redistributed as
softmax(log p / temperature), the argmax at 0 (as LLaDA's temperature-0 sampling picks tokens).

The *_probs functions are the pure maths of one step (unnormalised probabilities (B, L, V)); the *_step functions
call the model and draw. `score_fn(x (B, L) long, sigma (B,) float) -> log_score (B, L, V)` is all that is assumed
of the model.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from remedi_patches.sedd.graphs import Graph, sample_categorical
from remedi_patches.sedd.noise import Noise

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, float, torch.Tensor], None]
PREDICTORS = ("euler", "analytic")


def _col(v: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1) to scale (B, L, V) tensors."""
    return v.reshape(-1, 1, 1)


def euler_probs(graph: Graph, x: torch.Tensor, log_score: torch.Tensor, dsigma: torch.Tensor,
                dt: float) -> torch.Tensor:
    """onehot(x) + dt * dsigma * reverse_rate(x, exp(log_score)). x (B, L); log_score (B, L, V); dsigma (B,).
    The diagonal can go negative for a large step; sample_categorical never picks a non-positive entry."""
    rate = graph.reverse_rate(x, log_score.float().exp())  # (B, L, V)
    return graph.onehot(x) + dt * _col(dsigma.float()) * rate


def analytic_probs(graph: Graph, x: torch.Tensor, log_score: torch.Tensor, dsigma_step: torch.Tensor) -> torch.Tensor:
    """Tweedie tau-leaping: staggered_score(s, d) ⊙ transp_transition(x, d), unnormalised. (B, L, V)
    x (B, L); log_score (B, L, V); dsigma_step d (B,) = sigma(t) - sigma(t - dt)."""
    d = dsigma_step.float()
    return graph.staggered_score(log_score.float().exp(), d) * graph.transp_transition(x, d)


def denoise_probs(graph: Graph, x: torch.Tensor, log_score: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The last step: analytic_probs with d = sigma(t_min), the mask column dropped under the absorbing graph.
    (B, L, V) or (B, L, V - 1)."""
    probs = analytic_probs(graph, x, log_score, sigma)
    return probs[..., :-1] if graph.absorb else probs


def temper(probs: torch.Tensor, temperature: float, absorb: bool = True) -> torch.Tensor:
    """probs (B, L, V) of a predictor step (or the denoiser's (B, L, V - 1): absorb=False) with the token columns
    (all but the last under the absorbing graph) tempered at `temperature`, each row keeping its total over them.
    1 returns probs itself; 0 puts the whole total on the argmax."""
    if temperature == 1.0:
        return probs
    tokens = probs[..., :-1] if absorb else probs
    total = tokens.sum(dim=-1, keepdim=True)  # (B, L, 1)
    if temperature == 0.0:
        shape = torch.zeros_like(tokens).scatter_(-1, tokens.argmax(dim=-1, keepdim=True), 1.0)
    else:
        shape = torch.softmax(tokens.clamp_min(0).log() / temperature, dim=-1)  # zero entries stay zero
    tempered = torch.where(total > 0, shape * total, tokens)
    return torch.cat([tempered, probs[..., -1:]], dim=-1) if absorb else tempered


def _times(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device)


def euler_step(score_fn: ScoreFn, graph: Graph, noise: Noise, x: torch.Tensor, t: float, dt: float,
               generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> torch.Tensor:
    """One Euler step from time t to t - dt. (B, L) -> (B, L)"""
    sigma, dsigma = noise(_times(t, x))
    return sample_categorical(temper(euler_probs(graph, x, score_fn(x, sigma), dsigma, dt), temperature), generator)


def analytic_step(score_fn: ScoreFn, graph: Graph, noise: Noise, x: torch.Tensor, t: float, dt: float,
                  generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> torch.Tensor:
    """One analytic (Tweedie) step from time t to t - dt. (B, L) -> (B, L)"""
    sigma = noise.total_noise(_times(t, x))
    d = sigma - noise.total_noise(_times(t - dt, x))
    return sample_categorical(temper(analytic_probs(graph, x, score_fn(x, sigma), d), temperature), generator)


def denoise_step(score_fn: ScoreFn, graph: Graph, noise: Noise, x: torch.Tensor, t: float,
                 generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> torch.Tensor:
    """Remove the noise left at t_min in one analytic step; no mask remains under the absorbing graph."""
    sigma = noise.total_noise(_times(t, x))
    probs = denoise_probs(graph, x, score_fn(x, sigma), sigma)
    return sample_categorical(temper(probs, temperature, absorb=False), generator)


def check_temperature(temperature: float, graph: Optional[Graph] = None) -> None:
    """ValueError unless temperature is finite and >= 0, and 1 for a uniform graph (no mask to unmask from)."""
    if not (temperature >= 0.0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0 (1 = upstream's sampler), got {temperature}")
    if graph is not None and not graph.absorb and temperature != 1.0:
        raise ValueError(f"temperature {temperature} tempers the token an absorbing-graph position unmasks to; this "
                         "SEDD uses the uniform graph, so leave the temperature at 1")


def _as_rows(ids: Optional[torch.Tensor], b: int, name: str, device) -> Optional[torch.Tensor]:
    """(n,) or (B, n) ids -> (B, n) long on device; None stays None."""
    if ids is None:
        return None
    ids = torch.as_tensor(ids, device=device).long()
    if ids.dim() == 1:
        ids = ids[None].expand(b, -1)
    if ids.dim() != 2 or ids.shape[0] != b:
        raise ValueError(f"{name} must be (n,) or ({b}, n) token ids, got shape {tuple(ids.shape)}")
    return ids


def project(x: torch.Tensor, prefix: Optional[torch.Tensor] = None, suffix: Optional[torch.Tensor] = None,
            prefix_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (B, L) with prefix (B, Lp) written at [0, Lp) and suffix (B, Ls) at [L - Ls, L). prefix_mask (B, Lp) bool,
    optional: only its True entries are written (ragged prompts padded on the right)."""
    out = x.clone()
    if prefix is not None and prefix.shape[1]:
        lp = prefix.shape[1]
        out[:, :lp] = prefix if prefix_mask is None else torch.where(prefix_mask, prefix, out[:, :lp])
    if suffix is not None and suffix.shape[1]:
        out[:, x.shape[1] - suffix.shape[1]:] = suffix
    return out


@torch.no_grad()
def sample(score_fn: ScoreFn, graph: Graph, noise: Noise, shape, steps: int, predictor: str = "euler",
           denoise: bool = True, eps: float = 1e-5, prefix: Optional[torch.Tensor] = None,
           suffix: Optional[torch.Tensor] = None, device: Union[str, torch.device, None] = "cpu",
           generator: Optional[torch.Generator] = None, prefix_mask: Optional[torch.Tensor] = None,
           callback: Optional[StepCallback] = None, temperature: float = 1.0) -> torch.Tensor:
    """Draw (B, L) = shape token ids by reverse diffusion (see the module docstring).

    prefix / suffix: (n,) or (B, n) ids held fixed at the start / end of every row (conditional generation of a
    response after a prompt, or infilling); prefix_mask (B, Lp) restricts the prefix to its True entries.
    callback(step, t, x) is called after each predictor step (x already projected, t the time reached), for
    trajectories. `generator` makes the draws reproducible (it must live on `device`). temperature: see the module
    docstring (absorbing graph only; 1 = upstream's sampler).
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}; upstream uses 1e-5")
    check_temperature(temperature, graph)
    b, length = int(shape[0]), int(shape[1])
    prefix = _as_rows(prefix, b, "prefix", device)
    suffix = _as_rows(suffix, b, "suffix", device)
    fixed = (0 if prefix is None else prefix.shape[1]) + (0 if suffix is None else suffix.shape[1])
    if fixed > length:
        raise ValueError(f"prefix and suffix ({fixed} tokens) do not fit in length {length}")
    if prefix_mask is not None and (prefix is None or prefix_mask.shape != prefix.shape):
        raise ValueError("prefix_mask needs a prefix of the same (B, Lp) shape")

    def proj(x: torch.Tensor) -> torch.Tensor:
        return project(x, prefix, suffix, prefix_mask)

    step_fn = euler_step if predictor == "euler" else analytic_step
    timesteps = torch.linspace(1.0, eps, steps + 1).tolist()
    dt = (1.0 - eps) / steps
    x = proj(graph.sample_limit((b, length), device=device, generator=generator))
    for i in range(steps):
        x = proj(step_fn(score_fn, graph, noise, x, timesteps[i], dt, generator, temperature))
        if callback is not None:
            callback(i, timesteps[i + 1], x)
    if denoise:
        x = proj(denoise_step(score_fn, graph, noise, x, timesteps[-1], generator, temperature))
    return x
