"""What a draw becomes, read top-down.

- ``schedule``: which stage a step belongs to, and the draw (source, item) it makes;
- ``pools``: the training pools and the held-out split;
- ``single_turn``: rule and rubric draws -> one judged group;
- ``dialogue``: multi-turn draws -> one judged group per dialogue slice;
- ``groups``: what every task shares (roles, judged group, rewards and advantages);
- ``prompts``: the doctor's system prompt, diagnosis vignettes, MCQ questions;
- ``answers``: the verifiable answer checker and format reward.

May import: ``config``, ``types``, ``data``, ``models``, ``rl``, ``rubrics``, ``simulator``.
"""
