"""Is Heun's failure at few steps the solver's or the net's? Both solvers on EDM's ODE with the exact
denoiser of the 2-D Gaussian mixture (tests/mixture.py), with and without a fixed error added to it.

    PYTHONPATH=src .venv/bin/python benchmarks/heun_few_steps.py [--n 4000]

From the same 80-sigma noise, each solver at 3 / 5 / 8 / 13 steps of EDM's rho schedule, against a
256-step Heun solve with the exact denoiser; prints the RMS distance of the end points (the data's
modes lie on the unit circle, each with std 0.1). On `fmnist-edm2` Heun at 10 guided evaluations
(3 steps) gave FD 275 where UniPC gave 45 (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mixture import exact_denoiser  # noqa: E402

from diffuse.multistep import unipc  # noqa: E402
from diffuse.process import EDM  # noqa: E402
from diffuse.sampling import heun  # noqa: E402


class Biased(nn.Module):
    """The mixture's exact denoiser plus a fixed error `e` in every coordinate, at every sigma."""

    def __init__(self, process, e: float):
        super().__init__()
        self.process, self.e = process, e

    def forward(self, x, t, cond=None):
        alpha, sigma = self.process.alpha_sigma(t)
        x0 = exact_denoiser(x.double(), alpha, sigma) + self.e
        return x0, (x - alpha[:, None] * x0) / sigma[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="points solved")
    args = parser.parse_args()
    process = EDM()
    x = process.sigma_max * torch.randn(args.n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = heun(Biased(process, 0.0), x, process.sampling_times(256))
    print("| denoiser error | solver | 3 steps | 5 | 8 | 13 |\n|---|---|---|---|---|---|")
    for e in (0.0, 1e-3, 1e-2):
        for name, solver in (("heun", heun), ("unipc", unipc)):
            rms = [(solver(Biased(process, e), x, process.sampling_times(steps)) - exact).pow(2).mean().sqrt()
                   for steps in (3, 5, 8, 13)]
            print(f"| {e:g} | {name} | " + " | ".join(f"{r:.3f}" for r in rms) + " |")


if __name__ == "__main__":
    main()
