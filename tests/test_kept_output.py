"""LocoProp-M keeps each layer's output ``ŷ = f(â)`` in place of its pre-activation ``â`` (``LayerCapture``'s
``shares_post``): the same steps to the bit, ``â`` let go when the forward pass ends, ``ŷ`` the next layer's input."""

import weakref

import pytest
import torch
from torch import nn

import locoprop
from conftest import bce_sum_mean, mixed_mlp, small_autoencoder


def _steps(backend, shares, steps=4, closures=1, solve_order="layer-major", variant="M", model=small_autoencoder):
    torch.manual_seed(0)
    model = model()
    d = model[0].in_features
    opt = locoprop.LocoProp(model, variant=variant, lr=1e-2, activation_lr=5.0, local_steps=3,
                            output_transfer="sigmoid", backend=backend, solve_order=solve_order,
                            inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8})
    if not shares:
        opt._shares_post = lambda: False
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.rand(32, d, generator=gen, dtype=model[0].weight.dtype)
        parts = x.chunk(closures)
        step = [lambda part=part: bce_sum_mean(model(part), part) * (part.shape[0] / x.shape[0]) for part in parts]
        losses.append(float(opt.step(step if closures > 1 else step[0])))
    return model, opt, losses


@pytest.mark.parametrize("backend,solve_order,closures,model", [
    ("reference", "layer-major", 1, small_autoencoder), ("fused", "layer-major", 1, small_autoencoder),
    ("fused", "iteration-major", 1, small_autoencoder), ("fused", "layer-major", 2, small_autoencoder),
    ("reference", "layer-major", 2, small_autoencoder), ("reference", "layer-major", 1, mixed_mlp),
    ("fused", "layer-major", 1, lambda: mixed_mlp(torch.float32))])
def test_keeping_the_output_gives_the_same_steps_to_the_bit(backend, solve_order, closures, model):
    """The target ``ŷ - γ∇_â L`` and the first residual ``ŷ - y`` from the transfer module's output (nn.Tanh;
    in the mixed MLP also Softplus, LeakyReLU, ELU and Sigmoid) equal those from ``f(â)`` computed again, to
    the bit: weights, inner state and losses of several steps (micro-batches too)."""
    m_kept, o_kept, l_kept = _steps(backend, True, solve_order=solve_order, closures=closures, model=model)
    m_pre, o_pre, l_pre = _steps(backend, False, solve_order=solve_order, closures=closures, model=model)
    assert o_kept._shares_post() and o_kept.last_solver == o_pre.last_solver
    assert l_kept == l_pre
    for p, q in zip(m_kept.parameters(), m_pre.parameters()):
        assert torch.equal(p, q)
        s, t = o_kept.inner.state[p], o_pre.inner.state[q]
        assert all(torch.equal(s[k], t[k]) for k in s)


def test_the_pre_activation_is_let_go_before_the_backward_pass_and_the_output_is_the_next_input(monkeypatch):
    """When the backward pass starts, the pre-activations of the layers followed by nn.Tanh are gone (one
    activation set less through the backward pass and the building of the problems); the problems keep the
    Tanh's output, which is the next layer's input (the same memory), and the output layer (its sigmoid is in
    the loss) keeps its first residual."""
    torch.manual_seed(0)
    model = small_autoencoder()
    x = torch.rand(32, 20)
    opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=5.0, local_steps=3, output_transfer="sigmoid",
                            backend="fused")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    refs, alive_at_backward, seen = {}, {}, {}
    for i, lin in enumerate(linears):
        lin.register_forward_hook(lambda mod, inp, out, i=i: refs.__setitem__(i, weakref.ref(out)))

    def closure():
        loss = bce_sum_mean(model(x), x)
        loss.register_hook(lambda g: alive_at_backward.update({i: r() is not None for i, r in refs.items()}))
        return loss

    solve = opt.fused_solver.solve

    def watching(problems, *args, **kwargs):  # one solve, or one a layer where they run during the backward pass
        seen.update({pr.batch.layer.name: (pr.batch.pre, pr.batch.post, pr.batch.inputs, pr.residual)
                     for pr in problems})
        return solve(problems, *args, **kwargs)
    monkeypatch.setattr(opt.fused_solver, "solve", watching)
    opt.step(closure)
    # layers 0 and 2 are followed by nn.Tanh; 1's output goes straight into layer 2; 3 is the output layer
    assert alive_at_backward == {0: False, 1: True, 2: False, 3: True}
    (pre0, post0, _, res0), (_, _, in1, _), (pre2, post2, _, res2), (pre3, post3, _, res3) = [
        seen[lay.name] for lay in opt.layers]
    assert pre0 is None and res0 is None and post0.data_ptr() == in1.data_ptr() and post0.shape == in1.shape
    assert pre2 is None and res2 is None and post2 is not None
    assert post3 is None and res3 is not None  # the output layer: its δ₀ from â, as before
    assert all(r() is None for r in refs.values())  # nothing of the forward pass outlives the step


