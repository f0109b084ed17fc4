"""SEDD noise schedules (DESIGN.md 13; reference/sedd_fastdllm_d1.md part 1, "Noise schedules").

A schedule maps diffusion time t in [0, 1] to the total noise sigma(t) and its rate dsigma(t) = d sigma / dt. The
forward process at time t is the graph's transition exp(sigma(t) Q), so the model is conditioned on sigma, not t.

  * LogLinearNoise(eps):  sigma = -log(1 - (1 - eps) t),  dsigma = (1 - eps) / (1 - (1 - eps) t).
    Under the absorbing graph a token is masked with probability 1 - e^-sigma = (1 - eps) t.
  * GeometricNoise(sigma_min, sigma_max):  sigma = sigma_min^(1 - t) sigma_max^t,
    dsigma = sigma (log sigma_max - log sigma_min).

Pure tensor maths: t of any shape (usually (B,)) gives sigma and dsigma of the same shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Tuple, Union

import torch

NOISE_TYPES = ("loglinear", "geometric")


@dataclass(frozen=True)
class LogLinearNoise:
    """sigma(t) = -log(1 - (1 - eps) t): the absorbing graph masks a token with probability (1 - eps) t."""

    eps: float = 1e-3

    def __post_init__(self):
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"LogLinearNoise eps must be in [0, 1), got {self.eps}")

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t), same shape as t."""
        return -torch.log1p(-(1.0 - self.eps) * t)

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        """dsigma/dt, same shape as t."""
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def __call__(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sigma, dsigma) at t."""
        return self.total_noise(t), self.rate_noise(t)


@dataclass(frozen=True)
class GeometricNoise:
    """sigma(t) = sigma_min^(1 - t) sigma_max^t (upstream's default for the uniform graph)."""

    sigma_min: float = 1e-4
    sigma_max: float = 20.0

    def __post_init__(self):
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"GeometricNoise needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = exp((1 - t) log sigma_min + t log sigma_max), same shape as t."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + t * (hi - lo))

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        """dsigma/dt = sigma (log sigma_max - log sigma_min), same shape as t."""
        return self.total_noise(t) * (math.log(self.sigma_max) - math.log(self.sigma_min))

    def __call__(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sigma, dsigma) at t."""
        return self.total_noise(t), self.rate_noise(t)


Noise = Union[LogLinearNoise, GeometricNoise]


def noise_from_config(config: Mapping[str, Any]) -> Noise:
    """The schedule named by upstream's `noise` config group: `{type: loglinear|geometric, sigma_min, sigma_max}`.

    Accepts the group itself or a whole config holding it under `noise` (dict or OmegaConf DictConfig). LogLinear
    takes an optional `eps` (default 1e-3, as upstream, which has no key for it).
    """
    group = config["noise"] if "noise" in config else config
    kind = str(group.get("type", "")).lower()
    if kind == "loglinear":
        return LogLinearNoise(eps=float(group.get("eps", 1e-3)))
    if kind == "geometric":
        return GeometricNoise(sigma_min=float(group.get("sigma_min", 1e-4)),
                              sigma_max=float(group.get("sigma_max", 20.0)))
    raise ValueError(f"noise.type must be one of {NOISE_TYPES}, got {group.get('type')!r}")
