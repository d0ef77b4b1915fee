"""Emulated devices (DESIGN §11): backends that keep every interface of the real
ones but wait for the time a device profile gives instead of computing.

- ``roles``: the LLM roles (patient simulator, rubric generator, judge) over
  emulated engines: content from their rules backends, timing from the LLM calls
  the real role would make.

May import: ``verimed.core.config``, ``types``, ``rollout``, ``rubrics``, ``simulator``.
"""
