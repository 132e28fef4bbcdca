"""The loss registry owns the options: declarations drive validation, the saved configuration and the
command line's help; losses and judges from other packages (entry points, ``py:`` judges) reach the
command line."""

from __future__ import annotations

import pytest

from dppo.errors import ConfigError
from dppo.train.config import TrainConfig

BASE = dict(data="d", init="i", out="o")


def test_varlen_kernel_is_refused_off_cuda_at_option_checking():
    with pytest.raises(ConfigError, match="--kernel varlen runs on CUDA only") as e:
        TrainConfig(method="dpo", kernel="varlen", device="cpu", **BASE)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--kernel varlen runs in bf16 only"):
        TrainConfig(method="dpo", kernel="varlen", device="cuda", dtype="fp32", **BASE)
    assert TrainConfig(method="dpo", kernel="varlen", device="cuda", **BASE).kernel == "varlen"
