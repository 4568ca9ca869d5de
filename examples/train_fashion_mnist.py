"""Train FashionResNet on Fashion-MNIST and write grailc/data/fashion_resnet.safetensors.

Usage: python examples/train_fashion_mnist.py [--epochs 3] [--threads N] [--widths 16,32,64,128] [--seed 0]
       [--out grailc/data/fashion_resnet.safetensors]

Other widths, seeds and outputs train the other networks the README measures on (e.g. ``--widths 12,24,48,96
--epochs 2 --seed 1 --out narrow.safetensors``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grailc.fashion_mnist import accuracy, load_fashion_mnist, to_inputs  # noqa: E402
from grailc.models.fashion_resnet import CHECKPOINT, FashionResNet  # noqa: E402

SEED = 0
BATCH_SIZE = 128
MAX_LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CROP_PADDING = 2


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random 28x28 crop of the zero-padded uint8 images ``[B, 28, 28]``."""
    count, height, width = images.shape
    flip = torch.rand(count, generator=generator) < 0.5
    images = torch.where(flip[:, None, None], images.flip(-1), images)
    padded = F.pad(images, (CROP_PADDING,) * 4)
    shift_rows = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator)
    shift_cols = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator)
    rows = shift_rows[:, None] + torch.arange(height)
    cols = shift_cols[:, None] + torch.arange(width)
    return padded[torch.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]


def save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Write the state dict (floating tensors as float32) atomically to ``path``."""
    from safetensors.torch import save_file

    tensors = {
        name: (tensor.to(torch.float32) if tensor.is_floating_point() else tensor).contiguous()
        for name, tensor in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    save_file(tensors, str(partial))
    os.replace(partial, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--widths", default="16,32,64,128", help="the four stage widths")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")

    model = FashionResNet(widths=tuple(int(w) for w in args.widths.split(",")))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=MAX_LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    steps_per_epoch = (len(train_images) + BATCH_SIZE - 1) // BATCH_SIZE
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=MAX_LR, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )

    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            inputs = to_inputs(augment(train_images[batch], generator))
            loss = F.cross_entropy(model(inputs), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch)
        test_accuracy = accuracy(model, test_images, test_labels)
        print(
            f"epoch {epoch}/{args.epochs}: loss {total_loss / len(order):.4f}, "
            f"test accuracy {test_accuracy:.4f}, {time.perf_counter() - epoch_started:.0f} s",
            flush=True,
        )

    save_checkpoint(model.eval(), args.out)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB), "
        f"test accuracy {test_accuracy:.4f}, total {time.perf_counter() - started:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
