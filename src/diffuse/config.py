"""Typed configuration: dataclasses, TOML presets, `--set key=value` overrides.

A config is read from a preset (src/diffuse/presets/NAME.toml) or a TOML file, then overridden
key by key; every value is checked against its field's type here and against its range and the
other sections in `diffuse.validation`, and the resolved config is written into the run
directory, so a run is rebuilt from its own files alone.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from diffuse.data import RECORD, recorded
from diffuse.errors import UserError
from diffuse.files import failure, read_limited
from diffuse.validation import validate

PRESETS_DIR = Path(__file__).parent / "presets"
MAX_CONFIG_BYTES = 1 << 20  # a resolved config is ~2 KB; a megabyte is a wrong file (or /dev/zero), not a config
INT_LIMIT = 2 ** 63  # integers are int64 wherever they go (torch, numpy, seeds)


@dataclass
class DataConfig:
    name: str = "fmnist"              # fmnist | toy2d | prepared (data.DATASETS)
    path: str = ""                    # prepared: the DATA_DIR of `diffuse data prepare` (`train --data DATA_DIR`)
    task: str = "class"               # class: condition on what the data set holds (its labels, vectors, paired
                                      # images, or nothing) | superres: on a low-res version of the image (data.TASKS)
    xflip: bool = False               # augment: each training image mirrored left-right with probability 1/2
    factor: int = 4                   # superres: the condition is the image average-pooled factor x factor
    mean: float | None = None         # pixel scaling x = (p / 255 - mean) / std, fitted on the first run
    std: float | None = None
    # prepared: its DATA_DIR as the run saw it, recorded when the run starts (`data.described`), so that the
    # run samples where the folder is not, and refuses a folder that now holds other images
    shape: list[int] | None = None    # one image (C, R, R)
    classes: int | None = None        # its classes (0: none)
    condition: str | None = None      # none | label | vector | image (data.CONDITIONS)
    cond_shape: list[int] | None = None  # a vector (D,) or an image condition (C, h, w); [] for labels or none
    sha256: str | None = None         # of images.npy, as data.json records it


@dataclass
class DiffusionConfig:
    process: str = "vp"               # vp (DDPM, 1000 steps) | flow (rectified flow, t in [0, 1]) | edm (t = sigma)
    schedule: str = "linear"          # vp betas: linear | scaled_linear | cosine
    zero_terminal_snr: bool = True    # Lin et al. 2023: alpha_bar at the last step is exactly 0
    prediction: str = "v"             # eps | x0 | v | flow | edm (EDM preconditioning, any process)
    sigma_data: float = 1.0           # edm preconditioning: the data's std (1: diffuse scales data to std 1)
    P_mean: float = -0.1              # edm process: ln sigma ~ N(P_mean, P_std) in training; EDM2's pixel
    P_std: float = 1.6                # (-0.8, 1.6) for data of std 0.5, moved by ln 2 for data of std 1
    sigma_min: float = 0.002          # edm process: the rho schedule of the samplers (Karras et al. 2022, eq. 5)
    sigma_max: float = 80.0
    rho: float = 7.0


@dataclass
class ModelConfig:
    net: str = "unet"                 # unet (images) | mp_unet (EDM2's magnitude-preserving U-Net) | mlp (2-D points)
    fixed_mp: bool = True             # mp_unet: magnitude-preserving fixed-function layers (EDM2 config G) or
                                      # plain SiLU, sum and concatenation around the MP learned layers (D-F)
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])  # unet: per level
    blocks: int = 2                   # unet: residual blocks per level
    attn_levels: list[int] = field(default_factory=lambda: [2])  # unet: levels with attention
    emb_dim: int = 256                # width of the time + condition embedding
    hidden: int = 256                 # mlp: width
    depth: int = 4                    # mlp: residual blocks
    dropout: float = 0.0
    cond_drop: float = 0.1            # probability of training on the null condition (for CFG)


@dataclass
class TrainConfig:
    kimg: float = 200.0               # training length in thousands of images
    batch: int = 64
    lr: float = 2e-4
    warmup_kimg: float = 2.0          # linear learning-rate warm-up
    weight_decay: float = 0.0
    adam_beta2: float = 0.999         # EDM2 uses 0.99
    grad_clip: float = 1.0            # max global gradient norm; 0 turns clipping off
    lr_schedule: str = "constant"     # constant (after warm-up) | inv_sqrt: lr / sqrt(max(nimg / lr_ref_kimg / 1000, 1)) (EDM2)
    lr_ref_kimg: float = 100.0        # inv_sqrt: where the decay starts, in thousands of images
    loss_weighting: str = "uniform"   # uniform MSE in the net's parameterization | uncertainty (EDM2's learned
                                      # per-noise-level weighting; mp_unet only)
    ema: str = "traditional"          # traditional (half-life below) | power (EDM2's power-function EMA, post-hoc)
    ema_halflife_kimg: float = 10.0   # traditional: EMA half-life in thousands of images
    ema_rampup: float = 0.1           # traditional: half-life <= rampup * images seen, so early EMA forgets fast
    ema_sigma_rels: list[float] = field(default_factory=lambda: [0.10, 0.05])  # power: tracked EMA lengths; the
                                      # first is the run's EMA (grids, FD, `diffuse sample`)
    ema_snapshot_kimg: float = 10.0   # power: snapshots of every tracked EMA for `diffuse ema`, every this many kimg
    seed: int = 0
    log_kimg: float = 2.0             # metrics.jsonl line every this many kimg
    grid_kimg: float = 20.0           # sample grid every this many kimg
    checkpoint_kimg: float = 20.0     # checkpoint every this many kimg (and at the end)
    keep_checkpoints: int = 3         # newest checkpoints kept
    probe_kimg: float = 1.0           # a linear-probe step (one batch) every this many kimg; 0 = no probe
    fd_kimg: float = 0.0              # FD of EMA samples every this many kimg (and at the end); 0 = never
    fd_n: int = 2000                  # samples per in-training FD
    fd_steps: int = 10                # sampler steps for the in-training FD (no guidance: it watches the model)
    threads: int = 0                  # torch CPU threads; 0 keeps torch's default
    nonfinite: str = "stop"           # a non-finite loss or gradient: stop (exit code 3) | skip the step
    precision: str = "auto"           # speed: auto (bf16 where the device computes it natively: AVX-512 BF16 or
                                      # AMX, a CUDA device with bf16; else fp32; the choice is written into the
                                      # run's config) | fp32 | bf16 (autocast of the forward passes and the loss;
                                      # weights, optimizer and EMA stay float32). The probe, grids and FD follow it
    channels_last: bool = False       # speed: the net and 4-D inputs in channels_last memory order (NHWC)
    compile: bool = False             # speed: torch.compile the net (compiles during the first steps)


@dataclass
class SampleConfig:
    sampler: str = "ddim"             # ddim | ddpm | euler (flow only) | heun (EDM, any process) | renoise
                                      # (a distilled few-step generator: x0_hat noised afresh each step)
    steps: int = 25
    spacing: str = "trailing"         # trailing | leading | linspace
    eta: float = 0.0
    cfg: float = 1.0                  # classifier-free guidance scale w; 1 = none
    rescale: float = 0.0              # guidance rescale phi (Lin et al.), 0 = none
    S_churn: float = 0.0              # heun: EDM's stochastic churn (Karras et al. 2022, Algorithm 2); 0 = deterministic
    n_eval: int = 10_000              # samples for the FD of `diffuse eval RUN`
    batch: int = 64                   # images per sampler call (small batches run faster on a CPU)
    precision: str = "auto"           # the net's forward passes: auto (bf16 where the sampling device computes it
                                      # natively, as train.precision) | fp32 | bf16 (autocast; the solver stays fp32)

    def sampler_args(self) -> dict:
        """The keyword arguments of `sampling.sample` that this config sets."""
        return {k: getattr(self, k) for k in ("sampler", "steps", "spacing", "eta", "cfg", "rescale", "S_churn",
                                                   "batch", "precision")}


@dataclass
class DistillConfig:
    """`diffuse distill`: DMD (Yin et al. 2023) and DMD2 (Yin et al. 2024). The student's [train]
    section sets its length, batch, learning rate (generator and fake score alike) and logging."""
    method: str = "none"              # none (a trained model) | dmd | dmd2
    teacher: str = ""                 # the teacher's run directory, as given to `diffuse distill`
    generator_steps: int = 1          # 1: one-step; k > 1: k-step generator trained with backward simulation
    gen_every: int = 1                # the generator steps every gen_every-th iteration, the fake score every one
                                      # (DMD2's two-time-scale update: 5)
    regression: float = 0.0           # dmd: weight of the regression loss on teacher noise-image pairs (paper: 0.25)
    pairs: int = 2000                 # dmd: noise-image pairs drawn by the teacher's deterministic sampler
    pair_steps: int = 25              # dmd: the teacher sampler's steps for the pairs
    gan_gen: float = 0.0              # dmd2: weight of the generator's GAN loss (DMD2 ImageNet: 3e-3); 0 = no GAN
    gan_disc: float = 1e-2            # dmd2: weight of the classifier's GAN loss
    real_cfg: float = 1.0             # guidance scale of the real score (1 = none)
    dm_t_min: float = 0.02            # the DM loss draws its noise level from this fraction of the time grid ...
    dm_t_max: float = 0.98            # ... to this one (1000 levels from clean to noise)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# Keys a resumed run may change: how long to train, how often to log, probe and measure, how to sample,
# and the speed switches (diffuse.speed), which change how a step runs but not the weights' files.
RESUMABLE_CHANGES = ("train.kimg", "train.log_kimg", "train.grid_kimg", "train.checkpoint_kimg",
                     "train.keep_checkpoints", "train.threads", "train.probe_kimg", "train.fd_", "train.nonfinite",
                     "train.ema_snapshot_kimg", "train.precision", "train.channels_last", "train.compile",
                     "sample.")


# ---------------------------------------------------------------------------------------------
# Reading.


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: list[str] = (), base: Config | None = None) -> Config:
    """Defaults (or a copy of `base`) <- preset or TOML file <- `key=value` overrides, validated."""
    if sum(x is not None and x != "" for x in (preset, path, base)) > 1:
        raise UserError("give --preset or --config, not both.")
    table: dict[str, Any] = {}
    if preset:
        table = _read_toml(preset_path(preset))
    elif path:
        table = _read_toml(Path(path))
    config = copy.deepcopy(base) if base is not None else from_dict(table)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} is not key=value; write e.g. --set train.kimg=50.")
        set_value(config, key.strip(), parse_value(text.strip()))
    validate(config)
    return config


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        hint = difflib.get_close_matches(name, preset_names(), n=1)
        also = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(f"unknown preset '{name}'{also}; choose one of {', '.join(preset_names())}.")
    return path


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(read_limited(path, MAX_CONFIG_BYTES, "config"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; give the path of a TOML file.") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a folder; give the path of a TOML file.") from None
    except OSError as e:
        raise failure(path, e, "read") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); TOML files are "
                        "UTF-8: save it as UTF-8.") from None
    except ValueError as e:  # TOMLDecodeError, and the int() of an integer of over 4300 digits
        raise UserError(f"{path} is not valid TOML ({e}); fix the file.") from None
    except RecursionError:
        raise UserError(f"{path} nests arrays or tables too deeply to read; fix the file.") from None


def parse_value(text: str) -> Any:
    """A TOML value ('50', '1e-4', 'true', '[1, 2]', '"x"'); a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except ValueError:  # an integer of over 4300 digits
        raise UserError(f"--set value {text[:20]}... is a number too long to read; give a plain value.") from None
    except RecursionError:
        raise UserError(f"--set value {text[:20]}... nests arrays too deeply; give a plain value.") from None


