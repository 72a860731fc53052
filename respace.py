"""Respacing (Nichol & Dhariwal 2021, section 4; improved-diffusion's respace.py): the paper's diffusion on
some of its timesteps is a diffusion of its own, so Algorithm 2 on it is a few-step sampler.

The kept timesteps t_0 < t_1 < ... < t_{S-1} of a diffusion give a chain of S steps with
alphabar'_i = alphabar_{t_i} and beta'_i = 1 - alphabar_{t_i} / alphabar_{t_{i-1}} (alphabar_{t_{-1}} = 1).
Its q(x_i | x_0) are the parent's q(x_{t_i} | x_0), so the network trained on the parent serves it, called
at the parent's timestep t_i (`SpacedDiffusion.wrap`). Everything else, the posterior, sigma^2 = beta' or
beta-tilde' and the step p_sample, is GaussianDiffusion's, written once in diffusion.py.
"""
import torch

from diffusion import GaussianDiffusion


class SpacedDiffusion(GaussianDiffusion):
    """The diffusion `base` on its timesteps `use_timesteps` (distinct, in any order), with the reverse variance
    var_type: fixed_large (sigma^2 = beta'_i) or fixed_small (beta-tilde'_i). Its alphabar are base's own
    values at those timesteps, not a product of the beta'_i, so its x_0 prediction and posterior coefficients
    are those computed from base's alphabar. Its prediction is "eps": it takes an eps function (wrap)."""

    def __init__(self, base, use_timesteps, var_type="fixed_large"):
        self.timestep_map = sorted(use_timesteps)  # the chain's step i is base's timestep timestep_map[i]
        ab = base.alphas_cumprod[self.timestep_map]
        self.args = dict(base=base.args, use_timesteps=self.timestep_map, var_type=var_type)
        self.set_schedule(1.0 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]), ab, var_type, "eps")
        self._maps = {}  # device -> timestep_map as a tensor there

    def wrap(self, eps_fn):
        """eps_fn(x, t) of base's timesteps as this chain's: at the chain's step i it is called at base's t_i."""
        def eps(x, i):
            if i.device not in self._maps:
                self._maps[i.device] = torch.tensor(self.timestep_map, device=i.device)
            return eps_fn(x, self._maps[i.device][i])
        return eps
