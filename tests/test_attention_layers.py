"""``nn.MultiheadAttention``'s four projections are LocoProp layers (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``: :class:`locoprop.layers.AttentionProjection`), found in the autograd graph of each call: one local
SGD iteration is BackProp's step on every attention parameter, whatever the call (self-attention on the packed
weight, cross-attention on its parts, separate key and value dimensions), and both solvers take the same steps."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import locoprop
from test_errors import _assert_unchanged, _snapshot

E = 8


class Attention(nn.Module):
    """One attention, called as ``call`` says, then a Linear head."""

    def __init__(self, call: str, **kwargs):
        super().__init__()
        torch.manual_seed(3)
        self.call = call
        self.att = nn.MultiheadAttention(E, 2, **kwargs)
        self.head = nn.Linear(E, 5)

    def forward(self, q, k, v):
        if self.call == "self":  # one product on the packed in_proj_weight
            out, _ = self.att(q, q, q)
        elif self.call == "cross":  # keys and values alike: the query's rows, then the other two thirds
            out, _ = self.att(q, k, k, need_weights=False)
        else:  # three products, one on each third (or on q_proj_weight, k_proj_weight, v_proj_weight)
            out, _ = self.att(q, k, v, need_weights=False)
        return self.head(out)


def _inputs(batch_first: bool, kdim=E, vdim=E):
    torch.manual_seed(4)
    shape = (lambda n, length, d: (n, length, d)) if batch_first else (lambda n, length, d: (length, n, d))
    return [torch.randn(*shape(3, length, d), dtype=torch.float64) for length, d in ((4, E), (5, kdim), (5, vdim))]


CASES = [("self", {}), ("self", {"batch_first": True}), ("self", {"bias": False}), ("cross", {}),
         ("cross", {"batch_first": True}), ("apart", {}), ("apart", {"batch_first": True, "bias": False}),
         ("apart", {"kdim": 6, "vdim": 7}), ("apart", {"add_bias_kv": True, "add_zero_attn": True})]


@pytest.mark.parametrize("variant", ["S", "M"])
@pytest.mark.parametrize("call, kwargs", CASES)
def test_one_local_sgd_iteration_is_backprop_on_every_attention_parameter(call, kwargs, variant):
    model = Attention(call, **kwargs).double()
    q, k, v = _inputs(kwargs.get("batch_first", False), kwargs.get("kdim", E), kwargs.get("vdim", E))
    y = torch.randn(*model(q, k, v).shape, dtype=torch.float64)

    def loss(m):
        return ((m(q, k, v) - y) ** 2).sum() / 2

    reference = copy.deepcopy(model)
    own = [(n, p) for n, p in reference.att.named_parameters() if n not in ("bias_k", "bias_v")]
    grads = torch.autograd.grad(loss(reference), [p for _, p in own])
    extra = [p for n, p in reference.att.named_parameters() if n in ("bias_k", "bias_v")]
    extra_grads = torch.autograd.grad(loss(reference), extra) if extra else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bias_k, bias_v: left to another optimizer
        opt = locoprop.LocoProp(model, variant, lr=0.1, activation_lr=0.5, local_steps=1, inner="sgd",
                                output_transfer="linear")
    assert [lay.name for lay in opt.layers] == ["att.q_proj", "att.k_proj", "att.v_proj", "att.out_proj", "head"]
    opt.step(lambda: loss(model))
    moved = dict(model.att.named_parameters())
    for (name, p), g in zip(own, grads):
        torch.testing.assert_close(moved[name], p - 0.05 * g, rtol=1e-12, atol=1e-14, msg=name)
        assert not torch.equal(moved[name], p), name
    for (name, p), g in zip([(n, p) for n, p in model.att.named_parameters() if n in ("bias_k", "bias_v")],
                            extra_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14, msg=name)  # for another optimizer


class Seq2Seq(nn.Module):
    """``nn.Transformer``: encoder and decoder layers, self- and cross-attention, all inside blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.transformer = nn.Transformer(E, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                                          dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 4)

    def forward(self, src, tgt):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=src.dtype)
        return self.head(self.transformer(src, tgt, tgt_mask=mask, tgt_is_causal=True))


