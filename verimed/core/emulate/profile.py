"""The device profile (``configs/profiles/*.yaml``) and the pure time functions it feeds.

A profile says how fast the devices of a cluster are: decode and prefill speed of one engine
per tensor-parallel size, learner and reference tokens/s per GPU, weight-sync bandwidth, and the
latency of the simulator / judge / rubric-generator roles. Emulated devices wait the times these
functions give (divided by ``emulation.time_scale``) instead of computing. Every profile is labelled
with how its numbers were obtained (``basis``) and what they assume (``assumption``).

    profile = load_profile("h100-qwen2.5-7b")        # a name under configs/profiles/, or a path
    decode_tokens_per_s_per_seq(profile, concurrency=64, tp=1)
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml
from msgspec import Meta

from verimed.core.config.base import ConfigError
from verimed.core.emulate.architecture import Architecture

PROFILES_DIR = Path(__file__).resolve().parents[3] / "configs" / "profiles"
ROLES = ("simulator", "judge", "rubric_generator")

PositiveFloat = Annotated[float, Meta(gt=0.0)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]
PositiveInt = Annotated[int, Meta(ge=1)]


class ProfileError(ConfigError):
    """A device profile is missing or malformed; the message names the file and the key."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class EngineSpeed(_Section):
    """One engine of a given tensor-parallel size: a decode step costs ``step_s + c·step_s_per_seq``."""

    step_s: PositiveFloat  # seconds of one decode step with one sequence (reading the weights once)
    step_s_per_seq: NonNegFloat  # seconds each further concurrent sequence adds to a step (KV reads, compute)
    prefill_tokens_per_s: PositiveFloat  # prompt tokens per second of one engine


class RolloutProfile(_Section):
    by_tp: dict[int, EngineSpeed]  # tensor_parallel_size -> speed of one engine of that size
    # Response length model: a normal draw (seeded per sample) clipped to [1, max_tokens];
    # a draw at or above max_tokens ends with finish_reason "length", below it with "stop".
    response_tokens_mean: PositiveFloat
    response_tokens_std: NonNegFloat
    tick_s: PositiveFloat = 0.25  # modelled seconds per engine tick (tokens are stamped per tick)


class LearnerProfile(_Section):
    train_tokens_per_s_per_gpu: PositiveFloat  # forward + backward, every token of the packed batch
    forward_tokens_per_s_per_gpu: PositiveFloat  # a no-grad forward (pi_prox recompute, score)
    optimizer_step_s: NonNegFloat  # per optimizer step (gradient reduce-scatter, Adam), independent of tokens


class ReferenceProfile(_Section):
    forward_tokens_per_s_per_gpu: PositiveFloat


class SyncProfile(_Section):
    bandwidth_gb_per_s: PositiveFloat  # learner rank 0 -> every engine worker, GB (1e9 bytes) per second
    latency_s: NonNegFloat  # fixed cost of one sync (pause, group set-up, reload)


class RoleLatency(_Section):
    call_s: NonNegFloat  # fixed seconds per call (scheduling, network)
    per_token_s: NonNegFloat  # seconds per output token when no emulated engine serves the role
    output_tokens: PositiveInt  # typical answer length of one call


class DeviceProfile(_Section):
    name: str
    # How the numbers were obtained: measured and fitted, derived from published figures, or
    # placeholders waiting for a fit. Either way they are assumptions until checked on the hardware.
    basis: Literal["fitted", "published", "to-be-fitted"]
    assumption: str  # one line: what the numbers assume (hardware, MFU, ...)
    architecture: Architecture  # the policy model's config.json fields (weight-sync shapes)
    rollout: RolloutProfile
    learner: LearnerProfile
    reference: ReferenceProfile
    weight_sync: SyncProfile
    roles: dict[str, RoleLatency]
    path: str = ""  # the file it was loaded from (set by load_profile; for error messages)

    def __post_init__(self) -> None:
        missing = [r for r in ROLES if r not in self.roles]
        if missing:
            raise ValueError(f"roles: missing {missing} (needs {list(ROLES)})")
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise ValueError(f"roles: unknown {unknown} (allowed: {list(ROLES)})")
        if not self.rollout.by_tp or any(tp < 1 for tp in self.rollout.by_tp):
            raise ValueError(f"rollout.by_tp: needs tensor-parallel sizes >= 1, got {sorted(self.rollout.by_tp)}")


def profile_path(name_or_path: str) -> Path:
    """``configs/profiles/<name>.yaml`` for a bare name, else the path as given."""
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        return PROFILES_DIR / f"{name_or_path}.yaml"
    return Path(name_or_path).expanduser()


