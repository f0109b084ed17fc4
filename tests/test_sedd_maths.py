"""SEDD maths (remedi_patches.sedd: noise, graphs, losses, sampling) against hand computations on toy score
functions: score entropy written out from its definition, the samplers' step probabilities against matrix
exponentials of the rate matrix, prefix conditioning, and sampling / the ELBO with the exact score of an i.i.d.
categorical distribution.

Rate matrices here are written with rows = from: R[a, b] = rate of a -> b, so the forward transition is
P(sigma) = matrix_exp(sigma R) and the reverse rate out of x towards y is R[y, x] s_y.
"""
import math

import pytest
import torch

from remedi_patches.sedd.graphs import (AbsorbingGraph, UniformGraph, graph_from_config, sample_categorical)
from remedi_patches.sedd.losses import score_entropy_elbo, score_entropy_loss
from remedi_patches.sedd.noise import GeometricNoise, LogLinearNoise, noise_from_config
from remedi_patches.sedd.sampling import (analytic_probs, analytic_step, denoise_probs, euler_probs, euler_step,
                                          sample, temper)


def rate_matrix(graph) -> torch.Tensor:
    """R (V, V) float64, rows = from, written out by hand."""
    v = graph.dim
    if graph.absorb:
        r = torch.zeros(v, v, dtype=torch.float64)
        for y in range(v - 1):
            r[y, v - 1] = 1.0  # every token jumps to the mask at rate 1
            r[y, y] = -1.0
        return r
    return torch.full((v, v), 1.0 / v, dtype=torch.float64) - torch.eye(v, dtype=torch.float64)


def table_score_fn(table: torch.Tensor):
    """A toy model: log s = table (B, L, V) with each position's own token set to 0 (as the real model does)."""
    def score_fn(x, sigma):
        assert sigma.shape == (x.shape[0],)
        return table[: x.shape[0], : x.shape[1]].scatter(-1, x[..., None], 0.0)
    return score_fn


def iid_absorbing_log_score(p: torch.Tensor):
    """Exact log concrete score of x with every position i.i.d. from p (tokens,) under the absorbing graph.

    One position at total noise sigma has p_t(y) = e^-sigma p_y for a token y and p_t(mask) = 1 - e^-sigma; the
    positions stay independent, so s(x)_y = p_t(y) / p_t(x_i) position by position:
      x_i = mask:   log s_y = log p_y - log(e^sigma - 1),   log s_mask = 0;
      x_i = token:  log s_y = log p_y - log p_{x_i},        log s_mask = log(e^sigma - 1) - log p_{x_i}.
    """
    logp = p.double().log()
    mask = p.numel()

    def score_fn(x, sigma):
        lem1 = torch.log(torch.expm1(sigma.double()))[:, None]  # (B, 1)
        lp_x = logp[x.clamp(max=mask - 1)]  # (B, L)
        on_mask = (x == mask)
        tok = torch.where(on_mask[..., None], logp - lem1[..., None], logp - lp_x[..., None])  # (B, L, tokens)
        m = torch.where(on_mask, torch.zeros_like(lp_x), lem1 - lp_x)[..., None]
        return torch.cat([tok, m], dim=-1).float()
    return score_fn


def iid_uniform_log_score(p: torch.Tensor):
    """Exact log concrete score for i.i.d. positions from p (V,) under the uniform graph: with
    p_t(y) = e^-sigma p_y + (1 - e^-sigma) / V, log s_y = log p_t(y) - log p_t(x_i)."""
    def score_fn(x, sigma):
        e = torch.exp(-sigma.double())[:, None]  # (B, 1)
        lpt = torch.log(e * p.double() + (1 - e) / p.numel())  # (B, V)
        lpt = lpt[:, None, :].expand(x.shape[0], x.shape[1], -1)
        return (lpt - lpt.gather(-1, x[..., None])).float()
    return score_fn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chi_square(samples: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(samples.flatten(), minlength=p.numel()).double()
    expected = samples.numel() * p.double()
    keep = expected > 0  # a zero-probability entry is checked separately (it must never be drawn)
    return float(((counts - expected)[keep] ** 2 / expected[keep]).sum())


# ---------------------------------------------------------------------------------------------- noise, configs


@pytest.mark.parametrize("noise", [LogLinearNoise(), LogLinearNoise(eps=0.1), GeometricNoise(),
                                   GeometricNoise(1e-3, 5.0)])
def test_dsigma_is_the_derivative_of_sigma(noise):
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64).requires_grad_()
    sigma, dsigma = noise(t)
    (grad,) = torch.autograd.grad(sigma.sum(), t)
    assert torch.allclose(grad, dsigma, rtol=1e-10)


