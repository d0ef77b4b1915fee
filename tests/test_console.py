"""The console a person reads: per-actor log files, the step line, and the silenced benign vLLM warnings."""
from __future__ import annotations

import logging
import subprocess
import sys

from verimed.actors.logs import LOG_ENV, with_log_file
from verimed.core.metrics import summary_line
from verimed.core.rollout.worker_extension import _RELOAD_LOGGER, _BenignReloadWarnings


def test_with_log_file_adds_the_env_var_and_keeps_other_options(tmp_path):
    base = {"num_cpus": 1, "runtime_env": {"env_vars": {"A": "1"}, "pip": ["x"]}}
    out = with_log_file(base, tmp_path, "rollout-0")
    assert out["num_cpus"] == 1 and out["runtime_env"]["pip"] == ["x"]
    assert out["runtime_env"]["env_vars"] == {"A": "1", LOG_ENV: str(tmp_path / "rollout-0.log")}
    assert base["runtime_env"]["env_vars"] == {"A": "1"}  # not mutated
    assert with_log_file(base, None, "rollout-0") is base  # --verbose: nothing redirected


def test_redirect_output_catches_python_and_child_process_output(tmp_path):
    log = tmp_path / "logs" / "actor.log"
    code = ("import os, sys; from verimed.actors.logs import redirect_output; redirect_output(); "
            "print('from python'); sys.stderr.write('to stderr\\n'); sys.stderr.flush(); os.system('echo from a child')")
    done = subprocess.run([sys.executable, "-c", code], env={**_env(), LOG_ENV: str(log)}, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
    text = log.read_text()
    assert "from python" in text and "to stderr" in text and "from a child" in text


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != LOG_ENV}


def test_summary_line_names_the_stage_and_survives_missing_metrics():
    line = summary_line({"stage/index": 1.0, "reward/mean": 0.25, "sync/parity_max_abs": 3e-5}, ["rule", "rubric"])
    assert line.startswith("rubric | reward 0.250 | loss - |") and "parity 3.0e-05" in line
    assert summary_line({}, []).startswith("- | reward -")


def _record(layer: str) -> logging.LogRecord:
    return logging.LogRecord(_RELOAD_LOGGER, logging.WARNING, "layerwise.py", 266, "%s: Failed to load weights",
                             (layer,), None)


def test_only_the_known_benign_reload_warnings_are_dropped():
    tied, untied = _BenignReloadWarnings(tied_head=True), _BenignReloadWarnings(tied_head=False)
    assert not tied.filter(_record("RotaryEmbedding")) and not tied.filter(_record("ParallelLMHead"))
    assert untied.filter(_record("ParallelLMHead"))  # an untied head that failed to load is a real failure
    assert tied.filter(_record("QKVParallelLinear"))
    other = logging.LogRecord(_RELOAD_LOGGER, logging.WARNING, "x", 1, "%s: something else", ("RotaryEmbedding",), None)
    assert tied.filter(other)


def test_two_local_clusters_never_share_an_engine_pid_file():
    """Each fresh local cluster numbers its first job 01000000: the node id keeps their files apart
    (a shared file let one run's restart sweep kill the other run's live vLLM engines)."""
    from verimed.actors.rollout import engine_pidfile_name

    first = engine_pidfile_name("a" * 56, "01000000", 0)
    assert first != engine_pidfile_name("b" * 56, "01000000", 0)
    assert first == engine_pidfile_name("a" * 56, "01000000", 0)  # a restarted actor finds its predecessor's
    assert first != engine_pidfile_name("a" * 56, "01000000", 1)
