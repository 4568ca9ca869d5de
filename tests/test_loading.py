"""Tests for grailc.loading: safe model loading and its error messages."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from grailc.errors import GrailcError, RecipeError, UntrustedFileError
from grailc.loading import LoadedModel, file_sha256, load_model


class WritesMarkerWhenUnpickled:
    """A payload that creates a file when unpickled, standing in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 5),
    )


def tiny_resnet18(num_classes: int = 1000) -> torch.nn.Module:
    torch.manual_seed(1)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=num_classes)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    assert "Traceback" not in text
    return text


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(WritesMarkerWhenUnpickled(marker), evil)

    with pytest.raises(UntrustedFileError) as error:
        load_model(str(evil))
    assert not marker.exists()
    text = one_line(error)
    assert str(evil) in text
    assert "--trust-pickle" in text and "arbitrary code" in text and ".pt2" in text

    torch.load(evil, weights_only=False)
    assert marker.exists(), "the payload must really run when unpickled, otherwise the test proves nothing"


def test_full_module_pickle_needs_trust(tmp_path):
    model = small_model().train()
    path = tmp_path / "model.pth"
    torch.save(model, path)

    with pytest.raises(UntrustedFileError) as error:
        load_model(str(path))
    assert "Sequential" in one_line(error)

    loaded = load_model(str(path), trust_pickle=True)
    assert isinstance(loaded, LoadedModel) and loaded.exported is None
    assert not loaded.module.training
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.module(x), model.eval()(x))
    assert str(path) in loaded.source


def test_trusted_pickle_that_is_not_a_module_is_rejected(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(GrailcError, match="not a torch.nn.Module"):
        load_model(str(path), trust_pickle=True)


def test_trusted_pickle_of_unimportable_class(tmp_path, monkeypatch):
    package = tmp_path / "src"
    package.mkdir()
    (package / "gone_model_module.py").write_text(
        "import torch\nclass Net(torch.nn.Linear):\n    pass\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(package))
    import gone_model_module

    path = tmp_path / "net.pt"
    torch.save(gone_model_module.Net(2, 2), path)
    monkeypatch.delitem(sys.modules, "gone_model_module")
    (package / "gone_model_module.py").unlink()

    with pytest.raises(GrailcError) as error:
        load_model(str(path), trust_pickle=True)
    text = one_line(error)
    assert "cannot be imported" in text and "gone_model_module" in text and str(path) in text


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_refused(tmp_path, recwarn):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    recwarn.clear()
    for trust in (False, True):
        with pytest.raises(GrailcError, match="TorchScript archive"):
            load_model(str(path), trust_pickle=trust)
    with pytest.raises(GrailcError, match="TorchScript archive"):
        load_model("torchvision:resnet18", weights=str(path))
    assert not [w for w in recwarn if "TorchScript" in str(w.message)]


def test_state_dict_file_asks_for_an_architecture(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(small_model().state_dict(), path)
    for trust in (False, True):
        with pytest.raises(GrailcError) as error:
            load_model(str(path), trust_pickle=trust)
        assert not isinstance(error.value, UntrustedFileError)
        text = one_line(error)
        assert "no architecture" in text and "torchvision:NAME --weights" in text and str(path) in text


def test_pt2_round_trip(tmp_path):
    model = small_model().eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))

    loaded = load_model(str(path))
    assert loaded.module is None and isinstance(loaded.exported, torch.export.ExportedProgram)
    torch.testing.assert_close(loaded.exported.module()(x), model(x))
    assert "torch.export" in loaded.source


def test_corrupt_pt2_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "bad.pt2"
    path.write_bytes(b"not a zip archive" * 20)
    with pytest.raises(GrailcError) as error:
        load_model(str(path))
    text = one_line(error)
    assert str(path) in text and "corrupt" in text
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out


def test_truncated_pt2(tmp_path):
    model = small_model().eval()
    full = tmp_path / "full.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), str(full))
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(GrailcError, match="corrupt"):
        load_model(str(cut))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_torchvision_with_weights_matches_source_model(tmp_path, suffix):
    source = tiny_resnet18()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"epoch": 3, "state_dict": source.state_dict()}, path)

    loaded = load_model("torchvision:resnet18", weights=str(path))
    assert loaded.exported is None and not loaded.module.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), source(x), rtol=0, atol=0)
    assert loaded.source == f"torchvision:resnet18 + weights {path}"


