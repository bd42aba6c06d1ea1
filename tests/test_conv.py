"""Convolution layers: a ``nn.Conv2d`` is a linear map of each input patch, its local problem that of a Linear
layer on the patches (``locoprop.layers.ConvMatrix``), checked against identities."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import locoprop
from test_backprop_identity import ETA, GAMMA, assert_changed, assert_close_models, backprop_step

C, H, W = 2, 6, 5


def _images(n=12, seed=0):
    return torch.rand(n, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _loss(model, x):
    return nn.functional.binary_cross_entropy_with_logits(model(x), x.flatten(1), reduction="sum") / len(x)


def _convnet():
    """Stride, padding (numbers and ``"same"``), dilation, several transfer functions, a bias-free kernel."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(C, 4, 3, padding="same"), nn.Tanh(),
                         nn.Conv2d(4, 5, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), bias=False), nn.ELU(0.7),
                         nn.Flatten(), nn.Linear(5 * 3 * 2, C * H * W)).double()


def steps_side_by_side(models, inputs, loss, **kw):
    """``LocoProp(model, **kw)`` for each of two models, one step each on every input, their losses equal to
    1e-12; the two optimizers."""
    opts = [locoprop.LocoProp(m, **kw) for m in models]
    for x in inputs:
        losses = [float(opt.step(lambda m=m: loss(m, x))) for m, opt in zip(models, opts)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    return opts


@pytest.mark.parametrize("variant, backend", [("M", "reference"), ("M", "fused"), ("S", "reference"), ("S", "fused"),
                                              ("S-closed", "auto"), ("S-natural-closed", "auto")])
def test_a_convolution_over_its_whole_input_steps_as_the_linear_layer_it_is(variant, backend):
    """A kernel the size of the image has one output position: the Linear layer on the flattened image (the
    patch's columns in the order channel, row, column), the same steps to rounding."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(C, 7, (H, W)), nn.Tanh(), nn.Flatten(), nn.Linear(7, C * H * W)).double()
    dense = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, 7), nn.Tanh(), nn.Linear(7, C * H * W)).double()
    with torch.no_grad():
        dense[1].weight.copy_(conv[0].weight.reshape(7, -1))
        dense[1].bias.copy_(conv[0].bias)
        dense[3].load_state_dict(conv[3].state_dict())
    opts = steps_side_by_side((conv, dense), [_images(seed=seed) for seed in range(3)], _loss, variant=variant,
                              lr=1e-2, local_steps=4, output_transfer="sigmoid", backend=backend)
    torch.testing.assert_close(conv[0].weight.reshape(7, -1), dense[1].weight, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(conv[3].weight, dense[3].weight, rtol=1e-10, atol=1e-13)
    assert [lay.name for lay in opts[0].layers] == ["0", "3"]
    assert opts[0].last_solver == {"fused": "fused", "reference": "reference"}.get(backend, "closed_form")


@pytest.mark.parametrize("variant", ["S", "M", "post-S", "poco-M"])
def test_one_local_sgd_iteration_on_convolutions_is_backprop(variant):
    """Paper Sec. 2.1: one local SGD iteration (rate η) from the targets of step size γ is BackProp's step with
    rate ηγ, the convolutions' kernels included (their gradient sums over examples and positions)."""
    model, x = _convnet(), _images()
    expected = backprop_step(model, lambda m: _loss(m, x), ETA * GAMMA)
    opt = locoprop.LocoProp(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_steps=1, inner="sgd",
                            output_transfer="sigmoid")
    assert [lay.name for lay in opt.layers] == ["0", "2", "5"]
    before = copy.deepcopy(model)
    opt.step(lambda: _loss(model, x))
    assert_changed(model, before)
    assert_close_models(model, expected, rtol=1e-10)


def _grouped_convnet():
    """A convolution of 2 groups (4 -> 6 channels) and a depthwise one (6 groups), a bias-free one among them."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 6, 3, groups=2, padding=1),
                         nn.Softplus(), nn.Conv2d(6, 6, 3, groups=6, stride=2, bias=False), nn.ELU(0.5), nn.Flatten(),
                         nn.Linear(6 * 2 * 2, C * H * W)).double()


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("variant", ["S", "M", "post-S", "poco-M"])
def test_one_local_sgd_iteration_on_grouped_convolutions_is_backprop(variant, backend):
    """A convolution of G groups is G layers (each group's input channels to its output channels, its slice of
    the kernel and bias); one local SGD iteration is still BackProp's step."""
    model, x = _grouped_convnet(), _images()
    expected = backprop_step(model, lambda m: _loss(m, x), ETA * GAMMA)
    opt = locoprop.LocoProp(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_steps=1, inner="sgd",
                            output_transfer="sigmoid", backend=backend)
    assert [lay.name for lay in opt.layers] == ["0", "2[0]", "2[1]", *(f"4[{g}]" for g in range(6)), "7"]
    before = copy.deepcopy(model)
    opt.step(lambda: _loss(model, x))
    assert_changed(model, before)
    assert_close_models(model, expected, rtol=1e-10)


class _SplitGroups(nn.Module):
    """The grouped convolution of :func:`_grouped_convnet` as two convolutions, each on its channels."""

    def __init__(self, grouped: nn.Sequential):
        super().__init__()
        self.first, self.last = grouped[0], grouped[7]
        self.halves = nn.ModuleList(nn.Conv2d(2, 3, 3, padding=1) for _ in range(2))
        self.depthwise = nn.ModuleList(nn.Conv2d(1, 1, 3, stride=2, bias=False) for _ in range(6))
        with torch.no_grad():
            for g, conv in enumerate(self.halves):
                conv.weight.copy_(grouped[2].weight[3 * g:3 * g + 3])
                conv.bias.copy_(grouped[2].bias[3 * g:3 * g + 3])
            for g, conv in enumerate(self.depthwise):
                conv.weight.copy_(grouped[4].weight[g:g + 1])

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = torch.cat([F.softplus(conv(h[:, 2 * g:2 * g + 2])) for g, conv in enumerate(self.halves)], 1)
        h = torch.cat([F.elu(conv(h[:, g:g + 1]), 0.5) for g, conv in enumerate(self.depthwise)], 1)
        return self.last(h.flatten(1))


@pytest.mark.parametrize("variant, backend", [("M", "reference"), ("M", "fused"), ("S", "fused"),
                                              ("S-closed", "auto")])
def test_a_grouped_convolution_steps_as_its_groups_as_separate_convolutions(variant, backend):
    """The grouped model and the same map written as one convolution per group (traced: each group's layer
    with its activation function) take the same steps (float64, 3 steps of T = 4)."""
    grouped = _grouped_convnet()
    split = _SplitGroups(copy.deepcopy(grouped)).double()
    steps_side_by_side((grouped, split), [_images(seed=seed) for seed in range(3)], _loss, variant=variant,
                       lr=1e-2, local_steps=4, output_transfer="sigmoid", backend=backend)
    for g, conv in enumerate(split.halves):
        torch.testing.assert_close(grouped[2].weight[3 * g:3 * g + 3], conv.weight, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(grouped[2].bias[3 * g:3 * g + 3], conv.bias, rtol=1e-10, atol=1e-13)
    for g, conv in enumerate(split.depthwise):
        torch.testing.assert_close(grouped[4].weight[g:g + 1], conv.weight, rtol=1e-10, atol=1e-13)
    assert not torch.equal(grouped[4].weight, _grouped_convnet()[4].weight)


def test_a_grouped_convolution_before_a_softmax_over_channels_is_refused():
    model = nn.Sequential(nn.Conv2d(C, 4, 3, groups=1), nn.Tanh(), nn.Conv2d(4, 4, 1, groups=2), nn.Softmax(dim=1))
    with pytest.raises(ValueError, match=r"layer '2': a convolution with groups=2 followed by Softmax"):
        locoprop.LocoProp(model)


def test_the_fast_solver_on_convolutions_equals_the_reference_loop():
    runs = []
    for backend in ("reference", "fused"):
        model = _convnet()
        opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=2.0, local_steps=5, output_transfer="sigmoid",
                                backend=backend)
        for seed in range(3):
            x = _images(seed=seed)
            opt.step(lambda: _loss(model, x))
        runs.append(model)
    assert_close_models(runs[1], runs[0], rtol=1e-10)


def test_the_kernel_moves_with_its_matrix_also_in_a_copy_and_after_a_change_of_dtype():
    model = _convnet()
    opt = locoprop.LocoProp(model, lr=1e-2, local_steps=2, output_transfer="sigmoid")
    opt.step(lambda: _loss(model, _images()))
    twin, twin_opt = pickle.loads(pickle.dumps((model, opt)))
    clone, clone_opt = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (twin, twin_opt), (clone, clone_opt)):
        start = m[0].weight.detach().clone()
        o.step(lambda m=m: _loss(m, _images(seed=1)))
        assert not torch.equal(m[0].weight, start)
    for m in (twin, clone):
        assert torch.equal(m[0].weight, model[0].weight) and torch.equal(m[2].weight, model[2].weight)
    model.float()  # the kernel's storage is new: the matrix follows it (its inner state is the user's to move)
    opt.load_state_dict(opt.state_dict())
    for state in opt.inner.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point():
                state[k] = v.float()
    start = model[0].weight.detach().clone()
    opt.step(lambda: _loss(model, _images(seed=2).float()))
    assert model[0].weight.dtype == torch.float32 and not torch.equal(model[0].weight, start)
    assert opt.layers[0].linear.weight.data_ptr() == model[0].weight.data_ptr()


