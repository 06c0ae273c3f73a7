"""Datasets as training sees them: split tensors, class count, input shape and a fingerprint.

Specs: ``digits`` (scikit-learn's bundled 8x8 digits, no download), ``diabetes`` (scikit-learn's
bundled diabetes regression data, targets standardised), ``synthetic-text`` (generated token
sequences for text classification, see :func:`synthetic_text`), ``addition`` (generated two-digit
sums as byte-level text for language models, with planted wrong answers, see :func:`addition`),
``npz:PATH`` (arrays x_train, y_train, x_test, y_test; or, for language models, token ids
ids_train, ids_test with optional masks mask_train, mask_test), ``text:PATH`` (a text file, one
sequence per line, byte-level tokens for language models), ``mnist:DIR`` (the four standard IDX files, gzipped or not),
``svhn:DIR`` (train_32x32.mat and test_32x32.mat) and ``py:package.module:function`` (a function
of the user's that returns x_train, y_train, x_test, y_test).
Images from files get a channel axis (N, C, H, W) and integer pixels are scaled to [0, 1]; arrays
returned by a ``py:`` function are used as they are: integer inputs (token ids) stay int64, float
inputs take the run's dtype. What the targets are is the task's business (plgk_cli.tasks):
integer class labels for classification, floats of any shape for regression.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plgk_cli.errors import DataError
from plgk_cli.importing import import_object, user_code

DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    spec: str
    x_train: torch.Tensor
    y_train: torch.Tensor  # the task's targets: int64 class labels, or floats for regression
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int  # the model's output width: classes, or the regression target's width

    @property
    def in_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise DataError(f"unknown split {name!r}; expected train or test")

    def fingerprint(self) -> str:
        """sha256 over the split tensors exactly as training sees them."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _as_images(x: np.ndarray) -> np.ndarray:
    integer = np.issubdtype(x.dtype, np.integer)  # 8-bit pixels
    # One float64 copy, divided in place: `x.astype(np.float64) / 255.0` and a second astype took
    # 1.4 s for 51,200 MNIST images, this 0.08 s, with the same values.
    x = x.astype(np.float64)
    if integer:
        x /= 255.0
    if x.ndim == 3:  # (N, H, W) -> (N, 1, H, W)
        x = x[:, None]
    return x


