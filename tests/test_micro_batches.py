"""A step on a batch taken in micro-batches (``opt.step([closure, ...])``, gradient accumulation) is the step on
the whole batch: each layer's local problem holds every micro-batch's rows, the loss is the sum of theirs, the
other parameters' gradients are summed; each micro-batch's autograd graph is freed before the next one runs."""

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import locoprop
from conftest import small_autoencoder
from test_errors import _assert_unchanged, _snapshot


class Autoencoder(nn.Module):
    """Layers, a LayerNorm (another optimizer's parameters: their gradients are summed) and a sigmoid output."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
        self.norm = nn.LayerNorm(6)
        self.dec = nn.Sequential(nn.Linear(6, 10), nn.Softplus(), nn.Linear(10, 12))

    def forward(self, x):
        return self.dec(self.norm(self.enc(x)))


def _bce(model, x, total):
    """The batch's loss as micro-batches add it up: summed over pixels, divided by the whole batch's size."""
    return F.binary_cross_entropy_with_logits(model(x), x, reduction="sum") / total


def _pair(model_fn, kwargs):
    torch.manual_seed(0)
    one = model_fn().double()
    many = copy.deepcopy(one)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LayerNorm is left to another optimizer
        return (one, locoprop.LocoProp(one, **kwargs)), (many, locoprop.LocoProp(many, **kwargs))


def assert_close_models(a, b, rtol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * 1e-2, msg=name)


def _assert_same_state(a, b):
    sa, sb = a.state_dict()["inner"]["state"], b.state_dict()["inner"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, v in sa[k].items():
            torch.testing.assert_close(sb[k][name], v, rtol=1e-12, atol=1e-15)


ITERATIVE = [("S", {}), ("M", {}), ("post-S", {}), ("poco-M", {}), ("S-natural", {}),
             ("M", {"inner": "adam"}), ("S", {"regularizer": "fisher"})]
CLOSED = [("S-closed", {}), ("S-natural-closed", {})]


@pytest.mark.parametrize("variant, extra, backend",
                         [(v, e, b) for v, e in ITERATIVE for b in ("reference", "fused")
                          if b == "reference" or "regularizer" not in e]
                         + [(v, e, "reference") for v, e in CLOSED])
def test_micro_batches_take_the_step_of_the_whole_batch(variant, extra, backend):
    """Three micro-batches of 7, 7 and 4 examples against one closure on the 18: the same losses, weights,
    inner state and summed gradients of the LayerNorm, over three steps."""
    kwargs = dict(variant=variant, lr=1e-2, activation_lr=2.0, output_transfer="sigmoid", backend=backend, **extra)
    if "closed" not in variant:
        kwargs["local_steps"] = 4
    else:
        kwargs.pop("backend")
    (one, opt_one), (many, opt_many) = _pair(Autoencoder, kwargs)
    start = copy.deepcopy(one)
    x = torch.rand(18, 12, dtype=torch.float64)
    for _ in range(3):
        loss_one = opt_one.step(lambda: _bce(one, x, len(x)))
        loss_many = opt_many.step([lambda part=part: _bce(many, part, len(x)) for part in x.split(7)])
        torch.testing.assert_close(loss_many, loss_one, rtol=1e-14, atol=0)
    assert_close_models(many, one, rtol=1e-12)
    for p, q in zip(many.norm.parameters(), one.norm.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)
    if opt_one.inner is not None:
        _assert_same_state(opt_one, opt_many)
    assert any(not torch.equal(p, q) for p, q in zip(many.enc.parameters(), start.enc.parameters()))


class Siamese(nn.Module):
    """One encoder run on both halves of each example: a layer called twice per forward pass."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(16, 12)

    def forward(self, x):
        return self.head(torch.cat([self.encoder(x[:, :6]), self.encoder(x[:, 6:])], dim=1))


