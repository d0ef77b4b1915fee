"""The controller-path fixes of the scale work (issue #17.1), each against the behaviour it must keep.

- ReadyBuffer.take checks only new entries while nothing else changed: it must return exactly what a
  full rescan (the simple algorithm, written out here as the oracle) returns, for any interleaving of
  puts, takes, consumptions, version and stage changes, re-run twins and stale groups;
- judge_group sends a whole group in one ``judge_many`` call when the judge has it;
- prompt_ids is memoised but hands every caller its own list.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verimed.core.config import load_config
from verimed.core.rl.staleness import Ledger, Ready, ReadyBuffer
from verimed.core.tasks.groups import Roles, judge_group, prompt_ids
from verimed.core.types import Array, Judgement, Prompt, RubricItem, Sample, Turn


def oracle_take(entries: list[Ready], stage, version, batch_groups, max_staleness, ledger):
    """The full-rescan algorithm: (batch or None, remaining entries, wrong_stage, duplicates, stale)."""
    keep, wrong, dups, stale, seen = [], [], [], [], set()
    for e in sorted(entries, key=lambda e: e.age):
        if e.stage != stage:
            wrong.append(e)
        elif ledger.duplicates(e.uids) or seen.intersection(e.uids):
            dups.append(e)
        elif 0 <= e.oldest_version < version - max_staleness:
            stale.append(e)
        else:
            keep.append(e)
            seen.update(e.uids)
    if len(keep) >= batch_groups:
        return keep[:batch_groups], keep[batch_groups:], wrong, dups, stale
    return None, keep, wrong, dups, stale


def names(entries):
    return None if entries is None else [(e.order, tuple(e.uids)) for e in entries]


op = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 1), st.integers(0, 12), st.integers(-1, 6), st.booleans()),
    st.tuples(st.just("take"), st.integers(0, 1), st.integers(0, 6), st.integers(1, 4), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60), st.integers(0, 2))
def test_incremental_take_equals_a_full_rescan(ops, max_staleness):
    buf, ledger, oracle_entries, oracle_ledger = ReadyBuffer(), Ledger(), [], Ledger()
    slices: dict[int, int] = {}
    for kind, a, b, c, flag in ops:
        if kind == "put":
            stage, draw, oldest, twin = a, b, c, flag
            # a re-run twin repeats the uids of the draw's previous slice; otherwise a fresh slice
            slice_ = slices.get(draw, 0) if twin and draw in slices else slices.get(draw, -1) + 1
            slices[draw] = max(slices.get(draw, -1), slice_)
            entry = Ready(stage=stage, uids=[f"{draw}/{slice_}/{i}" for i in range(2)], oldest_version=oldest,
                          order=(draw, slice_), item=draw)
            buf.put(entry)
            oracle_entries.append(entry)
        else:
            stage, version, batch_groups, consume = a, b, c, flag
            taken = buf.take(stage, version, batch_groups, max_staleness, ledger)
            batch, oracle_entries, wrong, dups, stale = oracle_take(oracle_entries, stage, version, batch_groups,
                                                                    max_staleness, oracle_ledger)
            assert names(taken.batch) == names(batch)
            assert names(taken.wrong_stage) == names(wrong) and names(taken.stale) == names(stale)
            assert names(taken.duplicates) == names(dups)
            assert names(buf.drain()) == names(sorted(oracle_entries, key=lambda e: e.age))
            assert len(buf) == len(oracle_entries)
            if batch is not None and consume:
                uids = [u for e in batch for u in e.uids]
                ledger.consume(uids)
                oracle_ledger.consume(uids)


def test_a_late_twin_of_a_buffered_group_forces_the_rescan_that_keeps_the_older():
    buf, ledger = ReadyBuffer(), Ledger()
    young = Ready(stage=0, uids=["7/0/0"], oldest_version=3, order=(7, 0), item="young")
    buf.put(young)
    assert buf.take(0, 3, 2, 1, ledger).batch is None  # young is now known valid
    old_twin = Ready(stage=0, uids=["7/0/0"], oldest_version=2, order=(7, 0), item="old")
    buf.put(old_twin)
    taken = buf.take(0, 3, 2, 1, ledger)
    # the older twin wins (oldest first), the younger is the duplicate, as in a full rescan
    assert [e.item for e in taken.duplicates] == ["young"] and [e.item for e in buf.drain()] == ["old"]


class CountingJudge:
    """A judge double with both entry points; counts the calls each gets."""

    def __init__(self, with_many: bool):
        self.single_calls = self.many_calls = 0
        if with_many:
            self.judge_many = self._judge_many

    async def judge(self, conversation, response, items):
        self.single_calls += 1
        return [Judgement(item_index=k, met=response.endswith("good")) for k, _ in enumerate(items)]

    async def _judge_many(self, requests):
        self.many_calls += 1
        return [await self.judge(*r) for r in requests]


def samples(texts):
    ids = Array.of(np.asarray([1, 2], np.int32))
    return [Sample(uid=f"0/0/{i}", prompt_ids=ids, response_ids=ids, response_logprobs=Array.of(np.zeros(2, np.float32)),
                   response_versions=Array.of(np.zeros(2, np.int32)), text=t) for i, t in enumerate(texts)]


@pytest.mark.parametrize("with_many", [True, False])
def test_judge_group_makes_one_call_per_group_when_the_judge_has_judge_many(with_many):
    judge = CountingJudge(with_many)
    roles = Roles(simulator=None, rubrics=None, judge=judge, generate=None, tokenizer=None)
    cfg = load_config(None, [])
    prompt = Prompt(index=0, source="healthbench", messages=[Turn(role="user", content="q")],
                    rubric=[RubricItem(criterion="says good", points=5.0)])
    result = asyncio.run(judge_group(roles, cfg, prompt, samples(["bad", "good", "good", "bad"])))
    assert (judge.many_calls, judge.single_calls) == ((1, 4) if with_many else (0, 4))
    assert result.group.rubric_scores == [0.0, 1.0, 1.0, 0.0]  # each sample keeps its own judgement


def test_judge_many_answering_short_is_an_error_not_a_silent_zip():
    class Short(CountingJudge):
        async def _judge_many(self, requests):
            return [await self.judge(*requests[0])]

    roles = Roles(simulator=None, rubrics=None, judge=Short(True), generate=None, tokenizer=None)
    prompt = Prompt(index=0, source="healthbench", messages=[Turn(role="user", content="q")],
                    rubric=[RubricItem(criterion="c", points=1.0)])
    with pytest.raises(RuntimeError, match="1 judgements for 3 samples"):
        asyncio.run(judge_group(roles, load_config(None, []), prompt, samples(["a", "b", "c"])))


def test_prompt_ids_is_memoised_but_every_caller_gets_its_own_list(tiny_model_path):
    from verimed.core.models import apply_chat_template, load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    messages = [Turn(role="system", content="s"), Turn(role="user", content="chest pain")]
    first = prompt_ids(tok, messages)
    first.append(-1)  # a caller changing its list must not change the next caller's
    assert prompt_ids(tok, messages) == apply_chat_template(tok, [{"role": t.role, "content": t.content} for t in messages])
    other = prompt_ids(tok, [Turn(role="user", content="chest pain")])
    assert other != first[:-1]  # the key is the whole conversation, roles included


def reference_batch(groups, advantages):
    """The per-sample packing (the layout of ``core/rl/batch.py``'s docstring, one sequence at a time)."""
    ids, mask, behaviour, adv, versions, cu = [], [], [], [], [], [0]
    for group, group_adv in zip(groups, advantages):
        for sample, a in zip(group.samples, group_adv):
            p, r = len(sample.prompt_ids.numpy()), len(sample.response_ids.numpy())
            ids += [sample.prompt_ids.numpy(), sample.response_ids.numpy()]
            mask += [np.zeros(p, np.float32), np.ones(r, np.float32)]
            behaviour += [np.zeros(p, np.float32), sample.response_logprobs.numpy().astype(np.float32)]
            adv += [np.zeros(p, np.float32), np.full(r, a, np.float32)]
            versions += [np.full(p, -1, np.int32), sample.response_versions.numpy().astype(np.int32)]
            cu.append(cu[-1] + p + r)
    cat = np.concatenate
    return {"input_ids": cat(ids).astype(np.int32), "loss_mask": cat(mask), "behaviour_logprobs": cat(behaviour),
            "advantages": cat(adv), "versions": cat(versions), "cu_seqlens": np.asarray(cu, np.int32)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_packing_equals_the_per_sample_layout_bit_for_bit(seed):
    from verimed.core.rl.batch import build_train_batch
    from verimed.core.types import Group

    rng = np.random.default_rng(seed)
    groups, advantages = [], []
    for g in range(int(rng.integers(1, 5))):
        n = int(rng.integers(1, 4))
        samples_ = []
        for i in range(n):
            p, r = int(rng.integers(1, 9)), int(rng.integers(0, 7))  # odd lengths, an empty response too
            samples_.append(Sample(uid=f"{g}/0/{i}", prompt_ids=Array.of(rng.integers(0, 50, p).astype(np.int32)),
                                   response_ids=Array.of(rng.integers(0, 50, r).astype(np.int32)),
                                   response_logprobs=Array.of(-rng.random(r).astype(np.float32)),
                                   response_versions=Array.of(rng.integers(0, 4, r).astype(np.int32)), text=""))
        groups.append(Group(prompt=Prompt(index=g, source="cases", messages=[]), samples=samples_,
                            rewards=[0.0] * n, rubric_scores=[0.0] * n))
        advantages.append((rng.standard_normal(n) * 3).astype(np.float32))  # negative advantages too
    batch = build_train_batch(groups, advantages, policy_version=3, temperature=0.7)
    for name, expected in reference_batch(groups, advantages).items():
        got = getattr(batch, name).numpy()
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), name
    assert batch.uids == [s.uid for grp in groups for s in grp.samples]
    assert batch.group_ids.numpy().tolist() == [g for g, grp in enumerate(groups) for _ in grp.samples]
    assert batch.max_response_len == max(1, max(len(s.response_ids.numpy()) for grp in groups for s in grp.samples))
    with pytest.raises(ValueError, match="no samples"):
        build_train_batch([], [], 0)


def test_prompt_ids_with_an_unhashable_tokenizer_still_encodes():
    from types import SimpleNamespace

    calls = []

    def apply_chat_template(messages, **kwargs):
        calls.append(messages)
        return [1, 2, 3]

    tok = SimpleNamespace(apply_chat_template=apply_chat_template)  # unhashable: no cache, same ids
    messages = [Turn(role="user", content="q")]
    assert prompt_ids(tok, messages) == prompt_ids(tok, messages) == [1, 2, 3] and len(calls) == 2


def test_a_groups_samples_share_one_prompt_on_the_wire_and_after_it():
    """A reply of G samples pickles its prompt once, and the receiver's samples share one copy:
    thousands of buffered groups would otherwise hold G copies of every prompt."""
    import pickle

    from verimed.core.rollout.engines import EngineOutput, group_samples

    prompt, g = list(range(1000, 3000)), 16
    outs = [EngineOutput([5, 6, i], [-0.5, -0.25, -1.0], [0, 0, 1], f"reply {i}", "stop") for i in range(g)]
    samples = group_samples("7/0", prompt, outs)
    assert [s.uid for s in samples] == [f"7/0/{i}" for i in range(g)]
    assert samples[3].response_ids.numpy().tolist() == [5, 6, 3] and samples[3].text == "reply 3"
    assert samples[3].response_logprobs.numpy().dtype == np.float32
    wire = pickle.dumps(samples, protocol=5)
    assert len(wire) < 2 * 4 * len(prompt)  # one prompt of 8000 bytes, not 16
    received = pickle.loads(wire)
    assert all(s.prompt_ids is received[0].prompt_ids for s in received)
    assert received[0].prompt_ids.numpy().tolist() == prompt


def test_no_message_is_tracked_by_the_garbage_collector():
    """Messages are plain data (no reference cycles): untracked, the thousands of groups the controller
    holds add nothing to the objects each full collection walks."""
    import gc

    import msgspec

    import verimed.core.types as types
    from verimed.core.tasks.groups import GroupResult

    messages = [c for c in vars(types).values() if isinstance(c, type) and issubclass(c, msgspec.Struct)]
    assert len(messages) >= 10
    assert [c.__name__ for c in [*messages, GroupResult] if c.__struct_config__.gc] == []
    sample = Sample(uid="0/0/0", prompt_ids=Array.of(np.arange(3, dtype=np.int32)), response_ids=Array.of(np.arange(2, dtype=np.int32)),
                    response_logprobs=Array.of(np.zeros(2, np.float32)), response_versions=Array.of(np.zeros(2, np.int32)), text="x")
    assert not gc.is_tracked(sample) and not gc.is_tracked(sample.prompt_ids)
