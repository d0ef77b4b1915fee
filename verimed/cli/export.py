"""``verimed export RUN_DIR OUT_DIR``: a run's newest (or a given) checkpoint as a Hugging Face directory."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from verimed.core.config import load_config
from verimed.core.models import resolve_model_path
from verimed.core.train.checkpoint import CheckpointError, export_hf, resolve_checkpoint


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (newest checkpoint) or one checkpoint directory")
    parser.add_argument("out_dir", help="where to write the Hugging Face model directory")
    parser.add_argument("--base-model", default=None,
                        help="architecture/tokenizer source; default: model.path of RUN_DIR/config.yaml")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="saved dtype; default: model.dtype of the run config")


def run_export(args: argparse.Namespace) -> int:
    """Entry point of ``verimed export RUN_DIR OUT_DIR`` (after argument parsing)."""
    run_dir = Path(args.run_dir)
    try:
        ckpt = resolve_checkpoint(run_dir)
        config_file = next((p / "config.yaml" for p in (run_dir, ckpt.parent.parent) if (p / "config.yaml").is_file()), None)
        cfg = load_config(config_file) if config_file is not None else None
        if args.base_model is None and cfg is None:
            raise CheckpointError(f"{run_dir}: no config.yaml found; pass --base-model")
        base = resolve_model_path(args.base_model or cfg.model.path, cfg.model.cache_dir if cfg else None)
        dtype = args.dtype or (cfg.model.dtype if cfg else "float32")
        export_hf(ckpt, args.out_dir, base, dtype)
    except CheckpointError as exc:
        print(f"verimed: error: {exc}", file=sys.stderr)
        return 2
    print(f"verimed: exported {ckpt} to {Path(args.out_dir).resolve()}", file=sys.stderr)
    return 0
