"""Solvers: the official DPM-Solver++ call of spec §4.1, Gaussian closed forms, convergence orders, guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from uvit_cli.config import SOLVER_NAMES
from uvit_cli.schedule import FlowSchedule, make_schedule, stable_diffusion_betas
from uvit_cli.solvers import (
    FLOW_SOLVERS,
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

    sample_dpm_solver_pp(eps_fn, torch.randn(2, 4, 2, 2), steps=10, schedule=ns)
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
    out32 = sample_dpm_solver_pp(_eps_torch, x32, steps=steps, schedule=ns)
    out64 = sample_dpm_solver_pp(_eps_torch, x32.double(), steps=steps, schedule=ns)
    assert out32.dtype == torch.float32
    assert np.abs(ref).max() > 0.5  # a non-trivial output
    assert np.abs(out64.numpy() - ref).max() < 5e-6  # same algorithm (knot roundoff ~1e-6)
    assert np.abs(out32.double().numpy() - ref).max() < 1e-4  # the parity target, in float32


def test_dpm_solver_pp_zero_eps_is_exact_scaling():
    # eps = 0 means D(x, t) = x / alpha_t, and the exact flow is x_t = (alpha_t / alpha_T) x_T.
    ns = make_schedule("discrete")
    x = x_T()
    out = sample_dpm_solver_pp(lambda x, ts: torch.zeros_like(x), x, schedule=ns, steps=10)
    a = ns.marginal_alpha(torch.tensor([1.0, 1e-3], dtype=torch.float64))
    torch.testing.assert_close(out, x * a[1] / a[0], rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------------
# Numbers from the real official code: baofff/U-ViT (ce55170 era; dpm_solver_pytorch.py and the eval scripts
# as of 2a8685f, sde.py as of 36978d9, dpm_solver_pp.py via the SeanNobel/U-ViT fork, logic identical to the
# Gbone3176/uvit-base copy), run on CPU in fp32 (torch 2.14) with the exact calls of the eval scripts: eval_t2i_discrete.py / eval_ldm_discrete.py
# (NoiseScheduleVP('discrete', float32 betas), model_fn = net(x, t_continuous * 1000), DPM_Solver(predict_x0=True,
# thresholding=False).sample(x, steps, eps=1/1000, T=1.), CFG as two passes), eval.py / eval_ldm.py
# (NoiseScheduleVP('linear'), model_wrapper(ScoreModel.noise_pred, time_input_type='0') with the x999 inside,
# DPM_Solver.sample(x, steps, eps=1e-4, adaptive_step_size=False, fast_version=True)) and sde.euler_maruyama.
# The network is `_official_toy` below; x_T = randn(2, 3) from Generator(0).

OFFICIAL_X_T = [
    1.5409960746765137,
    -0.293428897857666,
    -2.1787893772125244,
    0.5684312582015991,
    -1.0845223665237427,
    -1.3985954523086548,
]
OFFICIAL_DPM_SOLVER_PP = {
    1: [
        5.221930980682373,
        -0.7423735857009888,
        -5.981334686279297,
        2.8738787174224854,
        -3.920743942260742,
        -4.852469444274902,
    ],
    2: [
        3.1654129028320312,
        -0.8851379752159119,
        -3.618459463119507,
        1.3885498046875,
        -1.6310536861419678,
        -2.1348395347595215,
    ],
    3: [
        3.479586124420166,
        -0.8582169413566589,
        -3.551244020462036,
        1.3640456199645996,
        -2.053154468536377,
        -2.466648817062378,
    ],
    4: [
        3.0413966178894043,
        -0.8658958673477173,
        -2.89745831489563,
        0.8167153596878052,
        -1.7152740955352783,
        -2.01592755317688,
    ],
    5: [
        3.323143482208252,
        -0.8032581806182861,
        -3.5107944011688232,
        0.9051024913787842,
        -1.9617191553115845,
        -2.3899893760681152,
    ],
    6: [
        3.1998157501220703,
        -0.8620138764381409,
        -3.2578582763671875,
        0.8537302017211914,
        -1.881056785583496,
        -2.2564587593078613,
    ],
    10: [
        3.299969434738159,
        -0.8488729596138,
        -3.4902119636535645,
        0.8810237050056458,
        -1.971702218055725,
        -2.3925561904907227,
    ],
    25: [
        3.3310232162475586,
        -0.8580473065376282,
        -3.545116662979126,
        0.9018842577934265,
        -2.0072216987609863,
        -2.4369075298309326,
    ],
    50: [
        3.3389453887939453,
        -0.8611432909965515,
        -3.5594799518585205,
        0.9091905951499939,
        -2.0169200897216797,
        -2.4482998847961426,
    ],
}
# steps=6 (orders 3, 2, 1): the network timesteps, intermediate points re-derived through inverse_lambda
OFFICIAL_DPM_SOLVER_PP_TIMESTEPS_6 = [1000.0, 833.5, 667.0000610351562, 500.5000305175781, 334.0, 167.5]
# steps=10, cfg scale 1.0, y = [2, 7], null class 10: eps_c + 1.0 (eps_c - eps_u) as two passes
OFFICIAL_DPM_SOLVER_PP_CFG_10 = [
    5.3385329246521,
    1.7596379518508911,
    -1.3659876585006714,
    2.8266823291778564,
    -1.0825283527374268,
    -1.5251023769378662,
]
OFFICIAL_DPM_SOLVER = {  # continuous DPM-Solver-fast (the toy is far from a real eps, hence the magnitudes)
    1: [
        53.64952087402344,
        -7.683795928955078,
        -61.158935546875,
        29.60082244873047,
        -40.373443603515625,
        -49.89344787597656,
    ],
    10: [
        11.463810920715332,
        -1.6638082265853882,
        -19.41327476501465,
        5.798847198486328,
        -7.029011249542236,
        -7.572194576263428,
    ],
    50: [
        6.59947395324707,
        -1.920141577720642,
        -7.44003438949585,
        3.2894036769866943,
        -4.701595306396484,
        -5.611791133880615,
    ],
}
OFFICIAL_DPM_SOLVER_TIMESTEPS_5 = [
    999.0,
    799.8812255859375,
    536.2057495117188,
    193.8459014892578,
    10.670317649841309,
]
OFFICIAL_EULER = {  # steps: (ODE, reverse SDE after torch.manual_seed(0)) of sde.euler_maruyama
    1: (
        [
            1.5372973680496216,
            -0.29261520504951477,
            -2.1742351055145264,
            0.5668697953224182,
            -1.0817146301269531,
            -1.395150065422058,
        ],
        [
            1.5335062742233276,
            -0.2917838990688324,
            -2.1695504188537598,
            0.5652742981910706,
            -1.0788419246673584,
            -1.3916208744049072,
        ],
    ),
    2: (
        [
            5.055028438568115,
            -0.7955792546272278,
            -6.182597637176514,
            2.506664514541626,
            -3.7289748191833496,
            -4.666828155517578,
        ],
        [
            0.076808862388134,
            0.3159552812576294,
            1.8120408058166504,
            1.3101093769073486,
            -0.39564892649650574,
            -0.22661124169826508,
        ],
    ),
    10: (
        [
            6.910494327545166,
            -1.8732633590698242,
            -7.707607269287109,
            3.2036139965057373,
            -4.77792501449585,
            -5.765077114105225,
        ],
        [
            0.13284701108932495,
            -1.2354826927185059,
            -1.5149142742156982,
            -0.747648298740387,
            -0.9880404472351074,
            1.0074074268341064,
        ],
    ),
    50: (
        [
            6.657949924468994,
            -1.9154620170593262,
            -7.4835028648376465,
            3.2616453170776367,
            -4.712132930755615,
            -5.635403156280518,
        ],
        [
            0.09029994904994965,
            1.9325472116470337,
            0.905184268951416,
            0.5950457453727722,
            -1.7525416612625122,
            -1.418466329574585,
        ],
    ),
}


def _official_toy(x, timesteps, y=None):
    """A nonlinear, time-dependent stand-in network (the one the numbers above were produced with)."""
    ts = timesteps.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    out = x * (0.3 + 0.6 * ts / 1000.0) + 0.2 * torch.sin(x + ts / 300.0)
    if y is not None:
        out = out + 0.3 * torch.cos(y.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) + ts / 500.0)
    return out


def _official_x_T():
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.tensor(OFFICIAL_X_T).reshape(2, 3))
    return x


def _close_to(got, want, rtol=2e-5):
    # `.ci/cpu-variation` measured at most 7e-7 relative to the largest value (AVX-512, AVX2, plain kernels)
    want = torch.tensor(want).reshape(got.shape)
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("steps", sorted(OFFICIAL_DPM_SOLVER_PP))
def test_dpm_solver_pp_matches_the_official_code(steps):
    seen = []

    def eps_fn(x, timesteps):
        seen.append(timesteps[0].item())
        return _official_toy(x, timesteps)

    _close_to(
        sample_dpm_solver_pp(eps_fn, _official_x_T(), steps, schedule=make_schedule("discrete")),
        OFFICIAL_DPM_SOLVER_PP[steps],
    )
    assert len(seen) == steps
    if steps == 6:
        np.testing.assert_allclose(seen, OFFICIAL_DPM_SOLVER_PP_TIMESTEPS_6, rtol=0, atol=1e-3)


def test_the_issue_call_form_without_a_schedule_is_the_official_call():
    """`sample_dpm_solver_pp(eps_fn, x_T, steps)`: no schedule means the official discrete SD one (N = 1000)."""
    want = OFFICIAL_DPM_SOLVER_PP[10]
    _close_to(sample_dpm_solver_pp(_official_toy, _official_x_T(), 10), want)
    _close_to(sample_dpm_solver_pp(_official_toy, _official_x_T(), steps=10), want)
    _close_to(
        sample_dpm_solver_pp(_official_toy, _official_x_T(), 10, schedule=make_schedule("discrete")), want
    )
    # the continuous solvers default to the VP-SDE the continuous scripts use
    steps, want_c = next(iter(OFFICIAL_DPM_SOLVER.items()))
    _close_to(sample_dpm_solver(_official_toy, _official_x_T(), steps), want_c)
    with pytest.raises(TypeError, match="steps"):
        sample_dpm_solver_pp(_official_toy, _official_x_T(), 2.5, schedule=make_schedule("discrete"))


def test_guided_dpm_solver_pp_matches_the_official_code():
    eps_fn = guided_eps_fn(_official_toy, 1.0, {"y": torch.tensor([2, 7])}, {"y": torch.tensor(10)})
    _close_to(
        sample_dpm_solver_pp(eps_fn, _official_x_T(), 10, schedule=make_schedule("discrete")),
        OFFICIAL_DPM_SOLVER_PP_CFG_10,
    )


def test_continuous_solvers_match_the_official_code():
    ns = make_schedule("continuous")
    for steps, want in OFFICIAL_DPM_SOLVER.items():
        _close_to(sample_dpm_solver(_official_toy, _official_x_T(), steps, schedule=ns), want)
    seen = []
    sample_dpm_solver(
        lambda x, ts: seen.append(ts[0].item()) or _official_toy(x, ts), _official_x_T(), 5, schedule=ns
    )
    np.testing.assert_allclose(seen, OFFICIAL_DPM_SOLVER_TIMESTEPS_5, rtol=1e-6, atol=0)
    for steps, (ode, sde) in OFFICIAL_EULER.items():
        _close_to(sample_euler_ode(_official_toy, _official_x_T(), steps, schedule=ns), ode)
        # generator=None draws from the global RNG in the official order: the same noise as sde.euler_maruyama
        torch.manual_seed(0)
        _close_to(sample_euler_maruyama(_official_toy, _official_x_T(), steps, schedule=ns), sde)


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
    errors = [
        (solver(gaussian_eps_fn(ns), x, n, schedule=ns, **kwargs) - want).abs().max().item() for n in steps
    ]
    assert errors[-1] < errors[0]
    lo, hi = bounds
    assert lo < slope(errors, steps) < hi, errors


def test_euler_ode_convergence_order():
    ns = make_schedule("continuous")
    x = x_T()
    want = exact_flow(ns, x, 1.0, 0.0)
    steps = [25, 50, 100, 200]
    errors = [
        (sample_euler_ode(gaussian_eps_fn(ns), x, n, schedule=ns) - want).abs().max().item() for n in steps
    ]
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
        (sample(name, gaussian_eps_fn(ns), x, n, schedule=ns).double() - want).abs().max().item()
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
    out = sample_euler_maruyama(gaussian_eps_fn(ns, mu, sd), x, steps=500, generator=g, schedule=ns)
    mean, std = out.mean(0), out.std(0)
    assert torch.all((mean - mu).abs() < 4 * sd / math.sqrt(n) + 0.01), mean
    assert torch.all((std / sd - 1).abs() < 4 / math.sqrt(2 * n) + 0.01), std
    # an ODE sampler from the same start is a deterministic map, hence a different output
    ode = sample_euler_ode(gaussian_eps_fn(ns, mu, sd), x, steps=50, schedule=ns)
    assert (ode - out).abs().mean() > 0.1


def test_stochastic_solvers_seeded_and_per_image_generators():
    ns = make_schedule("continuous")
    eps_fn = gaussian_eps_fn(ns)
    x = x_T(torch.float32, n=4)
    a = sample_euler_maruyama(eps_fn, x, 20, schedule=ns, generator=torch.Generator().manual_seed(1))
    b = sample_euler_maruyama(eps_fn, x, 20, schedule=ns, generator=torch.Generator().manual_seed(1))
    c = sample_euler_maruyama(eps_fn, x, 20, schedule=ns, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one generator per image: results do not depend on how the batch is split
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    whole = sample_ddim(eps_fn, x, 10, schedule=ns, eta=1.0, generator=gens)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    parts = torch.cat(
        [
            sample_ddim(eps_fn, x[i : i + 1], 10, schedule=ns, eta=1.0, generator=gens[i : i + 1])
            for i in range(4)
        ]
    )
    torch.testing.assert_close(whole, parts)
    with pytest.raises(ValueError):
        sample_ddim(eps_fn, x, 10, schedule=ns, eta=1.0, generator=gens[:2])


def test_ddim_eta0_equals_first_order_dpm_solver_pp():
    ns = make_schedule("discrete")
    x = x_T()
    a = sample_ddim(_eps_torch, x, 12, schedule=ns)
    b = sample_dpm_solver_pp(_eps_torch, x, 12, schedule=ns, order=1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_multistep_method_and_errors():
    ns = make_schedule("discrete")
    x = x_T()
    a = sample_dpm_solver_pp(_eps_torch, x, 12, schedule=ns, order=2, method="multistep")
    b = sample_dpm_solver_pp_2m(_eps_torch, x, 12, schedule=ns)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_dpm_solver_pp(_eps_torch, x, 12, schedule=ns, order=3, method="multistep")
    with pytest.raises(ValueError):
        sample_dpm_solver_pp(_eps_torch, x, 12, schedule=ns, method="adaptive")


def test_dispatcher_runs_every_solver_without_grad():
    ns = make_schedule("continuous")
    x = torch.randn(2, 3, 4, 4)
    w = torch.ones((), requires_grad=True)

    def eps_fn(x, timesteps):
        return 0.1 * w * x

    assert set(SOLVERS) == set(SOLVER_NAMES) and len(SOLVERS) == 9  # config's torch-free list of names
    assert FLOW_SOLVERS == {"flow_euler", "flow_heun", "flow_euler_maruyama"}
    flow = FlowSchedule(shift=2.0)
    for name in SOLVERS:
        schedule, other = (flow, ns) if name in FLOW_SOLVERS else (ns, flow)
        out = sample(name, eps_fn, x, 6, schedule=schedule, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
        assert not out.requires_grad
        with pytest.raises(ValueError, match="flow"):  # a VP solver on a flow path, or the reverse: one line
            sample(name, eps_fn, x, 6, schedule=other)
    with pytest.raises(ValueError, match="unknown solver"):
        sample("heun", eps_fn, x, 6, schedule=ns)


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
    fn = guided_eps_fn(
        net, 2.0, {"y": y}, {"y": torch.tensor(10)}, interval=(0.2, 0.6), schedule=make_schedule("discrete")
    )
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
    fn = guided_eps_fn(net, 1.0, {"y": y}, {"y": torch.tensor(10)}, schedule=ns)
    out = sample("dpm_solver_pp", fn, x, 6, schedule=ns)
    assert net.calls == [6] * 6 and torch.isfinite(out).all()


def test_guided_eps_fn_compiles_without_graph_breaks():
    torch._dynamo.reset()
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
        fn = guided_eps_fn(
            Net(),
            0.5,
            {"y": y},
            {"y": torch.tensor(10)},
            interval=interval,
            schedule=make_schedule("discrete"),
        )
        explanation = torch._dynamo.explain(fn)(x, ts)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_every_solver_takes_steps_third_options_by_keyword_and_calls_back_each_step():
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    for name, solver in SOLVERS.items():
        ns = FlowSchedule() if name in FLOW_SOLVERS else make_schedule("discrete")
        for steps in (6, 7):  # flow_heun spends an odd evaluation on a last Euler step
            seen: list[int] = []
            extra = {"generator": torch.Generator().manual_seed(0)} if "maruyama" in name else {}
            out = solver(_eps_torch, x, steps, schedule=ns, callback=lambda i, xi: seen.append(i), **extra)
            assert seen == sorted(set(seen)) and seen[0] >= 1 and seen[-1] == steps, (name, seen)
            assert out.shape == x.shape
        with pytest.raises(TypeError):
            solver(_eps_torch, x, 6, ns)  # the schedule is keyword-only: no sniffing of positions
    with pytest.raises(ValueError, match="schedule"):
        guided_eps_fn(
            lambda x, t, y: x, 1.0, {"y": torch.zeros(2)}, {"y": torch.zeros(())}, interval=(0.1, 0.5)
        )