class _DoublingMLP(nn.Module):  # the first layer's output changed in place before the forward pass ends
    def __init__(self, d=64):
        super().__init__()
        self.fc1, self.act1, self.fc2 = nn.Linear(d, 6), nn.LeakyReLU(0.1), nn.Linear(6, 5)
        self.act2, self.fc3 = nn.Tanh(), nn.Linear(5, d)

    def forward(self, x):
        h = self.act1(self.fc1(x))
        h.mul_(2.0)  # LeakyReLU saves its input, not its output: autograd does not object
        return self.fc3(self.act2(self.fc2(h)))


def test_an_output_changed_in_place_after_its_transfer_function_keeps_the_pre_activation(monkeypatch):
    """An output changed in place before the forward pass ends (an in-place dropout after it, ``h.mul_(2)``)
    is no longer ``f(â)``: that layer keeps its pre-activation and first residual, as before, and the steps are
    those of ``f(â)`` computed again, to the bit; the layer whose output is left alone keeps its output."""
    weights, kept = {}, {}
    for shares in (True, False):
        torch.manual_seed(0)
        model = _DoublingMLP(8)
        opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=1.0, local_steps=2, backend="fused",
                                layers=[(model.fc1, model.act1), (model.fc2, model.act2), (model.fc3, "linear")])
        if not shares:
            opt._shares_post = lambda: False
        solve = opt.fused_solver.solve

        def watching(problems, *args, solve=solve, shares=shares, **kwargs):  # by layer: a solve may hold one
            kept.setdefault(shares, {}).update({pr.batch.layer.name: pr.batch.pre is None and pr.batch.post is not None
                                                for pr in problems})
            return solve(problems, *args, **kwargs)
        monkeypatch.setattr(opt.fused_solver, "solve", watching)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(16, 8, generator=gen)
            opt.step(lambda: ((model(x) - x) ** 2).mean())
        weights[shares] = list(model.parameters())
    names = [lay.name for lay in opt.layers]
    assert {k: [v[n] for n in names] for k, v in kept.items()} == {True: [False, True, False],
                                                                   False: [False, False, False]}
    assert all(torch.equal(p, q) for p, q in zip(weights[True], weights[False]))


def test_variants_that_read_the_pre_activation_keep_it():
    """Only a target and a local loss that read ``â`` through ``f(â)`` alone (LocoProp-M) let it go: not
    LocoProp-S, not the post-activation variants, not with ``retain_problems``, not with reduced-precision
    products (which keep ``â`` for the update form)."""
    model = small_autoencoder()
    assert locoprop.LocoProp(model, variant="M", output_transfer="sigmoid")._shares_post()
    for kwargs in (dict(variant="S"), dict(variant="post-S"), dict(variant="poco-M"),
                   dict(variant="M", retain_problems=True), dict(variant="M", precision="bf16")):
        opt = locoprop.LocoProp(model, output_transfer="sigmoid", **kwargs)
        assert not opt._shares_post(), kwargs
        assert opt._reads_post_beside_pre() == (kwargs == dict(variant="M", precision="bf16")), kwargs


def _shared_weights():  # one Linear called twice, each call followed by nn.Tanh
    twice = nn.Linear(30, 30)
    return nn.Sequential(nn.Linear(64, 30), nn.Tanh(), twice, nn.Tanh(), twice, nn.Tanh(), nn.Linear(30, 64))


def _grouped_convolutions():  # a convolution of 4 groups: four layers whose rows come from one output
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 64))


def _transposed_convolutions():
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Unflatten(1, (4, 2, 2)),
                         nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1), nn.Tanh(),
                         nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1), nn.Flatten())


def _sequences():  # Linear layers over (batch, positions, features)
    return nn.Sequential(nn.Unflatten(1, (8, 8)), nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(),
                         nn.Flatten(), nn.Linear(64, 64))


