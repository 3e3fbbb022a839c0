"""Training, sampling, grids and evaluation on a user's own prepared data set: colour and grey,
16 and 32 pixels, class labels, vectors, paired images and none, read a batch at a time."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from diffuse import api
from diffuse.cli import main
from diffuse.config import DataConfig, load_config
from diffuse.data import Split, dataset
from diffuse.errors import UserError
from diffuse.nets import build_net, sized_for
from diffuse.preparing import PrepareOptions, prepare
from diffuse.prepared import open_prepared
from diffuse.run import batch_at

TINY = ["train.kimg=0.256", "train.batch=16", "train.threads=1", "train.log_kimg=0.128", "train.grid_kimg=0.256",
        "train.checkpoint_kimg=0.256", "train.fd_kimg=0", "train.probe_kimg=0.064", "model.channels=[16, 32]",
        "model.attn_levels=[1]", "model.emb_dim=32", "sample.steps=2", "sample.n_eval=16"]


def squares(n: int, side: int, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, side, side, channels) uint8: a bright square on a dark ground whose colour
    (channel) or, for grey images, corner is its class of 3; and the classes (n,)."""
    g = np.random.default_rng(seed)
    labels = g.integers(0, 3, n)
    images = g.integers(0, 40, (n, side, side, channels)).astype(np.uint8)
    h = side // 2
    for i, c in enumerate(labels):
        if channels == 3:
            images[i, :h, :h, c] = 230
        else:
            r, s = divmod(int(c), 2)
            images[i, r * h:(r + 1) * h, s * h:(s + 1) * h, 0] = 230
    return images, labels


def write_data_dir(path, images, labels=None, vectors=None, conditions=None, heldout=0.2, name="squares"):
    """A DATA_DIR made by `diffuse data prepare` from an .npz of the arrays."""
    arrays = {k: v for k, v in {"labels": labels, "vectors": vectors, "conditions": conditions}.items()
              if v is not None}
    source = path.parent / f"{path.name}.npz"
    np.savez(source, images=images, **arrays)
    prepare([source], path, PrepareOptions(heldout=heldout, name=name), log=lambda *a: None)
    return path


@pytest.fixture(scope="module")
def rgb32(tmp_path_factory):
    images, labels = squares(160, 32, 3)
    return write_data_dir(tmp_path_factory.mktemp("data") / "rgb32", images, labels)


def test_the_dataset_record_of_a_prepared_folder(rgb32):
    ds = dataset(DataConfig(name="prepared", path=str(rgb32)))
    assert (ds.name, ds.shape, ds.num_classes, ds.condition, ds.cond_shape) == ("squares", (3, 32, 32), 3, "label",
                                                                                None)
    train, held = ds.read("train"), ds.read("test")
    assert (len(train), len(held)) == (128, 32)
    images, labels = squares(160, 32, 3)
    rows = open_prepared(rgb32).train_index[[5, 0, 127]]  # the training split's rows of the array
    x0, cond, y = ds.load("train").take(torch.tensor([5, 0, 127]))
    want = torch.from_numpy(images[rows]).permute(0, 3, 1, 2).double() / 255
    assert torch.allclose(x0.double(), (want - ds.stats.mean) / ds.stats.std, atol=1e-5)
    assert torch.equal(cond, torch.from_numpy(labels[rows])) and torch.equal(y, cond)
    assert abs(ds.stats.mean - images.mean() / 255) < 1e-6


def test_the_images_are_read_a_batch_at_a_time_from_the_memory_map(rgb32):
    data = dataset(DataConfig(name="prepared", path=str(rgb32))).load("train")
    assert isinstance(data.split.images, np.memmap)  # never copied whole into memory
    a, _, _ = batch_at(data, 3, 16, seed=0)
    b, _, _ = batch_at(data, 3, 16, seed=0)
    assert torch.equal(a, b) and a.shape == (16, 3, 32, 32)


