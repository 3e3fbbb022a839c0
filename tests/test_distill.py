"""DMD and DMD2: which networks each loss may touch (checked on .grad and bit for bit, not on flags),
the distribution-matching gradient's closed form, a 2-D mixture whose exact score the generator
must learn to match, and `diffuse distill` end to end with resume and one-step sampling."""

import copy

import numpy as np
import pytest
import torch
from mixture import MODES, MU, WEIGHTS, ExactVPNet, exact_sample, mixture_report
from safetensors.torch import load_file

from diffuse import distillation as D
from diffuse import dmd
from diffuse.checkpoint import latest_checkpoint
from diffuse.cli import main
from diffuse.config import load_config
from diffuse.denoiser import Denoiser
from diffuse.diagnostics import doctor_data
from diffuse.losses import diffusion_loss
from diffuse.nets import build_denoiser
from diffuse.nets.mlp import MLP
from diffuse.process import VPDiscrete
from diffuse.run import batch_at
from diffuse.training import train


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def no_grads(module) -> bool:
    return all(p.grad is None for p in module.parameters())


def image_distillation(preset: str, precision: str = "fp32", live_output: bool = False):
    """A fresh tiny teacher of `preset` (untrained: these tests are about gradients) made into a DMD2
    distillation with the GAN head, and a batch of real data. live_output: the zero-initialized
    weights (the output layer's) drawn at random, so that the nets' outputs depend on their inputs."""
    config = load_config(preset, overrides=["model.channels=[8, 16]", "model.emb_dim=32",
                                            f"train.precision={precision}"])
    config.distill.method, config.distill.gan_gen, config.distill.regression = "dmd2", 3e-3, 0.0
    config.train.lr = 1e-3
    data = doctor_data(config)
    torch.manual_seed(0)
    teacher = build_denoiser(config)
    if live_output:
        with torch.no_grad():
            for p in teacher.parameters():
                if p.ndim > 1 and not p.any():
                    p.normal_(0, 0.05)
    dist = D.start_distillation(teacher, config, *data.first(1)[:2])
    x_real, cond, _ = batch_at(data, 0, 8, 0)
    return config, dist, x_real, cond


@pytest.mark.parametrize("preset, precision", [("fmnist-tiny", "fp32"), ("fmnist-edm2-tiny", "fp32"),
                                               ("fmnist-tiny", "bf16")])
def test_each_turn_touches_only_its_own_network(preset, precision):
    """Fake turn: only the fake score and its head change; generator and teacher keep every bit and
    hold no gradient. Generator turn (after it, so that fake and real differ and the DM gradient is
    not 0): only the generator changes; fake score, head and teacher keep every bit and hold no
    gradient. (fmnist-edm2-tiny: the MP U-Net, whose training passes renormalize weights in place;
    bf16: the turns' forward passes under autocast. Live outputs, so that every pass's result, bf16's
    rounding included, depends on its inputs.)"""
    config, dist, x_real, cond = image_distillation(preset, precision, live_output=True)
    teacher = dist.real
    rng = torch.Generator().manual_seed(1)
    z = torch.randn(x_real.shape, generator=rng)
    before = {name: snapshot(m) for name, m in
              (("real", teacher), ("fake", dist.fake), ("head", dist.head), ("generator", dist.generator))}

    out = D.fake_turn(dist, D.sample_generator(dist, z, cond, config, rng), x_real, cond, config, rng)
    assert set(out) == {"fake", "gan_disc", "fake_grad_norm"}
    for name, module in (("real", teacher), ("generator", dist.generator)):
        assert unchanged(module, before[name]), f"the fake turn changed the {name} network"
        assert no_grads(module), f"the fake turn left gradients on the {name} network"
    assert not unchanged(dist.fake, before["fake"]) and not unchanged(dist.head, before["head"])

    after_fake = {"fake": snapshot(dist.fake), "head": snapshot(dist.head)}
    out, _ = D.generator_turn(dist, z, cond, config, rng)
    assert set(out) == {"dm", "gan_gen", "gen_grad_norm"} and out["dm"] > 0
    assert not unchanged(dist.generator, before["generator"])
    for name, module, state in (("real", teacher, before["real"]), ("fake", dist.fake, after_fake["fake"]),
                                ("head", dist.head, after_fake["head"])):
        assert unchanged(module, state), f"the generator turn changed the {name} network"
        assert no_grads(module), f"the generator turn left gradients on the {name} network"
    assert all(p.requires_grad for p in dist.fake.parameters()) and not any(p.requires_grad for p in teacher.parameters())


