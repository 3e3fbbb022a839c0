"""Bad input to `diffuse data prepare` and `diffuse data verify`, through the real CLI: exit code 2,
one sentence on stderr, no traceback, --out untouched; and a property-based sweep over damaged DATA_DIRs."""

import contextlib
import errno
import io
import json
import pickle
import re
import shutil
import string
import sys
import tarfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from diffuse.cli import main
from diffuse.config import _toml_value, load_config, read_config, to_toml
from diffuse.data import RECORD, described
from diffuse.errors import UserError
from diffuse.files import NpyRows
from diffuse.nets import build_denoiser
from diffuse.prepared import open_prepared
from test_prepare import cifar_tarball, rand, save


def cli(argv):
    """diffuse ARGV in-process: (exit code, stderr, stdout); `data prepare` without its feature net."""
    argv = [*argv, "--feature-kimg", "0"] if argv[:2] == ["data", "prepare"] else argv
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, err.getvalue(), out.getvalue()


def refused(argv, out=None):
    code, err, _ = cli(argv)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1 and err.startswith("diffuse: "), err
    if out is not None:
        assert not out.exists()
    return err


def folder(tmp_path, n=4, size=(16, 16), name="src"):
    for i in range(n):
        save(tmp_path / name / f"{i}.png", rand(size[1], size[0], 3))
    return tmp_path / name


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    base = tmp_path_factory.mktemp("good")
    for i in range(6):
        save(base / "src" / "ab"[i % 2] / f"{i}.png", rand(16, 16, 3))
    assert cli(["data", "prepare", base / "src", "--out", base / "data"])[0] == 0
    return base / "data"


def copy(good, tmp_path):
    shutil.copytree(good, tmp_path / "d")
    return tmp_path / "d"


def test_refused_folders(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    assert "holds no image files" in refused(["data", "prepare", tmp_path / "empty", "--out", out], out)
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.png").write_bytes(b"nope")
    refused(["data", "prepare", tmp_path / "bad", "--out", out], out)
    folder(tmp_path, 2, name="half")
    for i in range(3):
        (tmp_path / "half" / f"x{i}.png").write_bytes(b"nope")
    assert "could not be read" in refused(["data", "prepare", tmp_path / "half", "--out", out], out)
    save(tmp_path / "mixed" / "a.png", rand(16, 16, 3))
    save(tmp_path / "mixed" / "b.png", rand(20, 16, 3))
    assert "--resolution" in refused(["data", "prepare", tmp_path / "mixed", "--out", out], out)
    refused(["data", "prepare", tmp_path / "mixed", "--out", out, "--resolution", "16", "--crop", "refuse"], out)
    folder(tmp_path / "one", 3, name="only")
    assert "one class folder" in refused(["data", "prepare", tmp_path / "one", "--out", out], out)
    for r in ("8", "512"):
        refused(["data", "prepare", folder(tmp_path, name="ok"), "--out", out, "--resolution", r], out)
    folder(tmp_path, 2, size=(4, 4), name="tiny")
    assert "upscale" in refused(["data", "prepare", tmp_path / "tiny", "--out", out, "--resolution", "64"], out)
    refused(["data", "prepare", tmp_path / "nowhere", "--out", out], out)


def test_a_few_corrupt_files_are_skipped_and_reported(tmp_path):
    src = folder(tmp_path, 4)
    (src / "z.png").write_bytes(b"broken")
    code, err, stdout = cli(["data", "prepare", src, "--out", tmp_path / "out"])
    assert code == 0 and err == "" and "skipped 1 of 5" in stdout and "z.png" in stdout
    assert json.loads((tmp_path / "out" / "data.json").read_text())["skipped"][0]["file"] == "z.png"


@pytest.mark.parametrize("text, words", [
    ('{"labels": [["0.png", 0], ["1.png", 1], ["2.png", 0], ["3.png", 1], ["9.png", 0]]}', "not an image file"),
    ('{"labels": [["0.png", 0], ["1.png", 1], ["2.png", 0]]}', "has no label"),
    ('{"labels": [["0.png", 1], ["1.png", 1], ["2.png", 1], ["3.png", 1]]}', "single class"),
    ('{"labels": [["0.png", 0], ["1.png", -1], ["2.png", 0], ["3.png", 1]]}', "negative"),
    ('{"labels": [["0.png", 0], ["1.png", 1.5], ["2.png", 0], ["3.png", 1]]}', "mixes"),
    ('{"labels": [["0.png", 0], ["1.png", 100000], ["2.png", 0], ["3.png", 1]]}', "100000"),
    ('{"labels": [["0.png", [1, 2]], ["1.png", [1]], ["2.png", [0, 0]], ["3.png", [1, 1]]]}', "lengths"),
    ('{"labels": [["0.png", [1, NaN]], ["1.png", [1, 0]], ["2.png", [0, 0]], ["3.png", [1, 1]]]}', "finite"),
    ('{"labels": [["../0.png", 0]]}', "inside"),
    ('{"labels": ', "JSON"),
])
def test_bad_label_files(tmp_path, text, words):
    src = folder(tmp_path)
    (src / "dataset.json").write_text(text)
    assert words in refused(["data", "prepare", src, "--out", tmp_path / "out"], tmp_path / "out")


def test_unpaired_files(tmp_path):
    a, b = folder(tmp_path, 3, name="a"), folder(tmp_path, 3, name="b")
    (a / "0.png").rename(a / "x.png")
    err = refused(["data", "prepare", a, b, "--out", tmp_path / "out"], tmp_path / "out")
    assert "1 images in" in err and "x.png" in err and "0.png" in err


def test_a_malicious_cifar_pickle_is_refused_and_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))
    (tmp_path / "victim").mkdir()
    x = [(rand(2, 3072), [0, 1]) for _ in range(5)]
    cifar_tarball(tmp_path / "c.tar.gz", 10, x, (rand(2, 3072), [0, 1]), [str(i) for i in range(10)])
    with tarfile.open(tmp_path / "c.tar.gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        for m, data in members:
            if m.name.endswith("test_batch"):
                data = pickle.dumps({b"data": Evil()}, protocol=2)
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    err = refused(["data", "prepare", tmp_path / "evil.tar.gz", "--out", tmp_path / "out"], tmp_path / "out")
    assert "shutil.rmtree" in err and (tmp_path / "victim").is_dir()


def test_an_npz_with_a_lying_header(tmp_path):
    big = io.BytesIO()  # a header that claims 10^9 images, then 100 bytes
    np.lib.format.write_array_header_1_0(big, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 16, 16, 3)})
    (tmp_path / "lie.npy").write_bytes(big.getvalue() + bytes(100))
    refused(["data", "prepare", tmp_path / "lie.npy", "--out", tmp_path / "out"], tmp_path / "out")
    import zipfile
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as z:
        z.writestr("images.npy", (tmp_path / "lie.npy").read_bytes())
    assert "claims" in refused(["data", "prepare", tmp_path / "lie.npz", "--out", tmp_path / "out"], tmp_path / "out")


