"""Tests for grailc.calib_data: image folders, tensor files, random data and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from grailc.calib_data import IMAGENET_MEAN, IMAGENET_STD, CalibrationData, load_calibration
from grailc.errors import CalibrationError

RGB_SHAPE = (1, 3, 32, 32)


def write_image(path, size=(40, 30), colour=(255, 0, 128), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_random_is_seeded_and_shaped():
    first = load_calibration("random", RGB_SHAPE, num_batches=3, batch_size=2, seed=7)
    again = load_calibration("random", RGB_SHAPE, num_batches=3, batch_size=2, seed=7)
    other = load_calibration("random", RGB_SHAPE, num_batches=3, batch_size=2, seed=8)
    assert isinstance(first, CalibrationData) and first.data_free and "random" in first.source
    assert len(first.batches) == 3
    for batch in first.batches:
        assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    for a, b in zip(first.batches, again.batches, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.batches[0], other.batches[0])
    assert not torch.equal(first.batches[0], first.batches[1])


def test_constant_image_is_normalised_with_imagenet_stats(tmp_path):
    write_image(tmp_path / "img.png", colour=(255, 0, 128))
    data = load_calibration(str(tmp_path), RGB_SHAPE, num_batches=1, batch_size=4)
    assert not data.data_free
    assert len(data.batches) == 1 and data.batches[0].shape == (1, 3, 32, 32)
    assert data.batches[0].dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(
            data.batches[0][0, channel], torch.full((32, 32), value), rtol=0, atol=1e-5
        )
    assert data.source == f"images: {tmp_path} (1 files)"


def test_custom_stats_and_no_normalisation(tmp_path):
    write_image(tmp_path / "img.png", colour=(51, 102, 204))
    custom = load_calibration(
        str(tmp_path), RGB_SHAPE, num_batches=1, batch_size=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 2.0)
    )
    plain = load_calibration(str(tmp_path), RGB_SHAPE, num_batches=1, batch_size=1, normalize=False)
    assert torch.allclose(
        custom.batches[0][0, :, 0, 0], torch.tensor([(0.2 - 0.5) / 0.5, (0.4 - 0.5) / 0.25, 0.15])
    )
    assert torch.allclose(plain.batches[0][0, :, 0, 0], torch.tensor([0.2, 0.4, 0.8]))


def test_grayscale_is_not_normalised_without_stats(tmp_path):
    write_image(tmp_path / "g.png", colour=102, mode="L")
    shape = (1, 1, 16, 24)
    plain = load_calibration(str(tmp_path), shape, num_batches=1, batch_size=1)
    assert plain.batches[0].shape == (1, 1, 16, 24)
    assert torch.allclose(plain.batches[0], torch.full((1, 1, 16, 24), 0.4))
    given = load_calibration(str(tmp_path), shape, num_batches=1, batch_size=1, mean=[0.5], std=[0.1])
    assert torch.allclose(given.batches[0], torch.full((1, 1, 16, 24), -1.0), atol=1e-5)


def test_rgb_image_converted_for_grayscale_model_and_rgba_for_rgb(tmp_path):
    write_image(tmp_path / "a.png", colour=(255, 255, 255, 0), mode="RGBA")
    gray = load_calibration(str(tmp_path), (1, 1, 8, 8), num_batches=1, batch_size=1)
    rgb = load_calibration(str(tmp_path), (1, 3, 8, 8), num_batches=1, batch_size=1, normalize=False)
    assert gray.batches[0].shape == (1, 1, 8, 8) and rgb.batches[0].shape == (1, 3, 8, 8)
    assert torch.allclose(rgb.batches[0], torch.ones(1, 3, 8, 8))


def test_resize_then_center_crop_drops_the_edges(tmp_path):
    image = Image.new("L", (200, 50), 0)
    image.paste(255, (0, 0, 50, 50))
    image.save(tmp_path / "wide.png")
    data = load_calibration(str(tmp_path), (1, 1, 32, 32), num_batches=1, batch_size=1)
    assert data.batches[0].shape == (1, 1, 32, 32)
    assert float(data.batches[0].max()) < 0.01, "a squashing resize would keep the white left edge"


def test_recursive_sorted_limited_and_batched(tmp_path):
    write_image(tmp_path / "b.png", colour=(20, 20, 20))
    write_image(tmp_path / "a.png", colour=(10, 10, 10))
    write_image(tmp_path / "sub" / "c.jpg", colour=(30, 30, 30))
    write_image(tmp_path / "sub" / "deeper" / "d.bmp", colour=(40, 40, 40))
    write_image(tmp_path / "e.PNG", colour=(50, 50, 50))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._a.png").write_bytes(b"AppleDouble junk")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "bad.png").write_bytes(b"junk")

    data = load_calibration(str(tmp_path), (1, 3, 8, 8), num_batches=2, batch_size=2, normalize=False)
    assert [b.shape[0] for b in data.batches] == [2, 2]
    firsts = [round(float(b[i, 0, 0, 0]) * 255) for b in data.batches for i in range(b.shape[0])]
    assert firsts == [10, 20, 50, 30]
    assert data.source == f"images: {tmp_path} (4 of 5 files)"

    data = load_calibration(str(tmp_path), (1, 3, 8, 8), num_batches=3, batch_size=2, normalize=False)
    assert [b.shape[0] for b in data.batches] == [2, 2, 1]


def test_corrupt_and_truncated_images_are_named(tmp_path):
    good = write_image(tmp_path / "a.png")
    bad = tmp_path / "b.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(CalibrationError) as error:
        load_calibration(str(tmp_path), RGB_SHAPE, num_batches=1, batch_size=4)
    text = one_line(error)
    assert str(bad) in text and "remove" in text

    bad.unlink()
    truncated = tmp_path / "c.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(CalibrationError) as error:
        load_calibration(str(tmp_path), RGB_SHAPE, num_batches=1, batch_size=4)
    assert str(truncated) in one_line(error)


def test_zero_byte_image_is_named(tmp_path):
    write_image(tmp_path / "a.png")
    empty = tmp_path / "b.jpg"
    empty.write_bytes(b"")
    with pytest.raises(CalibrationError) as error:
        load_calibration(str(tmp_path), RGB_SHAPE, num_batches=1, batch_size=2)
    text = one_line(error)
    assert "empty" in text and str(empty) in text and "remove" in text


def test_empty_folder_and_folder_without_images(tmp_path):
    with pytest.raises(CalibrationError, match="no image files"):
        load_calibration(str(tmp_path), RGB_SHAPE, num_batches=1, batch_size=1)
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CalibrationError, match="no image files") as error:
        load_calibration(str(tmp_path), RGB_SHAPE, num_batches=1, batch_size=1)
    assert str(tmp_path) in one_line(error)


def test_image_folder_needs_image_like_input(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(CalibrationError, match="4 channels|has 4"):
        load_calibration(str(tmp_path), (1, 4, 8, 8), num_batches=1, batch_size=1)
    with pytest.raises(CalibrationError, match="4-d input"):
        load_calibration(str(tmp_path), (1, 16), num_batches=1, batch_size=1)
    with pytest.raises(CalibrationError, match="mean needs 3"):
        load_calibration(
            str(tmp_path), RGB_SHAPE, num_batches=1, batch_size=1, mean=(0.5, 0.5), std=(1, 1, 1)
        )


def test_npy_inputs_are_cast_and_chunked_without_normalisation(tmp_path):
    array = np.arange(5 * 3 * 4 * 4, dtype=np.float64).reshape(5, 3, 4, 4)
    path = tmp_path / "inputs.npy"
    np.save(path, array)
    data = load_calibration(str(path), (1, 3, 4, 4), num_batches=2, batch_size=2)
    assert [b.shape for b in data.batches] == [(2, 3, 4, 4), (2, 3, 4, 4)]
    assert all(b.dtype == torch.float32 for b in data.batches)
    torch.testing.assert_close(torch.cat(data.batches), torch.from_numpy(array[:4]).float())
    assert data.source == f"tensor: {path} (4 samples)" and not data.data_free

    data = load_calibration(str(path), (1, 3, 4, 4), num_batches=10, batch_size=2)
    assert [b.shape[0] for b in data.batches] == [2, 2, 1]


def test_pt_tensor_file_and_non_tensor_pt(tmp_path):
    tensor = torch.randn(3, 10)
    path = tmp_path / "x.pt"
    torch.save(tensor, path)
    data = load_calibration(str(path), (8, 10), num_batches=1, batch_size=8)
    assert torch.equal(data.batches[0], tensor)

    holder = tmp_path / "dict.pth"
    torch.save({"x": tensor, "note": "not a tensor"}, holder)
    with pytest.raises(CalibrationError, match="holds a dict of str, expected a tensor, or a tuple, list or dict"):
        load_calibration(str(holder), (8, 10), num_batches=1, batch_size=8)


def test_pt_file_with_one_tensor_per_input(tmp_path):
    x, ids = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randint(0, 9, (5, 6))
    path = tmp_path / "inputs.pt"
    torch.save((x, ids), path)
    data = load_calibration(str(path), [(1, 3, 4, 4), (1, 6)], num_batches=2, batch_size=2)
    assert [[tuple(t.shape) for t in b] for b in data.batches] == [[(2, 3, 4, 4), (2, 6)]] * 2
    assert [t.dtype for t in data.batches[0]] == [torch.float32, torch.int64]  # integer inputs keep their type
    torch.testing.assert_close(torch.cat([b[1] for b in data.batches]), ids[:4])
    assert data.source == f"tensor: {path} (4 samples)"

    torch.save({"mask": ids, "x": x}, path)  # a dict is ordered by the model's input names
    data = load_calibration(str(path), [(1, 3, 4, 4), (1, 6)], num_batches=1, batch_size=5, names=["x", "mask"])
    assert torch.equal(data.batches[0][1], ids)


def test_pt_file_inputs_that_do_not_fit_are_named(tmp_path):
    path = tmp_path / "inputs.pt"
    shapes = [(1, 3, 4, 4), (1, 6)]
    torch.save((torch.randn(5, 3, 4, 4), torch.randint(0, 9, (4, 6))), path)
    with pytest.raises(CalibrationError, match=r"different numbers of samples per input \(x 5, mask 4\)"):
        load_calibration(str(path), shapes, num_batches=1, batch_size=2, names=["x", "mask"])
    torch.save((torch.randn(5, 3, 4, 4), torch.randint(0, 9, (5, 7))), path)
    with pytest.raises(CalibrationError, match=r"for input mask has shape \[5, 7\], expected \[N, 6\]"):
        load_calibration(str(path), shapes, num_batches=1, batch_size=2, names=["x", "mask"])
    with pytest.raises(CalibrationError, match=r"holds 2 tensor\(s\), but the model takes 1 input\(s\) \(x\)"):
        load_calibration(str(path), (1, 3, 4, 4), num_batches=1, batch_size=2, names=["x"])
    torch.save({"x": torch.randn(5, 3, 4, 4), "m": torch.ones(5, 6)}, path)
    with pytest.raises(CalibrationError, match=r"keys \(x, m\), but the model's inputs are \(x, mask\)"):
        load_calibration(str(path), shapes, num_batches=1, batch_size=2, names=["x", "mask"])
    with pytest.raises(CalibrationError, match="an image folder gives one input, but the model takes 2"):
        load_calibration(str(tmp_path), shapes, num_batches=1, batch_size=2)


def test_random_data_for_two_inputs_shares_the_batch_size():
    data = load_calibration("random", [(1, 3, 4, 4), (1, 1)], num_batches=2, batch_size=3)
    assert [[tuple(t.shape) for t in b] for b in data.batches] == [[(3, 3, 4, 4), (3, 1)]] * 2


class WritesMarkerWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_in_pt_file_are_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "inputs.pt"
    torch.save(WritesMarkerWhenUnpickled(marker), path)
    with pytest.raises(CalibrationError, match="pickled Python objects") as error:
        load_calibration(str(path), (1, 2), num_batches=1, batch_size=1)
    assert str(path) in one_line(error)
    assert not marker.exists()


def test_wrong_shape_states_both_shapes(tmp_path):
    path = tmp_path / "nhwc.npy"
    np.save(path, np.zeros((4, 32, 32, 3), dtype=np.float32))
    with pytest.raises(CalibrationError) as error:
        load_calibration(str(path), RGB_SHAPE, num_batches=1, batch_size=1)
    text = one_line(error)
    assert "[4, 32, 32, 3]" in text and "[N, 3, 32, 32]" in text and str(path) in text


def test_nan_and_inf_report_count_and_first_sample(tmp_path):
    array = np.zeros((6, 2, 3), dtype=np.float32)
    array[3, 0, 1] = np.nan
    array[3, 1, 2] = np.nan
    array[5, 0, 0] = np.inf
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(CalibrationError) as error:
        load_calibration(str(path), (1, 2, 3), num_batches=3, batch_size=2)
    text = one_line(error)
    assert "3 NaN/Inf" in text and "sample 3" in text and str(path) in text

    with pytest.raises(CalibrationError, match="1 NaN/Inf.*sample 0"):
        overflow = tmp_path / "overflow.npy"
        np.save(overflow, np.array([[1e300, 0.0]]))
        load_calibration(str(overflow), (1, 2), num_batches=1, batch_size=1)

    clean_prefix = load_calibration(str(path), (1, 2, 3), num_batches=1, batch_size=3)
    assert clean_prefix.batches[0].shape == (3, 2, 3)


def test_corrupt_and_pickled_npy(tmp_path):
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"\x93NUMPY garbage")
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for path in (corrupt, pickled):
        with pytest.raises(CalibrationError) as error:
            load_calibration(str(path), (1, 1), num_batches=1, batch_size=1)
        assert str(path) in one_line(error)


def test_missing_source_lists_accepted_forms(tmp_path):
    with pytest.raises(CalibrationError) as error:
        load_calibration(str(tmp_path / "nope"), RGB_SHAPE, num_batches=1, batch_size=1)
    text = one_line(error)
    assert "'random'" in text and "folder of images" in text and ".npy" in text
    other = tmp_path / "inputs.csv"
    other.write_text("1,2")
    with pytest.raises(CalibrationError, match="unsupported calibration file type '.csv'"):
        load_calibration(str(other), RGB_SHAPE, num_batches=1, batch_size=1)


@pytest.mark.parametrize(
    "shape, num_batches, batch_size",
    [
        (RGB_SHAPE, 0, 1),
        (RGB_SHAPE, 1, 0),
        (RGB_SHAPE, 1.5, 1),
        (RGB_SHAPE, True, 1),
        ((1, 0, 4), 1, 1),
        ((), 1, 1),
    ],
)
def test_sizes_are_validated(shape, num_batches, batch_size):
    with pytest.raises(CalibrationError):
        load_calibration("random", shape, num_batches=num_batches, batch_size=batch_size)
