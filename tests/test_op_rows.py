"""Every row of the op table runs in a test: a graph built by hand around the exact ATen overload
(``conv_in -> op -> conv_out``), the group of conv_in must be understood, keeping its channels in a random order must
reproduce the outputs, and keeping a subset must equal the masked original. A row without a case fails
``test_every_row_has_a_case``; rows that need more structure than a sandwich (attention, embedding, linear, norms,
reshapes) are exercised on exported modules in ``test_ops.py`` and the end-to-end tests, and listed here by name.
"""

from __future__ import annotations

import operator

import pytest
import torch
from grailc.passes.verify import permutation_error
from graph_checks import prune_and_compare
from torch import fx, nn

from grailc.analysis import analyse
from grailc.ops import BROADCAST, ELEMENTWISE, OP_TABLE, SPATIAL_1D, SPATIAL_2D, SPATIAL_3D

aten = torch.ops.aten
C = 8
KEEP = torch.tensor([0, 2, 3, 6, 7])


def overload(name: str):
    packet, _, ov = name.partition(".")
    return getattr(getattr(aten, packet), ov or "default")


def build(body, dims: int = 2, side: int = 6) -> tuple[fx.GraphModule, torch.Tensor]:
    """x -> conv_in (3 -> C) -> body(graph, y, root) -> conv_out (C -> 4), with real values as node metadata."""
    torch.manual_seed(0)
    conv = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}[dims]
    root = nn.Module()
    root.conv_in = nn.Module()
    root.conv_in.weight = nn.Parameter(torch.randn(C, 3, *[3] * dims) * 0.3)
    root.conv_out = nn.Module()
    root.conv_out.weight = nn.Parameter(torch.randn(4, C, *[1] * dims))
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(conv, (x, g.get_attr("conv_in.weight"), None, [1] * dims, [1] * dims))
    z = body(g, y, root)
    g.output(g.call_function(conv, (z, g.get_attr("conv_out.weight"))))
    gm = fx.GraphModule(root, g)
    example = torch.randn(2, 3, *[side] * dims)
    _fill_values(gm, example)
    return gm, example


