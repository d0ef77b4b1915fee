"""Training: the learner, the frozen reference model, checkpoints.

- ``packing``: padding-free packed rows, micro-batches, the per-rank split of a batch;
- ``attention``: segment attention for packed rows on CPU;
- ``policy``: the HF model with the fused log-prob head;
- ``learner``: optimizer step, flat parameter buffer, FSDP2 wrapping;
- ``reference``: reference log-probs for the KL term;
- ``distributed``: the learners' process group and shared collectives;
- ``checkpoint``: atomic run checkpoints, sharded learner state, HF export;
- ``faults``: the retry policy of a failed draw, the fault counters and ``logs/faults.log``.

May import: ``config``, ``types``, ``models``, ``rl``, ``tasks.schedule`` (the
checkpointed schedule state), ``verimed.kernels``, torch.
"""
