"""The Python API: the README's example runs as written, and gives what the command line gives."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import diffuse
from diffuse.cli import main
from diffuse.errors import UserError
from diffuse.images import load_npz
from diffuse.sampling import ddim

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The Python block of the README's "From Python" section."""
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README example run in a fresh folder: its namespace and the folder."""
    folder = tmp_path_factory.mktemp("readme")
    cwd = Path.cwd()
    namespace = {}
    try:
        import os
        os.chdir(folder)
        exec(compile(readme_example(), "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace, folder


def test_readme_example_samples_what_diffuse_sample_writes(example, capsys):
    namespace, folder = example
    images, labels = namespace["images"], namespace["labels"]
    assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
    assert labels.tolist() == [3, 7] * 10
    out = folder / "cli.npz"
    assert main(["sample", str(folder / "runs/tiny"), "--n", "20", "--labels", "3,7", "--steps", "10", "--cfg", "2",
                 "--seed", "0", "--out", str(out), "--device", "cpu"]) == 0
    cli_images, cli_labels = load_npz(out)
    np.testing.assert_array_equal(cli_images, images)
    np.testing.assert_array_equal(cli_labels, labels)


def test_readme_denoiser_loop_is_ddim(example):
    """The hand-written loop over `model.denoiser` equals the library's DDIM from the same x_T."""
    namespace, _ = example
    model = namespace["model"]
    reference = ddim(model.net, namespace["x_T"], namespace["times"], torch.full((4,), 7))
    torch.testing.assert_close(namespace["x"], reference, rtol=1e-5, atol=1e-5)


def test_evaluate_reports_the_fd_of_the_samples_it_drew(example):
    namespace, folder = example
    result = diffuse.evaluate(folder / "runs/tiny", n=200, device="cpu")
    assert result["n"] == 200 and result["features"] == "fmnist" and result["fd"] > 0
    assert 0 <= result["accuracy"] <= 1 and result["sampler"] == "ddim"


@pytest.mark.parametrize("call, words", [
    (lambda m: m.sample(4, labels=[10]), "outside 0..9"),
    (lambda m: m.sample(4, labels=[-2]), "outside 0..9"),
    (lambda m: m.sample(4, labels=[0.5]), "must be class numbers"),
    (lambda m: m.sample(0), "from 1 to"),
    (lambda m: m.sample(4, stepz=3), "unknown sampler setting 'stepz'"),
    (lambda m: m.sample(4, steps=0), "at least 1"),
    (lambda m: m.sample(4, cond=torch.zeros(4, 1, 7, 7)), "for a model conditioned on images"),
])
def test_mistakes_raise_the_commands_sentence(example, call, words):
    namespace, _ = example
    with pytest.raises(UserError, match=words):
        call(namespace["model"])


def test_labels_for_an_image_conditioned_model_raise(tmp_path, tiny):
    from diffuse.training import train

    config = tiny("data.task=superres", "train.probe_kimg=0", "train.kimg=0.032", "train.grid_kimg=0.032",
                  "train.checkpoint_kimg=0.032")
    run = train(config, tmp_path / "sr", log=lambda *a: None)
    model = diffuse.load(run)
    with pytest.raises(UserError, match="does not apply to a model conditioned on images"):
        model.sample(4, labels=[1])
    low = np.full((3, 7, 7, 1), 128, np.uint8)  # the user's own low-res images
    images, labels = model.sample(3, cond=low, steps=2)
    assert images.shape == (3, 28, 28, 1) and labels.tolist() == [-1, -1, -1]
    with pytest.raises(UserError, match="image conditions of shape"):
        model.sample(3, cond=np.zeros((3, 14, 14, 1), np.uint8))


def test_train_takes_a_config_object_and_a_mapping_of_overrides(tmp_path, tiny):
    config = tiny("train.probe_kimg=0")
    run = diffuse.train(config, tmp_path / "run", {"train.kimg": 0.032, "train.checkpoint_kimg": 0.032},
                        device="cpu", log=lambda *a: None)
    assert diffuse.load(run).config.train.kimg == 0.032 and config.train.kimg == 0.256  # the caller's is untouched
    with pytest.raises(UserError, match="unknown preset 'fmnist-tinyy'"):
        diffuse.train("fmnist-tinyy", tmp_path / "other")
