"""Transformers end to end: attention heads as groups (fused qkv, grouped-query attention), LayerNorm streams as
approximate groups, channels-last blocks, and a self-check that catches a carrier the analysis missed."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from grailc.passes.verify import permutation_error
from graph_checks import group_of, traced
from torch import nn

import grailc
from grailc.fashion_mnist import accuracy, load_fashion_mnist, to_inputs
from grailc.models.fashion_vit import load_fashion_vit

TEST_IMAGES = 2000


@pytest.fixture(scope="module")
def fashion():
    images, labels = load_fashion_mnist("test")
    train, _ = load_fashion_mnist("train")
    calib = to_inputs(train[:160]).split(32)  # 128 unlabeled images to fit, 32 held out
    return load_fashion_vit(), images[:TEST_IMAGES], labels[:TEST_IMAGES], list(calib)


def test_vit_heads_and_mlp_grail_beats_plain_pruning(fashion):
    model, images, labels, calib = fashion
    dense = accuracy(model, images, labels)
    runs = {c: grailc.compress(model, calib=calib, ratio=0.5, calib_held_out=1, compensate=c)
            for c in ("grail", "none")}
    acc = {c: accuracy(r.module, images, labels) for c, r in runs.items()}
    report = runs["grail"].report
    heads = [g for g in report["groups"] if g["kind"] == "heads"]
    assert len(heads) == 4 and all(g["size"] == 4 and g["kept"] == 2 and g["granule"] == 24 for g in heads)
    assert report["verification"]["permutation_error"] <= 1e-5
    assert report["params_after"] < 0.75 * report["params_before"]
    assert acc["grail"] > acc["none"] + 0.05, (dense, acc)
    assert acc["grail"] > 0.5 * dense


def test_vit_embedding_width_is_approximate_and_pruned_only_when_asked(fashion, tmp_path):
    model, _, _, calib = fashion
    default = grailc.compress(model, calib=calib, ratio=0.3, calib_held_out=1).report
    embed = [g for g in default["groups"] if g["approximate"]]
    assert len(embed) == 1 and embed[0]["pinned"].startswith("not a target") and embed[0]["kept"] == embed[0]["size"]
    result = grailc.compress(model, calib=calib, ratio=0.3, calib_held_out=1, targets=["embed", "heads", "mlp"])
    embed = next(g for g in result.report["groups"] if g["approximate"])
    assert embed["pinned"] is None and embed["kept"] == 64  # round(96 * 0.7) = 67, to a multiple of 8 (auto)
    # the class token, position embedding, LayerNorm weights and shapes all follow: the narrowed model exports
    out = result.save(tmp_path / "out")
    assert result.report["onnx"]["relative_diff"] < 1e-3
    reloaded = torch.export.load(str(out / "model.pt2")).module()
    x = calib[0][:3]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.module(x), atol=1e-5, rtol=1e-4)


class TinyLM(nn.Module):
    """A LLaMA-architecture decoder (rotary, RMSNorm, SwiGLU, 4 query / 2 key-value heads) returning logits."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        self.lm = LlamaForCausalLM(config).eval()

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def test_grouped_query_attention_keeps_query_heads_with_their_key_value_head(tmp_path):
    model = TinyLM()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(4)]
    result = grailc.compress(model, calib=ids, ratio=0.5, calib_held_out=1)
    report = result.report
    heads = [g for g in report["groups"] if g["kind"] == "heads"]
    # a unit is one key-value head with its two query heads: 2 units of 2 x 16 channels at o_proj
    assert len(heads) == 2 and all((g["size"], g["kept"], g["granule"]) == (2, 1, 32) for g in heads)
    mlp = [g for g in report["groups"] if set(g["producers"]) == {"lm.model.layers.0.mlp.gate_proj",
                                                                  "lm.model.layers.0.mlp.up_proj"}]
    assert mlp and mlp[0]["kept"] == 48
    assert report["verification"]["permutation_error"] <= 1e-5
    layer = result.module.get_submodule("lm.model.layers.0.self_attn")
    assert layer.q_proj.weight.shape == (32, 64) and layer.k_proj.weight.shape == (16, 64)
    assert layer.o_proj.weight.shape == (64, 32)
    result.save(tmp_path / "out")
    assert report["onnx"]["relative_diff"] < 1e-3


