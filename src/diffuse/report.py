"""A run's `report.html`: status, curves, sample grids, doctor checks and config, readable offline.

The page is rebuilt at every log event of a running job, so every reader here tolerates files that
are missing, empty or half-written, and the page is written under a temporary name and renamed.
Plots are inline SVG and images are relative links: the run folder can be copied anywhere.
"""

from __future__ import annotations

import json
import math
import re
import time
import tomllib
from html import escape
from pathlib import Path
from urllib.parse import quote

from diffuse.errors import UserError
from diffuse.files import writing
from diffuse.metrics.features import fd_name, is_prepared

WIDTH, HEIGHT = 520, 290                   # one plot, in SVG user units (= CSS pixels)
LEFT, RIGHT, TOP, BOTTOM = 64, 14, 42, 44  # margins around the plot area: title and legend rows, ticks
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
GRID_NAME = re.compile(r"grid-(\d+)kimg\.png")  # not the writer's "grid-...png.tmp.png"


def write_report(run_dir: Path) -> Path:
    """Rebuild run_dir/report.html from the run's files; returns its path."""
    run_dir = Path(run_dir)
    name = escape(run_dir.resolve().name)
    events = by_kind(read_events(run_dir / "metrics.jsonl"))
    config_text = read_text(run_dir / "config.toml")
    label = fd_label(config_text)
    body = [f"<h1>{name}</h1>",
            status_section(events, config_text, read_json(run_dir / "eval.json")[0]),
            '<p id="self-check">self-check did not run (JavaScript is off)</p>',
            plots_section(events, label), grids_section(run_dir), doctor_section(run_dir),
            eval_section(run_dir), ema_sweep_section(run_dir, label), sampler_section(run_dir, label),
            config_section(config_text)]
    page = PAGE.format(title=name, style=STYLE, body="\n".join(body), script=SELF_CHECK)
    path, tmp = run_dir / "report.html", run_dir / "report.html.tmp"
    with writing(path, tmp):
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# Reading a run that may be in progress.


MAX_JSON_BYTES = 16 << 20  # doctor.json and ema_sweep.json are a few KB; more is not diffuse's


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_events(path: Path) -> list[dict]:
    """The JSON objects of metrics.jsonl; lines that do not parse (a torn last line) are skipped."""
    events = []
    for line in (read_text(path) or "").splitlines():
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """(object, None), or (None, why) when the file is absent or not a JSON object."""
    if path.is_file() and path.stat().st_size > MAX_JSON_BYTES:
        return None, f"over {MAX_JSON_BYTES >> 20} MiB, more than a doctor table or sweep needs"
    text = read_text(path)
    if text is None:
        return None, "missing"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # deep nesting raises RecursionError, not ValueError
        return None, f"not valid JSON ({e})"
    return (value, None) if isinstance(value, dict) else (None, "not a JSON object")


