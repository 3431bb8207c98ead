"""Flow matching for Wan2.1: the training objective, the sigma grids and two samplers (Euler, UniPC).

Conventions (docs/wan.md#flow-matching-and-samplers), used by every function here:
  sigma in [0, 1] is the noise level: sigma = 0 is data, sigma = 1 is pure noise.
  x_sigma = (1 - sigma) * x0 + sigma * noise                                  (rectified flow)
  the model predicts the velocity v = noise - x0, so dx/dsigma = v and x0 = x_sigma - sigma * v.
  the DiT takes the timestep t = sigma * 1000 (WanConfig.num_train_timesteps): an int64 for UniPC,
  truncated as the original does, and a float for Euler, as diffusers does.
Samplers take `velocity(x, t) -> v`, a callable the caller builds (text and CFG live there), and
integrate from sigmas[0] down to sigmas[-1] = 0 in fp32, whatever dtype the model answers in.
Shapes: x is (B, C, F, H, W) latents (any (B, ...) works); sigmas of a batch are (B,); a grid is (N+1,).
"""
import math
from typing import Callable

import torch
from tqdm import tqdm

from model.config import WanConfig

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x, t) -> v
NUM_TRAIN_TIMESTEPS = WanConfig.num_train_timesteps               # 1000: t = sigma * 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3/Wan timestep shift: shift > 1 moves every sigma toward the noise end."""
    # Large videos keep their coarse structure under noise levels that wipe out a small image, so
    # more of the schedule must be spent at high noise; sigma' = s*sigma / (1 + (s-1)*sigma).
    return shift * sigmas / (1 + (shift - 1) * sigmas)


# ---- Training: the rectified-flow objective ----

def sample_train_sigmas(batch: int, generator: torch.Generator | None, *, shift: float,
                        mode: str) -> torch.Tensor:
    """One noise level per sample, (B,) float32 on the CPU: logit-normal or uniform, then shifted."""
    # Which distribution the project trains with is a flag of the training script, so both stay:
    # - "uniform": sigma ~ U[0, 1), then the shift, as community Wan trainers do (Wan2.1 ships no
    #   training code; they reuse the sampling shift so training sees the noise levels sampling visits).
    # - "logit_normal": sigmoid(N(0, 1)), which SD3 (Esser et al. 2024, section 3.1) found best of the
    #   distributions it compared; it favours mid noise, where the velocity is hardest to predict.
    #   The Wan report is *said* to use it (docs/wan.md#flow-matching-and-samplers: not verified).
    # shift = 1 leaves either distribution as it is. A CPU generator gives the same draws on any device.
    if mode == "logit_normal":
        sigmas = torch.sigmoid(torch.randn(batch, generator=generator))
    elif mode == "uniform":
        sigmas = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"sample_train_sigmas: mode must be 'logit_normal' or 'uniform', got {mode!r}")
    return shift_sigmas(sigmas, shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) * x0 + sigma * noise, one sigma per sample."""
    sigmas = sigmas.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))      # (B,) -> (B, 1, 1, 1, 1)
    return (1 - sigmas) * x0 + sigmas * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target v = noise - x0: it points from the data toward the noise."""
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE, (B,) in fp32: the caller takes the mean and may log it per sigma bin."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def flow_matching_loss(dit, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                       context: torch.Tensor) -> torch.Tensor:
    """The whole training objective (minRF's): per-sample loss (B,) of the DiT's velocity at x_sigma.

    x0, noise: (B, C, F, H, W) fp32; sigmas (B,); context (B, S, D) in the DiT's compute dtype.
    """
    x_t = add_noise(x0, noise, sigmas)                                        # the straight path at sigma
    pred = dit(x_t.to(context.dtype), sigmas * NUM_TRAIN_TIMESTEPS, context)  # velocity toward the noise
    return flow_loss(pred, velocity_target(x0, noise))


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance v = v_u + g * (v_c - v_u), in fp32 like the original."""
    v_cond, v_uncond = v_cond.float(), v_uncond.float()
    return v_uncond + scale * (v_cond - v_uncond)


# ---- Sampling grids: N steps -> N+1 sigmas ending at 0 (float64, so t truncates like the original) ----

def euler_sigmas(steps: int, shift: float) -> torch.Tensor:
    """shift(linspace(1, 0, N+1)): the original's plain flow grid, starting at pure noise."""
    return shift_sigmas(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)


