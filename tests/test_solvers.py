"""Solvers: the official DPM-Solver++ call of spec §4.1, Gaussian closed forms, convergence orders, guidance."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from uvit_cli.schedule import make_schedule, stable_diffusion_betas
from uvit_cli.solvers import (
    SOLVERS,
    conditional_eps_fn,
    fast_orders,
    guided_eps_fn,
    sample,
    sample_ddim,
    sample_dpm_solver,
    sample_dpm_solver_pp,
    sample_dpm_solver_pp_2m,
    sample_euler_maruyama,
    sample_euler_ode,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add overhead (and contention on shared CI machines).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------------
# Gaussian data: exact noise predictor and exact probability-flow map

MU = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
SD = torch.tensor([0.5, 1.0, 0.2], dtype=torch.float64)


def gaussian_eps_fn(ns, mu=MU, sd=SD):
    """Exact eps(x, t) = sigma_t (x - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2) for data ~ N(mu, s^2 I)."""

    def eps_fn(x, timesteps):
        t = timesteps / ns.time_scale
        a = ns.marginal_alpha(t).reshape(-1, 1)
        s = ns.marginal_std(t).reshape(-1, 1)
        m, v = mu.to(x), (sd**2).to(x)
        return s * (x - a * m) / (a * a * v + s * s)

    return eps_fn


def exact_flow(ns, x, t_start, t_end, mu=MU, sd=SD):
    """Exact probability-flow ODE map from t_start to t_end (t_end = 0 means alpha = 1, sigma = 0)."""

    def coeffs(t):
        if t == 0:
            return 1.0, 0.0
        tt = torch.tensor([t], dtype=torch.float64)
        return ns.marginal_alpha(tt).item(), ns.marginal_std(tt).item()

    a_s, s_s = coeffs(t_start)
    a_e, s_e = coeffs(t_end)
    ratio = torch.sqrt(a_e**2 * sd**2 + s_e**2) / torch.sqrt(a_s**2 * sd**2 + s_s**2)
    return a_e * mu + ratio * (x.double() - a_s * mu)


def x_T(dtype=torch.float64, n=16, seed=0):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def slope(errors, steps):
    """Least-squares slope of -log(error) against log(steps): the observed order of convergence."""
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


# ---------------------------------------------------------------------------------------------------
# The official discrete call (spec §4.1)


@pytest.mark.parametrize(
    "steps, orders",
    [(50, [3] * 16 + [2]), (25, [3] * 8 + [1]), (10, [3, 3, 3, 1]), (6, [3, 2, 1])],
)
def test_fast_orders_spec(steps, orders):
    assert fast_orders(steps) == orders
    assert sum(fast_orders(steps)) == steps


def test_fast_orders_other():
    assert all(sum(fast_orders(n, o)) == n for n in range(1, 40) for o in (1, 2, 3))
    assert fast_orders(7, 2) == [2, 2, 2, 1]
    with pytest.raises(ValueError):
        fast_orders(10, 4)


def test_network_inputs_steps_10():
    ns = make_schedule("discrete")
    seen = []

    def eps_fn(x, timesteps):
        assert timesteps.shape == (x.shape[0],) and timesteps.dtype == torch.float32
        seen.append(timesteps[0].item())
        return torch.zeros_like(x)

    sample_dpm_solver_pp(eps_fn, torch.randn(2, 4, 2, 2), ns, steps=10)
    want = [1000.0 - 99.9 * k for k in range(10)]  # 1000, 900.1, ..., 100.9: grid[0..9] * N
    assert len(seen) == 10
    np.testing.assert_allclose(seen, want, atol=2e-3, rtol=0)


def _eps_np(x, ts):
    return x * (0.3 + 0.6 * ts / 1000.0) + 0.2 * np.sin(x + ts / 300.0)


def _eps_torch(x, timesteps):
    ts = timesteps.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return x * (0.3 + 0.6 * ts / 1000.0) + 0.2 * torch.sin(x + ts / 300.0)


def reference_official_fast(x, steps, n_train=1000):
    """Direct scalar float64 transcription of spec §4.1 (numpy, np.interp knots): an independent check."""
    b = stable_diffusion_betas(n_train).numpy().astype(np.float32)
    log_a_knots = (0.5 * np.cumsum(np.log(np.float32(1) - b), dtype=np.float32)).astype(np.float64)
    t_knots = np.linspace(1.0 / n_train, 1.0, n_train)

    def log_alpha(t):
        return np.interp(t, t_knots, log_a_knots)

    def alpha(t):
        return math.exp(log_alpha(t))

    def sigma(t):
        return math.sqrt(1.0 - math.exp(2.0 * log_alpha(t)))

    def lam(t):
        return log_alpha(t) - 0.5 * math.log(1.0 - math.exp(2.0 * log_alpha(t)))

    def inv_lam(lmb):
        return np.interp(-0.5 * np.logaddexp(0.0, -2.0 * lmb), log_a_knots[::-1], t_knots[::-1])

    def data(x, t):
        return (x - sigma(t) * _eps_np(x, t * n_train)) / alpha(t)

    k = steps // 3 + 1
    orders = {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[steps % 3]
    grid = torch.linspace(1.0, 1.0 / n_train, steps + 1).double().numpy()  # the official float32 grid
    i = 0
    for o in orders:
        s, t = grid[i], grid[i + o]
        h = lam(t) - lam(s)
        d_s = data(x, s)
        base = sigma(t) / sigma(s) * x + alpha(t) * (1.0 - math.exp(-h)) * d_s
        if o == 1:
            x = base
        elif o == 2:
            r1 = (lam(grid[i + 1]) - lam(s)) / h
            s1 = inv_lam(lam(s) + r1 * h)
            u = sigma(s1) / sigma(s) * x - alpha(s1) * math.expm1(-r1 * h) * d_s
            x = base - 0.5 / r1 * alpha(t) * math.expm1(-h) * (data(u, s1) - d_s)
        else:
            r1 = (lam(grid[i + 1]) - lam(s)) / h
            r2 = (lam(grid[i + 2]) - lam(s)) / h
            s1, s2 = inv_lam(lam(s) + r1 * h), inv_lam(lam(s) + r2 * h)
            u1 = sigma(s1) / sigma(s) * x - alpha(s1) * math.expm1(-r1 * h) * d_s
            d_1 = data(u1, s1)
            phi22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
            u2 = (
                sigma(s2) / sigma(s) * x
                - alpha(s2) * math.expm1(-r2 * h) * d_s
                + r2 / r1 * alpha(s2) * phi22 * (d_1 - d_s)
            )
            phi2 = math.expm1(-h) / h + 1.0
            x = base + 1.0 / r2 * alpha(t) * phi2 * (data(u2, s2) - d_s)
        i += o
    return x


@pytest.mark.parametrize("steps", [50, 25, 10, 6])
def test_dpm_solver_pp_matches_spec_reference(steps):
    ns = make_schedule("discrete")
    x32 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(steps))
    ref = reference_official_fast(x32.double().numpy(), steps)
    out32 = sample_dpm_solver_pp(_eps_torch, x32, ns, steps=steps)
    out64 = sample_dpm_solver_pp(_eps_torch, x32.double(), ns, steps=steps)
    assert out32.dtype == torch.float32
    assert np.abs(ref).max() > 0.5  # a non-trivial output
    assert np.abs(out64.numpy() - ref).max() < 5e-6  # same algorithm (knot roundoff ~1e-6)
    assert np.abs(out32.double().numpy() - ref).max() < 1e-4  # the parity target, in float32


def test_dpm_solver_pp_zero_eps_is_exact_scaling():
    # eps = 0 means D(x, t) = x / alpha_t, and the exact flow is x_t = (alpha_t / alpha_T) x_T.
    ns = make_schedule("discrete")
    x = x_T()
    out = sample_dpm_solver_pp(lambda x, ts: torch.zeros_like(x), x, ns, steps=10)
    a = ns.marginal_alpha(torch.tensor([1.0, 1e-3], dtype=torch.float64))
    torch.testing.assert_close(out, x * a[1] / a[0], rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------------
# Gaussian closed form and convergence orders (float64 so the slopes are not masked by roundoff)

ODE_CASES = [
    # (solver, kwargs, steps, (min slope, max slope)); logSNR grids give uniform steps in lambda.
    (sample_dpm_solver_pp, {"skip_type": "logSNR"}, [146, 218, 290], (2.6, 3.4)),
    (sample_dpm_solver_pp_2m, {"skip_type": "logSNR"}, [20, 38, 74], (1.8, 2.2)),
    # non-uniform lambda steps: the step ratio r of 2M matters
    (sample_dpm_solver_pp_2m, {"skip_type": "time_quadratic"}, [40, 80, 160], (1.8, 2.3)),
    (sample_ddim, {"skip_type": "logSNR"}, [20, 40, 80], (0.85, 1.15)),
    (sample_dpm_solver, {}, [20, 38, 74], (2.8, 3.8)),
]


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
@pytest.mark.parametrize(
    "solver, kwargs, steps, bounds", ODE_CASES, ids=lambda c: getattr(c, "__name__", None)
)
def test_ode_solver_convergence_order(kind, solver, kwargs, steps, bounds):
    ns = make_schedule(kind)
    x = x_T()
    want = exact_flow(ns, x, 1.0, ns.eps)
    errors = [(solver(gaussian_eps_fn(ns), x, ns, n, **kwargs) - want).abs().max().item() for n in steps]
    assert errors[-1] < errors[0]
    lo, hi = bounds
    assert lo < slope(errors, steps) < hi, errors


def test_euler_ode_convergence_order():
    ns = make_schedule("continuous")
    x = x_T()
    want = exact_flow(ns, x, 1.0, 0.0)
    steps = [25, 50, 100, 200]
    errors = [(sample_euler_ode(gaussian_eps_fn(ns), x, ns, n) - want).abs().max().item() for n in steps]
    assert 0.85 < slope(errors, steps) < 1.15, errors
    assert errors[-1] < 1e-2


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
@pytest.mark.parametrize("name", ["dpm_solver_pp", "dpm_solver_pp_2m", "ddim", "dpm_solver"])
def test_defaults_converge_to_exact_flow(kind, name):
    # The official defaults (time-uniform grid for the discrete sampler) converge too, just less evenly.
    ns = make_schedule(kind)
    x = x_T(torch.float32)
    want = exact_flow(ns, x, 1.0, ns.eps)
    errs = [
        (sample(name, gaussian_eps_fn(ns), x, ns, n).double() - want).abs().max().item()
        for n in (10, 50, 200)
    ]
    assert errs[2] < errs[1] < errs[0]
    assert errs[2] < 0.02


def test_euler_maruyama_matches_data_distribution():
    ns = make_schedule("continuous")
    mu = torch.tensor([0.3, -1.0], dtype=torch.float64)
    sd = torch.tensor([0.5, 1.5], dtype=torch.float64)
    n = 4000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = sample_euler_maruyama(gaussian_eps_fn(ns, mu, sd), x, ns, steps=500, generator=g)
    mean, std = out.mean(0), out.std(0)
    assert torch.all((mean - mu).abs() < 4 * sd / math.sqrt(n) + 0.01), mean
    assert torch.all((std / sd - 1).abs() < 4 / math.sqrt(2 * n) + 0.01), std
    # an ODE sampler from the same start is a deterministic map, hence a different output
    ode = sample_euler_ode(gaussian_eps_fn(ns, mu, sd), x, ns, steps=50)
    assert (ode - out).abs().mean() > 0.1


def test_stochastic_solvers_seeded_and_per_image_generators():
    ns = make_schedule("continuous")
    eps_fn = gaussian_eps_fn(ns)
    x = x_T(torch.float32, n=4)
    a = sample_euler_maruyama(eps_fn, x, ns, 20, generator=torch.Generator().manual_seed(1))
    b = sample_euler_maruyama(eps_fn, x, ns, 20, generator=torch.Generator().manual_seed(1))
    c = sample_euler_maruyama(eps_fn, x, ns, 20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one generator per image: results do not depend on how the batch is split
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    whole = sample_ddim(eps_fn, x, ns, 10, eta=1.0, generator=gens)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    parts = torch.cat(
        [sample_ddim(eps_fn, x[i : i + 1], ns, 10, eta=1.0, generator=gens[i : i + 1]) for i in range(4)]
    )
    torch.testing.assert_close(whole, parts)
    with pytest.raises(ValueError):
        sample_ddim(eps_fn, x, ns, 10, eta=1.0, generator=gens[:2])


def test_ddim_eta0_equals_first_order_dpm_solver_pp():
    ns = make_schedule("discrete")
    x = x_T()
    a = sample_ddim(_eps_torch, x, ns, 12)
    b = sample_dpm_solver_pp(_eps_torch, x, ns, 12, order=1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_multistep_method_and_errors():
    ns = make_schedule("discrete")
    x = x_T()
    a = sample_dpm_solver_pp(_eps_torch, x, ns, 12, order=2, method="multistep")
    b = sample_dpm_solver_pp_2m(_eps_torch, x, ns, 12)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_dpm_solver_pp(_eps_torch, x, ns, 12, order=3, method="multistep")
    with pytest.raises(ValueError):
        sample_dpm_solver_pp(_eps_torch, x, ns, 12, method="adaptive")


def test_dispatcher_runs_every_solver_without_grad():
    ns = make_schedule("continuous")
    x = torch.randn(2, 3, 4, 4)
    w = torch.ones((), requires_grad=True)

    def eps_fn(x, timesteps):
        return 0.1 * w * x

    assert set(SOLVERS) == {
        "dpm_solver_pp",
        "dpm_solver_pp_2m",
        "ddim",
        "dpm_solver",
        "euler_maruyama",
        "euler_ode",
    }
    for name in SOLVERS:
        out = sample(name, eps_fn, x, ns, 6, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
        assert not out.requires_grad
    with pytest.raises(ValueError, match="unknown solver"):
        sample("heun", eps_fn, x, ns, 6)


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance as a wrapper around the network call


class CountingNet(nn.Module):
    """Tiny conditional net with the U-ViT call signature model(x, timesteps, y=None, context=None)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.ctx = nn.Linear(5, 4)
        self.calls: list[int] = []

    def forward(self, x, timesteps, y=None, context=None):
        self.calls.append(x.shape[0])
        h = x * torch.cos(timesteps / 1000.0).reshape(-1, 1, 1, 1)
        if y is not None:
            h = h + self.emb(y).reshape(-1, 4, 1, 1)
        if context is not None:
            h = h + self.ctx(context).mean(1).reshape(-1, 4, 1, 1)
        return h


