"""The cluster: the placement planner (``planner``: role -> placement-group bundle, fit check) and
which actors a run starts per role (``roles``).

May import: ``verimed.core.config`` only (pure Python: no ray, no torch).
"""
