"""The fast solver's layer threads on the CPU (``layer_threads``): the layers' chains side by side in threads,
each with the process's intra-op threads, so the same steps to the bit as one layer after another."""

import threading

import pytest
import torch

import locoprop
from locoprop.fused import FusedIterativeSolver, _LayerThreads

from conftest import bce_sum_mean, small_autoencoder


@pytest.fixture
def two_threads():
    """Two intra-op threads (the layer threads' default count), whatever the machine has."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _run(layer_threads, steps=4, precision="fp32", solve_order="layer-major", per_layer=False, **kwargs):
    """Steps of the fast solver with every layer solved after the backward pass; the threads that ran each
    layer's local gradients."""
    torch.manual_seed(0)
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, lr=1e-2, local_steps=5, output_transfer="sigmoid", backend="fused",
                            precision=precision, solve_order=solve_order, solve_in_backward=False,
                            layer_threads=layer_threads, **kwargs)
    if per_layer:  # layers with their own learning rates and numbers of local iterations
        opt.param_groups[1]["lr"] *= 3.0
        opt.param_groups[2]["local_steps"] = 2
        opt.param_groups[3]["local_steps"] = 7
    names = set()
    local_gradient = opt.fused_solver._local_gradient

    def recorded(*args, **kw):
        names.add(threading.current_thread().name)
        return local_gradient(*args, **kw)
    opt.fused_solver._local_gradient = recorded
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.rand(32, 20, generator=gen)
        losses.append(float(opt.step(lambda: bce_sum_mean(model(x), x))))
    return model, opt, losses, names


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(precision="bf16"),
    dict(variant="S"),
    dict(per_layer=True),
    dict(regularizer="l2-paper"),
    dict(inner="adam", lr_decay=False),
    dict(solve_order="iteration-major"),
])
def test_layer_threads_give_the_same_steps_to_the_bit_as_one_layer_after_another(two_threads, kwargs):
    """Weights, inner state and losses equal to the bit with the layers in threads and one after another; the
    threaded run's local gradients ran in the pool's threads, the other's in this one."""
    m_seq, o_seq, l_seq, n_seq = _run(False, **kwargs)
    m_thr, o_thr, l_thr, n_thr = _run(True, **kwargs)
    assert o_seq.last_solver == o_thr.last_solver == "fused"
    assert n_seq == {threading.current_thread().name}
    assert n_thr and all(n.startswith("locoprop-layer") for n in n_thr)
    assert l_seq == l_thr
    for p, q in zip(m_seq.parameters(), m_thr.parameters()):
        assert torch.equal(p, q)
        s_seq, s_thr = o_seq.inner.state[p], o_thr.inner.state[q]
        assert s_seq.keys() == s_thr.keys() and all(torch.equal(torch.as_tensor(s_seq[k]), torch.as_tensor(s_thr[k]))
                                                    for k in s_seq)


def test_the_thread_count_follows_the_setting_and_the_intra_op_threads(two_threads):
    assert FusedIterativeSolver().thread_count(4) == 2  # True: as many as the intra-op threads
    assert FusedIterativeSolver(layer_threads=3).thread_count(4) == 3
    assert FusedIterativeSolver(layer_threads=3).thread_count(2) == 2  # at most one per layer
    assert FusedIterativeSolver().thread_count(1) == 0  # one layer: no thread
    assert FusedIterativeSolver(layer_threads=False).thread_count(4) == 0
    assert FusedIterativeSolver(layer_threads=1).thread_count(4) == 0
    assert FusedIterativeSolver(compile_elementwise=True).thread_count(4) == 0
    torch.set_num_threads(1)
    assert FusedIterativeSolver().thread_count(4) == 0
    for bad in ("2", -1, 1.5):
        with pytest.raises(ValueError, match="layer_threads: expected True, False or an integer >= 0"):
            FusedIterativeSolver(layer_threads=bad)


def test_on_the_cpu_the_fast_solver_solves_after_the_backward_pass_where_it_threads_the_layers(two_threads):
    """``solve_in_backward=None`` solves each layer during the backward pass on the CPU unless the fast solver
    runs the layers in threads, which needs them all at once; ``True`` keeps solving in the pass."""
    def solves_in_backward(**kwargs):
        opt = locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid", **kwargs)
        return opt._solves_in_backward([lambda: None], capturing=False)

    assert not solves_in_backward(backend="fused")
    assert not solves_in_backward(precision="bf16")
    assert solves_in_backward(backend="fused", layer_threads=False)
    assert solves_in_backward(backend="fused", solve_in_backward=True)
    assert solves_in_backward()  # the readable loop, the CPU's default backend in FP32
    torch.set_num_threads(1)
    assert solves_in_backward(backend="fused")


def test_an_error_in_one_layer_thread_is_raised_once_every_thread_is_done():
    """No thread is left changing weights when the error reaches the caller; the grad mode is the caller's."""
    done, modes = [], []
    release = threading.Event()

    def work(m):
        modes.append(torch.is_grad_enabled())
        if m == 1:
            raise RuntimeError("layer 1 failed")
        if m == 2:
            release.wait(timeout=5)  # still running when layer 1 fails
        done.append(m)

    def releasing(m):
        try:
            work(m)
        finally:
            if m == 1:
                release.set()
    with torch.no_grad(), pytest.raises(RuntimeError, match="layer 1 failed"):
        _LayerThreads(2).run([0, 1, 2, 3], releasing, where=[0, 1, 0, 1])
    assert sorted(done) == [0, 2] and set(modes) == {False}  # lane 1 stopped at its error, lane 0 finished
