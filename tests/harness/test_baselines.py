"""Tests for locoprop.harness.baselines (docs/baselines.md)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from locoprop.harness.baselines import BASELINE_NAMES, ClosureOptimizer, KFACOptimizer, build_baseline
from locoprop.inner import TFRMSprop

BATCH = 32
DIM = 20

# Learning rates that make a few steps on the tiny autoencoder reduce the loss.
LRS = dict(sgd=0.5, momentum=0.1, nesterov=0.1, adam=0.01, rmsprop=0.1, adagrad=0.1, shampoo=0.001, kfac=0.03)


def tiny_autoencoder(d: int = DIM) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 4), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, d))


def paper_loss_fn() -> nn.Module:
    """The module K-FAC extends; the closure divides its output by the batch size."""
    return nn.BCEWithLogitsLoss(reduction="sum")


def closure_for(model, loss_fn, x):
    return lambda: loss_fn(model(x), x) / x.shape[0]


def pixels(n: int = BATCH, d: int = DIM, seed: int = 1) -> torch.Tensor:
    """Random 'pixels' in [0, 1] (not binary, like MNIST / 255)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g)


def batches(k: int, seed: int = 10) -> list[torch.Tensor]:
    return [pixels(seed=seed + i) for i in range(k)]


# ---------------------------------------------------------------------------
# every name
# ---------------------------------------------------------------------------


def test_names():
    assert BASELINE_NAMES == ("sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "shampoo", "kfac")


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_one_step_changes_weights(name):
    model, loss_fn, x = tiny_autoencoder(), paper_loss_fn(), pixels()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_baseline(name, model, loss_fn, lr=LRS[name])
    assert isinstance(opt, ClosureOptimizer)
    loss = opt.step(closure_for(model, loss_fn, x))
    assert loss.dim() == 0 and not loss.requires_grad and torch.isfinite(loss)
    changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), before)]
    linear_weights = [i for i, (n_, _) in enumerate(model.named_parameters()) if n_.endswith("weight")]
    assert all(changed[i] for i in linear_weights), changed
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", BASELINE_NAMES + ("shampoo-eigh",))
def test_state_dict_round_trip_is_bit_identical(name):
    """Run A for 3 steps; B is a copy of A's model restored from A's state dict (through
    torch.save / torch.load(weights_only=True)); both continue 3 steps on the same batches."""
    data = batches(6)
    model_a, loss_a = tiny_autoencoder(), paper_loss_fn()
    name, _, root = name.partition("-")
    kw = dict(lr=LRS[name], beta1=0.5 if name != "sgd" else None, inverse_every=2, weight_decay=1e-3)
    if root:
        kw["shampoo_root"] = root
    opt_a = build_baseline(name, model_a, loss_a, **kw)
    for x in data[:3]:
        opt_a.step(closure_for(model_a, loss_a, x))

    model_b, loss_b = copy.deepcopy(model_a), paper_loss_fn()
    torch.manual_seed(1234)  # the restored run must not depend on the global random stream
    opt_b = build_baseline(name, model_b, loss_b, **kw)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))

    for x in data[3:]:
        la = opt_a.step(closure_for(model_a, loss_a, x))
        torch.rand(7)  # disturb the global stream between the runs
        lb = opt_b.step(closure_for(model_b, loss_b, x))
        assert torch.equal(la, lb)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    assert not any(pa is pb for pa, pb in zip(model_a.parameters(), model_b.parameters()))


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_a_few_steps_reduce_the_loss(name):
    model, loss_fn, x = tiny_autoencoder(), paper_loss_fn(), pixels()
    opt = build_baseline(name, model, loss_fn, lr=LRS[name])
    closure = closure_for(model, loss_fn, x)
    with torch.no_grad():
        start = float(closure())
    for _ in range(8):
        opt.step(closure)
    with torch.no_grad():
        end = float(closure())
    assert end < start - 0.1, (start, end)


# ---------------------------------------------------------------------------
# hyper-parameter mapping, interface
# ---------------------------------------------------------------------------


