"""The `paper` / `code` presets: the resolved-difference view (docs/protocol.md §8, issue 20)."""

from pathlib import Path

import pytest
import yaml

from fisherguard import config
from fisherguard.cli import main

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).parents[1] / "configs"


def fmnist(defense: str, **sections) -> dict:
    raw = {"experiment": {"family": "fdcr"}, "data": {"dataset": "fashion-mnist"},
           "defense": defense}
    for sec, values in sections.items():
        raw.setdefault(sec, {}).update(values)
    return raw


def free(diffs) -> dict:
    return {d.key: (d.paper, d.code) for d in diffs if not d.is_pinned}


def test_fdcr_view_lists_the_config_and_defense_differences():
    diffs = free(config.preset_differences(fmnist("fdcr")))
    assert diffs["server.val_size"] == (256, None)
    assert diffs["server.transform"] == ("test", "train")
    assert diffs["partition.stream"] == ("named", "legacy-global")
    assert diffs["federation.fisher_data"] == ("plain", "train_loader")
    assert diffs["defense.fdcr.discrepancy"] == ("mse", "l2")
    assert diffs["defense.fdcr.fisher_estimator"] == ("per_sample", "official_label_mixed")
    assert "experiment.preset" not in diffs


def test_sdfc_view_lists_lambda_and_fdagg():
    diffs = free(config.preset_differences(fmnist("sdfc", experiment={"family": "sdfc"})))
    assert diffs["defense.sdfc.lambda_reg"] == (5.0, 1.0)
    assert diffs["defense.sdfc.fdagg_weights"] == ("sigmoid", "softmax")
    assert diffs["defense.sdfc.fisher_estimator"] == ("per_sample", "official_label_mixed")


def test_a_value_the_config_sets_is_shown_as_pinned():
    raw = fmnist("sdfc", server={"val_size": 128})
    raw["defense"] = {"name": "sdfc", "options": {"lambda_reg": 5.0}}
    diffs = config.preset_differences(raw)
    pinned = {d.key: d for d in diffs if d.is_pinned}
    assert pinned["server.val_size"].pinned == 128
    assert (pinned["server.val_size"].paper, pinned["server.val_size"].code) == (256, None)
    assert pinned["defense.sdfc.lambda_reg"].pinned == 5.0
    assert "server.val_size" not in free(diffs) and "defense.sdfc.lambda_reg" not in free(diffs)


def test_cli_presets_prints_the_view(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(fmnist("fdcr")))
    assert main(["presets", str(p)]) == 0
    out = capsys.readouterr().out
    assert "resolve differently under paper and code" in out
    for needle in ("server.transform", "defense.fdcr.discrepancy", "official_label_mixed"):
        assert needle in out
    assert main(["presets", str(CONFIGS / "fmnist-paper.yaml"), "--set", "defense=sdfc"]) == 0
    assert "defense.sdfc.fdagg_weights" in capsys.readouterr().out


@pytest.mark.parametrize("family,dataset,rounds", [
    ("fdcr", "fashion-mnist", 100), ("fdcr", "cifar10", 100), ("fdcr", "usps", 100),
    ("fdcr", "mnist", 50), ("sdfc", "fashion-mnist", 50), ("sdfc", "cifar10", 50)])
def test_code_rounds_follow_the_released_configs(family, dataset, rounds):
    raw = {"experiment": {"family": family, "preset": "code"}, "data": {"dataset": dataset}}
    assert config.resolve(raw).federation.rounds == rounds
    raw["experiment"]["preset"] = "paper"
    assert config.resolve(raw).federation.rounds == 50
    raw["experiment"]["preset"] = "code"
    raw["federation"] = {"rounds": 7}
    assert config.resolve(raw).federation.rounds == 7  # a value the config sets wins


