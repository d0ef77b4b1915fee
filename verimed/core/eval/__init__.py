"""Evaluation: HealthBench (``healthbench``, exact reference scoring) and the held-out
evaluation at the end of each stage (``stage``).

May import: ``config``, ``types``, ``data``, ``models``, ``rollout``, ``rubrics``, ``tasks``.
"""