def unipc_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The original Wan UniPC grid: shift(linspace(0.999, 0, N+1)[:N]) with a final 0 appended."""
    # The original scheduler keeps 1000 training sigmas 1 - linspace(1, 1/1000, 1000) in float32
    # and spaces its grid between their ends: float32(0.999) and 0. It never starts at sigma = 1,
    # where UniPC's log-SNR lambda = log((1 - sigma) / sigma) is -inf. (diffusers' use_flow_sigmas
    # starts at 1 instead, a different grid: docs/wan.md#sigma-grids.)
    sigma_max = torch.tensor(1 - 1 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32).item()
    sigmas = torch.linspace(sigma_max, 0, steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigmas(sigmas, shift), sigmas.new_zeros(1)])


# ---- Euler: the first-order solver of dx/dsigma = v ----

@torch.no_grad()
def sample_euler(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor,
                 timesteps: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """Integrate dx/dsigma = v along `sigmas` with Euler steps; returns the fp32 sample at sigmas[-1]."""
    if timesteps is None:   # float t, computed in fp32 like diffusers' FlowMatchEulerDiscreteScheduler
        timesteps = sigmas[:-1].float() * NUM_TRAIN_TIMESTEPS
    timesteps = timesteps.to(x.device)
    x = x.float()
    for i in tqdm(range(len(sigmas) - 1), desc="euler", disable=not progress):
        v = velocity(x, timesteps[i].expand(x.shape[0])).float()   # (B, ...) velocity toward noise
        x = x + float(sigmas[i + 1] - sigmas[i]) * v             # sigma decreases, so we move toward data
    return x


# ---- UniPC (Zhao et al. 2023): multistep predictor-corrector on the data prediction x0 ----
# Written for the flow schedule alpha = 1 - sigma, as the original Wan FlowUniPCMultistepScheduler
# with solver_order=2, predict_x0, bh2, lower_order_final (docs/wan.md#unipc). It works in
# lambda = log(alpha / sigma), in which the ODE for x has an exact linear part; only the data
# prediction m = x - sigma * v is extrapolated. Scalars are float64, tensors fp32.

def _lam(sigma: float) -> float:
    return math.log(1 - sigma) - math.log(sigma)


def _unip(x: torch.Tensor, m: torch.Tensor, s: float, s_next: float,
          m_older: torch.Tensor | None = None, s_older: float | None = None) -> torch.Tensor:
    """Predictor UniP: x at sigma s -> sigma s_next; order 2 when the previous prediction is given."""
    h = _lam(s_next) - _lam(s)
    phi = math.expm1(-h)                               # phi_1 term; also B(h) in the bh2 variant
    x_next = (s_next / s) * x - (1 - s_next) * phi * m     # order 1: exact if m were constant
    if m_older is not None:                            # order 2: slope of m in lambda, weight 0.5
        r = (_lam(s_older) - _lam(s)) / h
        x_next = x_next - (1 - s_next) * phi * 0.5 * (m_older - m) / r
    return x_next


def _unic(x: torch.Tensor, m: torch.Tensor, s: float, s_next: float, m_next: torch.Tensor,
          m_older: torch.Tensor | None = None, s_older: float | None = None) -> torch.Tensor:
    """Corrector UniC: redo the step x(s) -> x(s_next) now that m_next at s_next is known."""
    h = _lam(s_next) - _lam(s)
    phi = math.expm1(-h)
    x_next = (s_next / s) * x - (1 - s_next) * phi * m
    if m_older is None:                                # order 1: trapezoid-like weight 0.5
        return x_next - (1 - s_next) * phi * 0.5 * (m_next - m)
    # Order 2: weights rho solve [[1, 1], [r, 1]] rho = b; b holds the phi_2, phi_3 functions / B(h).
    r = (_lam(s_older) - _lam(s)) / h
    b1 = (phi / -h - 1) / phi
    b2 = 2 * ((phi / -h - 1) / -h - 0.5) / phi
    rho_older = (b1 - b2) / (1 - r)
    rho_next = b1 - rho_older
    return x_next - (1 - s_next) * phi * (rho_older * (m_older - m) / r + rho_next * (m_next - m))


@torch.no_grad()
def sample_unipc(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor,
                 progress: bool = False) -> torch.Tensor:
    """UniPC-2 along `sigmas` (0 < sigmas[0] < 1, sigmas[-1] = 0); returns the fp32 sample x0."""
    if not 0 < float(sigmas[0]) < 1 or float(sigmas[-1]) != 0:
        raise ValueError("sample_unipc: needs 0 < sigmas[0] < 1 and sigmas[-1] == 0 (use unipc_sigmas); "
                         f"got {float(sigmas[0])} .. {float(sigmas[-1])}")
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    timesteps = (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).long().to(x.device)  # int64, truncated like orig
    x = x.float()
    x_last = m_last = m_older = None    # x before the last predictor; data predictions at i-1, i-2
    for i in tqdm(range(n), desc="unipc", disable=not progress):
        v = velocity(x, timesteps[i].expand(x.shape[0])).float()
        m = x - sig[i] * v                                   # data prediction x0_hat at sigma_i
        if i > 0:   # UniC: correct x_i from x_{i-1} using m_i, at the order of the last predictor
            older = (m_older, sig[i - 2]) if i >= 2 else (None, None)
            x = _unic(x_last, m_last, sig[i - 1], sig[i], m, *older)
            # m stays the prediction at the uncorrected x: UniC costs no extra model call.
        x_last = x
        if sig[i + 1] == 0:
            x = m        # lambda -> inf, phi -> -1: the update to sigma = 0 is exactly x0_hat
        else:
            # UniP at order 1 on the first step (no history yet), then 2. The original's
            # lower_order_final makes the last step order 1; to sigma = 0 any order gives x0_hat.
            older = (m_last, sig[i - 1]) if i >= 1 else (None, None)
            x = _unip(x, m, sig[i], sig[i + 1], *older)
        m_older, m_last = m_last, m
    return x
