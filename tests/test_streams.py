"""One named random stream per consumer inside the defenses (docs/protocol.md §7.5, issue 20)."""

import itertools

import pytest
import torch
import yaml

from fisherguard import config, seeding
from fisherguard.defenses import registry
from fisherguard.defenses import fdcr as fdcr_mod
from fisherguard.results import ResumeError, RunDir

pytestmark = pytest.mark.unit


def generators(streams: str, seed: int = 3) -> dict[str, torch.Generator]:
    """Every defense consumer's generator, as the defenses build it."""
    return {
        "dnc": registry.build("dnc", {"seed": seed, "streams": streams})._gen,
        "crfl": registry.build("crfl", {"seed": seed, "streams": streams})._gen,
        "foolsgold": registry.build("foolsgold", {"seed": seed, "streams": streams,
                                                  "preset": "code"})._gen,
        "rlr": registry.build("rlr", {"seed": seed, "streams": streams, "preset": "code"})._gen,
        "fdcr-oracle": registry.build("fdcr-oracle", {"seed": seed, "streams": streams})._noise,
    }


def first_draws(g: torch.Generator) -> list[int]:
    return torch.randint(0, 2**31, (8,), generator=g).tolist()


def test_two_defense_consumers_never_draw_the_same_sequence():
    draws = {name: first_draws(g) for name, g in generators("named").items()}
    for a, b in itertools.combinations(draws, 2):
        assert draws[a] != draws[b], (a, b)
    seeds = {c: seeding.defense_seed(3, c) for c in seeding.DEFENSE_STREAMS}
    assert len(set(seeds.values())) == len(seeds)
    assert 3 not in seeds.values()


def test_shared_streams_are_the_old_behaviour():
    """`shared` (runs made before issue 20): every consumer is the bare run seed, all alike."""
    draws = {name: first_draws(g) for name, g in generators("shared").items()}
    assert len({tuple(d) for d in draws.values()}) == 1
    assert list(draws.values())[0] == first_draws(torch.Generator().manual_seed(3))


def test_kmeans_starts_come_from_their_own_stream(monkeypatch):
    seen = []
    monkeypatch.setattr(fdcr_mod, "kmeans_partition",
                        lambda v, seed: seen.append(seed) or [0] * len(v))
    for streams in ("named", "shared"):
        d = registry.build("fdcr", {"clustering": "kmeans", "seed": 3, "streams": streams})
        d.select_flagged(torch.tensor([0.1, 0.2, 0.3, 5.0], dtype=torch.float64))
    assert seen[0] == seeding.defense_seed(3, "fdcr-kmeans") % 2**32 and seen[1] == 3


def test_config_passes_the_streams_to_the_defense():
    cfg = config.resolve({"defense": {"name": "dnc"}, "experiment": {"seed": 2}})
    assert cfg.experiment.streams == "named"
    d = cfg.build_defense()
    assert d.streams == "named" and d.seed == 2
    old = config.resolve({"defense": {"name": "dnc"}, "experiment": {"streams": "shared"}})
    assert old.build_defense().streams == "shared"
    assert not config.resolve({"defense": "fedavg"}).build_defense().draws_randomness()


def test_stream_state_is_saved_for_resume():
    a = registry.build("dnc", {"seed": 5})
    first_draws(a._gen)
    b = registry.build("dnc", {"seed": 5})
    b.load_state_dict(a.state_dict())
    assert first_draws(a._gen) == first_draws(b._gen)


def _old_config(defense: str) -> str:
    """A config.yaml as a run made before issue 20 wrote it (no experiment.streams)."""
    d = config.resolve({"defense": defense}).to_dict()
    del d["experiment"]["streams"]
    return yaml.safe_dump(d, sort_keys=False)


def test_resume_across_the_stream_change_is_refused_with_the_way_out(tmp_path):
    RunDir(tmp_path).start(_old_config("dnc"), resume=False)
    new = config.resolve({"defense": "dnc"})
    with pytest.raises(ResumeError, match=r'experiment\.streams: "shared" in the run, "named" now.*'
                                          r"--set experiment\.streams=shared"):
        RunDir(tmp_path).start(new.to_yaml(), resume=True)
    # continuing it as it began is allowed
    RunDir(tmp_path).start(new.replace({"experiment.streams": "shared"}).to_yaml(), resume=True)


def test_resume_of_a_run_without_defense_randomness_is_unaffected(tmp_path):
    RunDir(tmp_path).start(_old_config("fedavg"), resume=False)
    RunDir(tmp_path).start(config.resolve({"defense": "fedavg"}).to_yaml(), resume=True)


def test_runs_keep_their_names_and_matches_across_issue_20():
    """Run keys (reproduce) and report matching ignore the stream details and keys at their
    pre-issue-20 value: the committed results/ runs keep their directory names."""
    from fisherguard.report.reproduce import config_for, run_key
    from fisherguard.results import identity_part

    assert run_key(config_for("fdcr-t4", "dnc", "usps", 0.5, 30, 0)) == \
        "usps-dnc-b0.5-u30-paper-s0-1552a0ee4325"
    assert run_key(config_for("fdcr-t4", "fedavg", "usps", 0.5, 30, 0)) == \
        "usps-fedavg-b0.5-u30-paper-s0-d817d293714c"
    new = config_for("fdcr-t4", "dnc", "usps", 0.5, 30, 0)
    old = new.to_dict()
    for sec, key in (("experiment", "streams"), ("partition", "stream"),
                     ("federation", "fisher_data"), ("server", "root_set")):
        del old[sec][key]
    assert identity_part(yaml.safe_dump(old)) == identity_part(new.to_yaml())
    code = config_for("fdcr-t4", "dnc", "usps", 0.5, 30, 0, preset="code")
    assert identity_part(code.to_yaml())["partition"]["stream"] == "legacy-global"
