import numpy as np
import pytest

from momos import MoMosConfigError, MoMosFormatError
from momos.apps.data import digits, load_npz


def test_digits_ship_offline_and_split_deterministically():
    a, b = digits(seed=1), digits(seed=1)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.x_train) + len(a.x_test) == 1797 and len(a.x_test) == 359
    assert float(a.x_train.max()) <= 1.0 and (a.x_train == b.x_train).all()


def test_load_npz(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.random.rand(50, 6), y=np.arange(50) % 4)
    data = load_npz(path)
    assert data.input_shape == (6,) and data.num_classes == 4 and len(data.x_test) == 10


@pytest.mark.parametrize("arrays, match", [
    (dict(X=np.zeros((4, 2))), "lacks"),
    (dict(X=np.zeros((4, 2)), y=np.zeros(3, dtype=int)), "equal"),
    (dict(X=np.zeros((4, 2)), y=np.zeros(4)), "integer"),
])
def test_load_npz_rejects_bad_files(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(MoMosFormatError, match=match):
        load_npz(path)


def test_load_npz_missing_and_garbage(tmp_path):
    with pytest.raises(MoMosConfigError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(MoMosFormatError, match="junk"):
        load_npz(junk)
