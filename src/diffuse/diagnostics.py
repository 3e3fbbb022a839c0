"""The sanity checks behind `diffuse doctor`: bugs that let the loss fall while sampling is broken.

Every check goes through the code that trains (the data loader and its scaling, `losses.noised`
and `losses.loss_at`, `training.train_step`, the `Denoiser`), so a bug planted there is caught here:

- type checks: mean, std, RMS and *composition* of the training data, x_t, the target and the
  initial output. Std cannot tell eps from v from x0 (all have std 1 under VP), so each tensor is
  regressed on (x0, eps) and its coefficients compared with the expected ones.
- identity: with zero noise (x_t = alpha * x0) a fresh denoiser must learn to return x0 (to a
  relative error of IDENTITY_TOL within IDENTITY_STEPS; a flipped sign ends far above it).
- condition leak: the prediction must move when x_t moves and the condition stays fixed.
- early loss: the loss after a fixed number of steps must not rise above what this config reached before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from diffuse import losses
from diffuse.checkpoint import load_denoiser
from diffuse.config import RESUMABLE_CHANGES, Config, load_config, to_dict
from diffuse.files import writing
from diffuse.data import TrainData, dataset
from diffuse.denoiser import Denoiser, append_dims
from diffuse.nets import build_denoiser
from diffuse.process import EDM, VPDiscrete
from diffuse.seeding import derive_seed
from diffuse.run import batch_at, epoch_permutation, learning_rate, load_data
from diffuse.training import train_step, training_loss

TYPE_BATCH = 256          # real images for the type checks' statistics and regressions
NET_BATCH = 128           # held-out images the network sees in the identity, leak and output checks
TYPE_FRACTIONS = (0.1, 0.5, 0.9)  # noise levels of the type checks, as fractions of the process's time
LEAK_FRACTIONS = (0.2, 0.7)       # a moderate (VP: alpha 0.8) and a high (alpha 0.08) noise level for the leak check
EDM_GRID = 1000           # EDM: noise levels are fractions of a 1000-step rho schedule
DATA_SAMPLE = 4096        # training examples for the data statistics (mean to about +-0.01)
DATA_TOL = 0.05           # |mean| and |std - 1| of the scaled training data (exactly 0 and 1 when fitted)
COEF_TOL = 0.02           # x_t and targets are exact linear combinations: only float rounding is allowed
RESIDUAL_TOL = 1e-3       # share of a tensor's energy that (x0, eps) do not explain
IDENTITY_STEPS, IDENTITY_BATCH, IDENTITY_LR = 100, 16, 2e-3  # constant lr: no warm-up to sit through
# Relative error ||x0_hat - x0||^2 / ||x0||^2 after IDENTITY_STEPS. Measured: healthy 0.002-0.06 (fmnist,
# fmnist-tiny, tiny nets; v, x0, flow), untrained 0.08-1.0; a flipped target sign 0.30 (flow) to 3.7 (x0).
IDENTITY_TOL = 0.1
# Share of the output's variance due to x_t at the moderate level. Measured after 100 steps: toy2d 0.53,
# fmnist-sr-tiny 0.52, fmnist-tiny 0.91 (0.15-0.70 after only 30 steps); a net that ignores x_t: 0.000.
LEAK_TOL = 0.1
EARLY_STEPS, EARLY_WINDOW, EARLY_MARGIN = 100, 10, 1.05
SHIPPED_EARLY_LOSS = Path(__file__).parent / "presets" / "early_loss.json"


@dataclass
class Check:
    name: str            # e.g. "identity", "type: v-target at t=500", "condition leak"
    passed: bool
    value: str           # what was measured, formatted
    expected: str        # what it should be, formatted
    detail: str = ""     # on failure: which tensor is wrong and where to look


# ---------------------------------------------------------------------------------------------
# What every check starts from: the data and the initial weights that training uses.


def doctor_data(config: Config, device="cpu") -> TrainData:
    """The training data as `train` loads it; fills in config.data.mean/std when unset, as `train` does."""
    return load_data(config, dataset(config.data), device)


def fresh_denoiser(config: Config, device="cpu") -> Denoiser:
    """The denoiser `train` starts from: the same seed gives the same initial weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.train.seed, "init"))
        return build_denoiser(config).to(device)


