"""The independent simulator audit (DESIGN §7): a hand-written probe bank and a scorer that share nothing
with the simulator.

``bank_dev`` / ``bank_heldout`` hold the probes (the held-out half was written
first and is never looked at while tuning); ``probes`` fills their slots from a
raw case and lays out the dialogues; ``scorer`` judges a reply's text against the
raw case fields; ``runner`` plays the dialogues through any session object with
``opening()`` / ``await respond(text)``. Held-out cases nobody tuned on:
``verimed/data/sim_audit_heldout_cases.jsonl`` (original, written for this audit).

May import: ``verimed.core.types`` and itself; NEVER ``verimed.core.simulator``
(the caller builds the sessions), so the audit cannot agree with it by construction.
"""