class Convolutional(nn.Module):
    """A convolution (rows: output positions) before a Linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, kernel_size=3, padding=1)
        self.head = nn.Linear(36, 12)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x[:, None, :])).flatten(1))


class Transformer(nn.Module):
    """Layers inside ``nn.TransformerEncoderLayer``: paired at the first step, from its first micro-batch."""

    def __init__(self):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(12, 12)

    def forward(self, x):
        return self.head(self.block(x.reshape(-1, 3, 4)).flatten(1))


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("model_fn", [Siamese, Convolutional, Transformer])
def test_micro_batches_of_shared_convolutional_and_runtime_paired_layers(model_fn, backend):
    kwargs = dict(variant="M", lr=1e-2, activation_lr=2.0, local_steps=3, output_transfer="sigmoid",
                  backend=backend)
    (one, opt_one), (many, opt_many) = _pair(model_fn, kwargs)
    x = torch.rand(10, 12, dtype=torch.float64)
    for _ in range(2):
        opt_one.step(lambda: _bce(one, x, len(x)))
        opt_many.step([lambda part=part: _bce(many, part, len(x)) for part in x.split(3)])
    assert_close_models(many, one, rtol=1e-12)
    assert [lay.transfer_desc for lay in opt_many.layers] == [lay.transfer_desc for lay in opt_one.layers]


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 12), nn.Linear(8, 12)])

    def forward(self, x, task):
        return self.heads[task](self.body(x))


def test_a_layer_that_runs_in_some_micro_batches_only_is_solved_over_their_rows():
    """Head 0 runs in the first micro-batch, head 1 in the second; one closure running both on their halves
    takes the same step, and no layer is said to be idle."""
    torch.manual_seed(0)
    one = TwoHeads().double()
    many = copy.deepcopy(one)
    opt_one, opt_many = (locoprop.LocoProp(m, "M", lr=1e-2, activation_lr=2.0, local_steps=3, layers=[
        (m.body[0], "tanh"), (m.heads[0], "sigmoid"), (m.heads[1], "sigmoid")]) for m in (one, many))
    x = torch.rand(8, 12, dtype=torch.float64)
    halves = x.split(4)

    def both(model):
        return sum(F.binary_cross_entropy_with_logits(model(h, task), h, reduction="sum") / len(x)
                   for task, h in enumerate(halves))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "did not run" warning: each head ran in one micro-batch
        opt_one.step(lambda: both(one))
        opt_many.step([lambda task=task, h=h: F.binary_cross_entropy_with_logits(many(h, task), h, reduction="sum")
                       / len(x) for task, h in enumerate(halves)])
    assert_close_models(many, one, rtol=1e-12)


def test_each_micro_batch_graph_is_freed_before_the_next_closure_runs():
    """A tensor only the first micro-batch's autograd graph holds is gone when the second closure runs; in a
    one-closure step that runs both halves, the first half's is alive until the end of the forward pass."""
    model = small_autoencoder(torch.float64)
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid")
    x = torch.rand(8, 20, dtype=torch.float64)
    refs, alive_at_second = [], []

    def closure(part):
        if refs:
            gc.collect()
            alive_at_second.append(refs[0]() is not None)
        logits = model(part)
        held = torch.exp(-logits.abs())  # saved by the graph (the square's operand), nowhere else
        refs.append(weakref.ref(held))
        return (F.binary_cross_entropy_with_logits(logits, part, reduction="sum") + (held * held).sum()) / len(x)
    opt.step([lambda part=part: closure(part) for part in x.split(4)])
    assert alive_at_second == [False]
    refs.clear()
    alive_at_second.clear()
    opt.step(lambda: sum(closure(part) for part in x.split(4)))
    assert alive_at_second == [True]  # the check is one that can fail


@pytest.mark.parametrize("closures, exc, match", [
    ([], ValueError, "empty list"),
    ("abc", TypeError, "callable or a list"),
    ([lambda: None, 3], TypeError, "item 1 of the list is a int"),
])
def test_a_bad_list_of_closures_is_refused(closures, exc, match):
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, output_transfer="sigmoid")
    snap = _snapshot(model, opt)
    with pytest.raises(exc, match=match):
        opt.step(closures)
    _assert_unchanged(model, opt, snap)


def _trained():
    model = Autoencoder().double()
    x = torch.rand(8, 12, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = locoprop.LocoProp(model, "M", lr=1e-2, output_transfer="sigmoid")
    opt.step([lambda part=part: _bce(model, part, len(x)) for part in x.split(4)])
    return model, opt, x


def _failing(exc):
    def closure():
        raise exc
    return closure


@pytest.mark.parametrize("second, exc, match", [
    (_failing(KeyError("missing image")), KeyError, "missing image"),
    (lambda model, x: _bce(model, x, len(x)) * float("nan"), locoprop.DivergenceError, "nan"),
    (lambda model, x: _bce(model, x, len(x)).detach(), ValueError, "does not depend"),
])
def test_a_failing_micro_batch_changes_nothing(second, exc, match):
    """Weights, inner state and the other parameters' gradients are as before the step."""
    model, opt, x = _trained()
    snap = _snapshot(model, opt)
    grads = [p.grad.clone() for p in model.norm.parameters()]
    first, rest = x.split(4)
    closures = [lambda: _bce(model, first, len(x)),
                second if second.__code__.co_argcount == 0 else lambda: second(model, rest)]
    with pytest.raises(exc, match=match):
        opt.step(closures)
    _assert_unchanged(model, opt, snap)
    for p, g in zip(model.norm.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_no_layer_running_in_any_micro_batch_is_an_error():
    model, opt, x = _trained()
    other = nn.Linear(12, 1).double()
    with pytest.raises(RuntimeError, match="none of LocoProp's layers ran"):
        opt.step([lambda: other(x).sum(), lambda: other(x).mean()])


def test_graphed_step_takes_one_closure():
    model, opt, x = _trained()
    with pytest.raises(TypeError, match="graphed_step: closure: expected one callable"):
        opt.graphed_step([lambda: _bce(model, x, len(x))])
