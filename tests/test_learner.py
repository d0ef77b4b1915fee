"""Learner: sequence packing, 2-rank FSDP2 (gloo) parity with an unsharded step, checkpoint/resume, HF export.

The model is a tiny random Llama (2 layers, hidden 32) that shares the
SmolLM2 tokenizer, so every test is fast; the 2-rank run happens once per
module in two spawned processes.

    .venv/bin/python -m pytest tests/test_learner.py -q
"""
from __future__ import annotations

import multiprocessing as mp
import shutil

import numpy as np
import pytest
import torch
from netutil import free_port

from verimed.cli import export as export_cli
from verimed.core.config import load_config
from verimed.core.rl.batch import build_train_batch
from verimed.core.rl.staleness import Ledger
from verimed.core.tasks.schedule import ScheduleState
from verimed.core.train import checkpoint as ckpt
from verimed.core.train.learner import Learner, flatten_parameters
from verimed.core.train.packing import pack_micro_batches, packed_layout, segment_masks
from verimed.core.types import Array, Group, Prompt, Sample, Turn

OVERRIDES = ["trainer.lr=1e-3", "trainer.micro_batch_tokens=48", "trainer.warmup_steps=1", "trainer.schedule=cosine",
             "run.steps=4", "trainer.grad_clip=0.005"]  # clipping active (grad norm ~0.01)
