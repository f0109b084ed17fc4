"""SEDD transition graphs (DESIGN.md 13; reference/sedd_fastdllm_d1.md part 1, "Graphs", "Loss", "Samplers").

A graph is the forward rate matrix Q of a continuous-time Markov chain on one token, written with rows = from:
R[a, b] = rate of a -> b (a != b), rows summing to 0. The forward transition at total noise sigma is
P(sigma) = exp(sigma R), P[a, b] = probability of a -> b. The score s(x)_y is the concrete score, the ratio
p_t(y) / p_t(x) for changing one position from its token x to y; the model returns log s (0 at y = x).

Two graphs:
  * AbsorbingGraph(tokens): dim = tokens + 1, the mask id is `tokens`; every token jumps to the mask at rate 1.
  * UniformGraph(dim): R = 11^T / dim - I; a token jumps to a uniformly drawn one (possibly itself) at rate 1.

Per position, with x the current token (shapes: x (B, L) long; score / log_score (B, L, V); sigma (B,), (B, L)
or a float):
  * transp_rate(x)        = R[:, x]             (the rates INTO x, the column of x)
  * transp_transition(x)  = P(sigma)[:, x]      (probabilities of y -> x)
  * reverse_rate(x, s)    = R[:, x] * s, diagonal = minus the sum of the off-diagonal
  * staggered_score(s, d) = P(-d)^T s           (so the analytic step is p ∝ P(-d)^T s ⊙ P(d)[:, x])
  * score_entropy(log_s, sigma, x_t, x0): the denoising score entropy of one position,
      SE = sum_{y != x_t} R[y, x_t] (s_y - a_y log s_y + K(a_y)),  a_y = p_t(y | x0) / p_t(x_t | x0),
      K(a) = a (log a - 1); SE >= 0 with equality at the true ratios s = a.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

GRAPH_TYPES = ("absorb", "uniform")
Sigma = Union[torch.Tensor, float]


def sample_categorical(p: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One draw per row of unnormalised, non-negative weights p (..., V) -> (...) long.

    argmax_y p_y / E_y with E_y = 1e-10 - log(u_y + 1e-10) ~ Exp(1): the exponential race picks y with probability
    p_y / sum p. Entries <= 0 are never picked (unless a whole row is <= 0).
    """
    dtype = p.dtype if p.dtype == torch.float64 else torch.float32
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=dtype)
    race = 1e-10 - torch.log(u + 1e-10)
    return (p.to(dtype) / race).argmax(dim=-1)