@pytest.mark.parametrize("build", [_shared_weights, _grouped_convolutions, _transposed_convolutions, _sequences])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_kept_outputs_of_shared_convolutional_and_sequence_layers_give_the_same_steps(build, backend):
    """A layer called twice (its calls' outputs stacked), a grouped convolution (four layers reading one output),
    transposed convolutions and Linear layers over sequences keep their outputs too (every layer but the output
    layer), with the same steps to the bit as with ``f(â)`` computed again."""
    weights, kept = {}, {}
    for shares in (True, False):
        torch.manual_seed(0)
        model = build()
        opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=5.0, local_steps=3, output_transfer="sigmoid",
                                backend=backend)
        if not shares:
            opt._shares_post = lambda: False
        solver = opt.fused_solver if backend == "fused" else opt.solver
        solve = solver.solve

        def watching(problems, *args, solve=solve, shares=shares, **kwargs):  # by layer: a solve may hold one
            kept.setdefault(shares, {}).update({pr.batch.layer.name: pr.batch.pre is None and pr.batch.post is not None
                                                for pr in problems})
            return solve(problems, *args, **kwargs)
        solver.solve = watching
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.rand(8, 64, generator=gen)
            opt.step(lambda: bce_sum_mean(model(x), x))
        weights[shares] = list(model.parameters())
    kept = {k: [v[lay.name] for lay in opt.layers] for k, v in kept.items()}
    assert kept[True] == [True] * (len(kept[True]) - 1) + [False] and not any(kept[False])
    assert all(torch.equal(p, q) for p, q in zip(weights[True], weights[False]))


def _tanh_autoencoder():
    return small_autoencoder(d=64)


def _mixed_mlp():  # tanh, softplus, leaky ReLU, ELU, sigmoid
    return mixed_mlp(torch.float32, (64, 10, 9, 8, 7, 64))


@pytest.mark.parametrize("build", [_tanh_autoencoder, _mixed_mlp, _shared_weights, _grouped_convolutions,
                                   _transposed_convolutions, _sequences, _DoublingMLP])
@pytest.mark.parametrize("solve_in_backward,closures", [(None, 1), (False, 1), (None, 2)])
def test_reduced_precision_reads_the_output_kept_beside_the_pre_activation_with_the_same_steps(
        build, solve_in_backward, closures):
    """With bf16 products the update form keeps ``â``, so the output is not kept in its place: it is kept beside
    it (``post_beside_pre``), and the target ``ŷ - γ∇_â L`` and the first residual ``ŷ - y`` read it instead of
    evaluating ``f(â)`` twice more.  The same steps to the bit as with ``f(â)`` evaluated again, solved during
    the backward pass or after it, with micro-batches; every layer with a transfer module reads its output, but
    the output layer (its sigmoid is in the loss), a linear layer, one whose output was changed in place
    (``_DoublingMLP``'s first) and one called twice whose calls are followed by two modules (each call or
    none: one local problem over both).  With micro-batches a vectorized function (the mixed MLP's softplus and
    sigmoid) can round an entry of a micro-batch's output (the module's, in the forward pass) otherwise than
    the same entry of ``f`` over the stacked rows (where it falls in the vector loop's tail, say): within
    float32's rounding there, not to the bit."""
    weights, read = {}, {}
    for beside in (True, False):
        torch.manual_seed(0)
        model = build()
        layers = None
        if isinstance(model, _DoublingMLP):
            layers = [(model.fc1, model.act1), (model.fc2, model.act2), (model.fc3, "linear")]
        opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=5.0, local_steps=3, precision="bf16",
                                solve_in_backward=solve_in_backward, layers=layers,
                                output_transfer=None if layers else "sigmoid")
        assert opt._reads_post_beside_pre() and not opt._shares_post()
        if not beside:
            opt._reads_post_beside_pre = lambda: False
        solve = opt.fused_solver.solve

        def watching(problems, *args, solve=solve, beside=beside, **kwargs):  # by layer: a solve may hold one
            read.setdefault(beside, {}).update({pr.batch.layer.name: pr.residual is None and pr.batch.post is not None
                                                for pr in problems})
            return solve(problems, *args, **kwargs)
        opt.fused_solver.solve = watching
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.rand(8, 64, generator=gen)
            parts = x.chunk(closures)
            step = [lambda part=part: bce_sum_mean(model(part), part) / closures for part in parts]
            opt.step(step if closures > 1 else step[0])
        weights[beside] = [p.detach().clone() for p in model.parameters()]
    read = {k: [v[lay.name] for lay in opt.layers] for k, v in read.items()}
    expected = [lay.transfer_module is not None for lay in opt.layers]
    if build in (_DoublingMLP, _shared_weights):  # fc1's output doubled; the shared layer's second call is followed
        expected[{_DoublingMLP: 0, _shared_weights: 1}[build]] = False  # by another nn.Tanh than its transfer module
    assert sum(expected) >= 1
    assert read[True] == expected and not any(read[False])
    if closures > 1 and build is _mixed_mlp:
        assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(weights[True], weights[False]))
    else:
        assert all(torch.equal(p, q) for p, q in zip(weights[True], weights[False]))