def test_torch_optim_mapping():
    m = tiny_autoencoder()
    opt = build_baseline("sgd", m, None, lr=0.3, beta1=0.9).optimizer
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.0
    opt = build_baseline("momentum", m, None, lr=0.3, beta1=0.8).optimizer
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.8 and not opt.defaults["nesterov"]
    opt = build_baseline("nesterov", m, None, lr=0.3).optimizer
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
    opt = build_baseline("adam", m, None, lr=0.3, beta1=0.7, beta2=0.95, eps=1e-6).optimizer
    assert type(opt) is torch.optim.Adam and opt.defaults["betas"] == (0.7, 0.95) and opt.defaults["eps"] == 1e-6
    opt = build_baseline("adagrad", m, None, lr=0.3, eps=1e-7).optimizer
    assert type(opt) is torch.optim.Adagrad and opt.defaults["eps"] == 1e-7
    assert opt.defaults["initial_accumulator_value"] == 0.1
    opt = build_baseline("rmsprop", m, None, lr=0.3, beta1=0.6, beta2=0.99, eps=1e-8).optimizer
    assert type(opt) is TFRMSprop
    assert (opt.defaults["momentum"], opt.defaults["alpha"], opt.defaults["eps"]) == (0.6, 0.99, 1e-8)
    opt = build_baseline("shampoo", m, None, lr=0.3, beta1=0.6, beta2=0.99, eps=1e-4, inverse_every=7).optimizer
    assert opt.defaults["betas"] == (0.6, 0.99) and opt.matrix_eps == 1e-4
    assert opt.preconditioning_compute_steps == 7 and opt.start_preconditioning_step == 7
    opt = build_baseline("shampoo", m, None, lr=0.3, eps=1e-4, damping=1e-2).optimizer
    assert opt.matrix_eps == 1e-2
    opt = build_baseline("kfac", m, paper_loss_fn(), lr=0.3, beta1=0.5, beta2=0.9, eps=1e-4, inverse_every=3).optimizer
    assert isinstance(opt, KFACOptimizer) and opt.inverse_every == 3
    g = opt.param_groups[0]
    assert (g["momentum"], g["stat_decay"], g["damping"]) == (0.5, 0.9, 1e-4)
    opt = build_baseline("kfac", tiny_autoencoder(), paper_loss_fn(), lr=0.3, eps=1e-4, damping=0.5).optimizer
    assert opt.param_groups[0]["damping"] == 0.5
    opt = build_baseline("adam", m, None, lr=0.3, options={"amsgrad": True}).optimizer
    assert opt.defaults["amsgrad"]


def test_rmsprop_equals_tf_recurrence():
    """w -= mom;  mom = b1 mom + lr g / sqrt(ms + eps);  ms = b2 ms + (1 - b2) g^2, ms_0 = 1."""
    lr, b1, b2, eps = 0.01, 0.9, 0.95, 1e-7
    model, loss_fn = tiny_autoencoder(), paper_loss_fn()
    ref = copy.deepcopy(model)
    opt = build_baseline("rmsprop", model, loss_fn, lr=lr, beta1=b1, beta2=b2, eps=eps)
    ms = [torch.ones_like(p) for p in ref.parameters()]
    mom = [torch.zeros_like(p) for p in ref.parameters()]
    for x in batches(4):
        opt.step(closure_for(model, loss_fn, x))
        grads = torch.autograd.grad(loss_fn(ref(x), x) / BATCH, list(ref.parameters()))
        with torch.no_grad():
            for p, g, s, v in zip(ref.parameters(), grads, ms, mom):
                s.mul_(b2).add_((1 - b2) * g * g)
                v.mul_(b1).add_(lr * g / torch.sqrt(s + eps))
                p.sub_(v)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_param_groups_lr_and_scheduler():
    model, loss_fn, x = tiny_autoencoder(), paper_loss_fn(), pixels()
    opt = build_baseline("sgd", model, loss_fn, lr=0.5)
    assert opt.param_groups is opt.optimizer.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda epoch: 0.0)
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(model, loss_fn, x))
    sched.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.param_groups[0]["lr"] = 0.25
    ref = copy.deepcopy(model)
    opt.step(closure_for(model, loss_fn, x))
    grads = torch.autograd.grad(loss_fn(ref(x), x) / BATCH, list(ref.parameters()))
    for p, q, g in zip(model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p, q - 0.25 * g)