def _per_position(sigma: Sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a float tensor broadcastable against x (B, L): a float, (B,) -> (B, 1), (B, L) unchanged."""
    sigma = torch.as_tensor(sigma, device=x.device)
    sigma = sigma if sigma.is_floating_point() else sigma.float()
    return sigma.reshape(sigma.shape + (1,) * (x.dim() - sigma.dim()))


def _set_diagonal(m: torch.Tensor, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Copy of m (B, L, V) with m[b, i, x[b, i]] = value[b, i]."""
    return m.scatter(-1, x[..., None], value[..., None].to(m.dtype))


def _at_least_f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _k(a: torch.Tensor) -> torch.Tensor:
    """K(a) = a (log a - 1), the constant that makes score entropy vanish at the true ratio a (> 0)."""
    return a * (torch.log(a) - 1.0)


class Graph:
    """Shared maths; subclasses define dim, absorb, transp_rate, transp_transition, staggered_score, ..."""

    dim: int
    absorb: bool

    def transp_rate(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def reverse_rate(self, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Reverse-process rates out of x (B, L) given the score s (B, L, V) > 0: R[y, x] s_y for y != x, and the
        diagonal minus their sum (rows of the reverse generator sum to 0). (B, L, V)"""
        rate = self.transp_rate(x).to(score.dtype) * score
        rate = _set_diagonal(rate, x, torch.zeros_like(x, dtype=score.dtype))
        return _set_diagonal(rate, x, -rate.sum(dim=-1))

    def onehot(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, L) -> (B, L, V) one-hot."""
        return F.one_hot(x, num_classes=self.dim).to(dtype)


class AbsorbingGraph(Graph):
    """Absorbing (masking) graph over `tokens` real tokens plus the mask: dim = tokens + 1, mask id = tokens."""

    absorb = True

    def __init__(self, tokens: int):
        if tokens < 1:
            raise ValueError(f"AbsorbingGraph needs at least one token, got {tokens}")
        self.tokens = int(tokens)
        self.dim = self.tokens + 1
        self.mask_id = self.tokens

    def __repr__(self) -> str:
        return f"AbsorbingGraph(tokens={self.tokens})"

    def sample_transition(self, x0: torch.Tensor, sigma: Sigma,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Forward noising: each token of x0 (B, L) becomes the mask with probability 1 - e^-sigma. (B, L)"""
        p_move = -torch.expm1(-_per_position(sigma, x0))
        move = torch.rand(x0.shape, generator=generator, device=x0.device) < p_move
        return torch.where(move, torch.full_like(x0, self.mask_id), x0)

    def sample_limit(self, shape: Sequence[int], device: Union[str, torch.device, None] = None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The limit distribution: every position is the mask. `generator` is unused (kept for a common API)."""
        return torch.full(tuple(shape), self.mask_id, dtype=torch.long, device=device)

    def transp_rate(self, x: torch.Tensor) -> torch.Tensor:
        """R[:, x]: -onehot(x), plus 1 everywhere when x is the mask (every token flows into it). (B, L, V)"""
        into_mask = (x == self.mask_id).float()[..., None]
        return into_mask - self.onehot(x)

    def transp_transition(self, x: torch.Tensor, sigma: Sigma) -> torch.Tensor:
        """P(sigma)[:, x]: e^-sigma onehot(x), plus 1 - e^-sigma everywhere when x is the mask. (B, L, V)"""
        sigma = _per_position(sigma, x)[..., None]
        into_mask = (x == self.mask_id).float()[..., None]
        return torch.exp(-sigma) * self.onehot(x) + into_mask * -torch.expm1(-sigma)

    def staggered_score(self, score: torch.Tensor, dsigma: Sigma) -> torch.Tensor:
        """P(-dsigma)^T s: s_y e^dsigma for every y, and the mask entry gets (1 - e^dsigma) sum_y s_y added.
        score (B, L, V) -> (B, L, V)"""
        d = torch.as_tensor(dsigma, device=score.device, dtype=score.dtype)
        d = d.reshape(d.shape + (1,) * (score.dim() - d.dim()))  # (B, 1, 1) or (B, L, 1)
        extra = -torch.expm1(d[..., 0]) * score.sum(dim=-1)  # (B, L)
        out = score * torch.exp(d)
        return out.index_add(-1, torch.tensor([self.mask_id], device=score.device), extra[..., None])

    def score_entropy(self, log_score: torch.Tensor, sigma: Sigma, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Denoising score entropy per position (B, L), float32 (float64 if given). Nonzero only at masked positions;
        there every weight R[y, mask] is 1, the only nonzero ratio is r = e^-sigma / (1 - e^-sigma) = 1 / (e^sigma - 1)
        (to y = x0), and   SE = sum_{y != mask} exp(log s_y) - r log s_{x0} + r (log r - 1)."""
        masked = x_t == self.mask_id  # (B, L)
        ls = torch.where(masked[..., None], _at_least_f32(log_score), 0.0)[..., : self.tokens]  # (B, L, V - 1)
        r = 1.0 / torch.expm1(_at_least_f32(_per_position(sigma, x_t)))  # (B, 1) or (B, L)
        x0_safe = x0.clamp(max=self.tokens - 1)  # x0 is never the mask; clamp only guards the gather
        log_s_x0 = ls.gather(-1, x0_safe[..., None]).squeeze(-1)  # (B, L)
        se = ls.exp().sum(dim=-1) - r * log_s_x0 + _k(r)
        return torch.where(masked, se, torch.zeros_like(se))


class UniformGraph(Graph):
    """Uniform graph over `dim` tokens: R = 11^T / dim - I, no extra token."""

    absorb = False
    mask_id = None

    def __init__(self, dim: int):
        if dim < 2:
            raise ValueError(f"UniformGraph needs at least two tokens, got {dim}")
        self.dim = int(dim)

    def __repr__(self) -> str:
        return f"UniformGraph(dim={self.dim})"

    def sample_transition(self, x0: torch.Tensor, sigma: Sigma,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Forward noising: with probability 1 - e^-sigma a token is replaced by a uniform draw over all dim
        tokens (which may be itself). (B, L)"""
        p_move = -torch.expm1(-_per_position(sigma, x0))
        move = torch.rand(x0.shape, generator=generator, device=x0.device) < p_move
        fresh = torch.randint(0, self.dim, x0.shape, generator=generator, device=x0.device)
        return torch.where(move, fresh, x0)

    def sample_limit(self, shape: Sequence[int], device: Union[str, torch.device, None] = None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The limit distribution: i.i.d. uniform tokens. (shape) long"""
        return torch.randint(0, self.dim, tuple(shape), generator=generator, device=device)

    def transp_rate(self, x: torch.Tensor) -> torch.Tensor:
        """R[:, x] = 1 / dim - onehot(x). (B, L, V)"""
        return 1.0 / self.dim - self.onehot(x)

    def transp_transition(self, x: torch.Tensor, sigma: Sigma) -> torch.Tensor:
        """P(sigma)[:, x] = e^-sigma onehot(x) + (1 - e^-sigma) / dim. (B, L, V)"""
        sigma = _per_position(sigma, x)[..., None]
        return torch.exp(-sigma) * self.onehot(x) + -torch.expm1(-sigma) / self.dim

    def staggered_score(self, score: torch.Tensor, dsigma: Sigma) -> torch.Tensor:
        """P(-dsigma)^T s = e^dsigma s + (1 - e^dsigma) / dim * sum_y s_y (P is symmetric). (B, L, V)"""
        d = torch.as_tensor(dsigma, device=score.device, dtype=score.dtype)
        d = d.reshape(d.shape + (1,) * (score.dim() - d.dim()))
        return torch.exp(d) * score - torch.expm1(d) / self.dim * score.sum(dim=-1, keepdim=True)

    def score_entropy(self, log_score: torch.Tensor, sigma: Sigma, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Denoising score entropy per position (B, L), float32 (float64 if given), in closed form.

        The weights are R[y, x_t] = 1/V for every y != x_t. With e = e^sigma - 1 and rho = 1 + V / e the ratio of
        the diagonal to the off-diagonal transition probability, p_t(y | x0) / p_t(x_t | x0) is
          * x_t = x0:   1 / rho for every y != x_t;
          * x_t != x0:  rho for y = x0, 1 for the other V - 2 tokens.
        Writing S = sum_{y != x_t} s_y and Lg = sum_{y != x_t} log s_y, and K(a) = a (log a - 1) (K(1) = -1):
          x_t = x0:   SE = (S - Lg / rho + (V - 1) K(1 / rho)) / V
          x_t != x0:  SE = (S - Lg - (rho - 1) log s_{x0} + K(rho) - (V - 2)) / V,  (rho - 1) / V = 1 / e.
        """
        v = self.dim
        ls = _at_least_f32(log_score)  # (B, L, V)
        e = torch.expm1(_at_least_f32(_per_position(sigma, x_t)))  # (B, 1) or (B, L)
        rho = 1.0 + v / e
        ls_x = ls.gather(-1, x_t[..., None]).squeeze(-1)  # (B, L), 0 for a model's output
        ls_x0 = ls.gather(-1, x0[..., None]).squeeze(-1)
        s_sum = ls.exp().sum(dim=-1) - ls_x.exp()  # S
        log_sum = ls.sum(dim=-1) - ls_x  # Lg
        same = (s_sum - log_sum / rho + (v - 1) * _k(1.0 / rho)) / v
        diff = (s_sum - log_sum - (rho - 1.0) * ls_x0 + _k(rho) - (v - 2)) / v
        return torch.where(x_t == x0, same, diff)


def graph_from_config(config: Mapping[str, Any], tokens: int) -> Graph:
    """The graph named by upstream's `graph.type` ('absorb' | 'uniform') over `tokens` real tokens (upstream's
    top-level `tokens`, 50257 for GPT-2): AbsorbingGraph(tokens) (dim tokens + 1) or UniformGraph(tokens).
    Accepts the `graph` group itself or a whole config holding it (dict or OmegaConf DictConfig)."""
    group = config["graph"] if "graph" in config else config
    kind = str(group.get("type", "")).lower()
    if kind in ("absorb", "absorbing"):
        return AbsorbingGraph(tokens)
    if kind == "uniform":
        return UniformGraph(tokens)
    raise ValueError(f"graph.type must be one of {GRAPH_TYPES}, got {group.get('type')!r}")
