"""`diffuse data prepare` on sources the tests write: exact pixels, labels, vectors, conditions, the
held-out split and data.json's fields, each checked against numpy, hashlib or PIL computed here."""

import csv
import gzip
import hashlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from diffuse.files import NpyRows, npy_chunks
from diffuse.prepared import verify_prepared
from diffuse.preparing import PrepareOptions, prepare

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array, mode).save(path)


def run(sources, out, **options):
    return prepare([str(s) for s in sources], out, PrepareOptions(**options), log=lambda *a: None)


def check_common(p, images):
    """Pixels, mean/std against numpy, SHA-256 against hashlib, a heldout disjoint from the training split."""
    np.testing.assert_array_equal(p.images, images)
    x = images.astype(np.float64) / 255
    assert p.meta["mean"] == pytest.approx(x.mean(), abs=1e-12) and p.meta["std"] == pytest.approx(x.std(), abs=1e-12)
    for name, entry in p.meta["files"].items():
        data = (p.path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert set(p.meta["files"]) == {f.name for f in p.path.glob("*.npy")}
    assert len(np.intersect1d(p.heldout, p.train_index)) == 0 and len(p.heldout) + len(p.train_index) == len(images)
    assert (p.path / "preview.png").is_file()
    assert sorted(f.name for f in p.path.parent.iterdir() if f.name.startswith(".")) == []  # no hidden copies
    verify_prepared(p.path)


def test_plain_folder_rgb_nested_hidden_ignored(tmp_path):
    imgs = rand(6, 16, 16, 3)
    for i, im in enumerate(imgs):
        save(tmp_path / "src" / ("deep/" if i % 2 else "") / f"{i}.png", im)
    save(tmp_path / "src" / ".hidden.png", rand(16, 16, 3))
    save(tmp_path / "src" / ".ipynb_checkpoints" / "x.png", rand(16, 16, 3))
    (tmp_path / "src" / "notes.txt").write_text("ignored")
    p = run([tmp_path / "src"], tmp_path / "out")
    order = sorted([f"deep/{i}.png" if i % 2 else f"{i}.png" for i in range(6)])
    expect = np.stack([imgs[int(r.split("/")[-1][0])] for r in order])
    check_common(p, expect)
    m = p.meta
    assert (m["source_kind"], m["condition"], m["count"], m["resolution"], m["channels"]) == ("folder", "none", 6, 16, 3)
    assert m["classes"] is None and p.labels is None and p.num_classes == 0 and m["name"] == "src"
    assert m["heldout"] == 1 and m["source"] == str((tmp_path / "src").resolve())


def test_class_folders_gray(tmp_path):
    imgs = rand(6, 16, 16)
    for i, im in enumerate(imgs):
        save(tmp_path / "src" / ["cat", "dog"][i % 2] / f"{i}.png", im)
    p = run([tmp_path / "src"], tmp_path / "out", heldout=0.5, seed=3)
    check_common(p, imgs[[0, 2, 4, 1, 3, 5]][..., None])
    assert p.meta["classes"] == ["cat", "dog"] and p.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert p.meta["class_counts"] == [3, 3] and p.num_classes == 2 and p.channels == 1 and len(p.heldout) == 3


def test_dataset_json_labels_and_csv_vectors(tmp_path):
    imgs = rand(4, 16, 16, 3)
    for i, im in enumerate(imgs):
        save(tmp_path / "a" / f"{i}.png", im)
        save(tmp_path / "b" / f"{i}.png", im)
    (tmp_path / "a" / "dataset.json").write_text(json.dumps({"labels": [[f"{i}.png", [0, 2, 1, 2][i]] for i in range(4)]}))
    p = run([tmp_path / "a"], tmp_path / "outa")
    assert p.labels.tolist() == [0, 2, 1, 2] and p.meta["classes"] == ["0", "1", "2"] and p.condition == "label"
    vec = RNG.normal(size=(4, 3)).astype(np.float32)
    with open(tmp_path / "b" / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "x", "y", "z"])
        w.writerows([[f"{i}.png", *map(repr, vec[i].tolist())] for i in range(4)])
    p = run([tmp_path / "b"], tmp_path / "outb")
    check_common(p, imgs)
    assert p.condition == "vector" and p.meta["vector_dim"] == 3 and p.meta["source_kind"] == "label-file"
    np.testing.assert_array_equal(p.vectors, vec)


def test_csv_integer_labels_without_header(tmp_path):
    for i in range(4):
        save(tmp_path / "a" / f"{i}.png", rand(16, 16, 3))
    (tmp_path / "a" / "labels.csv").write_text("".join(f"{i}.png,{i % 2}\n" for i in range(4)))
    p = run([tmp_path / "a"], tmp_path / "out")
    assert p.labels.tolist() == [0, 1, 0, 1] and p.meta["class_counts"] == [2, 2]


