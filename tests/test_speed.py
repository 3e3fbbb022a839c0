"""The speed switches (diffuse.speed): bf16 autocast and channels_last change how a training step
runs, not what it computes beyond rounding; torch.compile fails in one sentence where it cannot work."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from diffuse.checkpoint import latest_checkpoint
from diffuse.nets import build_denoiser
from diffuse.errors import UserError
from diffuse.sampling import sample
from diffuse.speed import native_bf16, prepare, to_memory_format
from diffuse.training import train, train_step, training_loss


def filled_denoiser(config):
    """The config's net with its zero-initialized layers filled, so its output depends on every layer (the
    U-Net's zero-initialized layers would hide the whole net's rounding)."""
    torch.manual_seed(0)
    denoiser = build_denoiser(config)
    with torch.no_grad():
        for p in denoiser.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return denoiser


def tiny_denoiser(config):
    """`filled_denoiser`, for sampling: eval mode, no gradients."""
    return filled_denoiser(config).eval().requires_grad_(False)


def twin_steps(config, switched: dict) -> tuple[tuple[float, float], tuple[float, float], torch.nn.Module,
                                                 torch.optim.Optimizer]:
    """One training step of the same net on the same batch and seed, plain and with `switched` train.* keys:
    ((loss, grad norm) plain, (loss, grad norm) switched, the switched denoiser, its optimizer)."""
    plain = filled_denoiser(config)
    fast, fast_config = copy.deepcopy(plain), copy.deepcopy(config)
    for key, value in switched.items():
        setattr(fast_config.train, key, value)
    prepare(fast.net, fast_config.train)
    x0 = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    cond = torch.arange(8) % 10
    results = []
    for denoiser, c in ((plain, config), (fast, fast_config)):
        optimizer = torch.optim.AdamW(denoiser.parameters(), lr=1e-3)
        results.append(train_step(training_loss(denoiser, c), optimizer, x0, cond, 1e-3, c, seed=5))
    return results[0], results[1], fast, optimizer


def test_bf16_step_gives_a_finite_loss_close_to_fp32_and_keeps_float32_state(tiny):
    conv_dtypes = []
    config = tiny("train.precision=fp32")
    (loss32, norm32), (loss16, norm16), fast, optimizer = twin_steps(config, {"precision": "bf16"})
    assert torch.isfinite(torch.tensor([loss16, norm16])).all()
    assert loss16 == pytest.approx(loss32, rel=0.03)  # bf16 keeps 8 bits of mantissa: ~0.4% per product
    assert norm16 == pytest.approx(norm32, rel=0.1)
    assert loss16 != loss32  # autocast did act: bf16 rounding moved the loss
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values() if v.is_floating_point())
    # and inside the step the convolutions ran in bf16
    conv = next(m for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, args, out: conv_dtypes.append(out.dtype))
    twin = copy.deepcopy(config)
    twin.train.precision = "bf16"
    train_step(training_loss(fast, twin), optimizer, torch.randn(4, 1, 28, 28), torch.arange(4), 1e-3, twin, seed=6)
    assert conv_dtypes == [torch.bfloat16]


def test_channels_last_step_gives_the_loss_of_contiguous_memory(tiny):
    (loss_a, norm_a), (loss_b, norm_b), fast, _ = twin_steps(tiny("train.precision=fp32"), {"channels_last": True})
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert norm_b == pytest.approx(norm_a, rel=1e-4)
    convs = [m.weight for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
                         if w.shape[1] > 1 and w.shape[2] > 1)


def test_to_memory_format_touches_only_4d_batches_when_asked(tiny):
    config = tiny("train.channels_last=true")
    x = torch.randn(2, 3, 5, 5)
    assert to_memory_format(x, config.train).is_contiguous(memory_format=torch.channels_last)
    assert not to_memory_format(x, config.train).is_contiguous()
    assert to_memory_format(x, tiny().train) is x
    labels = torch.arange(4)
    assert to_memory_format(labels, config.train) is labels


def test_a_run_with_switches_on_checkpoints_float32_and_resumes_with_them_off(tmp_path, tiny):
    run = tmp_path / "run"
    fast = ["train.precision=bf16", "train.channels_last=true", "train.probe_kimg=0"]
    train(tiny(*fast, "train.kimg=0.032", "train.checkpoint_kimg=0.032"), run, log=lambda *a: None)
    model = load_file(latest_checkpoint(run) / "model.safetensors")
    assert model and all(v.dtype == torch.float32 for v in model.values())
    # the switches change how steps run, not the run: resuming with them off is allowed
    train(tiny("train.probe_kimg=0", "train.kimg=0.064", "train.checkpoint_kimg=0.032"), run, log=lambda *a: None)
    assert latest_checkpoint(run).name == "step-0000004"


def test_compile_that_cannot_work_is_one_sentence(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    config = tiny("train.compile=true")
    with pytest.raises(UserError) as caught:
        prepare(build_denoiser(config).net, config.train)
    message = str(caught.value)
    assert "\n" not in message and message.endswith("set train.compile = false.")
    assert "No working C++ compiler found" in message


def test_auto_precision_takes_bf16_only_where_the_device_computes_it(monkeypatch):
    from diffuse import speed

    monkeypatch.setattr(speed, "native_bf16", lambda device: True)
    assert speed.chosen_precision("auto", "cpu")[0] == "bf16"
    monkeypatch.setattr(speed, "native_bf16", lambda device: False)
    precision, why = speed.chosen_precision("auto", "cpu")
    assert precision == "fp32" and "no native bf16" in why
    assert speed.chosen_precision("bf16", "cpu")[0] == "bf16"  # asked for: kept, however slow
    assert speed.chosen_precision("fp32", "cpu")[0] == "fp32"


def test_a_run_records_the_precision_auto_chose(tmp_path):
    from diffuse import api, speed
    from diffuse.config import load_config

    said = []
    run = api.train("fmnist-tiny", tmp_path / "run", ["train.kimg=0.064", "train.batch=32", "train.probe_kimg=0",
                                                      "train.fd_kimg=0", "train.threads=1", "train.precision=auto"],
                    device="cpu", log=said.append)
    want = "bf16" if speed.native_bf16("cpu") else "fp32"
    assert load_config(None, run / "config.toml").train.precision == want
    assert [s for s in said if s.startswith(f"precision: {want} (auto: cpu")]


@pytest.mark.skipif(not native_bf16("cpu"), reason="bf16 is emulated on this CPU (no AVX-512 BF16 or AMX)")
def test_bf16_sampling_runs_the_net_in_bf16_and_stays_close_to_fp32_on_any_batch_size(tiny):
    config = tiny("sample.cfg=2")
    denoiser = tiny_denoiser(config)
    cond, seeds = torch.arange(6) % 10, range(6)
    settings = {**config.sample.sampler_args(), "batch": 6}
    dtypes = []
    conv = next(m for m in denoiser.net.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    fp32 = sample(denoiser, (1, 28, 28), cond, seeds, **{**settings, "precision": "fp32"})
    bf16 = sample(denoiser, (1, 28, 28), cond, seeds, **{**settings, "precision": "bf16"})
    hook.remove()
    assert set(dtypes) == {torch.float32, torch.bfloat16} and bf16.dtype == torch.float32
    assert not bf16.equal(fp32)  # autocast acted
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()  # 4 guided steps of bf16 rounding
    # image i is still its own seed's: another batch size gives the same bf16 images, to bf16's rounding
    # (bit for bit on the AMD EPYC here; another CPU's kernels may block a batch of 4 differently)
    other = sample(denoiser, (1, 28, 28), cond, seeds, **{**settings, "precision": "bf16", "batch": 4})
    assert (other - bf16).abs().max() < 0.01 * fp32.abs().max()


def test_auto_sampling_precision_is_resolved_and_reported(tmp_path, tiny, monkeypatch):
    from diffuse import api, model as model_module

    run = train(tiny("train.kimg=0.032", "train.checkpoint_kimg=0.032", "train.probe_kimg=0",
                     "train.precision=fp32", "sample.precision=auto"), tmp_path / "run", log=lambda *a: None)
    loaded = api.load(run)
    monkeypatch.setattr(model_module, "chosen_precision", lambda precision, device: ("fp32", "test"))
    assert loaded.sample(2).settings["precision"] == "fp32"
    monkeypatch.setattr(model_module, "chosen_precision",
                        lambda precision, device: ("bf16" if precision == "auto" else precision, "test"))
    assert loaded.sample(2).settings["precision"] == "bf16"  # the run's sample.precision: auto
    assert loaded.sample(2, precision="fp32").settings["precision"] == "fp32"
    with pytest.raises(UserError, match="precision"):
        loaded.sample(2, precision="fp16")


def test_watching_runs_in_the_training_precision(tiny):
    from diffuse.watching import watching_settings

    config = tiny("sample.precision=fp32")
    config.train.precision = "bf16"  # as `resolve_precision` leaves it
    assert watching_settings(config)["precision"] == "bf16"


@pytest.mark.skipif(not native_bf16("cpu"), reason="bf16 is emulated on this CPU (no AVX-512 BF16 or AMX)")
def test_the_probe_reads_features_from_a_bf16_pass_in_float32(tiny):
    from diffuse.metrics.probe import bottleneck_features

    denoiser = tiny_denoiser(tiny())
    x0, cond = torch.randn(4, 1, 28, 28), torch.arange(4)
    a = bottleneck_features(denoiser, x0, cond, 300, torch.Generator().manual_seed(0), "fp32")
    b = bottleneck_features(denoiser, x0, cond, 300, torch.Generator().manual_seed(0), "bf16")
    assert b.dtype == torch.float32 and not a.equal(b)
    assert (a - b).abs().max() < 0.1  # layer-normalized features: unit scale
