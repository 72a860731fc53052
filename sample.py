"""Sampling: the 1000-step ancestral reverse process (Algorithm 2 of Ho et al. 2020)."""
import torch

from diffusion import GaussianDiffusion


@torch.no_grad()
def sample_func(model, n_samples=10, diffusion=None, seed=0, generator=None, device=None,
                batch_size=256, return_steps=(), clip_denoised=True, progress=True):
    """Draw `n_samples` images with Algorithm 2 (T reverse steps from pure noise).

    seed / generator: reproducibility. With a seed, batch k uses its own generator seeded with
    seed + k, so the first batches are the same whatever n_samples is. A torch.Generator (on the
    model's device) is used as is for every batch instead.
    return_steps: the paper's t in {0, ..., T} whose x_t are kept (T = noise, 0 = the sample).
    Returns (samples, steps): samples (n_samples, C, H, W) in [-1, 1] on the CPU, and
    steps {t: (n_samples, C, H, W)} for the reverse-process figure.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    diffusion = diffusion or GaussianDiffusion()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    m = model.model_args
    shape = (m["in_channels"], m["resolution"], m["resolution"])
    samples, steps = [], {}
    try:
        for k, start in enumerate(range(0, n_samples, batch_size)):
            b = min(batch_size, n_samples - start)
            g = generator if generator is not None else torch.Generator(device=device).manual_seed(seed + k)
            x, st = diffusion.p_sample_loop(model, (b, *shape), generator=g, device=device,
                                            clip_denoised=clip_denoised, return_steps=return_steps,
                                            progress=progress)
            samples.append(x.cpu())
            for t, xt in st.items():
                steps.setdefault(t, []).append(xt.cpu())
    finally:
        model.train(was_training)
    return torch.cat(samples), {t: torch.cat(v) for t, v in steps.items()}
