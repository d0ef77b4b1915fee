"""Shared test set-up: CPU defaults, Ray loopback settings, the tiny model."""
import os
import time

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


# --- Disk watch: CI machines have small disks and runs write GB-sized checkpoints; a suite that
# fills the disk fails far from the cause. Samples the temp filesystem's used bytes twice a second
# and prints, at the end, the peak over the session and the tests that grew it most.
_DISK = {"base": 0, "session_peak": 0, "test_peak": 0, "tests": []}


def _disk_used() -> int:
    import shutil
    import tempfile

    return shutil.disk_usage(tempfile.gettempdir()).used


def _sample_disk() -> None:
    used = _disk_used()
    _DISK["session_peak"] = max(_DISK["session_peak"], used)
    _DISK["test_peak"] = max(_DISK["test_peak"], used)


def pytest_sessionstart(session):
    import threading

    _DISK["base"] = _DISK["session_peak"] = _disk_used()

    def sample_forever():
        while True:
            _sample_disk()
            time.sleep(0.5)

    threading.Thread(target=sample_forever, name="disk-watch", daemon=True).start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = _DISK["test_peak"] = _disk_used()
    yield
    _sample_disk()
    _DISK["tests"].append((item.nodeid, _DISK["test_peak"] - before, _disk_used() - before, before - _DISK["base"]))


def pytest_terminal_summary(terminalreporter, config):
    if not _DISK["tests"]:
        return
    table = config.rootpath / ".pytest_cache" / "disk-usage.tsv"  # every test, in run order
    table.parent.mkdir(exist_ok=True)
    table.write_text("nodeid\tpeak\tleft\tbefore_over_start\n" + "".join(
        "\t".join(map(str, row)) + "\n" for row in _DISK["tests"]))
    gib = 2**30
    tr = terminalreporter
    tr.section("disk (temp filesystem)")
    tr.line(f"peak {(_DISK['session_peak'] - _DISK['base']) / gib:+.2f} GiB over the session start, "
            f"end {(_disk_used() - _DISK['base']) / gib:+.2f} GiB")
    for nodeid, peak, kept, _ in sorted(_DISK["tests"], key=lambda r: -r[1])[:8]:
        if peak > 0.05 * gib:
            tr.line(f"  peak {peak / gib:+.2f} GiB  left {kept / gib:+.2f} GiB  {nodeid}")
    for nodeid, peak, kept, _ in sorted(_DISK["tests"], key=lambda r: -r[2])[:5]:
        if kept > 0.05 * gib:
            tr.line(f"  left behind {kept / gib:+.2f} GiB  {nodeid}")