def number(value) -> float | None:
    """A finite float, or None for anything else (NaN, inf, null, strings, booleans, ints beyond float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def by_kind(events: list[dict]) -> dict[str, list[dict]]:
    """{"train": [...], "probe": [...], "fd": [...]} in file order; other kinds are dropped."""
    kinds = {"train": [], "probe": [], "fd": []}
    for event in events:
        kind = event.get("event")
        if isinstance(kind, str) and kind in kinds:  # a hand-edited line may hold any JSON there
            kinds[kind].append(event)
    return kinds


def series(events: list[dict], field: str) -> list[tuple[float, float]]:
    """(kimg, value) of the events where both are finite numbers."""
    points = [(number(e.get("kimg")), number(e.get(field))) for e in events]
    return [(x, y) for x, y in points if x is not None and y is not None]


# ---------------------------------------------------------------------------------------------
# Sections, top to bottom.


def status_section(events: dict[str, list[dict]], config_text: str | None, evaluation: dict | None) -> str:
    """One line: progress, last loss, the in-training FD, probe, throughput, the final evaluation if there is
    one, and when the page was written."""
    try:
        total = number(tomllib.loads(config_text or "").get("train", {}).get("kimg"))
    except (tomllib.TOMLDecodeError, AttributeError):
        total = None
    train, fd, probe = (events[k][-1] if events[k] else {} for k in ("train", "fd", "probe"))
    kimg = number(train.get("kimg"))
    parts = [f"{fmt(kimg, '.4g', '0')} of {fmt(total, '.4g')} kimg"
             + (f" ({kimg / total:.0%})" if kimg is not None and total else "")]
    if train:
        parts.append(f"loss {fmt(train.get('loss'), '.4g')}")
    if fd:
        parts.append(f"in-training FD {fmt(fd.get('fd'), '.4g')} ({fmt(fd.get('n'), '.0f')} samples, "
                     f"{fmt(fd.get('steps'), '.0f')} steps), class accuracy {fmt(fd.get('accuracy'), '.1%', 'n/a')}")
    if probe:
        parts.append(f"probe accuracy {fmt(probe.get('accuracy'), '.1%')} "
                     f"(untrained baseline {fmt(probe.get('baseline'), '.1%')})")
    if train:
        parts.append(f"{fmt(train.get('img_per_s'), '.0f')} img/s")
    if isinstance(evaluation, dict) and "fd" in evaluation:
        parts.append(f"eval FD {fmt(evaluation.get('fd'), '.4g')} ({fmt(evaluation.get('n'), '.0f')} samples), "
                     f"class accuracy {fmt(evaluation.get('accuracy'), '.1%', 'n/a')}")
    parts.append("written " + time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    return f'<p class="status">{escape(" · ".join(parts))}</p>'


def fmt(value, spec: str, missing: str = "?") -> str:
    """A number formatted; NaN and inf as themselves (a diverged loss must show), anything else as `missing`."""
    if number(value) is not None:
        return format(number(value), spec)
    return str(value) if isinstance(value, float) else missing


def fd_label(config_text: str) -> str:
    """How the run's FD is written, from its config.toml: FD-FMNIST, FD-<name> of a prepared data set, or FD."""
    try:
        data = tomllib.loads(config_text).get("data", {})
    except (tomllib.TOMLDecodeError, RecursionError, AttributeError):
        return "FD"
    name, path = data.get("name", "fmnist"), data.get("path")
    if name == "fmnist":
        return "FD-FMNIST"
    if name == "prepared" and isinstance(path, str) and is_prepared(path):
        try:
            return fd_name(path)
        except UserError:  # its data.json is damaged: the report still opens
            return "FD"
    return "FD"


def plots_section(events: dict[str, list[dict]], label: str = "FD") -> str:
    train, fd, probe = events["train"], events["fd"], events["probe"]
    plots = [
        svg_plot({"loss": series(train, "loss"), "grad norm": series(train, "grad_norm")},
                 "Training loss", "value (log scale)", log_y=True),
        svg_plot({"lr": series(train, "lr")}, "Learning rate", "lr"),
        svg_plot({"FD": series(fd, "fd")}, "Frechet distance of samples", f"{label} (log scale)", log_y=True),
        svg_plot({"class accuracy": series(fd, "accuracy")}, "Class accuracy of samples", "accuracy"),
        svg_plot({"probe": series(probe, "accuracy"), "untrained baseline": series(probe, "baseline")},
                 "Linear probe on bottleneck features", "accuracy"),
    ]
    return '<h2>Curves</h2>\n<div class="plots">\n' + "\n".join(plots) + "\n</div>"


def grids_section(run_dir: Path) -> str:
    """Every samples/grid-NNNNNNkimg.png, newest first, captioned with its kimg."""
    grids = []
    for path in (run_dir / "samples").glob("grid-*.png"):
        match = GRID_NAME.fullmatch(path.name)
        if match:
            grids.append((int(match[1]), path.name))
    if not grids:
        return '<h2>Samples</h2>\n<p class="empty">no sample grids yet</p>'
    figures = [f'<figure><a href="samples/{quote(name)}"><img src="samples/{quote(name)}" alt="{escape(name)}"></a>'
               f"<figcaption>{kimg} kimg</figcaption></figure>" for kimg, name in sorted(grids, reverse=True)]
    return '<h2>Samples (newest first)</h2>\n<div class="grids">\n' + "\n".join(figures) + "\n</div>"


