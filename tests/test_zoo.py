"""The whole torchvision classification zoo through the property sweep (slow: CI skips it with -m 'not slow')."""

import gc

import pytest
import torchvision

from engine_checks import check_backbone

ZOO = torchvision.models.list_models(module=torchvision.models)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_properties(name):
    try:
        report = check_backbone(name, seed_width=0.25)
    finally:
        gc.collect()
    assert report["growable"] > 0