def test_decoupled_weight_decay():
    model, loss_fn, x = tiny_autoencoder(), paper_loss_fn(), pixels()
    ref = copy.deepcopy(model)
    lr, wd = 0.1, 0.01
    opt = build_baseline("sgd", model, loss_fn, lr=lr, weight_decay=wd)
    opt.step(closure_for(model, loss_fn, x))
    grads = torch.autograd.grad(loss_fn(ref(x), x) / BATCH, list(ref.parameters()))
    for p, q, g in zip(model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p, q * (1 - lr * wd) - lr * g)


def test_closure_must_not_call_backward():
    model, loss_fn, x = tiny_autoencoder(), paper_loss_fn(), pixels()
    opt = build_baseline("adam", model, loss_fn, lr=0.01)
    with pytest.raises(RuntimeError, match="does not require grad"):
        opt.step(lambda: (loss_fn(model(x), x) / BATCH).detach())
    with pytest.raises(TypeError):
        opt.step(lambda: 1.0)


def test_load_state_dict_of_another_name_is_refused():
    model = tiny_autoencoder()
    sd = build_baseline("adam", model, None, lr=0.1).state_dict()
    with pytest.raises(ValueError, match="adam"):
        build_baseline("rmsprop", model, None, lr=0.1).load_state_dict(sd)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_baseline("lamb", tiny_autoencoder(), None, lr=0.1)
    for name in BASELINE_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=0.1, inverse_every=0), "inverse_every"),
        (dict(lr=0.1, inverse_every=1.5), "inverse_every"),
        (dict(lr=0.1, beta1=1.0), "beta1"),
        (dict(lr=0.1, beta1=-0.1), "beta1"),
        (dict(lr=0.1, beta2=1.5), "beta2"),
        (dict(lr=0.1, eps=-1.0), "eps"),
        (dict(lr=0.1, damping=0.0), "damping"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
    ],
)
@pytest.mark.parametrize("name", ["adam", "kfac"])
def test_bad_arguments(name, kwargs, arg):
    with pytest.raises(ValueError) as err:
        build_baseline(name, tiny_autoencoder(), paper_loss_fn(), **kwargs)
    assert arg in str(err.value)
    if arg.startswith("beta"):
        assert "[0, 1)" in str(err.value)


def test_kfac_rejects_unknown_loss_and_layers():
    class Functional(nn.Module):
        def forward(self, logits, x):
            return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]

    with pytest.raises(ValueError, match="BCEWithLogitsLoss"):
        build_baseline("kfac", tiny_autoencoder(), Functional(), lr=0.1)
    with pytest.raises(ValueError, match="nn.Linear"):
        build_baseline("kfac", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), paper_loss_fn(), lr=0.1)


# ---------------------------------------------------------------------------
# K-FAC
# ---------------------------------------------------------------------------


def test_kfac_inverses_every_k_steps(monkeypatch):
    calls = []
    original = KFACOptimizer._compute_inverses

    def counting(self, state, group):
        calls.append(state["step"])
        original(self, state, group)

    monkeypatch.setattr(KFACOptimizer, "_compute_inverses", counting)
    model, loss_fn = tiny_autoencoder(), paper_loss_fn()
    k = 3
    opt = build_baseline("kfac", model, loss_fn, lr=0.05, inverse_every=k)
    for x in batches(8):
        opt.step(closure_for(model, loss_fn, x))
    n_layers = 4
    assert sorted(calls) == sorted([0, 3, 6] * n_layers)
    for layer in [m for m in model if isinstance(m, nn.Linear)]:
        st = opt.optimizer.state[layer.weight]
        assert st["step"] == 8 and st["num_inversions"] == 3


