"""Transposed convolutions (``nn.ConvTranspose1d``, ``nn.ConvTranspose2d``): the convolution of the spread-out
input by the flipped, channel-swapped kernel, so a Linear layer's local problem on that input's patches
(``locoprop.layers.ConvTransposeMatrix``), checked against identities."""

import copy

import pytest
import torch
from torch import nn

import locoprop
from test_backprop_identity import ETA, GAMMA, assert_changed, assert_close_models, backprop_step
from test_conv import steps_side_by_side
from test_errors import _assert_unchanged, _snapshot

C, H, W = 3, 4, 3


def _codes(n=10, seed=0):
    return torch.rand(n, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _decoder():
    """Strides, padding, output padding, dilation, a bias-free kernel, a rectangular kernel."""
    torch.manual_seed(0)
    return nn.Sequential(nn.ConvTranspose2d(C, 4, 3, stride=2, padding=1, output_padding=1), nn.Tanh(),
                         nn.ConvTranspose2d(4, 2, (2, 3), stride=(1, 2), dilation=(2, 1), bias=False), nn.Softplus(),
                         nn.Flatten(), nn.Linear(2 * 10 * 13, 20)).double()


def _target(n):
    return torch.rand(n, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(9))


def _loss(model, x):
    return nn.functional.binary_cross_entropy_with_logits(model(x), _target(len(x)), reduction="sum") / len(x)


def test_the_rows_and_matrix_give_the_layers_output():
    """Rows times the matrix's transpose plus the bias is the module's output, as rows (1-d and 2-d, with
    ``output_size=`` in the forward call too)."""
    model = _decoder()
    opt = locoprop.LocoProp(model, output_transfer="sigmoid")
    x = _codes()
    for lay, inputs in ((opt.layers[0], x), (opt.layers[1], model[1](model[0](x)))):
        out = lay.module(inputs)
        pre = lay.input_rows(inputs, out) @ lay.linear.weight.T
        if lay.linear.bias is not None:
            pre = pre + lay.linear.bias
        torch.testing.assert_close(pre, lay.output_rows(out), rtol=1e-12, atol=1e-12)
    conv1 = nn.ConvTranspose1d(3, 2, 4, stride=3, padding=2, dilation=2).double()
    lay = locoprop.LocoProp(nn.Sequential(conv1, nn.Tanh()), output_transfer="linear").layers[0]
    seq = torch.rand(5, 3, 7, dtype=torch.float64)
    for out in (conv1(seq), conv1(seq, output_size=[23])):
        torch.testing.assert_close(lay.input_rows(seq, out) @ lay.linear.weight.T + lay.linear.bias,
                                   lay.output_rows(out), rtol=1e-12, atol=1e-12)
    assert conv1(seq, output_size=[23]).shape[-1] == 23 != conv1(seq).shape[-1]


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("variant", ["S", "M", "post-S", "poco-M"])
def test_one_local_sgd_iteration_on_transposed_convolutions_is_backprop(variant, backend):
    model = _decoder()
    x = _codes()
    expected = backprop_step(model, lambda m: _loss(m, x), ETA * GAMMA)
    opt = locoprop.LocoProp(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_steps=1, inner="sgd",
                            output_transfer="sigmoid", backend=backend)
    assert [lay.name for lay in opt.layers] == ["0", "2", "5"]
    before = copy.deepcopy(model)
    opt.step(lambda: _loss(model, x))
    assert_changed(model, before)
    assert_close_models(model, expected, rtol=1e-10)


@pytest.mark.parametrize("variant, backend", [("M", "reference"), ("M", "fused"), ("S", "fused"),
                                              ("S-closed", "auto")])
def test_a_stride_one_transposed_convolution_steps_as_the_convolution_it_is(variant, backend):
    """With stride 1 a transposed convolution is the convolution with padding ``k - 1 - p`` by the flipped,
    channel-swapped kernel: the same local problems, the same steps to rounding (float64, 3 steps, T = 4)."""
    torch.manual_seed(0)
    tconv = nn.Sequential(nn.ConvTranspose2d(C, 5, (3, 2), padding=(1, 0)), nn.Tanh(), nn.Flatten(),
                          nn.Linear(5 * 4 * 4, 20)).double()
    conv = nn.Sequential(nn.Conv2d(C, 5, (3, 2), padding=(1, 1)), nn.Tanh(), nn.Flatten(),
                         nn.Linear(5 * 4 * 4, 20)).double()

    def as_conv(kernel):
        return kernel.transpose(0, 1).flip(2, 3)
    with torch.no_grad():
        conv[0].weight.copy_(as_conv(tconv[0].weight))
        conv[0].bias.copy_(tconv[0].bias)
        conv[3].load_state_dict(tconv[3].state_dict())
    steps_side_by_side((tconv, conv), [_codes(seed=seed) for seed in range(3)], _loss, variant=variant, lr=1e-2,
                       local_steps=4, output_transfer="sigmoid", backend=backend)
    torch.testing.assert_close(as_conv(tconv[0].weight), conv[0].weight, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(tconv[3].weight, conv[3].weight, rtol=1e-10, atol=1e-13)


def _as_matrix(kernel):
    return kernel.flip(2, 3).transpose(0, 1).reshape(kernel.shape[1], -1)


def test_the_kernel_follows_its_matrix_state_round_trips_and_a_failed_step_changes_nothing():
    model = _decoder()
    opt = locoprop.LocoProp(model, lr=1e-2, local_steps=3, output_transfer="sigmoid")
    x = _codes()
    start = [lay.module.weight.detach().clone() for lay in opt.layers[:2]]
    opt.step(lambda: _loss(model, x))
    for lay, before in zip(opt.layers[:2], start):  # the kernel moved, to the matrix's values
        assert not torch.equal(lay.module.weight, before)
        assert torch.equal(_as_matrix(lay.module.weight), lay.linear.weight)
    twin = copy.deepcopy(model)  # the model's state and the optimizer's carry over to a new pair
    twin_opt = locoprop.LocoProp(twin, lr=1e-2, local_steps=3, output_transfer="sigmoid")
    twin_opt.load_state_dict(opt.state_dict())
    for _ in range(2):
        opt.step(lambda: _loss(model, x))
        twin_opt.step(lambda: _loss(twin, x))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad():  # the user changes the kernel: the next step starts from it
        model[0].weight.mul_(0.5)
    snap = _snapshot(model, opt)
    for g in opt.param_groups:
        g["lr"] = float("inf")  # the local update is not finite
    with pytest.raises(locoprop.DivergenceError):
        opt.step(lambda: _loss(model, x))
    _assert_unchanged(model, opt, snap)
    opt.layers[0].sync()
    assert torch.equal(opt.layers[0].linear.weight, _as_matrix(model[0].weight))
    for g in opt.param_groups:
        g["lr"] = 1e-2
    opt.step(lambda: _loss(model, x))
    assert torch.equal(_as_matrix(model[0].weight), opt.layers[0].linear.weight)


def test_transposed_convolutions_it_cannot_solve_are_refused_by_name():
    for conv, match in [(nn.ConvTranspose2d(C, 6, 3, groups=3), "groups=3"),
                        (nn.ConvTranspose2d(C, 4, 3, padding=3), "padding=.3, 3. above dilation")]:
        with pytest.raises(ValueError, match=f"layer '0': .*{match}"):
            locoprop.LocoProp(nn.Sequential(conv, nn.Tanh()), output_transfer="linear")


def test_a_transposed_convolution_after_model_double_and_in_a_copy():
    model = _decoder().float()
    opt = locoprop.LocoProp(model, lr=1e-2, local_steps=2, output_transfer="sigmoid")
    model.double()
    x = _codes()
    start = model[0].weight.detach().clone()
    opt.step(lambda: _loss(model, x))
    assert model[0].weight.dtype == torch.float64 and not torch.equal(model[0].weight, start)
    model2, opt2 = copy.deepcopy((model, opt))
    opt.step(lambda: _loss(model, x))
    opt2.step(lambda: _loss(model2, x))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
