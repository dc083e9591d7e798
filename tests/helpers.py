"""Test helpers shared across the suite: which fast backends to parametrize
over, and the device each one's tests use."""

import pytest
import torch

import pykernels

FAST_BACKENDS = ("cpu", "triton", "cuda")


def backend_device(name: str) -> str:
    return "cpu" if name == "cpu" or (name == "triton" and not torch.cuda.is_available()) else "cuda"


def backend_params():
    """pytest params for every fast backend, skipped (with the reason) where unavailable."""
    status = pykernels.backends()
    params = []
    for name in FAST_BACKENDS:
        marks = [pytest.mark.triton] if name == "triton" else [pytest.mark.cuda] if name == "cuda" else []
        if not status[name].available:
            marks.append(pytest.mark.skip(reason=f"{name} backend unavailable: {status[name].reason}"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params
