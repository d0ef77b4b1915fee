"""Multi-turn stage (verimed.core.tasks.dialogue): dialogue token ids end to end, slice boundaries, loss masks,
and the slice driver against the real rules simulator / case rubrics / rules judge in-process.

Run: .venv/bin/python -m pytest tests/test_multiturn.py -q
"""
from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest

from verimed.core.rl.batch import build_train_batch
from verimed.core.config import Config, load_config
from verimed.core.data.cases import load_cases
from verimed.core.tasks.groups import Roles
from verimed.core.tasks.dialogue import Dialogue, choose_continuation, consultation_score, run_dialogue, slice_samples, template_delta
from verimed.core.models import apply_chat_template
from verimed.core.rubrics import make_generator, make_judge
from verimed.core.simulator import SimulatorSessions, make_backend
from verimed.core.types import Array, Sample, Turn

DOCTOR_REPLIES = [
    "When did the double vision start, and does it get worse later in the day?",
    "Do you have any weakness in your arms or trouble climbing stairs?",
    "I would like to examine your eyelids and muscle strength.",
    "I think this is myasthenia gravis. We will order acetylcholine receptor antibodies and start treatment; "
    "seek urgent care if your breathing gets worse.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from verimed.core.models import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def case():
    cases, _ = load_cases(skip_invalid=True)
    return cases[0]  # myasthenia gravis


def engine_ids(tokenizer, text: str, end: bool = True) -> list[int]:
    """Token ids as an engine might sample them: valid but NOT the canonical tokenisation
    (one token per character), so any re-tokenisation of the history would show."""
    ids = [i for ch in text for i in tokenizer.encode(ch, add_special_tokens=False)]
    assert ids != tokenizer.encode(text, add_special_tokens=False)
    return ids + ([tokenizer.eos_token_id] if end else [])


def make_sample(uid: str, prompt_ids: list[int], response_ids: list[int], text: str) -> Sample:
    r = len(response_ids)
    return Sample(uid=uid, prompt_ids=Array.of(np.asarray(prompt_ids, np.int32)),
                  response_ids=Array.of(np.asarray(response_ids, np.int32)),
                  response_logprobs=Array.of(np.linspace(-2.0, -0.1, r).astype(np.float32)),
                  response_versions=Array.of(np.zeros(r, np.int32)), text=text)


# ------------------------------------------------------------ Dialogue


def test_template_delta_is_the_patient_turn_only(tokenizer):
    delta = template_delta(tokenizer, [Turn(role="user", content="hi")], "It hurts here.")
    assert delta == "<|im_end|>\n<|im_start|>user\nIt hurts here.<|im_end|>\n<|im_start|>assistant\n"


def test_dialogue_ids_equal_full_template_for_canonical_replies(tokenizer):
    # With canonically tokenised doctor replies the incremental ids must equal one
    # rendering of the whole conversation: the deltas are exactly the template's.
    msgs = [Turn(role="system", content="You are a doctor."), Turn(role="user", content="I have a headache.")]
    d = Dialogue(tokenizer, msgs)
    full = list(msgs)
    for doctor, patient in [("How long?", "Three days."), ("Any fever?", "No, none at all.")]:
        d.append_doctor(tokenizer.encode(doctor, add_special_tokens=False) + [tokenizer.eos_token_id], doctor)
        d.append_patient(patient)
        full += [Turn(role="assistant", content=doctor), Turn(role="user", content=patient)]
    assert d.prompt_ids() == apply_chat_template(tokenizer, [{"role": t.role, "content": t.content} for t in full])
    assert [t.role for t in d.turns] == ["system", "user", "assistant", "user", "assistant", "user"]


def test_generic_template_delta(tokenizer):
    # A non-ChatML template (role and content on one line, no newline after the end token).
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] | upper }}:\n{{ m['content'] }}<|im_end|>"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>ASSISTANT:\n{% endif %}")
    msgs = [Turn(role="user", content="My knee is swollen.")]
    d = Dialogue(tok, msgs)
    d.append_doctor(tok.encode("Did you fall?", add_special_tokens=False) + [tok.eos_token_id], "Did you fall?")
    d.append_patient("Yes, last week.")
    full = [{"role": "user", "content": "My knee is swollen."}, {"role": "assistant", "content": "Did you fall?"},
            {"role": "user", "content": "Yes, last week."}]
    assert d.prompt_ids() == apply_chat_template(tok, full)


