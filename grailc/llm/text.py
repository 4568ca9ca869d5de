"""Text for calibration and evaluation, as windows of token ids, and perplexity.

Calibration reads one text file, every ``*.txt`` file of a folder, or the files a glob pattern matches (each file
a document, tokenized on its own), and takes ``samples`` windows of ``seq_len`` tokens, each drawn uniformly from
all the windows that lie inside one document (seeded; a window never spans two files, and documents shorter
than ``seq_len`` are skipped). With one file that is a random offset into it. Perplexity uses the first
``windows`` non-overlapping windows from the start of the file:

    ppl = exp( sum_w sum_t -log p(x_t | x_<t) / sum_w (seq_len - 1) )

each window scored on its own (no context carried over), the protocol of the GRAIL, FLAP and Wanda evaluations.
"""

from __future__ import annotations

import math
from glob import glob, has_magic
from pathlib import Path

import torch

from grailc.errors import CalibrationError


def check_text_file(path, flag: str = "--calib text:FILE.txt") -> Path:
    """``path`` as a Path, refused unless it is a file; ``flag``: how the user gives it, for the advice."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"no text file at {path}", fix=f"give {flag} with an existing file")
    return path


def check_window_counts(least: int = 1, **counts: int | None) -> None:
    """Refuse a window count or size that cannot work, before any model is loaded: each of ``counts`` (the flag
    name with ``_`` for ``-``, and its value; None: not given) must be at least ``least`` (2 for an evaluated
    window's tokens: a window of one token predicts nothing)."""
    for name, value in counts.items():
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise CalibrationError(f"{flag} {value} is not a positive number" if least == 1 else
                                   f"{flag} {value}: a window needs at least {least} tokens to be scored",
                                   fix=f"give {flag} N with N >= {least}")


def text_files(source) -> list[Path]:
    """The documents of a calibration source: a file, every ``*.txt`` file of a folder, or the files matching a
    glob pattern (sorted)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise CalibrationError(f"the folder {path} holds no .txt file",
                                   fix="give --calib text:FILE.txt, text:FOLDER with .txt files, or text:'PATTERN'")
        return files
    if not path.exists() and has_magic(str(source)):
        files = sorted(Path(p) for p in glob(str(source)) if Path(p).is_file())
        if not files:
            raise CalibrationError(f"no file matches {source}", fix="check the pattern (quote it for the shell)")
        return files
    return [check_text_file(path)]


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


def calibration_windows(tokens: torch.Tensor | list[torch.Tensor], samples: int, seq_len: int, seed: int = 0,
                        path="the text"):
    """[samples, seq_len] ids, each window drawn uniformly from the windows inside one document (``tokens``: one
    document's ids, or a list of documents)."""
    docs = [tokens] if isinstance(tokens, torch.Tensor) else list(tokens)
    starts_per_doc = torch.tensor([max(0, d.numel() - seq_len + 1) for d in docs])
    if int(starts_per_doc.sum()) == 0:
        longest = max((d.numel() for d in docs), default=0)
        where = path if len(docs) == 1 else f"the longest of the {len(docs)} documents of {path}"
        raise _too_short(where, longest, seq_len, "calibration")
    g = torch.Generator().manual_seed(seed)
    flat = torch.randint(0, int(starts_per_doc.sum()), (samples,), generator=g)
    ends = starts_per_doc.cumsum(0)
    which = torch.searchsorted(ends, flat, right=True)
    offsets = flat - (ends - starts_per_doc)[which]
    return torch.stack([docs[d][s : s + seq_len] for d, s in zip(which.tolist(), offsets.tolist())])


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
