"""The conditional nets: shapes, where the condition enters, the null condition."""

import gzip

import numpy as np
import pytest
import torch

from diffuse.data import Scaling, fit_scaling, read_idx
from diffuse.errors import UserError
from diffuse.nets.mlp import MLP
from diffuse.nets.unet import UNet


def randomized(net):
    """The net with every weight random: zero-initialized output layers would hide the condition."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def test_unet_shapes_and_the_input_carries_only_the_image():
    net = UNet(in_channels=1, channels=(16, 32, 32), blocks=1, attn_levels=(2,), num_classes=10, emb_dim=32)
    assert net.stem.in_channels == 1  # the label is never concatenated onto x_t
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([10.0, 500.0, 999.0])
    assert net(x, t, torch.tensor([0, 1, -1])).shape == (3, 1, 28, 28)
    assert not net(x, t, torch.tensor([0, 1, 2])).any()  # output layer starts at zero


def test_label_changes_the_output_and_minus_one_is_the_null_class():
    net = randomized(UNet(channels=(16, 32), blocks=1, attn_levels=(1,), num_classes=10, emb_dim=32))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([300.0, 300.0])
    a, b = net(x, t, torch.tensor([1, 1])), net(x, t, torch.tensor([7, 7]))
    assert (a - b).abs().mean() > 1e-3
    torch.testing.assert_close(net(x, t, torch.tensor([-1, -1])), net(x, t, None))
    # the null class is its own learned row, not one of the ten labels
    assert all((net(x, t, torch.tensor([-1, -1])) - net(x, t, torch.tensor([k, k]))).abs().mean() > 1e-4
               for k in range(10))


def test_vector_condition_with_nan_rows_as_null():
    net = randomized(MLP(dim=2, hidden=32, depth=2, cond_dim=3, emb_dim=16))
    x, t = torch.randn(2, 2), torch.tensor([100.0, 100.0])
    c = torch.tensor([[0.5, -1.0, 2.0], [float("nan")] * 3])
    out = net(x, t, c)
    torch.testing.assert_close(out[1], net(x[1:], t[1:], None)[0])
    assert (out[0] - net(x[:1], t[:1], None)[0]).abs().sum() > 1e-4


def test_idx_reader_and_scaling(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + images.tobytes()))
    assert np.array_equal(read_idx(path), images)
    path.write_bytes(gzip.compress(header + images.tobytes()[:-1]))
    with pytest.raises(UserError, match="truncated"):
        read_idx(path)
    pixels = torch.from_numpy(images).unsqueeze(-1)
    scaling = fit_scaling(pixels)
    x = scaling.encode(pixels)
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-4
    assert torch.equal(scaling.decode(x), pixels)
    assert Scaling(0.5, 0.25).decode(torch.full((1, 1, 1, 1), 10.0)).item() == 255  # clipped
