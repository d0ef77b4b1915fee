"""The learning maths and its bookkeeping (DESIGN §3-4).

- ``advantages``: group rewards and GRPO advantages (eq. 2-3), through the kernels' dispatcher;
- ``loss``: the decoupled-PPO GRPO loss, aggregations, KL, GSPO, M2PO, metrics;
- ``staleness``: admission control, the exactly-once ledger, staleness statistics;
- ``batch``: judged groups -> one packed ``TrainBatch``.

May import: ``verimed.core.config``, ``verimed.core.types``, ``verimed.kernels``, numpy, torch.
"""
