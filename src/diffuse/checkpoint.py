"""Atomic, self-describing checkpoints: safetensors for tensors, JSON and TOML for the rest.

    RUN_DIR/checkpoints/step-0000123/
        model.safetensors  ema.safetensors  optimizer.safetensors
        state.json     loop state (step, images seen, the FD measured at this step if any) and the
                       optimizer's non-tensor state
        config.toml    the resolved config that rebuilds the model: no remembered flags, no pickle
        manifest.json  SHA-256 and size of every file above; written last

A checkpoint is written under a temporary name and renamed into place, so a reader sees either a
whole checkpoint or none; one whose manifest does not verify is skipped and reported. A run keeps
its newest `train.keep_checkpoints` checkpoints and the one with the best FD.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffuse.config import Config, read_config, resume_conflicts, to_toml
from diffuse.ema import PHEMA_DIR, reconstruct
from diffuse.errors import UserError
from diffuse.files import failure, fsync_path, read_json, read_limited, sha256_file
from diffuse.nets import build_denoiser

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
REQUIRED = ("model.safetensors", "ema.safetensors", "state.json", "config.toml")
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists a handful of files in ~150 bytes each
MAX_STATE_BYTES = 64 << 20  # state.json: loop state and the optimizer's scalars, a few KB even for big nets
MAX_NIMG = 10 ** 15  # images seen: a thousand times the longest published runs


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(run_dir: Path, step: int, config: Config, tensors: dict[str, dict[str, torch.Tensor]],
                    state: dict) -> Path:
    """Write RUN_DIR/checkpoints/step-NNNNNNN atomically; `tensors` maps file stem -> state dict.

    A whole checkpoint of the same step is never replaced (training is deterministic, so it holds
    the same state).
    """
    final = Path(run_dir) / CHECKPOINTS / checkpoint_name(step)
    if final.is_dir() and verify(final) is None:
        return final
    return write_checkpoint(final, config, tensors, state)


def write_checkpoint(final: Path, config: Config, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Write the checkpoint folder `final` under a temporary name, then rename it into place.

    A failed write (a full disk, a directory turned read-only) removes its temporary folder and
    raises a UserError; what was there before is untouched.
    """
    root = final.parent
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for stem, sd in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, tmp / f"{stem}.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.toml").write_text(to_toml(config))
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for p in tmp.iterdir():
            fsync_path(p)
        aside = root / f".tmp-replaced-{final.name}-{os.getpid()}"
        if final.exists():  # a damaged checkpoint of this step, or an EMA checkpoint to replace: set it aside
            os.rename(final, aside)
        os.rename(tmp, final)
        fsync_path(root)
        shutil.rmtree(aside, ignore_errors=True)  # then drop it, once its replacement is in place
    except (OSError, SafetensorError) as e:  # safetensors raises its own error on a full disk
        raise UserError(f"{str(failure(final, e))[:-1]}; the checkpoints already there are intact.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone on a failure, or a signal; renamed away on success
    return final


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` is whole, else a sentence saying what is wrong.

    Whole means: a manifest that lists every file of the folder (itself aside) by plain names, and
    nothing else, each a plain file (no link, no folder) with its size and SHA-256. A torn write (a
    kill mid-checkpoint), a flipped byte, a truncated, added or removed file, or a manifest emptied to
    `{}` fails.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if manifest_path.is_symlink():
        return f"{manifest_path} is a link, which a checkpoint never holds"
    try:
        manifest = read_json(manifest_path, MAX_MANIFEST_BYTES)
    except (OSError, ValueError, UserError):
        return f"{manifest_path} is missing or unreadable"
    if not isinstance(manifest, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and type(e.get("bytes")) is int
            for e in manifest.values()):
        return f"{manifest_path} is not a diffuse manifest"
    for name in manifest:
        if Path(name).name != name or name in ("", ".", "..", MANIFEST):
            return f"{manifest_path} names a file outside its folder ({name!r})"
    present = {p.name: p for p in path.iterdir() if p.name != MANIFEST}
    for name, file in sorted(present.items()):
        if file.is_symlink() or not file.is_file():
            return f"{file} is a {'link' if file.is_symlink() else 'folder'}, which a checkpoint never holds"
        if name not in manifest:
            return f"{file} is not listed in {manifest_path} (added after the checkpoint was written?)"
    for name, entry in manifest.items():
        file = path / name
        if name not in present:
            return f"{file} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, not the {entry['bytes']} of the manifest (truncated?)"
        if sha256_file(file) != entry["sha256"]:
            return f"{file} does not match its SHA-256 in the manifest"
    return None


def latest_checkpoint(run_dir: Path, report=print) -> Path | None:
    """The newest checkpoint of a run that verifies; broken ones are reported and skipped."""
    root = Path(run_dir) / CHECKPOINTS
    for path in sorted(root.glob("step-*"), reverse=True):
        problem = verify(path)
        if problem is None:
            return path
        report(f"skipping checkpoint {path.name}: {problem}")
    return None


def load_checkpoint(path: Path) -> tuple[Config, dict[str, dict[str, torch.Tensor]], dict]:
    """(config, tensors by file stem, state) of a verified checkpoint.

    Tensors come only from safetensors files and state only from JSON: nothing in a checkpoint is
    executed, so a file from someone else is as safe to load as one's own.
    """
    path = Path(path)
    problem = verify(path)
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}; use another checkpoint.")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise UserError(f"checkpoint {path} lacks {missing[0]}; it was not written by diffuse train.")
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            tensors[file.stem] = load_file(file)
        except Exception as e:  # safetensors raises its own error type, or OSError, on a file that is not one
            raise UserError(f"{file} is not a safetensors file ({str(e).splitlines()[0]}); it is refused, "
                            "never unpickled.") from None
    return read_config(path / "config.toml"), tensors, read_state(path / "state.json")


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, its loop counters checked for type and range (the rest is checked by
    the job that restores it)."""
    try:
        state = read_json(path, MAX_STATE_BYTES)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(state, dict) or type(state.get("nimg")) is not int:
        raise UserError(f"{path} has no images-seen count; it was not written by diffuse train.")
    for key in ("nimg", "step"):
        value = state.get(key, 0)
        if type(value) is not int or not 0 <= value <= MAX_NIMG:
            raise UserError(f"{path}: {key} is {str(value)[:30]}, not a count from 0 to {MAX_NIMG:.0e}; the file is "
                            "damaged: use another checkpoint.")
    return state


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints and the one with the lowest FD; remove the rest and the
    temporary leftovers of killed writers."""
    root = Path(run_dir) / CHECKPOINTS
    paths = sorted(root.glob("step-*"))
    scored = [(fd, path) for path in paths if (fd := recorded_fd(path)) is not None]
    best = min(scored)[1] if scored else None
    for path in paths[:-keep]:
        if path != best:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def recorded_fd(path: Path) -> float | None:
    """The FD that training measured at this checkpoint's step (in its state.json), if any."""
    try:
        fd = json.loads(read_limited(path / "state.json", MAX_STATE_BYTES, "state.json")).get("fd")
    except (OSError, ValueError, RecursionError, AttributeError, UserError):
        return None
    return fd if isinstance(fd, (int, float)) and math.isfinite(fd) else None


def resolve_checkpoint(path: Path) -> Path:
    """A run directory or a checkpoint directory -> the checkpoint to load."""
    path = Path(path)
    if (path / "manifest.json").is_file() or (path.is_dir() and path.name.startswith("step-")):
        return path  # a checkpoint, whole or not: loading it verifies it
    if (path / CHECKPOINTS).is_dir():
        found = latest_checkpoint(path)
        if found:
            return found
        raise UserError(f"run directory {path} has no whole checkpoint yet; train it first.")
    raise UserError(f"{path} is neither a run directory nor a checkpoint; give RUN_DIR or "
                    "RUN_DIR/checkpoints/step-NNNNNNN.")


# ---------------------------------------------------------------------------------------------
# Optimizer state: tensors to safetensors, the rest to JSON.


def split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (flat tensors 'state.<param>.<name>', JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of `split_optimizer_state`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in rest["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def load_denoiser(path: Path, weights: str = "ema", device: str | torch.device = "cpu",
                  sigma_rel: float | None = None):
    """(config, denoiser in eval mode) from a run directory or checkpoint; weights 'ema' or 'model'.

    With `sigma_rel`, the weights are the power-function EMA of that length reconstructed post hoc
    from the run's snapshots (`diffuse.ema.reconstruct`) at the checkpoint's images seen.
    """
    checkpoint = resolve_checkpoint(path)
    config, tensors, state = load_checkpoint(checkpoint)
    if sigma_rel is not None:
        snapshots = checkpoint.parent.parent / PHEMA_DIR
        if config.train.ema != "power" or not snapshots.is_dir():
            raise UserError(f"{path} has no power-function EMA snapshots to reconstruct sigma_rel {sigma_rel} from; "
                            "train with train.ema = \"power\".")
        tensors[weights] = reconstruct(snapshots, sigma_rel, at_nimg=state["nimg"])
    check_run_config(checkpoint, config)
    denoiser = build_denoiser(config)
    source = checkpoint.parent.parent / PHEMA_DIR if sigma_rel is not None else checkpoint / f"{weights}.safetensors"
    check_weights(source, tensors[weights], denoiser.net)
    denoiser.net.load_state_dict(tensors[weights])
    return config, denoiser.to(device).eval().requires_grad_(False)


def check_run_config(checkpoint: Path, config: Config) -> None:
    """A checkpoint inside a run (RUN_DIR/checkpoints/step-N) must hold the run's config, as training requires."""
    run_config = checkpoint.parent.parent / "config.toml"
    if checkpoint.parent.name != CHECKPOINTS or not run_config.is_file():
        return
    conflicts = resume_conflicts(read_config(run_config), config)
    if conflicts:
        raise UserError(f"checkpoint {checkpoint} was written with other settings than {run_config} "
                        f"({', '.join(conflicts)} differ); it belongs to another run: move it away.")


def check_weights(source: Path, weights: dict[str, torch.Tensor], net: torch.nn.Module) -> None:
    """The weights must be exactly the net's tensors: the same names, dtypes and shapes, every value finite."""
    expected = net.state_dict()
    fix = "the weights do not fit the model its config describes; use another checkpoint."
    for name in sorted(set(weights) ^ set(expected)):
        what = "lacks" if name in expected else "holds the unexpected"
        raise UserError(f"{source} {what} tensor {name}; the weights do not fit the model its config describes.")
    for name, want in expected.items():
        got = weights[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise UserError(f"{source}: tensor {name} is {got.dtype} {tuple(got.shape)} where the config implies "
                            f"{want.dtype} {tuple(want.shape)}; {fix}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise UserError(f"{source}: tensor {name} holds values that are not finite; {fix}")
