"""One training run of the paper's protocol (Sec. 3, reference notes "Schedule").

:func:`train` trains an autoencoder with one optimizer and writes, into its
output folder:

* ``config.json``: every setting, library versions, device, data source;
* ``metrics.jsonl``: one JSON line per epoch (``epoch``, ``train_loss`` over
  the whole training set, ``test_loss``, ``wall_time`` (training seconds,
  evaluation excluded), ``lr``, ...), and a final ``{"event": ...}`` line when
  a run stops early;
* ``checkpoint.pt``: written atomically after every epoch, loaded with
  ``weights_only=True``; ``resume=True`` continues a killed run so that its
  losses are identical to a run that was never stopped (bit for bit on CPU).

With ``distributed="data"`` or ``"layers"`` (one process per rank, e.g.
``torchrun --nproc_per_node N -m locoprop train ... --distributed data``) each
rank trains on its slice of every global batch (:mod:`locoprop.distributed`),
the evaluation is split over the ranks, and rank 0 alone writes the files and
the progress bar.  The checkpoint holds the full model and optimizer state, so
a run resumes on any number of ranks (or on one process).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import locoprop

from locoprop.distributed import batch_shard
from locoprop.fused import SOLVE_ORDERS
from locoprop.precision import PRECISIONS
from locoprop.optimizer import ROLLBACKS, is_check_finite

from .baselines import check_shampoo_root
from .data import load_dataset
from .models import AutoencoderLoss, build_autoencoder, num_parameters
from .optimizers import OPTIMIZER_NAMES, build_optimizer, is_locoprop

__all__ = ["TrainConfig", "RunResult", "train", "lr_factor", "early_exit_reason", "read_metrics",
           "save_checkpoint_atomic", "load_checkpoint"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
#: Settings that do not change the computed losses: a run may resume with other values.
RUNTIME_SETTINGS = ("distributed", "dist_timeout")
#: Steps between two reads of the running batch loss on a GPU (for the progress bar and the divergence check):
#: each read waits for the GPU, so a run there does not read every step's loss (on the CPU it does: no wait).
LOSS_READ_EVERY = 20


def _opt(help: str, **kw) -> Any:
    default = kw.pop("default")
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a run; each field is a ``locoprop train`` option of the same name."""

    dataset: str = _opt("mnist, fashion-mnist or curves", default="mnist")
    model: str = _opt("autoencoder: standard, deep or wide", default="standard")
    activation: str = _opt("hidden transfer function: tanh or relu", default="tanh")
    optimizer: str = _opt("optimizer name", default="locoprop-m")
    epochs: int = _opt("number of epochs", default=100)
    batch_size: int = _opt("batch size", default=1000)
    lr: float = _opt("learning rate η (LocoProp: the local learning rate)", default=1e-3)
    beta1: float | None = _opt("β1: momentum (SGD, TF-RMSProp, LocoProp's inner), Adam β1", default=None)
    beta2: float | None = _opt("β2: Adam β2, RMSProp decay, Shampoo/K-FAC statistics decay", default=None)
    eps: float | None = _opt("ε of the (inner) optimizer", default=None)
    activation_lr: float = _opt("LocoProp activation step size γ", default=1.0)
    local_steps: int = _opt("LocoProp local iterations T", default=10)
    inner: str = _opt("LocoProp inner optimizer", default="tf_rmsprop")
    inverse_every: int = _opt("Shampoo/K-FAC: recompute the inverse (root) every k steps (@k)", default=1)
    damping: float | None = _opt("Shampoo/K-FAC damping", default=None)
    kl_clip: float | None = _opt("K-FAC: KL clipping of the preconditioned step (Ba et al. 2017), e.g. 0.001; "
                                 "default none", default=None)
    shampoo_root: str = _opt("Shampoo: inverse p-th roots by the library's coupled Newton iteration (newton) or by "
                             "an exact eigendecomposition of the same ridged statistics (eigh, several times "
                             "faster on a CPU)", default="newton")
    weight_decay: float = _opt("decoupled weight decay (the paper lists 1e-5; its notebook applies none)",
                               default=0.0)
    warmup_epochs: int = _opt("linear warm-up epochs before the linear decay", default=5)
    schedule_epochs: int | None = _opt("epochs the learning-rate schedule spans, at least epochs (default: epochs); "
                                       "--epochs 99 --schedule-epochs 100 is the authors' notebook, which never "
                                       "trains the schedule's last epoch, whose learning rate is 0",
                                       default=None)
    seed: int = _opt("random seed (initialisation, shuffling, sampling)", default=0)
    device: str = _opt("cpu, cuda or auto", default="auto")
    dtype: str = _opt("float32 or float64", default="float32")
    limit_train: int | None = _opt("use only the first N training images", default=None)
    limit_test: int | None = _opt("use only the first N test images", default=None)
    data_dir: str | None = _opt("folder holding the dataset files", default=None)
    early_exit: bool = _opt("apply the notebook's early-exit rules", default=True)
    precision: str = _opt("LocoProp: precision of the local matrix products: fp32, auto (TF32 on CUDA where "
                          "PyTorch's float32 setting allows it, else fp32), tf32 or bf16 (float32 accumulation)",
                          default="fp32")
    cuda_graph: bool = _opt("LocoProp on CUDA: run each full batch as one captured CUDA graph of the whole step "
                            "(LocoProp.graphed_step)", default=True)
    rollback: str = _opt("LocoProp: where the copy that undoes a diverged step lives, device or host (pinned "
                         "host memory: less GPU memory, slightly slower)", default="device")
    check_finite: bool | str = _opt(
        "LocoProp: check every step's update, undo one that is not finite and stop the run there (one read-back of "
        "the GPU a step); --check-finite layer: undo only the layers whose update is not finite (check_finite="
        "'layer': where the layers are solved in the backward pass, one layer's copy at a time, less memory); "
        "--no-check-finite: no copy to undo a step, and a captured step (CUDA) reads nothing back: a divergence "
        f"stops the run at a later step's non-finite loss (on a GPU read every {LOSS_READ_EVERY} steps)",
        default=True, words=("layer",))
    compile_elementwise: bool = _opt("LocoProp on the fast solver: fuse the local iterations' elementwise work "
                                     "with torch.compile (steps 10 to 15 percent faster on an H200, 5 to 6 percent "
                                     "with bf16 products on a 2-core CPU, after a compilation on the first step)",
                                     default=False)
    triton_elementwise: bool | None = _opt("LocoProp on the fast solver: each layer's TF-RMSProp update and residual as "
                                      "Triton kernels (unset: on CUDA where Triton is installed; false: PyTorch's "
                                      "operations)", default=None)
    solve_in_backward: bool | str | None = _opt(
        "LocoProp on the CPU: solve each layer during the backward pass, as soon as the pass is done with its "
        "weights (less memory, the same update; unset: where the finite check can undo a step that fails midway; "
        "true: also with --no-check-finite; false: every layer after the pass); --solve-in-backward overlap "
        "(experimental, CUDA): each layer's solve on its stream beside the rest of the pass, also in the "
        "captured step", default=None, words=("overlap",))
    solve_order: str = _opt("LocoProp on the fast solver: layer-major (each layer's T local iterations as one chain "
                            "on its CUDA stream), iteration-major (iteration k of every layer, then one "
                            "multi-tensor update of all layers) or grouped (CUDA, experimental: iteration k of "
                            "every layer in two Triton launches); the same result up to rounding",
                            default="layer-major")
    distributed: str | None = _opt("split each step over torch.distributed ranks (launch with torchrun): data "
                                   "(exact data-parallel) or layers (layer-sharded); LocoProp optimizers only",
                                   default=None)
    dist_timeout: float = _opt("seconds a collective may wait before the job stops with an error naming the rank "
                               "that stopped answering (with --distributed)", default=600.0)

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer: unknown {self.optimizer!r}; valid: {list(OPTIMIZER_NAMES)}")
        for name in ("epochs", "batch_size", "local_steps", "inverse_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a number > 0, got {self.lr!r}")
        if self.schedule_epochs is not None and not (isinstance(self.schedule_epochs, int)
                                                     and self.schedule_epochs >= self.epochs):
            raise ValueError(f"schedule_epochs: expected an integer >= epochs ({self.epochs}), or none for the "
                             f"schedule to span the epochs trained, got {self.schedule_epochs!r}")
        span = self.schedule_epochs or self.epochs  # the warm-up is part of the schedule, not of the epochs trained
        if not 0 <= self.warmup_epochs < span:
            raise ValueError(f"warmup_epochs: expected 0 <= warmup_epochs < {span} (the epochs the schedule spans: "
                             f"schedule_epochs, else epochs), got {self.warmup_epochs}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, "
                             f"got {self.precision!r}")
        if self.rollback not in ROLLBACKS:
            raise ValueError(f"rollback: expected {' or '.join(ROLLBACKS)}, got {self.rollback!r}")
        if not is_check_finite(self.check_finite):
            raise ValueError(f"check_finite: expected true, false or layer, got {self.check_finite!r}")
        if self.solve_order not in SOLVE_ORDERS:
            raise ValueError(f"solve_order: expected {' or '.join(SOLVE_ORDERS)}, got {self.solve_order!r}")
        if self.triton_elementwise not in (None, True, False):
            raise ValueError(f"triton_elementwise: expected true, false or unset, got {self.triton_elementwise!r}")
        if self.solve_in_backward not in (None, True, False) and self.solve_in_backward != "overlap":
            raise ValueError(f"solve_in_backward: expected true, false, overlap or unset, got "
                             f"{self.solve_in_backward!r}")
        for name, default in (("precision", "fp32"), ("rollback", "device"), ("check_finite", True),
                              ("compile_elementwise", False),
                              ("triton_elementwise", None), ("solve_in_backward", None),
                              ("solve_order", "layer-major")):
            if getattr(self, name) != default and not is_locoprop(self.optimizer):
                raise ValueError(f"{name}: {getattr(self, name)!r} applies to the LocoProp optimizers only, not "
                                 f"{self.optimizer!r}")
        if self.kl_clip is not None:
            if self.optimizer != "kfac":
                raise ValueError(f"kl_clip: applies to kfac only, not {self.optimizer!r}")
            if not (isinstance(self.kl_clip, (int, float)) and self.kl_clip > 0 and self.kl_clip != float("inf")):
                raise ValueError(f"kl_clip: expected a number > 0, got {self.kl_clip!r}")
        check_shampoo_root(self.shampoo_root, self.optimizer)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected float32 or float64, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected cpu, cuda or auto, got {self.device!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1:
                raise ValueError(f"{name}: expected a number in [0, 1), got {v!r}")
        if self.distributed is not None:
            if self.distributed not in ("data", "layers"):
                raise ValueError(f"distributed: expected data or layers, got {self.distributed!r}")
            if not is_locoprop(self.optimizer):
                raise ValueError(f"distributed: only the LocoProp optimizers run distributed, not {self.optimizer!r}")
        if not (isinstance(self.dist_timeout, (int, float)) and self.dist_timeout > 0):
            raise ValueError(f"dist_timeout: expected a number of seconds > 0, got {self.dist_timeout!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config from a mapping (a YAML or JSON file's).  A number field given as text is read as a number:
        YAML 1.1, which PyYAML reads, takes ``1e-05`` (no decimal point, as ``json.dumps`` writes 1e-5) for
        a string."""
        fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; valid: {sorted(fields)}")
        values = dict(values)
        for name, value in values.items():
            if isinstance(value, str) and fields[name].startswith("float"):
                try:
                    values[name] = float(value)
                except ValueError:
                    raise ValueError(f"{name}: expected a number, got {value!r}") from None
        return cls(**values)

    def schedule_factor(self, epoch: int) -> float:
        """The learning-rate factor of 0-based ``epoch``: :func:`lr_factor` over ``schedule_epochs`` (by default
        the epochs trained); the epoch's learning rate is ``lr`` times it (paper Sec. 3)."""
        return lr_factor(epoch, self.schedule_epochs or self.epochs, self.warmup_epochs)

    def label(self) -> str:
        """A short legend label: optimizer and key settings."""
        parts = [self.optimizer, f"η={self.lr:.3g}"]
        if is_locoprop(self.optimizer):
            parts += [f"γ={self.activation_lr:g}", f"T={self.local_steps}"]
            if self.inner != "tf_rmsprop":
                parts.append(f"inner={self.inner}")
            if self.precision != "fp32":
                parts.append(self.precision)
        if self.optimizer in ("shampoo", "kfac") and self.inverse_every > 1:
            parts[0] = f"{self.optimizer}@{self.inverse_every}"
        if self.kl_clip is not None:
            parts.append(f"kl_clip={self.kl_clip:g}")
        if self.shampoo_root != "newton":
            parts.append(f"root={self.shampoo_root}")
        if self.seed != 0:  # runs of several seeds (locoprop train --seeds) tell themselves apart
            parts.append(f"seed={self.seed}")
        return " ".join(parts)


@dataclass
class RunResult:
    out: Path
    status: str  # "finished" | "diverged" | "early-exit" | "pruned" | "stopped"
    epochs_done: int
    final_train_loss: float | None
    final_test_loss: float | None
    reason: str = ""


def lr_factor(epoch: int, epochs: int, warmup: int) -> float:
    """The notebook's schedule: ``e/W`` for ``e < W``, then ``1 - (e + 1 - W)/(E - W)`` (0-based epoch)."""
    if epoch < warmup:
        return epoch / warmup
    return max(0.0, 1.0 - (epoch + 1 - warmup) / (epochs - warmup))


def early_exit_reason(loss: float, best: float, epochs_done: int) -> str | None:
    """The notebook's rules for abandoning a run (reference notes, "Tuning protocol")."""
    if not math.isfinite(loss):
        return f"train loss is {loss}"
    if loss > 1000:
        return f"train loss {loss:.4g} exceeds 1000"
    if best > 600:
        return f"best train loss {best:.4g} exceeds 600"
    if epochs_done >= 10 and best > 350:
        return f"best train loss {best:.4g} still above 350 after epoch {epochs_done}"
    return None


def save_checkpoint_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(epoch records, event records) of a run's ``metrics.jsonl``."""
    records, events = [], []
    path = Path(run_dir) / METRICS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run folder?)")
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (events if "event" in rec else records).append(rec)
    return records, events


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "locoprop": locoprop.__version__}
    for pkg in ("pytorch_optimizer", "backpack-for-pytorch", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor, chunk: int = 10000, ranks: "_Ranks | None" = None) -> float:
    """The paper's loss over a whole split (sum over pixels, mean over examples).

    With ``ranks``, chunk ``j`` is evaluated by rank ``j mod N`` and the chunk
    sums are added in chunk order on every rank: the same value as one process.
    """
    starts = range(0, data.shape[0], chunk)
    sums = [0.0] * len(starts)
    for j, i in enumerate(starts):
        if ranks is None or j % ranks.world == ranks.rank:
            x = data[i:i + chunk]
            sums[j] = torch.nn.functional.binary_cross_entropy_with_logits(model(x), x, reduction="sum").item()
    if ranks is not None and ranks.world > 1:
        sums = ranks.sum(sums, "evaluation")
    total = 0.0
    for v in sums:
        total += v
    return total / data.shape[0]