def _net_inputs(b=3):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, 4, 2, 2, generator=g),
        torch.full((b,), 500.0),
        torch.randint(0, 10, (b,), generator=g),
    )


def test_guidance_scale_zero_is_one_conditional_pass():
    net = CountingNet()
    x, ts, y = _net_inputs()
    eps = guided_eps_fn(net, 0.0, {"y": y}, {"y": torch.tensor(10)})(x, ts)
    assert net.calls == [3]
    assert torch.equal(eps, net(x, ts, y=y))
    assert torch.equal(conditional_eps_fn(net, {"y": y})(x, ts), eps)


def test_guidance_formula_one_batched_forward():
    net = CountingNet()
    x, ts, y = _net_inputs()
    null = torch.tensor(10)  # the null class, broadcast to the batch
    with torch.no_grad():
        eps = guided_eps_fn(net, 0.4, {"y": y}, {"y": null})(x, ts)
        assert net.calls == [6]  # one forward of batch 2B
        eps_c, eps_u = net(x, ts, y=y), net(x, ts, y=null.expand(3))
    torch.testing.assert_close(eps, eps_c + 0.4 * (eps_c - eps_u))
    torch.testing.assert_close(eps, 1.4 * eps_c - 0.4 * eps_u)


def test_guidance_with_context_broadcasts_empty_context():
    net = CountingNet()
    x, ts, _ = _net_inputs()
    ctx = torch.randn(3, 7, 5)
    empty = torch.randn(1, 7, 5)
    with torch.no_grad():
        eps = guided_eps_fn(net, 1.0, {"context": ctx}, {"context": empty})(x, ts)
        eps_c, eps_u = net(x, ts, context=ctx), net(x, ts, context=empty.expand(3, 7, 5))
    torch.testing.assert_close(eps, 2.0 * eps_c - eps_u)
    with pytest.raises(ValueError):
        guided_eps_fn(net, 1.0, {"context": ctx}, {"y": torch.tensor(10)})


