"""A hypothesis sweep over every file the tool reads from a run or a samples file: a valid file is damaged
(bytes flipped, truncated, JSON fields replaced by random JSON, huge ints, NaN, deep nesting), the real
command runs in-process, and each run ends in success or exit 2 with one line, within a time bound, with
the run's other files intact (SHA-256 before and after)."""

import contextlib
import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffuse.cli import main
from diffuse.training import train

SWEEP = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
BOUND = 60.0  # seconds any one command may take on a damaged file of the tiny run
CHECKPOINT = "checkpoints/step-0000016"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from conftest import tiny_config
    root = tmp_path_factory.mktemp("sweep")
    run = train(tiny_config("train.probe_kimg=0"), root / "run", log=lambda *a: None)
    assert main(["sample", str(run), "--n", "3", "--steps", "1", "--out", str(root / "s.npz")]) == 0
    return root


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.just(10**400),
                                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=8)


def json_text(value) -> str:
    return json.dumps(value, allow_nan=True) if not isinstance(value, int) or abs(value) < 10**300 else str(value)


@st.composite
def damage(draw, kind_json: bool):
    """A function bytes -> damaged bytes."""
    kinds = ["flip", "truncate", "nest"] + (["field", "replace"] if kind_json else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "flip":
        spots = draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))

        def flip(data):
            data = bytearray(data)
            for where, mask in spots:
                data[int(where * len(data))] ^= mask
            return bytes(data)
        return flip
    if kind == "truncate":
        keep = draw(st.floats(0, 1, exclude_max=True))
        return lambda data: data[:int(keep * len(data))]
    if kind == "nest":
        depth = draw(st.sampled_from([100, 10_000, 200_000]))
        return lambda data: ("[" * depth + "]" * depth).encode() if not kind_json else \
            ('{"a": ' + "[" * depth + "]" * depth + "}").encode()
    value = draw(JSON_VALUES)
    if kind == "replace":
        return lambda data: json_text(value).encode()
    key_pick = draw(st.floats(0, 1, exclude_max=True))

    def field(data):
        doc = json.loads(data)
        if isinstance(doc, dict) and doc:
            keys = sorted(doc)
            doc[keys[int(key_pick * len(keys))]] = value
        return json.dumps(doc, allow_nan=True).encode()
    return field


def remanifest(checkpoint: Path) -> None:
    manifest = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
                for p in sorted(checkpoint.iterdir()) if p.name != "manifest.json" and p.is_file()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def digests(root: Path, skip: set[str]) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and str(p.relative_to(root)) not in skip}


def run_damaged(pristine: Path, tmp: Path, target: str, change, argv, agree: bool = False, changes=()) -> None:
    """Copy the run and samples, damage `target` (re-manifested where agree), run argv; check the contract."""
    root = tmp / f"case-{time.perf_counter_ns()}"
    shutil.copytree(pristine, root)
    path = root / target
    path.write_bytes(change(path.read_bytes()))
    if agree:
        remanifest(path.parent)
    before = digests(root, {target, *changes})
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([a.format(root=root) for a in argv])
    seconds = time.perf_counter() - start
    err = err.getvalue()
    assert seconds < BOUND, (target, seconds)
    assert code in (0, 2), (target, code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("diffuse: "), err
    after = digests(root, {target, *changes})
    assert {k: v for k, v in after.items() if k in before} == before, target  # nothing earlier was changed
    shutil.rmtree(root)


SAMPLE = ["sample", "{root}/run", "--n", "2", "--steps", "1", "--out", "{root}/new.npz"]


@pytest.mark.parametrize("name, agree", [("manifest.json", False), ("state.json", True), ("state.json", False),
                                         ("config.toml", True), ("ema.safetensors", True), ("model.safetensors", False)])
@SWEEP
@given(data=st.data())
def test_damaged_checkpoint_files(pristine, tmp_path, name, agree, data):
    change = data.draw(damage(kind_json=name.endswith(".json")))
    run_damaged(pristine, tmp_path, f"run/{CHECKPOINT}/{name}", change, SAMPLE, agree,
                changes={f"run/{CHECKPOINT}/manifest.json"})


@SWEEP
@given(data=st.data())
def test_damaged_run_config(pristine, tmp_path, data):
    change = data.draw(damage(kind_json=False))
    run_damaged(pristine, tmp_path, "run/config.toml", change, SAMPLE)


@SWEEP
@given(data=st.data())
def test_damaged_samples_file(pristine, tmp_path, data):
    change = data.draw(damage(kind_json=False))
    run_damaged(pristine, tmp_path, "s.npz", change, ["eval", "{root}/s.npz", "--json"])


@SWEEP
@given(data=st.data())
def test_damaged_metrics_on_resume(pristine, tmp_path, data):
    """train resumes a finished run: it reads metrics.jsonl (trimming what it does not understand) and
    must leave the checkpoints whole."""
    lines = st.lists(st.one_of(JSON_VALUES.map(json_text), st.text(max_size=20)), max_size=4)
    extra = data.draw(lines)
    change = data.draw(damage(kind_json=False))
    argv = ["train", "--preset", "fmnist-tiny", "--out", "{root}/run", "--set", "model.channels=[8, 16]",
            "--set", "model.emb_dim=32", "--set", "train.kimg=0.256", "--set", "train.batch=16",
            "--set", "train.log_kimg=0.064", "--set", "train.grid_kimg=0.256", "--set", "train.checkpoint_kimg=0.128",
            "--set", "train.fd_kimg=0", "--set", "sample.steps=4", "--set", "train.probe_kimg=0"]
    run_damaged(pristine, tmp_path, "run/metrics.jsonl",
                lambda data: change(data) + "".join(line.replace("\n", " ") + "\n" for line in extra).encode(), argv,
                changes={"run/report.html", "run/config.toml"})


@SWEEP
@given(data=st.data())
def test_damaged_doctor_json_in_the_report(pristine, tmp_path, data):
    """The report reads RUN_DIR/doctor.json; a damaged one must not stop `ema`'s or `doctor`'s neighbours:
    here the reader is the report, rebuilt by a resumed train."""
    from diffuse.report import write_report
    root = tmp_path / f"case-{time.perf_counter_ns()}"
    shutil.copytree(pristine / "run", root)
    (root / "doctor.json").write_bytes(data.draw(damage(kind_json=True))(b'{"label": "x", "checks": []}'))
    before = digests(root, {"report.html", "doctor.json"})
    write_report(root)  # must not raise
    assert digests(root, {"report.html", "doctor.json"}) == before
    shutil.rmtree(root)