class _Ranks:
    """What :func:`train` needs of torch.distributed: rank 0 decides, reads and writes; every rank follows.

    One process: ``rank 0 of 1`` and no communication.
    """

    def __init__(self, comm=None, created: bool = False) -> None:
        self.comm, self.created = comm, created
        self.rank = comm.rank if comm is not None else 0
        self.world = comm.world_size if comm is not None else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, obj, what: str):
        """Rank 0's ``obj`` on every rank."""
        return obj if self.comm is None else self.comm.broadcast_object(obj, 0, what)

    def decide(self, fn: Callable[[], Any], what: str):
        """Run ``fn`` on rank 0 and give its result to every rank, or raise its error on every rank."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except (ValueError, FileExistsError, FileNotFoundError) as exc:
                if self.comm is None:
                    raise
                error = (type(exc).__name__, str(exc))
        if self.comm is None:
            return result
        result, error = self.share((result, error), what)
        if error is not None:
            kind = {"ValueError": ValueError, "FileExistsError": FileExistsError}.get(error[0], FileNotFoundError)
            raise kind(error[1])
        return result

    def close(self) -> None:
        """Destroy the process group if :func:`train` created it, once every rank is done with it."""
        if self.created:
            self.comm.barrier("end of the run")
            torch.distributed.destroy_process_group()
            self.created = False

    def sum(self, values: list[float], what: str) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.comm.group is not None and torch.distributed.get_backend(self.comm.group) == "nccl":
            t = t.cuda()
        self.comm.all_reduce(t, what)
        return t.cpu().tolist()


def _start_ranks(cfg: "TrainConfig", device: torch.device) -> _Ranks:
    """Join (or, from torchrun's environment, create) the process group for ``cfg.distributed``."""
    if cfg.distributed is None:
        return _Ranks()
    from locoprop.distributed import Communicator, init_from_environment

    created = init_from_environment("nccl" if device.type == "cuda" else "gloo", cfg.dist_timeout)
    comm = Communicator.for_group(None)
    if cfg.batch_size < comm.world_size:
        raise ValueError(f"batch_size: the global batch ({cfg.batch_size}) must have at least one row per rank "
                         f"({comm.world_size} ranks)")
    return _Ranks(comm, created)


def run_record(cfg: TrainConfig, data, device: torch.device, model: torch.nn.Module) -> dict:
    """What a run's ``config.json`` says of it: settings, legend label, versions, device, data, start."""
    return {
        "settings": asdict(cfg), "label": cfg.label(), "versions": _versions(), "device": _device_name(device),
        "data_source": data.source, "synthetic_data": data.synthetic, "train_examples": int(data.train.shape[0]),
        "test_examples": int(data.test.shape[0]), "parameters": num_parameters(model),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, stop_after_epochs: int | None = None,
          on_epoch: Callable[[dict], str | None] | None = None) -> RunResult:
    """Train one run into ``out``; see the module docstring.

    ``stop_after_epochs`` ends the process's work after that many epochs of
    this call (used to simulate a killed run in tests).  ``on_epoch`` is called
    with each epoch's metrics record after its checkpoint is written; a string
    it returns stops the run with status ``"pruned"`` and that reason (the
    tuner's pruning).
    """
    cfg.validate()
    out = Path(out)
    ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if cfg.distributed is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    ranks = _start_ranks(cfg, device)
    if not ranks.main:
        log = lambda s: None  # noqa: E731 - rank 0 reports

    def prepare_out() -> None:
        if out.exists() and (metrics_path.exists() or ckpt_path.exists()) and not resume:
            raise FileExistsError(f"{out}: a run is already there; pass resume=True (--resume) or choose another --out")
        out.mkdir(parents=True, exist_ok=True)

    ranks.decide(prepare_out, "run folder check")
    dtype = getattr(torch, cfg.dtype)
    data = load_dataset(cfg.dataset, cfg.data_dir, device=device, dtype=dtype, limit_train=cfg.limit_train,
                        limit_test=cfg.limit_test, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_autoencoder(cfg.model, cfg.activation, input_dim=data.train.shape[1], dtype=dtype, device=device)
    loss_fn = AutoencoderLoss()
    opt = build_optimizer(cfg.optimizer, model, loss_fn, lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                          activation_lr=cfg.activation_lr, local_steps=cfg.local_steps, inner=cfg.inner,
                          inverse_every=cfg.inverse_every, damping=cfg.damping, precision=cfg.precision,
                          kl_clip=cfg.kl_clip, rollback=cfg.rollback, check_finite=cfg.check_finite,
                          compile_elementwise=cfg.compile_elementwise,
                          triton_elementwise=cfg.triton_elementwise, solve_order=cfg.solve_order,
                          solve_in_backward=cfg.solve_in_backward, shampoo_root=cfg.shampoo_root)
    if cfg.distributed is not None:
        from locoprop.distributed import distribute

        distribute(opt, cfg.distributed)

    start_epoch, wall, best, step = 0, 0.0, math.inf, 0
    ckpt = ranks.decide(lambda: load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None, "checkpoint")
    if ckpt is not None:
        saved = ckpt["config"]
        differ = sorted(k for k in saved if saved[k] != asdict(cfg).get(k) and k not in RUNTIME_SETTINGS)
        if differ:
            raise ValueError(f"{ckpt_path}: saved with different settings {differ}; resume with the same settings")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        start_epoch, wall, best, step = ckpt["epoch"], ckpt["wall_time"], ckpt["best"], ckpt["step"]
        # keep the metrics the checkpoint covers (a kill may land between the two writes)
        if ranks.main and metrics_path.exists():
            records, _ = read_metrics(out)
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records if r["epoch"] <= start_epoch))
        log(f"resuming {out} at epoch {start_epoch}")
    elif ranks.main and metrics_path.exists():
        metrics_path.unlink()

    config_record = run_record(cfg, data, device, model)
    if cfg.distributed is not None:
        config_record["distributed"] = opt.distributor.describe()
    if ranks.main:
        (out / CONFIG).write_text(json.dumps(config_record, indent=2) + "\n")

    def write(rec: dict) -> None:
        if ranks.main:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")

    dranks = ranks if ranks.world > 1 else None
    if start_epoch == 0:
        write({"epoch": 0, "train_loss": evaluate(model, data.train, ranks=dranks),
               "test_loss": evaluate(model, data.test, ranks=dranks), "wall_time": 0.0, "lr": 0.0, "step": 0})

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a harness dependency
        tqdm = None

    n = data.train.shape[0]
    batches = math.ceil(n / cfg.batch_size)
    graphed = static_x = None
    if device.type == "cuda" and cfg.cuda_graph and is_locoprop(cfg.optimizer) and cfg.distributed is None:
        # the whole step as one CUDA graph; the closure reads the batch from static_x (LocoProp.graphed_step)
        static_x = torch.empty(min(cfg.batch_size, n), data.train.shape[1], device=device, dtype=dtype)
        try:
            graphed = opt.graphed_step(lambda: loss_fn(model(static_x), static_x))
        except ValueError as exc:  # e.g. an inner optimizer the fast solver lacks: ordinary steps
            log(f"cuda_graph: {exc}; taking ordinary steps")
    status, reason, epochs_this_call = "finished", "", 0
    last_train = last_test = None
    for epoch in range(start_epoch, cfg.epochs):
        lr = cfg.lr * cfg.schedule_factor(epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        perm = _epoch_permutation(n, cfg.seed, epoch).to(device)
        bar = tqdm(total=batches, desc=f"{cfg.optimizer} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress or not ranks.main) if tqdm else None
        _sync(device)
        t0 = time.perf_counter()
        # the running mean of the batch losses stays on the device (the arithmetic of a host float64 mean, to the
        # bit): reading a loss back after every step would make the host wait for the GPU at every step
        running = torch.zeros((), dtype=torch.float64, device=device)
        diverged = None
        for i in range(batches):
            index = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            if ranks.world > 1:  # this rank's slice of the global batch
                index = batch_shard(index, ranks.rank, ranks.world)
            xb = data.train[index]
            try:
                if graphed is not None and xb.shape == static_x.shape:
                    static_x.copy_(xb)
                    loss = graphed()
                else:
                    loss = opt.step(lambda: loss_fn(model(xb), xb))
            except locoprop.DivergenceError as exc:
                diverged = str(exc)
                break
            running += (loss.detach().double() - running) / (i + 1)
            if device.type == "cpu" or (i + 1) % LOSS_READ_EVERY == 0 or i + 1 == batches:
                value = float(running)
                if not math.isfinite(value):
                    diverged = f"batch loss is {value} (the mean of the epoch's batches 1 to {i + 1})"
                    break
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.3f}")
            if cfg.weight_decay:
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(1.0 - lr * cfg.weight_decay)
            step += 1
            if bar is not None:
                bar.update(1)
        _sync(device)
        wall += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        if diverged:
            status, reason = "diverged", f"epoch {epoch + 1}: {diverged}"
            break
        train_loss, test_loss = evaluate(model, data.train, ranks=dranks), evaluate(model, data.test, ranks=dranks)
        best = min(best, train_loss)
        rec = {"epoch": epoch + 1, "train_loss": train_loss, "test_loss": test_loss, "wall_time": wall, "lr": lr,
               "step": step, "batch_loss": float(running)}
        why = early_exit_reason(train_loss, best, epoch + 1) if cfg.early_exit else (
            None if math.isfinite(train_loss) else f"train loss is {train_loss}")
        if why and not math.isfinite(train_loss):
            status, reason = "diverged", f"epoch {epoch + 1}: {why}"
            break
        write(rec)
        last_train, last_test = train_loss, test_loss
        opt_state = opt.state_dict()  # the full state; a collective with --distributed layers
        if ranks.main:
            save_checkpoint_atomic({
                "format": 1, "config": asdict(cfg), "epoch": epoch + 1, "step": step, "wall_time": wall, "best": best,
                "model": model.state_dict(), "optimizer": opt_state, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }, ckpt_path)
        log(f"epoch {epoch + 1}/{cfg.epochs}  train {train_loss:.4f}  test {test_loss:.4f}  lr {lr:.3g}  "
            f"{wall:.1f}s")
        if why:
            status, reason = "early-exit", f"epoch {epoch + 1}: {why}"
            break
        pruned = on_epoch(rec) if on_epoch is not None and ranks.main else None
        if on_epoch is not None and ranks.world > 1:
            pruned = ranks.share(pruned, "on_epoch decision")
        if pruned:
            status, reason = "pruned", f"epoch {epoch + 1}: {pruned}"
            break
        epochs_this_call += 1
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs and epoch + 1 < cfg.epochs:
            ranks.close()
            return RunResult(out, "stopped", epoch + 1, train_loss, test_loss, "stop_after_epochs")
    if status != "finished":
        write({"event": status, "reason": reason})
        log(f"{out}: stopped ({status}): {reason}; the last good checkpoint is kept")
    done = None
    if ranks.main:
        records, _ = read_metrics(out)
        done = records[-1]["epoch"] if records else 0
        if last_train is None and records:
            last_train, last_test = records[-1]["train_loss"], records[-1]["test_loss"]
    if ranks.world > 1:
        done, last_train, last_test = ranks.share((done, last_train, last_test), "result")
    ranks.close()
    return RunResult(out, status, done, last_train, last_test, reason)
