import pytest
import torch

from conftest import undo_zero_init
from model import UNet, count_parameters


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(tiny_unet, batch):
    x = torch.randn(batch, 1, 28, 28)
    assert tiny_unet(x, torch.randint(0, 1000, (batch,))).shape == x.shape


def test_default_is_the_paper_layout():
    m = UNet()
    assert m.model_args["ch"] == 64 and m.model_args["ch_mult"] == (1, 2, 2)
    assert m.model_args["num_res_blocks"] == 2 and m.model_args["attn_resolutions"] == (14,)
    assert 5e6 < count_parameters(m) < 8e6  # ~6.2M, as the paper's layout at 28x28
    assert m(torch.randn(2, 1, 28, 28), torch.tensor([0, 999])).shape == (2, 1, 28, 28)


def test_final_conv_is_zero_initialised(tiny_unet):
    out = tiny_unet(torch.randn(2, 1, 28, 28), torch.tensor([3, 900]))
    assert torch.count_nonzero(out) == 0


def test_output_depends_on_t(tiny_unet):
    undo_zero_init(tiny_unet, std=0.1)  # else every residual branch (and t) is silent
    x = torch.randn(1, 1, 28, 28).repeat(2, 1, 1, 1)
    out = tiny_unet(x, torch.tensor([5, 700]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_overfits_one_batch(tiny_unet):
    """Fixed x_t, t and eps: the network must learn the map (loss falls by more than half)."""
    g = torch.Generator().manual_seed(0)  # 4 examples, 30 steps: the loss ends near 0.2 of its start
    x, eps = torch.randn(4, 1, 28, 28, generator=g), torch.randn(4, 1, 28, 28, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    opt = torch.optim.Adam(tiny_unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (tiny_unet(x, t) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_bad_resolution_refused():
    with pytest.raises(ValueError):
        UNet(ch_mult=(1, 2, 2, 2))  # 28 cannot be halved three times
