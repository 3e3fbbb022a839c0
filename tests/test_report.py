"""report.html: plot coordinates computed by hand, every grid linked, failed checks marked, text
escaped, and the page as headless Chromium renders it (images and plots loaded, or a missing one named)."""

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from diffuse.config import to_toml
from diffuse.images import save_grid
from diffuse.report import BOTTOM, HEIGHT, LEFT, RIGHT, TOP, WIDTH, axis, write_report

W, H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM  # the plot area inside the margins
ATTACK = '<script>alert("x")</script> & more'


def train_event(i):
    """Train event i = 1..40 at kimg 0.5 i: loss 0.1 sqrt(10 / kimg), within [0.07, 0.45]; lr warms up over 5 kimg."""
    kimg = 0.5 * i
    return {"event": "train", "step": 16 * i, "kimg": kimg, "lr": 1e-3 * min(kimg / 5, 1.0),
            "loss": 0.1 * math.sqrt(10 / kimg), "grad_norm": 0.5, "img_per_s": 1234.0, "train_seconds": 0.5}


@pytest.fixture
def run_dir(tmp_path, tiny):
    """A run at 20 of 20 kimg: 40 train events (the last with loss inf), 10 probe and 10 FD events (FD NaN
    at 18 kimg, accuracy null at 20), an unknown kind, junk lines, a torn last line, two grids, a doctor.json
    with two failures (one a string "true")."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(tiny("train.kimg=20")))
    events = [train_event(i) for i in range(1, 41)]
    events[-1]["loss"] = math.inf
    for j in range(1, 11):
        events.append({"event": "probe", "step": j, "kimg": 2.0 * j, "accuracy": 0.6 + 0.02 * j, "baseline": 0.5,
                       "seconds": 1.0})
        events.append({"event": "fd", "step": j, "kimg": 2.0 * j, "fd": 200.0 / j, "accuracy": 0.08 * j, "n": 1000,
                       "steps": 10, "seconds": 2.0})
    events[-3]["fd"], events[-1]["accuracy"] = math.nan, None  # at 18 and 20 kimg
    events.append({"event": "distill", "kimg": 3.0, "loss": 9.0})
    junk = ["", "[1, 2]", "not json", '{"event": ["train"]}', '{"kimg": 1}', "[" * 100_000,
            '{"event": "fd", "kimg": 1e999, "fd": ' + "9" * 400 + "}"]  # inf kimg, an int beyond float
    lines = junk + [json.dumps(e) for e in events]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"event": "train", "step": 656, "kim')
    rng = np.random.default_rng(0)
    for kimg in (10, 20):
        save_grid(run / "samples" / f"grid-{kimg:06d}kimg.png", rng.integers(0, 256, (20, 28, 28, 1), np.uint8), 10)
    (run / "samples" / "grid-000030kimg.png.tmp.png").write_bytes(b"half a png")  # a grid being written
    checks = [{"name": "data scaling", "passed": True, "value": "std 1.00", "expected": "~1", "detail": "fine"},
              {"name": "loss at init", "passed": False, "value": "3.2", "expected": "< 1.5", "detail": ATTACK},
              {"name": "odd", "passed": "true", "value": "", "expected": "", "detail": "not a JSON true"}]
    (run / "doctor.json").write_text(json.dumps({"config": "fmnist-tiny", "checks": checks}))
    (run / "eval.json").write_text(json.dumps({"fd": 12.5, "n": 10000}))
    return run


def plots(page):
    """{plot title: {series name: [(x, y), ...]}} from the page's inline SVG polylines."""
    out = {}
    for title, body in re.findall(r'<svg class="plot" data-title="([^"]*)"(.*?)</svg>', page, re.S):
        out[title] = {name: [tuple(map(float, p.split(","))) for p in points.split()]
                      for name, points in re.findall(r'<polyline data-series="([^"]*)" points="([^"]*)"', body)}
    return out