def test_hf_without_datasets_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    assert "pip install -e '.[hf]'" in refused(["data", "prepare", tmp_path / "d.parquet", "--out", tmp_path / "o"])


def test_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    src = folder(tmp_path)

    def full(self, row):  # the disk fills up while the rows are written
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(NpyRows, "append", full)
    assert "No space left" in refused(["data", "prepare", src, "--out", tmp_path / "out"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_out_that_is_a_users_folder_or_a_file_is_left_untouched(tmp_path):
    src = folder(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    refused(["data", "prepare", src, "--out", mine])
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    (tmp_path / "f").write_text("a file")
    refused(["data", "prepare", src, "--out", tmp_path / "f"])
    assert (tmp_path / "f").read_text() == "a file"
    (tmp_path / "emptyout").mkdir()
    assert cli(["data", "prepare", src, "--out", tmp_path / "emptyout"])[0] == 0


@pytest.mark.parametrize("key, value", [
    ("format", "other"), ("version", 2), ("count", 1), ("count", True), ("resolution", 8), ("channels", 2),
    ("condition", "text"), ("classes", ["a"]), ("class_counts", [3, 4]), ("vector_dim", 3), ("heldout", 0),
    ("heldout", 6), ("seed", -1), ("mean", float("nan")), ("std", 0.9), ("files", {}), ("skipped", [1]),
    ("options", []), ("name", ""), ("source_kind", "zip"), ("cond_resolution", 16), ("cond_channels", 1),
])
def test_tampered_data_json_fields(good, tmp_path, key, value):
    d = copy(good, tmp_path)
    meta = json.loads((d / "data.json").read_text())
    meta[key] = value
    (d / "data.json").write_text(json.dumps(meta))
    assert key in refused(["data", "verify", d])


def test_damaged_data_dirs(good, tmp_path):
    d = copy(good, tmp_path)
    (d / "data.json").write_bytes(b"\xff\xfe")
    assert "UTF-8" in refused(["data", "verify", d])
    (d / "data.json").write_bytes(b" " * (1 << 20) + b"{}")
    assert "1 MB" in refused(["data", "verify", d])
    d = copy(good, tmp_path / "a")
    np.save(d / "labels.npy", np.zeros(5, np.int64))
    assert "labels.npy" in refused(["data", "verify", d])
    d = copy(good, tmp_path / "b")
    (d / "images.npy").write_bytes((d / "images.npy").read_bytes()[:-10])
    assert "truncated" in refused(["data", "verify", d])
    d = copy(good, tmp_path / "c")
    (d / "link.npy").symlink_to(d / "images.npy")
    assert "link" in refused(["data", "verify", d])
    d = copy(good, tmp_path / "e")
    labels = np.load(d / "labels.npy")
    labels[0] = 7
    np.save(d / "labels.npy", labels)
    assert "outside" in refused(["data", "verify", d])
    d = copy(good, tmp_path / "f")
    np.save(d / "heldout.npy", np.array([5], np.int64)[::-1] * 0 + 9)
    assert "heldout.npy" in refused(["data", "verify", d])
    d = copy(good, tmp_path / "g")
    data = bytearray((d / "images.npy").read_bytes())
    data[-1] ^= 1
    (d / "images.npy").write_bytes(bytes(data))
    open_prepared(d)  # cheap: the images are not read
    assert "SHA-256" in refused(["data", "verify", d])
    refused(["data", "verify", tmp_path / "missing"])


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(string.printable, max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
                    max_leaves=6)
FIELDS = ["format", "version", "name", "source", "source_kind", "count", "resolution", "channels", "condition",
          "classes", "class_counts", "vector_dim", "cond_resolution", "cond_channels", "heldout", "seed", "mean",
          "std", "files", "skipped", "options"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(target=st.sampled_from(["data.json", "images.npy", "labels.npy", "heldout.npy"]),
       how=st.sampled_from(["flip", "truncate", "field"]), where=st.floats(0, 1), value=JSON,
       key=st.sampled_from(FIELDS), bit=st.integers(0, 7))
# A flipped bit in heldout.npy's header that ends its dict literal early (numpy raised tokenize.TokenError).
@example(target="heldout.npy", how="flip", where=0.46875, value=None, key="format", bit=0)
def test_damaged_data_dir_sweep(good, tmp_path_factory, target, how, where, value, key, bit):
    d = tmp_path_factory.mktemp("sweep") / "d"
    shutil.copytree(good, d)
    path = d / target
    data = bytearray(path.read_bytes())
    i = min(int(where * len(data)), len(data) - 1)
    if how == "flip":
        data[i] ^= 1 << bit
    elif how == "truncate":
        data = data[:i]
    elif target == "data.json":
        meta = json.loads(data)
        meta[key] = value
        data = bytearray(json.dumps(meta).encode())
    path.write_bytes(bytes(data))
    try:
        open_prepared(d)
    except UserError as e:
        assert "\n" not in str(e) and str(e).endswith(".")


RECORD_VALUES = (st.integers(-2**70, 2**70) | st.booleans() | st.floats() | st.text(string.printable, max_size=70)
                 | st.lists(st.integers(-300, 5000), max_size=4) | st.sampled_from(["label", "vector", "image", "none"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(RECORD), value=RECORD_VALUES, gone=st.booleans())
@example(key="condition", value="none", gone=True)  # loads: another condition the net then takes
@example(key="shape", value=[3, 256, 256], gone=True)
@example(key="shape", value=[1, 16, 16], gone=False)  # not the folder's: refused
def test_a_damaged_record_of_the_data_dir_is_one_sentence(good, tmp_path, key, value, gone):
    """A run's config.toml whose record of its DATA_DIR (data.shape, ...) is altered, with the folder there or
    gone: it loads only where the record still describes a data set (the folder's own, where it is there), and
    the net it describes then builds; anything else is one sentence."""
    config = load_config("fmnist", overrides=["data.name='prepared'", f"data.path={str(good)!r}", "train.fd_kimg=0"])
    config.data = described(config.data)
    if gone:
        config.data.path = str(tmp_path / "gone")
    text = re.sub(rf"(?m)^{key} = .*$", lambda _: f"{key} = {_toml_value(value)}", to_toml(config), count=1)
    (tmp_path / "config.toml").write_text(text)
    try:
        loaded = read_config(tmp_path / "config.toml")
    except UserError as e:
        assert "\n" not in str(e) and str(e).endswith("."), e
        return
    assert gone or getattr(loaded.data, key) == getattr(config.data, key)
    try:
        build_denoiser(loaded)
    except UserError as e:  # a net too large to build is refused before anything is allocated
        assert "\n" not in str(e), e
