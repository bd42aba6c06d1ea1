"""Layers discovery cannot see into (inside ``nn.TransformerEncoderLayer`` and other ``torch.nn`` blocks that
``torch.fx`` keeps whole, or in a model it cannot trace) are paired at the first step from the loss's autograd
graph: the same pairs, and the same steps, as tracing or the explicit ``layers=`` give.  A layer that does not run
in a step is left as it is, as ``torch.optim`` leaves a parameter without a gradient."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import locoprop
from conftest import bce_sum_mean
from test_backprop_identity import assert_close_models
from test_errors import _assert_unchanged, _snapshot

ACTIVATIONS = [torch.tanh, torch.sigmoid, F.relu, lambda t: F.leaky_relu(t, 0.2), lambda t: F.elu(t, 0.5), F.selu,
               lambda t: F.celu(t, 2.0), lambda t: F.softplus(t, beta=2.0), lambda t: F.hardtanh(t, -2.0, 3.0),
               F.relu6, F.hardsigmoid, F.logsigmoid]


class Activations(nn.Module):
    """One layer before each activation function; ``untraceable``: its forward pass checks the input's shape,
    a branch ``torch.fx`` cannot trace."""

    def __init__(self, untraceable: bool, width=8):
        super().__init__()
        torch.manual_seed(1)
        self.untraceable = untraceable
        self.body = nn.ModuleList(nn.Linear(width, width) for _ in ACTIVATIONS)
        self.head = nn.Linear(width, width)

    def forward(self, x):
        if self.untraceable and x.dim() != 2:  # a branch on the input's shape: torch.fx cannot trace it
            raise ValueError(f"expected (batch, {self.head.in_features}), got {tuple(x.shape)}")
        for layer, f in zip(self.body, ACTIVATIONS):
            x = f(layer(x))
        return self.head(x)


def _pairs(opt):
    return [(lay.name, repr(lay.transfer)) for lay in opt.layers]


def test_the_first_step_pairs_an_untraceable_model_as_tracing_pairs_the_same_model():
    x = torch.rand(16, 8, dtype=torch.float64)
    traced = locoprop.LocoProp(Activations(False).double(), output_transfer="sigmoid")
    model = Activations(True).double()
    runtime = locoprop.LocoProp(model, output_transfer="sigmoid")
    assert all(lay.pending for lay in runtime.layers) and "(paired at the first step)" in repr(runtime)
    runtime.step(lambda: bce_sum_mean(model(x), x))
    assert not any(lay.pending for lay in runtime.layers)
    assert _pairs(runtime) == _pairs(traced)
    assert len({p for _, p in _pairs(runtime)[:-1]}) == len(ACTIVATIONS)  # each a different transfer function
    assert runtime.layers[-1].transfer_desc == "sigmoid (output_transfer)"


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("variant", ["M", "post-S", "S", "poco-M"])
def test_an_untraceable_model_takes_the_steps_of_the_traced_one(variant, backend):
    x = torch.rand(16, 8, dtype=torch.float64)
    models = [Activations(False).double(), Activations(True).double()]
    opts = [locoprop.LocoProp(m, variant, lr=1e-2, local_steps=3, output_transfer="sigmoid", backend=backend)
            for m in models]
    start = copy.deepcopy(models[1])
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.step(lambda model=model: bce_sum_mean(model(x), x))
    assert_close_models(models[1], models[0], rtol=1e-14)
    assert all(not torch.equal(p, q) for p, q in zip(models[1].parameters(), start.parameters()))


class Encoder(nn.Module):
    """A token classifier around ``nn.TransformerEncoderLayer`` (a ``torch.nn`` block ``torch.fx`` keeps whole)."""

    def __init__(self, vocab=20, width=16):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(vocab, width)
        self.block = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens)))


def _cross_entropy(model, tokens, labels):
    return F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())


def test_the_layers_inside_a_transformer_block_are_layers_and_one_local_sgd_iteration_is_backprop():
    """The feed-forward layers of ``nn.TransformerEncoderLayer``: ``linear1`` with its ReLU, ``linear2`` linear
    (its output goes to a dropout and a residual sum); the attention's four projections, linear
    (``tests/test_attention_layers.py``).  The embedding and the norms are left to another optimizer, which gets
    their gradients."""
    tokens, labels = torch.randint(0, 20, (4, 6)), torch.randint(0, 20, (4, 6))
    model = Encoder().double()
    with pytest.warns(UserWarning, match=r"left to another optimizer.*\['embed.weight', 'block.norm1.weight'"):
        opt = locoprop.LocoProp(model, "M", lr=0.05, activation_lr=0.7, local_steps=1, inner="sgd",
                                output_transfer="softmax")
    attention = [f"block.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
    assert [(lay.name, lay.pending) for lay in opt.layers] == [(name, False) for name in attention] + [
        ("block.linear1", True), ("block.linear2", True), ("head", False)]
    reference = copy.deepcopy(model)
    loss = _cross_entropy(reference, tokens, labels)
    modules = ("block.self_attn", "block.linear1", "block.linear2", "head")
    layer_params = [p for name in modules for p in reference.get_submodule(name).parameters()]
    grads = torch.autograd.grad(loss, layer_params)
    other = torch.autograd.grad(_cross_entropy(reference, tokens, labels), reference.embed.weight)[0]
    opt.step(lambda: _cross_entropy(model, tokens, labels))
    assert [(lay.name, lay.transfer_desc) for lay in opt.layers] == [(name, "none (attention)") for name in attention] + [
        ("block.linear1", "relu"), ("block.linear2", "none"), ("head", "softmax (output_transfer)")]
    with torch.no_grad():
        for p, g in zip(layer_params, grads):
            p.sub_(0.05 * 0.7 * g)
    moved = [p for name in modules for p in model.get_submodule(name).parameters()]
    for p, q in zip(moved, layer_params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.embed.weight.grad, other, rtol=1e-12, atol=1e-14)  # for another optimizer
    torch.testing.assert_close(model.block.norm1.weight, reference.block.norm1.weight)  # not LocoProp's


def test_a_sequential_holding_a_transformer_block_pairs_its_layers_in_place():
    x = torch.rand(4, 5, 16, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(),
                          nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, activation=F.gelu),
                          nn.Linear(16, 16)).double()
    opt = locoprop.LocoProp(model, "S", lr=1e-2, output_transfer="sigmoid")
    attention = [f"2.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
    assert [lay.name for lay in opt.layers] == ["0", *attention, "2.linear1", "2.linear2", "3"]
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert [lay.transfer_desc for lay in opt.layers] == ["Tanh", *["none (attention)"] * 4, "gelu", "none",
                                                         "sigmoid (output_transfer)"]
    assert opt.layers[5].transfer is None  # GELU is not monotone: LocoProp-S takes it, LocoProp-M refuses it
    assert "2.linear1: (32, 16) -> no transfer function (gelu, not monotone)" in repr(opt)


def test_a_pairing_the_variant_refuses_raises_at_the_first_step_and_changes_nothing():
    x = torch.rand(4, 5, 16, dtype=torch.float64)

    class GeluBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            if x.dim() != 3:  # untraceable
                raise ValueError("expected (batch, time, features)")
            return self.down(F.gelu(self.up(x)))

    model = GeluBlock().double()
    opt = locoprop.LocoProp(model, "M", lr=1e-2, output_transfer="sigmoid")
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"layer 'up': the module after it \(gelu\) is not a monotone transfer"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    _assert_unchanged(model, opt, snap)
    assert all(lay.pending for lay in opt.layers)  # paired again at the next step
    with pytest.raises(ValueError, match="layer 'up'"):
        opt.step(lambda: bce_sum_mean(model(x), x))


def test_the_output_layer_of_an_untraceable_model_is_the_one_called_last():
    class HeadFirst(nn.Module):  # the head is defined before the body
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 6)
            self.body = nn.Linear(6, 6)

        def forward(self, x):
            if x.dim() != 2:  # untraceable
                raise ValueError("expected (batch, features)")
            return self.head(torch.tanh(self.body(x)))

    x = torch.rand(8, 6, dtype=torch.float64)
    model = HeadFirst().double()
    twin = copy.deepcopy(model)
    opt = locoprop.LocoProp(model, "M", lr=1e-2, local_steps=3, output_transfer="sigmoid")
    explicit = locoprop.LocoProp(twin, "M", lr=1e-2, local_steps=3,
                                 layers=[(twin.head, "sigmoid"), (twin.body, "tanh")])
    for _ in range(2):
        opt.step(lambda: bce_sum_mean(model(x), x))
        explicit.step(lambda: bce_sum_mean(twin(x), x))
    assert [(lay.name, lay.transfer_desc) for lay in opt.layers] == [
        ("head", "sigmoid (output_transfer)"), ("body", "tanh")]
    assert_close_models(model, twin, rtol=1e-14)


def test_an_output_changed_in_place_after_the_layer_is_refused_and_changes_nothing():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            h = self.a(x)
            h += x  # a residual added in place: the captured pre-activation is no longer a's output
            return self.b(h)

    x = torch.rand(8, 6, dtype=torch.float64)
    model = InPlace().double()
    opt = locoprop.LocoProp(model, "S", lr=1e-2, output_transfer="sigmoid")
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"layer 'a': its output was changed in place after the layer returned"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    _assert_unchanged(model, opt, snap)


class TwoHeads(nn.Module):
    """A shared trunk and two task heads; a batch of one task runs one head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.trunk = nn.Linear(6, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 6), nn.Linear(8, 6)])

    def forward(self, x, task):
        return self.heads[task](torch.tanh(self.trunk(x)))


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_a_layer_that_does_not_run_is_left_as_it_is(backend):
    """A step with task 0's batch moves the trunk and head 0 as LocoProp on the model without head 1 does, and
    leaves head 1 and its inner-optimizer state as they are (one warning); then task 1's batch moves head 1."""
    x = torch.rand(8, 6, dtype=torch.float64)
    model = TwoHeads().double()
    twin = copy.deepcopy(model)
    opt = locoprop.LocoProp(model, "M", lr=1e-2, local_steps=3, layers=[
        (model.trunk, "tanh"), (model.heads[0], "sigmoid"), (model.heads[1], "sigmoid")], backend=backend)
    alone = locoprop.LocoProp(twin, "M", lr=1e-2, local_steps=3, layers=[
        (twin.trunk, "tanh"), (twin.heads[0], "sigmoid")], backend=backend)
    head1 = copy.deepcopy(model.heads[1].state_dict())
    with pytest.warns(UserWarning, match=r"layer\(s\) \['heads.1'\] did not run"):
        opt.step(lambda: bce_sum_mean(model(x, 0), x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        opt.step(lambda: bce_sum_mean(model(x, 0), x))
    for _ in range(2):
        alone.step(lambda: bce_sum_mean(twin(x, 0), x))
    assert_close_models(model.trunk, twin.trunk, rtol=1e-14)
    assert_close_models(model.heads[0], twin.heads[0], rtol=1e-14)
    assert all(torch.equal(v, model.heads[1].state_dict()[k]) for k, v in head1.items())
    assert all(p not in opt.inner.state or not opt.inner.state[p] for p in model.heads[1].parameters())
    assert all(p.grad is None for p in model.heads[1].parameters())
    opt.step(lambda: bce_sum_mean(model(x, 1), x))
    assert not torch.equal(model.heads[1].weight, head1["weight"])
    with pytest.raises(RuntimeError, match="none of LocoProp's layers ran"):
        opt.step(lambda: nn.Linear(6, 1).double()(x).sum())


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_a_layer_whose_output_goes_into_a_custom_autograd_function_is_linear_with_a_warning():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            if x.dim() != 2:  # untraceable
                raise ValueError("expected (batch, features)")
            return self.b(_Tanh.apply(self.a(x)))

    x = torch.rand(8, 6, dtype=torch.float64)
    model = Custom().double()
    opt = locoprop.LocoProp(model, "M", lr=1e-2, output_transfer="sigmoid")
    with pytest.warns(UserWarning, match=r"layers \{'a': '_TanhBackward'\}.*custom autograd Function.*taken as "
                                         r"linear: pass layers="):
        opt.step(lambda: bce_sum_mean(model(x), x))
    assert [lay.transfer_desc for lay in opt.layers] == ["none", "sigmoid (output_transfer)"]


class GeluNet(nn.Module):
    """A GELU MLP; ``untraceable``: a branch on the input's shape."""

    def __init__(self, untraceable: bool):
        super().__init__()
        torch.manual_seed(5)
        self.untraceable = untraceable
        self.a, self.b, self.c = nn.Linear(8, 10), nn.Linear(10, 10), nn.Linear(10, 8)

    def forward(self, x):
        if self.untraceable and x.dim() != 2:
            raise ValueError("expected (batch, features)")
        return self.c(torch.tanh(self.b(F.gelu(self.a(x)))))


@pytest.mark.parametrize("untraceable", [False, True])
def test_non_monotone_linear_takes_the_layers_before_a_gelu_as_linear_under_locoprop_m(untraceable):
    x = torch.rand(16, 8, dtype=torch.float64)
    model, twin = GeluNet(untraceable).double(), GeluNet(False).double()
    with pytest.raises(ValueError, match="non_monotone='linear' gives such layers"):
        opt = locoprop.LocoProp(model, "M", lr=1e-2, local_steps=3, output_transfer="sigmoid")
        opt.step(lambda: bce_sum_mean(model(x), x))  # (untraceable: refused at the first step)
    opt = locoprop.LocoProp(model, "M", lr=1e-2, local_steps=3, output_transfer="sigmoid", non_monotone="linear")
    explicit = locoprop.LocoProp(twin, "M", lr=1e-2, local_steps=3,
                                 layers=[(twin.a, "linear"), (twin.b, "tanh"), (twin.c, "sigmoid")])
    for _ in range(3):
        opt.step(lambda: bce_sum_mean(model(x), x))
        explicit.step(lambda: bce_sum_mean(twin(x), x))
    assert opt.layers[0].transfer_desc == "gelu (not monotone: linear)"
    assert_close_models(model, twin, rtol=1e-14)
    with pytest.raises(ValueError, match=r"non_monotone: expected one of \('refuse', 'linear'\), got 'skip'"):
        locoprop.LocoProp(model, "M", non_monotone="skip")
