"""Multi-turn RL with the patient simulator (paper stage 3): dialogue slices with token ids kept end to end.

    async for result in dialogue_slices(roles, cfg, case, draw, max_slices=6, continuation="sampled"):
        buffer.put_nowait(result)          # one GroupResult per slice (doctor turn)

A dialogue starts from the chat-template ids of [system, patient opening].
After each patient turn the conversation so far is a *slice*: the rubric
generator writes a rubric for it, the engine samples G candidate doctor
replies (uids ``"<draw>/<slice>/<i>"``), the judge grades them, and one
candidate (``best`` rubric score or ``sampled`` uniformly) continues the
dialogue; it ends at the simulator's termination gate, after ``max_slices``
slices, or when the next prompt would not fit the model's context.

Token ids are never re-tokenised: :class:`Dialogue` holds the conversation as
segments — the prompt's template ids, each chosen doctor reply's exact engine
ids, and each patient turn's ids, where only the *new* patient turn is
tokenised: the chat template is rendered as text with a sentinel doctor turn
and the suffix after the sentinel (end of doctor turn, patient turn, next
assistant header) is tokenised on its own. A candidate's sample is
(prompt = dialogue ids so far, response = its engine ids), so
``verimed.core.rl.batch.build_train_batch`` puts loss on the current doctor
reply only; earlier doctor turns are context (``Dialogue.loss_mask`` shows
which tokens the policy generated).
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Sequence

import msgspec
import numpy as np

from verimed.core.config import Config
from verimed.core.models import apply_chat_template
from verimed.core.simulator import sample_persona
from verimed.core.tasks.groups import GroupResult, Roles, judge_group
from verimed.core.tasks.prompts import DOCTOR_SYSTEM_PROMPT
from verimed.core.types import Array, Case, Prompt, Sample, Turn

# A doctor turn stand-in when rendering the template as text; never tokenised.
SENTINEL = "VERIMED-DOCTOR-TURN-7f3a9c"
SegmentRole = Literal["prompt", "doctor", "patient", "template"]


class Segment(msgspec.Struct, frozen=True):
    """A run of token ids of the dialogue: ``doctor`` ids are engine output, the rest template/tokeniser output."""

    role: SegmentRole
    token_ids: list[int]
    text: str


def _dicts(turns: Sequence[Turn]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in turns]


def template_delta(tokenizer: Any, history: Sequence[Turn], patient_text: str) -> str:
    """Template text between the end of a doctor turn's content and the next doctor turn's content.

    Renders ``history + [assistant SENTINEL, user patient_text]`` with a
    generation prompt and returns what follows the sentinel, e.g. for ChatML
    ``"<|im_end|>\\n<|im_start|>user\\n{patient}<|im_end|>\\n<|im_start|>assistant\\n"``.
    """
    rendered = tokenizer.apply_chat_template(
        _dicts(history) + [{"role": "assistant", "content": SENTINEL}, {"role": "user", "content": patient_text}],
        tokenize=False, add_generation_prompt=True)
    at = rendered.rfind(SENTINEL)
    if at < 0:
        raise ValueError("the chat template dropped an assistant turn: cannot continue a dialogue with it")
    return rendered[at + len(SENTINEL):]


class Dialogue:
    """A doctor/patient conversation as token-id segments plus its :class:`Turn` view.

    ``end_token_id``: the token that ends a doctor turn and stops the engine
    (default: the tokenizer's EOS, ``<|im_end|>`` for ChatML models).
    """

    def __init__(self, tokenizer: Any, messages: Sequence[Turn], end_token_id: int | None = None):
        if not messages or messages[-1].role != "user":
            raise ValueError("a dialogue starts from messages ending with the patient's turn (role 'user')")
        self.tokenizer = tokenizer
        self.end_id = int(tokenizer.eos_token_id if end_token_id is None else end_token_id)
        self.end_text = tokenizer.decode([self.end_id])
        self.turns: list[Turn] = list(messages)
        ids = apply_chat_template(tokenizer, _dicts(messages))
        self.segments: list[Segment] = [Segment("prompt", ids, tokenizer.decode(ids))]

    def prompt_ids(self) -> list[int]:
        """All ids so far; ends with the assistant header, ready for the next doctor reply."""
        return [i for seg in self.segments for i in seg.token_ids]

    def loss_mask(self) -> np.ndarray:
        """float32 [len(prompt_ids)]: 1 on tokens the policy generated (doctor replies), 0 on template/patient."""
        return np.concatenate([np.full(len(s.token_ids), 1.0 if s.role == "doctor" else 0.0, np.float32)
                               for s in self.segments])

    @property
    def num_doctor_turns(self) -> int:
        return sum(t.role == "assistant" for t in self.turns)

    def append_doctor(self, token_ids: Sequence[int] | np.ndarray, text: str) -> None:
        """Append the engine's exact reply ids; close the turn with the end token if the reply was truncated."""
        if self.turns[-1].role != "user":
            raise ValueError("append_doctor: the last turn is already the doctor's (append the patient's reply first)")
        ids = [int(i) for i in np.asarray(token_ids).reshape(-1)]
        self.segments.append(Segment("doctor", ids, text))
        if not ids or ids[-1] != self.end_id:
            # Truncated at max_tokens: the template needs the end-of-turn token before the next turn.
            self.segments.append(Segment("template", [self.end_id], self.end_text))
        self.turns.append(Turn(role="assistant", content=text, token_ids=Array.of(np.asarray(ids, np.int32))))

    def append_patient(self, text: str) -> None:
        """Tokenise only the new patient turn (with the template's delimiters) and append it."""
        if self.turns[-1].role != "assistant":
            raise ValueError("append_patient: the doctor has not replied yet")
        delta = template_delta(self.tokenizer, self.turns[:-1], text)
        if not delta.startswith(self.end_text):
            raise ValueError(f"the chat template ends a doctor turn with {delta[:20]!r}, not the engine's end token "
                             f"{self.end_text!r}: set end_token_id to the template's end-of-turn token")
        delta = delta[len(self.end_text):]  # the doctor segment already ends with the end token
        ids = [int(i) for i in self.tokenizer.encode(delta, add_special_tokens=False)]
        self.segments.append(Segment("patient", ids, delta))
        self.turns.append(Turn(role="user", content=text))


def slice_samples(dialogue: Dialogue, samples: Sequence[Sample]) -> list[Sample]:
    """Check every candidate was generated from exactly the dialogue's ids; return them for the batch.

    ``build_train_batch`` packs each as prompt (no loss) ++ response (loss), so
    only the current doctor reply carries loss.
    """
    expected = np.asarray(dialogue.prompt_ids(), np.int32)
    for s in samples:
        if not np.array_equal(s.prompt_ids.numpy(), expected):
            raise ValueError(f"sample {s.uid}: prompt ids differ from the dialogue's ids (re-tokenised?)")
    return list(samples)


def choose_continuation(scores: Sequence[float], mode: str, rng: np.random.Generator) -> int:
    """Index of the candidate that continues the dialogue.

    ``best``: highest score (ties broken uniformly at random); ``sampled``: a
    uniform draw (keeps the dialogue on the policy's own distribution).
    """
    if not len(scores):
        raise ValueError("no candidates to continue with")
    if mode == "best":
        s = np.asarray(scores, dtype=np.float64)
        return int(rng.choice(np.flatnonzero(s == s.max())))
    if mode == "sampled":
        return int(rng.integers(len(scores)))
    raise ValueError(f"continuation must be 'best' or 'sampled', got {mode!r}")


class DialogueEnd(msgspec.Struct, frozen=True):
    slices: int
    reason: str  # "gate: <simulator reason>", "max_slices", "context", "stopped"
    transcript: list[Turn]


async def dialogue_slices(roles: Roles, cfg: Config, case: Case, draw: int, *, max_slices: int,
                          continuation: str = "sampled", n: int | None = None,
                          admit: Callable[[], Awaitable[bool | None]] | None = None,
                          on_end: Callable[[DialogueEnd], None] | None = None) -> AsyncIterator[GroupResult]:
    """Play ``case`` with the simulator; yield one judged :class:`GroupResult` per slice.

    ``n``: candidates per slice (default ``cfg.rollout.group_size``); ``admit``:
    awaited before every slice after the first (admission control; returning
    False ends the dialogue with reason "stopped");
    ``on_end``: called once with how the dialogue ended.
    """
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    n = n or cfg.rollout.group_size
    session = f"draw-{draw}"
    persona = sample_persona(cfg.run.seed * 1_000_003 + draw, case, mbti=cfg.simulator.persona)
    rng = np.random.default_rng([cfg.run.seed, draw, 0xD1A])
    opening = await roles.simulator.start(session, case, persona)
    dialogue = Dialogue(roles.tokenizer, [Turn(role="system", content=DOCTOR_SYSTEM_PROMPT),
                                          Turn(role="user", content=opening)])
    reason, done = "max_slices", 0
    try:
        for k in range(max_slices):
            ids = dialogue.prompt_ids()
            if len(ids) + cfg.rollout.max_tokens > cfg.model.max_model_len:
                reason = "context"
                break
            if admit is not None and k > 0 and await admit() is False:
                reason = "stopped"  # e.g. the run moved on to the next stage
                break
            prompt = Prompt(index=draw, source="multiturn", messages=list(dialogue.turns), case_id=case.case_id)
            prompt = msgspec.structs.replace(prompt, rubric=await roles.rubrics.generate(case, prompt.messages))
            samples = await roles.generate(f"{draw}/{k}", ids, n, cfg.run.seed + draw * 1000 + k * n, rollout=cfg.rollout)
            result = await judge_group(roles, cfg, prompt, slice_samples(dialogue, samples))
            done = k + 1
            yield result
            pick = result.group.samples[choose_continuation(result.group.rubric_scores, continuation, rng)]
            dialogue.append_doctor(pick.response_ids.numpy(), pick.text)
            reply = await roles.simulator.respond(session, pick.text)
            if reply.done:
                reason = f"gate: {reply.reason}"
                break
            dialogue.append_patient(reply.text)
    finally:
        close = getattr(roles.simulator, "close", None)
        if close is not None:
            await close(session)
    if on_end is not None:
        on_end(DialogueEnd(slices=done, reason=reason, transcript=list(dialogue.turns)))


async def run_dialogue(roles: Roles, cfg: Config, case: Case, draw: int, *, max_slices: int,
                       continuation: str = "sampled", n: int | None = None) -> tuple[list[GroupResult], DialogueEnd]:
    """All slices of one dialogue (tests, benchmarks and held-out evaluation)."""
    ends: list[DialogueEnd] = []
    results = [r async for r in dialogue_slices(roles, cfg, case, draw, max_slices=max_slices,
                                                continuation=continuation, n=n, on_end=ends.append)]
    return results, ends[0]


def consultation_score(results: Sequence[GroupResult]) -> float:
    """Mean rubric score over every candidate of every slice (the held-out consultation score)."""
    scores = [s for r in results for s in r.group.rubric_scores]
    return float(np.mean(scores)) if scores else float("nan")
