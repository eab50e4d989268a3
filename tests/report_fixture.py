"""Hand-written run directories (config.yaml + summary.json) for the report tests."""

from __future__ import annotations

import json
from pathlib import Path

from fisherguard.report.reproduce import config_for, run_key


def fake_run(root: Path, table: str, method: str, dataset: str, beta: float, upsilon: int,
             seed: int, *, A: float, R: float, preset: str = "paper", collapsed: bool = False,
             complete: bool = True, **extra: float) -> Path:
    """A finished run directory named as `fisherguard reproduce` names it."""
    cfg = config_for(table, method, dataset, beta, upsilon, seed, preset=preset)
    d = root / run_key(cfg)
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(cfg.to_yaml())
    (d / "rounds.jsonl").write_text("")
    summary = {"label": method, "defense": cfg.defense.name, "rounds": cfg.federation.rounds,
               "A": A, "R": R, "ASR": 100.0 - R, "V": (A + R) / 2, "collapsed": collapsed,
               "dataset": dataset, "seed": seed, "preset": preset,
               "family": cfg.experiment.family, "beta": beta,
               "attack_fraction": upsilon / 100, "complete": complete, **extra}
    (d / "summary.json").write_text(json.dumps(summary))
    return d