def test_guidance_interval():
    net = CountingNet()
    x, _, y = _net_inputs()
    ts = torch.tensor([900.0, 500.0, 100.0])  # solver times t = 0.9, 0.5, 0.1
    fn = guided_eps_fn(net, 2.0, {"y": y}, {"y": torch.tensor(10)}, interval=(0.2, 0.6), time_scale=1000.0)
    with torch.no_grad():
        eps = fn(x, ts)
        eps_c, eps_u = net(x, ts, y=y), net(x, ts, y=torch.full((3,), 10))
    guided = eps_c + 2.0 * (eps_c - eps_u)
    torch.testing.assert_close(eps[1], guided[1])  # inside [0.2, 0.6]
    torch.testing.assert_close(eps[0], eps_c[0])  # outside: conditional only
    torch.testing.assert_close(eps[2], eps_c[2])
    assert not torch.allclose(guided[0], eps_c[0])


def test_guided_sampling_end_to_end():
    ns = make_schedule("discrete")
    net = CountingNet()
    x, _, y = _net_inputs()
    fn = guided_eps_fn(net, 1.0, {"y": y}, {"y": torch.tensor(10)}, time_scale=ns.time_scale)
    out = sample("dpm_solver_pp", fn, x, ns, 6)
    assert net.calls == [6] * 6 and torch.isfinite(out).all()


def test_guided_eps_fn_compiles_without_graph_breaks():
    torch._dynamo.reset()
    start = time.perf_counter()
    net = CountingNet()
    net.calls = None  # type: ignore[assignment]  # no Python side effects inside the compiled region

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, x, timesteps, y=None, context=None):
            h = x * torch.cos(timesteps / 1000.0).reshape(-1, 1, 1, 1)
            return h + self.inner.emb(y).reshape(-1, 4, 1, 1)

    x, ts, y = _net_inputs()
    for interval in (None, (0.2, 0.6)):
        fn = guided_eps_fn(Net(), 0.5, {"y": y}, {"y": torch.tensor(10)}, interval=interval)
        explanation = torch._dynamo.explain(fn)(x, ts)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
    assert time.perf_counter() - start < 60
