"""``grailc demo``: compress the embedded Fashion-MNIST ResNet and measure what it costs in test accuracy.

Calibration uses unlabeled training images; the labels of the test set are used only to report accuracy of the
dense model, plain pruning, one-shot GRAIL and GRAIL (sequential, the default) side by side.
"""

from __future__ import annotations

import time

from grailc.api import compress
from grailc.fashion_mnist import accuracy, load_fashion_mnist, to_inputs
from grailc.models.fashion_resnet import load_pretrained
from grailc.outputs import check_output_folder
from grailc.report import summary

CALIB_IMAGES = 640
BATCH = 64
HELD_OUT = 2


def calibration_batches(count: int = CALIB_IMAGES, batch: int = BATCH):
    images, _ = load_fashion_mnist("train")
    return list(to_inputs(images[:count]).split(batch))


def run_demo(args) -> int:
    start = time.perf_counter()
    check_output_folder(args.out, args.force)  # before a minute of work, not after
    model = load_pretrained()
    batches = calibration_batches()
    test_images, test_labels = load_fashion_mnist("test")
    common = dict(input_shape=[1, 1, 28, 28], calib=batches, ratio=args.ratio, selector=args.selector,
                  calib_held_out=HELD_OUT)
    grail = compress(model, progress=True, **common)  # the default: sequential
    plain = compress(model, compensate="none", sequential=False, **common)  # the baseline: scored on the dense model
    one_shot = compress(model, sequential=False, **common)
    acc = {
        "dense": accuracy(model, test_images, test_labels),
        "plain": accuracy(plain.module, test_images, test_labels),
        "grail_one_shot": accuracy(one_shot.module, test_images, test_labels),
        "grail": accuracy(grail.module, test_images, test_labels),
        "test_images": int(len(test_labels)),
    }
    grail.report["accuracy"] = acc
    grail.report["command"] = f"grailc demo --ratio {args.ratio} --selector {args.selector}"
    out = grail.save(args.out, force=args.force)
    print(summary(grail.report))
    how = {name: f"{r.report['recipe']['selector']}, {r.report['recipe']['compensate']}"
           for name, r in (("plain", plain), ("one_shot", one_shot), ("grail", grail))}
    print(f"Fashion-MNIST test accuracy at ratio {args.ratio}: dense {100 * acc['dense']:.2f}%, "
          f"plain pruning ({how['plain']}) {100 * acc['plain']:.2f}%, GRAIL --one-shot ({how['one_shot']}) "
          f"{100 * acc['grail_one_shot']:.2f}%, GRAIL ({how['grail']}; sequential, the default; the model written) "
          f"{100 * acc['grail']:.2f}%")
    print(f"wrote {out}/: model.pt2, model.onnx, report.json ({time.perf_counter() - start:.1f} s)")
    return 0
