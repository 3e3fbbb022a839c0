"""FD against network evaluations for every sampler on a trained run: the table and plot that pick a
preset's default sampler.

    python benchmarks/sampler_nfe.py RUN [--n 1000] [--nfe 5,10,15,25,50] [--cfg W] [--spacing S]
                                      [--samplers ddim,unipc]

For each sampler and each budget of network evaluations per image (a guided evaluation counts both
passes), the most steps that fit the budget (`Sampler.evaluations`), the same seeds and sample
count for every cell; writes RUN/sampler_nfe.json and RUN/sampler_nfe.svg (the report's "Samplers"
section) and prints a markdown table. DDPM (ancestral, stochastic) and renoise (for distilled
generators) are left out unless named.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import diffuse
from diffuse.report import sampler_nfe_plot, write_report
from diffuse.sampling import SAMPLERS


def steps_within(name: str, budget: int, process, guided: bool, spacing: str) -> tuple[int, int] | None:
    """(steps, evaluations per image) of the most steps of sampler `name` within `budget`, or None."""
    best = None
    for steps in range(1, budget + 1):
        nfe = SAMPLERS[name].evaluations(process.sampling_times(steps, spacing), process) * (2 if guided else 1)
        if nfe <= budget:
            best = (steps, nfe)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=1000, help="samples per cell (the same seeds in every cell)")
    parser.add_argument("--nfe", default="5,10,15,25,50", help="budgets of network evaluations per image")
    parser.add_argument("--cfg", type=float, help="guidance scale (default: the run's sample.cfg)")
    parser.add_argument("--spacing", help="a discrete process's step spacing (default: the run's sample.spacing)")
    parser.add_argument("--samplers", help="comma-separated (default: every sampler that suits the run's process)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    model = diffuse.load(args.run, device=args.device)
    cfg = model.config.sample.cfg if args.cfg is None else args.cfg
    spacing = args.spacing or model.config.sample.spacing
    names = args.samplers.split(",") if args.samplers else [
        name for name, s in SAMPLERS.items() if name not in ("ddpm", "renoise")
        and (s.processes is None or isinstance(model.process, s.processes))]
    rows = []
    for name in names:
        for budget in (int(v) for v in args.nfe.split(",")):
            fit = steps_within(name, budget, model.process, cfg != 1, spacing)
            if fit is None:
                continue
            start = time.perf_counter()
            result = diffuse.evaluate(args.run, n=args.n, device=args.device, sampler=name, steps=fit[0], cfg=cfg,
                                      spacing=spacing)
            rows.append({"sampler": name, "budget": budget, "steps": fit[0], "nfe": fit[1], "fd": result["fd"],
                         "accuracy": result["accuracy"], "seconds": time.perf_counter() - start})
            print(json.dumps(rows[-1]), flush=True)
    table = {"run": str(args.run), "n": args.n, "cfg": cfg, "spacing": spacing, "rows": rows}
    (args.run / "sampler_nfe.json").write_text(json.dumps(table, indent=1))
    (args.run / "sampler_nfe.svg").write_text(sampler_nfe_plot(rows))
    write_report(args.run)
    print(f"\nFD-FMNIST of {args.n} samples (cfg {cfg:g}, {spacing} spacing) against network evaluations per image:\n")
    budgets = sorted({r["budget"] for r in rows})
    print("| sampler | " + " | ".join(f"{b} NFE" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name in names:
        cells = {r["budget"]: f"{r['fd']:.2f} ({r['steps']} steps)" for r in rows if r["sampler"] == name}
        print(f"| {name} | " + " | ".join(cells.get(b, "-") for b in budgets) + " |")


if __name__ == "__main__":
    main()
