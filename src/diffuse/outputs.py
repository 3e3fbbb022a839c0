"""What a command may write to: a new path, or one that verifies as its own kind of output.

Every writing command asks here first, before its long work, so that a user's own folder or file (or a
training checkpoint given as `ema --out`) is never replaced, and a path that cannot be written is
found before minutes of sampling:

    run directory (train, distill --out)   new, empty, or a run: `is_run_dir`
    checkpoint (ema --out)                 new, or a checkpoint that verifies and that `diffuse ema` wrote
    samples (sample --out)                 new, or an .npz that reads as a samples file
    picture (sample --grid)                new, or a PNG
    a run's own files (doctor --run, ema --sweep)   inside a run directory, each a file or new
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffuse.checkpoint import CHECKPOINTS, MANIFEST, MAX_STATE_BYTES, verify
from diffuse.config import read_config
from diffuse.errors import UserError
from diffuse.files import read_limited
from diffuse.images import check_samples_file
from diffuse.lock import LOCK

RUN_MARK = "# diffuse run: the resolved config of this run directory, written by diffuse train or distill"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_EVENT_BYTES = 1 << 16  # one metrics.jsonl event is ~300 bytes; a longer first line is not diffuse's


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a diffuse run directory: its config.toml, a plain file, reads as a diffuse config
    and either starts with RUN_MARK (a run written since the mark) or sits beside a checkpoints/ folder or
    a metrics.jsonl whose first line is a diffuse event (a JSON object with "event" and "kimg")."""
    config = Path(path) / "config.toml"
    if config.is_symlink() or not config.is_file():
        return False
    try:
        read_config(config, check=False)  # what it is, not whether its data set is here
    except UserError:
        return False
    with open(config, "rb") as f:
        marked = f.readline(len(RUN_MARK) + 2).decode(errors="replace").rstrip("\n") == RUN_MARK
    return marked or (Path(path) / CHECKPOINTS).is_dir() or logged_by_diffuse(Path(path) / "metrics.jsonl")


def logged_by_diffuse(metrics: Path) -> bool:
    """Whether metrics.jsonl's first line is a diffuse event."""
    if metrics.is_symlink() or not metrics.is_file():
        return False
    with open(metrics, "rb") as f:
        line = f.readline(MAX_EVENT_BYTES)
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(event, dict) and isinstance(event.get("event"), str) and \
        type(event.get("kimg")) in (int, float)


def check_writable(path: Path, flag: str) -> None:
    """The nearest existing folder above a new `path` must be a folder this process can write into."""
    above = Path(os.path.abspath(path)).parent
    while not above.exists():
        above = above.parent
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be written: {above} is not a writable folder; choose another path.")


def check_run_out(path: Path, flag: str = "--out") -> None:
    """A run directory to write: new, empty (a .lock aside), or a run (`is_run_dir`), which is resumed."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"{flag} {path} is a {'link' if path.is_symlink() else 'file'}; give a new path, an empty "
                        "folder, or a run directory to resume.")
    if not path.exists():
        return check_writable(path, flag)
    if any(p.name != LOCK for p in path.iterdir()) and not is_run_dir(path):
        raise UserError(f"{flag} {path} is a folder with files that is not a diffuse run directory (a run's "
                        "config.toml is marked, or sits beside checkpoints/ or diffuse's metrics.jsonl); "
                        "choose a new --out.")


def check_run(path: Path, flag: str) -> None:
    """An existing run directory that a command adds its own files to (doctor --run, ema --sweep)."""
    if not Path(path).is_dir() or not is_run_dir(Path(path)):
        raise UserError(f"{flag} {path} is not a diffuse run directory; give the --out of a training run.")


def check_file_out(path: Path, flag: str, owned=lambda path: True, kind: str = "file") -> None:
    """A file to write: new, or a plain file that `owned(path)` accepts as one of this command's outputs."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UserError(f"{flag} {path} is a {'link' if path.is_symlink() else 'folder'}; give the path of a "
                        f"{kind} to write.")
    if not path.exists():
        return check_writable(path, flag)
    if not owned(path):
        raise UserError(f"{flag} {path} exists and is not a {kind}; choose a new path (it is left untouched).")
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be replaced (no write permission); choose another path.")


def is_samples_file(path: Path) -> bool:
    try:
        check_samples_file(path)
    except UserError:
        return False
    return True


def is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(PNG_MAGIC)) == PNG_MAGIC


def check_samples_out(path: Path, grid: Path | None = None) -> None:
    """sample --out (new, or a samples .npz) and --grid (new, or a PNG)."""
    check_file_out(path, "--out", is_samples_file, "samples .npz")
    if grid is not None:
        check_file_out(grid, "--grid", is_png, "PNG")
        if Path(os.path.abspath(grid)) == Path(os.path.abspath(path)):
            raise UserError(f"--grid {grid} is the --out file; give the picture a path of its own.")


def check_checkpoint_out(path: Path) -> None:
    """ema --out: new, or a checkpoint folder that verifies and that `diffuse ema` wrote (its state.json
    records ema_sigma_rel), never a training checkpoint nor a user's folder."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"--out {path} is a {'link' if path.is_symlink() else 'file'}; give a new path for the "
                        "checkpoint folder.")
    if not path.exists():
        return check_writable(path, "--out")
    if verify(path) is not None or not written_by_ema(path):
        raise UserError(f"--out {path} exists and is not a checkpoint written by `diffuse ema`; choose a new path "
                        "(it is left untouched).")


def written_by_ema(checkpoint: Path) -> bool:
    try:
        state = json.loads(read_limited(checkpoint / "state.json", MAX_STATE_BYTES, "state.json"))
    except (OSError, ValueError, RecursionError, UserError):
        return False
    return isinstance(state, dict) and "ema_sigma_rel" in state and (checkpoint / MANIFEST).is_file()