def test_xflip_mirrors_about_half_the_batch_and_nothing_else(rgb32):
    data = dataset(DataConfig(name="prepared", path=str(rgb32))).load("train")
    plain, _, _ = batch_at(data, 0, 64, seed=0)
    flipped, _, _ = batch_at(data, 0, 64, seed=0, xflip=True)
    mirrored = [torch.equal(f, p.flip(-1)) and not torch.equal(f, p) for f, p in zip(flipped, plain)]
    same = [torch.equal(f, p) for f, p in zip(flipped, plain)]
    assert all(m or s for m, s in zip(mirrored, same)) and 16 < sum(mirrored) < 48


def test_a_rank_reads_only_its_block_of_the_batch(rgb32, monkeypatch):
    """Under a launcher each rank reads its rows of the global batch: the same examples, flipped the same
    way, as those rows of the whole batch, and no other row of the file."""
    data = dataset(DataConfig(name="prepared", path=str(rgb32))).load("train")
    whole, cond, labels = batch_at(data, 2, 64, seed=0, xflip=True)
    read = []
    take = Split.images_at
    monkeypatch.setattr(Split, "images_at", lambda self, index: read.append(len(index)) or take(self, index))
    for rows in (slice(0, 32), slice(32, 64), slice(21, 43)):
        x, c, y = batch_at(data, 2, 64, seed=0, xflip=True, rows=rows)
        assert torch.equal(x, whole[rows]) and torch.equal(c, cond[rows]) and torch.equal(y, labels[rows])
    assert read == [32, 32, 22]


@pytest.mark.parametrize("side, channels, want", [
    (16, 1, ([32, 64], 64)), (28, 1, ([32, 64, 128], 64)), (32, 3, ([32, 64, 128], 64)),
    (64, 3, ([32, 64, 128, 128], 32)), (256, 3, ([32, 64, 128, 128, 128, 128], 8))])
def test_the_net_is_sized_by_the_rule_for_every_resolution(tmp_path, side, channels, want):
    images = np.zeros((4, side, side, channels), np.uint8)
    ds = dataset(DataConfig(name="prepared", path=str(write_data_dir(tmp_path / "d", images, heldout=0.5))))
    overrides = sized_for(ds)
    assert overrides[0] == f"model.channels={want[0]}" and overrides[2] == f"train.batch={want[1]}"
    config = load_config("fmnist", overrides=["data.name='prepared'", f"data.path='{tmp_path / 'd'}'", "train.fd_kimg=0",
                                              *overrides])
    net = build_net(config.model, ds)
    x = torch.zeros(1, channels, side, side)
    assert net(x, torch.zeros(1), torch.full((1,), -1)).shape == x.shape


@pytest.mark.parametrize("kind", ["label", "none", "vector", "image"])
def test_train_sample_and_grid_on_every_kind_of_condition(tmp_path, kind):
    images, labels = squares(96, 16, 3 if kind != "none" else 1, seed=1)
    extra = {"label": {"labels": labels}, "none": {},
             "vector": {"vectors": np.eye(3)[labels] + 0.1},
             "image": {"conditions": images[:, ::2, ::2].mean(-1, keepdims=True).astype(np.uint8)}}[kind]
    data_dir = write_data_dir(tmp_path / "data", images, **extra)
    run = api.train(None, tmp_path / "run", TINY, data=data_dir, device="cpu", log=lambda *a: None)
    config = load_config(None, run / "config.toml")
    assert config.data.path == str(data_dir.resolve()) and config.data.name == "prepared"
    model = api.load(run)
    samples = model.sample(6, seed=0, steps=2)
    assert samples.images.shape == (6, 16, 16, images.shape[3]) and samples.images.dtype == np.uint8
    assert list((run / "samples").glob("*.png"))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probed = [e for e in events if e["event"] == "probe"]
    assert bool(probed) == (kind == "label")  # the probe reads class labels
    if kind == "image":
        assert model.dataset.cond_shape == (1, 16, 16)  # prepare brings the conditions to R (--cond-resolution)
    # the run's record of its DATA_DIR: with the folder gone the run still builds, loads and samples the same
    assert config.data.sha256 == json.loads((data_dir / "data.json").read_text())["files"]["images.npy"]["sha256"]
    held = None if kind in ("label", "none") else model.dataset.eval_conditions(model.scaling, 6)[0]
    data_dir.rename(tmp_path / "elsewhere")
    moved = api.load(run)
    assert not moved.dataset.at_hand and moved.dataset.shape == model.dataset.shape
    assert (moved.dataset.condition, moved.dataset.cond_shape) == (model.dataset.condition, model.dataset.cond_shape)
    if held is not None:
        with pytest.raises(UserError, match="is not there; give its DATA_DIR with --data"):
            moved.sample(6, seed=0, steps=2)  # the held-out conditions are the data's
    assert np.array_equal(moved.sample(6, cond=held, seed=0, steps=2).images, samples.images)