def _damped_inverses(a, d, damping):
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(d) / d.shape[0]))
    root = math.sqrt(damping)
    a_inv = torch.linalg.inv(a.double() + pi * root * torch.eye(a.shape[0], dtype=torch.float64))
    d_inv = torch.linalg.inv(d.double() + root / pi * torch.eye(d.shape[0], dtype=torch.float64))
    return a_inv, d_inv


def test_kfac_update_on_single_linear_layer():
    """Two steps on one Linear layer: the update is D^{-1} [G | g_b] A^{-1} from BackPACK's factors,
    with A bordered by the input mean and a 1, moving averages and pi-damping."""
    layer = nn.Linear(6, 5)
    model, loss_fn = nn.Sequential(layer), paper_loss_fn()
    lr, damping, decay = 0.1, 1e-2, 0.8
    opt = build_baseline("kfac", model, loss_fn, lr=lr, damping=damping, beta2=decay)
    a_avg = d_avg = None
    for x in batches(2, seed=3):
        x = x[:, :6]
        w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
        opt.step(lambda: loss_fn(model(x), x[:, :5]) / x.shape[0])
        d_bp, a_bp = layer.weight.kfac
        assert torch.equal(layer.bias.kfac[0], d_bp)
        torch.testing.assert_close(a_bp, x.T @ x / x.shape[0])  # BackPACK's input factor
        m = x.mean(0)
        a = torch.cat([torch.cat([a_bp, m[:, None]], 1), torch.cat([m, torch.ones(1)])[None]], 0)
        a_avg = a if a_avg is None else decay * a_avg + (1 - decay) * a
        d_avg = d_bp if d_avg is None else decay * d_avg + (1 - decay) * d_bp
        a_inv, d_inv = _damped_inverses(a_avg, d_avg, damping)
        # gradient of the loss at the weights before the step
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        gw, gb = torch.autograd.grad(loss_fn(x @ w.T + b, x[:, :5]) / x.shape[0], [w, b])
        update = (d_inv @ torch.cat([gw, gb[:, None]], 1).double() @ a_inv).float()
        torch.testing.assert_close(layer.weight.detach(), w0 - lr * update[:, :-1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bias.detach(), b0 - lr * update[:, -1], rtol=1e-5, atol=1e-6)


def _kfac_factors(model, loss_module, closure, **options):
    opt = KFACOptimizer(model, loss_module, 0.1, **options)
    opt.zero_grad()
    opt.backward(closure())
    return [t.clone() for t in model[0].weight.kfac]


def test_kfac_factor_scaling():
    """The output factor belongs to the closure's loss (sum over pixels / batch) whatever
    formulation computes it, and matches the exact GGN factor in expectation."""
    torch.manual_seed(0)
    n, d_in, d_out = 8, 5, 4
    x, y = torch.randn(n, d_in), torch.rand(n, d_out)
    layer = nn.Linear(d_in, d_out)
    model = nn.Sequential(layer)

    def factors(loss_module, scale, **options):
        torch.manual_seed(7)
        return _kfac_factors(model, loss_module, lambda: loss_module(model(x), y) * scale, **options)

    d_sum, a_sum = factors(nn.BCEWithLogitsLoss(reduction="sum"), 1.0 / n)
    d_mean, a_mean = factors(nn.BCEWithLogitsLoss(reduction="mean"), float(d_out))
    torch.testing.assert_close(d_mean, d_sum)  # same samples, same scale
    torch.testing.assert_close(a_mean, a_sum)
    d_unscaled, _ = factors(nn.BCEWithLogitsLoss(reduction="sum"), 1.0)
    torch.testing.assert_close(d_unscaled, n * d_sum)

    # Expectation over the model's predictive distribution: (1/n) sum_n diag(p_n (1 - p_n)).
    d_mc, _ = factors(nn.BCEWithLogitsLoss(reduction="sum"), 1.0 / n, mc_samples=20000)
    with torch.no_grad():
        p = torch.sigmoid(model(x))
    expected = torch.diag((p * (1 - p)).mean(0))
    torch.testing.assert_close(d_mc, expected, rtol=0.05, atol=0.005)

    # The same with the loss module held inside a wrapper module (one way to pass the paper's loss).
    class PaperLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.bce = nn.BCEWithLogitsLoss(reduction="sum")

        def forward(self, logits, target):
            return self.bce(logits, target) / logits.shape[0]

    d_wrapped, _ = factors(PaperLoss(), 1.0)
    torch.testing.assert_close(d_wrapped, d_sum)


def test_kfac_mc_sampling_leaves_global_stream_alone():
    model, loss_fn, x = tiny_autoencoder(), paper_loss_fn(), pixels()
    opt = build_baseline("kfac", model, loss_fn, lr=0.05)
    torch.manual_seed(5)
    opt.step(closure_for(model, loss_fn, x))
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_kfac_momentum():
    model, loss_fn = tiny_autoencoder(), paper_loss_fn()
    opt = build_baseline("kfac", model, loss_fn, lr=0.05, beta1=0.9)
    for x in batches(2):
        opt.step(closure_for(model, loss_fn, x))
    assert all("momentum_buffer" in opt.optimizer.state[m.weight] for m in model if isinstance(m, nn.Linear))


# ---------------------------------------------------------------------------
# Shampoo
# ---------------------------------------------------------------------------


def test_shampoo_inverse_roots_every_k_steps(monkeypatch):
    from pytorch_optimizer.optimizer.utils.preconditioner import PreConditioner

    calls = []
    original = PreConditioner.compute_pre_conditioners
    model, loss_fn = tiny_autoencoder(), paper_loss_fn()
    k = 3
    opt = build_baseline("shampoo", model, loss_fn, lr=0.01, inverse_every=k)

    def counting(self):
        calls.append(opt.optimizer.param_groups[0]["step"])
        original(self)

    monkeypatch.setattr(PreConditioner, "compute_pre_conditioners", counting)
    for x in batches(7):
        opt.step(closure_for(model, loss_fn, x))
    n_params = sum(1 for _ in model.parameters())
    # the library counts steps from 1: recomputed after the 3rd and the 6th gradient
    assert sorted(calls) == sorted([3, 6] * n_params)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    assert all(len(opt.optimizer.state[w]["pre_conditioner"].pre_conditioners) > 0 for w in weights)


def test_shampoo_eigh_root_equals_the_converged_newton_root():
    """_eigh_inverse_root is the regularised inverse p-th root the library's coupled Newton iteration approximates:
    (S + eps lambda_max I)^(-1/p), here for rank-deficient statistics (MNIST's border pixels never change), one
    matrix and a stacked batch."""
    from pytorch_optimizer.optimizer.utils.matrix import compute_power_schur_newton

    from locoprop.harness.baselines import _eigh_inverse_root

    g = torch.Generator().manual_seed(0)
    mats = []
    for rank in (12, 30):
        a = torch.randn(30, rank, generator=g, dtype=torch.float64)
        mats.append(a @ a.T)
    for s in mats:
        for eps in (1e-6, 1e-3):
            newton = compute_power_schur_newton(s, 4, max_iters=500, error_tolerance=1e-12, ridge_epsilon=eps)
            eigh = _eigh_inverse_root(s, 4, eps)
            assert torch.allclose(eigh, newton, rtol=1e-7, atol=0), float((eigh - newton).abs().max())
            # the root's defining property: root^-p = S + eps lambda_max I
            ridged = s + eps * torch.linalg.eigvalsh(s).max() * torch.eye(30, dtype=s.dtype)
            assert torch.allclose(torch.linalg.matrix_power(torch.linalg.inv(eigh), 4), ridged, rtol=1e-8, atol=1e-8)
    stacked = torch.stack(mats)
    assert torch.allclose(_eigh_inverse_root(stacked, 4, 1e-6),
                          torch.stack([_eigh_inverse_root(s, 4, 1e-6) for s in mats]), rtol=1e-12, atol=0)
    assert _eigh_inverse_root(mats[0].float(), 4, 1e-6).dtype == torch.float32


def test_shampoo_eigh_root_replaces_newton_and_equals_it_converged(newton_roots):
    """shampoo_root="eigh": every inverse root comes from the eigendecomposition (the library's Newton iteration is
    never called), and in float64 the run equals the library's own run with its Newton iteration converged:
    tolerance 1e-12 instead of the library's 1e-3, and no early exit where the residual first grows (the
    library's guard, max_error_ratio=1.2, returns the starting guess, a scaled identity, on this model's
    third step)."""
    data = [x.double() for x in batches(6)]

    def run(root):
        torch.manual_seed(0)
        model, loss_fn = tiny_autoencoder().double(), paper_loss_fn()
        opt = build_baseline("shampoo", model, loss_fn, lr=LRS["shampoo"], shampoo_root=root)
        newton_roots.calls = 0
        for x in data:
            opt.step(closure_for(model, loss_fn, x))
        assert (newton_roots.calls > 0) == (root == "newton"), (root, newton_roots.calls)
        return list(model.parameters())

    def distance(a, b):  # the largest relative distance between two runs' parameters
        with torch.no_grad():
            return max(float((p - q).norm() / q.norm()) for p, q in zip(a, b))

    library = run("newton")
    newton_roots.overrides = dict(max_iters=500, error_tolerance=1e-12, max_error_ratio=math.inf)
    newton, eigh = run("newton"), run("eigh")
    torch.manual_seed(0)
    start = list(tiny_autoencoder().double().parameters())
    assert distance(start, eigh) > 0.1
    assert distance(newton, eigh) < 1e-8
    assert distance(library, eigh) > 1e-2  # the library's early exit on the third step


def test_shampoo_root_is_checked():
    loss_fn = paper_loss_fn()
    with pytest.raises(ValueError, match="shampoo_root: expected newton or eigh, got 'svd'"):
        build_baseline("shampoo", tiny_autoencoder(), loss_fn, lr=0.1, shampoo_root="svd")
    with pytest.raises(ValueError, match="shampoo_root: 'eigh' applies to shampoo only, not 'kfac'"):
        build_baseline("kfac", tiny_autoencoder(), loss_fn, lr=0.1, shampoo_root="eigh")


def test_kfac_kl_clip_scales_every_update_to_the_bound():
    """kl_clip: the step is the unclipped one times nu = min(1, sqrt(kl_clip / (lr^2 sum <U, G>))), the same
    nu for every layer (Ba, Grosse & Martens 2017); a loose bound changes nothing."""
    torch.manual_seed(0)
    base, loss_fn = tiny_autoencoder(), paper_loss_fn()
    x = pixels()
    lr = 0.5
    moved = {}
    for clip in (None, 1e-4, 1e9):
        model = copy.deepcopy(base)
        opt = build_baseline("kfac", model, loss_fn, lr=lr, eps=1e-3, kl_clip=clip)
        opt.step(closure_for(model, loss_fn, x))
        moved[clip] = [p.detach() - q.detach() for p, q in zip(model.parameters(), base.parameters())]
        if clip is None:
            grads = [p.grad.detach().clone() for p in model.parameters()]
    # lr^2 <U, G> summed over layers, from the unclipped step  -lr U = moved
    vg = -lr * sum(float((d * g).sum()) for d, g in zip(moved[None], grads))
    nu = math.sqrt(1e-4 / vg)
    assert 0 < nu < 1
    for d_clip, d_free, d_loose in zip(moved[1e-4], moved[None], moved[1e9]):
        torch.testing.assert_close(d_clip, nu * d_free, rtol=1e-3, atol=1e-3 * float(d_free.abs().max()))
        assert torch.equal(d_loose, d_free)
    with pytest.raises(ValueError, match="kl_clip"):
        build_baseline("adam", tiny_autoencoder(), loss_fn, lr=0.1, kl_clip=1e-3)
    with pytest.raises(ValueError, match="kl_clip"):
        KFACOptimizer(tiny_autoencoder(), loss_fn, 0.1, kl_clip=-1.0)
