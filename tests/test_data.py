"""load_dataset: the bundled digits, npz files and MNIST IDX directories (written here, tiny)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from plgk_cli.data import DIGITS_TEST_FRACTION, load_dataset
from plgk_cli.errors import DataError, UserCodeError

# scikit-learn's load_digits: 1797 images of 8x8 pixels with values 0..16, classes 0..9.
DIGITS_TOTAL = 1797
# data.py holds out int(round(0.2 * 1797)) = round(359.4) = 359 test images, leaving 1438 to train
# (the 1438 rows of README's example). Note: sklearn's train_test_split(test_size=0.2) would take
# ceil(359.4) = 360 and leave 1437.
DIGITS_TEST = 359
DIGITS_TRAIN = DIGITS_TOTAL - DIGITS_TEST  # 1438

# IDX magic numbers (http://yann.lecun.com/exdb/mnist/): 0x0000 0x08 (uint8) and the number of
# dimensions: 3 for images (N, H, W), 1 for labels (N,).
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def test_digits_split_sizes(digits):
    assert DIGITS_TEST == int(round(DIGITS_TEST_FRACTION * DIGITS_TOTAL))
    assert len(digits.y_train) == DIGITS_TRAIN
    assert len(digits.y_test) == DIGITS_TEST
    assert digits.x_train.shape == (DIGITS_TRAIN, 1, 8, 8)
    assert digits.x_test.shape == (DIGITS_TEST, 1, 8, 8)
    assert digits.in_shape == (1, 8, 8)


def test_digits_values_and_labels(digits):
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    for x in (digits.x_train, digits.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # pixels 0..16 divided by 16
    # every value is a multiple of 1/16
    assert torch.equal(digits.x_train * 16, torch.round(digits.x_train * 16))
    assert digits.num_classes == 10
    assert set(digits.y_train.tolist()) == set(range(10))
    assert set(digits.y_test.tolist()) <= set(range(10))


def test_digits_float64():
    data = load_dataset("digits", seed=0, dtype=torch.float64)
    assert data.x_train.dtype == torch.float64 and data.x_test.dtype == torch.float64
    assert torch.equal(data.x_train.float(), load_dataset("digits", seed=0).x_train)


def test_digits_split_matches_sklearn_and_seed():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(5).permutation(DIGITS_TOTAL)
    data = load_dataset("digits", seed=5, dtype=torch.float64)
    expected_test = bunch.images[order[:DIGITS_TEST]] / 16.0
    np.testing.assert_array_equal(data.x_test[:, 0].numpy(), expected_test)
    np.testing.assert_array_equal(data.y_train.numpy(), bunch.target[order[DIGITS_TEST:]])


def test_digits_deterministic_for_a_seed(digits):
    again = load_dataset("digits", seed=0)
    for a, b in ((digits.x_train, again.x_train), (digits.y_train, again.y_train),
                 (digits.x_test, again.x_test), (digits.y_test, again.y_test)):
        assert torch.equal(a, b)
    assert digits.fingerprint() == again.fingerprint()


def test_digits_other_seed_other_split_same_data(digits):
    other = load_dataset("digits", seed=1)
    assert not torch.equal(digits.y_test, other.y_test)
    assert not torch.equal(digits.x_train, other.x_train)
    assert digits.fingerprint() != other.fingerprint()
    # the same 1797 images, only split differently
    def rows(data):
        x = torch.cat([data.x_train, data.x_test]).flatten(1)
        y = torch.cat([data.y_train, data.y_test])[:, None].to(x.dtype)
        return sorted(row.tobytes() for row in torch.cat([x, y], 1).numpy())

    assert rows(digits) == rows(other)


def test_split_accessor(digits):
    assert digits.split("train")[0] is digits.x_train and digits.split("test")[1] is digits.y_test
    with pytest.raises(DataError, match="unknown split 'val'"):
        digits.split("val")


def test_unknown_spec():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


# --------------------------------------------------------------------------- fingerprint


def _save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _float_arrays(seed: int = 0, n_train: int = 5, n_test: int = 3, features: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    return {"x_train": rng.normal(size=(n_train, features)),
            "y_train": np.array([0, 1, 2, 1, 0][:n_train]),
            "x_test": rng.normal(size=(n_test, features)), "y_test": np.array([2, 0, 1][:n_test])}


def test_fingerprint_stable_and_sensitive(tmp_path):
    arrays = _float_arrays()
    path = _save(tmp_path / "a.npz", **arrays)
    first = load_dataset(f"npz:{path}").fingerprint()
    assert load_dataset(f"npz:{path}").fingerprint() == first
    assert len(first) == 64 and int(first, 16) >= 0  # sha256 hex digest

    # the same arrays under another file name: the fingerprint covers content, not the path
    assert load_dataset(f"npz:{_save(tmp_path / 'b.npz', **arrays)}").fingerprint() == first

    changed_pixel = dict(arrays, x_test=arrays["x_test"].copy())
    changed_pixel["x_test"][2, 3] += 1e-3  # well above float32 resolution
    changed_label = dict(arrays, y_train=np.array([0, 1, 2, 1, 1]))
    for i, variant in enumerate((changed_pixel, changed_label)):
        path_i = _save(tmp_path / f"changed{i}.npz", **variant)
        assert load_dataset(f"npz:{path_i}").fingerprint() != first
    # the same values in another shape ((N, 4) features vs (N, 1, 2, 2) images) are other data
    reshaped = dict(arrays, x_train=arrays["x_train"].reshape(5, 2, 2),
                    x_test=arrays["x_test"].reshape(3, 2, 2))
    assert load_dataset(f"npz:{_save(tmp_path / 'r.npz', **reshaped)}").fingerprint() != first
    # the dtype training sees is part of the fingerprint
    assert load_dataset(f"npz:{path}", dtype=torch.float64).fingerprint() != first


# --------------------------------------------------------------------------- npz


def test_npz_uint8_images_scaled_and_given_a_channel(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(4, 3, 5), dtype=np.uint8)
    x_train[0, 0, 0], x_train[0, 0, 1] = 0, 255
    x_test = rng.integers(0, 256, size=(2, 3, 5), dtype=np.uint8)
    path = _save(tmp_path / "u8.npz", x_train=x_train, y_train=np.array([0, 1, 1, 3]),
                 x_test=x_test, y_test=np.array([2, 0]))
    data = load_dataset(f"npz:{path}", dtype=torch.float64)
    assert data.x_train.shape == (4, 1, 3, 5) and data.x_test.shape == (2, 1, 3, 5)
    np.testing.assert_array_equal(data.x_train[:, 0].numpy(), x_train / 255.0)
    np.testing.assert_array_equal(data.x_test[:, 0].numpy(), x_test / 255.0)
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    assert data.num_classes == 4  # largest label 3, plus one
    assert torch.equal(data.y_train, torch.tensor([0, 1, 1, 3]))


def test_npz_float_images_kept_as_is(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.normal(size=(3, 2, 4, 4)) * 10  # (N, C, H, W), not in [0, 1]: no scaling
    path = _save(tmp_path / "f.npz", x_train=x_train, y_train=np.array([0, 1, 0]),
                 x_test=x_train[:1], y_test=np.array([1]))
    data = load_dataset(f"npz:{path}", dtype=torch.float64)
    assert data.in_shape == (2, 4, 4)
    np.testing.assert_array_equal(data.x_train.numpy(), x_train)


def test_npz_feature_vectors_get_no_channel(tmp_path):
    arrays = _float_arrays()
    data = load_dataset(f"npz:{_save(tmp_path / 'v.npz', **arrays)}", dtype=torch.float64)
    assert data.x_train.shape == (5, 4) and data.in_shape == (4,)
    np.testing.assert_array_equal(data.x_train.numpy(), arrays["x_train"])


@pytest.mark.parametrize("edit, needles", [
    (lambda a: dict(a, y_train=a["y_train"][:4]), ("x_train has 5 rows", "y_train has 4")),
    (lambda a: dict(a, x_test=a["x_test"][:2]), ("x_test has 2 rows", "y_test has 3")),
    (lambda a: dict(a, y_train=np.array([0, 1, -1, 1, 0])), ("y_train has negative labels",)),
    (lambda a: dict(a, y_test=np.array([2, -3, 1])), ("y_test has negative labels",)),
    (lambda a: dict(a, y_train=np.array([0.0, 1.0, 2.0, 1.0, 0.0])),
     ("y_train must hold integer class labels",)),
    (lambda a: dict(a, y_test=np.array([0.5, 1.0, 1.0])), ("y_test must hold integer",)),
    (lambda a: dict(a, x_test=np.zeros((3, 5))), ("x_train rows (4,)", "x_test rows (5,)")),
    (lambda a: dict(a, x_train=np.zeros((0, 4)), y_train=np.zeros(0, dtype=np.int64)),
     ("training split is empty",)),
    (lambda a: {k: v for k, v in a.items() if k != "y_test"}, ("missing arrays y_test",)),
])
def test_npz_bad_arrays_raise_data_error(tmp_path, edit, needles):
    path = _save(tmp_path / "bad.npz", **edit(_float_arrays()))
    with pytest.raises(DataError) as info:
        load_dataset(f"npz:{path}")
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


# --------------------------------------------------------------------------- mnist IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of uint8 values: big-endian magic, one uint32 per dimension, then the data."""
    magic = {3: IDX_IMAGES_MAGIC, 1: IDX_LABELS_MAGIC}[array.ndim]
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_mnist_arrays() -> dict:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(5, 4, 4), dtype=np.uint8)  # 4x4 "MNIST" images
    x_train[0, 0, :2] = (0, 255)
    return {MNIST_FILES[0]: x_train,
            MNIST_FILES[1]: np.array([3, 0, 7, 1, 3], dtype=np.uint8),
            MNIST_FILES[2]: rng.integers(0, 256, size=(2, 4, 4), dtype=np.uint8),
            MNIST_FILES[3]: np.array([2, 5], dtype=np.uint8)}


