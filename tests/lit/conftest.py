"""Shared fixtures of the detection and instance-segmentation module tests."""

import pytest

from cednet_pl.data.synthetic_det import generate_synthetic_det


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The validation annotation file of a small embedded set (40 canvases of 128 px, exact boxes and masks)."""
    root = generate_synthetic_det(
        tmp_path_factory.mktemp("syn") / "set", num_train=2, num_val=40, image_size=128, digit_size=(16, 48)
    )
    return root / "annotations" / "instances_val.json"
