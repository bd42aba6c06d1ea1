"""The paper's three datasets: MNIST, Fashion-MNIST and CURVES.

:func:`load_dataset` returns a :class:`Dataset` whose inputs are flattened to
784 values in ``[0, 1]`` (IDX pixels divided by 255), on the requested device
and in the requested dtype.

* MNIST and Fashion-MNIST are read from the four standard IDX files (plain or
  gzip).  Every file is checked against the MD5 of its *decompressed* bytes and
  its IDX header before use; a file that is present but wrong raises
  :class:`DataError` -- there is never a fallback to another location or to
  made-up data.  Where no location holds the files they are downloaded into
  the user cache (``download=True``).
* CURVES is read from Hinton & Salakhutdinov's ``digs3pts_1.mat`` when one is
  found; otherwise CURVES-like data is generated from a seed, and the returned
  :class:`Dataset` says so (``synthetic=True`` and ``source``).

Where files are looked for, and why, is described in ``docs/data.md`` and in
:func:`search_locations`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "Dataset",
    "DataError",
    "load_dataset",
    "read_idx",
    "find_idx_files",
    "search_locations",
    "cache_dir",
    "generate_curves",
    "load_curves_mat",
    "MIRRORS",
    "IDX_MD5",
    "IDX_FILES",
    "CURVES_FILE",
    "ENV_DATA",
    "ENV_SEARCH",
]

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist", "curves")

#: Root folder of the datasets: ``$LOCOPROP_DATA/<name>`` is searched.
ENV_DATA = "LOCOPROP_DATA"
#: ``all`` (default) or ``explicit``: with ``explicit`` the well-known folders
#: (``../shared/data/<name>``, ``/usr/share/datasets/<name>``) are skipped and
#: only ``data_dir``, ``$LOCOPROP_DATA/<name>`` and the user cache are used.
ENV_SEARCH = "LOCOPROP_DATA_SEARCH"
_SEARCH_MODES = ("all", "explicit")

#: key -> (file stem, IDX magic number, number of items).  Images are 28x28.
IDX_FILES: dict[str, tuple[str, int, int]] = {
    "train_images": ("train-images-idx3-ubyte", 2051, 60000),
    "train_labels": ("train-labels-idx1-ubyte", 2049, 60000),
    "test_images": ("t10k-images-idx3-ubyte", 2051, 10000),
    "test_labels": ("t10k-labels-idx1-ubyte", 2049, 10000),
}
_IMAGE_SIDE = 28
_N_FEATURES = _IMAGE_SIDE * _IMAGE_SIDE

#: MD5 of the decompressed IDX files (gzip copies differ between compressors,
#: the decompressed bytes do not).
IDX_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

#: Download mirrors, tried in order; a file ``<stem>.gz`` is fetched from each
#: base URL.  (The MNIST ones are those torchvision uses.)
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
DOWNLOAD_TIMEOUT = 60.0
_USER_AGENT = "locoprop-data/0.1 (python urllib)"

#: Folders where operating-system packages install a dataset (Debian's
#: ``dataset-fashion-mnist`` installs the four .gz files in the one below).
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

#: The original CURVES file (Hinton & Salakhutdinov 2006).
CURVES_FILE = "digs3pts_1.mat"
_CURVES_KEYS = {"train": "bdata", "test": "bdatatest"}
_CURVES_SHAPES = {"train": (20000, _N_FEATURES), "test": (10000, _N_FEATURES)}


class DataError(ValueError):
    """A dataset file is missing, truncated, corrupt or otherwise not the expected one."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset.  Equality is identity (fields are large tensors)."""

    name: str  # "mnist" | "fashion-mnist" | "curves"
    train: torch.Tensor  # (N, 784) floating, pixels / 255 (CURVES already in [0, 1])
    test: torch.Tensor  # (M, 784)
    train_labels: torch.Tensor | None  # (N,) int64, None for CURVES
    test_labels: torch.Tensor | None
    source: str  # where the data came from, or that it was generated
    synthetic: bool  # True only for generated CURVES-like data

    @property
    def n_features(self) -> int:
        return int(self.train.shape[1])

    def describe(self) -> str:
        """One line for logs and result files."""
        return (f"{self.name}: {self.train.shape[0]} train / {self.test.shape[0]} test x "
                f"{self.n_features}, {self.train.dtype} on {self.train.device}; source: {self.source}")

    def __repr__(self) -> str:
        def t(x):
            return "None" if x is None else f"<{tuple(x.shape)} {x.dtype} on {x.device}>"

        return (f"Dataset(name={self.name!r}, train={t(self.train)}, test={t(self.test)}, "
                f"train_labels={t(self.train_labels)}, test_labels={t(self.test_labels)}, "
                f"source={self.source!r}, synthetic={self.synthetic})")