REL_TOL = 1e-6


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tiny_model_path) -> str:
    """A random 2-layer Llama with SmolLM2's tokenizer (tied embeddings, like SmolLM2)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def make_batch(seed: int, groups: int = 2, group_size: int = 3, vocab: int = 400):
    """A TrainBatch of random prompts/responses of uneven lengths with off-policy behaviour log-probs."""
    rng = np.random.default_rng(seed)
    out_groups, advantages = [], []
    for g in range(groups):
        samples = []
        prompt = rng.integers(0, vocab, int(rng.integers(3, 9))).astype(np.int32)
        for i in range(group_size):
            r = int(rng.integers(2, 15))
            samples.append(Sample(
                uid=f"{seed}/{g}/{i}", prompt_ids=Array.of(prompt),
                response_ids=Array.of(rng.integers(0, vocab, r).astype(np.int32)),
                response_logprobs=Array.of((-rng.uniform(3, 9, r)).astype(np.float32)),
                response_versions=Array.of(np.zeros(r, np.int32)), text=""))
        rewards = rng.uniform(0, 1, group_size).tolist()
        out_groups.append(Group(prompt=Prompt(index=g, source="test", messages=[Turn("user", "x")]), samples=samples,
                                rewards=rewards, rubric_scores=rewards))
        advantages.append(np.asarray(rewards) - np.mean(rewards))
    return build_train_batch(out_groups, advantages, 0), out_groups, advantages


def full_state(learner: Learner) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone().cpu() for name, t in learner.iter_full_parameters()}


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / den) ** 0.5


# ------------------------------------------------------------------ packing


def test_pack_micro_batches_respects_budget_and_covers_all():
    lengths = [7, 3, 12, 5, 5, 30, 1, 9]
    batches = pack_micro_batches(lengths, 16)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert sum(lengths[i] for i in b) <= 16 or len(b) == 1
    assert [5] in batches  # longer than the budget: alone
    assert len(batches) == 4  # FFD: [30] [12, 3, 1] [9, 7] [5, 5]
    with pytest.raises(ValueError, match="token_budget"):
        pack_micro_batches(lengths, 0)


def test_packed_layout():
    seqs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    row = packed_layout(seqs)
    assert row.ids.tolist() == [5, 6, 7, 8, 9, 10] and row.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert row.tokens.tolist() == [1, 2, 5] and row.rows.tolist() == [0, 1, 4]  # a sequence's first token is not scored
    assert row.segments == [(0, 3, 0, ()), (3, 4, 0, ()), (4, 6, 0, ())]


def test_packed_layout_shares_prompts():
    """Two samples of one prompt [1 2 3] + an unrelated sequence; wanted = the responses."""
    seqs = [np.array([1, 2, 3, 40, 41]), np.array([7, 8, 9]), np.array([1, 2, 3, 50])]
    wanted = np.array([0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1], bool)
    row = packed_layout(seqs, wanted, share_prefixes=True)
    assert row.ids.tolist() == [1, 2, 3, 40, 41, 50, 7, 8, 9]  # the prompt once, then each response
    assert row.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2]
    assert row.segments == [(0, 6, 3, (2, 1)), (6, 9, 0, ())]
    assert row.tokens.tolist() == [3, 4, 6, 7, 11]
    assert row.rows.tolist() == [2, 3, 6, 7, 2]  # both first response tokens are predicted by the prompt's last row
    mask = segment_masks(row.segments, torch.device("cpu"))[0][2].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]]  # 50 does not see 40, 41
    # different prompts, or nothing wanted: nothing shared
    assert all(not sfx for *_, sfx in packed_layout(seqs, None, share_prefixes=True).segments)


def test_shared_prompt_training_equals_plain_packing(tiny_path):
    """A GRPO step with prompts shared inside micro-batches = the same step with every sequence packed whole."""
    batch = make_batch(3, groups=3, group_size=3)[0]
    cu, ids, mask = batch.cu_seqlens.numpy(), batch.input_ids.numpy(), batch.loss_mask.numpy() > 0
    shared = packed_layout([ids[cu[s] : cu[s + 1]] for s in range(3)], mask[: cu[3]], share_prefixes=True)
    assert len(shared.ids) < cu[3]  # group 0's three samples share their prompt
    steps = []
    for segment_attention in (True, False):
        learner = Learner(load_config(None, OVERRIDES), tiny_path)
        learner.model.segment_attention = segment_attention  # False: plain layout (still per-sequence attention)
        metrics = learner.train_step(batch)
        steps.append((metrics["loss/policy"], full_state(learner)))
    assert abs(steps[0][0] - steps[1][0]) <= 1e-6 * max(1.0, abs(steps[1][0]))
    assert rel_diff(steps[0][1], steps[1][1]) <= REL_TOL


def test_packed_forward_matches_separate_sequences(tiny_path):
    learner = Learner(load_config(None, OVERRIDES), tiny_path)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 400, n) for n in (5, 9, 1, 12)]
    with torch.no_grad():
        packed, _ = learner._forward_logprobs(seqs, 1.0)
        offset = 0
        for s in seqs:
            one = learner.model.lm(torch.as_tensor(s[None], dtype=torch.long)).logits[0].log_softmax(-1)
            ref = one[:-1].gather(-1, torch.as_tensor(s[1:, None], dtype=torch.long))[:, 0]
            got = packed[offset: offset + len(s)]
            assert float(got[0]) == 0.0
            # fp32 log-probs of random tokens (~-6): packing only reorders sums, ~100 ulps of that scale
            torch.testing.assert_close(got[1:], ref, rtol=1e-5, atol=1e-6)
            offset += len(s)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gpu_attention_path_keeps_packed_sequences_apart(tiny_path, impl):
    """The GPU path (no segment attention: transformers' own mask from restarting position ids)
    scores each packed sequence as if it ran alone, even when the model's config asks for a KV
    cache — with a cache transformers skips its packed-sequence detection (seen: a sequence
    then attends to the ones before it in the row; its last hidden state was off by up to 2.5
    on a 2-layer Qwen2, and both cases here fail without FusedPolicy's use_cache=False)."""
    from verimed.core.train.learner import packed_logprobs

    learner = Learner(load_config(None, OVERRIDES), tiny_path)
    learner.model.segment_attention = False  # what FusedPolicy does on a CUDA device
    learner.model.lm.set_attn_implementation(impl)
    learner.model.lm.config.use_cache = True
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 400, n) for n in (11, 6, 9)]
    cpu = torch.device("cpu")
    with torch.no_grad():
        packed, packed_ent = packed_logprobs(learner.model, seqs, 1.0, cpu)
        alone = [packed_logprobs(learner.model, [s], 1.0, cpu) for s in seqs]
    torch.testing.assert_close(packed, torch.cat([lp for lp, _ in alone]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_ent, torch.cat([ent for _, ent in alone]), rtol=1e-5, atol=1e-5)


def test_segment_attention_matches_block_diagonal_sdpa(tiny_path):
    """Per-sequence attention (CPU default) = transformers' sdpa with the block-diagonal mask: values and gradients."""
    from verimed.core.train.learner import packed_logprobs

    learner = Learner(load_config(None, OVERRIDES), tiny_path)
    assert learner.model.lm.config._attn_implementation == "verimed_segments"
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 400, n) for n in (7, 1, 12, 3)]
    results = []
    for impl in ("verimed_segments", "sdpa"):
        learner.model.lm.set_attn_implementation(impl)
        learner.model.zero_grad(set_to_none=True)
        logprob, entropy = packed_logprobs(learner.model, seqs, 1.0, torch.device("cpu"))
        (logprob.sum() + entropy.sum()).backward()
        grads = [p.grad.clone() for p in learner.model.parameters()]
        results.append((logprob.detach(), entropy.detach(), grads))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results
    torch.testing.assert_close(lp_a, lp_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_a, ent_b, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def check_random_init(state: dict[str, torch.Tensor], std: float) -> None:
    """Matrices ~ N(0, std²) (sample std within 5 standard errors), norm scales exactly 1."""
    for name, t in state.items():
        if t.dim() >= 2:
            n = t.numel()
            assert abs(float(t.float().std()) - std) <= 5 * std / (2 * n) ** 0.5 + 1e-12, name
            assert abs(float(t.float().mean())) <= 5 * std / n**0.5, name
        else:
            assert torch.equal(t, torch.ones_like(t)), name


def test_random_init_needs_only_the_config(tiny_path, tmp_path):
    """``random_init``: built from config.json alone (no weights on disk), HF-style random weights, trains."""
    shutil.copy(f"{tiny_path}/config.json", tmp_path / "config.json")
    learner = Learner(load_config(None, OVERRIDES), str(tmp_path), random_init=True)
    lm = learner.model.lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still tied, drawn once
    state = {k: v.detach().clone() for k, v in lm.named_parameters()}
    check_random_init(state, lm.config.initializer_range)
    trained = Learner(load_config(None, OVERRIDES), tiny_path)  # the checkpoint's weights differ
    assert not torch.equal(trained.model.lm.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    metrics = learner.train_step(make_batch(1)[0])
    assert np.isfinite(metrics["loss/policy"]) and metrics["train/grad_norm"] > 0


def test_unsharded_learner_keeps_parameters_in_one_buffer(tiny_path):
    """One CPU rank: parameters are views of one buffer in named order (zero-copy weight sync), still tied, still trained."""
    learner = Learner(load_config(None, OVERRIDES), tiny_path)
    params = [p for _, p in learner.model.named_parameters()]
    storage = params[0].untyped_storage().data_ptr()
    offsets = [p.data_ptr() - storage for p in params]
    assert all(p.untyped_storage().data_ptr() == storage for p in params)
    assert offsets == list(np.cumsum([0] + [p.numel() * 4 for p in params[:-1]]))
    lm = learner.model.lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tying survives
    before = params[1].detach().clone()
    learner.train_step(make_batch(0)[0])
    assert not torch.equal(before, params[1]) and params[1].untyped_storage().data_ptr() == storage
    with pytest.raises(ValueError, match="one dtype"):
        flatten_parameters(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16)))