def test_view_shows_the_rounds_and_a_config_that_pins_them():
    assert free(config.preset_differences(fmnist("fdcr")))["federation.rounds"] == (50, 100)
    shipped = yaml.safe_load((CONFIGS / "fmnist-paper.yaml").read_text())
    pinned = {d.key: d for d in config.preset_differences(shipped) if d.is_pinned}
    assert (pinned["federation.rounds"].pinned, pinned["federation.rounds"].code) == (50, 100)


def test_view_shows_the_strong_augmentation_for_sdfc_on_cifar10():
    raw = {"experiment": {"family": "sdfc"}, "data": {"dataset": "cifar10"}, "defense": "sdfc"}
    assert free(config.preset_differences(raw))["server.transform"] == ("test", "strong")


def test_view_shows_the_root_set_and_marks_values_a_defense_never_reads():
    diffs = {d.key: d for d in config.preset_differences(fmnist("fltrust")) if not d.is_pinned}
    assert (diffs["server.root_set"].paper, diffs["server.root_set"].code) == ("U", "mnist-5000")
    assert not diffs["server.root_set"].unused and not diffs["server.val_size"].unused
    fdcr = {d.key: d for d in config.preset_differences(fmnist("fdcr")) if not d.is_pinned}
    assert fdcr["server.root_set"].unused and fdcr["server.val_size"].unused
    assert not fdcr["federation.fisher_data"].unused


# Every paper/code difference protocol.md §8 and issue 20 name, by the key that holds it.
SPEC_DIFFERENCES = {
    "fdcr": ["federation.rounds", "server.val_size", "server.transform", "partition.stream",
             "federation.fisher_data", "defense.fdcr.fisher_estimator", "defense.fdcr.discrepancy"],
    "sdfc": ["server.val_size", "server.transform", "partition.stream", "federation.fisher_data",
             "defense.sdfc.lambda_reg", "defense.sdfc.fdagg_weights",
             "defense.sdfc.fisher_estimator"],
}


@pytest.mark.parametrize("defense", ["fdcr", "sdfc"])
def test_view_lists_every_difference_the_spec_names(defense):
    diffs = free(config.preset_differences(fmnist(defense)))
    missing = [k for k in SPEC_DIFFERENCES[defense] if k not in diffs]
    assert missing == []
    cifar = free(config.preset_differences({"experiment": {"family": "sdfc"},
                                            "data": {"dataset": "cifar10"}, "defense": "sdfc"}))
    assert cifar["server.transform"] == ("test", "strong")


def test_a_code_run_made_before_the_new_keys_is_not_resumed_silently(tmp_path):
    """A `code` FDCR run whose config.yaml predates issue 20 partitioned from the named stream,
    with the plain Fisher: resuming it under today's `code` is refused, naming each key."""
    from fisherguard.results import ResumeError, RunDir

    new = config.resolve({"experiment": {"preset": "code"}, "data": {"dataset": "usps"},
                          "federation": {"rounds": 100}, "defense": "fdcr"})
    old = new.to_dict()
    for sec, key in (("experiment", "streams"), ("partition", "stream"),
                     ("federation", "fisher_data"), ("server", "root_set")):
        del old[sec][key]
    RunDir(tmp_path).start(yaml.safe_dump(old, sort_keys=False), resume=False)
    with pytest.raises(ResumeError) as e:
        RunDir(tmp_path).start(new.to_yaml(), resume=True)
    msg = str(e.value)
    assert 'partition.stream: "named" in the run, "legacy-global" now' in msg
    assert 'federation.fisher_data: "plain" in the run, "train_loader" now' in msg
    assert "server.root_set" not in msg and "experiment.streams" not in msg  # FDCR reads neither
    legacy = new.replace({"partition.stream": "named", "federation.fisher_data": "plain"})
    RunDir(tmp_path).start(legacy.to_yaml(), resume=True)


def test_view_shows_a_pinned_defense_preset(tmp_path):
    raw = fmnist("sdfc")
    raw["defense"] = {"name": "sdfc", "options": {"preset": "code"}}
    pinned = {d.key: d for d in config.preset_differences(raw) if d.is_pinned}
    assert pinned["defense.sdfc.preset"].pinned == "code"