def test_loglinear_masks_with_probability_one_minus_eps_times_t():
    noise, g = LogLinearNoise(eps=1e-3), AbsorbingGraph(7)
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    sigma, _ = noise(t)
    assert torch.allclose(-torch.expm1(-sigma), (1 - 1e-3) * t)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 7, (5, 40_000), generator=gen)
    frac = (g.sample_transition(x0, sigma.float(), generator=gen) == g.mask_id).float().mean(1).double()
    assert torch.allclose(frac, (1 - 1e-3) * t, atol=5 * 0.5 / math.sqrt(40_000))


def test_configs():
    assert noise_from_config({"noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20}}) == LogLinearNoise()
    assert noise_from_config({"type": "geometric", "sigma_min": 1e-3, "sigma_max": 5}) == GeometricNoise(1e-3, 5.0)
    g = graph_from_config({"graph": {"type": "absorb"}, "tokens": 50257}, 50257)
    assert g.absorb and g.dim == 50258 and g.mask_id == 50257
    u = graph_from_config({"type": "uniform"}, 11)
    assert not u.absorb and u.dim == 11
    with pytest.raises(ValueError, match="noise.type"):
        noise_from_config({"type": "cosine"})
    with pytest.raises(ValueError, match="graph.type"):
        graph_from_config({"type": "blocky"}, 3)


def test_sample_categorical_accepts_unnormalised_weights():
    p = torch.tensor([2.0, 0.0, 6.0, 2.0])
    draws = sample_categorical(p.expand(50_000, 4), torch.Generator().manual_seed(0))
    assert chi_square(draws, p / p.sum()) < 20 and not (draws == 1).any()


# ------------------------------------------------------------------------------------------------ graph basics


@pytest.mark.parametrize("graph", [AbsorbingGraph(4), UniformGraph(5)])
def test_transitions_match_the_rate_matrix(graph):
    r = rate_matrix(graph)
    x = torch.arange(graph.dim)[None]  # (1, V): every token once
    assert torch.allclose(graph.transp_rate(x)[0].double(), r.T)  # row j = column x_j of R
    sigma = 0.7
    assert torch.allclose(graph.transp_transition(x, sigma)[0].double(), torch.matrix_exp(sigma * r).T, atol=1e-6)
    s = torch.rand(1, 3, graph.dim, dtype=torch.float64) + 0.1
    stag = graph.staggered_score(s, 0.3)
    assert torch.allclose(stag, s @ torch.matrix_exp(-0.3 * r))  # P(-d)^T s for each position


# ------------------------------------------------------------------------------------------------ score entropy


def se_definition(graph, log_s: torch.Tensor, sigma: float, xt: int, x0: int) -> float:
    """Denoising score entropy of one position from its definition:
    sum_{y != xt} R[y, xt] (s_y - a_y log s_y + K(a_y)),  a_y = p_t(y | x0) / p_t(xt | x0),  K(a) = a (log a - 1),
    with K(0) = 0 and a log s = 0 when a = 0."""
    r = rate_matrix(graph)
    pt = torch.matrix_exp(sigma * r)[x0]  # p_t(. | x0)
    total = 0.0
    for y in range(graph.dim):
        if y == xt or r[y, xt] == 0:
            continue
        a = float(pt[y] / pt[xt])
        ls = float(log_s[y])
        k = a * (math.log(a) - 1) if a > 0 else 0.0
        total += float(r[y, xt]) * (math.exp(ls) - a * ls + k)
    return total


@pytest.mark.parametrize("graph", [AbsorbingGraph(4), UniformGraph(5)])
def test_score_entropy_equals_its_definition(graph):
    gen = torch.Generator().manual_seed(1)
    v = graph.dim
    pairs = [(xt, x0) for xt in range(v) for x0 in range(v - graph.absorb)]  # x0 is never the mask
    xt = torch.tensor([p[0] for p in pairs])[None]  # (1, P)
    x0 = torch.tensor([p[1] for p in pairs])[None]
    for sigma in (0.05, 0.8, 4.0):
        log_s = torch.randn(1, len(pairs), v, generator=gen, dtype=torch.float64).scatter(-1, xt[..., None], 0.0)
        got = graph.score_entropy(log_s, torch.tensor([sigma]), xt, x0)[0]
        want = torch.tensor([se_definition(graph, log_s[0, j], sigma, *pairs[j]) for j in range(len(pairs))],
                            dtype=torch.float64)
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5), (sigma, got, want)
        assert (got >= -1e-5).all()
        if graph.absorb:  # nonzero only where x_t is the mask
            assert (got[xt[0] != graph.mask_id] == 0).all()


@pytest.mark.parametrize("graph", [AbsorbingGraph(4), UniformGraph(5)])
def test_score_entropy_vanishes_at_the_true_ratios(graph):
    v = graph.dim
    pairs = [(xt, x0) for xt in range(v) for x0 in range(v - graph.absorb)]
    xt = torch.tensor([p[0] for p in pairs])[None]
    x0 = torch.tensor([p[1] for p in pairs])[None]
    for sigma in (0.05, 0.8, 4.0):
        pt = torch.matrix_exp(sigma * rate_matrix(graph))[x0[0]]  # (P, V) p_t(. | x0)
        ratio = pt / pt.gather(-1, xt[0, :, None])
        true = ratio.clamp(min=1e-300).log()[None]  # a = 0 (absorbing, y != x0): the true score is 0
        se = graph.score_entropy(true, torch.tensor([sigma]), xt, x0)
        assert se.abs().max() < 1e-4, (sigma, se)
        worse = graph.score_entropy(true + 0.3, torch.tensor([sigma]), xt, x0)
        assert (worse >= se - 1e-6).all()


# ------------------------------------------------------------------------------------------------------ losses


def test_absorbing_loss_equals_the_formula_by_hand():
    tokens, b, l = 5, 3, 8
    graph, noise = AbsorbingGraph(tokens), LogLinearNoise()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, tokens, (b, l), generator=gen)
    prompt = torch.zeros(b, l, dtype=torch.bool)
    prompt[:, :2] = True
    prompt[1, :4] = True
    t = torch.tensor([0.3, 0.6, 0.999])
    table = torch.randn(b, l, graph.dim, generator=gen)
    seen = {}

    def score_fn(x, sigma):
        seen["x"], seen["sigma"] = x.clone(), sigma.clone()
        return table_score_fn(table)(x, sigma)

    out = score_entropy_loss(score_fn, graph, noise, x0, t=t, prompt_mask=prompt, generator=gen)
    xt, sigma = seen["x"], seen["sigma"]
    _, dsigma = noise(t)
    assert torch.allclose(sigma, noise(t)[0])
    assert torch.equal(xt[prompt], x0[prompt])  # the prompt is never perturbed, even at t ~ 1
    assert (xt[2][~prompt[2]] == graph.mask_id).all()
    masked = xt == graph.mask_id
    assert masked.any() and (~masked & ~prompt).any()  # both kinds of response positions occur

    log_s = table.scatter(-1, xt[..., None], 0.0).double()
    want = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        r = 1.0 / math.expm1(float(sigma[i]))
        for j in range(l):
            if prompt[i, j] or xt[i, j] != graph.mask_id:  # not scored / contributes 0
                continue
            se = sum(math.exp(float(log_s[i, j, y])) for y in range(tokens))  # every y but the mask
            se += -r * float(log_s[i, j, x0[i, j]]) + r * (math.log(r) - 1)
            want[i] += float(dsigma[i]) * se
    assert torch.allclose(out.per_sequence.double(), want, rtol=1e-5)
    assert torch.allclose(out.loss.double(), want.mean(), rtol=1e-5)

    se = graph.score_entropy(table, sigma, xt, x0)  # unmasked positions give exactly 0 whatever the score
    assert (se[~masked] == 0).all()