# ------------------------------------------------------------------ 2-rank FSDP2 vs unsharded


def _rank_main(rank: int, world: int, port: int, model_path: str, out_dir: str) -> None:
    from verimed.core.train import learner as learner_module
    from verimed.core.train.distributed import init_distributed

    full_loads = []  # every full-model read of this rank (only rank 0 may read the checkpoint)
    load = learner_module.load_causal_lm
    learner_module.load_causal_lm = lambda *a, **k: full_loads.append(a) or load(*a, **k)
    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port)
    cfg = load_config(None, OVERRIDES)
    learner = Learner(cfg, model_path, rank, world)
    batch1, batch2 = make_batch(1)[0], make_batch(2)[0]
    m1 = learner.train_step(batch1)
    after1 = full_state(learner)
    learner.save_checkpoint(f"{out_dir}/learner")
    rng_after_save = torch.rand(3)  # drawn from the saved RNG state
    m2 = learner.train_step(batch2)
    after2 = full_state(learner)
    resumed = Learner(cfg, model_path, rank, world)
    resumed.load_checkpoint(f"{out_dir}/learner")
    rng_after_load = torch.rand(3)
    r2 = resumed.train_step(batch2)
    after2_resumed = full_state(resumed)
    # A random-init learner under FSDP2: every rank draws its own shards; no checkpoint is read.
    loads_before = len(full_loads)
    random = Learner(cfg, model_path, rank, world, random_init=True)
    random_state = full_state(random)
    lm = random.model.lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight, "FSDP2 random init untied the LM head"
    random_m = random.train_step(batch1)
    assert len(full_loads) == loads_before
    if rank == 0:
        torch.save({"random_state": random_state, "random_m": random_m, "m1": m1, "m2": m2, "r2": r2, "after1": after1, "after2": after2, "after2_resumed": after2_resumed,
                    "version": resumed.version, "lr": resumed.scheduler.get_last_lr(),
                    "rng_restored": torch.equal(rng_after_save, rng_after_load)}, f"{out_dir}/rank0.pt")
    torch.save(len(full_loads), f"{out_dir}/rank{rank}_full_loads.pt")
    # Both ranks finish their gloo work before either tears the group down: rank 1 once aborted
    # ("terminate called without an active exception") when rank 0 (the store host) left first.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, tiny_path, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out, torch.load(out / "rank0.pt", weights_only=False)