def load_profile(name_or_path: str) -> DeviceProfile:
    """Load and check a profile; :class:`ProfileError` names the file and the key on any mistake."""
    path = profile_path(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")) if PROFILES_DIR.is_dir() else []
        raise ProfileError(f"emulation.profile = {name_or_path!r}: no profile file {path} (shipped: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping of profile sections, got {type(raw).__name__}")
    try:
        profile = msgspec.convert(raw, DeviceProfile, strict=False)
    except msgspec.ValidationError as exc:
        problem, _, where = str(exc).rpartition(" - at `")
        key = where.rstrip("`").lstrip("$").lstrip(".") if problem else ""
        raise ProfileError(f"{path}: {key or '<root>'}: {problem or exc}") from None
    return msgspec.structs.replace(profile, path=str(path))


# ------------------------------------------------------------ time functions (modelled seconds)


def engine_speed(profile: DeviceProfile, tp: int) -> EngineSpeed:
    """The speed of one engine of tensor-parallel size ``tp``; ProfileError when the profile lacks it."""
    speed = profile.rollout.by_tp.get(tp)
    if speed is None:
        raise ProfileError(f"{profile.path or profile.name}: rollout.by_tp has no entry for tensor_parallel_size {tp} "
                           f"(has {sorted(profile.rollout.by_tp)})")
    return speed


def decode_step_seconds(profile: DeviceProfile, concurrency: int, tp: int) -> float:
    """Seconds of one decode step of an engine running ``concurrency`` sequences:

        t_step(c) = step_s + c · step_s_per_seq          (c >= 1; c = 0 counts as 1)

    The first term is the weight read every step pays once (memory-bound), the second the
    per-sequence KV reads and compute, so aggregate throughput c / t_step(c) saturates at
    1 / step_s_per_seq.
    """
    speed = engine_speed(profile, tp)
    return speed.step_s + max(1, concurrency) * speed.step_s_per_seq


def decode_tokens_per_s_per_seq(profile: DeviceProfile, concurrency: int, tp: int) -> float:
    """Tokens per second each of ``concurrency`` sequences gets: r(c) = 1 / t_step(c) (every active
    sequence advances one token per step, so they all share the rate of the current concurrency)."""
    return 1.0 / decode_step_seconds(profile, concurrency, tp)


def prefill_seconds(profile: DeviceProfile, tokens: int, tp: int) -> float:
    """Seconds to prefill ``tokens`` prompt tokens: tokens / prefill_tokens_per_s(tp)."""
    if tokens < 0:
        raise ValueError(f"prefill_seconds: tokens must be >= 0, got {tokens}")
    return tokens / engine_speed(profile, tp).prefill_tokens_per_s


def learner_seconds(profile: DeviceProfile, tokens: int, gpus: int, forward_passes: int = 0,
                    optimizer_steps: int = 1) -> float:
    """Seconds of one learner step over ``tokens`` packed tokens on ``gpus`` data-parallel GPUs:

        t = tokens / (train_tps · w) + forward_passes · tokens / (forward_tps · w) + optimizer_steps · optimizer_step_s

    ``forward_passes``: extra no-grad passes over the batch (1 for the pi_prox recompute when
    M > 1 or M2PO is on); ``optimizer_steps``: the M minibatches.
    """
    if tokens < 0 or gpus < 1 or forward_passes < 0 or optimizer_steps < 0:
        raise ValueError(f"learner_seconds: tokens {tokens} >= 0, gpus {gpus} >= 1, forward_passes "
                         f"{forward_passes} >= 0, optimizer_steps {optimizer_steps} >= 0 expected")
    lp = profile.learner
    return (tokens / (lp.train_tokens_per_s_per_gpu * gpus)
            + forward_passes * tokens / (lp.forward_tokens_per_s_per_gpu * gpus)
            + optimizer_steps * lp.optimizer_step_s)


def score_seconds(profile: DeviceProfile, tokens: int, gpus: int) -> float:
    """Seconds of a learner no-grad forward over ``tokens``: tokens / (forward_tps · w)."""
    return tokens / (profile.learner.forward_tokens_per_s_per_gpu * max(1, gpus))


def reference_seconds(profile: DeviceProfile, tokens: int, gpus: int) -> float:
    """Seconds of a reference forward over ``tokens`` on ``gpus`` replicas: tokens / (ref_tps · w)."""
    if tokens < 0 or gpus < 1:
        raise ValueError(f"reference_seconds: tokens {tokens} >= 0 and gpus {gpus} >= 1 expected")
    return tokens / (profile.reference.forward_tokens_per_s_per_gpu * gpus)


def sync_seconds(profile: DeviceProfile, num_bytes: int) -> float:
    """Seconds of one weight sync of ``num_bytes``: latency_s + num_bytes / (bandwidth_gb_per_s · 1e9)."""
    if num_bytes < 0:
        raise ValueError(f"sync_seconds: num_bytes must be >= 0, got {num_bytes}")
    return profile.weight_sync.latency_s + num_bytes / (profile.weight_sync.bandwidth_gb_per_s * 1e9)


def role_call_seconds(profile: DeviceProfile, role: str, output_tokens: int | None = None) -> float:
    """Seconds of one call of ``role`` not served by an emulated engine: call_s + n · per_token_s,
    with n = ``output_tokens`` or the role's typical ``output_tokens``."""
    spec = role_latency(profile, role)
    n = spec.output_tokens if output_tokens is None else output_tokens
    return spec.call_s + n * spec.per_token_s


def role_latency(profile: DeviceProfile, role: str) -> RoleLatency:
    if role not in profile.roles:
        raise ValueError(f"unknown role {role!r}: the profile has {sorted(profile.roles)}")
    return profile.roles[role]


def wait_seconds(modelled_s: float, time_scale: float) -> float:
    """Wall seconds to wait for ``modelled_s``: modelled_s / time_scale (emulation.time_scale)."""
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    return modelled_s / time_scale