def test_uniform_loss_skips_the_prompt():
    graph, noise = UniformGraph(6), GeometricNoise()
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 6, (4, 10), generator=gen)
    prompt = torch.zeros(4, 10, dtype=torch.bool)
    prompt[:, :3] = True
    t = torch.tensor([0.2, 0.5, 0.7, 0.95])
    table = torch.randn(4, 10, 6, generator=gen)
    wild = table.clone()
    wild[prompt] = 30.0  # a huge score on the prompt would dominate if it were scored
    a = score_entropy_loss(table_score_fn(table), graph, noise, x0, t, prompt, generator=_gen(9))
    b = score_entropy_loss(table_score_fn(wild), graph, noise, x0, t, prompt, generator=_gen(9))
    assert torch.allclose(a.per_sequence, b.per_sequence)
    xt = graph.sample_transition(x0, noise(t)[0], generator=_gen(9))
    xt = torch.where(prompt, x0, xt)  # same draws as inside the loss
    sigma, dsigma = noise(t)
    se = graph.score_entropy(table.scatter(-1, xt[..., None], 0.0), sigma, xt, x0)
    assert torch.allclose(a.per_sequence, dsigma * (se * ~prompt).sum(-1))
    assert (se[prompt] > 0).any()  # so leaving the prompt out does change the sum