def read_config(path: Path, check: bool = True) -> Config:
    """The config stored in a TOML file (a run's or a checkpoint's config.toml), validated; with check=False
    only typed: what the file says, whether or not its data set is here to check it against."""
    try:
        config = from_dict(_read_toml(Path(path)))
        if check:
            validate(config)
    except UserError as e:
        raise UserError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
    return config


def from_dict(table: dict) -> Config:
    config = Config()
    for section, values in table.items():
        if not isinstance(values, dict):
            raise UserError(f"config key '{section}' must be a [section]; sections are "
                            f"{', '.join(_sections())}.")
        for key, value in values.items():
            set_value(config, f"{section}.{key}", value)
    return config


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s in _sections() for f in dataclasses.fields(getattr(Config(), s))]


def set_value(config: Config, key: str, value: Any) -> None:
    """Set section.name = value, checking the key exists and the value has the field's type."""
    if key not in all_keys():
        hint = difflib.get_close_matches(key, all_keys(), n=1)
        also = f"; did you mean '{hint[0]}'?" if hint else "; see `diffuse train --help` for the keys."
        raise UserError(f"unknown config key '{key}'{also}")
    section, name = key.split(".")
    part = getattr(config, section)
    setattr(part, name, _coerce(key, get_type_hints(type(part))[name], value))


