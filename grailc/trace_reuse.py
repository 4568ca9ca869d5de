"""Reusing a traced graph for modules built alike (the decoder layers of an LLM): :class:`Traces` keeps the graphs
traced for one caller as :class:`Template` s, and :func:`grailc.trace.capture` asks it before tracing. A module that
matches a template gets a copy of its graph with the module's own tensors bound in; anything that differs (tensors,
submodules, plain attributes, inputs, or the output on the example) is traced anew. Never a guess."""

from __future__ import annotations

import copy
import dataclasses
import functools
import types

import torch
from torch import fx

from grailc.trace import Inputs, _first_line

# A decoder layer's KV-cache slot: it differs between layers that are otherwise built alike. A module whose forward
# reads it in other ways is caught by the output check of Traces.reuse.
_UNCOMPARED = frozenset({"_parameters", "_buffers", "_modules", "layer_idx"})


@dataclasses.dataclass
class Template:
    """A traced graph with its tensors on the meta device, and what the trace depended on besides tensor values:
    the traced module's submodules with their classes and plain attributes, its tensors' names, kinds, shapes,
    strides, dtypes, devices and aliasing, and the input shapes and example inputs."""

    graph: fx.GraphModule
    tensors: dict[str, tuple]
    modules: list[tuple[str, type, dict]]
    shapes: list[tuple[int, ...]]
    example: list[tuple]

    @classmethod
    def of(cls, gm: fx.GraphModule, module: torch.nn.Module, shapes, example: Inputs) -> Template | None:
        """The template of ``gm``, just traced from ``module``; None when the graph reads a tensor that is not one
        of the module's parameters and buffers (a constant baked in by the trace, which another module might not
        share), or holds other tensors than the module's."""
        tensors = _tensor_specs(module)
        if _tensor_specs(gm) != tensors:
            return None
        if any(n.op == "get_attr" and n.target not in tensors for n in gm.graph.nodes):
            return None
        memo = {}
        for t in _named_tensors(gm).values():
            if id(t) not in memo:
                meta = t.detach().to("meta")
                memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
        return cls(_copy_graph(gm, memo), tensors, _module_records(module), [tuple(s) for s in shapes],
                   _input_specs(example))

    def mismatch(self, module: torch.nn.Module, shapes=None, example: Inputs | None = None) -> str | None:
        """The first difference between ``module`` (and the inputs) and what this graph was traced from; None when
        there is none."""
        if shapes is not None and [tuple(s) for s in shapes] != self.shapes:
            return f"input shapes {[list(s) for s in shapes]} differ from the traced {[list(s) for s in self.shapes]}"
        if example is not None and _input_specs(example) != self.example:
            return "the example inputs differ in shape, dtype or device"
        tensors = _tensor_specs(module)
        if tensors != self.tensors:
            for name in [*self.tensors, *tensors]:
                got, traced = tensors.get(name), self.tensors.get(name)
                if got != traced:
                    return f"tensor {name}: {_spec_text(got)} != traced {_spec_text(traced)}"
        modules = _module_records(module)
        if len(modules) != len(self.modules):
            return f"{len(modules)} submodules != traced {len(self.modules)}"
        for (name, kind, attrs), (t_name, t_kind, t_attrs) in zip(modules, self.modules):
            if (name, kind) != (t_name, t_kind):
                return f"submodule {name} ({kind.__name__}) != traced {t_name} ({t_kind.__name__})"
            for key in sorted({*attrs, *t_attrs}):
                if key not in attrs or key not in t_attrs or not _same_value(attrs[key], t_attrs[key]):
                    return f"attribute {name + '.' if name else ''}{key} differs from the traced module's"
        return None

    def bind(self, module: torch.nn.Module) -> fx.GraphModule:
        """A copy of the graph reading ``module``'s own tensors (the very objects, as a trace of it would); a
        ValueError when ``module`` is not built like the traced one."""
        reason = self.mismatch(module)
        if reason is not None:
            raise ValueError(f"the traced graph does not fit this module: {reason}")
        own = _named_tensors(module)
        memo = {id(t): own[name] for name, t in _named_tensors(self.graph).items()}
        return _copy_graph(self.graph, memo)


