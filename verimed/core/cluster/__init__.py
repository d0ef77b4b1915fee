"""The cluster: the placement planner (``planner``: role -> placement-group bundle, fit check) and
which actors a run starts per role (``roles``), the check that Ray placed them as planned
(``placement_check``), and a Ray cluster of loopback nodes on one machine (``loopback``: subprocess only) and its
processes by session id (``processes``).

May import: ``verimed.core.config`` only (pure Python: no ray, no torch).
"""