def test_engine_ids_kept_and_truncated_reply_closed(tokenizer):
    d = Dialogue(tokenizer, [Turn(role="user", content="I feel dizzy.")])
    start = len(d.prompt_ids())
    first = engine_ids(tokenizer, "When did it start?")
    d.append_doctor(first, "When did it start?")
    d.append_patient("Yesterday.")
    cut = engine_ids(tokenizer, "Do you", end=False)  # truncated at max_tokens: no end token
    d.append_doctor(cut, "Do you")
    ids = d.prompt_ids()
    assert ids[start:start + len(first)] == first  # exact engine ids, not re-tokenised
    k = ids.index(cut[0], start + len(first))
    assert ids[k:k + len(cut)] == cut and ids[k + len(cut)] == tokenizer.eos_token_id
    mask = d.loss_mask()
    assert mask.sum() == len(first) + len(cut)  # the appended end token is template, not policy output
    assert np.all(np.asarray(ids)[mask == 1] == np.asarray(first + cut))
    with pytest.raises(ValueError, match="already the doctor"):
        d.append_doctor(first, "again")
    d.append_patient("Yes.")
    with pytest.raises(ValueError, match="not replied"):
        d.append_patient("twice")


def test_choose_continuation():
    rng = np.random.default_rng(0)
    assert choose_continuation([0.1, 0.9, 0.3], "best", rng) == 1
    assert {choose_continuation([0.5, 0.5, 0.1], "best", rng) for _ in range(50)} == {0, 1}
    assert {choose_continuation([0.0] * 4, "sampled", rng) for _ in range(200)} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="continuation"):
        choose_continuation([1.0], "greedy", rng)


# ------------------------------------------------------------ the driver


