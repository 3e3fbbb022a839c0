"""diffuse: train conditional diffusion models from scratch, sample them fast, distill them, measure them.

The Python API (`diffuse.api`): `load(run).sample(...)` and its `denoiser`, `train`, `distill`,
`evaluate`, `fd`; every mistake raises `UserError` with the sentence the command prints.
"""

from diffuse.api import Model, Samples, distill, evaluate, fd, load, make_config, train
from diffuse.config import Config
from diffuse.errors import Diverged, Interrupted, UserError

__all__ = ["Config", "Diverged", "Interrupted", "Model", "Samples", "UserError", "distill", "evaluate", "fd",
           "load", "make_config", "train"]
