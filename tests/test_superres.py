"""Super-resolution from 7x7: the image condition enters only through its encoder, the data, the
measures, a short training run that must use its input, and the command line."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.checkpoint import load_denoiser
from diffuse.cli import main
from diffuse.config import DataConfig, load_config
from diffuse.data import Scaling, dataset, load_fmnist
from diffuse.nets import build_denoiser
from diffuse.errors import UserError
from diffuse.metrics.superres import measures, psnr, upsample
from diffuse.nets.unet import UNet
from diffuse.sampling import Guided, sample

TINY = ["--set", "train.kimg=1.0", "--set", "train.threads=1", "--set", "train.probe_kimg=0",
        "--set", "train.grid_kimg=1.0", "--set", "train.checkpoint_kimg=1.0"]


def sr_unet():
    return UNet(in_channels=1, channels=(8, 16), blocks=1, attn_levels=(1,), num_classes=0, emb_dim=32,
                cond_shape=(1, 7, 7))


def randomize(net, keep=lambda name: False):
    """Every parameter random (zero-initialized layers would hide paths), except those `keep` names."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not keep(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def inputs(batch=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 1, 28, 28, generator=g), torch.tensor([50.0, 500.0, 950.0])[:batch],
            torch.randn(batch, 1, 7, 7, generator=g), torch.randn(batch, 1, 7, 7, generator=g))


# ---------------------------------------------------------------------------------------------
# The network.


def test_y_enters_only_through_the_encoder_never_beside_x_t():
    net = sr_unet()
    assert net.stem.in_channels == 1  # x_t's channels only
    x, t, y1, y2 = inputs()
    # every weight random except the zero-initialized 1x1 convs that read the encoder's features:
    # y then has no way into the output
    randomize(net, keep=lambda name: ".spade." in name)
    out = net(x, t, y1)
    assert out.abs().mean() > 1e-2
    torch.testing.assert_close(net(x, t, y2), out, rtol=0, atol=0)
    randomize(net)  # now the SPADE convs too: y moves the output
    assert (net(x, t, y1) - net(x, t, y2)).abs().mean() > 1e-2


def test_all_nan_condition_is_the_learned_null_and_never_leaks_nan():
    net = randomize(sr_unet())
    x, t, y, _ = inputs()
    y[1] = math.nan
    out = net(x, t, y)
    assert out.isfinite().all()
    torch.testing.assert_close(out[1:2], net(x[1:2], t[1:2], None))
    torch.testing.assert_close(out[:1], net(x[:1], t[:1], y[:1]))
    assert (net(x[1:2], t[1:2], torch.zeros(1, 1, 7, 7)) - out[1:2]).abs().mean() > 1e-3  # null is not y = 0
    net.train()
    net(x, t, y).square().mean().backward()  # a training batch with a dropped condition
    assert all(p.grad.isfinite().all() for p in net.parameters() if p.grad is not None)