def test_two_rank_fsdp2_matches_unsharded_step(two_rank, tiny_path):
    _, res = two_rank
    ref = Learner(load_config(None, OVERRIDES), tiny_path)  # no process group: unsharded
    before = full_state(ref)
    m1 = ref.train_step(make_batch(1)[0])
    after = full_state(ref)
    assert rel_diff(after, before) > 1e-4  # the step moved the weights
    loss_2, loss_1 = res["m1"]["loss/policy"], m1["loss/policy"]
    assert abs(loss_2 - loss_1) <= REL_TOL * abs(loss_1)
    assert res["m1"]["loss/tokens"] == m1["loss/tokens"]  # metrics reduced over both ranks
    assert abs(res["m1"]["train/grad_norm"] - m1["train/grad_norm"]) <= 1e-5 * m1["train/grad_norm"]
    assert rel_diff(res["after1"], after) <= REL_TOL


def test_two_rank_random_init(two_rank, tiny_path):
    """FSDP2 random init: the gathered full weights are HF-style random, not the checkpoint's, and train."""
    _, res = two_rank
    check_random_init({k.removeprefix("lm."): v for k, v in res["random_state"].items()}, 0.02)
    ckpt_state = full_state(Learner(load_config(None, OVERRIDES), tiny_path))
    assert rel_diff(res["random_state"], ckpt_state) > 0.5
    assert np.isfinite(res["random_m"]["loss/policy"]) and res["random_m"]["train/grad_norm"] > 0


def test_only_rank_zero_reads_the_full_model(two_rank):
    """Sharded ranks build on the meta device and receive their shards from rank 0."""
    out, _ = two_rank
    assert [torch.load(out / f"rank{r}_full_loads.pt") for r in range(2)] == [2, 0]  # two Learners per rank


def test_two_rank_resume_is_exact(two_rank):
    _, res = two_rank
    assert res["version"] == 2
    assert res["r2"]["loss/policy"] == res["m2"]["loss/policy"]
    for name, t in res["after2"].items():
        assert torch.equal(t, res["after2_resumed"][name]), name
    assert res["rng_restored"]


def test_rng_restored(tiny_path, tmp_path):
    learner = Learner(load_config(None, OVERRIDES), tiny_path)
    learner.train_step(make_batch(3)[0])
    learner.save_checkpoint(str(tmp_path / "learner"))
    expected = (torch.rand(4), np.random.rand(2), __import__("random").random())
    torch.manual_seed(99)
    np.random.seed(99)
    other = Learner(load_config(None, OVERRIDES), tiny_path)
    other.load_checkpoint(str(tmp_path / "learner"))
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1])
    assert __import__("random").random() == expected[2]
    assert other.version == 1 and other.scheduler.last_epoch == learner.scheduler.last_epoch
    assert rel_diff(full_state(other), full_state(learner)) == 0.0


def test_checkpoint_on_a_full_disk_fails_clearly_and_keeps_the_previous_one(tiny_path, tmp_path, monkeypatch):
    learner = Learner(load_config(None, OVERRIDES), tiny_path)
    state = ckpt.ControllerState(version=0, schedule=ScheduleState(0, 0, [0]), ledger=Ledger().to_state())
    with ckpt.atomic_checkpoint_dir(tmp_path, 0) as d:
        learner.save_checkpoint(str(d / ckpt.LEARNER_SUBDIR))
        ckpt.save_controller_state(d, state)
    first = ckpt.latest_checkpoint(tmp_path)
    learner.train_step(make_batch(3)[0])
    # What DCP will write: the parameters plus Adam's two moments (fp32), all on this one rank.
    params = sum(p.numel() * p.element_size() for p in learner.model.parameters())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: usage._replace(free=2 * params))
    with pytest.raises(ckpt.CheckpointError, match=r"learner.*not enough disk space.*needs ~.*GiB.*previous checkpoint"):
        with ckpt.atomic_checkpoint_dir(tmp_path, 1) as d:
            learner.save_checkpoint(str(d / ckpt.LEARNER_SUBDIR))
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000000"]
    # A write that fails part-way (torch's zip writer on a full disk) names the directory too.
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: usage)
    import torch.distributed.checkpoint as dcp

    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(dcp, "save", short_write)
    with pytest.raises(ckpt.CheckpointError, match=r"learner: writing the learner checkpoint failed .*unexpected pos"):
        with ckpt.atomic_checkpoint_dir(tmp_path, 1) as d:
            learner.save_checkpoint(str(d / ckpt.LEARNER_SUBDIR))
    assert ckpt.latest_checkpoint(tmp_path) == first
    monkeypatch.undo()
    with ckpt.atomic_checkpoint_dir(tmp_path, 1) as d:  # the real disk has room: saved
        learner.save_checkpoint(str(d / ckpt.LEARNER_SUBDIR))
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"