def _coerce(key: str, kind, value):
    """Check `value` against the annotated type, converting int -> float where a float is wanted."""
    optional = type(None) in get_args(kind)
    base = next((a for a in get_args(kind) if a is not type(None)), kind) if optional else kind
    if value is None and optional:
        return None
    if get_origin(base) is list and get_args(base) == (float,):
        if not isinstance(value, list) or not all(type(v) in (int, float) and finite(v) for v in value):
            raise UserError(f"{key} must be a list of numbers such as [0.1, 0.05], not {value!r}.")
        return [float(v) for v in value]
    if get_origin(base) is list:
        if not isinstance(value, list) or not all(type(v) is int and abs(v) < INT_LIMIT for v in value):
            raise UserError(f"{key} must be a list of integers such as [64, 128], not {value!r}.")
        return list(value)
    if base is float and type(value) in (int, float):
        if not finite(value):
            raise UserError(f"{key} must be a finite number, not {_shown(value)}.")
        return float(value)
    if base is int and type(value) is int and abs(value) >= INT_LIMIT:
        raise UserError(f"{key} must be an integer of at most 2**63 - 1, not {_shown(value)}.")
    if type(value) is base:
        return value
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    raise UserError(f"{key} must be {names.get(base, base.__name__)}, not {value!r}.")


def finite(v: int | float) -> bool:
    """Whether a TOML number is a finite float64; an integer too large for one is not."""
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------
# Writing.


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """The config as TOML text (unset optional values are left out)."""
    lines = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def resume_conflicts(old: Config, new: Config) -> list[str]:
    """Keys whose values differ between a run's config and a new one, other than those a resume may change,
    a data set's record where one of them has none (a run from before `data.described`), and the path of a
    data set whose record both share (the same images, moved)."""
    a, b = to_dict(old), to_dict(new)
    unrecorded = not recorded(old.data) or not recorded(new.data)
    moved = not unrecorded and recorded(old.data) == recorded(new.data)
    return [f"{s}.{k}" for s in a for k in a[s]
            if a[s][k] != b[s][k] and not f"{s}.{k}".startswith(RESUMABLE_CHANGES)
            and not (unrecorded and s == "data" and k in RECORD) and not (moved and f"{s}.{k}" == "data.path")]
