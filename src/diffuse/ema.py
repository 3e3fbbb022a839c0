"""Exponential moving averages of the weights, with time counted in images seen (nimg).

Two kinds:
- traditional EMA with a half-life in images (Karras et al. 2022): `ema_beta`, `update_ema`;
- power-function EMA with post-hoc reconstruction (Karras et al. 2023, "EDM2", section 3 and
  Appendix C): `PowerEMA` tracks a few EMA lengths during training and saves snapshots of them;
  after training, `reconstruct` builds an EMA of any other length from the snapshots by least
  squares over their averaging profiles (`solve_weights`).

A power-function EMA at time t weights the training weights seen at tau <= t by the profile
    p(tau; gamma, t) = (gamma + 1) tau^gamma / t^(gamma + 1),
whose width relative to t is sigma_rel. Snapshot files (one per tracked sigma_rel and save time):
    RUN_DIR/phema/phema-{nimg:012d}-{sigma_rel:.3f}.safetensors   header metadata: nimg, gamma, sigma_rel, buffers
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from diffuse.errors import UserError
from diffuse.files import fsync_path, writing

PHEMA_DIR = "phema"  # the snapshots' folder in a run directory
SIGMA_REL_MAX = math.sqrt(1 / 12)  # sigma_rel at gamma = 0 (a uniform average), about 0.2887


def ema_beta(nimg: int, batch: int, halflife_kimg: float, rampup: float) -> float:
    """Decay for one step of `batch` images after `nimg` images seen (EDM training_loop).

    The half-life is capped at rampup * nimg, so early in training the average forgets the random
    initialization quickly; later it is halflife_kimg thousand images.
    """
    halflife = halflife_kimg * 1000
    if rampup > 0:
        halflife = min(halflife, nimg * rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model, parameter by parameter; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - beta)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


# ---------------------------------------------------------------------------------------------
# Power-function EMA: the profile's exponent gamma and its relative width sigma_rel.


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative width of the power-function profile: the std of tau / t under p(tau; gamma, t)."""
    if not gamma >= 0:
        raise UserError(f"the power-EMA exponent gamma must be >= 0, got {gamma}; pass gamma, not sigma_rel.")
    # sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))   (EDM2 sec. 3, App. C)
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width sigma_rel in (0, 0.2887]."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise UserError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}] (0.2887 is a uniform average), "
                        f"got {sigma_rel}.")
    s2 = sigma_rel ** -2
    # gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0, largest real root (EDM2 App. C)
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    gamma = float(max(r.real for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r))))
    for _ in range(2):  # Newton steps polish the eigenvalue solver's last digits
        gamma -= (((gamma + 7) * gamma + 16 - s2) * gamma + 12 - s2) / ((3 * gamma + 14) * gamma + 16 - s2)
    return max(gamma, 0.0)  # at sigma_rel = sqrt(1/12) the root is 0, up to rounding


def power_ema_beta(nimg: int, batch: int, gamma: float) -> float:
    """Decay of one update that brings the images seen from nimg - batch to nimg.

    nimg is counted after the update, so the first update (nimg == batch) gives beta = 0: a copy.
    """
    if not 0 < batch <= nimg:
        raise ValueError(f"need 0 < batch <= nimg, got batch={batch}, nimg={nimg}")
    # beta = (1 - batch / nimg)^(gamma + 1)   (EDM2 App. C; the exponent is gamma + 1, not gamma)
    return (1 - batch / nimg) ** (gamma + 1)


# ---------------------------------------------------------------------------------------------
# Tracking during training.


