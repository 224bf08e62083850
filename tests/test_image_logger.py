"""ImageLogger's config checks: unknown parameters and bad values are ConfigErrors; legacy ones are reported once."""

from __future__ import annotations

import logging

import pytest

from ldm import util
from ldm.callbacks import ImageLogger
from ldm.util import ConfigError, instantiate_from_config


def test_unknown_parameters_and_bad_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="main.ImageLogger: unknown parameter.*bogus"):
        instantiate_from_config({"target": "main.ImageLogger", "params": {"bogus": 1}})
    with pytest.raises(ConfigError, match="ImageLogger: eval_models has unknown key.*dinov2.*accepted: dino, clip"):
        ImageLogger(eval_models={"dinov2": "x"})
    with pytest.raises(ConfigError, match="batch_frequency"):
        ImageLogger(batch_frequency=0)


def test_legacy_parameters_are_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    util._reported_legacy.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            ImageLogger(clamp=False, rescale=True, log_images_kwargs={"N": 8})
    messages = [r.getMessage() for r in caplog.records]
    assert sum("ImageLogger: legacy parameter clamp=False" in m for m in messages) == 1
    assert sum("log_images_kwargs={'N': 8}" in m for m in messages) == 1
    assert not any("rescale" in m or "log_on_batch_idx" in m for m in messages)
