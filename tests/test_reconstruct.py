"""The reconstruct pass: windows found from the graph, trained against the dense model, verified like any result."""

from __future__ import annotations

import pytest
import torch
from grailc.passes.reconstruct import cut_points, find_windows
from torch import nn

import grailc
from grailc.api import make_recipe
from grailc.errors import RecipeError
from grailc.trace import capture

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """stem, two residual blocks, pooling and a classifier."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block1, self.block2 = Block(c), Block(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(x.mean((2, 3)))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyResNet().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _batches(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(n)]


def _graph(model):
    gm, _ = capture(model, [(1, 3, 12, 12)], data=(torch.randn(2, 3, 12, 12),))
    return gm


def _module_of(gm, name: str) -> str:
    node = next(n for n in gm.graph.nodes if n.name == name)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def test_block_windows_are_the_residual_blocks():
    gm = _graph(_model())
    cuts = {n.name for n in cut_points(gm)}
    adds = [n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) == 2 and all(a.name in cuts for a in adds)
    convs = [n.name for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert not cuts & {convs[1], convs[2], convs[3], convs[4]} - {convs[0]}  # block-internal convs: bypassed

    windows = find_windows(gm, "block")
    assert len(windows) == 3  # stem + block1 (ends after its ReLU), block2, then pooling + classifier
    stem_block1, block2, head = windows
    assert {convs[0], convs[1], convs[2]} <= set(stem_block1.nodes) and adds[0].name in stem_block1.nodes
    assert {convs[3], convs[4]} <= set(block2.nodes) and adds[1].name in block2.nodes
    linear = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    assert block2.targets == [linear.args[0].name]  # extended over the parameter-free ReLU and pooling
    assert head.nodes == [linear.name] and head.targets == [linear.name]
    assert [w.nodes for w in find_windows(gm, "layer")] == [[n for w in windows for n in w.nodes]]  # one window
    # every computed node is in exactly one window, in graph order
    flat = [n for w in windows for n in w.nodes]
    assert len(flat) == len(set(flat))


class TinyViT(nn.Module):
    """Patch embedding, a class token expanded to the batch, one pre-norm transformer layer, a head."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head, self.heads = nn.Linear(d, 5), heads

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(x[:, 0])