def write_mnist(root: Path, arrays: dict, gz: tuple = ()) -> Path:
    """Write the four IDX files under root; the names in `gz` are gzipped (name + .gz)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if name in gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return root


def test_idx_header_layout():
    data = idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))
    assert data[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">3I", data[4:16]) == (2, 3, 4) and len(data) == 16 + 24


@pytest.mark.parametrize("gz", [(), MNIST_FILES, MNIST_FILES[::2]], ids=["raw", "gzip", "mixed"])
def test_mnist_loads_idx(tmp_path, gz):
    arrays = tiny_mnist_arrays()
    root = write_mnist(tmp_path / "mnist", arrays, gz)
    data = load_dataset(f"mnist:{root}", dtype=torch.float64)
    assert data.spec == f"mnist:{root}"
    assert data.x_train.shape == (5, 1, 4, 4) and data.x_test.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(data.x_train[:, 0].numpy(), arrays[MNIST_FILES[0]] / 255.0)
    np.testing.assert_array_equal(data.x_test[:, 0].numpy(), arrays[MNIST_FILES[2]] / 255.0)
    assert data.y_train.dtype == torch.int64
    assert data.y_train.tolist() == [3, 0, 7, 1, 3] and data.y_test.tolist() == [2, 5]
    assert data.num_classes == 8  # largest label 7, plus one
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0


def test_mnist_gzip_and_raw_load_the_same(tmp_path):
    arrays = tiny_mnist_arrays()
    raw = load_dataset(f"mnist:{write_mnist(tmp_path / 'raw', arrays)}")
    gzipped = load_dataset(f"mnist:{write_mnist(tmp_path / 'gz', arrays, MNIST_FILES)}")
    assert raw.fingerprint() == gzipped.fingerprint()


@pytest.mark.parametrize("missing", MNIST_FILES)
def test_mnist_missing_file_names_dir_and_files(tmp_path, missing):
    arrays = tiny_mnist_arrays()
    del arrays[missing]
    root = write_mnist(tmp_path / "mnist", arrays)
    with pytest.raises(DataError) as info:
        load_dataset(f"mnist:{root}")
    message = str(info.value)
    assert f"{missing}[.gz] not found" in message
    assert str(root) in message
    for name in MNIST_FILES:
        assert name in message


def test_mnist_missing_directory(tmp_path):
    root = tmp_path / "no_such_dir"
    with pytest.raises(DataError, match="not found") as info:
        load_dataset(f"mnist:{root}")
    assert str(root) in str(info.value)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_mnist_truncated_data_raises_data_error(tmp_path, gz):
    root = write_mnist(tmp_path / "mnist", tiny_mnist_arrays())
    path = root / MNIST_FILES[0]
    data = path.read_bytes()[:-5]  # drop the last 5 pixels of the last image
    path.unlink()
    if gz:
        path = root / (MNIST_FILES[0] + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    with pytest.raises(DataError, match="truncated IDX file") as info:
        load_dataset(f"mnist:{root}")
    assert str(path) in str(info.value)
    assert "75 values, the header says 80" in str(info.value)  # 5 images of 4x4 = 80 pixels, 5 dropped


def test_mnist_bad_magic_raises_data_error(tmp_path):
    root = write_mnist(tmp_path / "mnist", tiny_mnist_arrays())
    path = root / MNIST_FILES[1]
    path.write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])
    with pytest.raises(DataError, match="bad magic number"):
        load_dataset(f"mnist:{root}")


def test_mnist_unknown_element_type_raises_data_error(tmp_path):
    root = write_mnist(tmp_path / "mnist", tiny_mnist_arrays())
    path = root / MNIST_FILES[1]
    path.write_bytes(b"\x00\x00\x07\x01" + path.read_bytes()[4:])  # 0x07 is no IDX type
    with pytest.raises(DataError, match="unknown IDX element type 0x07"):
        load_dataset(f"mnist:{root}")


# Damaged files become a DataError, so that `plgk train` prints one line, not a traceback.
def test_mnist_truncated_header_raises_data_error(tmp_path):
    root = write_mnist(tmp_path / "mnist", tiny_mnist_arrays())
    path = root / MNIST_FILES[0]
    path.write_bytes(path.read_bytes()[:9])  # magic + 1 of the 3 dimension words (+1 byte)
    with pytest.raises(DataError):
        load_dataset(f"mnist:{root}")


@pytest.mark.parametrize("damage", [lambda gz, raw: gz[:-10], lambda gz, raw: raw],
                         ids=["truncated-gzip", "not-gzip"])
def test_mnist_damaged_gzip_raises_data_error(tmp_path, damage):
    root = write_mnist(tmp_path / "mnist", tiny_mnist_arrays())
    path = root / MNIST_FILES[0]
    raw = path.read_bytes()
    path.unlink()
    (root / (MNIST_FILES[0] + ".gz")).write_bytes(damage(gzip.compress(raw), raw))
    with pytest.raises(DataError):
        load_dataset(f"mnist:{root}")


# --------------------------------------------------------------------------- svhn .mat

# SVHN's cropped-digits files (http://ufldl.stanford.edu/housenumbers/, "format 2") hold X as
# (32, 32, 3, N) uint8 (height, width, channel, image) and y as (N, 1) labels 1..10, where 10 is
# the digit 0.


def write_svhn(root: Path, n_train: int = 5, n_test: int = 3, seed: int = 0) -> dict:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        if name == "train":
            y[:2, 0] = (10, 3)  # a zero and a three for sure
        savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})
        arrays[name] = (x, y)
    return arrays


def test_svhn_loads_mat_files(tmp_path):
    arrays = write_svhn(tmp_path / "svhn")
    data = load_dataset(f"svhn:{tmp_path / 'svhn'}", dtype=torch.float64)
    assert data.spec == f"svhn:{tmp_path / 'svhn'}"
    assert data.x_train.shape == (5, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        raw_x, raw_y = arrays[split]
        for n in range(raw_x.shape[3]):  # image n, channel c, row i, column j = X[i, j, c, n] / 255
            for c in range(3):
                np.testing.assert_array_equal(x[n, c].numpy(), raw_x[:, :, c, n] / 255.0)
        assert y.tolist() == [0 if v == 10 else int(v) for v in raw_y[:, 0]]
    assert data.y_train[:2].tolist() == [0, 3]
    assert data.num_classes == max(int(data.y_train.max()), int(data.y_test.max())) + 1


def test_svhn_missing_file_says_where_to_put_it(tmp_path):
    write_svhn(tmp_path / "svhn")
    (tmp_path / "svhn" / "test_32x32.mat").unlink()
    with pytest.raises(DataError) as info:
        load_dataset(f"svhn:{tmp_path / 'svhn'}")
    message = str(info.value)
    assert "test_32x32.mat not found" in message and str(tmp_path / "svhn") in message
    assert "http://ufldl.stanford.edu/housenumbers/" in message


def test_svhn_damaged_or_foreign_file(tmp_path):
    from scipy.io import savemat

    write_svhn(tmp_path / "svhn")
    path = tmp_path / "svhn" / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(f"svhn:{tmp_path / 'svhn'}")
    savemat(path, {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.ones((2, 1), np.uint8)})
    with pytest.raises(DataError, match=r"SVHN stores uint8 \(32, 32, 3, N\)"):
        load_dataset(f"svhn:{tmp_path / 'svhn'}")
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [4]], np.uint8)})
    with pytest.raises(DataError, match=r"labels in 1..10"):
        load_dataset(f"svhn:{tmp_path / 'svhn'}")


# --------------------------------------------------------------------------- py:module:function


def py_tensors():
    """A user's data function: float64 tensors of 3 features, labels 0..2."""
    x = torch.arange(12, dtype=torch.float64).reshape(4, 3) * 10  # not pixels: used unscaled
    return x, torch.tensor([0, 1, 2, 1]), x[:2] + 0.5, torch.tensor([2, 0])