def test_convolutions_it_cannot_solve_are_refused_by_name_and_a_frozen_one_is_left_alone():
    for conv, match in [(nn.Conv2d(C, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
                        (nn.Conv2d(C, 4, 2, padding="same"), "padding='same' and an even kernel")]:
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
        with pytest.raises(ValueError, match=f"layer '0': .*{match}"):
            locoprop.LocoProp(model, output_transfer="linear")
    model = _convnet()
    model[2].requires_grad_(False)
    kernel = model[2].weight.detach().clone()
    opt = locoprop.LocoProp(model, lr=1e-2, local_steps=2, output_transfer="sigmoid")
    assert [lay.name for lay in opt.frozen_layers] == ["2"]
    opt.step(lambda: _loss(model, _images()))
    assert torch.equal(model[2].weight, kernel)
    model[2].weight.requires_grad_(True)  # unfreezing the kernel (not the matrix LocoProp would solve for) is seen
    with pytest.raises(ValueError, match="layer '2': it was frozen"):
        opt.step(lambda: _loss(model, _images()))


def _sequences(n=12, seed=0):
    return torch.rand(n, C, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _convnet_1d():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(C, 4, 3, padding="same"), nn.Tanh(), nn.Conv1d(4, 3, 2, stride=2, dilation=2),
                         nn.Softplus(), nn.Flatten(), nn.Linear(3 * 4, C * 9)).double()


@pytest.mark.parametrize("variant", ["S", "M"])
def test_one_local_sgd_iteration_on_1d_convolutions_is_backprop(variant):
    model, x = _convnet_1d(), _sequences()
    expected = backprop_step(model, lambda m: _loss(m, x), ETA * GAMMA)
    opt = locoprop.LocoProp(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_steps=1, inner="sgd",
                            output_transfer="sigmoid")
    assert [lay.name for lay in opt.layers] == ["0", "2", "5"]
    opt.step(lambda: _loss(model, x))
    assert_close_models(model, expected, rtol=1e-10)


def test_a_1d_convolution_over_its_whole_input_steps_as_the_linear_layer_it_is():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(C, 7, 9), nn.Tanh(), nn.Flatten(), nn.Linear(7, C * 9)).double()
    dense = nn.Sequential(nn.Flatten(), nn.Linear(C * 9, 7), nn.Tanh(), nn.Linear(7, C * 9)).double()
    with torch.no_grad():
        dense[1].weight.copy_(conv[0].weight.reshape(7, -1))
        dense[1].bias.copy_(conv[0].bias)
        dense[3].load_state_dict(conv[3].state_dict())
    opts = [locoprop.LocoProp(m, lr=1e-2, local_steps=4, output_transfer="sigmoid", backend="fused")
            for m in (conv, dense)]
    for seed in range(3):
        x = _sequences(seed=seed)
        for m, opt in zip((conv, dense), opts):
            opt.step(lambda m=m: _loss(m, x))
    torch.testing.assert_close(conv[0].weight.reshape(7, -1), dense[1].weight, rtol=1e-10, atol=1e-13)
