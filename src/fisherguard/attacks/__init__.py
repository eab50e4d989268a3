"""Attacks: which samples are poisoned and how. Attacker identities live here and in metrics only."""