class FakeEngine:
    """Deterministic doctor candidates with non-canonical ids; records every request."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    async def generate(self, uid_prefix, prompt_ids, n, seed, rollout=None):
        self.calls.append((uid_prefix, list(prompt_ids)))
        k = int(uid_prefix.split("/")[1])
        out = []
        for i in range(n):
            text = DOCTOR_REPLIES[min(k + i, len(DOCTOR_REPLIES) - 1)] if i < 3 else "ok"
            out.append(make_sample(f"{uid_prefix}/{i}", prompt_ids, engine_ids(self.tokenizer, text, end=i != 1), text))
        return out


def roles_for(cfg: Config, tokenizer, engine) -> Roles:
    return Roles(simulator=SimulatorSessions(make_backend(cfg.simulator), cfg.simulator.max_turns),
                 rubrics=make_generator(cfg.rubrics), judge=make_judge(cfg.judge), generate=engine.generate,
                 tokenizer=tokenizer)


def test_dialogue_slices_end_to_end(tokenizer, case):
    cfg = load_config(None, ["rollout.group_size=4", "simulator.max_turns=6", "model.max_model_len=4096"])
    engine = FakeEngine(tokenizer)
    roles = roles_for(cfg, tokenizer, engine)
    results, end = asyncio.run(run_dialogue(roles, cfg, case, draw=7, max_slices=6, continuation="best"))
    assert 1 <= len(results) <= 6 and end.slices == len(results)
    assert end.reason.startswith("gate") or end.reason == "max_slices"
    assert roles.simulator.sessions == {}  # the session is closed
    # uids unique per (draw, slice, sample)
    uids = [s.uid for r in results for s in r.group.samples]
    assert len(set(uids)) == len(uids) and uids[:2] == ["7/0/0", "7/0/1"]
    # slice k's prompt = slice k-1's prompt ++ the chosen candidate's exact engine ids ++ (end) ++ patient turn
    for prev, cur in zip(results, results[1:]):
        p_prev, p_cur = prev.group.samples[0].prompt_ids.numpy(), cur.group.samples[0].prompt_ids.numpy()
        assert np.array_equal(p_cur[:len(p_prev)], p_prev)
        chosen = [s for s in prev.group.samples
                  if np.array_equal(p_cur[len(p_prev):len(p_prev) + len(s.response_ids)], s.response_ids.numpy())]
        assert chosen, "the chosen doctor reply's engine ids are not in the next slice's prompt"
    # rubric per slice: early slices are graded by the early rubric, the doctor turn count grows by one
    for k, r in enumerate(results):
        assert sum(t.role == "assistant" for t in r.group.prompt.messages) == k
        assert r.group.prompt.rubric and len(r.group.rewards) == 4
    assert 0.0 <= consultation_score(results) <= 1.0


def test_slice_batch_keeps_engine_ids_and_masks_doctor_reply_only(tokenizer, case):
    cfg = load_config(None, ["rollout.group_size=3", "model.max_model_len=4096"])
    engine = FakeEngine(tokenizer)
    roles = roles_for(cfg, tokenizer, engine)
    results, _ = asyncio.run(run_dialogue(roles, cfg, case, draw=3, max_slices=3, continuation="sampled"))
    assert len(results) >= 2
    batch = build_train_batch([r.group for r in results], [r.advantages for r in results], policy_version=0)
    ids, mask, cu = batch.input_ids.numpy(), batch.loss_mask.numpy(), batch.cu_seqlens.numpy()
    samples = [s for r in results for s in r.group.samples]
    for j, s in enumerate(samples):
        seq, m = ids[cu[j]:cu[j + 1]], mask[cu[j]:cu[j + 1]]
        p, r = s.prompt_ids.numpy(), s.response_ids.numpy()
        assert np.array_equal(seq, np.concatenate([p, r]))  # identical to what the engine produced / was given
        assert m[:len(p)].sum() == 0 and np.all(m[len(p):] == 1)  # earlier doctor turns are context only
    # the engine was asked with exactly the slice prompts (no re-tokenisation between request and batch)
    for (uid, asked), r in zip(engine.calls, results):
        assert np.array_equal(np.asarray(asked, np.int32), r.group.samples[0].prompt_ids.numpy())


def test_slice_samples_rejects_retokenised_prompt(tokenizer):
    d = Dialogue(tokenizer, [Turn(role="user", content="Hello")])
    good = make_sample("0/0/0", d.prompt_ids(), [5, 6], "x")
    bad = make_sample("0/0/1", d.prompt_ids()[:-1], [5, 6], "x")
    assert slice_samples(d, [good]) == [good]
    with pytest.raises(ValueError, match="re-tokenised"):
        slice_samples(d, [good, bad])


def test_dialogue_stops_before_context_overflow(tokenizer, case):
    cfg = load_config(None, ["rollout.group_size=2", "rollout.max_tokens=64", "model.max_model_len=400"])
    results, end = asyncio.run(run_dialogue(roles_for(cfg, tokenizer, FakeEngine(tokenizer)), cfg, case, 1,
                                            max_slices=6))
    assert end.reason == "context" or end.reason.startswith("gate")
    assert all(len(r.group.samples[0].prompt_ids) + 64 <= 400 for r in results)


def test_bench_reads_the_multiturn_stage(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("mt_bench", Path(__file__).parent.parent / "bench/multiturn_reward.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "config.yaml").write_text("stages:\n  - {name: r, kind: rule, steps: 2}\n"
                                          "  - {name: m, kind: multiturn, steps: 10}\n")
    rows = [{"step": s + 1, "stage/index": 0 if s < 2 else 1, "reward/rubric_mean": 0.1 * s} for s in range(12)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    values = bench.multiturn_rewards(tmp_path)
    assert len(values) == 10 and values[0] == pytest.approx(0.2)
    first, last = bench.first_last(values)
    assert last > first
    with pytest.raises(ValueError, match="need >= 10"):
        bench.first_last(values[:9])


def test_admit_false_stops_the_dialogue(tokenizer, case):
    from verimed.core.tasks.dialogue import dialogue_slices

    cfg = load_config(None, ["rollout.group_size=2", "model.max_model_len=4096"])
    roles = roles_for(cfg, tokenizer, FakeEngine(tokenizer))
    calls, ends = [], []

    async def admit():
        calls.append(1)
        return False

    async def collect():
        return [r async for r in dialogue_slices(roles, cfg, case, 9, max_slices=5, continuation="sampled",
                                                 admit=admit, on_end=ends.append)]

    results = asyncio.run(collect())
    # slice 0 is admitted by the caller; slice 0's candidates are questions (the gate stays open), so the
    # dialogue stops at the first admit
    assert len(results) == 1 and len(calls) == 1 and ends[0].reason == "stopped"
    assert roles.simulator.sessions == {}