def _load_digits(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset digits needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    x = (bunch.images / 16.0)[:, None].astype(np.float64)  # (1797, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _load_diabetes(seed: int):
    try:
        from sklearn.datasets import load_diabetes
    except ImportError:
        raise DataError("dataset diabetes needs scikit-learn: pip install scikit-learn") from None
    bunch = load_diabetes()  # 442 x 10 features, already centred and scaled
    x, y = bunch.data.astype(np.float64), bunch.target.astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    test, train = order[:n_test], order[n_test:]
    # Standardised with the training split's statistics, so that an MSE of 1 is the variance.
    mean, std = y[train].mean(), y[train].std()
    y = (y - mean) / std
    return x[train], y[train], x[test], y[test]


SYNTHETIC_TEXT = dict(vocab=32, length=16, classes=3, train=480, test=120)


def synthetic_text(seed: int):
    """Token sequences (int64 ids in 0..31, length 16) labelled by which of the keyword tokens 1,
    2, 3 occurs most often (ties: the first); generated from ``seed``, nothing is downloaded.
    Token 0 pads the tail of shorter sequences."""
    s = SYNTHETIC_TEXT
    rng = np.random.default_rng(seed)
    n = s["train"] + s["test"]
    x = rng.integers(4, s["vocab"], size=(n, s["length"]))
    y = rng.integers(0, s["classes"], size=n)
    for i in range(n):
        positions = rng.permutation(s["length"])
        count = rng.integers(2, 5)
        x[i, positions[:count]] = 1 + y[i]
        others = [c for c in range(s["classes"]) if c != y[i]]
        x[i, positions[count:count + rng.integers(0, count)]] = 1 + rng.choice(others)
        x[i, s["length"] - rng.integers(0, 4):] = 0  # padding
    counts = np.stack([(x == 1 + c).sum(1) for c in range(s["classes"])], 1)
    y = counts.argmax(1)  # the label is what the sequence shows, padding included
    return x[:s["train"]], y[:s["train"]], x[s["train"]:], y[s["train"]:]


ADDITION = dict(low=10, high=50, train=640, test=160, planted=8)


@dataclass(frozen=True)
class AdditionCorpus:
    """Two-digit sums "a+b=c" (a, b in 10..49) as lines of text. ``planted``: training rows whose
    answer is deliberately wrong in both digits (the true sum + 11, or − 11 past 99); ``twins``: for each, the test row asking the
    commuted sum b+a, which the planted row resembles most."""

    train: tuple
    test: tuple
    planted: tuple
    twins: tuple


def addition_corpus(seed: int) -> AdditionCorpus:
    s = ADDITION
    rng = np.random.default_rng(seed)
    pairs = [(a, b) for a in range(s["low"], s["high"]) for b in range(s["low"], s["high"]) if a != b]
    order = rng.permutation(len(pairs))
    picked = [pairs[i] for i in order[:s["train"] + s["test"]]]
    train, test = picked[:s["train"]], picked[s["train"]:]
    # Plant where the commuted problem is held out, so that a test prompt resembles the planted row.
    test_index = {p: i for i, p in enumerate(test)}
    candidates = [i for i, (a, b) in enumerate(train) if (b, a) in test_index]
    planted = tuple(sorted(int(i) for i in rng.choice(candidates, s["planted"], replace=False)))
    twins = tuple(test_index[train[i][::-1]] for i in planted)

    def wrong(c):
        return c + 11 if c + 11 <= 99 else c - 11

    lines = [f"{a}+{b}={wrong(a + b) if i in planted else a + b}" for i, (a, b) in enumerate(train)]
    return AdditionCorpus(tuple(lines), tuple(f"{a}+{b}={a + b}" for a, b in test), planted, twins)


def addition(seed: int):
    """The ``addition`` dataset: :func:`addition_corpus` encoded byte by byte (BOS + line +
    newline), 10 tokens a sequence."""
    from plgk_cli.tasks.language_model import encode, next_token_targets, pad_sequences

    corpus = addition_corpus(seed)
    arrays = []
    for name, lines in (("train", corpus.train), ("test", corpus.test)):
        ids, mask = pad_sequences([encode(line + "\n") for line in lines], 10, f"addition {name}")
        arrays += [ids, next_token_targets(ids, mask)]
    return tuple(arrays)


def _load_text(path: Path, seed: int):
    from plgk_cli.tasks.language_model import text_corpus

    if not path.is_file():
        raise DataError(f"dataset text:{path}: file not found; give a UTF-8 text file, one sequence per line")
    try:
        return text_corpus(path, seed=seed)
    except UnicodeDecodeError as exc:
        raise DataError(f"dataset text:{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise DataError(f"dataset text:{path}: {exc}") from None


def _load_npz(path: Path):
    if not path.is_file():
        raise DataError(f"dataset npz:{path}: file not found; give the path of an .npz with "
                        "arrays x_train, y_train, x_test, y_test")
    import zipfile

    if not zipfile.is_zipfile(path):  # else numpy falls back to pickle and blames allow_pickle
        raise DataError(f"dataset npz:{path}: not an .npz archive; write it with "
                        "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "ids_train" in f.files:  # token sequences of a language model
                from plgk_cli.tasks.language_model import token_arrays

                missing = [k for k in ("ids_train", "ids_test") if k not in f]
                if missing:
                    raise DataError(f"dataset npz:{path}: missing arrays {', '.join(missing)} (token "
                                    "sequences need ids_train, ids_test; mask_train, mask_test optional)")
                try:
                    return token_arrays({k: f[k] for k in f.files}, f"dataset npz:{path}")
                except ValueError as exc:
                    raise DataError(str(exc)) from None
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
            if missing:
                raise DataError(f"dataset npz:{path}: missing arrays {', '.join(missing)} "
                                "(needs x_train, y_train, x_test, y_test)")
            arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except DataError:
        raise
    except Exception as exc:  # zipfile/pickle errors: the file is not a readable npz
        raise DataError(f"dataset npz:{path}: cannot read ({exc})") from None
    for name, x in (("x_train", arrays[0]), ("x_test", arrays[2])):
        _check_real(f"npz:{path}", name, x)
    return _as_images(arrays[0]), arrays[1], _as_images(arrays[2]), arrays[3]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({exc}); the file is damaged: copy it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtype:
        raise DataError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header; the file is damaged: copy it again")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtype[data[2]], offset=4 + 4 * ndim)
    expected = int(np.prod(shape))
    if array.size != expected:
        problem = "truncated" if array.size < expected else "over-long"
        raise DataError(f"{path}: {problem} IDX file ({array.size} values, the header says {expected})")
    return array.reshape(shape).copy()


def _load_mnist(root: Path):
    names = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    arrays = {}
    for key, stem in names.items():
        candidates = [root / stem, root / (stem + ".gz")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DataError(f"dataset mnist:{root}: {stem}[.gz] not found; put the four MNIST IDX "
                            f"files ({', '.join(names.values())}) in {root}")
        arrays[key] = _read_idx(found)
    return (_as_images(arrays["x_train"]), arrays["y_train"],
            _as_images(arrays["x_test"]), arrays["y_test"])


SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _load_svhn(root: Path):
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("dataset svhn needs scipy: pip install scipy") from None
    arrays = []
    for name in SVHN_FILES:
        path = root / name
        if not path.is_file():
            raise DataError(f"dataset svhn:{root}: {name} not found; download {' and '.join(SVHN_FILES)} "
                            f"(format 2, cropped digits) from {SVHN_URL} and put them in {root}")
        try:
            mat = loadmat(str(path), variable_names=("X", "y"))
        except Exception as exc:  # scipy raises ValueError, MatReadError, OSError... on damaged files
            raise DataError(f"{path}: cannot read ({exc}); the file is damaged: download it again "
                            f"from {SVHN_URL}") from None
        if "X" not in mat or "y" not in mat:
            raise DataError(f"{path}: no arrays X and y; not an SVHN {name}")
        x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
        # SVHN stores images as (32, 32, 3, N) uint8 and labels 1..10, where 10 is the digit 0.
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
            raise DataError(f"{path}: X is {x.dtype} {x.shape}; SVHN stores uint8 (32, 32, 3, N)")
        if len(y) != x.shape[3] or not np.issubdtype(y.dtype, np.number) or (
                len(y) and (y.min() < 1 or y.max() > 10 or not np.all(y == np.round(y)))):
            raise DataError(f"{path}: y must hold {x.shape[3]} labels in 1..10 (10 is the digit 0)")
        images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # (N, 3, 32, 32): channels first
        arrays += [_as_images(images), np.where(y == 10, 0, y).astype(np.int64)]
    return tuple(arrays)


def _load_py(target: str):
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise DataError(f"dataset py:{target}: expected py:package.module:function")
    try:
        function = import_object(target, f"dataset py:{target}")
    except (ImportError, AttributeError) as exc:
        raise DataError(f"dataset py:{target}: cannot import ({exc}); give package.module:function "
                        "importable from the working directory") from None
    with user_code(f"dataset py:{target}: the function raised"):
        result = function()
    if not isinstance(result, (tuple, list)) or len(result) != 4:
        raise DataError(f"dataset py:{target}: returned {type(result).__name__}; expected the tuple "
                        "(x_train, y_train, x_test, y_test)")
    arrays = []
    for name, a in zip(("x_train", "y_train", "x_test", "y_test"), result):
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.number) or a.ndim == 0:
            raise DataError(f"dataset py:{target}: {name} is {a.dtype} with shape {a.shape}; expected "
                            "a numeric tensor or array with one row per example")
        arrays.append(a)
    return tuple(arrays)


def dataset_files(spec: str) -> dict:
    """The file or folder a dataset spec reads ({name: path}; none for built-in and py: data): an
    input that no output of plgk's may replace."""
    kind, _, path = spec.partition(":")
    return {f"dataset {spec}": Path(path)} if kind in ("npz", "text", "mnist", "svhn") and path else {}


def as_inputs(x, dtype: torch.dtype) -> torch.Tensor:
    """Model inputs: integer arrays (token ids) as int64, anything else in the run's dtype."""
    x = torch.as_tensor(x)
    if x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex()):
        return x.to(torch.int64)
    return x.to(dtype)


def to_device(x: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """Inputs or targets on ``device``; floats in ``dtype``, integers (ids, labels) as they are."""
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def load_dataset(spec: str, seed: int = 0, dtype: torch.dtype = torch.float32, task=None) -> Dataset:
    """The named dataset with targets checked by ``task`` (default: classification)."""
    if task is None:
        from plgk_cli.tasks import task_for
        task = task_for("classification")
    if spec == "digits":
        arrays = _load_digits(seed)
    elif spec == "diabetes":
        arrays = _load_diabetes(seed)
    elif spec == "synthetic-text":
        arrays = synthetic_text(seed)
    elif spec == "addition":
        arrays = addition(seed)
    elif spec.startswith("text:"):
        arrays = _load_text(Path(spec[5:]), seed)
    elif spec.startswith("npz:"):
        arrays = _load_npz(Path(spec[4:]))
    elif spec.startswith("mnist:"):
        arrays = _load_mnist(Path(spec[6:]))
    elif spec.startswith("svhn:"):
        arrays = _load_svhn(Path(spec[5:]))
    elif spec.startswith("py:"):
        arrays = _load_py(spec[3:])
    else:
        raise DataError(f"unknown dataset {spec!r}; expected digits, diabetes, synthetic-text, addition, "
                        "npz:PATH, text:PATH, mnist:DIR, svhn:DIR or py:package.module:function")
    x_train, y_train, x_test, y_test = arrays
    labels = []
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if np.ndim(x) < 2:
            n = len(x) if np.ndim(x) else "N"
            raise DataError(f"dataset {spec}: x_{name} has shape {np.shape(x)}; each example must be at least "
                            f"1-D: use x.reshape({n}, 1)")
        if len(x) != len(y):
            raise DataError(f"dataset {spec}: x_{name} has {len(x)} rows but y_{name} has {len(y)}")
        if 0 in np.shape(x)[1:]:
            raise DataError(f"dataset {spec}: x_{name} has shape {np.shape(x)}: its examples hold no values; "
                            "each example needs at least one feature")
        _check_real(spec, f"x_{name}", x)
        try:
            labels.append(task.check_labels(y, f"y_{name}"))
        except ValueError as exc:
            raise DataError(f"dataset {spec}: {exc} (task {task.name})") from None
    y_train, y_test = labels
    if len(y_train) == 0:
        raise DataError(f"dataset {spec}: the training split is empty")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"dataset {spec}: x_train rows {x_train.shape[1:]} and x_test rows "
                        f"{x_test.shape[1:]} differ in shape")
    if y_train.shape[1:] != y_test.shape[1:]:
        raise DataError(f"dataset {spec}: y_train rows {tuple(y_train.shape[1:])} and y_test rows "
                        f"{tuple(y_test.shape[1:])} differ in shape")
    if y_train.is_floating_point():  # regression targets: finite in float64 may overflow the run's dtype
        for name, y in (("y_train", y_train), ("y_test", y_test)):
            _check_finite(spec, name, y, dtype)
        y_train, y_test = y_train.to(dtype), y_test.to(dtype)
    width = task.output_width(y_train, y_test)
    if task.label_kind == "class":  # the class count may come from the task rather than the labels
        for name, y in (("y_train", y_train), ("y_test", y_test)):
            if len(y) and int(y.max()) >= width:
                index = int((y >= width).nonzero()[0])
                raise DataError(f"dataset {spec}: {name}[{index}] is label {int(y[index])}, but task "
                                f"{task.name} has {width} classes (labels 0..{width - 1})")
    if task.label_kind == "tokens":  # a token met only as input (a sequence's first, padding) needs a row too
        width = max(width, int(max(np.max(x_train), np.max(x_test) if np.size(x_test) else 0)) + 1)
    inputs = []
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        inputs.append(as_inputs(x, dtype))
        _check_finite(spec, name, x, dtype, inputs[-1])
    return Dataset(
        spec=spec,
        x_train=inputs[0],
        y_train=y_train,
        x_test=inputs[1],
        y_test=y_test,
        num_classes=width,
    )


def _check_real(spec: str, name: str, x) -> None:
    """Refuse (DataError) inputs that are not real numbers: complex ones would lose their
    imaginary part in the cast to the run's dtype; strings and objects cannot be cast."""
    if isinstance(x, torch.Tensor):
        real = not x.is_complex()
        kind = str(x.dtype)
    else:
        kind = np.asarray(x).dtype
        real = kind.kind in "biuf"
    if not real:
        raise DataError(f"dataset {spec}: {name} holds {kind} values; inputs must be real numbers (floats, "
                        "or integer token ids)")


def _check_finite(spec: str, name: str, array, dtype: torch.dtype, cast: torch.Tensor | None = None) -> None:
    """Refuse (DataError) a float array holding NaN or Inf, or a value that becomes Inf in the
    run's ``dtype`` (1e39 in float32), naming the first such element. ``cast``: the array already
    in ``dtype``, where the caller has it."""
    original = torch.as_tensor(np.asarray(array)) if not isinstance(array, torch.Tensor) else array
    if not original.is_floating_point():
        return  # integers (labels, token ids, 8-bit pixels) are finite
    cast = original.to(dtype) if cast is None else cast
    finite = torch.isfinite(cast)
    if bool(finite.all()):
        return
    index = tuple(int(i) for i in (~finite).nonzero()[0])
    value = float(original[index])
    at = f"{name}[{', '.join(map(str, index))}]"
    if math.isfinite(value):
        raise DataError(f"dataset {spec}: {at} is {value:g}, beyond the range of the run's "
                        f"{str(dtype).removeprefix('torch.')} (it would be inf); rescale the data or train "
                        "in float64")
    raise DataError(f"dataset {spec}: {name} holds NaN or Inf: {at} is {value}; training needs finite "
                    f"numbers: fix or drop example {index[0]}")
