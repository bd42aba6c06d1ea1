"""Layer discovery in any model ``torch.fx`` can trace: each layer module with what alone consumes its output
(an activation module or function), the same steps as the explicit ``layers=`` pairs."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import locoprop
from conftest import bce_sum_mean
from test_backprop_identity import assert_close_models


class Block(nn.Module):
    """A residual block: its second layer's output goes into a sum (linear)."""

    def __init__(self, width):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)

    def forward(self, x):
        return x + self.outer(F.elu(self.inner(x), alpha=0.5))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(12, 10)
        self.act = nn.Softplus()
        self.block = Block(10)
        self.shared = nn.Linear(10, 10)
        self.head = nn.Linear(10, 12)

    def forward(self, x):
        h = self.act(self.embed(x))
        h = self.block(h)
        h = torch.tanh(self.shared(h))
        h = self.shared(h).tanh()  # the same layer again, the same transfer function
        return self.head(F.leaky_relu(h, 0.2) * 1.0)


PAIRS = [("embed", "Softplus", "softplus"), ("block.inner", "elu", "elu"), ("block.outer", "none", "linear"),
         ("shared", "tanh", "tanh"), ("head", "sigmoid (output_transfer)", "sigmoid")]


def test_the_traced_pairs_are_the_activation_after_each_layer():
    model = Net().double()
    opt = locoprop.LocoProp(model, output_transfer="sigmoid")
    assert [(lay.name, lay.transfer_desc, lay.transfer.name) for lay in opt.layers] == PAIRS
    assert opt.layers[1].transfer.beta == 0.5
    assert opt.layers[0].transfer_module is model.act  # a module's output is captured for post-activations


@pytest.mark.parametrize("variant", ["M", "post-S", "S"])
def test_traced_discovery_takes_the_steps_of_the_explicit_pairs(variant):
    x = torch.rand(16, 12, dtype=torch.float64)
    models = [Net().double() for _ in range(2)]
    m = models[1]
    explicit = [(m.embed, m.act), (m.block.inner, locoprop.transfer.ELU(0.5)), (m.block.outer, "linear"),
                (m.shared, "tanh"), (m.head, "sigmoid")]
    opts = [locoprop.LocoProp(models[0], variant, lr=1e-2, local_steps=4, output_transfer="sigmoid"),
            locoprop.LocoProp(m, variant, lr=1e-2, local_steps=4, layers=explicit)]
    start = copy.deepcopy(models[0])
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.step(lambda model=model: bce_sum_mean(model(x), x))
    assert_close_models(models[0], models[1], rtol=1e-14)
    assert not torch.equal(models[0].embed.weight, start.embed.weight)


def test_traced_discovery_refuses_what_it_cannot_pair():
    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(F.gelu(self.a(x)))

    with pytest.raises(ValueError, match=r"layer 'a': the module after it \(gelu\) is not a monotone transfer"):
        locoprop.LocoProp(Gelu(), output_transfer="linear")
    assert [lay.transfer for lay in locoprop.LocoProp(Gelu(), "S", output_transfer="linear").layers][0] is None

    class InPlace(Gelu):
        def forward(self, x):
            return self.b(F.relu(self.a(x), inplace=True))

    with pytest.raises(ValueError, match=r"layer 'a': the activation relu\(inplace=True\) overwrites"):
        locoprop.LocoProp(InPlace(), output_transfer="linear")

    class Twice(Gelu):
        def forward(self, x):
            return self.b(torch.sigmoid(self.a(torch.tanh(self.a(x)))))

    with pytest.raises(ValueError, match="layer 'a' appears again in the traced forward pass, followed by sigmoid "
                                         "where it was followed by tanh"):
        locoprop.LocoProp(Twice(), output_transfer="linear")


def test_a_sequential_with_layers_inside_its_blocks_is_traced_and_read_in_order_where_tracing_fails():
    """The residual block's layers are LocoProp layers too (no warning), the same steps as the explicit pairs;
    where a block cannot be traced the Sequential is read in order and the block's layers are paired at the first
    step that runs them (``tests/test_runtime_pairing.py``)."""
    x = torch.rand(16, 12, dtype=torch.float64)

    def model():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), Block(10), nn.Linear(10, 12)).double()
    traced, explicit = model(), model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no parameter left to another optimizer
        opt = locoprop.LocoProp(traced, lr=1e-2, local_steps=4, output_transfer="sigmoid")
    assert [(lay.name, lay.transfer.name) for lay in opt.layers] == [
        ("0", "tanh"), ("2.inner", "elu"), ("2.outer", "linear"), ("3", "sigmoid")]
    m = explicit
    twin = locoprop.LocoProp(m, lr=1e-2, local_steps=4, layers=[
        (m[0], m[1]), (m[2].inner, locoprop.transfer.ELU(0.5)), (m[2].outer, "linear"), (m[3], "sigmoid")])
    for _ in range(3):
        opt.step(lambda: bce_sum_mean(traced(x), x))
        twin.step(lambda: bce_sum_mean(explicit(x), x))
    assert_close_models(traced, explicit, rtol=1e-14)

    class Branchy(Block):
        def forward(self, x):
            return self.outer(x) if x.sum() > 0 else self.inner(x)  # data-dependent: not traceable

    torch.manual_seed(0)
    untraceable = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), Branchy(10), nn.Linear(10, 12)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no parameter left to another optimizer
        opt = locoprop.LocoProp(untraceable, lr=1e-2, output_transfer="sigmoid")
    assert [(lay.name, lay.pending) for lay in opt.layers] == [
        ("0", False), ("2.inner", True), ("2.outer", True), ("3", False)]
    before = copy.deepcopy(untraceable)
    ran, idle = ("outer", "inner") if untraceable[:2](x).sum() > 0 else ("inner", "outer")
    with pytest.warns(UserWarning, match=rf"\['2.{idle}'\] did not run"):  # the branch taken runs, the other waits
        opt.step(lambda: bce_sum_mean(untraceable(x), x))
    assert {lay.name: lay.pending for lay in opt.layers} == {"0": False, f"2.{idle}": True, f"2.{ran}": False,
                                                             "3": False}
    assert torch.equal(getattr(untraceable[2], idle).weight, getattr(before[2], idle).weight)
    assert not torch.equal(getattr(untraceable[2], ran).weight, getattr(before[2], ran).weight)


def test_a_layer_before_a_norm_a_dropout_or_a_block_is_linear_and_before_another_activation_has_none():
    """The module rule is the function rule: an activation of torch.nn gives its transfer function (none for a
    non-monotone one, which LocoProp-M refuses by name); any other module (a LayerNorm, a Dropout, a block) takes
    the output as any other call does: linear."""
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 6), nn.Dropout(0.0),
                          nn.Linear(6, 6), nn.Sigmoid(), Block(6), nn.Linear(6, 6))
    opt = locoprop.LocoProp(model, "M", output_transfer="sigmoid")
    assert [(lay.name, lay.transfer_desc) for lay in opt.layers] == [
        ("0", "none"), ("3", "none"), ("5", "Sigmoid"), ("7.inner", "elu"), ("7.outer", "none"),
        ("8", "sigmoid (output_transfer)")]
    with pytest.raises(ValueError, match=r"layer '0': the module after it \(PReLU\) is not a monotone transfer"):
        locoprop.LocoProp(nn.Sequential(nn.Linear(6, 6), nn.PReLU(), nn.Linear(6, 6)), "M", output_transfer="linear")
