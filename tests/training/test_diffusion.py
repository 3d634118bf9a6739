"""IDDPM training loss (learned sigma) and the DPM-Solver++ + CFG sampler."""

from __future__ import annotations

import math

import torch

from training.diffusion import GaussianDiffusion, sample


def test_schedule_and_forward_process_match_diffusers():
    from diffusers import DDPMScheduler

    diff = GaussianDiffusion()
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    assert torch.allclose(diff.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 321, 999])
    assert torch.allclose(diff.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-5)


class Oracle(torch.nn.Module):
    """Predicts the true noise for data that is a single point `x_star` (per condition)."""

    def __init__(self, diff, targets, v=-1.0):
        super().__init__()
        self.diff, self.targets, self.v = diff, targets, v
        self.w = torch.nn.Parameter(torch.zeros(()))  # so `next(model.parameters())` works

    def forward(self, x, t, y=None, mask=None):
        a = self.diff._at(self.diff.sqrt_alphas_cumprod, t, x)
        s = self.diff._at(self.diff.sqrt_one_minus_alphas_cumprod, t, x)
        x_star = self.targets[y[:, 0, 0].long()]  # the caption's first feature picks the target
        eps = (x - a * x_star) / s
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


def test_vb_term_vanishes_for_the_true_posterior_and_is_positive_otherwise():
    diff = GaussianDiffusion()
    target = torch.rand(1, 4, 8, 8) * 2 - 1
    x0 = target.expand(4, -1, -1, -1)
    t = torch.tensor([1, 10, 500, 999])
    y = torch.zeros(4, 1, 1)  # every sample asks for target 0
    terms = diff.training_losses(Oracle(diff, target), x0, t, {"y": y})
    # v = -1 selects the posterior variance and eps is exact: KL(q || p) = 0, MSE = 0
    assert terms["mse"].abs().max() < 1e-6 and terms["vb"].abs().max() < 1e-4
    wrong = diff.training_losses(Oracle(diff, target, v=1.0), x0, t, {"y": y})
    assert (wrong["vb"][:2] > 1e-3).all()  # beta_t vs posterior variance: they differ most at small t
    assert torch.allclose(wrong["loss"], wrong["mse"] + wrong["vb"])


def test_mse_trains_the_mean_and_vb_trains_only_the_variance():
    diff = GaussianDiffusion()
    out = torch.zeros(2, 8, 4, 4, requires_grad=True)
    model = lambda x, t, **kw: out
    x0, t = torch.randn(2, 4, 4, 4), torch.tensor([0, 400])
    terms = diff.training_losses(model, x0, t, {})
    g_vb = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)[0]
    g_mse = torch.autograd.grad(terms["mse"].sum(), out)[0]
    assert g_vb[:, :4].abs().max() == 0 and g_vb[:, 4:].abs().max() > 0
    assert g_mse[:, 4:].abs().max() == 0 and g_mse[:, :4].abs().max() > 0


def test_decoder_nll_at_t0_is_finite_and_in_bits():
    diff = GaussianDiffusion()
    x0 = torch.rand(2, 4, 4, 4) * 2 - 1
    model = lambda x, t, **kw: torch.zeros(2, 8, 4, 4)
    vb = diff.training_losses(model, x0, torch.tensor([0, 0]), {})["vb"]
    assert torch.isfinite(vb).all() and (vb > 0).all() and (vb < 8 * math.log2(256)).all()


def test_min_snr_weighting_downweights_only_low_noise_steps():
    diff = GaussianDiffusion()
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([5, 300, 900])
    model = lambda x, t, **kw: torch.zeros(3, 8, 4, 4)
    plain = diff.training_losses(model, x0, t, {}, noise=noise)["mse"]
    weighted = diff.training_losses(model, x0, t, {}, snr_gamma=5.0, noise=noise)["mse"]
    snr = diff.snr[t].float()
    assert snr[0] > 5 and snr[2] < 5
    assert torch.allclose(weighted[0], plain[0] * 5 / snr[0]) and torch.allclose(weighted[2], plain[2])


def test_sampler_reaches_the_data_and_guidance_pushes_past_it():
    diff = GaussianDiffusion()
    targets = torch.stack([torch.full((4, 6, 10), 0.5), torch.full((4, 6, 10), -0.5)])
    oracle = Oracle(diff, targets)
    y = torch.zeros(2, 3, 8)  # condition 0
    mask = torch.ones(2, 3, dtype=torch.bool)
    null_y = torch.ones(1, 5, 8)  # unconditional branch -> target 1 (different token count: padded)
    null_mask = torch.tensor([[True, False, False, False, False]])
    g = torch.Generator().manual_seed(0)
    x = sample(oracle, (2, 4, 6, 10), y, mask, null_y, null_mask, steps=20, cfg_scale=1.0, generator=g)
    assert torch.allclose(x, targets[0].expand(2, -1, -1, -1), atol=2e-2)
    x = sample(oracle, (2, 4, 6, 10), y, mask, null_y, null_mask, steps=20, cfg_scale=2.0, generator=g)
    assert (x.mean() > 0.6).item()  # extrapolated beyond the conditional target, away from the null one


def test_sampler_restores_train_mode_and_is_seeded():
    from training.model import DiT_models

    m = DiT_models["tiny"](input_size=8, pe_interpolation=0.25).train()
    y, mask = torch.randn(1, 300, 32), torch.ones(1, 300, dtype=torch.bool)
    a = sample(m, (1, 4, 8, 8), y, mask, y * 0, mask, steps=3, generator=torch.Generator().manual_seed(1))
    b = sample(m, (1, 4, 8, 8), y, mask, y * 0, mask, steps=3, generator=torch.Generator().manual_seed(1))
    assert m.training and torch.equal(a, b)
