"""Shared test set-up: CPU defaults, Ray loopback settings, the tiny model."""
import os
import pathlib
import shutil
import tempfile
import threading
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


# Disk bookkeeping, read by the disk watch below.
_DISK = {"runs_in": "", "free_at_start": 0, "base": 0, "session_peak": 0, "test_peak": 0, "tests": []}


# A training run of the tiny model writes a ~1.5 GiB learner checkpoint (fp32 weights + Adam moments)
# and a 0.5 GiB export; a resume test holds two checkpoints at once. CI's disk is shared and was seen
# with only ~2 GiB free, so such runs write to RAM-backed /dev/shm when it has room to spare: their
# ~3.5 GiB plus what Ray's object store (30% of RAM by default, also in /dev/shm) may take.
RUN_BYTES = int(3.5 * 2**30)


@pytest.fixture
def runs_tmp(tmp_path):
    """A directory for a test's training runs: under /dev/shm when it has room (above), else
    ``tmp_path``; the /dev/shm one is removed at teardown, passed or failed (it holds RAM)."""
    shm = "/dev/shm"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if not os.path.isdir(shm) or shutil.disk_usage(shm).free < RUN_BYTES + 0.3 * ram:
        _DISK["runs_in"] = "tmp_path (/dev/shm had no room)"
        yield tmp_path
        return
    _DISK["runs_in"] = shm
    path = tempfile.mkdtemp(prefix="verimed-runs-", dir=shm)
    try:
        yield pathlib.Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- Disk watch: CI machines have small disks and runs write GB-sized checkpoints; a suite that
# fills the disk fails far from the cause. Samples the temp filesystem's used bytes twice a second
# and prints, at the end, the free space at the start, the peak over the session and the tests that
# grew it most.


def _disk_used() -> int:
    return shutil.disk_usage(tempfile.gettempdir()).used


def _sample_disk() -> None:
    used = _disk_used()
    _DISK["session_peak"] = max(_DISK["session_peak"], used)
    _DISK["test_peak"] = max(_DISK["test_peak"], used)


def _drop_finished_sessions(config) -> None:
    """Remove the tmp_path trees of earlier, finished pytest sessions (``pytest-of-<user>/pytest-N``).

    pytest keeps the last three sessions and drops older ones only at exit, so the failed tests of a
    red run (GB-sized checkpoints each) still fill the disk of the next run on the same machine — CI
    ran out of disk this way. A session still running holds its ``.lock`` and is left alone.
    """
    if config.option.basetemp:  # a user-given basetemp is pytest's to clear
        return
    current = config._tmp_path_factory.getbasetemp()
    for old in current.parent.glob("pytest-[0-9]*"):
        if old != current and old.is_dir() and not (old / ".lock").exists():
            shutil.rmtree(old, ignore_errors=True)


def pytest_sessionstart(session):
    _drop_finished_sessions(session.config)
    usage = shutil.disk_usage(tempfile.gettempdir())
    _DISK["base"] = _DISK["session_peak"] = usage.used
    _DISK["free_at_start"] = usage.free

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
    tr.line(f"{_DISK['free_at_start'] / gib:.1f} GiB free at the start; peak "
            f"{(_DISK['session_peak'] - _DISK['base']) / gib:+.2f} GiB over it, end "
            f"{(_disk_used() - _DISK['base']) / gib:+.2f} GiB" +
            (f"; the training runs (runs_tmp) wrote to {_DISK['runs_in']}" if _DISK["runs_in"] else ""))
    for nodeid, peak, kept, _ in sorted(_DISK["tests"], key=lambda r: -r[1])[:8]:
        if peak > 0.05 * gib:
            tr.line(f"  peak {peak / gib:+.2f} GiB  left {kept / gib:+.2f} GiB  {nodeid}")
    for nodeid, peak, kept, _ in sorted(_DISK["tests"], key=lambda r: -r[2])[:5]:
        if kept > 0.05 * gib:
            tr.line(f"  left behind {kept / gib:+.2f} GiB  {nodeid}")
