"""The files of a prepared data set's feature net, each checked before use (the data set's own
files, data.json and the arrays, are `diffuse.prepared`'s):

    DATA_DIR/features.safetensors the feature net's weights              } written by
    DATA_DIR/features.json        how it was trained, and the SHA-256s  } `metrics.feature_train`
    DATA_DIR/reference.npz        mu (D,), sigma (D, D), n of the held-out split's features (EDM's layout)

Every problem is a UserError of one sentence naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from diffuse.errors import UserError
from diffuse.files import NPY_BROKEN, fsync_path, sha256_file
from diffuse.metrics.fd import FeatureStats

JSON_LIMIT = 1 << 20  # bytes; a data.json or features.json is a few hundred
TRAIN_HINT = "run the feature training: `diffuse data features DATA_DIR` (diffuse.metrics.feature_train.train_feature_net)"
METHODS = ("classifier", "rotation")
FEATURE_DIM = 128


def _is_int(v) -> bool:
    return type(v) is int  # bool is an int subclass, and True is not a resolution


def _is_real(v) -> bool:
    return (type(v) in (int, float)) and math.isfinite(v)


def _is_sha(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


# key: (check, what it must be), for the fields of features.json.
RULES: dict[str, tuple[Callable, str]] = {
    "version": (lambda v: _is_int(v) and v == 1, "1"),
    "resolution": (lambda v: _is_int(v) and 16 <= v <= 256, "an integer in 16..256"),
    "channels": (lambda v: _is_int(v) and v in (1, 3), "1 or 3"),
    "mean": (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1] (pixel units)"),
    "std": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1] (pixel units)"),
    "method": (lambda v: v in METHODS, '"classifier" or "rotation"'),
    "outputs": (lambda v: _is_int(v) and 2 <= v <= 100_000, "an integer in 2..100000"),
    "feature_dim": (lambda v: _is_int(v) and v == FEATURE_DIM, str(FEATURE_DIM)),
    "kimg": (lambda v: _is_real(v) and v > 0, "a number > 0"),
    "batch": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "seconds": (lambda v: _is_real(v) and v >= 0, "a number >= 0"),
    "accuracy": (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "sha256": (_is_sha, "64 lowercase hex digits"),
    "reference_sha256": (_is_sha, "64 lowercase hex digits"),
}
FEATURE_KEYS = ("version", "method", "outputs", "channels", "resolution", "mean", "std", "feature_dim",
                "kimg", "batch", "seed", "seconds", "accuracy", "sha256", "reference_sha256")


def _read_json(path: Path, fmt: str, keys: tuple[str, ...], fix: str) -> dict:
    """The JSON object at `path` whose "format" is `fmt`, every key in `keys` checked against RULES."""
    if not path.is_file():
        raise UserError(f"{path} is missing; {fix}.")
    if path.stat().st_size > JSON_LIMIT:
        raise UserError(f"{path} is over {JSON_LIMIT} bytes, too large to be a {fmt} file; {fix}.")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not UTF-8 JSON ({type(e).__name__}); {fix}.") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise UserError(f"{path} is not a {fmt} file (its \"format\" must be \"{fmt}\"); {fix}.")
    for key in keys:
        check, what = RULES[key]
        if key not in meta:
            raise UserError(f"{path} has no \"{key}\" (it must be {what}); {fix}.")
        if not check(meta[key]):
            raise UserError(f"{path} has \"{key}\": {json.dumps(meta[key])[:80]}, which must be {what}; {fix}.")
    return meta


def read_features_meta(data_dir: Path) -> dict:
    """features.json of the data set's feature net, its fields checked; UserError telling how to retrain."""
    path = Path(data_dir) / "features.json"
    if not path.is_file():
        raise UserError(f"{Path(data_dir)} has no trained feature net ({path.name} is missing); {TRAIN_HINT}.")
    meta = _read_json(path, "diffuse-features", FEATURE_KEYS, TRAIN_HINT)
    if meta["method"] == "rotation" and meta["outputs"] != 4:
        raise UserError(f"{path} has method \"rotation\" with {meta['outputs']} outputs instead of 4; {TRAIN_HINT}.")
    return meta


def check_sha(path: Path, sha: str) -> None:
    """UserError unless the file at `path` exists and has this SHA-256."""
    if not path.is_file():
        raise UserError(f"{path} is missing; {TRAIN_HINT}.")
    if sha256_file(path) != sha:
        raise UserError(f"{path} does not match the SHA-256 in features.json (changed or corrupt); {TRAIN_HINT}.")


def stats_of_moments(mu: np.ndarray, sigma: np.ndarray, n: int) -> FeatureStats:
    """The running sums whose mean is mu (D,) and unbiased covariance is sigma (D, D) over n features."""
    return FeatureStats(n, n * mu, (n - 1) * sigma + n * np.outer(mu, mu))


def load_reference(data_dir: Path, meta: dict) -> FeatureStats:
    """reference.npz (mu (D,), sigma (D, D), n), SHA-256 checked against features.json, as FeatureStats."""
    path = Path(data_dir) / "reference.npz"
    check_sha(path, meta["reference_sha256"])
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma, n = (np.asarray(z[k]) for k in ("mu", "sigma", "n"))
    except (*NPY_BROKEN, KeyError) as e:
        raise UserError(f"{path} is not a reference .npz with mu, sigma and n ({type(e).__name__}); {TRAIN_HINT}.") from None
    d = meta["feature_dim"]
    if (mu.shape != (d,) or sigma.shape != (d, d) or n.shape != () or not np.issubdtype(n.dtype, np.integer)
            or n < 2 or not (np.isfinite(mu).all() and np.isfinite(sigma).all())):
        raise UserError(f"{path} must hold finite mu ({d},), sigma ({d}, {d}) and an integer n >= 2; {TRAIN_HINT}.")
    return stats_of_moments(mu.astype(np.float64), sigma.astype(np.float64), int(n))


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) to a temporary name beside `path`, flushed to disk; returns tmp, for `publish`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves no half file
        raise
    return tmp


def publish(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each (tmp, final) in order (the last, features.json, says the others are whole)."""
    for tmp, final in pairs:
        os.replace(tmp, final)
    fsync_path(pairs[-1][1].parent)