@pytest.mark.parametrize("inner", ["tf_rmsprop", "adam"])
def test_a_transformer_takes_the_same_steps_on_both_solvers(inner):
    src, tgt = torch.randn(3, 5, E, dtype=torch.float64), torch.randn(3, 4, E, dtype=torch.float64)
    labels = torch.randint(0, 4, (3, 4))
    models = [Seq2Seq().double() for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the norms: left to another optimizer
        opts = [locoprop.LocoProp(m, "M", lr=1e-2, activation_lr=2.0, local_steps=3, inner=inner,
                                  output_transfer="softmax", backend=b) for m, b in zip(models, ("reference", "fused"))]
    names = [lay.name for lay in opts[0].layers]
    for where in ("encoder.layers.0.self_attn", "decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn"):
        assert [f"transformer.{where}.{p}_proj" for p in ("q", "k", "v", "out")] == [
            n for n in names if n.startswith(f"transformer.{where}.")]
    start = copy.deepcopy(models[0])
    for _ in range(3):
        for m, o in zip(models, opts):
            o.step(lambda m=m: F.cross_entropy(m(src, tgt).flatten(0, 1), labels.flatten()))
    assert opts[1].last_solver == "fused"
    for (name, p), q in zip(models[1].named_parameters(), models[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
    moved = dict(models[0].named_parameters())
    for name, p in start.named_parameters():
        if "attn" in name:
            assert not torch.equal(moved[name], p), name


def test_attention_false_leaves_the_attention_to_another_optimizer():
    model = Attention("self").double()
    q, k, v = _inputs(False)
    with pytest.warns(UserWarning, match=r"left to another optimizer.*'att.in_proj_weight', 'att.in_proj_bias', "
                                         r"'att.out_proj.weight', 'att.out_proj.bias'"):
        opt = locoprop.LocoProp(model, "S", attention=False, output_transfer="linear")
    assert [lay.name for lay in opt.layers] == ["head"]
    start = copy.deepcopy(model.att)
    opt.step(lambda: model(q, k, v).square().sum())
    assert all(torch.equal(p, s) for p, s in zip(model.att.parameters(), start.parameters()))
    assert model.att.in_proj_weight.grad is not None
    with pytest.raises(TypeError, match="attention: expected True, False or None"):
        locoprop.LocoProp(model, attention="yes")


def test_a_copy_and_a_pickle_take_the_same_steps():
    """The query, key and value projections are views of ``in_proj_weight``: a copy of the model and optimizer
    has its own views, and its steps move its own attention."""
    model = Attention("self").double()
    q, k, v = _inputs(False)
    opt = locoprop.LocoProp(model, "M", lr=1e-2, local_steps=2, output_transfer="linear")
    opt.step(lambda: model(q, k, v).square().sum())
    twin, twin_opt = copy.deepcopy((model, opt))
    pickled, pickled_opt = pickle.loads(pickle.dumps((model, opt)))
    for m, o in ((model, opt), (twin, twin_opt), (pickled, pickled_opt)):
        o.step(lambda m=m: m(q, k, v).square().sum())
    for other in (twin, pickled):
        for p, r in zip(other.parameters(), model.parameters()):
            assert torch.equal(p, r)
    assert twin.att.in_proj_weight.data_ptr() != model.att.in_proj_weight.data_ptr()


def test_steps_under_autocast_solve_the_same_problems_on_both_solvers():
    model = Attention("self", batch_first=True)
    twin = copy.deepcopy(model)
    q, k, v = (t.float() for t in _inputs(True))
    opts = [locoprop.LocoProp(m, "M", lr=1e-2, local_steps=3, output_transfer="linear", backend=b)
            for m, b in ((model, "reference"), (twin, "fused"))]
    for m, o in zip((model, twin), opts):
        def closure(m=m):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(q, k, v).float().square().mean()
        o.step(closure)
    for p, r in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_under_autocast_the_three_projections_share_their_converted_rows():
    """The bfloat16 rows of a self-attention's product become one float32 tensor for the three layers."""
    model = Attention("self", batch_first=True)
    q, k, v = (t.float() for t in _inputs(True))
    opt = locoprop.LocoProp(model, "M", lr=1e-2, output_transfer="linear", retain_problems=True)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(q, k, v).float().square().mean()
    opt.step(closure)
    rows = [problem.batch.inputs for problem in opt.last_problems[:3]]
    assert rows[0].dtype == torch.float32 and rows[0] is rows[1] is rows[2]


def test_an_attention_whose_products_are_not_found_is_named_and_nothing_changes(monkeypatch):
    import locoprop.layers as layers

    model = Attention("self").double()
    q, k, v = _inputs(False)
    opt = locoprop.LocoProp(model, "M", lr=1e-2, output_transfer="linear")
    opt.step(lambda: model(q, k, v).square().sum())
    snap = _snapshot(model, opt)
    monkeypatch.setattr(layers, "attention_products", lambda *args: [])  # a graph LocoProp cannot read
    with pytest.raises(RuntimeError, match=r"\['att.q_proj', 'att.k_proj', 'att.v_proj', 'att.out_proj'\]: "
                                           r"LocoProp did not find their products.*attention=False"):
        opt.step(lambda: model(q, k, v).square().sum())
    _assert_unchanged(model, opt, snap)


def test_other_parameters_are_the_ones_the_layers_leave():
    model = Seq2Seq()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = locoprop.LocoProp(model, "M", output_transfer="softmax")
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in opt.other_parameters()] == [n for n, _ in model.named_parameters() if "norm" in n]


def test_a_compiled_model_leaves_its_attention_to_another_optimizer():
    """``torch.compile`` (here AOTAutograd, as the default Inductor) can make the attention one node of the
    autograd graph: given the compiled model, LocoProp leaves the attention to another optimizer (where the graph
    hides the products from an attention that is a layer, the step names the layers and the fix:
    ``test_an_attention_whose_products_are_not_found_is_named_and_nothing_changes``)."""
    model = Attention("self").double()
    q, k, v = _inputs(False)
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.warns(UserWarning, match="att.in_proj_weight"):
        opt = locoprop.LocoProp(compiled, "M", output_transfer="linear")
    assert [lay.name for lay in opt.layers] == ["head"]
    start = copy.deepcopy(model)
    opt.step(lambda: compiled(q, k, v).square().sum())
    assert not torch.equal(model.head.weight, start.head.weight)
    assert model.att.in_proj_weight.grad is not None and torch.equal(model.att.in_proj_weight, start.att.in_proj_weight)


@pytest.mark.parametrize("parts", [1, 2])
def test_the_query_key_and_value_layers_of_a_self_attention_share_their_rows(parts):
    """One tensor of input rows for the three (the product's saved input), also when micro-batches are stacked
    or the attention is called twice: a third of the memory three copies would take."""
    model = Attention("self").double()
    q, k, v = _inputs(False)
    opt = locoprop.LocoProp(model, "M", lr=1e-2, output_transfer="linear", retain_problems=True)
    twice = [lambda: (model(q, k, v).square().sum() + model(2 * q, k, v).square().sum())]
    closures = twice if parts == 1 else [lambda part=part: model(part, k, v).square().sum() for part in q.split(2, 1)]
    opt.step(closures)
    rows = [problem.batch.inputs for problem in opt.last_problems[:3]]
    assert rows[0] is rows[1] is rows[2]
    assert rows[0].shape == ((2 if parts == 1 else 1) * 4 * 3, E)  # (calls x) queries x examples
    assert opt.last_problems[3].batch.inputs is not rows[0]  # the output projection's rows are its own