def test_paired_folders(tmp_path):
    cond, target = rand(4, 16, 16), rand(4, 32, 32, 3)
    for i in range(4):
        save(tmp_path / "low" / f"{i}.png", cond[i])
        save(tmp_path / "high" / f"{i}.jpg" if False else tmp_path / "high" / f"{i}.png", target[i])
    p = run([tmp_path / "low", tmp_path / "high"], tmp_path / "out", cond_resolution=16)
    check_common(p, target)
    np.testing.assert_array_equal(p.conditions, cond[..., None])
    m = p.meta
    assert (m["condition"], m["source_kind"], m["cond_resolution"], m["cond_channels"]) == ("image", "paired", 16, 1)


def cifar_tarball(path, kind, train, test, names):
    """A tarball laid out as the official python one: pickled dicts with bytes keys and numpy rows."""
    label_key, names_key = (b"labels", b"label_names") if kind == 10 else (b"fine_labels", b"fine_label_names")
    folder = "cifar-10-batches-py" if kind == 10 else "cifar-100-python"
    batches = ({f"data_batch_{i + 1}": train[i] for i in range(5)} | {"test_batch": test}) if kind == 10 else \
        {"train": train, "test": test}
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (x, y) in batches.items():
            add(name, {b"batch_label": b"x", b"data": x, label_key: y, b"filenames": [b"a"] * len(y)})
        add("batches.meta" if kind == 10 else "meta", {names_key: [n.encode() for n in names]})


def test_cifar10_test_rows_are_the_heldout_split(tmp_path):
    xs = [rand(2, 3072) for _ in range(6)]
    ys = [[i % 10, (i + 1) % 10] for i in range(6)]
    names = [f"class{i}" for i in range(10)]
    cifar_tarball(tmp_path / "cifar-10-python.tar.gz", 10, list(zip(xs[:5], ys[:5])), (xs[5], ys[5]), names)
    p = run([tmp_path / "cifar-10-python.tar.gz"], tmp_path / "out")
    expect = np.concatenate(xs).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    check_common(p, expect)
    assert p.labels.tolist() == sum(ys, []) and p.meta["classes"] == names and p.heldout.tolist() == [10, 11]
    assert p.meta["source_kind"] == "cifar10" and p.meta["name"] == "cifar-10-python"


def test_cifar100_fine_labels(tmp_path):
    x, xt = rand(3, 3072), rand(2, 3072)
    names = [f"f{i}" for i in range(100)]
    cifar_tarball(tmp_path / "c.tar.gz", 100, (x, [5, 99, 0]), (xt, [7, 8]), names)
    p = run([tmp_path / "c.tar.gz"], tmp_path / "out", resolution=16)
    assert p.labels.tolist() == [5, 99, 0, 7, 8] and p.num_classes == 100 and p.heldout.tolist() == [3, 4]
    assert p.images.shape == (5, 16, 16, 3) and p.meta["source_kind"] == "cifar100"


def idx_file(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_idx_folder_with_t10k(tmp_path):
    x, y, xt, yt = rand(5, 28, 28), np.array([0, 1, 2, 9, 3], np.uint8), rand(2, 28, 28), np.array([4, 5], np.uint8)
    for name, a in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y), ("t10k-images-idx3-ubyte", xt),
                    ("t10k-labels-idx1-ubyte", yt)):
        idx_file(tmp_path / f"{name}.gz", a)
    p = run([tmp_path], tmp_path / "out")
    check_common(p, np.concatenate([x, xt])[..., None])
    assert p.labels.tolist() == [0, 1, 2, 9, 3, 4, 5] and p.meta["classes"] == [str(i) for i in range(10)]
    assert p.heldout.tolist() == [5, 6] and p.meta["source_kind"] == "idx"


def test_npy_and_npz(tmp_path):
    x = rand(5, 16, 16, 3)
    np.save(tmp_path / "x.npy", x)
    check_common(run([tmp_path / "x.npy"], tmp_path / "o1"), x)
    labels = np.array([0, 1, 1, 0, 2])
    np.savez(tmp_path / "l.npz", images=x, labels=labels)
    p = run([tmp_path / "l.npz"], tmp_path / "o2")
    assert p.labels.tolist() == labels.tolist() and p.meta["class_counts"] == [2, 2, 1]
    vec = RNG.normal(size=(5, 2))
    np.savez_compressed(tmp_path / "v.npz", images=x[..., :1], vectors=vec)
    p = run([tmp_path / "v.npz"], tmp_path / "o3")
    check_common(p, x[..., :1])
    np.testing.assert_array_equal(p.vectors, vec.astype(np.float32))
    c = rand(5, 16, 16, 1)
    np.savez(tmp_path / "c.npz", images=x, conditions=c)
    p = run([tmp_path / "c.npz"], tmp_path / "o4")
    np.testing.assert_array_equal(p.conditions, c)
    assert p.meta["cond_channels"] == 1 and p.condition == "image"


