"""Sample files and grids."""

import numpy as np
import pytest

from diffuse.errors import UserError
from diffuse.images import grid, load_npz, rows_by_label, save_npz


def test_npz_round_trip_and_format_checks(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    labels = np.array([0, 1, -1, 3, 9], dtype=np.int64)
    save_npz(tmp_path / "s.npz", images, labels)
    got_images, got_labels = load_npz(tmp_path / "s.npz")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    np.savez(tmp_path / "bad.npz", images=images, labels=labels[:3])
    with pytest.raises(UserError, match="labels"):
        load_npz(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")


def test_grid_has_a_row_per_class():
    labels = np.arange(300) % 10
    order = rows_by_label(labels)
    assert labels[order].reshape(10, 10).tolist() == [[k] * 10 for k in range(10)]
    assert rows_by_label(np.full(7, -1)).tolist() == list(range(7))
    img = grid(np.zeros((4, 3, 3, 1), np.uint8), nrow=2, pad=1)
    assert img.size == (2 * 4 + 1, 2 * 4 + 1)
