"""The diffusion process PixArt-Σ trains and samples with.

Training (IDDPM, as PixArt's `gaussian_diffusion.py` with learn_sigma=True, loss type MSE):
1000 steps, linear betas 1e-4 .. 0.02, the model predicts epsilon (channels 0..C-1) and a
per-pixel interpolation v in [-1, 1] between log beta_t and the clipped log posterior variance
(channels C..2C-1). loss = MSE(eps) + VLB term, where the VLB term (in bits per dim) sees a
detached mean, so it trains only the variance. Optional Min-SNR-gamma weighting of the MSE term
(Hang et al. 2023; for epsilon prediction the weight is min(SNR, gamma) / SNR).

Sampling: diffusers' DPM-Solver++ (2nd-order multistep, 20 steps) with classifier-free guidance
(4.5), the scheduler config of the released PixArt-Σ pipeline; the variance channels are unused.
"""

from __future__ import annotations

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data discretised to 256 bins on [-1, 1] (IDDPM's decoder term at t = 0)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Linear-beta DDPM with learned variance; schedule tables in float64, looked up per timestep."""

    def __init__(self, num_timesteps: int = 1000):
        self.num_timesteps = num_timesteps
        scale = 1000 / num_timesteps  # IDDPM's "linear" schedule, any number of steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1).sqrt()
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # the posterior variance is 0 at t = 0: clip its log to the t = 1 value
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)
        self.snr = alphas_cumprod / (1.0 - alphas_cumprod)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as float32, shaped [N, 1, 1, ...] to broadcast against `like`."""
        out = table.to(t.device)[t.long()].float()  # [N]
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(self, x0, xt, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_log_variance_clipped, t, xt)

    def p_mean_logvar(self, eps, v, xt, t):
        """The model's p(x_{t-1} | x_t): mean from predicted eps, log-variance interpolated by v."""
        min_log = self._at(self.posterior_log_variance_clipped, t, xt)
        max_log = self._at(torch.log(self.betas), t, xt)
        frac = (v + 1) / 2  # v in [-1, 1] -> [min_var, max_var]
        logvar = frac * max_log + (1 - frac) * min_log
        x0 = (
            self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        )
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, logvar

    def vb_terms(self, x0, xt, t, eps, v) -> torch.Tensor:
        """VLB term per sample in bits/dim: decoder NLL at t = 0, else KL(q posterior || p)."""
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        mean, logvar = self.p_mean_logvar(eps, v, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)  # [N]
        nll = -discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * logvar)
        nll = mean_flat(nll) / math.log(2.0)  # [N]
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model,
        x0: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict,
        snr_gamma: float | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict:
        """dict(loss, mse, vb), each [N]. `model(x_t, t, **model_kwargs)` returns [N, 2C, H, W]."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)  # [N, C, H, W]
        C = x0.shape[1]
        out = model(xt, t, **model_kwargs).float()  # [N, 2C, H, W]
        if out.shape[1] != 2 * C:
            raise ValueError(f"model returns {out.shape[1]} channels; learned sigma needs {2 * C}")
        eps, v = out[:, :C], out[:, C:]  # [N, C, H, W] each
        # learn the variance with the VLB but keep it from pulling on the mean
        vb = self.vb_terms(x0.float(), xt.float(), t, eps.detach(), v)  # [N]
        mse = mean_flat((noise.float() - eps) ** 2)  # [N]
        if snr_gamma is not None:
            snr = self._at(self.snr, t, mse)  # [N]
            mse = mse * torch.clamp(snr, max=snr_gamma) / snr
        return {"loss": mse + vb, "mse": mse, "vb": vb}


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

# The released PixArt-Sigma-XL-2-1024-MS pipeline's scheduler (same betas as training).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    timestep_spacing="linspace",
    use_karras_sigmas=False,
    thresholding=False,
)


def make_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)


def _pad_tokens(y: torch.Tensor, mask: torch.Tensor, length: int):
    """Zero-pad captions [N, L, C] and masks [N, L] to `length` tokens (padding is masked out)."""
    extra = length - y.shape[1]
    if extra <= 0:
        return y, mask
    y = torch.cat([y, y.new_zeros(y.shape[0], extra, y.shape[2])], dim=1)  # [N, length, C]
    mask = torch.cat([mask.bool(), mask.new_zeros(mask.shape[0], extra, dtype=torch.bool)], dim=1)  # [N, length]
    return y, mask


@torch.no_grad()
def sample(
    model,
    shape,
    y,
    mask,
    null_y,
    null_mask,
    steps: int = 20,
    cfg_scale: float = 4.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latents [N, C, H, W] by DPM-Solver++ with classifier-free guidance.

    y [N, L, C] / mask [N, L] is the prompt; null_y [1 or N, L', C] / null_mask the unconditional
    branch (diffusers: T5("") with its own mask; the official code: the model's `y_embedding` with
    the prompt's mask). The model runs in eval mode (no caption dropout) and is restored after.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    N, C = shape[0], shape[1]
    y, mask = y.to(device), mask.to(device).bool()
    if cfg_scale != 1.0:
        null_y = null_y.to(device).expand(N, -1, -1)  # [N, L', C]
        null_mask = null_mask.to(device).bool().expand(N, -1)  # [N, L']
        L = max(y.shape[1], null_y.shape[1])
        y, mask = _pad_tokens(y, mask, L)
        null_y, null_mask = _pad_tokens(null_y, null_mask, L)
        y, mask = torch.cat([y, null_y]), torch.cat([mask, null_mask])  # [2N, L, C], [2N, L]
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps, device=device)
    gen_device = generator.device if generator is not None else device
    latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    latents = latents * scheduler.init_noise_sigma  # [N, C, H, W]
    was_training = model.training
    model.eval()
    try:
        for t in scheduler.timesteps:
            x_in = latents if cfg_scale == 1.0 else torch.cat([latents, latents])  # [2N, C, H, W]
            t_in = t.expand(x_in.shape[0]).to(device)  # [2N]
            eps = model(x_in.to(dtype), t_in, y.to(dtype), mask)[:, :C].float()  # [2N, C, H, W]
            if cfg_scale != 1.0:
                cond, uncond = eps.chunk(2)  # [N, C, H, W] each
                eps = uncond + cfg_scale * (cond - uncond)
            latents = scheduler.step(eps, t, latents).prev_sample  # [N, C, H, W]
    finally:
        model.train(was_training)
    return latents
