"""The cluster: the placement planner (``planner``: role -> placement-group bundle, fit check).

May import: ``verimed.core.config`` only (pure Python: no ray, no torch).
"""