def test_bf16_turns_compute_the_fp32_losses_to_bf16_precision():
    """The same turns from the same state and draws under bf16 autocast: every loss within 2% of
    fp32's (and not equal to it: autocast ran), and the generator's update in nearly the same
    direction (Adam's first step is about lr * sign(grad), so a sign flip of a tiny gradient moves a
    weight by 2 lr: compare directions, not weights)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        config, dist, x_real, cond = image_distillation("fmnist-tiny", precision, live_output=True)
        before = torch.cat([p.detach().flatten() for p in dist.generator.parameters()])
        rng = torch.Generator().manual_seed(1)
        z = torch.randn(x_real.shape, generator=rng)
        fake_out = D.fake_turn(dist, D.sample_generator(dist, z, cond, config, rng), x_real, cond, config, rng)
        gen_out, x = D.generator_turn(dist, z, cond, config, rng)
        assert x.dtype == torch.float32
        update = torch.cat([p.detach().flatten() for p in dist.generator.parameters()]) - before
        runs[precision] = fake_out | gen_out, update
    (fp32, update32), (bf16, update16) = runs["fp32"], runs["bf16"]
    for key in ("fake", "gan_disc", "dm", "gan_gen"):
        assert bf16[key] == pytest.approx(fp32[key], rel=0.02), key
        assert bf16[key] != fp32[key], f"{key}: the same to the bit, so autocast did not run"
    assert torch.nn.functional.cosine_similarity(update16, update32, dim=0) > 0.9  # 0.954 here; unrelated: ~0


def test_the_dm_loss_gradient_is_g_over_numel_and_reaches_no_score_network():
    """d/dx 0.5 MSE(x, sg(x - g)) = g / numel, with g computed under no_grad from both score nets."""
    process = VPDiscrete("linear", zero_terminal_snr=True)
    real = Denoiser(MLP(dim=2, hidden=16, depth=1), process, "v")
    fake = copy.deepcopy(real)
    torch.nn.init.normal_(fake.net.out.weight)  # real and fake disagree, so g is not 0
    x = torch.randn(5, 2, requires_grad=True)
    t, eps = torch.full((5,), 500), torch.randn(5, 2)
    g = dmd.dm_gradient(real, fake, x, None, t, eps)
    assert not g.requires_grad and g.abs().sum() > 0
    dmd.dm_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / x.numel())
    assert no_grads(real) and no_grads(fake)
    # per sample: (p_real - p_fake) / mean |p_real|, p = x - x0_hat(x_t)
    x_t = process.alpha_sigma(t)[0][:, None].float() * x + process.alpha_sigma(t)[1][:, None].float() * eps
    with torch.no_grad():
        p_real, p_fake = x - real(x_t, t)[0], x - fake(x_t, t)[0]
    torch.testing.assert_close(g, (p_real - p_fake) / p_real.abs().mean(1, keepdim=True))


def test_dmd2_moves_a_one_step_generator_onto_a_mixture_with_an_exact_score():
    """The real score is the mixture's exact denoiser; generator and fake score start from an MLP
    denoiser fitted for 500 steps, whose one-step output (x0_hat at pure noise) is the mixture's
    mean: sliced W1 0.60, modes missed. After 1000 iterations (the generator every 5th, DMD2's
    two-time-scale update): sliced W1 below 0.08 and every mode's share within 0.06 of its weight
    (measured from 800 to 2000 iterations: W1 0.052-0.063, share errors 0.024-0.050; the modes come
    out about twice too wide). With the generator stepping every iteration it stays collapsed (W1 0.6)."""
    torch.manual_seed(0)
    config = load_config("toy2d", overrides=["diffusion.prediction='x0'", "train.grad_clip=10.0"])
    config.distill.gen_every = 5
    process = VPDiscrete("linear", zero_terminal_snr=True)
    real = Denoiser(ExactVPNet(process), process, "x0").requires_grad_(False)
    teacher = Denoiser(MLP(dim=2, hidden=128, depth=3, emb_dim=64), process, "x0")
    optimizer, rng = torch.optim.Adam(teacher.parameters(), lr=2e-3), torch.Generator().manual_seed(0)
    for i in range(500):
        loss = diffusion_loss(teacher, exact_sample(512, seed=1000 + i).float(), None, rng).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fake, generator = copy.deepcopy(teacher), copy.deepcopy(teacher)

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    dist = D.Distillation(real, fake, generator, None, adamw(generator.parameters()), adamw(fake.parameters()),
                          dmd.time_grid(process), dmd.generator_times(process, 1))

    def report():
        z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            x = generator.eval()(*dmd.generator_input(generator, z, None, dist.times, 0, []))[0]
        share = torch.bincount(torch.cdist(x.double(), MU).argmin(1), minlength=MODES) / len(x)
        return mixture_report(x) | {"share": share}

    start = report()
    for step in range(1000):
        z = torch.randn(256, 2, generator=rng)
        if step % config.distill.gen_every == 0:
            _, x = D.generator_turn(dist, z, None, config, rng)
        else:
            x = D.sample_generator(dist, z, None, config, rng)
        D.fake_turn(dist, x, None, None, config, rng)
    end = report()
    assert start["sw"] > 0.5 and end["sw"] < 0.08, (start, end)
    assert (end["share"] - WEIGHTS).abs().max() < 0.06 and end["share"].min() > 0.02, end


def test_diffuse_distill_resumes_exactly_and_samples_in_one_step(tmp_path, tiny):
    """A tiny DMD2 run stopped half-way and resumed ends bit-identical to a straight one (generator,
    its EMA, fake score, head, both optimizers; the preset's bf16 autocast included); the student
    samples with `diffuse sample --steps 1`; bad requests are one sentence and exit code 2."""
    teacher = train(tiny(), tmp_path / "teacher", log=lambda *a: None)
    common = ["distill", str(teacher), "--preset", "dmd2", "--set", "train.batch=16", "--set", "train.log_kimg=0.064",
              "--set", "train.grid_kimg=0.128", "--set", "train.checkpoint_kimg=0.064", "--set", "train.fd_kimg=0",
              "--set", "distill.gen_every=2"]
    assert main([*common, "--set", "train.kimg=0.128", "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--set", "train.kimg=0.064", "--out", str(tmp_path / "resumed")]) == 0
    assert main([*common, "--set", "train.kimg=0.128", "--out", str(tmp_path / "resumed")]) == 0
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "resumed")
    for stem in ("model", "ema", "fake", "head", "optimizer", "fake_optimizer"):
        x, y = (load_file(c / f"{stem}.safetensors") for c in (a, b))
        assert all(torch.equal(x[k], y[k]) for k in x), stem
    teacher_weights = load_file(latest_checkpoint(teacher) / "ema.safetensors")
    generator, ema = load_file(a / "model.safetensors"), load_file(a / "ema.safetensors")
    assert any(not torch.equal(teacher_weights[k], v) for k, v in generator.items())
    assert any(not torch.equal(ema[k], v) for k, v in generator.items())  # the EMA lags the generator
    out = tmp_path / "s.npz"
    assert main(["sample", str(tmp_path / "straight"), "--n", "20", "--steps", "1", "--out", str(out)]) == 0
    assert np.load(out)["images"].shape == (20, 28, 28, 1)
    assert main(["distill", str(teacher), "--set", "model.blocks=3", "--out", str(tmp_path / "bad")]) == 2
    assert main(["distill", str(tmp_path / "straight"), "--out", str(tmp_path / "bad")]) == 2
    assert main(["distill", str(teacher), "--set", "train.compile=true", "--out", str(tmp_path / "bad")]) == 2