class PowerEMA:
    """Power-function EMAs of one model at several sigma_rels, in float32, on the model's device.

    Call `update(model, nimg)` after every optimizer step with nimg = images seen after that step.
    The step's batch is nimg minus the nimg of the previous update (0 before the first), so the
    first update copies the model and a changing batch size needs no extra argument. Parameters
    are averaged; buffers (running statistics, counters) are copied from the model.
    """

    def __init__(self,
                 model: nn.Module,                                   # the trained model
                 sigma_rels: tuple[float, ...] = (0.05, 0.10)):      # EMA lengths to track
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.nimg = 0
        state, names = model.state_dict(), {name for name, _ in model.named_parameters()}
        self.param_names = [k for k in state if k in names]
        self.buffer_names = [k for k in state if k not in names]
        self.averages = [{k: state[k].detach().to(torch.float32, copy=True) for k in self.param_names}
                         for _ in self.sigma_rels]
        self.buffers = {k: state[k].detach().clone() for k in self.buffer_names}

    @torch.no_grad()
    def update(self, model: nn.Module, nimg: int) -> None:
        """Average in the model's current weights; nimg = images seen after the optimizer step."""
        if nimg <= self.nimg:
            raise ValueError(f"nimg must grow between updates: got {nimg} after {self.nimg}")
        batch, state = nimg - self.nimg, model.state_dict()
        for gamma, average in zip(self.gammas, self.averages):
            beta = power_ema_beta(nimg, batch, gamma)
            for k in self.param_names:
                # theta_ema <- beta theta_ema + (1 - beta) theta, in float32
                average[k].lerp_(state[k].to(torch.float32), 1 - beta)
        for k in self.buffer_names:
            self.buffers[k].copy_(state[k])
        self.nimg = nimg

    def ema_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Model state dict of the EMA at self.sigma_rels[index]: float32 parameters and the buffers."""
        return {**self.averages[index], **self.buffers}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors for a safetensors file, JSON-able metadata): everything a resumed run needs.

        Tensor keys: 'ema{i}.{name}' for the average at sigma_rels[i], 'buffer.{name}' for buffers.
        """
        tensors = {f"ema{i}.{k}": v for i, average in enumerate(self.averages) for k, v in average.items()}
        tensors.update({f"buffer.{k}": v for k, v in self.buffers.items()})
        meta = {"nimg": self.nimg, "sigma_rels": self.sigma_rels, "gammas": self.gammas}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore `state_dict()`'s output; the sigma_rels must be the ones this object tracks."""
        saved = [float(s) for s in meta["sigma_rels"]]
        if len(saved) != len(self.sigma_rels) or not np.allclose(saved, self.sigma_rels, rtol=0, atol=1e-12):
            raise UserError(f"the saved power EMA tracks sigma_rel {meta['sigma_rels']} but this run tracks "
                            f"{self.sigma_rels}; resume with the same sigma_rels or start a new run.")
        expected = set(self.state_dict()[0])
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise UserError(f"the saved power EMA does not fit this model (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); resume with the model it was saved from.")
        self.gammas = [float(g) for g in meta["gammas"]]  # the stored exponents: bit-identical resumption
        self.nimg = int(meta["nimg"])
        for i, average in enumerate(self.averages):
            for k in self.param_names:
                average[k].copy_(tensors[f"ema{i}.{k}"])
        for k in self.buffer_names:
            self.buffers[k].copy_(tensors[f"buffer.{k}"])

    def save_snapshots(self, directory: Path, nimg: int | None = None) -> list[Path]:
        """Write one snapshot file per tracked sigma_rel, atomically; nimg defaults to the last update's.

        `nimg`, if given, must equal the nimg of the last update: a snapshot's time is part of its
        averaging profile, and a wrong one would silently spoil every reconstruction.
        """
        nimg = self.nimg if nimg is None else nimg
        if nimg != self.nimg or nimg <= 0:
            raise ValueError(f"snapshot time {nimg} must be the time of the last update ({self.nimg}), and > 0")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (sigma_rel, gamma) in enumerate(zip(self.sigma_rels, self.gammas)):
            meta = {"nimg": str(nimg), "gamma": repr(gamma), "sigma_rel": repr(sigma_rel),
                    "buffers": json.dumps(self.buffer_names)}
            path = directory / f"phema-{nimg:012d}-{sigma_rel:.3f}.safetensors"
            write_safetensors_atomic(path, self.ema_state_dict(i), meta)
            paths.append(path)
        return paths


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name, flush it, and rename it into place."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with writing(path, tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)


# ---------------------------------------------------------------------------------------------
# Reconstruction after training.


def profile_inner(gamma_a, t_a, gamma_b, t_b):
    """<p_a, p_b> = integral over 0 < tau < min(t_a, t_b) of p(tau; gamma_a, t_a) p(tau; gamma_b, t_b).

    Arguments broadcast (numpy float64). This is EDM2's Algorithm 3 with its two cases (t_a < t_b
    or not) folded into one form whose ratios are <= 1, so nothing overflows for large gamma.
    """
    m = np.minimum(t_a, t_b)
    # (ga+1)(gb+1) / (ga+gb+1) * (m/ta)^(ga+1) (m/tb)^(gb+1) / m   (Algorithm 3)
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
            * (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1) / m)