def test_plots_map_values_to_hand_computed_coordinates(run_dir):
    page = write_report(run_dir).read_text()
    curves = plots(page)
    assert list(curves) == ["Training loss", "Learning rate", "Frechet distance of samples",
                            "Class accuracy of samples", "Linear probe on bottleneck features"]
    loss = curves["Training loss"]
    assert len(loss["loss"]) == 39 and len(loss["grad norm"]) == 40  # the inf loss is left out
    assert len(curves["Learning rate"]["lr"]) == 40
    assert len(curves["Frechet distance of samples"]["FD"]) == 9  # NaN left out
    assert len(curves["Class accuracy of samples"]["class accuracy"]) == 9  # null left out
    assert [len(v) for v in curves["Linear probe on bottleneck features"].values()] == [10, 10]
    # x axis 0..20 kimg; the log loss axis spans the decades 0.01..1 (losses 0.07..0.45, grad norm 0.5)
    assert loss["loss"][19] == pytest.approx((LEFT + W * 10 / 20, TOP + H * 1 / 2), abs=0.01)  # (10 kimg, 0.1)
    assert loss["loss"][4] == pytest.approx((LEFT + W * 2.5 / 20, TOP + H * -math.log10(0.2) / 2), abs=0.01)
    # linear lr axis 0..0.001: (2.5 kimg, 5e-4) at half height, (5 kimg, 1e-3) at the top
    lr = curves["Learning rate"]["lr"]
    assert lr[4] == pytest.approx((LEFT + W / 8, TOP + H / 2), abs=0.01)
    assert lr[9] == pytest.approx((LEFT + W / 4, TOP), abs=0.01)
    assert "no data yet" not in page


def test_page_links_every_grid_marks_failures_and_escapes_text(run_dir):
    page = write_report(run_dir).read_text()
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert srcs == ["samples/grid-000020kimg.png", "samples/grid-000010kimg.png"]  # newest first, no temp file
    assert "<figcaption>20 kimg</figcaption>" in page
    assert re.search(r'<tr class="fail"><td>loss at init</td><td>FAIL</td>', page)
    assert re.search(r'<tr class="pass"><td>data scaling</td><td>PASS</td>', page)
    assert re.search(r'<tr class="fail"><td>odd</td><td>FAIL</td>', page)
    assert "1 of 3 checks passed; 2 FAILED" in page
    assert ATTACK not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in page
    assert page.count("<script>") == 1  # only the page's own self-check
    status = re.search(r'<p class="status">(.*?)</p>', page).group(1)
    assert status.startswith("20 of 20 kimg (100%) · loss inf · in-training FD 20 (1000 samples, 10 steps), "
                             "class accuracy n/a · probe accuracy 80.0% (untrained baseline 50.0%) · 1234 img/s · "
                             "eval FD 12.5 (10000 samples), class accuracy n/a · written ")
    assert "<tr><th>fd</th><td>12.5</td></tr>" in page
    assert "<pre>[data]\nname = &quot;fmnist&quot;" in page
    assert not (run_dir / "report.html.tmp").exists()


@pytest.mark.parametrize("metrics", [None, "", '{"event": "tra', '{"event": "train", "kimg": NaN, "loss": NaN}\n'])
def test_a_run_without_data_yet_gives_a_page_with_no_data_notes(tmp_path, tiny, metrics):
    (tmp_path / "config.toml").write_text(to_toml(tiny()))
    if metrics is not None:
        (tmp_path / "metrics.jsonl").write_text(metrics)
    page = write_report(tmp_path).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("no data yet") == 5 and "<svg" not in page
    assert "no sample grids yet" in page and "diffuse doctor --run" in page
    assert f"0 of {tiny().train.kimg:g} kimg" in page


def test_title_is_escaped_and_a_missing_config_is_said(tmp_path):
    run = tmp_path / 'a<b>&"c'
    run.mkdir()
    page = write_report(run).read_text()
    assert "<h1>a&lt;b&gt;&amp;&quot;c</h1>" in page and "config.toml is missing" in page


