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


def test_an_npz_packed_with_a_compression_zipfile_lacks_is_one_sentence(tmp_path):
    """zipfile raises NotImplementedError for deflate64 (method 9): every .npz reader refuses it in one sentence."""
    import zipfile

    from diffuse.images import check_samples_file
    from diffuse.metrics.inception import read_reference

    path = tmp_path / "s.npz"
    save_npz(path, np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        offsets = [i.header_offset for i in z.infolist()]
    for off in offsets:  # the method field of each local header, then of each central directory entry
        data[off + 8:off + 10] = (9).to_bytes(2, "little")
    central = 0
    while (central := data.find(b"PK\x01\x02", central)) != -1:
        data[central + 10:central + 12] = (9).to_bytes(2, "little")
        central += 4
    path.write_bytes(bytes(data))
    for read in (load_npz, check_samples_file, read_reference):
        with pytest.raises(UserError) as e:
            read(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