def test_block_windows_of_a_transformer_are_its_attention_and_mlp_halves():
    torch.manual_seed(0)
    gm = _graph(TinyViT().eval())
    adds = [n.name for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    windows = find_windows(gm, "block")
    # the MLP half extends over the parameter-free class-token select, up to the head
    assert [w.targets for w in windows] == [[adds[0]], [linears[-1].args[0].name], [linears[-1].name]]
    assert adds[1] in windows[1].nodes
    attention, mlp, head = windows
    assert {linears[0].name, linears[1].name} <= set(attention.nodes)  # qkv and proj
    assert {linears[2].name, linears[3].name} <= set(mlp.nodes)  # fc1 and fc2
    assert any(n.startswith("conv2d") for n in attention.nodes)  # patch embedding + class token + attention


def test_group_windows_train_each_pruned_consumer_alone():
    gm = _graph(_model())
    convs = [n.name for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    windows = find_windows(gm, "group", consumers=[convs[2], convs[4]])
    assert [w.targets for w in windows[:2]] == [[convs[2]], [convs[4]]]
    assert [len(w.trainable) for w in windows[:2]] == [1, 1]  # the conv's weight (no bias)
    assert windows[-1].trainable == []  # the rest only carries values forward


@pytest.mark.parametrize("targets_kwargs", [
    {},  # the residual stream pruned too: windows matched through the channel map
    {"exclude": ["stem", "*conv2"]},  # residual stream kept whole
])
def test_reconstruction_lowers_the_window_error_and_verifies(targets_kwargs):
    model, batches = _model(), _batches()
    # grail+bias adds a bias to consumers that had none: the windows must read it as a parameter of their own
    # one-shot GRAIL: the starting point reconstruction improves most (sequential calibration leaves this tiny
    # model's held-out error within 0.1% of what 40 steps reach)
    common = dict(calib=batches, ratio=0.5, selector="magnitude", compensate="grail+bias", calib_held_out=1,
                  sequential=False, **targets_kwargs)
    plain = grailc.compress(model, **common)
    result = grailc.compress(model, reconstruct="block", reconstruct_steps=40, reconstruct_lr=3e-3, **common)
    assert result.recipe.pipeline[-3:] == ["apply", "reconstruct", "verify"]
    rc = result.report["reconstruct"]
    assert rc["backprop"] is True and rc["labels"] is False and rc["optimizer"] == "Adam"
    trained = [w for w in rc["windows"] if "skipped" not in w]
    assert len(rc["windows"]) == 3 and len(trained) == 3
    assert all(w["loss_after"] <= w["loss_before"] for w in trained)
    assert sum(w["loss_after"] for w in trained) < 0.8 * sum(w["loss_before"] for w in trained)
    assert rc["seconds"] > 0 and rc["peak_rss_mib"] > 0
    # values change, never structure: same shapes as without reconstruction, and the self-check still holds
    shapes = {k: tuple(v.shape) for k, v in plain.module.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in result.module.state_dict().items()} == shapes
    assert not any(p.requires_grad for p in result.module.parameters())
    assert result.report["verification"]["permutation_error"] <= 1e-5  # verify ran after reconstruct
    # the held-out output error improves over GRAIL alone
    assert result.report["output_error"]["relative_l2"] < plain.report["output_error"]["relative_l2"]


@pytest.mark.parametrize("options", [
    dict(reconstruct="group"),
    dict(reconstruct="layer"),
    dict(reconstruct="block", reconstruct_fed="dense"),
    dict(reconstruct="block", reconstruct_params="norms+biases"),
    dict(reconstruct="block", reconstruct_params="lowrank", reconstruct_rank=2),
    dict(reconstruct="block", reconstruct_batch=16, repair=True),
    dict(reconstruct="block", reconstruct_optimizer="rmsprop"),
])
def test_variants_train_and_report(options):
    model, batches = _model(), _batches(4)
    # one-shot GRAIL without the bias term leaves 15 steps something to gain on every variant (grail+bias, or
    # sequential calibration, start the one layer window lower, and need more steps before Adam's first ones pay off)
    result = grailc.compress(model, calib=batches, ratio=0.5, selector="magnitude", compensate="grail",
                             sequential=False, calib_held_out=1, reconstruct_steps=15, reconstruct_lr=3e-3,
                             **options)
    rc = result.report["reconstruct"]
    trained = [w for w in rc["windows"] if "skipped" not in w]
    assert trained and all(w["loss_after"] <= w["loss_before"] for w in trained)
    assert any(w["loss_after"] < w["loss_before"] for w in trained)
    assert result.report["verification"]["permutation_error"] <= 1e-5
    if options.get("reconstruct_params") == "norms+biases":
        assert all(w["trained"] < w["params"] for w in trained)
    if options.get("reconstruct_batch"):
        assert rc["batch_size"] == 16 and result.recipe.pipeline[-4:] == ["apply", "repair", "reconstruct",
                                                                          "verify"]
    if options["reconstruct"] == "layer":
        assert len(rc["windows"]) == 1
    assert rc["optimizer"] == ("RMSprop" if options.get("reconstruct_optimizer") == "rmsprop" else "Adam")


def test_recipe_checks():
    assert "reconstruct" not in make_recipe().pipeline
    with pytest.raises(RecipeError, match="reconstruct kind"):
        make_recipe(reconstruct="blocks")
    with pytest.raises(RecipeError, match="reconstruct_params"):
        make_recipe(reconstruct="block", reconstruct_params="everything")
    with pytest.raises(RecipeError, match="reconstruct_lr"):
        make_recipe(reconstruct="block", reconstruct_lr=0.0)
    with pytest.raises(RecipeError, match="reconstruct_optimizer 'sgd'"):
        make_recipe(reconstruct="block", reconstruct_optimizer="sgd")
    with pytest.raises(RecipeError, match="names 'reconstruct'"):
        make_recipe(pipeline=["analyse", "calibrate", "select", "compensate", "apply", "reconstruct", "verify"])