def test_npy_rows_and_chunks_without_a_memory_map(tmp_path):
    """Rows appended to a file opened for more (skipped images) read back with numpy, in any chunking."""
    x = rand(7, 16, 16, 3)
    with NpyRows(tmp_path / "a.npy", 10 ** 9, (16, 16, 3)) as rows:  # a 10-digit count, then a 1-digit one
        for row in x:
            rows.append(row)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), x)
    for chunk_bytes in (1, 16 * 16 * 3 * 3, 1 << 20):
        np.testing.assert_array_equal(np.concatenate(list(npy_chunks(tmp_path / "a.npy", chunk_bytes))), x)
    with pytest.raises(ValueError):
        with NpyRows(tmp_path / "b.npy", 2, (16, 16, 3)) as rows:
            rows.append(x[0, :8])


def test_resize_center_crop_and_crop_refuse(tmp_path):
    im = rand(32, 40, 3)  # 40 wide, 32 high
    for i in range(2):
        save(tmp_path / "src" / f"{i}.png", im)
    p = run([tmp_path / "src"], tmp_path / "out", resolution=16)
    expect = np.asarray(Image.fromarray(im).resize((20, 16), Image.LANCZOS).crop((2, 0, 18, 16)))
    assert p.images.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(p.images[0], expect)


def test_modes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8] = [10, 20, 30, 255]  # opaque top half, transparent bottom half
    Image.fromarray(rgba, "RGBA").save(src / "a.png")
    pal = Image.fromarray(rand(16, 16, 3)).convert("P", palette=Image.ADAPTIVE)
    pal.save(src / "b.png")
    Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)).save(src / "c.png")  # 16-bit grey
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    cmyk.save(src / "d.jpg")
    gray = rand(16, 16)
    Image.fromarray(gray).save(src / "e.png")
    p = run([src], tmp_path / "out")
    assert p.channels == 3 and Image.open(src / "c.png").mode.startswith("I")
    assert (p.images[0, :8] == [10, 20, 30]).all() and (p.images[0, 8:] == 255).all()
    np.testing.assert_array_equal(p.images[1], np.asarray(Image.open(src / "b.png").convert("RGB")))
    np.testing.assert_array_equal(p.images[2, ..., 0], np.arange(256).reshape(16, 16))
    np.testing.assert_array_equal(p.images[2, ..., 0], p.images[2, ..., 2])
    np.testing.assert_array_equal(p.images[3], np.asarray(Image.open(src / "d.jpg").convert("RGB")))
    assert (np.abs(p.images[3].astype(int) - [255, 0, 0]) < 8).all()
    np.testing.assert_array_equal(p.images[4], np.repeat(gray[..., None], 3, axis=2))
    p1 = run([src], tmp_path / "out1", channels=1)
    np.testing.assert_array_equal(p1.images[1, ..., 0], np.asarray(Image.open(src / "b.png").convert("RGB").convert("L")))


def test_limit_skipped_and_replacing_a_data_dir(tmp_path):
    imgs = rand(6, 16, 16, 3)
    for i in range(6):
        save(tmp_path / "src" / f"{i}.png", imgs[i])
    (tmp_path / "src" / "6.png").write_bytes(b"not a png")
    data = (tmp_path / "src" / "0.png").read_bytes()
    (tmp_path / "src" / "7.png").write_bytes(data[: len(data) // 2])  # truncated: fails only when decoded
    out = tmp_path / "out"
    p = run([tmp_path / "src"], out, limit=4)
    check_common(p, imgs[:4])
    p = run([tmp_path / "src"], out)  # replaces the older DATA_DIR
    check_common(p, imgs)
    assert sorted(s["file"] for s in p.meta["skipped"]) == ["6.png", "7.png"]


def test_hf_save_to_disk_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = rand(4, 16, 16, 3)
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["u", "v"])})
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(i) for i in imgs], "y": [1, 0, 1, 0]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for src in ("hf", "d.parquet"):
        p = run([tmp_path / src], tmp_path / f"out-{src}")
        check_common(p, imgs)
        assert p.labels.tolist() == [1, 0, 1, 0] and p.meta["classes"] == ["u", "v"] and p.meta["source_kind"] == "hf"
