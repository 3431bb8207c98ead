"""Flow matching and samplers (model/flow.py) against diffusers' schedulers and exact solutions."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from model.flow import (add_noise, euler_sigmas, flow_loss, sample_euler, sample_train_sigmas,
                        sample_unipc, unipc_sigmas, velocity_target)

SHAPE = (2, 4, 3, 5, 5)   # (B, C, F, H, W)


def toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear velocity field of (x, t) standing in for the DiT."""
    t = t.float().view(-1, *[1] * (x.ndim - 1)) / 1000
    return torch.tanh(x) * t - 0.3 * x + 0.1 * torch.sin(3 * x)


def run_ours(sampler, x, sigmas):
    """Our sampler's whole trajectory (the x at every model call, then the result) and its timesteps."""
    xs, ts = [], []

    def velocity(x, t):
        xs.append(x.clone())
        ts.append(t[0].clone())
        return toy_velocity(x, t)

    xs.append(sampler(velocity, x, sigmas))
    return xs, torch.stack(ts)


def run_diffusers(scheduler, x):
    """The same trajectory driven by a diffusers scheduler whose timesteps are already set."""
    xs = [x]
    for t in scheduler.timesteps:
        v = toy_velocity(x, t.expand(x.shape[0]))
        x = scheduler.step(v, t, x).prev_sample
        xs.append(x)
    return xs


def max_diff(xs, ys):
    assert len(xs) == len(ys)
    return max((a - b).abs().max().item() for a, b in zip(xs, ys))


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("shift", [5.0, 3.0])
def test_euler_matches_diffusers(steps, shift):
    """Every Euler iterate equals FlowMatchEulerDiscreteScheduler's given the same sigma grid."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sigmas = euler_sigmas(steps, shift)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and len(sigmas) == steps + 1
    ours, ts = run_ours(sample_euler, x, sigmas)
    # shift=1 there: our grid is already shifted, and diffusers appends the final 0 itself.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].numpy())
    theirs = run_diffusers(scheduler, x)
    torch.testing.assert_close(ts, scheduler.timesteps, rtol=0, atol=0)
    diff = max_diff(ours, theirs)
    print(f"euler steps={steps} shift={shift}: max |diff| over the trajectory {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("shift", [5.0, 3.0])
def test_unipc_matches_diffusers(steps, shift):
    """Every UniPC iterate and timestep equals diffusers' UniPC (flow, order 2, bh2) on the original grid."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    sigmas = unipc_sigmas(steps, shift)
    ours, ts = run_ours(sample_unipc, x, sigmas)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=1.0, solver_order=2, predict_x0=True,
                                        solver_type="bh2", lower_order_final=True,
                                        final_sigmas_type="zero")
    scheduler.set_timesteps(sigmas=np.array(sigmas[:-1].numpy()))   # needs an np.ndarray
    theirs = run_diffusers(scheduler, x)
    assert ts.dtype == torch.int64 and torch.equal(ts, scheduler.timesteps)
    diff = max_diff(ours, theirs)
    print(f"unipc steps={steps} shift={shift}: max |diff| over the trajectory {diff:.2e}")
    assert diff < 1e-5


def test_unipc_grid_is_the_original():
    """N=50, shift=5 gives the original Wan timesteps 999, 995, ... 172, 92 (docs/wan.md#sigma-grids)."""
    sigmas = unipc_sigmas(50, 5.0)
    assert len(sigmas) == 51 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    t = (sigmas[:-1] * 1000).long().tolist()
    assert t[:5] == [999, 995, 991, 987, 982]
    assert t[-5:] == [356, 302, 241, 172, 92]


def test_flow_objective():
    """add_noise hits x0 at sigma 0 and noise at 1, and x0 = x_sigma - sigma * target."""
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    assert torch.equal(add_noise(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(add_noise(x0, noise, torch.ones(2)), noise)
    sigmas = torch.tensor([0.3, 0.9])
    x = add_noise(x0, noise, sigmas)
    target = velocity_target(x0, noise)
    torch.testing.assert_close(x - sigmas.view(-1, 1, 1, 1, 1) * target, x0)
    assert flow_loss(target, target).shape == (2,) and (flow_loss(target, target) == 0).all()


@pytest.mark.parametrize("mode", ["logit_normal", "uniform"])
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_train_sigmas(mode, shift):
    """sample_train_sigmas is a function of the generator's seed and lies in (0, 1)."""
    a = sample_train_sigmas(4096, torch.Generator().manual_seed(3), shift=shift, mode=mode)
    b = sample_train_sigmas(4096, torch.Generator().manual_seed(3), shift=shift, mode=mode)
    assert a.shape == (4096,) and a.dtype == torch.float32 and torch.equal(a, b)
    assert (a > 0).all() and (a < 1).all()


@pytest.mark.parametrize("sampler,grid", [(sample_euler, euler_sigmas), (sample_unipc, unipc_sigmas)])
def test_exact_velocity_reaches_the_data_point(sampler, grid):
    """With the exact velocity of a one-point data distribution, both samplers end on that point."""
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sigmas = grid(10, 5.0)
    calls = []

    def velocity(x, t):
        # For data = {x0}, E[noise - x0 | x_sigma = x] = (x - x0) / sigma: straight lines into x0.
        sigma = float(sigmas[len(calls)])
        calls.append(sigma)
        return (x - x0) / sigma

    torch.testing.assert_close(sampler(velocity, noise, sigmas), x0)
    assert len(calls) == 10


@pytest.mark.parametrize("sampler,grid", [(sample_euler, euler_sigmas), (sample_unipc, unipc_sigmas)])
def test_samplers_take_bf16_velocity(sampler, grid):
    """A model answering in bf16 still gets fp32 x and yields an fp32 sample."""
    dtypes = []

    def velocity(x, t):
        dtypes.append(x.dtype)
        return toy_velocity(x, t).bfloat16()

    out = sampler(velocity, torch.randn(SHAPE).bfloat16(), grid(4, 5.0))
    assert out.dtype == torch.float32 and set(dtypes) == {torch.float32} and out.isfinite().all()