def solve_weights(gammas, times, target_gamma: float, target_time: float | None = None) -> np.ndarray:
    """Least-squares weights (n,) of n snapshots (gammas (n,), times (n,)) for the target profile.

    Only snapshots with 0 < t <= target_time are used (the others get weight 0); target_time must
    be one of the snapshot times and defaults to the latest. The weights sum to 1.
    """
    gammas, times = np.asarray(gammas, np.float64), np.asarray(times, np.float64)
    target_time = float(times.max()) if target_time is None else float(target_time)
    if target_time not in times:
        raise UserError(f"no snapshot was taken at {target_time:g} images; pick one of the snapshot times "
                        f"{sorted(set(times.tolist()))[-5:]} (the last five shown).")
    used = (times > 0) & (times <= target_time)
    g, t = gammas[used], times[used] / target_time  # times in units of target_time: better conditioned
    # A_ij = <p_i, p_j> over all used snapshots of all tracked EMAs, B_i = <p_i, p_target>
    A = profile_inner(g[:, None], t[:, None], g[None, :], t[None, :])
    B = profile_inner(g, t, target_gamma, 1.0)
    # A X = B: the normal equations of min || sum_i X_i p_i - p_target ||^2
    X = np.linalg.lstsq(A, B, rcond=None)[0]
    weights = np.zeros_like(times)
    weights[used] = X / X.sum()  # normalized: the reconstructed profile integrates to 1 like every p_i
    return weights


def list_snapshots(directory: Path) -> list[tuple[Path, int, float]]:
    """(path, nimg, gamma) of every snapshot file in directory, sorted by nimg, then gamma."""
    found = []
    for path in sorted(Path(directory).glob("phema-*.safetensors")):
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            found.append((path, int(meta["nimg"]), float(meta["gamma"])))
        except (OSError, KeyError, ValueError, SafetensorError):
            raise UserError(f"power-EMA snapshot {path} is damaged or lacks its nimg and gamma metadata; "
                            "delete it or restore it from a copy.") from None
    return sorted(found, key=lambda s: (s[1], s[2]))


def reconstruct(directory: Path, sigma_rel: float, at_nimg: int | None = None) -> dict[str, torch.Tensor]:
    """Model state dict (CPU) of the power-function EMA at sigma_rel, as of snapshot time at_nimg.

    The parameters are the weighted sum of the snapshots' (accumulated in float64, returned in
    float32); the buffers come from the latest snapshot used (time at_nimg). at_nimg defaults to
    the latest snapshot time.
    """
    gamma = sigma_rel_to_gamma(sigma_rel)
    snapshots = list_snapshots(directory)
    if not snapshots:
        raise UserError(f"{directory} holds no power-EMA snapshots (phema-*.safetensors); train with "
                        "power EMA enabled, or point to the folder that holds them.")
    times = [nimg for _, nimg, _ in snapshots]
    if at_nimg is not None and at_nimg not in times:
        raise UserError(f"no power-EMA snapshot was taken at {at_nimg} images; pick one of the snapshot times "
                        f"{sorted(set(times))[-5:]} (the last five shown) in {directory}.")
    weights = solve_weights([g for _, _, g in snapshots], times, gamma, at_nimg)
    used = [(path, w) for (path, _, _), w in zip(snapshots, weights) if w != 0]
    return weighted_state_sum(used)


def weighted_state_sum(used: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """sum_i w_i theta_i over snapshot files (float64 sums, float32 out); buffers from the last file."""
    total: dict[str, torch.Tensor] = {}
    for path, w in used:
        with safe_open(path, framework="pt") as f:
            buffers = set(json.loads((f.metadata() or {}).get("buffers", "[]")))
        state = load_file(path)
        if total and set(state) != set(total):
            raise UserError(f"snapshot {path} holds other tensors than the snapshots before it; keep only "
                            "snapshots of one run in the folder.")
        for k, v in state.items():
            # theta_target = sum_i X_i theta_i   (EDM2 App. C)
            total[k] = v.clone() if k in buffers else total.get(k, 0) + w * v.to(torch.float64)
    return {k: v if k in buffers else v.to(torch.float32) for k, v in total.items()}
