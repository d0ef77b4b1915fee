"""Shared test set-up: CPU defaults, Ray loopback settings, the tiny model."""
import os

import pytest

# Triton decides between interpreter and compiler at first import: without a
# GPU, every Triton kernel in the tests runs under the interpreter.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """The converted SmolLM2-135M-Instruct directory (converted once per machine)."""
    from verimed.core.models import resolve_model_path

    return resolve_model_path("smollm2")
