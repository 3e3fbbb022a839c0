"""diffuse: train conditional diffusion models from scratch, sample them fast, distill them, measure them.

The Python API (`diffuse.api`): `load(run).sample(...)` and its `denoiser`, `train`, `distill`,
`evaluate`, `fd`; every mistake raises `UserError` with the sentence the command prints.

The names below are imported on first use, so `python -m diffuse` can install its signal handler
(`diffuse.__main__`) before torch is imported.
"""

import importlib

_HOMES = {"Model": "diffuse.api", "Samples": "diffuse.api", "distill": "diffuse.api", "evaluate": "diffuse.api",
          "fd": "diffuse.api", "load": "diffuse.api", "make_config": "diffuse.api", "train": "diffuse.api",
          "Config": "diffuse.config", "Diverged": "diffuse.errors", "Interrupted": "diffuse.errors",
          "UserError": "diffuse.errors"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'diffuse' has no attribute {name!r}")
