"""minisd.data.images: uint8 pixels <-> the model's [-1, 1] floats, SD's scaling, in one place."""

import numpy as np
import pytest

from minisd.data.images import to_model_input, to_uint8


def test_every_pixel_value_maps_as_2p_over_255_minus_1_and_back():
    p = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    x = to_model_input(p)
    assert x.shape == (1, 3, 16, 16) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = 2.0 * np.arange(256, dtype=np.float64).reshape(16, 16) / 255.0 - 1.0
    np.testing.assert_allclose(x[0, 1], expected, rtol=0, atol=1.2e-7)
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(to_uint8(x), p)  # exact round trip for every value


def test_single_image_and_rounding_and_clipping():
    x = np.array([-2.0, -1.0, -0.999, 0.0, 0.5, 1.0, 3.0], np.float32).reshape(1, 1, 7).repeat(3, axis=0)
    out = to_uint8(x)  # (3, 1, 7) -> (1, 7, 3)
    assert out.shape == (1, 7, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255]  # round(127.5 (x + 1)), clipped
    hwc = np.zeros((5, 4, 3), np.uint8)
    assert to_model_input(hwc).shape == (3, 5, 4)


def test_matches_diffusers_image_processor():
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (the parity extra)")
    import torch

    processor = diffusers.image_processor.VaeImageProcessor(do_resize=False)
    rng = np.random.default_rng(0)
    p = rng.integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    theirs = processor.preprocess(torch.from_numpy(p.astype(np.float32) / 255.0).permute(0, 3, 1, 2)).numpy()
    assert np.array_equal(to_model_input(p), theirs)
    x = rng.uniform(-1.2, 1.2, (2, 3, 8, 6)).astype(np.float32)
    back = processor.postprocess(torch.from_numpy(x), output_type="np")  # floats in [0, 1], HWC
    assert np.abs(to_uint8(x).astype(int) - np.round(back * 255).astype(int)).max() <= 1
