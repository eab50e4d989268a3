"""Attacks: who attacks, which samples are poisoned and how, and what attackers do to their uploads.

Attacker identities live here (and in the metrics, which score the defense); the engine passes
them to nothing else, the labelled ``fdcr-oracle`` ablation excepted.
"""