def test_convnext_channels_last_blocks_prune():
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(3)]
    report = grailc.compress(model, calib=batches, ratio=0.3, calib_held_out=1, targets=["mlp", "embed"]).report
    pruned = [g for g in report["groups"] if g["kept"] < g["size"]]
    assert len(pruned) >= 16  # 12 MLP hidden widths (fc1 -> GELU -> fc2) and the 4 stage streams
    assert sum(bool(g["approximate"]) for g in pruned) == 4
    assert report["verification"]["permutation_error"] <= 1e-5
    assert report["params_after"] < 0.7 * report["params_before"]


class BatchNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv_out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv_out(torch.relu(self.bn(self.conv_in(x))))


def test_permutation_check_catches_a_missed_carrier():
    gm, deps = traced(BatchNormed(), (1, 3, 8, 8))
    x = [(torch.randn(2, 3, 8, 8),)]
    assert permutation_error(gm, deps, x) <= 1e-5
    missed = copy.deepcopy(deps)
    missed.carriers = [c for c in missed.carriers if c.module != "bn"]  # as if the analysis had not seen it
    group_of(missed, "conv_in")
    assert permutation_error(gm, missed, x) > 1e-2


def test_torchvision_vit_multihead_attention_prunes_heads(tmp_path):
    """nn.MultiheadAttention views [T, B, H*D] as [T, B*H, D]: the heads travel inside the batch axis and back."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: outputs would all be 0
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(4)]
    result = grailc.compress(model, calib=batches, ratio=0.5, calib_held_out=1)
    heads = [g for g in result.report["groups"] if g["kind"] == "heads"]
    assert len(heads) == 2 and all((g["size"], g["kept"], g["granule"]) == (4, 2, 8) for g in heads)
    assert result.report["verification"]["permutation_error"] <= 1e-5
    attention = result.module.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert attention.in_proj_weight.shape == (3 * 16, 32) and attention.out_proj.weight.shape == (32, 16)
    result.save(tmp_path / "out")
    assert result.report["onnx"]["relative_diff"] < 1e-3


class SeparateQKV(nn.Module):
    """A pre-norm transformer block with separate q/k/v projections (as in Hugging Face encoders)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Linear(8, dim)
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x)
        b, t, c = x.shape
        h = self.norm(x)
        q, k = (p(h).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k))
        v = self.v(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, c))
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def test_value_dims_inside_heads_prune_through_the_cli(tmp_path, capsys):
    """--targets vdims: the same value dims go from every head (v rows, o columns, the view's head_dim); q and k
    keep every head; GRAIL compensates each head's columns of o; the narrowed model exports and matches."""
    from grailc.cli import main

    torch.manual_seed(0)
    model_path = tmp_path / "attn.pt2"
    torch.export.save(torch.export.export(SeparateQKV().eval(), (torch.randn(2, 10, 8),)), str(model_path))
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--input-shape", "2,10,8", "--calib-batches", "4", "--ratio", "0.5",
                 "--targets", "mlp,vdims", "--one-shot", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    vdims = [g for g in report["groups"] if g["kind"] == "value_dims"]
    assert len(vdims) == 1 and (vdims[0]["size"], vdims[0]["kept"]) == (8, 4) and vdims[0]["pinned"] is None
    assert vdims[0]["recon_error_grail"] < vdims[0]["recon_error_plain"]
    heads = [g for g in report["groups"] if g["kind"] == "heads"]
    assert len(heads) == 1 and "value dims are pruned" in heads[0]["pinned"]
    assert report["verification"]["permutation_error"] <= 1e-5 and report["onnx"]["max_abs_diff"] < 1e-3
    narrowed = torch.export.load(str(out / "model.pt2")).module()
    params = dict(narrowed.named_parameters())
    assert params["v.weight"].shape == (16, 32) and params["o.weight"].shape == (32, 16)
    assert params["q.weight"].shape == (32, 32) and params["k.weight"].shape == (32, 32)
    assert narrowed(torch.randn(2, 10, 8)).shape == (2, 5)

    assert main(["groups", str(model_path), "--input-shape", "2,10,8", "--targets", "vdims"]) == 0
    assert "value_dims" in capsys.readouterr().out


def test_value_dims_of_a_fused_projection_are_pinned_with_the_reason(fashion):
    model, _, _, calib = fashion
    report = grailc.compress(model, calib=calib[:2], ratio=0.3, calib_held_out=1, targets=["mlp", "vdims"],
                             sequential=False).report
    heads = [g for g in report["groups"] if g["kind"] == "heads"]
    assert len(heads) == 4 and all("value projection of its own" in g["pinned"] for g in heads)
    with pytest.raises(grailc.errors.RecipeError, match="exclude each other"):
        grailc.compress(model, calib=calib[:2], targets=["heads", "vdims"])