def test_loss_gradient_flows_and_t_is_drawn_in_range():
    graph, noise = AbsorbingGraph(5), LogLinearNoise()
    table = torch.randn(2, 6, 6, requires_grad=True)
    seen = []

    def score_fn(x, sigma):
        seen.append(sigma)
        return table.scatter(-1, x[..., None], 0.0)
    out = score_entropy_loss(score_fn, graph, noise, torch.randint(0, 5, (2, 6)), eps=0.5)
    out.loss.backward()
    assert table.grad is not None and torch.isfinite(table.grad).all()
    t = 1 - torch.exp(-seen[0]) / (1 - 1e-3)  # invert P(masked) = (1 - eps) t
    assert ((t >= 0.5 - 1e-4) & (t <= 1 + 1e-4)).all()


def test_elbo_with_the_exact_score_is_the_nll_and_noise_is_shared():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    graph, noise = AbsorbingGraph(4), LogLinearNoise()
    gen = torch.Generator().manual_seed(5)
    x0 = torch.multinomial(p, 8 * 16, replacement=True, generator=gen).view(8, 16)
    prompt = torch.zeros(8, 16, dtype=torch.bool)
    prompt[:, :4] = True
    exact = iid_absorbing_log_score(p)
    elbo = score_entropy_elbo(exact, graph, noise, x0, prompt, n_samples=256, generator=_gen(0))
    nll = -(p.log()[x0] * ~prompt).sum(-1)  # -log p(response); the prompt is independent of it
    # with the exact score the integrand's mean is (1 - eps) NLL, so the estimate is ~(1 - 1e-3)^2 NLL
    assert abs(elbo.mean().item() / nll.mean().item() - 1) < 0.06, (elbo, nll)

    xs = {}

    def recorder(name, fn):
        def score_fn(x, sigma):
            xs.setdefault(name, []).append(x.clone())
            return fn(x, sigma)
        return score_fn
    other = table_score_fn(torch.randn(8, 16, 5, generator=gen))
    e1 = score_entropy_elbo(recorder("a", exact), graph, noise, x0, prompt, 3, generator=_gen(7))
    e2 = score_entropy_elbo(recorder("b", other), graph, noise, x0, prompt, 3, generator=_gen(7))
    assert all(torch.equal(u, w) for u, w in zip(xs["a"], xs["b"]))  # the two models saw the same x_t
    assert not torch.allclose(e1, e2)
    again = score_entropy_elbo(exact, graph, noise, x0, prompt, 3, generator=_gen(7))
    assert torch.equal(e1, again)


# ----------------------------------------------------------------------------------------------- sampler steps


def _three_token_case(graph):
    """x (1, 3) covering all three tokens, and a fixed log-score (0 at each position's own token)."""
    x = torch.tensor([[0, 1, 2]])
    log_s = torch.tensor([[[0.0, -0.5, 0.3], [-1.0, 0.0, 0.2], [-0.7, -1.2, 0.0]]]).scatter(-1, x[..., None], 0.0)
    return x, log_s


