"""The DDPM noise-prediction network: a UNet in the style of Ho et al. 2020 (Appendix B),
adapted to 1x28x28 MNIST (resolutions 28 -> 14 -> 7).

It follows the authors' TensorFlow code (diffusion_tf/models/unet.py):
  * Wide-ResNet / PixelCNN++ residual blocks: GroupNorm -> SiLU -> 3x3 conv, the projected
    time embedding added after the first conv, GroupNorm -> SiLU -> dropout -> 3x3 conv,
    and a 1x1 "network-in-network" skip when the width changes;
  * a sinusoidal timestep embedding of width `ch`, then an MLP to `4 * ch`;
  * single-head self-attention at the resolutions in `attn_resolutions` and in the middle;
  * learned down-sampling (stride-2 conv), nearest up-sampling followed by a conv;
  * the last conv of every residual branch and of the output zero-initialised.

The network knows nothing about the noise schedule: `forward(x, t)` maps a noisy batch and
integer timesteps to the predicted noise eps_theta(x_t, t), the same shape as `x`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps (Transformer style, as in the DDPM code).

    t: (B,) int or float tensor; returns (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:  # pad odd widths with a zero column
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels):
    """GroupNorm with 32 groups as in the paper, but at least 2 channels per group in narrow
    layers (32 groups of 1 channel would subtract each channel's time-embedding bias and erase t)."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 2)), channels)


def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, dropout):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):  # x: (B, in_ch, H, W), temb: (B, temb_ch)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # 3 x (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, HW, C)
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)  # 28 -> 14 -> 7

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, in_channels=1, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
                 attn_resolutions=(14,), dropout=0.1, resolution=28, num_classes=None):
        super().__init__()
        # Stored so that a checkpoint can rebuild the network: UNet(**model.model_args).
        self.model_args = dict(in_channels=in_channels, ch=ch, ch_mult=tuple(ch_mult),
                               num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions),
                               dropout=dropout, resolution=resolution, num_classes=num_classes)
        self._check_args(ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution, num_classes)
        self.ch = ch
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Down path; `skip_chs` records the width of every activation kept for the up path.
        self.down = nn.ModuleList()
        skip_chs, cur, res = [ch], ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._block(cur, ch * mult, temb_ch, dropout, res in attn_resolutions))
                cur = ch * mult
                skip_chs.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(cur))
                skip_chs.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_ch, dropout), AttnBlock(cur),
                                  ResBlock(cur, cur, temb_ch, dropout)])

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip activation.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(self._block(cur + skip_chs.pop(), ch * mult, temb_ch, dropout,
                                           res in attn_resolutions))
                cur = ch * mult
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2
        assert not skip_chs

        self.norm_out = group_norm(cur)
        self.conv_out = zero_init(nn.Conv2d(cur, in_channels, 3, padding=1))

        # Class-conditional (classifier-free guidance, Ho & Salimans 2022): a label embedding added
        # to the time embedding; label `num_classes` is the null label ("no class"). Made last, so
        # the other weights start as in the unconditional model with the same seed, and zero-initialised,
        # so the network starts out ignoring the label.
        self.num_classes = num_classes
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + 1, temb_ch)
            nn.init.zeros_(self.label_emb.weight)

    @staticmethod
    def _check_args(ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution, num_classes):
        """Refuse a layout that cannot be built, naming the argument (run.py's flags share the names)."""
        if ch < 4 or ch % 2:
            raise ValueError(f"ch must be even and >= 4 (time embedding and GroupNorm widths), got {ch}")
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult needs positive integers, got {tuple(ch_mult)}")
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"ch_mult {tuple(ch_mult)}: resolution {resolution} cannot be halved "
                             f"{len(ch_mult) - 1} times")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        resolutions = [resolution // 2 ** i for i in range(len(ch_mult))]
        for r in attn_resolutions:
            if r not in resolutions:
                raise ValueError(f"attn_res {r} is not a resolution of this model {resolutions}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")

    @staticmethod
    def _block(in_ch, out_ch, temb_ch, dropout, attn):
        res = ResBlock(in_ch, out_ch, temb_ch, dropout)
        return nn.ModuleList([res, AttnBlock(out_ch)]) if attn else nn.ModuleList([res])

    def forward(self, x, t, y=None):
        """x: (B, C, H, W) noisy images x_t; t: (B,) integer timesteps; y: (B,) labels in
        [0, num_classes] (num_classes = the null label; None = all null) for a class-conditional
        model, None otherwise. Returns eps_theta, (B, C, H, W)."""
        temb = self.temb(timestep_embedding(t, self.ch))  # (B, 4ch)
        if self.num_classes is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            temb = temb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None); call it without labels")
        hs = [self.conv_in(x)]
        for layer in self.down:
            hs.append(layer(hs[-1]) if isinstance(layer, Downsample) else self._run_block(layer, hs[-1], temb))
        h = hs[-1]
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for layer in self.up:
            h = layer(h) if isinstance(layer, Upsample) else self._run_block(layer, torch.cat([h, hs.pop()], 1), temb)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _run_block(block, h, temb):
        h = block[0](h, temb)
        return block[1](h) if len(block) > 1 else h


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
