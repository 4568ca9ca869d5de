"""Text for calibration and evaluation, as windows of token ids, and perplexity.

Calibration takes ``samples`` windows of ``seq_len`` tokens at random offsets of the tokenized file (seeded).
Perplexity uses the first ``windows`` non-overlapping windows from the start of the file:

    ppl = exp( sum_w sum_t -log p(x_t | x_<t) / sum_w (seq_len - 1) )

each window scored on its own (no context carried over), the protocol of the GRAIL, FLAP and Wanda evaluations.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from grailc.errors import CalibrationError


def check_text_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"no text file at {path}", fix="give --calib text:FILE.txt with an existing file")
    return path


def read_tokens(tokenizer, path) -> torch.Tensor:
    """The whole file as one 1-D tensor of token ids."""
    path = check_text_file(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids.to(torch.long)


def _too_short(path, tokens: int, need: int, what: str) -> CalibrationError:
    return CalibrationError(
        f"{path} has {tokens} tokens, fewer than one window of {need} for {what}",
        fix="use a longer text or a smaller --seq-len",
    )


def calibration_windows(tokens: torch.Tensor, samples: int, seq_len: int, seed: int = 0, path="the text"):
    """[samples, seq_len] ids from random offsets."""
    if tokens.numel() < seq_len:
        raise _too_short(path, tokens.numel(), seq_len, "calibration")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (samples,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seq_len: int, windows: int | None = None, path="the text") -> torch.Tensor:
    """[n, seq_len] non-overlapping windows from the start (all of them when ``windows`` is None)."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise _too_short(path, tokens.numel(), seq_len, "evaluation")
    n = n if windows is None else min(n, windows)
    return tokens[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over the windows; ``model(ids)`` returns logits or an HF
    output with ``.logits``."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        out = model(chunk)
        logits = getattr(out, "logits", out)[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += chunk[:, 1:].numel()
    return math.exp(total / count)