def test_class_conditional_unet_is_unchanged():
    """Parameter count and output measured with the U-Net before the image encoder was added."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, channels=(16, 32), blocks=1, attn_levels=(1,), num_classes=10, emb_dim=64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(3, 1, 28, 28, generator=g)
    out = net(x, torch.tensor([1.0, 400.0, 999.0]), torch.tensor([0, 7, -1]))
    assert sum(p.numel() for p in net.parameters()) == 191073
    torch.testing.assert_close(out[:, 0, 14, 12], torch.tensor([0.184809, -0.230952, 0.422188]),
                               rtol=0, atol=1e-4)


def test_guidance_and_batching_with_image_conditions():
    config = load_config("fmnist-sr-tiny", overrides=["model.channels=[8, 16]", "model.emb_dim=32"])
    denoiser = build_denoiser(config)
    randomize(denoiser.net)
    x, t, y, _ = inputs()
    w = 2.0
    x0_c, _ = denoiser(x, t, y)
    x0_u, _ = denoiser(x, t, torch.full_like(y, math.nan))
    torch.testing.assert_close(Guided(denoiser, w)(x, t, y)[0], x0_u + w * (x0_c - x0_u))
    cond = torch.randn(5, 1, 7, 7)
    a = sample(denoiser, (1, 28, 28), cond, range(5), steps=3, cfg=w, batch=5)
    b = sample(denoiser, (1, 28, 28), cond, range(5), steps=3, cfg=w, batch=2)
    assert a.isfinite().all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Config, data, measures.


@pytest.mark.parametrize("override, words", [
    ("data.factor=3", "divide"), ("data.factor=1", "divide"), ("data.task=inpaint", "data.task"),
])
def test_bad_superres_settings_are_one_sentence(override, words):
    with pytest.raises(UserError, match=words):
        load_config("fmnist-sr-tiny", overrides=[override])


def test_superres_needs_fashion_mnist():
    with pytest.raises(UserError, match="needs image data"):
        load_config("toy2d", overrides=["data.task=superres"])


def test_condition_is_the_4x4_block_mean_of_the_scaled_image():
    data = dataset(DataConfig(task="superres", factor=4)).load("train")
    images, labels = load_fmnist("train")
    k = 123
    _, cond, y = data.take(torch.tensor([k]))
    assert len(data) == 60000 and cond.shape == (1, 1, 7, 7) and torch.equal(data.y, labels) and y == labels[k]
    pixels = images[k, :, :, 0].double() / 255
    for i, j in [(0, 0), (3, 2), (6, 6), (2, 5)]:
        block = [pixels[4 * i + a, 4 * j + b].item() for a in range(4) for b in range(4)]
        expected = (sum(block) / 16 - data.scaling.mean) / data.scaling.std
        assert abs(cond[0, 0, i, j].item() - expected) < 1e-5


def test_eval_conditions_are_the_low_res_test_images_cycling():
    scaling = Scaling(0.25, 0.5)
    cond, labels = dataset(DataConfig(task="superres")).eval_conditions(scaling, 10_003)
    images, test_labels = load_fmnist("test")
    assert cond.shape == (10_003, 1, 7, 7)
    assert torch.equal(labels[:10_000], test_labels) and torch.equal(labels[10_000:], test_labels[:3])
    torch.testing.assert_close(cond[10_001], cond[1], rtol=0, atol=0)
    block = images[1, 8:12, 4:8, 0].double().mean() / 255
    assert abs(cond[1, 0, 2, 1].item() - (block.item() - scaling.mean) / scaling.std) < 1e-5
    class_cond, class_labels = dataset(DataConfig()).eval_conditions(scaling, 12)  # the class task: unchanged
    assert class_cond.tolist() == class_labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_measures_against_closed_forms():
    truth = np.full((4, 28, 28, 1), 100, np.uint8)
    truth[1] = 200
    brighter = truth + 10
    m = measures(brighter, truth, 4)
    # every pixel off by 10/255: RMSE 10/255 and PSNR -20 log10(10/255)
    assert abs(m["consistency"] - 10 / 255) < 1e-9
    assert abs(m["psnr"] - 20 * math.log10(25.5)) < 1e-9
    assert abs(psnr(truth, truth) - 100) < 1e-9  # the MSE floor of 1e-10
    # the shuffled pairing compares sample i with the input of image i - 1: 110-100, 210-100, 110-200, 110-100
    assert abs(m["consistency_shuffled"] - math.sqrt((10**2 + 110**2 + 90**2 + 10**2) / 4) / 255) < 1e-9
    # nearest upsampling repeats each low-res pixel factor x factor times
    low = torch.rand(2, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    up = upsample(low, 4, "nearest")
    assert up.shape == (2, 28, 28, 1) and up[0, 4 * 3 + 1, 4 * 5 + 2, 0] == round(255 * low[0, 0, 3, 5].item())


# ---------------------------------------------------------------------------------------------
# A tiny run: it must use its low-res input.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("superres") / "run"
    assert main(["train", "--preset", "fmnist-sr-tiny", *TINY, "--out", str(out)]) == 0
    return out


def test_trained_samples_follow_their_own_low_res_input(run):
    config, denoiser = load_denoiser(run)
    scaling = Scaling(config.data.mean, config.data.std)
    cond, _ = dataset(config.data).eval_conditions(scaling, 64)
    truth = load_fmnist("test")[0][:64].numpy()
    x = sample(denoiser, (1, 28, 28), cond, range(64), **config.sample.sampler_args())
    images = scaling.decode(x).numpy()
    m = measures(images, truth, 4)
    # measured after 1 kimg: own 0.168, shuffled 0.295 (ratio 0.57); with the encoder made to ignore y
    # (null features always) 0.269 and 0.270 (ratio 1.00)
    assert m["consistency"] < 0.8 * m["consistency_shuffled"], m


def test_sample_and_eval_commands_on_a_superres_run(run, tmp_path, capsys):
    out, png = tmp_path / "s.npz", tmp_path / "g.png"
    assert main(["sample", str(run), "--n", "20", "--steps", "4", "--out", str(out), "--grid", str(png)]) == 0
    images, labels = load_fmnist("test")
    with np.load(out) as f:
        samples = f["images"]
        assert samples.dtype == np.uint8 and samples.shape == (20, 28, 28, 1)
        assert f["labels"].dtype == np.int64 and f["labels"].tolist() == labels[:20].tolist()
    columns = len(set(labels[:20].tolist()))  # one column per class: input, sample and truth rows
    assert Image.open(png).size == (2 * (columns * 30 + 2), 2 * (3 * 30 + 2))

    capsys.readouterr()
    assert main(["eval", str(run), "--n", "20", "--steps", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the same samples (seed 0) as the npz: recompute the consistency with numpy block means
    def blocks(a):
        return (a[..., 0].astype(np.float64) / 255).reshape(20, 7, 4, 7, 4).mean(axis=(2, 4))
    expected = np.sqrt(((blocks(samples) - blocks(images[:20].numpy())) ** 2).mean())
    assert abs(result["consistency"] - expected) < 1e-9
    assert result["nearest_consistency"] <= 0.5 / 255  # uint8 rounding of exact block copies
    assert result["n"] == 20 and result["fd"] > 0 and result["nearest_fd"] > 0 and result["bilinear_fd"] > 0
    assert set(result) >= {"psnr", "nearest_psnr", "bilinear_psnr", "consistency_shuffled", "accuracy"}


def test_labels_flag_does_not_apply_to_a_superres_run(run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffuse", "sample", str(run), "--n", "3", "--labels", "3",
                           "--out", str(tmp_path / "x.npz")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--labels" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.npz").exists()
