"""Tests of locoprop.harness.data: real MNIST / Fashion-MNIST, search order,
verification, download from a local HTTP server, CURVES (generated and .mat).

The only network used is a throw-away http.server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import os
import shutil
import struct
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from locoprop.harness import data as D
from locoprop.harness.data import DataError, Dataset, find_idx_files, load_dataset, read_idx

REPO = Path(__file__).resolve().parents[2]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
STEMS = [stem for stem, _, _ in D.IDX_FILES.values()]
FIRST_TEN_MNIST = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
FIRST_TEN_FASHION = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
LABELS_STEM = "t10k-labels-idx1-ubyte"  # the smallest file: the one the tests damage
IMAGES_STEM = "t10k-images-idx3-ubyte"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No user cache, no $LOCOPROP_DATA, no proxies: every test starts from a known state."""
    for var in (D.ENV_DATA, D.ENV_SEARCH, "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path


def need_shared_mnist():
    missing = [s for s in STEMS if not (SHARED_MNIST / f"{s}.gz").is_file()]
    assert not missing, f"the shared MNIST copy is missing {missing} in {SHARED_MNIST}"


def mnist_dir(folder: Path, replace: dict[str, tuple[str, bytes]] | None = None, skip=()) -> Path:
    """``folder`` with links to the shared MNIST .gz files; ``replace[stem] = (file name, content)``."""
    need_shared_mnist()
    folder.mkdir(parents=True, exist_ok=True)
    replace = replace or {}
    for stem in STEMS:
        if stem in skip:
            continue
        if stem in replace:
            fname, content = replace[stem]
            (folder / fname).write_bytes(content)
        else:
            (folder / f"{stem}.gz").symlink_to(SHARED_MNIST / f"{stem}.gz")
    return folder


def shared_bytes(stem: str) -> bytes:
    return gzip.decompress((SHARED_MNIST / f"{stem}.gz").read_bytes())


def flipped(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


def idx_bytes(arr: np.ndarray) -> bytes:
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
    code = codes[arr.dtype.type]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


# ---------------------------------------------------------------- real data

def test_mnist_real():
    need_shared_mnist()
    ds = load_dataset("mnist", download=False)
    assert isinstance(ds, Dataset) and ds.name == "mnist" and not ds.synthetic
    assert ds.train.shape == (60000, 784) and ds.test.shape == (10000, 784)
    assert ds.train.dtype == torch.float32 and ds.train.device.type == "cpu"
    assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
    assert ds.train_labels.dtype == torch.int64
    assert ds.train_labels[:10].tolist() == FIRST_TEN_MNIST
    assert abs(ds.train.mean().item() - 0.1307) < 1e-3
    assert ds.train.min().item() == 0.0 and ds.train.max().item() == 1.0
    assert Path(ds.source).resolve() == SHARED_MNIST.resolve()
    assert "mnist" in ds.describe() and "60000" in repr(ds)


def test_fashion_mnist_from_debian_package():
    present = [s for s in STEMS if (FASHION_SYSTEM / f"{s}.gz").is_file()]
    assert len(present) == 4, (
        f"Fashion-MNIST is not installed in {FASHION_SYSTEM}: install the Debian package "
        f"with `apt-get install dataset-fashion-mnist`")
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.train.shape == (60000, 784) and ds.test.shape == (10000, 784)
    assert ds.train_labels[:10].tolist() == FIRST_TEN_FASHION
    assert sorted(ds.test_labels.unique().tolist()) == list(range(10))
    assert 0.0 <= ds.train.min().item() and ds.train.max().item() <= 1.0
    assert not ds.synthetic
    if not (REPO.parent / "shared" / "data" / "fashion-mnist").exists():
        assert Path(ds.source) == FASHION_SYSTEM


def test_limits_device_dtype_and_copies():
    need_shared_mnist()
    full = load_dataset("mnist", download=False)
    ds = load_dataset("mnist", download=False, limit_train=100, limit_test=7, dtype=torch.float64)
    assert ds.train.shape == (100, 784) and ds.test.shape == (7, 784)
    assert ds.train_labels.shape == (100,) and ds.test_labels.shape == (7,)
    assert ds.train.dtype == torch.float64
    torch.testing.assert_close(ds.train.float(), full.train[:100])
    # A limit beyond the set keeps everything; the result never aliases the cache.
    big = load_dataset("mnist", download=False, limit_test=10**6)
    assert big.test.shape == (10000, 784)
    big.train.zero_()
    assert load_dataset("mnist", download=False, limit_train=5).train.sum() > 0


def test_read_idx_real_file():
    need_shared_mnist()
    labels = read_idx(SHARED_MNIST / f"{LABELS_STEM}.gz")
    images = read_idx(SHARED_MNIST / f"{IMAGES_STEM}.gz")
    assert labels.dtype == torch.uint8 and labels.shape == (10000,)
    assert images.shape == (10000, 28, 28)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
       shape=st.lists(st.integers(0, 5), min_size=1, max_size=3), compress=st.booleans(), seed=st.integers(0, 99))
def test_read_idx_roundtrip(tmp_path_factory, dtype, shape, compress, seed):
    rng = np.random.default_rng(seed)
    arr = (rng.standard_normal(shape) * 50).astype(dtype)
    raw = idx_bytes(arr)
    path = tmp_path_factory.mktemp("idx") / "a.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(read_idx(path).numpy(), arr)


def test_read_idx_rejects_bad_files(tmp_path):
    good = idx_bytes(np.arange(12, dtype=np.int16).reshape(3, 4))
    cases = {
        "short": good[:3],
        "truncated": good[:-1],
        "trailing": good + b"\0",
        "magic": b"\x01" + good[1:],
        "typecode": good[:2] + b"\x07" + good[3:],
        "header": good[:9],
    }
    for what, content in cases.items():
        path = tmp_path / f"{what}.idx"
        path.write_bytes(content)
        with pytest.raises(DataError, match=str(path)):
            read_idx(path)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


# ------------------------------------------------------------- search order

def test_search_order_env_beats_shared_and_explicit_beats_env(tmp_path, monkeypatch):
    env_root = tmp_path / "env"
    env_dir = mnist_dir(env_root / "mnist")
    explicit = mnist_dir(tmp_path / "explicit")
    nested = mnist_dir(tmp_path / "root" / "mnist")

    assert find_idx_files("mnist")["train_images"].parent.resolve() == SHARED_MNIST.resolve()
    monkeypatch.setenv(D.ENV_DATA, str(env_root))
    files = find_idx_files("mnist")
    assert set(files) == {"train_images", "train_labels", "test_images", "test_labels"}
    assert all(p.parent == env_dir for p in files.values())
    assert load_dataset("mnist", download=False, limit_train=3).source == str(env_dir)
    assert all(p.parent == explicit for p in find_idx_files("mnist", explicit).values())
    # data_dir may also be a root holding <name>/
    assert all(p.parent == nested for p in find_idx_files("mnist", tmp_path / "root").values())


def test_shared_beats_cache_and_explicit_mode_skips_shared(monkeypatch):
    cache = mnist_dir(D.cache_dir("mnist"))
    assert find_idx_files("mnist")["test_labels"].parent.resolve() == SHARED_MNIST.resolve()
    assert find_idx_files("mnist", search_well_known=False)["test_labels"].parent == cache
    monkeypatch.setenv(D.ENV_SEARCH, "explicit")
    assert find_idx_files("mnist")["test_labels"].parent == cache
    ds = load_dataset("mnist", download=False, limit_train=2, limit_test=2)
    assert ds.source == str(cache)


def test_search_locations_order(tmp_path, monkeypatch):
    monkeypatch.setenv(D.ENV_DATA, str(tmp_path / "env"))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    locs = D.search_locations("fashion-mnist", tmp_path / "x")
    whats = [w for w, _ in locs]
    assert whats == ["data_dir", "data_dir", "$LOCOPROP_DATA", "shared (repository)",
                     "shared (working directory)", "system", "cache"]
    paths = [p for _, p in locs]
    assert paths[1] == tmp_path / "x" / "fashion-mnist"
    assert paths[3] == REPO.parent / "shared" / "data" / "fashion-mnist"
    assert paths[4] == tmp_path / "a" / "shared" / "data" / "fashion-mnist"
    assert paths[5] == FASHION_SYSTEM
    assert paths[6] == tmp_path / "xdg-cache" / "locoprop" / "fashion-mnist"
    assert [w for w, _ in D.search_locations("mnist", search_well_known=False)] == ["$LOCOPROP_DATA", "cache"]
    monkeypatch.setenv(D.ENV_SEARCH, "nonsense")
    with pytest.raises(ValueError, match="LOCOPROP_DATA_SEARCH"):
        D.search_locations("mnist")


def test_found_in_working_directory_shared_folder(tmp_path, monkeypatch):
    """../shared/data/<name> relative to the current directory is searched too."""
    monkeypatch.setattr(D, "_repo_root", lambda: None)  # as if installed outside a checkout
    target = mnist_dir(tmp_path / "shared" / "data" / "mnist")
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    assert find_idx_files("mnist")["train_labels"].parent.resolve() == target.resolve()


def test_missing_everywhere_without_download(monkeypatch):
    monkeypatch.setenv(D.ENV_SEARCH, "explicit")
    with pytest.raises(DataError, match="not found and download=False; searched"):
        load_dataset("mnist", download=False)


def test_explicit_dir_without_files_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data_dir="):
        load_dataset("mnist", tmp_path / "empty")


def test_incomplete_folder_raises(tmp_path, monkeypatch):
    mnist_dir(tmp_path / "env" / "mnist", skip={LABELS_STEM, IMAGES_STEM})
    monkeypatch.setenv(D.ENV_DATA, str(tmp_path / "env"))
    with pytest.raises(DataError, match=f"incomplete.*lacks.*{IMAGES_STEM}"):
        load_dataset("mnist")


# ------------------------------------------------------------- verification

def test_flipped_byte_raises_md5_error(tmp_path):
    data = flipped(shared_bytes(LABELS_STEM), 5000)
    folder = mnist_dir(tmp_path / "bad", {LABELS_STEM: (LABELS_STEM, data)})
    path = folder / LABELS_STEM
    with pytest.raises(DataError) as err:
        load_dataset("mnist", folder)
    msg = str(err.value)
    assert str(path) in msg and "md5 of decompressed bytes is" in msg
    assert D.IDX_MD5["mnist"][LABELS_STEM] in msg
    assert hashlib.md5(data).hexdigest() in msg


def test_flipped_byte_in_gzip_raises(tmp_path):
    gz = (SHARED_MNIST / f"{LABELS_STEM}.gz").read_bytes()
    folder = mnist_dir(tmp_path / "bad", {LABELS_STEM: (f"{LABELS_STEM}.gz", flipped(gz, len(gz) // 2))})
    with pytest.raises(DataError, match=str(folder / f"{LABELS_STEM}.gz")):
        find_idx_files("mnist", folder)


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_file_raises(tmp_path, compressed):
    data = shared_bytes(LABELS_STEM)
    if compressed:
        content, fname = gzip.compress(data)[:-200], f"{LABELS_STEM}.gz"
    else:
        content, fname = data[:-100], LABELS_STEM
    folder = mnist_dir(tmp_path / "bad", {LABELS_STEM: (fname, content)})
    with pytest.raises(DataError, match="truncated") as err:
        find_idx_files("mnist", folder)
    assert str(folder / fname) in str(err.value)


def test_wrong_headers_raise(tmp_path):
    labels = shared_bytes(LABELS_STEM)
    cases = {
        "magic": (struct.pack(">I", 2051) + labels[4:], "magic number is 2051.*expected 2049"),
        "count": (struct.pack(">II", 2049, 9999) + labels[8:-1], "dimensions are 9999, expected 10000"),
        "images-for-labels": (shared_bytes(IMAGES_STEM), "magic number is 2051"),
        "not-idx": (b"<html>not found</html>", "magic number"),
    }
    for what, (content, pattern) in cases.items():
        folder = mnist_dir(tmp_path / what, {LABELS_STEM: (LABELS_STEM, content)})
        with pytest.raises(DataError, match=pattern) as err:
            find_idx_files("mnist", folder)
        assert str(folder / LABELS_STEM) in str(err.value)


def test_corrupt_file_never_falls_back(tmp_path, monkeypatch):
    """A bad copy in $LOCOPROP_DATA raises although the shared copy is fine."""
    mnist_dir(tmp_path / "env" / "mnist", {LABELS_STEM: (LABELS_STEM, flipped(shared_bytes(LABELS_STEM), 99))})
    monkeypatch.setenv(D.ENV_DATA, str(tmp_path / "env"))
    with pytest.raises(DataError, match="md5"):
        load_dataset("mnist")


def test_corrupt_cache_raises(monkeypatch):
    monkeypatch.setenv(D.ENV_SEARCH, "explicit")
    mnist_dir(D.cache_dir("mnist"), {LABELS_STEM: (LABELS_STEM, shared_bytes(LABELS_STEM)[:-1])})
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", mirrors=["http://127.0.0.1:9/"])


# ----------------------------------------------------------------- download

class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@contextlib.contextmanager
def serve(directory: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def served_copy(folder: Path, replace: dict[str, bytes] | None = None) -> Path:
    """``folder`` holding copies of the shared .gz files; ``replace[stem]`` = gz bytes to serve instead."""
    need_shared_mnist()
    folder.mkdir(parents=True)
    for stem in STEMS:
        if replace and stem in replace:
            (folder / f"{stem}.gz").write_bytes(replace[stem])
        else:
            shutil.copyfile(SHARED_MNIST / f"{stem}.gz", folder / f"{stem}.gz")
    return folder


def cache_listing() -> list[str]:
    d = D.cache_dir("mnist")
    return sorted(os.listdir(d)) if d.exists() else []


def test_download_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(D.ENV_SEARCH, "explicit")  # the shared copy must not be found
    served_copy(tmp_path / "www" / "mnist")
    with serve(tmp_path / "www") as url:
        # the first mirror answers 404 for everything; the second one serves the files
        ds = load_dataset("mnist", mirrors=[url + "nothing-here/", url + "mnist"], limit_test=10)
    cache = D.cache_dir("mnist")
    assert cache == tmp_path / "xdg-cache" / "locoprop" / "mnist"
    assert ds.source == f"{cache} (downloaded)"
    assert cache_listing() == sorted(f"{s}.gz" for s in STEMS)
    assert ds.train.shape == (60000, 784) and ds.train_labels[:10].tolist() == FIRST_TEN_MNIST
    for stem in STEMS:
        assert gzip.decompress((cache / f"{stem}.gz").read_bytes()) == shared_bytes(stem)
    again = load_dataset("mnist", download=False, limit_train=10)
    assert again.source == str(cache)


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_download_of_bad_file_raises_and_keeps_nothing(tmp_path, monkeypatch, damage):
    monkeypatch.setenv(D.ENV_SEARCH, "explicit")
    good = (SHARED_MNIST / f"{LABELS_STEM}.gz").read_bytes()
    bad = gzip.compress(flipped(shared_bytes(LABELS_STEM), 4321)) if damage == "flipped" else good[:len(good) // 2]
    with serve(served_copy(tmp_path / "www", {LABELS_STEM: bad})) as url:
        with pytest.raises(DataError) as err:
            load_dataset("mnist", mirrors=[url])
    msg = str(err.value)
    assert f"{url}{LABELS_STEM}.gz" in msg and "nothing was kept" in msg
    assert ("md5 of decompressed bytes" if damage == "flipped" else "truncated") in msg
    listing = cache_listing()
    assert not [f for f in listing if LABELS_STEM in f or f.endswith(".part")], listing
    # The files that did verify were kept; a later run only fetches the missing one.
    with serve(served_copy(tmp_path / "www2")) as url:
        ds = load_dataset("mnist", mirrors=[url], limit_train=1, limit_test=1)
    assert ds.test_labels.tolist() == [shared_bytes(LABELS_STEM)[8]]
    assert cache_listing() == sorted(f"{s}.gz" for s in STEMS)


def test_download_unreachable_mirrors(tmp_path, monkeypatch):
    monkeypatch.setenv(D.ENV_SEARCH, "explicit")
    with serve(tmp_path) as url:  # serves nothing useful: every file is a 404
        with pytest.raises(DataError, match="could not download.*404"):
            load_dataset("mnist", mirrors=[url + "a/", url + "b/"])
    assert not [f for f in cache_listing() if f.endswith(".part")]
    with pytest.raises(ValueError, match="mirrors"):
        load_dataset("mnist", mirrors="http://127.0.0.1/")


def test_default_mirrors_constant():
    assert D.MIRRORS["mnist"][0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert D.MIRRORS["mnist"][1] == "http://yann.lecun.com/exdb/mnist/"
    assert D.MIRRORS["fashion-mnist"] == ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)


# ------------------------------------------------------------------- CURVES

def test_generate_curves_small():
    train, test = D.generate_curves(40, 15, seed=1)
    assert train.shape == (40, 784) and test.shape == (15, 784) and train.dtype == torch.float32
    for x in (train, test):
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert (x.amax(dim=1) > 0.5).all()  # every image holds a stroke
        assert ((x > 0) & (x < 1)).any()  # anti-aliased edges
    again = D.generate_curves(40, 15, seed=1)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    other = D.generate_curves(40, 15, seed=2)
    assert not torch.equal(other[0], train) and not torch.equal(other[1], test)
    prefix = D.generate_curves(10, 5, seed=1)  # fewer images: prefixes of the same sets
    assert torch.equal(prefix[0], train[:10]) and torch.equal(prefix[1], test[:5])
    assert not torch.equal(train[:15], test)
    with pytest.raises(ValueError, match="n_train"):
        D.generate_curves(20001, 1)
    with pytest.raises(ValueError, match="seed"):
        D.generate_curves(1, 1, seed=-1)


def test_load_generated_curves(monkeypatch):
    ds = load_dataset("curves")
    assert ds.synthetic and ds.name == "curves"
    assert ds.train.shape == (20000, 784) and ds.test.shape == (10000, 784)
    assert ds.train_labels is None and ds.test_labels is None
    assert ds.source == "generated CURVES-like data (seed=0), not the original digs3pts_1.mat"
    assert 0.0 <= ds.train.min().item() and ds.train.max().item() <= 1.0
    assert torch.equal(load_dataset("curves", limit_train=30, limit_test=20).train, ds.train[:30])
    small = load_dataset("curves", seed=5, limit_train=30, limit_test=20, dtype=torch.float64)
    assert small.train.dtype == torch.float64 and "seed=5" in small.source
    assert not torch.equal(small.train.float(), ds.train[:30])
    with pytest.raises(ValueError, match="seed"):
        load_dataset("curves", seed=-3)


@pytest.fixture(scope="module")
def curves_mat(tmp_path_factory):
    """A fake digs3pts_1.mat with the original's variables and shapes (compressed, so small on disk)."""
    import scipy.io

    rng = np.random.default_rng(0)
    train = np.zeros((20000, 784), np.float32)
    test = np.zeros((10000, 784), np.float32)
    train[:, 100] = rng.uniform(0, 1, 20000).astype(np.float32)
    test[:, 7] = 1.0
    path = tmp_path_factory.mktemp("curves") / D.CURVES_FILE
    scipy.io.savemat(path, {"bdata": train, "bdatatest": test}, do_compression=True)
    return path, train, test


def test_curves_mat_loaded(curves_mat, tmp_path, monkeypatch):
    path, train, test = curves_mat
    ds = load_dataset("curves", path.parent)
    assert not ds.synthetic and ds.source == str(path)
    np.testing.assert_array_equal(ds.train.numpy(), train)
    np.testing.assert_array_equal(ds.test.numpy(), test)
    assert load_dataset("curves", path, limit_train=5).train.shape == (5, 784)  # the file itself
    # found by search too: $LOCOPROP_DATA/curves and the cache
    (tmp_path / "env" / "curves").mkdir(parents=True)
    (tmp_path / "env" / "curves" / D.CURVES_FILE).symlink_to(path)
    monkeypatch.setenv(D.ENV_DATA, str(tmp_path / "env"))
    assert not load_dataset("curves", limit_train=1).synthetic
    monkeypatch.delenv(D.ENV_DATA)
    D.cache_dir("curves").mkdir(parents=True)
    (D.cache_dir("curves") / D.CURVES_FILE).symlink_to(path)
    assert load_dataset("curves", limit_train=1).source == str(D.cache_dir("curves") / D.CURVES_FILE)


def test_curves_mat_errors(tmp_path):
    import scipy.io

    def write(name, **arrays):
        path = tmp_path / name / D.CURVES_FILE
        path.parent.mkdir()
        scipy.io.savemat(path, arrays, do_compression=True)
        return path

    cases = [
        (write("shape", bdata=np.zeros((200, 784)), bdatatest=np.zeros((100, 784))),
         r"'bdata' has shape \(200, 784\), expected \(20000, 784\)"),
        (write("cols", bdata=np.zeros((20000, 783), np.uint8), bdatatest=np.zeros((10000, 784), np.uint8)),
         "'bdata' has shape"),
        (write("key", data=np.zeros((2, 2))), "no variable 'bdata'.*present: \\['data'\\]"),
        (write("range", bdata=np.full((20000, 784), 2, np.uint8), bdatatest=np.zeros((10000, 784), np.uint8)),
         r"values in \[2, 2\], expected within \[0, 1\]"),
    ]
    garbage = tmp_path / "garbage" / D.CURVES_FILE
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a MATLAB file" * 10)
    cases.append((garbage, "cannot be read"))
    for path, pattern in cases:
        with pytest.raises(DataError, match=pattern) as err:
            load_dataset("curves", path.parent)
        assert str(path) in str(err.value)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="holds no digs3pts_1.mat"):
        load_dataset("curves", tmp_path / "none")


# ---------------------------------------------------------------- arguments

def test_argument_errors():
    assert D.DATASETS == ("mnist", "fashion-mnist", "curves")
    with pytest.raises(ValueError, match="name='cifar10'.*mnist, fashion-mnist, curves"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="name="):
        load_dataset(None)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="limit_train"):
            load_dataset("curves", limit_train=bad)
    with pytest.raises(ValueError, match="limit_test"):
        load_dataset("curves", limit_test=0)
    with pytest.raises(ValueError, match="dtype"):
        load_dataset("curves", dtype=torch.int64)
    with pytest.raises(ValueError, match="IDX datasets"):
        find_idx_files("curves")
    assert issubclass(DataError, ValueError)


def test_dataset_is_frozen():
    ds = load_dataset("curves", limit_train=2, limit_test=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "mnist"
    assert ds != load_dataset("curves", limit_train=2, limit_test=2)  # identity, no tensor comparison
    assert [f.name for f in dataclasses.fields(Dataset)] == [
        "name", "train", "test", "train_labels", "test_labels", "source", "synthetic"]