def py_integer_images():
    return (np.full((3, 2, 2), 255, np.uint8), np.array([0, 1, 1]), np.zeros((1, 2, 2), np.uint8),
            np.array([1]))


def py_not_a_tuple():
    return {"x_train": 1}


def py_float_labels():
    x = torch.zeros(2, 3)
    return x, torch.tensor([0.0, 1.0]), x, torch.tensor([1.0, 0.0])


def py_raises():
    raise FileNotFoundError("/data/mine.csv")


def test_py_function_arrays_are_used_as_returned():
    data = load_dataset("py:test_data:py_tensors", dtype=torch.float64)
    x_train, y_train, x_test, y_test = py_tensors()
    assert torch.equal(data.x_train, x_train) and torch.equal(data.x_test, x_test)
    assert data.y_train.dtype == torch.int64 and data.y_train.tolist() == [0, 1, 2, 1]
    assert data.num_classes == 3 and data.in_shape == (3,)
    # integer arrays are not taken for 8-bit pixels, and no channel axis is added
    images = load_dataset("py:test_data:py_integer_images")
    assert images.x_train.shape == (3, 2, 2) and float(images.x_train.max()) == 255.0
    assert load_dataset("py:test_data:py_tensors").fingerprint() == \
        load_dataset("py:test_data:py_tensors").fingerprint()


@pytest.mark.parametrize("spec, message", [
    ("py:no_such_module_xyz:load", "cannot import"),
    ("py:test_data:no_such_function", "cannot import"),
    ("py:test_data", "expected py:package.module:function"),
    ("py:test_data:py_not_a_tuple", r"returned dict; expected the tuple \(x_train, y_train, x_test, y_test\)"),
    ("py:test_data:py_float_labels", "y_train must hold integer class labels"),
])
def test_py_function_errors(spec, message):
    with pytest.raises(DataError, match=message):
        load_dataset(spec)


def test_py_function_that_raises_is_the_users_code():
    with pytest.raises(UserCodeError, match=r"dataset py:test_data:py_raises: the function raised "
                                            r"\(.*test_data\.py:\d+\): FileNotFoundError: /data/mine\.csv"):
        load_dataset("py:test_data:py_raises")