def doctor_section(run_dir: Path) -> str:
    """The checks of `diffuse doctor`, failed ones marked by colour and by the word FAIL."""
    doctor, why = read_json(run_dir / "doctor.json")
    if doctor is None:
        how = f"run <code>diffuse doctor --run {escape(str(run_dir))}</code> to check this run."
        return f"<h2>Doctor</h2>\n<p>doctor.json is {escape(why)}; {how}</p>"
    checks = doctor.get("checks")
    checks = [c for c in checks if isinstance(c, dict)] if isinstance(checks, list) else []
    failed = sum(c.get("passed") is not True for c in checks)  # only a JSON true passes, not "false"
    rows = [f'<tr class="{"pass" if c.get("passed") is True else "fail"}"><td>{escape(str(c.get("name", "")))}</td>'
            f'<td>{"PASS" if c.get("passed") is True else "FAIL"}</td>'
            + "".join(f"<td>{escape(str(c.get(k, '')))}</td>" for k in ("value", "expected", "detail")) + "</tr>"
            for c in checks]
    summary = (f'<p class="{"fail" if failed else "pass"}">{len(checks) - failed} of {len(checks)} checks passed'
               + (f"; {failed} FAILED" if failed else "") + f" (config {escape(str(doctor.get('config', '?')))})</p>")
    head = "<tr><th>check</th><th>result</th><th>value</th><th>expected</th><th>detail</th></tr>"
    return f'<h2>Doctor</h2>\n{summary}\n<table class="doctor">{head}\n' + "\n".join(rows) + "</table>"


def ema_sweep_plot(rows: list[dict], label: str = "FD") -> str:
    """FD against sigma_rel from the rows of `diffuse ema --sweep` (ema_sweep.json)."""
    points = [(r["sigma_rel"], r["fd"]) for r in rows if None not in (number(r.get("sigma_rel")), number(r.get("fd")))]
    return svg_plot({label: points}, f"{label} against the post-hoc EMA length", label, x_label="sigma_rel")


def ema_sweep_section(run_dir: Path, label: str = "FD") -> str:
    """The post-hoc EMA sweep, when `diffuse ema --sweep` has run: the plot and the best length."""
    sweep, why = read_json(run_dir / "ema_sweep.json")
    if sweep is None:
        return "" if why == "missing" else f"<h2>Post-hoc EMA</h2>\n<p>ema_sweep.json is {escape(why)}.</p>"
    rows = [r for r in sweep.get("rows", []) if isinstance(r, dict)]
    best, tracked = sweep.get("best") or {}, sweep.get("tracked_sigma_rel")
    line = (f"<p>best sigma_rel {fmt(best.get('sigma_rel'), 'g')} (FD {fmt(best.get('fd'), '.2f')}); the run "
            f"tracked {fmt(tracked, 'g')}; {fmt(sweep.get('n'), 'g')} samples each. "
            f"<code>diffuse ema RUN --sigma-rel S --out CKPT</code> writes any of them.</p>")
    return f"<h2>Post-hoc EMA</h2>\n{line}\n{ema_sweep_plot(rows, label)}"