def _fill_values(gm: fx.GraphModule, example: torch.Tensor) -> None:
    class Values(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = out
            return out

    with torch.no_grad():
        Values(gm).run(example)


def check(gm: fx.GraphModule, example: torch.Tensor) -> None:
    deps = analyse(gm)
    group = next(g for g in deps.groups.values() if any(s.fact.weight == "conv_in.weight" for s in g.producers))
    assert group.understood and group.prunable, group.pinned
    assert permutation_error(gm, deps, [(example,)]) <= 1e-5
    prune_and_compare(gm, deps, group, KEEP if group.size == C else torch.arange(0, group.size, 2), example)


def unary(name: str, *extra, positive: bool = False):
    op = overload(name)

    def body(g, y, root):
        if positive:
            y = g.call_function(aten.add.Scalar, (g.call_function(aten.abs.default, (y,)), 1.0))
        out = g.call_function(op, (y, *extra))
        return g.call_function(operator.getitem, (out, 0)) if name == "native_dropout" else out

    return body


def as_float(name: str, *extra, boolean_input: bool = False):
    """Ops with boolean results, turned back into floats for the consumer (``extra`` "self": y again)."""
    op = overload(name)

    def body(g, y, root):
        x = g.call_function(aten.gt.Scalar, (y, 0.0)) if boolean_input else y
        mask = g.call_function(op, (x, *[x if e == "self" else e for e in extra]))
        return g.call_function(aten.mul.Tensor, (y, g.call_function(aten._to_copy.default, (mask,),
                                                                    {"dtype": torch.float32})))

    return body


def binary(name: str, second: str = "tensor", **kwargs):
    """op(y, other): other is y itself (a tensor of the same channels) or a scalar."""
    op = overload(name)

    def body(g, y, root):
        if second == "tensor":
            return g.call_function(op, (y, y), kwargs)
        return g.call_function(op, (y, 2.0 if name.startswith("pow") else 0.5), kwargs)

    return body


def where(g, y, root):
    mask = g.call_function(aten.gt.Scalar, (y, 0.0))
    return g.call_function(aten.where.self, (mask, y, g.call_function(aten.neg.default, (y,))))


def masked_fill(name: str):
    op = overload(name)

    def body(g, y, root):
        mask = g.call_function(aten.lt.Scalar, (y, -1.0))
        value = 0.0 if name.endswith("Scalar") else g.call_function(aten.scalar_tensor.default, (0.0,))
        return g.call_function(op, (y, mask, value))

    return body


def _value_of(op, y) -> object:
    """What ``op`` returns for y: a tuple for the ops that also return indices."""
    return ("values", "indices") if "max_pool" in str(op) and ("adaptive" in str(op) or "indices" in str(op)) else y


def spatial(name: str, *extra):
    op = overload(name)

    def body(g, y, root):
        out = g.call_function(op, (y, *extra))
        return g.call_function(operator.getitem, (out, 0)) if isinstance(_value_of(op, y), tuple) else out

    return body


UNARY_EXTRA = {"hardtanh": (-1.0, 1.0), "hardtanh_": (-1.0, 1.0), "leaky_relu": (0.1,), "leaky_relu_": (0.1,),
               "dropout": (0.0, False), "dropout_": (0.0, False), "feature_dropout": (0.0, False),
               "alpha_dropout": (0.0, False), "native_dropout": (0.0, False), "to.dtype": (torch.float32,),
               "to.device": (torch.device("cpu"), torch.float32), "celu": (1.0,)}
POSITIVE = {"sqrt", "rsqrt", "reciprocal", "log"}
BOOLEAN = {"logical_not", "bitwise_not"}

CASES: dict = {}
for _name in ELEMENTWISE.split():
    if _name in BOOLEAN:
        CASES[overload(_name)] = (as_float(_name, boolean_input=True), 2)
    elif _name == "type_as":
        CASES[overload(_name)] = (binary(_name), 2)
    elif _name == "to.dtype_layout":
        CASES[overload(_name)] = (lambda g, y, root: g.call_function(aten.to.dtype_layout, (y,),
                                                                      {"dtype": torch.float32}), 2)
    else:
        CASES[overload(_name)] = (unary(_name, *UNARY_EXTRA.get(_name, ()), positive=_name in POSITIVE), 2)

COMPARE = {"eq.Tensor", "ne.Tensor", "lt.Tensor", "gt.Tensor", "eq.Scalar", "ne.Scalar", "lt.Scalar", "gt.Scalar",
           "ge.Scalar", "le.Scalar", "logical_and", "__and__.Tensor"}
SCALAR_SECOND = {"add.Scalar", "add_.Scalar", "sub.Scalar", "mul.Scalar", "mul_.Scalar", "div.Scalar", "div_.Scalar",
                 "pow.Tensor_Scalar", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "rsub.Scalar"}
for _name in BROADCAST.split():
    if _name in COMPARE:
        CASES[overload(_name)] = (as_float(_name, "self" if _name.endswith("Tensor") else 0.1), 2)
    elif _name in SCALAR_SECOND:
        CASES[overload(_name)] = (binary(_name, "scalar"), 2)
    elif _name == "where.self":
        CASES[overload(_name)] = (where, 2)
    elif _name.startswith("masked_fill"):
        CASES[overload(_name)] = (masked_fill(_name), 2)
    elif _name == "addcmul":
        CASES[overload(_name)] = (lambda g, y, root: g.call_function(aten.addcmul.default, (y, y, y)), 2)
    elif _name == "lerp.Scalar":
        CASES[overload(_name)] = (lambda g, y, root: g.call_function(aten.lerp.Scalar, (y, y, 0.5)), 2)
    else:
        CASES[overload(_name)] = (binary(_name), 2)
CASES[aten.logical_and.default] = (
    lambda g, y, root: g.call_function(aten.mul.Tensor, (y, g.call_function(aten._to_copy.default, (
        g.call_function(aten.logical_and.default, (g.call_function(aten.gt.Scalar, (y, 0.0)),
                                                   g.call_function(aten.lt.Scalar, (y, 1.0)))),),
        {"dtype": torch.float32}))), 2)
CASES[aten.__and__.Tensor] = (
    lambda g, y, root: g.call_function(aten.mul.Tensor, (y, g.call_function(aten._to_copy.default, (
        g.call_function(aten.__and__.Tensor, (g.call_function(aten.gt.Scalar, (y, 0.0)),
                                              g.call_function(aten.lt.Scalar, (y, 1.0)))),),
        {"dtype": torch.float32}))), 2)
CASES[aten.pow.Tensor_Tensor] = (lambda g, y, root: g.call_function(aten.pow.Tensor_Tensor, (
    g.call_function(aten.abs.default, (y,)), g.call_function(aten.abs.default, (y,)))), 2)

POOL_ARGS = {"max_pool": (2,), "avg_pool": (2,), "adaptive_avg_pool": None, "adaptive_max_pool": None}
for _spatial, _dims in ((SPATIAL_1D, 1), (SPATIAL_2D, 2), (SPATIAL_3D, 3)):
    for _name in _spatial.split():
        base = _name.split(".")[0]
        if base.startswith("adaptive"):
            extra = ([2] * _dims,)
        elif base.startswith(("max_pool", "avg_pool")):
            extra = ([2] * _dims,)
        elif base.startswith(("upsample_nearest", "_upsample_nearest")):
            extra = (None, [2.0] * _dims)
        else:  # linear, bilinear, bicubic, trilinear, antialiased
            extra = (None, False, [2.0] * _dims)
        CASES[overload(_name)] = (spatial(_name, *extra), _dims)



def param(root, name: str, value: torch.Tensor) -> str:
    setattr(root, name, nn.Parameter(value))
    return name


def chain(*steps):
    """A body made of steps ``(op, args, kwargs)`` where the string "y" stands for the previous value and other
    strings for parameters made by ``params``."""
    def body(g, y, root):
        for op, args, kwargs in steps:
            args = tuple(y if a == "y" else g.get_attr(a) if isinstance(a, str) else a for a in args)
            y = g.call_function(op, args, kwargs or {})
        return y

    return body


def with_params(make, **params):
    """Register ``params`` (name -> tensor factory) on the root before building ``make``'s graph."""
    def body(g, y, root):
        for name, factory in params.items():
            param(root, name, factory())
        return make(g, y, root)

    return body


get = operator.getitem
STRUCTURED_CASES = {
    "reduce": (chain((aten.mean.dim, ("y", [2, 3], True), None)), 2),
    "reduce_sum": (chain((aten.sum.dim_IntList, ("y", [3], True), None)), 2),
    "amax": (chain((aten.amax.default, ("y", [3], True), None)), 2),
    "amin": (chain((aten.amin.default, ("y", [3], True), None)), 2),
    "var": (chain((aten.var.correction, ("y", [3]), {"correction": 1, "keepdim": True})), 2),
    "var_dim": (chain((aten.var.dim, ("y", [3], True, True), None)), 2),
    "std": (chain((aten.std.correction, ("y", [3]), {"correction": 1, "keepdim": True})), 2),
    "std_dim": (chain((aten.std.dim, ("y", [3], True, True), None)), 2),
    "softmax": (chain((aten._softmax.default, ("y", -1, False), None), (aten.softmax.int, ("y", -1), None),
                      (aten.log_softmax.int, ("y", -1), None), (aten._log_softmax.default, ("y", -1, False), None)), 2),
    "pad": (chain((aten.pad.default, ("y", [1, 1, 1, 1]), None),
                  (aten.constant_pad_nd.default, ("y", [1, 0, 0, 1], 0.0), None)), 2),
    "roll": (chain((aten.roll.default, ("y", [1], [2]), None)), 2),
    "repeat": (chain((aten.repeat.default, ("y", [1, 1, 2, 1]), None)), 2),
    "expand": (chain((aten.unsqueeze.default, ("y", 2), None), (aten.expand.default, ("y", [2, C, 2, 6, 6]), None),
                     (aten.sum.dim_IntList, ("y", [2]), None)), 2),
    "squeeze": (chain((aten.unsqueeze.default, ("y", -1), None), (aten.squeeze.dim, ("y", -1), None),
                      (aten.unsqueeze.default, ("y", -1), None), (aten.squeeze.dims, ("y", [-1]), None),
                      (aten.unsqueeze.default, ("y", 0), None), (aten.squeeze.default, ("y",), None)), 2),
    "permute": (chain((aten.permute.default, ("y", [0, 2, 3, 1]), None),
                      (aten.transpose.int, ("y", 1, 2), None), (aten.transpose.int, ("y", 1, 2), None),
                      (aten.permute.default, ("y", [0, 3, 1, 2]), None)), 2),
    "t": (chain((aten.mean.dim, ("y", [2, 3]), None), (aten.t.default, ("y",), None), (aten.t.default, ("y",), None),
                (aten.view.default, ("y", [2, C, 1, 1]), None)), 2),
    "reshape": (chain((aten.reshape.default, ("y", [2, C, 36]), None), (aten._unsafe_view.default, ("y", [2, C, 6, 6]),
                                                                        None)), 2),
    "reshape_as": (lambda g, y, root: g.call_function(aten.reshape_as.default, (
        g.call_function(aten.view.default, (y, [2, C, 36])), y)), 2),
    "view_as": (lambda g, y, root: g.call_function(aten.view_as.default, (
        g.call_function(aten.view.default, (y, [2, C, 36])), y)), 2),
    "channels_last_pad": (chain((aten.permute.default, ("y", [0, 2, 3, 1]), None),
                                (aten.constant_pad_nd.default, ("y", [0, 0, 1, 1, 0, 2], 0.0), None),
                                (aten.permute.default, ("y", [0, 3, 1, 2]), None)), 2),
    "patch_merging": (with_params(chain((aten.permute.default, ("y", [0, 2, 3, 1]), None),
                                        (aten.reshape.default, ("y", [2, 6, 3, 2, C]), None),
                                        (aten.reshape.default, ("y", [2, 6, 3, 2 * C]), None),
                                        (aten.linear.default, ("y", "mw"), None),
                                        (aten.permute.default, ("y", [0, 3, 1, 2]), None)),
                                  mw=lambda: torch.randn(C, 2 * C) * 0.3), 2),
    "flatten": (chain((aten.flatten.using_ints, ("y", 2), None), (aten.unflatten.int, ("y", 2, [6, 6]), None)), 2),
    "select": (chain((aten.select.int, ("y", 2, 0), None), (aten.unsqueeze.default, ("y", 2), None)), 2),
    "slice": (chain((aten.slice.Tensor, ("y", 2, 0, 3), None)), 2),
    "index": (lambda g, y, root: g.call_function(aten.index.Tensor, (y, [g.call_function(
        aten.arange.start_step, (1, -1, -1))])), 2),
    "split": (lambda g, y, root: g.call_function(aten.cat.default, ([
        g.call_function(get, (g.call_function(aten.split.Tensor, (y, 3, 2)), 1)),
        g.call_function(get, (g.call_function(aten.split_with_sizes.default, (y, [2, 4], 2)), 0)),
        g.call_function(get, (g.call_function(aten.unsafe_split.Tensor, (y, 3, 3)), 0))[..., :3]
        if False else g.call_function(aten.slice.Tensor, (g.call_function(get, (g.call_function(
            aten.unsafe_split.Tensor, (y, 3, 2)), 0)), 3, 0, 6)),
    ], 2)), 2),
    "split_channels": (lambda g, y, root: g.call_function(aten.cat.default, ([
        g.call_function(get, (g.call_function(aten.split.Tensor, (y, 4, 1)), i)) for i in (1, 0)], 1)), 2),
    "split_channels_sizes": (lambda g, y, root: g.call_function(aten.cat.default, ([
        g.call_function(get, (g.call_function(aten.split_with_sizes.default, (y, [3, 5], 1)), i)) for i in (1, 0)],
        1)), 2),
    "chunk_stack": (lambda g, y, root: g.call_function(aten.sum.dim_IntList, (g.call_function(aten.stack.default, (
        [g.call_function(get, (g.call_function(aten.chunk.default, (y, 2, 3)), i)) for i in (1, 0)], -1)), [-1])),
        2),
    "unbind": (lambda g, y, root: g.call_function(aten.concat.default, ([
        g.call_function(aten.unsqueeze.default, (g.call_function(get, (g.call_function(aten.unbind.int, (y, 2)), i)),
                                                 2)) for i in (0, 1)], 2)), 2),
    "matmul": (with_params(chain((aten.matmul.default, ("y", "mix"), None)), mix=lambda: torch.randn(6, 6)), 2),
    "bmm": (with_params(chain((aten.view.default, ("y", [2, C, 36]), None), (aten.bmm.default, ("y", "mix3"), None),
                              (aten.view.default, ("y", [2, C, 6, 6]), None)), mix3=lambda: torch.randn(2, 36, 36)), 2),
    "batch_norm": (with_params(chain((aten.batch_norm.default, ("y", "g", "b", "m", "v", False, 0.1, 1e-5, True),
                                      None)), g=lambda: torch.rand(C) + 0.5, b=lambda: torch.randn(C),
                               m=lambda: torch.randn(C), v=lambda: torch.rand(C) + 0.5), 2),
    "native_batch_norm": (with_params(lambda g, y, root: g.call_function(get, (g.call_function(
        aten._native_batch_norm_legit_no_training.default, (y, *(g.get_attr(n) for n in "gbmv"), 0.1, 1e-5)), 0)),
        g=lambda: torch.rand(C) + 0.5, b=lambda: torch.randn(C), m=lambda: torch.randn(C),
        v=lambda: torch.rand(C) + 0.5), 2),
    "group_norm": (with_params(chain((aten.group_norm.default, ("y", 2, "g", "b", 1e-5, True), None)),
                               g=lambda: torch.rand(C) + 0.5, b=lambda: torch.randn(C)), 2),
    "linear": (with_params(chain((aten.permute.default, ("y", [0, 2, 3, 1]), None),
                                 (aten.linear.default, ("y", "lw", "lb"), None),
                                 (aten.permute.default, ("y", [0, 3, 1, 2]), None)),
                           lw=lambda: torch.randn(C, C) * 0.3, lb=lambda: torch.randn(C)), 2),
    "conv_transpose1d": (with_params(chain((aten.conv_transpose1d.default, ("y", "tw"), None)),
                                     tw=lambda: torch.randn(C, C, 3) * 0.3), 1),
    "conv_transpose2d": (with_params(chain((aten.conv_transpose2d.input, ("y", "tw"), None)),
                                     tw=lambda: torch.randn(C, C, 3, 3) * 0.3), 2),
    "conv_transpose3d": (with_params(chain((aten.conv_transpose3d.input, ("y", "tw"), None)),
                                     tw=lambda: torch.randn(C, C, 1, 1, 1) * 0.3), 3),
}
LOSSY_CASES = {
    "layer_norm": (with_params(chain((aten.permute.default, ("y", [0, 2, 3, 1]), None),
                                     (aten.layer_norm.default, ("y", [C], "lnw", "lnb", 1e-5), None),
                                     (aten.permute.default, ("y", [0, 3, 1, 2]), None)),
                               lnw=lambda: torch.rand(C) + 0.5, lnb=lambda: torch.randn(C)), 2),
    "native_layer_norm": (with_params(lambda g, y, root: g.call_function(aten.permute.default, (g.call_function(
        get, (g.call_function(aten.native_layer_norm.default, (g.call_function(aten.permute.default, (
            y, [0, 2, 3, 1])), [C], g.get_attr("lnw"), g.get_attr("lnb"), 1e-5)), 0)), [0, 3, 1, 2])),
        lnw=lambda: torch.rand(C) + 0.5, lnb=lambda: torch.randn(C)), 2),
}
# rows run on exported modules elsewhere: attention on real transformers, embedding on a decoder LLM
ELSEWHERE = {"aten.scaled_dot_product_attention.default": "e2e/test_transformers.py",
             "aten.embedding.default": "e2e/test_transformers.py (TinyLM)"}


@pytest.mark.parametrize("op", sorted(CASES, key=str), ids=str)
def test_row(op):
    body, dims = CASES[op]
    gm, example = build(body, dims)
    assert any(n.target == op for n in gm.graph.nodes)
    check(gm, example)


@pytest.mark.parametrize("name", sorted(STRUCTURED_CASES))
def test_structured_row(name):
    body, dims = STRUCTURED_CASES[name]
    check(*build(body, dims))


@pytest.mark.parametrize("name", sorted(LOSSY_CASES))
def test_lossy_row(name):
    """Normalisation over the channels: the permutation check holds (statistics are order-free), slicing does not
    reproduce the original (the statistics change), and the group says so."""
    gm, example = build(*LOSSY_CASES[name])
    deps = analyse(gm)
    group = next(g for g in deps.groups.values() if any(s.fact.weight == "conv_in.weight" for s in g.producers))
    assert group.understood and group.lossy and "normalises over the channels" in group.lossy
    assert permutation_error(gm, deps, [(example,)]) <= 1e-5


def test_every_row_has_a_case():
    """Every op-table row appears in a graph that one of the tests above checks (or is named in ELSEWHERE)."""
    seen = set(ELSEWHERE)
    for body, dims in [*CASES.values(), *STRUCTURED_CASES.values(), *LOSSY_CASES.values()]:
        gm, _ = build(body, dims)
        seen |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    missing = {str(op) for op in OP_TABLE} - seen
    assert not missing, f"op-table rows that no test runs: {sorted(missing)}"
