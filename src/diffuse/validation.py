"""Range and consistency checks of a Config: one function per section, each failure one sentence
naming the key and the fix. The choice lists are the modules' own (data sets, processes,
predictions, nets, samplers), and the limits on a net come from its data set's shape.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from diffuse.data import DATASETS, TASKS, dataset, recorded
from diffuse.denoiser import PREDICTIONS
from diffuse.errors import UserError
from diffuse.nets import NETS
from diffuse.process import PROCESSES, SCHEDULES, SPACINGS
from diffuse.speed import PRECISIONS
from diffuse.sampling import SAMPLERS

if TYPE_CHECKING:  # config imports this module
    from diffuse.config import Config, DiffusionConfig

CHOICES = {
    "data.name": DATASETS,
    "data.task": TASKS,
    "diffusion.process": PROCESSES,
    "diffusion.schedule": SCHEDULES,
    "diffusion.prediction": PREDICTIONS,
    "model.net": NETS,
    "sample.sampler": tuple(SAMPLERS),
    "distill.method": ("none", "dmd", "dmd2"),
    "sample.spacing": SPACINGS,
    "train.nonfinite": ("stop", "skip"),
    "train.lr_schedule": ("constant", "inv_sqrt"),
    "train.loss_weighting": ("uniform", "uncertainty"),
    "train.ema": ("traditional", "power"),
    "train.precision": PRECISIONS,
    "sample.precision": PRECISIONS,
}
POSITIVE = {"data.factor", "diffusion.sigma_data", "diffusion.P_std", "diffusion.sigma_min", "diffusion.sigma_max",
            "diffusion.rho", "train.lr_ref_kimg", "train.ema_snapshot_kimg", "train.kimg", "train.batch", "train.lr", "train.ema_halflife_kimg", "train.log_kimg",
            "train.grid_kimg", "train.checkpoint_kimg", "train.keep_checkpoints", "train.fd_n", "train.fd_steps",
            "model.blocks", "model.emb_dim", "model.hidden", "model.depth", "sample.steps", "sample.n_eval", "sample.batch",
            "distill.generator_steps", "distill.gen_every", "distill.pairs", "distill.pair_steps"}
NONNEGATIVE = {"train.warmup_kimg", "train.weight_decay", "train.grad_clip", "train.seed", "train.threads",
               "train.probe_kimg", "train.fd_kimg", "sample.cfg", "sample.S_churn", "distill.regression",
               "distill.gan_gen", "distill.gan_disc", "distill.real_cfg"}
PROBABILITY = {"train.adam_beta2", "model.dropout", "model.cond_drop", "train.ema_rampup", "sample.rescale", "sample.eta",
               "distill.dm_t_min", "distill.dm_t_max"}


def validate(config: Config) -> None:
    """Range and consistency checks; each failure is one sentence naming the key and the fix."""
    check_ranges(config)
    check_data(config)
    check_diffusion(config.diffusion)
    check_model(config)
    check_train(config)
    check_sample(config)
    check_distill(config)


def check_ranges(config: Config) -> None:
    """Every key of CHOICES, POSITIVE, NONNEGATIVE and PROBABILITY within its set or range."""
    flat = dataclasses.asdict(config)

    def value(key):
        section, name = key.split(".")
        return flat[section][name]

    for key, choices in CHOICES.items():
        if value(key) not in choices:
            raise UserError(f"{key} = {value(key)!r} is not one of {', '.join(choices)}.")
    for key in POSITIVE:
        if not value(key) > 0:
            raise UserError(f"{key} must be greater than 0, not {value(key)!r}.")
    for key in NONNEGATIVE:
        if not value(key) >= 0:
            raise UserError(f"{key} must be 0 or more, not {value(key)!r}.")
    for key in PROBABILITY:
        if not 0 <= value(key) <= 1:
            raise UserError(f"{key} must lie in [0, 1], not {value(key)!r}.")


def check_data(config: Config) -> None:
    dataset(config.data)  # the data set exists, and its task and factor fit its images
    kept = [key for key, value in recorded(config.data).items() if value is not None]
    if config.data.name != "prepared" and kept:
        raise UserError(f"data.{kept[0]} and its kin record a prepared data set's DATA_DIR; "
                        f"remove them from a data.name '{config.data.name}' config.")
    if (config.data.mean is None) != (config.data.std is None) or (config.data.std is not None
                                                                  and config.data.std <= 0):
        raise UserError("data.mean and data.std go together, with std > 0; leave both unset to fit them.")


def check_diffusion(d: DiffusionConfig) -> None:
    terminal_alpha_zero = d.process == "flow" or (d.process == "vp" and d.zero_terminal_snr)
    if d.prediction == "eps" and terminal_alpha_zero:
        why = "rectified flow" if d.process == "flow" else "zero terminal SNR"
        raise UserError(f"eps-prediction cannot be used with {why}: at the last step alpha = 0 and "
                        "x0 = (x_t - sigma * eps) / alpha divides by zero; use prediction v or x0.")
    if d.process == "edm" and d.prediction not in ("edm", "eps", "x0"):
        raise UserError(f"prediction '{d.prediction}' does not suit process 'edm', whose sigma reaches "
                        f"{d.sigma_max:g}; use prediction edm (EDM's preconditioning), eps or x0.")
    if d.process == "edm" and d.sigma_min >= d.sigma_max:
        raise UserError(f"diffusion.sigma_min {d.sigma_min:g} must be below diffusion.sigma_max {d.sigma_max:g}.")
    if d.prediction == "flow" and d.process != "flow":
        raise UserError("prediction 'flow' is the rectified-flow velocity; use it with process 'flow'.")


def check_model(config: Config) -> None:
    """The net suits the data set: its kind of example and condition, and its levels the image side."""
    m, data = config.model, dataset(config.data)
    if data.is_image == (m.net == "mlp"):
        raise UserError(f"data '{data.name}' goes with model.net {'unet or mp_unet' if data.is_image else 'mlp'}, "
                        f"not {m.net!r}.")
    if m.net == "mp_unet" and config.diffusion.process != "edm":
        raise UserError("model.net 'mp_unet' embeds EDM's c_noise = ln(sigma) / 4; use it with diffusion.process 'edm'.")
    if m.net == "mp_unet" and data.condition not in ("label", "none"):
        raise UserError(f"model.net 'mp_unet' takes class labels or no condition, not the {data.condition} "
                        f"condition of {data.name!r}; use 'unet'.")
    if not data.is_image:
        return
    if not m.channels or min(m.channels) < 8 or any(c % 8 for c in m.channels):
        raise UserError(f"model.channels {m.channels} must be multiples of 8, at least 8.")
    side = min(data.shape[1:])
    most = max(level for level in range(1, 9) if side % 2 ** (level - 1) == 0)
    if len(m.channels) > most:
        raise UserError(f"model.channels has {len(m.channels)} levels; {data.shape[1]}x{data.shape[2]} images "
                        f"allow at most {most}.")
    if any(not 0 <= lv < len(m.channels) for lv in m.attn_levels):
        raise UserError(f"model.attn_levels {m.attn_levels} must name levels 0 to {len(m.channels) - 1}.")


def check_train(config: Config) -> None:
    t, m = config.train, config.model
    if t.adam_beta2 >= 1:
        raise UserError(f"train.adam_beta2 {t.adam_beta2:g} must be below 1: Adam's second moment needs to forget.")
    if t.loss_weighting == "uncertainty" and m.net != "mp_unet":
        raise UserError("train.loss_weighting 'uncertainty' needs the log-variance head of model.net 'mp_unet'.")
    if t.ema == "power" and (not t.ema_sigma_rels or not all(0 < r < 0.2887 for r in t.ema_sigma_rels)):
        raise UserError(f"train.ema_sigma_rels {t.ema_sigma_rels} must be one or more values in (0, 0.2887).")
    if config.diffusion.process == "vp" and t.fd_steps > 1000:
        raise UserError(f"train.fd_steps must be at most 1000, the steps of process 'vp', not {t.fd_steps}.")
    data = dataset(config.data)
    if t.fd_kimg > 0 and data.features is None and data.at_hand:  # no folder: no training either
        raise UserError(f"train.fd_kimg measures an FD, and data '{config.data.name}' has no feature net; set it to 0.")


def check_sample(config: Config) -> None:
    s, d = config.sample, config.diffusion
    if s.S_churn > 0 and s.sampler != "heun":
        raise UserError(f"sample.S_churn {s.S_churn:g} is the heun sampler's churn; set sample.sampler = 'heun' or leave it 0.")
    if d.process == "vp" and s.steps > 1000:
        raise UserError(f"sample.steps must be at most 1000, the steps of process 'vp', not {s.steps}.")
    if s.sampler == "euler" and d.process != "flow":
        raise UserError("the euler sampler integrates the rectified-flow ODE; use ddim for process 'vp'.")


def check_distill(config: Config) -> None:
    dist, t = config.distill, config.train
    if dist.dm_t_min >= dist.dm_t_max:
        raise UserError(f"distill.dm_t_min {dist.dm_t_min:g} must be below distill.dm_t_max {dist.dm_t_max:g}.")
    if dist.method == "dmd" and dist.gan_gen > 0:
        raise UserError("distill.gan_gen is DMD2's GAN term; use distill.method 'dmd2' for it.")
    if dist.method != "none" and (t.channels_last or t.compile):
        raise UserError("diffuse distill takes train.precision but not train.channels_last or train.compile; "
                        "set them to false.")
    if dist.method == "dmd2" and dist.regression > 0:
        raise UserError("distill.regression is DMD's loss on teacher pairs, which DMD2 drops; use method 'dmd'.")