@pytest.mark.parametrize("values", [[0.5, 20.0], [1e-4, 1e-3], [0.1, 0.7], [-3.0, 250.0], [3.0, 3.0], [0.0, 0.0],
                                    [0.063, 0.0631], [12345.0, 99999.0]])
def test_linear_axis_covers_its_values_with_round_ticks(values):
    lo, hi, ticks = axis(values, log=False)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(mantissa == pytest.approx(m) for m in (1, 2, 5, 10))
    assert ticks[0] == lo <= min(values) and max(values) <= hi == pytest.approx(ticks[-1]) and lo < hi
    assert np.allclose(np.diff(ticks), step) and 4 <= len(ticks) <= 11
    assert hi - lo < 4 * max(values[1] - values[0], abs(values[0]) / 2 or 1)  # covers, not dwarfs, the data


def test_log_axis_spans_whole_decades():
    assert axis([0.07, 0.45], log=True)[:2] == (0.01, 1.0)
    assert axis([3.0, 3.0], log=True)[:2] == (1.0, 10.0)
    lo, hi, ticks = axis([2e-5, 300.0], log=True)
    assert (lo, hi) == pytest.approx((1e-5, 1e3)) and len(ticks) <= 7


# ---------------------------------------------------------------------------------------------
# The page in a browser.


def chromium(run_dir, tmp_path, *args):
    """Run headless Chromium on run_dir/report.html with a throwaway profile; returns its stdout."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed; `bash scripts/setup.sh test` installs it")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args, (run_dir / "report.html").as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def self_check(run_dir, tmp_path):
    """(body attributes, self-check line) of the DOM after the page's scripts ran."""
    dom = chromium(run_dir, tmp_path, "--dump-dom", "--virtual-time-budget=10000")
    body = dict(re.findall(r'data-(\w+)="([^"]*)"', re.search(r"<body([^>]*)>", dom).group(1)))
    return body, re.search(r'<p id="self-check">([^<]*)</p>', dom).group(1)


def test_chromium_renders_the_page_with_all_images_and_plots(run_dir, tmp_path):
    write_report(run_dir)
    shot = tmp_path / "shot.png"
    chromium(run_dir, tmp_path, "--window-size=1200,3000", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (3000, 1200, 3) and pixels.var() > 0
    blue = (np.abs(pixels.astype(int) - [0x1F, 0x77, 0xB4]).sum(-1) < 30).sum()
    assert blue > 500  # the curves were drawn, not just text
    body, line = self_check(run_dir, tmp_path)
    assert (body["check"], body["images"], body["plots"]) == ("ok", "2", "5")
    assert line == "all 2 images and 5 plots loaded"


def test_chromium_self_check_names_a_missing_grid(run_dir, tmp_path):
    write_report(run_dir)
    (run_dir / "samples" / "grid-000010kimg.png").unlink()
    body, line = self_check(run_dir, tmp_path)
    assert body["check"] == "missing" and line == "missing: samples/grid-000010kimg.png"


def test_the_sampler_table_becomes_a_curve_per_sampler(tmp_path):
    """benchmarks/sampler_nfe.py's rows: one polyline per sampler with one vertex per row, bad rows left out."""
    (tmp_path / "config.toml").write_text("")
    rows = [{"sampler": "ddim", "nfe": n, "fd": 100 / n} for n in (10, 20, 50)]
    rows += [{"sampler": "unipc", "nfe": n, "fd": 50 / n} for n in (10, 20)] + [{"sampler": "heun", "fd": "x"}]
    (tmp_path / "sampler_nfe.json").write_text(json.dumps({"n": 500, "cfg": 2.0, "rows": rows}))
    page = (write_report(tmp_path)).read_text()
    section = page.split("<h2>Samplers</h2>", 1)[1].split("<h2>", 1)[0]
    assert "500 samples per point" in section and "guidance 2" in section
    lines = re.findall(r'<polyline[^>]*points="([^"]*)"', section)
    assert sorted(len(p.split()) for p in lines) == [2, 3]
    (tmp_path / "sampler_nfe.json").write_text("{not json")
    assert "sampler_nfe.json is" in write_report(tmp_path).read_text()