class Traces:
    """The graphs traced for one caller, reused for modules built alike (every decoder layer of an LLM).

    :func:`capture` asks here first: a module that matches a :class:`Template` (the same submodules, classes and
    plain attributes but ``layer_idx``, the same tensor names, kinds, shapes, strides, dtypes and devices, the same
    input shapes and example inputs) gets a copy of its graph with the module's own tensors bound in, provided the
    copy's output on the example equals the module's own (to float rounding). Anything else is traced anew and
    kept as one more template. ``last`` says what the latest capture did: "traced", "reused", or "traced (why the
    templates did not fit)"."""

    def __init__(self):
        self.templates: list[Template] = []
        self.traced = self.reused = 0
        self.last = ""

    def reuse(self, module: torch.nn.Module, shapes, example: Inputs, output) -> fx.GraphModule | None:
        """A template's graph bound to ``module``, checked against ``output`` (the module's own on ``example``);
        None when no template fits."""
        reasons = []
        for template in self.templates:
            reason = template.mismatch(module, shapes, example)
            if reason is None:
                gm = template.bind(module)
                try:
                    with torch.no_grad():
                        same = _same_output(gm(*example), output)
                except Exception as e:  # a graph that does not run on the example is not this module's
                    same, reason = False, f"it does not run on the example: {_first_line(e)}"
                if same:
                    self.reused += 1
                    self.last = "reused"
                    return gm
                reason = reason or "its output on the example differs from the module's"
            reasons.append(reason)
        self.last = f"traced ({'; '.join(reasons)})" if reasons else "traced"
        return None

    def remember(self, gm: fx.GraphModule, module: torch.nn.Module, shapes, example: Inputs) -> None:
        self.traced += 1
        template = Template.of(gm, module, shapes, example)
        if template is not None:
            self.templates.append(template)


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def _tensor_specs(module: torch.nn.Module) -> dict[str, tuple]:
    """Per tensor name: kind, class, shape, stride, dtype, device, requires_grad and the first name of the same
    tensor (tied weights)."""
    first: dict[int, str] = {}
    specs = {}
    for name, t in _named_tensors(module).items():
        kind = "parameter" if isinstance(t, torch.nn.Parameter) else "buffer"
        specs[name] = (kind, type(t), tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad,
                       first.setdefault(id(t), name))
    return specs


def _spec_text(spec: tuple | None) -> str:
    if spec is None:
        return "absent"
    kind, _, shape, _, dtype, device, *_ = spec
    return f"{kind} {list(shape)} {dtype} on {device}"


def _module_records(module: torch.nn.Module) -> list[tuple[str, type, dict]]:
    """Each submodule's name, class and plain attributes (containers copied, so that later changes to them do not
    change the record)."""
    return [(name, type(sub), {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v
                               for k, v in vars(sub).items() if k not in _UNCOMPARED})
            for name, sub in module.named_modules(remove_duplicate=False)]


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.device == b.device and a.shape == b.shape and bool(torch.equal(a, b)))
    if type(a) is not type(b):
        return False
    if isinstance(a, functools.partial):  # made anew per module (an activation's gelu with approximate="tanh")
        return (_same_value(a.func, b.func) and len(a.args) == len(b.args)
                and all(_same_value(x, y) for x, y in zip(a.args, b.args)) and a.keywords.keys() == b.keywords.keys()
                and all(_same_value(a.keywords[k], b.keywords[k]) for k in a.keywords))
    if isinstance(a, types.MethodType) and isinstance(a.__self__, torch.nn.Module):
        return a.__func__ is b.__func__ and type(a.__self__) is type(b.__self__)  # the modules are compared apart
    try:
        return bool(a == b)
    except Exception:  # an object that cannot be compared is taken as different
        return False


def _input_specs(example: Inputs) -> list[tuple]:
    return [(tuple(t.shape), t.dtype, t.device) for t in example]


def _same_output(out, expected) -> bool:
    """The same structure, and tensors equal to float rounding (a few ulps of the largest magnitude)."""
    flat, spec = torch.utils._pytree.tree_flatten(out)
    flat_expected, spec_expected = torch.utils._pytree.tree_flatten(expected)
    if spec != spec_expected:
        return False
    for a, b in zip(flat, flat_expected):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if not _same_value(a, b):
                return False
            continue
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return False
            continue
        scale = float(b.abs().max()) if b.numel() else 0.0
        if not float((a - b).abs().max() if b.numel() else 0.0) <= 16 * torch.finfo(b.dtype).eps * max(1.0, scale):
            return False
    return True


def _copy_graph(gm: fx.GraphModule, memo: dict[int, torch.Tensor]) -> fx.GraphModule:
    """A deep copy of ``gm`` whose tensors are taken from ``memo`` (by the id of ``gm``'s), with what a deep copy of
    a GraphModule leaves out: the forward hooks (an exported graph's input checks) and its other attributes (its
    range constraints, ``validate_inputs``, the ``train``/``eval`` that refuse training), so that the copy is like a
    new trace."""
    memo = dict(memo)
    res = copy.deepcopy(gm, memo)
    for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(res, hooks).update(getattr(gm, hooks))
    for key, value in vars(gm).items():
        if key not in vars(res):
            vars(res)[key] = copy.deepcopy(value, memo)  # a bound method is bound to the copy
    return res
