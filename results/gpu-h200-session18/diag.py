"""Device session 18 diagnostic: inner-state differences of the Triton kernels against PyTorch's operations."""
import sys
sys.path.insert(0, "tests/cuda")
import test_fused_cuda as T

def run(kernels):
    model = T._model()
    opt = T._opt(model, triton_elementwise=None if kernels else False)
    if kernels:
        opt.fused_solver.triton_kernels = frozenset(kernels)
    for x in T._batches(8):
        opt.step(lambda: T._loss(model(x), x))
    return model, opt

base = run(None)
for kernels in (("update", "residual"), ("update",), ("residual",)):
    other = run(kernels)
    print(kernels, "weights", "%.2e" % T._rel(base[0], other[0]))
    for (n, p), q in zip(base[0].named_parameters(), other[0].parameters()):
        row = [n]
        for key in ("mean_square", "momentum_buffer"):
            a, b = base[1].inner.state[p][key], other[1].inner.state[q][key]
            row.append(f"{key} {((a - b).norm() / a.norm()).item():.2e}")
        row.append(f"weight {((p - q).norm() / p.norm()).item():.2e}")
        print("  ", *row)