def test_the_command_line_trains_and_samples_a_prepared_folder(tmp_path, rgb32, capsys):
    run = tmp_path / "run"
    args = [a for kv in TINY for a in ("--set", kv)]
    assert main(["train", "--data", str(rgb32), "--out", str(run), *args]) == 0
    assert main(["sample", str(run), "--n", "6", "--steps", "2", "--out", str(tmp_path / "s.npz"),
                 "--grid", str(tmp_path / "s.png")]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (6, 32, 32, 3) and f["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert (tmp_path / "s.png").stat().st_size > 0


def test_a_run_keeps_a_record_of_its_data_dir_and_refuses_another_in_its_place(tmp_path, rgb32, capsys):
    """Sampled and evaluated from the command line with the folder gone; sampled and resumed with --data where it
    moved; refused, with what was written kept, where the folder holds other images, on resume as on sampling;
    a damaged record is one sentence."""
    data_dir, run, args = tmp_path / "data", tmp_path / "run", [a for kv in TINY for a in ("--set", kv)]
    shutil.copytree(rgb32, data_dir)
    assert main(["train", "--data", str(data_dir), "--out", str(run), *args]) == 0
    config_text = (run / "config.toml").read_text()
    assert 'condition = "label"' in config_text and "shape = [3, 32, 32]" in config_text
    shutil.move(data_dir, tmp_path / "away")
    assert main(["sample", str(run), "--n", "3", "--steps", "2", "--out", str(tmp_path / "s.npz"),
                 "--grid", str(tmp_path / "s.png")]) == 0
    assert main(["eval", str(run), "--n", "4"]) == 2
    assert "is not there; give its DATA_DIR with --data" in capsys.readouterr().err
    assert main(["sample", str(run), "--n", "3", "--steps", "2", "--out", str(tmp_path / "m.npz"),
                 "--data", str(tmp_path / "away")]) == 0  # where it has moved
    with np.load(tmp_path / "s.npz") as f, np.load(tmp_path / "m.npz") as g:
        assert np.array_equal(f["images"], g["images"])
    assert api.load(run, data=tmp_path / "away").dataset.at_hand
    for wrong, said in ((tmp_path / "s.npz", "is not a folder"), (tmp_path / "nowhere", "is not a folder"),
                        (tmp_path, "data.json is missing")):
        assert main(["sample", str(run), "--n", "3", "--out", str(tmp_path / "w.npz"), "--data", str(wrong)]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "w.npz").exists()
    assert main(["eval", str(tmp_path / "s.npz"), "--data", str(tmp_path / "away")]) == 2
    assert "a samples file is measured in --features DATA_DIR" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "away"), "--out", str(run), *args, "--set", "train.kimg=0.384"]) == 0
    config_text = (run / "config.toml").read_text()  # resumed on the moved folder, which the run now names
    assert f'path = "{(tmp_path / "away").resolve()}"' in config_text
    assert main(["sample", str(run / "checkpoints" / "step-0000016"), "--n", "3", "--steps", "2",
                 "--out", str(tmp_path / "old.npz")]) == 0  # a checkpoint from before the move
    shutil.rmtree(tmp_path / "away")
    images, labels = squares(160, 32, 3, seed=7)  # the same shape and classes, other images, where the run looks
    write_data_dir(tmp_path / "away", images, labels)
    for argv in (["train", "--data", str(tmp_path / "away"), "--out", str(run), *args, "--set", "train.kimg=0.512"],
                 ["sample", str(run), "--n", "3", "--out", str(tmp_path / "t.npz")],
                 ["sample", str(run), "--n", "3", "--out", str(tmp_path / "t.npz"), "--data", str(tmp_path / "away")]):
        assert main(argv) == 2
        assert "holds another data set than the one this run was trained on" in capsys.readouterr().err
    assert (run / "config.toml").read_text() == config_text and not (tmp_path / "t.npz").exists()
    for key, value in (("sha256", '"abc"'), ("shape", "[3, 32, 31]"), ("cond_shape", "[4]"), ("classes", "1")):
        bad = tmp_path / f"bad-{key}.toml"
        bad.write_text(re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", config_text))
        with pytest.raises(UserError, match=rf"^data\.{key} does not describe a prepared data set"):
            load_config(None, bad)


def test_prepare_trains_the_feature_net_and_every_fd_is_named_for_the_data_set(tmp_path, capsys):
    """data prepare -> features -> train with the in-training FD -> eval: FD-<name>, never FID."""
    images, labels = squares(200, 16, 3, seed=2)
    np.savez(tmp_path / "sq.npz", images=images, labels=labels)
    data_dir = tmp_path / "data"
    assert main(["data", "prepare", str(tmp_path / "sq.npz"), "--out", str(data_dir), "--name", "sq",
                 "--heldout", "0.25", "--feature-kimg", "1", "--device", "cpu"]) == 0
    meta = json.loads((data_dir / "features.json").read_text())
    assert meta["method"] == "classifier" and meta["outputs"] == 3
    run = tmp_path / "run"
    fd = [k.replace("train.fd_kimg=0", "train.fd_kimg=0.256") for k in TINY] + ["train.fd_n=20", "train.fd_steps=2"]
    api.train(None, run, fd, data=data_dir, device="cpu", log=lambda *a: None)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "fd" and np.isfinite(e["fd"])]
    capsys.readouterr()
    assert main(["eval", str(run), "--n", "12", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("FD-sq ") and "FID" not in out and "class accuracy" in out


def test_rows_are_read_from_the_file_exactly_as_numpy_indexes_them(rgb32):
    from diffuse.data import read_rows

    images = np.load(rgb32 / "images.npy", mmap_mode="r")
    rows = np.array([7, 3, 149, 0, 3])
    assert np.array_equal(read_rows(images, rows), images[rows])
    assert np.array_equal(read_rows(images[10:], rows), images[10:][rows])  # a view: numpy's own indexing


def test_edm2_trains_and_dmd2_distills_on_colour_images(tmp_path, rgb32):
    """The EDM2 preset's MP U-Net and the DMD2 student on a prepared colour data set: 3 channels out."""
    quiet = lambda *a: None  # noqa: E731
    edm2 = [k for k in TINY if not k.startswith("sample.")] + ["train.ema_snapshot_kimg=0.128", "sample.steps=2"]
    teacher = api.train("fmnist-edm2-tiny", tmp_path / "edm2", edm2, data=rgb32, device="cpu", log=quiet)
    assert api.load(teacher).sample(3, seed=0).images.shape == (3, 32, 32, 3)
    student = api.distill(teacher, tmp_path / "student", "dmd2",
                          ["train.kimg=0.064", "train.batch=16", "train.log_kimg=0.032", "train.grid_kimg=0.064",
                           "train.checkpoint_kimg=0.064", "train.fd_kimg=0", "train.threads=1", "distill.pairs=16",
                           "distill.pair_steps=2"], device="cpu", log=quiet)
    samples = api.load(student).sample(3, labels=[1, 2, 0], seed=0)
    assert samples.images.shape == (3, 32, 32, 3) and samples.labels.tolist() == [1, 2, 0]
