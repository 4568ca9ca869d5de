"""The real trained model: at ratio 0.5, GRAIL must beat plain pruning on held-out Fashion-MNIST test accuracy."""

from __future__ import annotations

import pytest

import grailc
from grailc.demo import calibration_batches
from grailc.fashion_mnist import accuracy, load_fashion_mnist
from grailc.models.fashion_resnet import load_pretrained

TEST_IMAGES = 2000


@pytest.fixture(scope="module")
def setup():
    model = load_pretrained()
    images, labels = load_fashion_mnist("test")
    return model, images[:TEST_IMAGES], labels[:TEST_IMAGES], calibration_batches()


def compressed_accuracy(setup, **options):
    model, images, labels, batches = setup
    result = grailc.compress(model, calib=batches, ratio=0.5, calib_held_out=2, **options)
    return accuracy(result.module, images, labels), result


def test_grail_beats_plain_pruning_on_test_accuracy(setup):
    model, images, labels, _ = setup
    dense = accuracy(model, images, labels)
    plain, _ = compressed_accuracy(setup, compensate="none")
    grail, result = compressed_accuracy(setup, compensate="grail")
    assert dense > 0.88
    assert grail > plain + 0.3, (dense, plain, grail)
    assert result.report["params_after"] < 0.3 * result.report["params_before"]


def test_sequential_calibration_improves_on_one_shot(setup):
    one_shot, _ = compressed_accuracy(setup, selector="wanda", sequential=False)
    sequential, result = compressed_accuracy(setup, selector="wanda")  # the default
    assert sequential > one_shot, (one_shot, sequential)
    assert result.report["verification"]["permutation_error"] <= 1e-5


def test_magnitude_selector_with_grail_beats_it_without(setup):
    plain, _ = compressed_accuracy(setup, selector="magnitude", compensate="none")
    grail, _ = compressed_accuracy(setup, selector="magnitude")
    assert grail > plain + 0.2, (plain, grail)


def test_kernel_taps_beat_one_map_for_all_taps(setup):
    """Solved over (channel, tap) pairs, every 3x3 consumer rebuilds a removed channel from the kept ones at all
    nine pixels it reads: closer to the dense model and more accurate than one channel map for all taps."""
    channels, by_channels = compressed_accuracy(setup, kernel_solve="channels")
    taps, by_taps = compressed_accuracy(setup)  # the default
    assert by_taps.report["recipe"]["kernel_solve"] == "taps" and len(by_taps.report["kernel_taps"]) == 16
    assert by_taps.report["output_error"]["relative_l2"] < 0.95 * by_channels.report["output_error"]["relative_l2"]
    assert taps > channels, (channels, taps)
