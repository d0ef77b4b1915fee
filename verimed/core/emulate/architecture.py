"""Parameter names, shapes and dtypes of a Llama / Qwen2-family causal LM from its HF config fields, no tensors.

What an emulated learner announces in a weight sync (:class:`verimed.core.types.WeightVersion`):
the same triples the real learner's ``named_parameters()`` gives for a model of that size, in the
same order, so the real coordinator, bucket planner and ``check_against`` run on the target
architecture (a 32B model plans 771 tensors and 65.5 GB) while nothing is allocated.

The fields are those of the model's ``config.json`` (the profile carries them); a test builds the
same transformers config and model on the meta device and checks the names and shapes match exactly.
"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from verimed.core.rollout.sync_plan import WIRE_DTYPE_BYTES

Positive = Annotated[int, Meta(ge=1)]


class Architecture(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``config.json`` fields that fix a decoder's parameter shapes (HF names and meanings)."""

    model_type: Literal["qwen2", "llama"]  # qwen2: q/k/v projections carry a bias; llama: attention_bias says
    vocab_size: Positive
    hidden_size: Positive
    intermediate_size: Positive
    num_hidden_layers: Positive
    num_attention_heads: Positive
    num_key_value_heads: Positive
    head_dim: Positive | None = None  # None: hidden_size // num_attention_heads (HF's default)
    tie_word_embeddings: bool = False  # tied: no separate lm_head.weight parameter
    attention_bias: bool = False  # llama only: bias on q/k/v/o (qwen2 always has q/k/v bias, never o)
    mlp_bias: bool = False  # llama only

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads} (give head_dim)")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


def parameter_shapes(arch: Architecture) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter, in ``model.named_parameters()`` order (checkpoint names).

    Per layer l (H = hidden, D = head dim, q = heads·D, kv = kv heads·D, I = intermediate, V = vocab)::

        model.embed_tokens.weight                      [V, H]
        model.layers.l.self_attn.{q,k,v}_proj.weight   [q | kv | kv, H]   (+ bias [q | kv | kv])
        model.layers.l.self_attn.o_proj.weight         [H, q]             (+ bias [H], llama attention_bias)
        model.layers.l.mlp.{gate,up}_proj.weight       [I, H]
        model.layers.l.mlp.down_proj.weight            [H, I]
        model.layers.l.{input,post_attention}_layernorm.weight  [H]
        model.norm.weight                              [H]
        lm_head.weight                                 [V, H]  only when not tied
    """
    h, d = arch.hidden_size, arch.dim_per_head
    q, kv, inter = arch.num_attention_heads * d, arch.num_key_value_heads * d, arch.intermediate_size
    qkv_bias = arch.model_type == "qwen2" or arch.attention_bias
    o_bias = arch.model_type == "llama" and arch.attention_bias
    mlp_bias = arch.model_type == "llama" and arch.mlp_bias
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (arch.vocab_size, h))]
    for layer in range(arch.num_hidden_layers):
        p = f"model.layers.{layer}."
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out.append((f"{p}self_attn.{proj}.weight", (rows, h)))
            if qkv_bias:
                out.append((f"{p}self_attn.{proj}.bias", (rows,)))
        out.append((f"{p}self_attn.o_proj.weight", (h, q)))
        if o_bias:
            out.append((f"{p}self_attn.o_proj.bias", (h,)))
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            out.append((f"{p}mlp.{proj}.weight", shape))
            if mlp_bias:
                out.append((f"{p}mlp.{proj}.bias", (shape[0],)))
        out += [(f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not arch.tie_word_embeddings:
        out.append(("lm_head.weight", (arch.vocab_size, h)))
    return out


def parameter_triples(arch: Architecture, dtype: str) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of every parameter, all in ``dtype`` (the engines' wire dtype)."""
    if dtype not in WIRE_DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(WIRE_DTYPE_BYTES)}, got {dtype!r}")
    return [(name, shape, dtype) for name, shape in parameter_shapes(arch)]


def num_parameters(arch: Architecture) -> int:
    """N, the parameter count (tied embeddings counted once)."""
    total = 0
    for _, shape in parameter_shapes(arch):
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