@pytest.mark.parametrize("graph", [AbsorbingGraph(2), UniformGraph(3)])
def test_analytic_step_closed_form_three_tokens(graph):
    x, log_s = _three_token_case(graph)
    s = log_s.double().exp()[0]  # (3, 3)
    d = 0.4
    got = analytic_probs(graph, x, log_s, torch.tensor([d]))[0].double()
    got = got / got.sum(-1, keepdim=True)
    ed = math.exp(d)
    if graph.absorb:  # tokens 0, 1 never move; from the mask: s_y (e^d - 1) for y < 2, 1 - (e^d - 1)(s_0 + s_1)
        want = torch.zeros(3, 3, dtype=torch.float64)
        want[0, 0] = want[1, 1] = 1.0
        want[2, 0], want[2, 1] = s[2, 0] * (ed - 1), s[2, 1] * (ed - 1)
        want[2, 2] = 1 - (ed - 1) * (s[2, 0] + s[2, 1])
    else:  # (e^d s_y + (1 - e^d) S / 3) * (e^-d [y = x] + (1 - e^-d) / 3)
        want = torch.zeros(3, 3, dtype=torch.float64)
        for i in range(3):
            for y in range(3):
                stag = ed * s[i, y] + (1 - ed) * s[i].sum() / 3
                want[i, y] = stag * ((y == i) / ed + (1 - 1 / ed) / 3)
    want = want / want.sum(-1, keepdim=True)
    assert torch.allclose(got, want, atol=1e-6)
    r = rate_matrix(graph)  # the same through matrix exponentials: (P(-d)^T s)_y P(d)[y, x]
    via_exp = torch.stack([(s[i] @ torch.matrix_exp(-d * r)) * torch.matrix_exp(d * r)[:, i] for i in range(3)])
    assert torch.allclose(got, via_exp / via_exp.sum(-1, keepdim=True), atol=1e-6)

    # one real step (the model called at sigma(t), d = sigma(t) - sigma(t - dt)), by frequency over many rows
    noise, n = LogLinearNoise(), 40_000
    t, dt = 0.6, 0.25
    d_step = noise.total_noise(torch.tensor([t])) - noise.total_noise(torch.tensor([t - dt]))
    expect = analytic_probs(graph, x, log_s, d_step)[0].double()
    expect = expect / expect.sum(-1, keepdim=True)
    xs = x.expand(n, 3)
    out = analytic_step(table_score_fn(log_s.expand(n, 3, 3)), graph, noise, xs, t, dt, _gen(0))
    for i in range(3):
        freq = torch.bincount(out[:, i], minlength=3).double() / n
        assert torch.allclose(freq, expect[i], atol=5 * 0.5 / math.sqrt(n)), (i, freq, expect[i])


@pytest.mark.parametrize("graph", [AbsorbingGraph(2), UniformGraph(3)])
def test_euler_step_probabilities(graph):
    x, log_s = _three_token_case(graph)
    s = log_s.double().exp()[0]
    r = rate_matrix(graph)
    dt, dsig = 0.05, 1.7
    want = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(3):
        xi = int(x[0, i])
        for y in range(3):
            if y != xi:
                want[i, y] = dt * dsig * r[y, xi] * s[i, y]  # reverse rate x -> y = R[y, x] s_y
        want[i, xi] = 1 - want[i].sum()  # onehot + diagonal (minus the off-diagonal sum)
    got = euler_probs(graph, x, log_s, torch.tensor([dsig]), dt)[0].double()
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(3, dtype=torch.float64))

    noise, n, t = LogLinearNoise(), 40_000, 0.5
    _, dsigma = noise(torch.tensor([t]))
    expect = euler_probs(graph, x, log_s, dsigma, 0.2)[0].double()
    out = euler_step(table_score_fn(log_s.expand(n, 3, 3)), graph, noise, x.expand(n, 3), t, 0.2,
                     torch.Generator().manual_seed(1))
    for i in range(3):
        freq = torch.bincount(out[:, i], minlength=3).double() / n
        assert torch.allclose(freq, expect[i].clamp(min=0), atol=5 * 0.5 / math.sqrt(n))


def test_denoiser_drops_the_mask_column():
    graph = AbsorbingGraph(2)
    x, log_s = _three_token_case(graph)
    probs = denoise_probs(graph, x, log_s, torch.tensor([1e-3]))
    assert probs.shape == (1, 3, 2)
    assert (probs[0, 2] > 0).all()  # the masked position picks a token


# ---------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("predictor", ["euler", "analytic"])
@pytest.mark.parametrize("graph", [AbsorbingGraph(6), UniformGraph(6)])
def test_prefix_and_suffix_are_held_at_every_step(graph, predictor):
    b, l = 3, 12
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 6, (b, 4), generator=gen)  # a different prompt per row
    suffix = torch.tensor([5, 4])
    table = torch.randn(b, l, graph.dim, generator=gen)

    def score_fn(x, sigma):  # random, but scaled like a real score: ~1 / (e^sigma - 1) towards the tokens
        return table_score_fn(table - torch.log(torch.expm1(sigma))[:, None, None])(x, sigma)
    seen = []
    out = sample(score_fn, graph, LogLinearNoise() if graph.absorb else GeometricNoise(), (b, l), steps=10,
                 predictor=predictor, prefix=prefix, suffix=suffix, generator=gen,
                 callback=lambda i, t, x: seen.append((i, t, x.clone())))
    assert [i for i, _, _ in seen] == list(range(10)) and abs(seen[-1][1] - 1e-5) < 1e-9
    for _, _, x in seen + [(None, None, out)]:
        assert torch.equal(x[:, :4], prefix) and torch.equal(x[:, -2:], suffix.expand(b, 2))
    assert out.shape == (b, l) and out.dtype == torch.long
    if graph.absorb:
        assert (out != graph.mask_id).all()  # the denoiser leaves no mask
        assert (seen[0][2][:, 4:-2] == graph.mask_id).any()  # the response did start masked
        assert (seen[-1][2][:, 4:-2] != graph.mask_id).any()