def held_out(data: TrainData, seed: int, n: int = NET_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 (n, ...), cond (n, ...)): the last n examples of the first epoch, which the doctor's short
    trainings (a few thousand images) never reach."""
    x0, cond, _ = data.take(epoch_permutation(len(data), seed, 0)[-n:])
    return x0, cond


def time_at(process, fraction: float, n: int, device) -> torch.Tensor:
    """Times (n,) at `fraction` of the way from clean to pure noise: step round(f * T) for VP, t = f for
    flow, for EDM the sigma at that fraction of its sampling schedule (rho schedule, 1000 steps, read
    from the clean end: 0.1 -> 0.017, 0.5 -> 2.5, 0.9 -> 46 with EDM's defaults)."""
    if isinstance(process, VPDiscrete):
        return torch.full((n,), round(fraction * process.T), dtype=torch.long, device=device)
    if isinstance(process, EDM):
        return torch.full((n,), edm_sigmas(process)[round(fraction * (EDM_GRID - 1))], device=device)
    return torch.full((n,), fraction, device=device)


def edm_sigmas(process: EDM) -> list[float]:
    """EDM_GRID sigmas of the process's sampling schedule, ascending from sigma_min to sigma_max."""
    return process.sampling_times(EDM_GRID)[-2::-1]


def time_name(t: torch.Tensor) -> str:
    return f"t={t[0].item():.4g}"


# ---------------------------------------------------------------------------------------------
# Type checks: statistics and composition of the tensors of a training step.


def stats(x: torch.Tensor) -> tuple[float, float, float]:
    """(mean, std, mean per-sample RMS) of x (B, ...), in float64; RMS = ||x_i|| / sqrt(dim)."""
    x = x.double()
    return x.mean().item(), x.std().item(), x.flatten(1).pow(2).mean(1).sqrt().mean().item()


def composition(y: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> tuple[float, float, float]:
    """Least squares y ~ a * x0 + b * eps over every element of the batch: (a, b, residual share)."""
    A = torch.stack([x0.flatten(), eps.flatten()], dim=1).double()  # (B * D, 2)
    y = y.flatten().double()
    (a, b) = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()
    residual = (y - A @ y.new_tensor([a, b])).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)
    return a, b, residual.item()


def known_compositions(alpha: float, sigma: float, sigma_data: float = 1.0) -> dict[str, tuple[float, float]]:
    """What each tensor of a step is, as (coefficient of x0, coefficient of eps), at (alpha, sigma);
    edm is EDM's preconditioned target (sigma x0 - alpha sigma_data^2 eps) / (sigma_data s),
    s^2 = sigma^2 + alpha^2 sigma_data^2, written out here rather than taken from the denoiser."""
    s = math.hypot(sigma, alpha * sigma_data)
    known = {"eps": (0.0, 1.0), "x0": (1.0, 0.0), "v": (-sigma, alpha), "flow": (-1.0, 1.0), "x_t": (alpha, sigma),
             "edm": (sigma / (sigma_data * s), -alpha * sigma_data / s)}
    return known | {f"-{k}": (-a, -b) for k, (a, b) in known.items()}


def composition_check(name: str, tensor: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                      expect: str, alpha: float, sigma: float, sigma_data: float = 1.0) -> Check:
    """Pass when `tensor` is the combination of (x0, eps) that `expect` names, at (alpha, sigma)."""
    known = known_compositions(alpha, sigma, sigma_data)
    a, b, residual = composition(tensor, x0, eps)
    ea, eb = known[expect]
    mean, std, rms = stats(tensor)
    value = f"mean {mean:+.3f} std {std:.3f} rms {rms:.3f}; {a:+.3f} x0 {b:+.3f} eps"
    expected = f"std {math.hypot(ea, eb):.3f}; {ea:+.3f} x0 {eb:+.3f} eps"
    passed = max(abs(a - ea), abs(b - eb)) <= COEF_TOL and residual <= RESIDUAL_TOL
    detail = ""
    if not passed:
        nearest = min(known, key=lambda k: max(abs(a - known[k][0]), abs(b - known[k][1])))
        close = max(abs(a - known[nearest][0]), abs(b - known[nearest][1])) <= COEF_TOL
        if residual > RESIDUAL_TOL:
            detail = (f"{name} is not a combination of x0 and eps ({100 * residual:.1f}% unexplained); "
                      "look at losses.noised")
        elif close:
            detail = f"{name} looks like {nearest}, expected {expect}; look at losses.noised and training_target"
        else:
            detail = f"{name} has the wrong mix of x0 and eps; look at losses.noised and training_target"
    return Check(f"type: {name}", passed, value, expected, detail)


@torch.no_grad()
def type_checks(config: Config, denoiser: Denoiser, data: TrainData) -> list[Check]:
    """Data, x_t and target at TYPE_FRACTIONS of the schedule, and the output of `denoiser` (fresh weights)."""
    checks = [data_check(batch_at(data, 0, min(DATA_SAMPLE, len(data)), config.train.seed)[0])]
    x0, cond, _ = batch_at(data, 0, min(TYPE_BATCH, len(data)), config.train.seed)
    generator = torch.Generator().manual_seed(derive_seed(config.train.seed, "doctor", "types"))
    prediction, outputs = denoiser.prediction, []
    denoiser.eval()
    for fraction in TYPE_FRACTIONS:
        t = time_at(denoiser.process, fraction, len(x0), x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0)
        x_t, target = losses.noised(denoiser, x0, t, eps)
        alpha, sigma = (s[0].item() for s in denoiser.process.alpha_sigma(t))
        checks.append(composition_check(f"x_t at {time_name(t)}", x_t, x0, eps, "x_t", alpha, sigma))
        checks.append(composition_check(f"{prediction}-target at {time_name(t)}", target, x0, eps,
                                        prediction, alpha, sigma, denoiser.sigma_data))
        outputs.append(denoiser.raw(x_t[:NET_BATCH], t[:NET_BATCH], cond[:NET_BATCH]))
    checks.append(output_check(torch.cat(outputs)))
    return checks


def data_check(x0: torch.Tensor) -> Check:
    """The scaled training data x0 (N, ...) that the loss sees must have mean 0 and std 1."""
    mean, std, rms = stats(x0)
    passed = math.isfinite(std) and abs(mean) <= DATA_TOL and abs(std - 1) <= DATA_TOL
    detail = "" if passed else (f"the training data x0 has mean {mean:.3f} and std {std:.3f}, not 0 and 1: "
                                "check data.mean and data.std (leave both unset to fit them) and Scaling.encode")
    return Check("type: data", passed, f"mean {mean:+.3f} std {std:.3f} rms {rms:.3f}",
                 f"mean 0 +- {DATA_TOL}, std 1 +- {DATA_TOL}", detail)


def output_check(F: torch.Tensor) -> Check:
    """The untrained net's output F: finite, and no larger than the unit-scale targets."""
    mean, std, rms = stats(F)
    passed = bool(F.isfinite().all()) and rms <= 1
    detail = "" if passed else "the untrained network's output is not finite or larger than the targets; look at its init"
    return Check("type: net output at init", passed, f"mean {mean:+.3f} std {std:.3f} rms {rms:.3f}",
                 "finite, rms <= 1 (exactly 0: the output layer is zero-initialized)", detail)


# ---------------------------------------------------------------------------------------------
# Identity: zero noise must be learned exactly.


def early_times(process, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Times (n,) in the first half of the schedule, where alpha is far from 0 and x0 = x_t / alpha is recoverable."""
    if isinstance(process, VPDiscrete):
        return torch.randint(0, process.T // 2, (n,), generator=generator).to(device)
    if isinstance(process, EDM):
        index = torch.randint(0, EDM_GRID // 2, (n,), generator=generator)
        return torch.tensor(edm_sigmas(process))[index].to(device)
    return (0.5 * torch.rand(n, generator=generator)).to(device)


@torch.no_grad()
def identity_error(denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> float:
    """||x0_hat - x0||^2 / ||x0||^2 over the batch for x_t = alpha * x0 (the definition, not the loss's code)."""
    denoiser.eval()
    alpha, _ = denoiser.process.alpha_sigma(t)
    x0_hat, _ = denoiser(append_dims(alpha, x0) * x0, t, cond)
    return ((x0_hat.double() - x0.double()).pow(2).sum() / x0.double().pow(2).sum()).item()


def identity_check(config: Config, device="cpu", steps: int = IDENTITY_STEPS, data: TrainData | None = None,
                   progress: bool = False) -> Check:
    """Train a fresh denoiser through `losses.loss_at` with eps = 0; it must then return x0 from alpha * x0.

    Times lie in the first half of the schedule: with zero terminal SNR alpha_T = 0 and x0 cannot be
    recovered. For eps-prediction the zero-noise target is 0, which the zero-initialized net already
    outputs, so the check passes at once; there the type checks carry the weight.
    """
    data = data if data is not None else doctor_data(config, device)
    seed, t_cfg = config.train.seed, config.train
    denoiser = fresh_denoiser(config, device)
    x0_test, cond_test = held_out(data, seed)
    generator = torch.Generator().manual_seed(derive_seed(seed, "doctor", "identity"))
    t_test = early_times(denoiser.process, len(x0_test), generator, x0_test.device)
    before = identity_error(denoiser, x0_test, cond_test, t_test)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=IDENTITY_LR, weight_decay=t_cfg.weight_decay)
    clip = t_cfg.grad_clip if t_cfg.grad_clip > 0 else math.inf
    with torch.random.fork_rng(devices=[]):
        for step in tqdm(range(steps), desc="doctor: identity", disable=not progress):
            x0, cond, _ = batch_at(data, step, IDENTITY_BATCH, seed)
            t = early_times(denoiser.process, len(x0), generator, x0.device)
            denoiser.train()
            torch.manual_seed(derive_seed(seed, "doctor", "identity", step))  # dropout, as in train_step
            loss = losses.loss_at(denoiser, x0, cond, t, torch.zeros_like(x0)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(denoiser.parameters(), clip)
            optimizer.step()
    after = identity_error(denoiser, x0_test, cond_test, t_test)
    passed = after <= IDENTITY_TOL
    detail = "" if passed else (
        f"with zero noise the model does not learn x0_hat = x0 (relative error {before:.3f} before training, "
        f"{after:.3f} after): the loss's target, its sign or from_prediction disagree; look at "
        "losses.loss_at, training_target and from_prediction")
    return Check("identity", passed, f"{after:.4f} (untrained {before:.4f})",
                 f"<= {IDENTITY_TOL} after {steps} steps", detail)


# ---------------------------------------------------------------------------------------------
# Condition leak: the prediction must depend on x_t, not on the condition alone.


@torch.no_grad()
def leak_check(denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor, seed: int = 0) -> Check:
    """Share of the output's variance that x_t explains with the condition fixed, at LEAK_FRACTIONS.

    F_a = F(alpha x0 + sigma eps, y), F_b = F(alpha x0' + sigma eps', y) with x0' another image
    (x0 rolled by one) and fresh noise: share = E||F_a - F_b||^2 / 2 over the variance of F about
    its mean. A network that ignores x_t scores 0. The check is passed on the moderate level (the
    first): at high noise a healthy model rightly leans on a condition that pins x0 down.
    """
    denoiser.eval()
    generator = torch.Generator().manual_seed(derive_seed(seed, "doctor", "leak"))
    shares = {}
    for fraction in LEAK_FRACTIONS:
        t = time_at(denoiser.process, fraction, len(x0), x0.device)
        alpha, sigma = (append_dims(s, x0) for s in denoiser.process.alpha_sigma(t))
        eps_a, eps_b = (torch.randn(x0.shape, generator=generator).to(x0) for _ in range(2))
        F_a = denoiser.raw(alpha * x0 + sigma * eps_a, t, cond).double().flatten(1)  # (B, D)
        F_b = denoiser.raw(alpha * x0.roll(1, 0) + sigma * eps_b, t, cond).double().flatten(1)
        both = torch.cat([F_a, F_b])
        total = (both - both.mean(0)).pow(2).sum(1).mean()
        within = 0.5 * (F_a - F_b).pow(2).sum(1).mean()
        shares[time_name(t)] = (within / total).item() if total > 0 else 0.0
    moderate = next(iter(shares))
    passed = shares[moderate] >= LEAK_TOL
    value = ", ".join(f"{name}: {share:.3f}" for name, share in shares.items())
    detail = "" if passed else (
        f"at {moderate} the network output barely moves when x_t changes with the condition fixed: it "
        "predicts from the condition alone (look at how the net combines x_t and cond)")
    return Check("condition leak", passed, value, f"share of output variance due to x_t >= {LEAK_TOL} at {moderate}",
                 detail)


# ---------------------------------------------------------------------------------------------
# Loss at a fixed early step, against the value this config reached before.


def train_briefly(config: Config, data: TrainData, steps: int = EARLY_STEPS, device="cpu",
                  progress: bool = False) -> tuple[Denoiser, list[float]]:
    """`steps` steps of `training.train_step` exactly as `train` makes them; returns (model, losses per step)."""
    t = config.train
    denoiser = fresh_denoiser(config, device)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    history, model = [], training_loss(denoiser, config)
    with torch.random.fork_rng(devices=[]):  # train_step seeds the global generator
        for step in tqdm(range(steps), desc="doctor: early loss", disable=not progress):
            x0, cond, _ = batch_at(data, step, t.batch, t.seed)
            loss, _ = train_step(model, optimizer, x0, cond, learning_rate(t, step * t.batch), config,
                                 derive_seed(t.seed, "step", step))
            history.append(loss)
    return denoiser.eval(), history


def early_loss_key(config: Config, steps: int) -> str:
    """SHA-256 of the settings that shape the first steps of training, and the step count.

    Only keys whose value differs from the default count, so a new config field (with a default)
    leaves the stored keys valid; keys a resume may change and the fitted data scaling do not count.
    """
    default = to_dict(Config())
    changed = {f"{section}.{key}": value for section, values in to_dict(config).items()
               for key, value in values.items()
               if value != default[section][key] and not f"{section}.{key}".startswith(RESUMABLE_CHANGES)
               and f"{section}.{key}" not in ("data.mean", "data.std")}
    return hashlib.sha256(json.dumps({**changed, "steps": steps}, sort_keys=True).encode()).hexdigest()


def early_loss_cache() -> Path:
    """~/.cache/diffuse/early-loss.json, or under $XDG_CACHE_HOME."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "diffuse" / "early-loss.json"


def read_store(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        tmp.replace(path)


def compare_early_loss(config: Config, steps: int, loss: float, label: str = "") -> Check:
    """Pass when `loss` is at most 5% above the stored value (the package's, then the user's cache);
    a config seen for the first time is recorded in the cache and passes."""
    key, name = early_loss_key(config, steps), f"loss at step {steps}"
    for path in (SHIPPED_EARLY_LOSS, early_loss_cache()):
        entry = read_store(path).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("loss"), (int, float)):
            stored = entry["loss"]
            passed = loss <= EARLY_MARGIN * stored
            detail = "" if passed else (
                f"the mean loss of steps {steps - EARLY_WINDOW + 1}-{steps} is {100 * (loss / stored - 1):.1f}% above "
                f"what this config reached before ({path}): a code change made early training worse")
            return Check(name, passed, f"{loss:.4f}", f"<= {EARLY_MARGIN * stored:.4f} (stored {stored:.4f} + 5%)",
                         detail)
    cache = early_loss_cache()
    table = read_store(cache)
    table[key] = {"loss": loss, "steps": steps, "config": label, "torch": torch.__version__}
    write_json_atomic(cache, table)
    return Check(name, True, f"recorded {loss:.4f}", f"first run of this config: stored in {cache}")


def ship_early_loss(presets=("fmnist-tiny", "fmnist"), steps: int = EARLY_STEPS, device="cpu") -> None:
    """For maintainers: measure the presets' early loss into the package's reference file, which a
    fresh clone consults first. Re-run it when a preset changes (its key changes):
    python -c 'from diffuse.diagnostics import ship_early_loss; ship_early_loss()'."""
    table = {}
    for preset in presets:
        config = load_config(preset)
        data = doctor_data(config, device)
        _, history = train_briefly(config, data, steps, device, progress=True)
        table[early_loss_key(config, steps)] = {"loss": mean_last(history), "steps": steps, "config": preset,
                                                "torch": torch.__version__}
    write_json_atomic(SHIPPED_EARLY_LOSS, table)


def early_loss_check(config: Config, device="cpu", steps: int = EARLY_STEPS, data: TrainData | None = None,
                     label: str = "", progress: bool = False) -> Check:
    """Train `steps` steps and compare the mean loss of the last EARLY_WINDOW with the stored value."""
    data = data if data is not None else doctor_data(config, device)
    _, history = train_briefly(config, data, steps, device, progress)
    return compare_early_loss(config, steps, mean_last(history), label)


# ---------------------------------------------------------------------------------------------
# All of them.


def run_doctor(config: Config, device="cpu", run_dir: Path | None = None, steps: int = EARLY_STEPS,
               label: str = "", progress: bool = False) -> list[Check]:
    """Every check on `config`; the leak check uses the run's EMA weights with `run_dir`, else the
    model of the early-loss training."""
    trained = load_denoiser(Path(run_dir), "ema", device)[1] if run_dir is not None else None  # fail early
    config = copy.deepcopy(config)  # doctor_data fills in the fitted scaling
    data = doctor_data(config, device)
    checks = type_checks(config, fresh_denoiser(config, device), data)
    checks.append(identity_check(config, device, data=data, progress=progress))
    model, history = train_briefly(config, data, steps, device, progress)
    x0, cond = held_out(data, config.train.seed)
    checks.append(leak_check(model if trained is None else trained, x0, cond, seed=config.train.seed))
    checks.append(compare_early_loss(config, steps, mean_last(history), label))
    return checks


def mean_last(history: list[float]) -> float:
    """The mean of the last EARLY_WINDOW losses: one step's loss is too noisy to compare."""
    window = history[-EARLY_WINDOW:]
    return sum(window) / len(window)


def doctor_report(label: str, checks: list[Check]) -> dict:
    """The object of doctor.json and of `diffuse doctor --json`."""
    return {"config": label, "checks": [asdict(c) for c in checks]}


def write_doctor_json(path: Path, label: str, checks: list[Check]) -> None:
    """doctor_report(...) written under a temporary name and renamed, so readers never see half of it."""
    write_json_atomic(Path(path), doctor_report(label, checks))


def format_table(checks: list[Check]) -> str:
    """An aligned text table: check, PASS/FAIL, value, expected, detail (unpadded, last)."""
    rows = [("check", "result", "value", "expected", "detail")]
    rows += [(c.name, "PASS" if c.passed else "FAIL", c.value, c.expected, c.detail) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4]).rstrip()
                     for row in rows)