def test_two_rank_checkpoint_loads_unsharded_and_exports(two_rank, tiny_path, tmp_path):
    out, res = two_rank
    single = Learner(load_config(None, OVERRIDES), tiny_path)
    single.load_checkpoint(str(out / "learner"))  # resharding 2 ranks -> 1
    assert rel_diff(full_state(single), res["after1"]) == 0.0
    assert single.version == 1
    # HF export from a checkpoint directory laid out as the controller writes it
    run = tmp_path / "run"
    with ckpt.atomic_checkpoint_dir(run, 1) as tmp:
        shutil.copytree(out / "learner", tmp / ckpt.LEARNER_SUBDIR)
    ckpt.export_hf(run, tmp_path / "hf", tiny_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    exported = dict(model.named_parameters())
    for name, t in res["after1"].items():
        assert torch.equal(exported[name].detach(), t), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# ------------------------------------------------------------------ run-level checkpoint files


def test_controller_state_roundtrip(tmp_path):
    _, groups, advantages = make_batch(5)
    ledger = Ledger(["0/0/0", "0/0/1"])
    state = ckpt.ControllerState(version=3, schedule=ScheduleState(step=3, draws=17, stage_draws=[9, 8]),
                                 ledger=ledger.to_state(), buffered_groups=groups,
                                 buffered_advantages=[a.tolist() for a in advantages], buffered_draws=[(i, 1, 'cases', i) for i in range(len(groups))],
                                 in_flight=[(17, 1, "cases", 4)])
    ckpt.save_controller_state(tmp_path, state)
    back = ckpt.load_controller_state(tmp_path)
    assert back == state
    assert np.array_equal(back.buffered_groups[1].samples[2].response_ids.numpy(), groups[1].samples[2].response_ids.numpy())
    with pytest.raises(ValueError, match="advantage"):
        ckpt.save_controller_state(tmp_path, ckpt.ControllerState(version=0, schedule=ScheduleState(0, 0, [0]),
                                                                  ledger=ledger.to_state(), buffered_groups=groups))
    with pytest.raises(ckpt.CheckpointError, match="no controller state"):
        ckpt.load_controller_state(tmp_path / "missing")


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    state = ckpt.ControllerState(version=1, schedule=ScheduleState(1, 4, [4]), ledger=Ledger().to_state())
    with ckpt.atomic_checkpoint_dir(tmp_path, 1) as d:
        ckpt.save_controller_state(d, state)
    first = ckpt.latest_checkpoint(tmp_path)
    assert first is not None and first.name == "step-000001"
    pointer = (tmp_path / "checkpoints" / "latest").read_text()
    with pytest.raises(RuntimeError, match="boom"):
        with ckpt.atomic_checkpoint_dir(tmp_path, 2) as d:
            (d / "half-written").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert (tmp_path / "checkpoints" / "latest").read_text() == pointer
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001"]
    assert ckpt.load_controller_state(first) == state
    # a leftover temporary from a killed process is cleaned by the next save; keep prunes old steps
    (tmp_path / "checkpoints" / ".tmp-step-000002-dead").mkdir()
    for step in (2, 3):
        with ckpt.atomic_checkpoint_dir(tmp_path, step, keep=2) as d:
            ckpt.save_controller_state(d, state)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000003"


def test_latest_checkpoint_without_pointer_and_errors(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000010").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000010"
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")
    with pytest.raises(ValueError, match="step"):
        ckpt.step_dirname(-1)


def test_export_command(two_rank, tiny_path, tmp_path):
    import argparse

    out, _ = two_rank
    run = tmp_path / "run"
    with ckpt.atomic_checkpoint_dir(run, 1) as tmp:
        shutil.copytree(out / "learner", tmp / ckpt.LEARNER_SUBDIR)
    (run / "config.yaml").write_text(f"model:\n  path: {tiny_path}\n  dtype: bfloat16\n")
    parser = argparse.ArgumentParser()
    export_cli.add_export_arguments(parser)
    assert export_cli.run_export(parser.parse_args([str(run), str(tmp_path / "hf")])) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert export_cli.run_export(parser.parse_args([str(tmp_path / "empty"), str(tmp_path / "hf2")])) == 2