# --------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------

# IDX type code -> (numpy dtype of the big-endian payload, item size)
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CHUNK = 1 << 22


def _read_bytes(path: Path, label: str) -> tuple[bytearray, str, bool]:
    """Whole (decompressed) content of ``path``, its MD5 and whether it was gzip.

    Gzip is recognised by its magic bytes, not by the file name.  Errors while
    opening propagate (FileNotFoundError, ...); a damaged gzip stream is a
    :class:`DataError` naming ``label``.
    """
    md5 = hashlib.md5()
    buf = bytearray()
    with open(path, "rb") as raw:
        is_gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gz else raw
        try:
            while chunk := stream.read(_CHUNK):
                md5.update(chunk)
                buf += chunk
        except (EOFError, zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
            what = "gzip data is corrupt or truncated" if is_gz else "read error"
            raise DataError(f"{label}: {what} ({type(e).__name__}: {e})") from e
    return buf, md5.hexdigest(), is_gz


def _parse_idx_header(data: bytes | bytearray, label: str) -> tuple[int, np.dtype, tuple[int, ...], int]:
    """(magic number, payload dtype, dimensions, header length) of an IDX file; checks the length."""
    if len(data) < 4:
        raise DataError(f"{label}: {len(data)} bytes, too short for an IDX header (truncated?)")
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or code not in _IDX_TYPES or ndim == 0:
        raise DataError(
            f"{label}: not an IDX file: first 4 bytes are {bytes(data[:4]).hex()} (magic number {magic}); "
            f"expected 00 00, a type code in {{{', '.join(hex(c) for c in _IDX_TYPES)}}} and a dimension count"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{label}: {len(data)} bytes, too short for an IDX header of {ndim} dimensions (truncated?)")
    dims = struct.unpack(f">{ndim}I", bytes(data[4:header_len]))
    dtype = _IDX_TYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        what = "is truncated" if got < expected else "has trailing bytes"
        raise DataError(
            f"{label}: payload is {got} bytes but the header (dimensions {'x'.join(map(str, dims))}, "
            f"{dtype.itemsize}-byte items) says {expected}: the file {what}"
        )
    return magic, dtype, dims, header_len


def _idx_tensor(data: bytearray, dtype: np.dtype, dims: tuple[int, ...], header_len: int) -> torch.Tensor:
    if dtype == np.uint8:
        flat = torch.frombuffer(data, dtype=torch.uint8, offset=header_len) if len(data) > header_len \
            else torch.empty(0, dtype=torch.uint8)
        return flat.reshape(dims)
    arr = np.frombuffer(bytes(data), dtype=dtype, offset=header_len).astype(dtype.newbyteorder("="))
    return torch.from_numpy(arr.reshape(dims))


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read one IDX file (plain or gzip-compressed) into a CPU tensor of its own type.

    The header is validated (zero bytes, type code, dimension count) and the
    payload length must equal the product of the dimensions times the item
    size; anything else raises :class:`DataError` naming the file.  No MD5 is
    checked here: :func:`find_idx_files` does that for the dataset files.
    """
    path = Path(path)
    data, _, _ = _read_bytes(path, str(path))
    _, dtype, dims, header_len = _parse_idx_header(data, str(path))
    return _idx_tensor(data, dtype, dims, header_len)


def _verify_idx(path: Path, dataset: str, stem: str, label: str | None = None) -> torch.Tensor:
    """Read ``path`` as the dataset file ``stem``; check header, size and MD5; return its uint8 tensor."""
    label = label or str(path)
    magic_expected, count = next((m, n) for s, m, n in IDX_FILES.values() if s == stem)
    data, md5, _ = _read_bytes(path, label)
    dims_expected = (count, _IMAGE_SIDE, _IMAGE_SIDE) if magic_expected == 2051 else (count,)
    kind = "images" if magic_expected == 2051 else "labels"
    if len(data) >= 4:
        magic = int.from_bytes(data[:4], "big")
        if magic != magic_expected:
            raise DataError(
                f"{label}: IDX magic number is {magic} (0x{magic:08x}), expected {magic_expected} "
                f"(0x{magic_expected:08x}: unsigned bytes, {len(dims_expected)} dimension(s), {dataset} {kind})"
            )
    _, _, dims, header_len = _parse_idx_header(data, label)
    if dims != dims_expected:
        raise DataError(
            f"{label}: IDX dimensions are {'x'.join(map(str, dims))}, "
            f"expected {'x'.join(map(str, dims_expected))} ({dataset} {kind})"
        )
    md5_expected = IDX_MD5[dataset][stem]
    if md5 != md5_expected:
        raise DataError(f"{label}: md5 of decompressed bytes is {md5}, expected {md5_expected} ({dataset} {stem})")
    return _idx_tensor(data, np.dtype(np.uint8), dims, header_len)


_VERIFIED: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_VERIFIED_MAX = 16


def _load_verified(path: Path, dataset: str, stem: str) -> torch.Tensor:
    """:func:`_verify_idx` with an in-process LRU cache keyed on the resolved path, mtime and size.

    Copies or links of one file share an entry.  The returned tensor is shared
    with the cache: never modify it in place.
    """
    resolved = path.resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_mtime_ns, st.st_size, dataset, stem)
    hit = _VERIFIED.get(key)
    if hit is not None:
        _VERIFIED.move_to_end(key)
        return hit
    label = str(path) if resolved == Path(os.path.abspath(path)) else f"{path} (-> {resolved})"
    tensor = _verify_idx(resolved, dataset, stem, label)
    _VERIFIED[key] = tensor
    while len(_VERIFIED) > _VERIFIED_MAX:
        _VERIFIED.popitem(last=False)
    return tensor


# --------------------------------------------------------------------------
# Where files are looked for
# --------------------------------------------------------------------------

def _check_name(name) -> str:
    if isinstance(name, str):
        canonical = name.strip().lower().replace("_", "-")
        if canonical == "fashionmnist":
            canonical = "fashion-mnist"
        if canonical in DATASETS:
            return canonical
    raise ValueError(f"name={name!r} is not a known dataset; valid names: {', '.join(DATASETS)}")


def _search_mode(search_well_known: bool | None) -> bool:
    if search_well_known is not None:
        return bool(search_well_known)
    mode = os.environ.get(ENV_SEARCH, "").strip().lower() or "all"
    if mode not in _SEARCH_MODES:
        raise ValueError(f"${ENV_SEARCH}={mode!r} is not valid; use one of {', '.join(_SEARCH_MODES)}")
    return mode == "all"


@functools.lru_cache(maxsize=1)
def _repo_root() -> Path | None:
    """The source checkout holding this module (the folder with locoprop's pyproject.toml), if any."""
    for parent in Path(__file__).resolve().parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file():
            try:
                text = pyproject.read_text(encoding="utf-8", errors="replace")
            except OSError:
                return None
            return parent if re.search(r'^\s*name\s*=\s*"locoprop"', text, re.M) else None
    return None


def cache_dir(name: str | None = None) -> Path:
    """The user cache (``$XDG_CACHE_HOME/locoprop`` or ``~/.cache/locoprop``), or its folder for ``name``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    root = base / "locoprop"
    return root / _check_name(name) if name is not None else root


def search_locations(name: str, data_dir: str | os.PathLike | None = None, *,
                     search_well_known: bool | None = None) -> list[tuple[str, Path]]:
    """The folders searched for dataset ``name``, in order, as ``(what, folder)`` pairs.

    1. ``data_dir`` and ``data_dir/<name>`` (when given);
    2. ``$LOCOPROP_DATA/<name>``;
    3. ``../shared/data/<name>`` relative to the repository root, then to the
       current directory, then operating-system folders
       (``/usr/share/datasets/fashion-mnist``) -- the "well-known" folders,
       skipped when ``search_well_known`` is false or, when it is None,
       ``$LOCOPROP_DATA_SEARCH=explicit``;
    4. the user cache (:func:`cache_dir`), where downloads go.

    Folders that resolve to the same place are listed once.
    """
    name = _check_name(name)
    out: list[tuple[str, Path]] = []
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        out += [("data_dir", d), ("data_dir", d / name)]
    env = os.environ.get(ENV_DATA, "")
    if env:
        out.append((f"${ENV_DATA}", Path(env).expanduser() / name))
    if _search_mode(search_well_known):
        root = _repo_root()
        if root is not None:
            out.append(("shared (repository)", root.parent / "shared" / "data" / name))
        out.append(("shared (working directory)", Path.cwd().parent / "shared" / "data" / name))
        out += [("system", d) for d in SYSTEM_DIRS.get(name, ())]
    out.append(("cache", cache_dir(name)))
    seen: set[Path] = set()
    unique = []
    for what, d in out:
        key = Path(os.path.abspath(d))
        try:
            key = key.resolve()
        except OSError:
            pass
        if key not in seen:
            seen.add(key)
            unique.append((what, d))
    return unique


def _idx_in(folder: Path) -> dict[str, Path]:
    """The dataset files present in ``folder`` (plain preferred to .gz), by stem."""
    found = {}
    for stem, _, _ in IDX_FILES.values():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[stem] = candidate
                break
    return found


def _verify_set(name: str, files: dict[str, Path]) -> dict[str, Path]:
    for stem, path in files.items():
        _load_verified(path, name, stem)
    return {key: files[stem] for key, (stem, _, _) in IDX_FILES.items()}


def _missing_message(folder: Path, found: dict[str, Path]) -> str:
    stems = [s for s, _, _ in IDX_FILES.values()]
    has = [s for s in stems if s in found]
    lacks = [s for s in stems if s not in found]
    return f"{folder} is incomplete: it holds {', '.join(has)} but lacks {', '.join(lacks)} (plain or .gz)"


def _locate_idx(name: str, data_dir, *, download: bool, mirrors: Sequence[str] | None,
                search_well_known: bool | None) -> tuple[dict[str, Path], str]:
    locations = search_locations(name, data_dir, search_well_known=search_well_known)
    explicit = [d for what, d in locations if what == "data_dir"]
    for d in explicit:
        found = _idx_in(d)
        if found:
            if len(found) < len(IDX_FILES):
                raise DataError(_missing_message(d, found))
            return _verify_set(name, found), str(d)
    if data_dir is not None:
        raise DataError(
            f"data_dir={str(data_dir)!r} holds none of the {name} IDX files "
            f"({', '.join(s for s, _, _ in IDX_FILES.values())}, plain or .gz), neither directly nor in "
            f"{name}/; pass data_dir=None to search the usual folders and download"
        )
    for what, d in locations:
        if what == "data_dir":
            continue
        found = _idx_in(d)
        if what == "cache":
            if len(found) < len(IDX_FILES) and download:
                for stem, path in found.items():  # what is already there must be right
                    _load_verified(path, name, stem)
                missing = [s for s, _, _ in IDX_FILES.values() if s not in found]
                found.update(_download(name, missing, d, mirrors))
                return _verify_set(name, found), f"{d} (downloaded)"
            if len(found) == len(IDX_FILES):
                return _verify_set(name, found), str(d)
            if found:
                raise DataError(_missing_message(d, found) + "; download=False, so it was not completed")
            continue
        if found:
            if len(found) < len(IDX_FILES):
                raise DataError(_missing_message(d, found))
            return _verify_set(name, found), str(d)
    searched = "; ".join(f"{d} ({what})" for what, d in locations)
    raise DataError(f"{name} IDX files not found and download=False; searched: {searched}. Pass data_dir, "
                    f"set ${ENV_DATA} to a folder holding {name}/, or allow download=True")


def find_idx_files(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False,
                   mirrors: Sequence[str] | None = None,
                   search_well_known: bool | None = None) -> dict[str, Path]:
    """The four verified IDX files of ``name`` ("mnist" or "fashion-mnist"), or raise :class:`DataError`.

    Keys are ``train_images``, ``train_labels``, ``test_images``,
    ``test_labels``.  Folders are searched in the order of
    :func:`search_locations`; the first one holding any of the files is used
    and all four must be there and verify (header, size, MD5 of the
    decompressed bytes).  A folder holding none of them is skipped; one
    holding wrong or incomplete files raises, without trying further folders.
    An explicit ``data_dir`` that holds none of them raises too.  With
    ``download=True`` missing files are fetched into the user cache from
    ``mirrors`` (default :data:`MIRRORS`).
    """
    name = _check_name(name)
    if name not in IDX_MD5:
        raise ValueError(f"name={name!r} has no IDX files; IDX datasets: {', '.join(IDX_MD5)}")
    files, _ = _locate_idx(name, data_dir, download=download, mirrors=mirrors,
                           search_well_known=search_well_known)
    return files


# --------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------

def _fetch(url: str, dest_dir: Path, stem: str, timeout: float) -> Path:
    """Download ``url`` to a temporary file in ``dest_dir``; return its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".part", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                shutil.copyfileobj(response, out, _CHUNK)
                length = response.headers.get("Content-Length")
            written = out.tell()
        if length is not None and length.isdigit() and int(length) != written:
            raise OSError(f"received {written} bytes, Content-Length says {length}")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _download(name: str, stems: Sequence[str], dest: Path, mirrors: Sequence[str] | None,
              timeout: float = DOWNLOAD_TIMEOUT) -> dict[str, Path]:
    """Fetch each missing file from the first mirror that serves a verified copy; rename it into ``dest``.

    A copy that fails verification is deleted and the next mirror tried; when
    every mirror fails, :class:`DataError` lists why, and nothing of that file
    is left in ``dest``.
    """
    if isinstance(mirrors, (str, bytes)):
        raise ValueError(f"mirrors must be a sequence of base URLs, not one string: {mirrors!r}")
    mirrors = tuple(MIRRORS[name] if mirrors is None else mirrors)
    if not mirrors:
        raise ValueError(f"mirrors must be a non-empty sequence of base URLs, got {mirrors!r}")
    dest.mkdir(parents=True, exist_ok=True)
    done = {}
    for stem in stems:
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + f"/{stem}.gz"
            logger.info("downloading %s into %s", url, dest)
            try:
                tmp = _fetch(url, dest, stem, timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                errors.append(f"{url}: {type(e).__name__}: {e}")
                continue
            try:
                _verify_idx(tmp, name, stem, label=url)
                with open(tmp, "rb") as f:
                    is_gz = f.read(2) == b"\x1f\x8b"
                final = dest / (f"{stem}.gz" if is_gz else stem)
                os.replace(tmp, final)
            except DataError as e:
                errors.append(str(e))
                continue
            finally:
                tmp.unlink(missing_ok=True)
            done[stem] = final
            break
        else:
            raise DataError(f"could not download {name} {stem} into {dest} (nothing was kept): "
                            + "; ".join(errors))
    return done


# --------------------------------------------------------------------------
# CURVES
# --------------------------------------------------------------------------

def _find_curves_file(data_dir, search_well_known: bool | None) -> Path | None:
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        candidates = [d] if d.is_file() else [d / CURVES_FILE, d / "curves" / CURVES_FILE]
        for c in candidates:
            if c.is_file():
                return c
        raise DataError(
            f"data_dir={str(data_dir)!r} holds no {CURVES_FILE} (looked for {', '.join(map(str, candidates))}); "
            f"pass data_dir=None to search the usual folders or generate CURVES-like data"
        )
    for _, d in search_locations("curves", None, search_well_known=search_well_known):
        if (d / CURVES_FILE).is_file():
            return d / CURVES_FILE
    return None


def load_curves_mat(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``digs3pts_1.mat``: ``bdata`` (20000x784) and ``bdatatest`` (10000x784), values in [0, 1].

    Returns float32 CPU tensors; anything else raises :class:`DataError` naming the file.
    """
    path = Path(path)
    st = path.resolve().stat()
    return _curves_mat_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, str(path))


@functools.lru_cache(maxsize=2)
def _curves_mat_cached(resolved: str, mtime_ns: int, size: int, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    import scipy.io  # only needed for the original CURVES file

    try:
        mat = scipy.io.loadmat(resolved)
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5)
        raise DataError(f"{label}: MATLAB v7.3 (HDF5) files are not supported; save it with -v7 ({e})") from e
    except (ValueError, TypeError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{label}: cannot be read as a MATLAB .mat file ({type(e).__name__}: {e})") from e
    present = sorted(k for k in mat if not k.startswith("__"))
    out = []
    for split, key in _CURVES_KEYS.items():
        if key not in mat:
            raise DataError(f"{label}: no variable {key!r} ({split} set); variables present: {present}")
        a = np.asarray(mat[key])
        want = _CURVES_SHAPES[split]
        if a.shape != want:
            raise DataError(f"{label}: {key!r} has shape {a.shape}, expected {want}")
        if a.dtype.kind not in "biuf":
            raise DataError(f"{label}: {key!r} has dtype {a.dtype}, expected real numbers")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise DataError(f"{label}: {key!r} holds NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{label}: {key!r} has values in [{lo:g}, {hi:g}], expected within [0, 1]")
        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    return out[0], out[1]


def _curve_points(seed: int, n: int) -> np.ndarray:
    """(n, 3, 2) control points, uniform in [2, 25]^2 (pixel coordinates, centres at 0..27)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.uniform(2.0, 25.0, size=(n, 3, 2))


def _natural_spline_piece(ya, yb, ma, mb, h, u):
    """Natural cubic spline piece from ya to yb (second derivatives ma, mb, knot gap h) at fractions u."""
    h3 = h[:, :, None]  # (b, 1, 1)
    t = u[None, :, None] * h3  # (b, S, 1)
    r = h3 - t
    ma, mb, ya, yb = ma[:, None], mb[:, None], ya[:, None], yb[:, None]
    return (ma * r**3 + mb * t**3) / (6 * h3) + (ya / h3 - ma * h3 / 6) * r + (yb / h3 - mb * h3 / 6) * t


def _render_curves(points: np.ndarray, per_piece: int = 64, gain: float = 2.2, chunk: int = 2048) -> np.ndarray:
    """Draw the curve through each triple of points on a 28x28 canvas; (n, 784) float32 in [0, 1]."""
    n = points.shape[0]
    out = np.empty((n, _N_FEATURES), dtype=np.float32)
    u = (np.arange(per_piece) + 0.5) / per_piece
    side = _IMAGE_SIDE
    for s in range(0, n, chunk):
        p = points[s:s + chunk]
        b = p.shape[0]
        # Natural cubic spline through the 3 points, chord-length parameterised
        # (knots 0, h0, h0 + h1): its second derivative is zero at the ends and
        # m1 at the middle point.
        h = np.maximum(np.linalg.norm(np.diff(p, axis=1), axis=2), 1e-3)  # (b, 2)
        h0, h1 = h[:, 0:1], h[:, 1:2]
        m1 = 3.0 * ((p[:, 2] - p[:, 1]) / h1 - (p[:, 1] - p[:, 0]) / h0) / (h0 + h1)  # (b, 2)
        zero = np.zeros_like(m1)
        curve = np.concatenate([
            _natural_spline_piece(p[:, 0], p[:, 1], zero, m1, h0, u),
            _natural_spline_piece(p[:, 1], p[:, 2], m1, zero, h1, u),
        ], axis=1)  # (b, 2S, 2)
        # Each sample carries ink proportional to the arc length it stands for,
        # so the stroke has the same density however fast the curve is traced.
        seg = np.linalg.norm(np.diff(curve, axis=1), axis=2)  # (b, 2S-1)
        ink = np.zeros(curve.shape[:2])
        ink[:, :-1] += seg / 2
        ink[:, 1:] += seg / 2
        ink[:, 0] += seg[:, 0] / 2
        ink[:, -1] += seg[:, -1] / 2
        # Bilinear splatting onto the four nearest pixels (anti-aliasing) ...
        x, y = curve[..., 0], curve[..., 1]
        x0, y0 = np.floor(x), np.floor(y)
        fx, fy = x - x0, y - y0
        x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
        base = (np.arange(b) * _N_FEATURES)[:, None]
        acc = np.zeros(b * _N_FEATURES)
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                          (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < side) & (yi >= 0) & (yi < side)
            acc += np.bincount((base + yi * side + xi)[inside], weights=(ink * w)[inside],
                               minlength=b * _N_FEATURES)
        # ... then a [1 2 1]/4 blur in each direction for a pen about two
        # pixels wide, and saturation at 1 (ink adds up, then clips).
        img = np.pad(acc.reshape(b, side, side), ((0, 0), (1, 1), (1, 1)))
        img = 0.25 * img[:, :, :-2] + 0.5 * img[:, :, 1:-1] + 0.25 * img[:, :, 2:]
        img = 0.25 * img[:, :-2] + 0.5 * img[:, 1:-1] + 0.25 * img[:, 2:]
        out[s:s + b] = np.clip(gain * img, 0.0, 1.0).reshape(b, _N_FEATURES)
    return out


@functools.lru_cache(maxsize=4)
def _generated_curves(seed: int, n_train: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_train_full, n_test_full = _CURVES_SHAPES["train"][0], _CURVES_SHAPES["test"][0]
    points = _curve_points(seed, n_train_full + n_test_full)
    train = _render_curves(points[:n_train])
    test = _render_curves(points[n_train_full:n_train_full + n_test])
    return torch.from_numpy(train), torch.from_numpy(test)


def generate_curves(n_train: int = 20000, n_test: int = 10000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CURVES-like images (float32, (n, 784), values in [0, 1]), deterministic for ``seed``.

    Following Hinton & Salakhutdinov (2006), each image is a curve through
    three random points: the points are uniform in the 28x28 square (2 pixels
    from the border), the curve is the natural cubic spline through them
    (chord-length parameterisation), and it is drawn with bilinear
    anti-aliasing, a 3x3 binomial blur and saturation at 1.  Training images
    are the first 20000 of the seed's stream of 30000 and test images the last
    10000, so ``n_train``/``n_test`` below those counts give prefixes of the
    full sets.  This is *not* the original data set (see :class:`Dataset`
    ``synthetic``).
    """
    for arg, value, most in (("n_train", n_train, 20000), ("n_test", n_test, 10000)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
            raise ValueError(f"{arg} must be an int in [0, {most}], got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    train, test = _generated_curves(seed, n_train, n_test)
    return train.clone(), test.clone()


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------

def _check_limit(arg: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{arg} must be a positive int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{arg} must be at least 1 (or None for all), got {value}")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, device="cpu",
                 dtype: torch.dtype = torch.float32, limit_train: int | None = None,
                 limit_test: int | None = None, download: bool = True, seed: int = 0,
                 mirrors: Sequence[str] | None = None, search_well_known: bool | None = None) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`) as flattened inputs in [0, 1].

    ``data_dir``: a folder holding the files (directly or in ``<name>/``; for
    CURVES also the ``.mat`` file itself); when given it must hold them.
    Otherwise the folders of :func:`search_locations` are searched and, for
    MNIST and Fashion-MNIST with ``download=True``, missing files are
    downloaded from ``mirrors`` into the user cache.  ``limit_train`` /
    ``limit_test`` keep the first examples (at most that many).  ``seed`` only
    matters for generated CURVES data.  ``search_well_known=False`` (or
    ``$LOCOPROP_DATA_SEARCH=explicit``) skips the shared and system folders.

    Inputs come back on ``device`` in ``dtype`` (a floating type), labels as
    int64 (None for CURVES).  Raises :class:`DataError` for missing or wrong
    files, ValueError for bad arguments.
    """
    name = _check_name(name)
    _check_limit("limit_train", limit_train)
    _check_limit("limit_test", limit_test)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    device = torch.device(device)

    def finish(x: torch.Tensor, limit: int | None, scale: bool) -> torch.Tensor:
        x = x[:limit] if limit is not None else x
        x = x.reshape(x.shape[0], _N_FEATURES).to(device=device)
        x = x.to(dtype=dtype, copy=True)  # never hand out the cached tensor itself
        return x.div_(255) if scale else x

    def labels(y: torch.Tensor, limit: int | None) -> torch.Tensor:
        y = y[:limit] if limit is not None else y
        return y.to(device=device, dtype=torch.int64, copy=True)

    if name == "curves":
        path = _find_curves_file(data_dir, search_well_known)
        if path is not None:
            train, test = load_curves_mat(path)
            source, synthetic = str(path), False
        else:
            n_train_full, n_test_full = _CURVES_SHAPES["train"][0], _CURVES_SHAPES["test"][0]
            train, test = _generated_curves(seed, min(limit_train or n_train_full, n_train_full),
                                            min(limit_test or n_test_full, n_test_full))
            source, synthetic = f"generated CURVES-like data (seed={seed}), not the original {CURVES_FILE}", True
            logger.warning("CURVES: %s not found; using %s", CURVES_FILE, source)
        return Dataset(name, finish(train, limit_train, False), finish(test, limit_test, False),
                       None, None, source, synthetic)

    files, source = _locate_idx(name, data_dir, download=download, mirrors=mirrors,
                                search_well_known=search_well_known)
    raw = {key: _load_verified(path, name, IDX_FILES[key][0]) for key, path in files.items()}
    return Dataset(
        name,
        finish(raw["train_images"], limit_train, True),
        finish(raw["test_images"], limit_test, True),
        labels(raw["train_labels"], limit_train),
        labels(raw["test_labels"], limit_test),
        source,
        False,
    )