def sampler_nfe_plot(rows: list[dict], label: str = "FD") -> str:
    """FD against network evaluations per image, a curve per sampler (benchmarks/sampler_nfe.py's rows)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if isinstance(r.get("sampler"), str) and None not in (number(r.get("nfe")), number(r.get("fd"))):
            curves.setdefault(r["sampler"], []).append((r["nfe"], r["fd"]))
    return svg_plot(curves, f"{label} against network evaluations per image", label, log_y=True, x_label="NFE")


def sampler_section(run_dir: Path, label: str = "FD") -> str:
    """The samplers compared at equal network evaluations, when benchmarks/sampler_nfe.py has run."""
    table, why = read_json(run_dir / "sampler_nfe.json")
    if table is None:
        return "" if why == "missing" else f"<h2>Samplers</h2>\n<p>sampler_nfe.json is {escape(why)}.</p>"
    rows = [r for r in table.get("rows", []) if isinstance(r, dict)]
    line = (f"<p>{fmt(table.get('n'), 'g')} samples per point, the same seeds throughout, guidance "
            f"{fmt(table.get('cfg'), 'g')} (a guided evaluation counts both passes).</p>")
    return f"<h2>Samplers</h2>\n{line}\n{sampler_nfe_plot(rows, label)}"


def eval_section(run_dir: Path) -> str:
    results, why = read_json(run_dir / "eval.json")
    if results is None:
        return "" if why == "missing" else f"<h2>Evaluation</h2>\n<p>eval.json is {escape(why)}.</p>"
    rows = [f"<tr><th>{escape(str(k))}</th><td>{escape(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
            for k, v in results.items()]
    return "<h2>Evaluation</h2>\n<table>" + "\n".join(rows) + "</table>"


def config_section(config_text: str | None) -> str:
    if config_text is None:
        return "<h2>Config</h2>\n<p>config.toml is missing.</p>"
    return f"<h2>Config</h2>\n<pre>{escape(config_text)}</pre>"


# ---------------------------------------------------------------------------------------------
# Plots.


def svg_plot(curves: dict[str, list[tuple[float, float]]], title: str, y_label: str, log_y: bool = False,
             x_label: str = "kimg") -> str:
    """Curves {name: [(x, y), ...]} (x in kimg unless told) as an inline <svg class="plot">, x linear, y linear or log.

    Points that a log axis cannot show (y <= 0) are left out; with no point at all the plot is a
    short "no data yet" note instead of an empty box.
    """
    curves = {name: [(x, y) for x, y in pts if y > 0 or not log_y] for name, pts in curves.items()}
    xs = [x for pts in curves.values() for x, _ in pts]
    ys = [y for pts in curves.values() for _, y in pts]
    if not xs:
        return f'<div class="plot-empty"><b>{escape(title)}</b><p>no data yet</p></div>'
    (x0, x1, x_ticks), (y0, y1, y_ticks) = axis(xs, log=False), axis(ys, log=log_y)
    fy = math.log10 if log_y else float
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return TOP + (fy(y1) - fy(y)) / (fy(y1) - fy(y0)) * h

    out = [f'<svg class="plot" data-title="{escape(title)}" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{LEFT}" y="18" class="title">{escape(title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" class="frame"/>']
    for x in x_ticks:
        out.append(f'<line x1="{px(x):.2f}" x2="{px(x):.2f}" y1="{TOP}" y2="{TOP + h}" class="gridline"/>'
                   f'<text x="{px(x):.2f}" y="{TOP + h + 16}" text-anchor="middle">{tick_label(x)}</text>')
    for y in y_ticks:
        out.append(f'<line x1="{LEFT}" x2="{LEFT + w}" y1="{py(y):.2f}" y2="{py(y):.2f}" class="gridline"/>'
                   f'<text x="{LEFT - 5}" y="{py(y) + 4:.2f}" text-anchor="end">{tick_label(y)}</text>')
    out.append(f'<text x="{LEFT + w / 2}" y="{HEIGHT - 6}" text-anchor="middle" class="axis">{escape(x_label)}</text>'
               f'<text transform="translate(14 {TOP + h / 2}) rotate(-90)" text-anchor="middle" class="axis">'
               f"{escape(y_label)}</text>")
    for i, (name, pts) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{px(x):.2f},{py(y):.2f}" for x, y in pts)
        out.append(f'<polyline data-series="{escape(name)}" points="{coords}" stroke="{colour}"/>')
        if len(pts) <= 20:  # sparse curves (FD, probe) get markers, so one point still shows
            out += [f'<circle cx="{px(x):.2f}" cy="{py(y):.2f}" r="2.5" fill="{colour}"/>' for x, y in pts]
    if len(curves) > 1:
        out.append(legend(list(curves)))
    return "\n".join(out) + "\n</svg>"


def legend(names: list[str]) -> str:
    """A row of (coloured line, name) under the title, in the colours svg_plot gives the curves."""
    out, x = [], LEFT
    for i, name in enumerate(names):
        colour = COLOURS[i % len(COLOURS)]
        out.append(f'<line x1="{x}" x2="{x + 18}" y1="30" y2="30" stroke="{colour}" stroke-width="2"/>'
                   f'<text x="{x + 22}" y="34">{escape(name)}</text>')
        x += 40 + 7 * len(name)  # ~7 units per character at 11px
    return "".join(out)


def axis(values: list[float], log: bool) -> tuple[float, float, list[float]]:
    """(low, high, ticks) of an axis covering the values: whole decades on a log axis, else
    multiples of a 1-2-5 step, about six ticks."""
    lo, hi = min(values), max(values)
    if log:
        d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        d1 = max(d1, d0 + 1)
        every = math.ceil((d1 - d0) / 6)  # at most ~6 labelled decades
        ticks = [10.0 ** d for d in range(d0, d1 + 1, every)]
        if d1 - d0 <= 2:  # few decades: label 2 and 5 within them too
            ticks = sorted(m * 10.0 ** d for d in range(d0, d1 + 1) for m in (1, 2, 5) if m * 10.0 ** d <= 10.0 ** d1)
        return 10.0 ** d0, 10.0 ** d1, ticks
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1e-300):  # one value: centre it
        pad = abs(lo) / 2 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / 5
    step = next(m * 10.0 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)
                if m * 10.0 ** math.floor(math.log10(raw)) >= raw * (1 - 1e-9))
    k0, k1 = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)  # the 1e-9 absorbs 0.7/0.1 = 7.0000001
    return k0 * step, k1 * step, [k * step for k in range(k0, k1 + 1)]


def tick_label(v: float) -> str:
    return escape(f"{v:.4g}")


# ---------------------------------------------------------------------------------------------
# The page around the sections.

PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style></head>
<body>
{body}
<script>{script}</script>
</body>
</html>
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; }
h2 { margin: 24px 0 8px; font-size: 18px; }
.status { font-size: 15px; }
.plots, .grids { display: flex; flex-wrap: wrap; gap: 12px; }
svg.plot { background: #fff; border: 1px solid #ddd; }
svg.plot text { font-size: 11px; fill: #333; }
svg.plot .title { font-size: 13px; font-weight: bold; }
svg.plot .axis { font-size: 12px; }
svg.plot .frame { fill: none; stroke: #888; }
svg.plot .gridline { stroke: #eee; }
svg.plot polyline { fill: none; stroke-width: 1.5; }
.plot-empty { width: 520px; height: 80px; border: 1px dashed #bbb; padding: 8px; box-sizing: border-box; }
.plot-empty p, .empty { color: #888; margin: 4px 0; }
.grids figure { margin: 0; }
.grids img { width: 302px; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { text-align: center; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
tr.fail td { background: #fdd; } tr.fail td:nth-child(2), p.fail { color: #b00; font-weight: bold; }
tr.pass td:nth-child(2) { color: #070; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
#self-check { color: #666; }
body[data-check="missing"] #self-check { color: #b00; font-weight: bold; }
"""

# After load: which images failed to load and which plots have no size; a line for the reader and
# body[data-check] = ok | missing for tools (the tests read it from Chromium's DOM).
SELF_CHECK = """
window.addEventListener("load", function () {
  var images = Array.from(document.images), plots = Array.from(document.querySelectorAll("svg.plot"));
  var missing = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
    .map(function (i) { return i.getAttribute("src"); });
  plots.forEach(function (p) {
    var box = p.getBoundingClientRect();
    if (!(box.width > 0 && box.height > 0)) missing.push("plot " + p.dataset.title);
  });
  var line = document.getElementById("self-check");
  line.textContent = missing.length ? "missing: " + missing.join(", ")
    : "all " + images.length + " images and " + plots.length + " plots loaded";
  document.body.dataset.check = missing.length ? "missing" : "ok";
  document.body.dataset.images = images.length;
  document.body.dataset.plots = plots.length;
});
"""
