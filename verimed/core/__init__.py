"""verimed's Ray-free core, by concern (docs/architecture.md, "Layout").

From the bottom up (a package imports only lower ones; ``tests/test_layout.py``
proves it and that there is no import cycle):

    config, types            the config tree and schemas; the msgspec messages
    data, models             dataset loaders; model loading, tokenizer, chat template
    rl, rollout, cluster,    learning maths and bookkeeping; engines and weight sync;
    metrics                  placement planning; the metrics sink
    rubrics, simulator       the verifier system's roles (backend-agnostic)
    tasks                    what a draw becomes: prompts, groups, dialogue slices, schedule
    train, eval              the learner and reference; HealthBench and stage-end evaluation

Nothing here imports ``ray``, ``verimed.actors`` or ``verimed.cli``.
"""