def test_weights_under_model_key_and_dataparallel_prefix(tmp_path):
    source = tiny_resnet18()
    model_key = tmp_path / "a.pt"
    torch.save({"model": source.state_dict()}, model_key)
    prefixed = tmp_path / "b.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, prefixed)

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = source(x)
        for path in (model_key, prefixed):
            loaded = load_model("torchvision:resnet18", weights=str(path))
            torch.testing.assert_close(loaded.module(x), expected, rtol=0, atol=0)


def test_weights_mismatch_lists_keys_and_shapes(tmp_path):
    path = tmp_path / "ten_classes.safetensors"
    save_file(tiny_resnet18(num_classes=10).state_dict(), str(path))
    with pytest.raises(GrailcError) as error:
        load_model("torchvision:resnet18", weights=str(path))
    text = one_line(error)
    assert "fc.weight [10, 512] vs model [1000, 512]" in text and str(path) in text

    other = tmp_path / "other.pth"
    torch.save(small_model().state_dict(), other)
    with pytest.raises(GrailcError) as error:
        load_model("torchvision:resnet18", weights=str(other))
    text = one_line(error)
    assert "missing keys conv1.weight" in text and "unexpected keys 0.weight" in text and "more" in text


def test_weights_file_with_pickled_class_is_untrusted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "w.pth"
    torch.save({"state_dict": WritesMarkerWhenUnpickled(marker)}, path)
    with pytest.raises(UntrustedFileError):
        load_model("torchvision:resnet18", weights=str(path))
    assert not marker.exists()


def test_corrupt_weights_files(tmp_path):
    bad_safetensors = tmp_path / "w.safetensors"
    bad_safetensors.write_bytes(b"\x00" * 64)
    bad_pth = tmp_path / "w.pth"
    bad_pth.write_bytes(b"garbage" * 10)
    for path in (bad_safetensors, bad_pth):
        with pytest.raises(GrailcError) as error:
            load_model("torchvision:resnet18", weights=str(path))
        assert str(path) in one_line(error)
    with pytest.raises(GrailcError, match="weights file not found"):
        load_model("torchvision:resnet18", weights=str(tmp_path / "missing.safetensors"))


def test_torchvision_typo_suggests_name():
    with pytest.raises(RecipeError) as error:
        load_model("torchvision:resnet81")
    assert "did you mean 'resnet18'" in one_line(error)


def test_timm_model_and_typo():
    loaded = load_model("timm:resnet18")
    assert loaded.module is not None and not loaded.module.training
    assert "timm:resnet18" in loaded.source
    with pytest.raises(RecipeError) as error:
        load_model("timm:resnt18")
    assert "did you mean 'resnet18'" in one_line(error)


def test_weights_flag_rejected_for_files(tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"x")
    with pytest.raises(RecipeError, match="--weights only applies"):
        load_model(str(path), weights="w.safetensors")


@pytest.mark.parametrize("trust", [False, True])
def test_missing_empty_directory_and_corrupt_files(tmp_path, trust):
    missing = tmp_path / "missing.pt"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    saved = tmp_path / "saved.pt"
    torch.save(small_model(), saved)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])

    expected = {
        missing: "not found",
        empty: "empty",
        folder: "folder",
        garbage: "corrupt",
        truncated: "corrupt",
    }
    for path, words in expected.items():
        with pytest.raises(GrailcError) as error:
            load_model(str(path), trust_pickle=trust)
        assert not isinstance(error.value, UntrustedFileError)
        text = one_line(error)
        assert words in text and str(path) in text, text


def test_file_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9000
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(GrailcError, match="cannot read"):
        file_sha256(tmp_path / "missing.bin")