def test_prefix_mask_writes_only_its_entries():
    graph = AbsorbingGraph(6)
    prefix = torch.tensor([[1, 2, 3], [4, 0, 0]])
    pmask = torch.tensor([[True, True, True], [True, False, False]])
    score_fn = table_score_fn(torch.zeros(2, 6, 7))
    seen = []
    sample(score_fn, graph, LogLinearNoise(), (2, 6), steps=2, predictor="analytic", denoise=False, prefix=prefix,
           prefix_mask=pmask, callback=lambda i, t, x: seen.append(x.clone()))
    assert seen[0][0, :3].tolist() == [1, 2, 3] and seen[0][1, 0] == 4
    with pytest.raises(ValueError, match="do not fit"):
        sample(score_fn, graph, LogLinearNoise(), (2, 6), steps=2, prefix=torch.zeros(2, 5).long(),
               suffix=torch.zeros(2).long())


def test_temper_keeps_when_a_position_unmasks_and_sharpens_to_what():
    probs = torch.tensor([[[0.1, 0.3, 0.2, 0.4],      # masked: tokens 0-2, then "stay masked"
                           [0.0, 1.0, 0.0, 0.0]]])    # a clean token stays
    assert temper(probs, 1.0) is probs
    greedy = temper(probs, 0.0)
    assert torch.allclose(greedy, torch.tensor([[[0.0, 0.6, 0.0, 0.4], [0.0, 1.0, 0.0, 0.0]]]))
    half = temper(probs, 0.5)
    want = torch.tensor([0.1, 0.3, 0.2]) ** 2
    assert torch.allclose(half[0, 0, :3], 0.6 * want / want.sum()) and half[0, 0, 3] == 0.4
    assert torch.equal(half[0, 1], probs[0, 1])
    denoised = temper(torch.tensor([[[0.2, 0.6, 0.2]]]), 0.0, absorb=False)  # the denoiser: no mask column
    assert torch.allclose(denoised, torch.tensor([[[0.0, 1.0, 0.0]]]))


@pytest.mark.parametrize("predictor", ["euler", "analytic"])
def test_sampler_temperature(predictor):
    graph, noise = AbsorbingGraph(4), LogLinearNoise()
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])

    def draw(**kw):
        return sample(iid_absorbing_log_score(p), graph, noise, (64, 8), steps=8, predictor=predictor,
                      generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(draw(), draw(temperature=1.0))  # 1 is upstream's sampler, draw for draw
    assert (draw(temperature=0.0) == 3).all()  # every position unmasks to the most likely token
    with pytest.raises(ValueError, match="uniform graph"):
        sample(iid_uniform_log_score(p), UniformGraph(4), GeometricNoise(), (2, 4), steps=2, temperature=0.5)
    with pytest.raises(ValueError, match="finite number >= 0"):
        draw(temperature=-1.0)


@pytest.mark.parametrize("graph,noise,exact", [
    (AbsorbingGraph(4), LogLinearNoise(), iid_absorbing_log_score),
    (UniformGraph(4), GeometricNoise(), iid_uniform_log_score),
])
def test_analytic_sampler_with_the_exact_score_matches_p(graph, noise, exact):
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = sample(exact(p), graph, noise, (500, 8), steps=16, predictor="analytic",
                 generator=torch.Generator().manual_seed(0))
    assert out.max() < 4
    # 4000 draws, 3 degrees of freedom: chi-square > 20 has probability ~2e-4
    assert chi_square(out, p) < 20, torch.bincount(out.flatten(), minlength=4)


def test_euler_sampler_with_the_exact_score_is_close_to_p():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = sample(iid_absorbing_log_score(p), AbsorbingGraph(4), LogLinearNoise(), (500, 8), steps=64,
                 predictor="euler", generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out.flatten(), minlength=4).double() / out.numel()
    assert torch.allclose(freq, p.double(), atol=0.03), freq
