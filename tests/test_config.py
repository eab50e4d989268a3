import pytest
import yaml

from fisherguard import config
from fisherguard.clients.trainers import TRAINERS
from fisherguard.config import ConfigError
from fisherguard.data import catalogue

pytestmark = pytest.mark.unit


def test_defaults_and_presets():
    cfg = config.resolve({})
    assert cfg.federation.local_epochs == 10 and cfg.federation.rounds == 50
    assert cfg.server.val_size == 256 and cfg.server.transform == "test"
    code = config.resolve({"experiment": {"preset": "code"}})
    assert code.server.val_size is None and code.server.transform == "train"


@pytest.mark.parametrize("raw,needle", [
    ({"federation": {"epochs": 3}}, "unknown key federation.epochs; allowed in federation: clients"),
    ({"federaton": {}}, "unknown section 'federaton'"),
    ({"federation": {"rounds": "ten"}}, "federation.rounds: expected integer"),
    ({"federation": {"rounds": 0}}, "federation.rounds: must be > 0"),
    ({"federation": {"lr": True}}, "federation.lr: expected number"),
    ({"attack": {"fraction": 1.5}}, "attack.fraction: must be in [0, 1)"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset: 'imagenet' is not allowed; choose one of mnist"),
    ({"experiment": {"preset": "fast"}}, "choose one of paper, code"),
    ({"defense": "nodefense"}, "unknown defense 'nodefense'; available:"),
    ({"defense": {"name": "fedavg", "options": {"bogus": 1}}}, "has no option 'bogus'"),
    ({"partition": {"beta": float("nan")}}, "partition.beta: must be finite"),
    ({"defense": {"name": "krum", "f": 4}}, "defense: "),  # K = 10 needs K >= 2f + 3
])
def test_bad_configs_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        config.resolve(raw)
    assert needle in str(e.value)


def test_dataset_choices_come_from_the_data_catalogue():
    assert config.schema()["data"]["dataset"].choices == catalogue.DATASET_NAMES
    assert config.schema()["runtime"]["trainer"].choices == TRAINERS


def test_overrides_and_variants(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("federation: {rounds: 3}\nvariants:\n  - {label: a, set: {attack.fraction: 0.0}}\n"
                 "  - {label: b, set: {defense: fedavg, defense.weights: uniform}}\n")
    vs = config.load(p, ["federation.local_epochs=2"])
    assert [v.label for v in vs] == ["a", "b"]
    assert vs[0].config.attack.fraction == 0.0 and vs[1].config.attack.fraction == 0.3
    assert all(v.config.federation.local_epochs == 2 for v in vs)
    assert vs[1].config.to_dict()["defense"] == {"name": "fedavg", "options": {"weights": "uniform"}}


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="--set expects"):
        config.load(_ok(tmp_path), ["rounds"])
    dup = tmp_path / "dup.yaml"
    dup.write_text("variants:\n  - {label: a}\n  - {label: a}\n")
    with pytest.raises(ConfigError, match="unique"):
        config.load(dup)


def _ok(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("{}\n")
    return p


def test_shipped_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        assert config.load(f)


@pytest.mark.parametrize("raw,needle", [
    ({"experiment": {"preset": [1]}}, "experiment.preset: expected string"),
    ({"experiment": ["x"]}, "experiment: expected a mapping"),
    ({"variants": [{"label": "FDCR (honest)"}, {"label": "fdcr-honest"}]}, "unique, also as directory names"),
])
def test_malformed_structures_are_config_errors(raw, needle):
    with pytest.raises(ConfigError) as e:
        config.variants_of(raw)
    assert needle in str(e.value)


def test_iid_alias():
    assert config.resolve({"partition": {"beta": "iid"}}).partition.beta == 0.0


def test_a_resolved_config_is_frozen_and_replace_revalidates():
    import dataclasses

    cfg = config.resolve({"defense": {"name": "fdcr", "options": {"min_silhouette": 0.8}}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.federation.rounds = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="frozen"):
        cfg.defense.options["min_silhouette"] = 0.1  # type: ignore[index]
    short = cfg.replace({"federation.rounds": 3, "experiment.seed": 7})
    assert (short.federation.rounds, short.experiment.seed, cfg.federation.rounds) == (3, 7, 50)
    assert short.defense.options == {"min_silhouette": 0.8}
    with pytest.raises(config.ConfigError, match="federation.rounds"):
        cfg.replace({"federation.rounds": 0})
    assert config.resolve(yaml.safe_load(cfg.to_yaml())) == cfg  # the YAML is the whole config


def test_the_defense_and_its_options_come_from_one_place():
    cfg = config.resolve({"defense": "bulyan", "federation": {"clients": 11},
                          "attack": {"fraction": 0.2}})
    opts = cfg.defense_options()
    assert opts["assumed_attackers"] == 2 and opts["preset"] == "paper"
    assert type(cfg.build_defense()).__name__ == "Bulyan"
    assert config.resolve({"attack": {"name": "none"}}).attack_fraction == 0.0


def test_a_matrix_expands_to_row_by_column_variants_column_by_column():
    raw = {"federation": {"rounds": 3},
           "matrix": {"rows": [{"label": "badnets", "set": {"attack.name": "badnets"}},
                               {"label": "zero", "set": {"attack.name": "badnets+f-zero",
                                                         "federation.rounds": 4}}],
                      "columns": [{"label": "FedAvg", "set": {"defense": "fedavg"}},
                                  {"label": "FDCR off", "set": {"defense": "fdcr",
                                                                "federation.rounds": 5,
                                                                "defense.options":
                                                                    {"hardening": "off"}}}]}}
    vs = config.variants_of(raw)
    assert [v.label for v in vs] == ["badnets | FedAvg", "zero | FedAvg", "badnets | FDCR off",
                                     "zero | FDCR off"]
    assert [v.config.federation.rounds for v in vs] == [3, 4, 5, 5]  # the column's set wins
    assert vs[3].config.attack.name == "badnets+f-zero"
    assert dict(vs[3].config.defense.options) == {"hardening": "off"}
    with pytest.raises(ConfigError, match="either variants or a matrix"):
        config.variants_of({**raw, "variants": [{"label": "x", "set": {}}]})
    with pytest.raises(ConfigError, match=r"matrix.columns\[0\]: expected"):
        config.variants_of({"matrix": {"rows": [{"label": "a"}], "columns": ["fedavg"]}})
    with pytest.raises(ConfigError, match="matrix: expected"):
        config.variants_of({"matrix": {"rows": []}})


def test_a_matrix_leaves_out_the_cells_it_excludes_and_names_bad_exclusions():
    rows = [{"label": "badnets", "set": {"attack.name": "badnets"}},
            {"label": "oracle", "set": {"attack.name": "badnets+f-val-echo",
                                        "attack.options": {"f-val-echo": {"source": "oracle"}}}}]
    cols = [{"label": "FDCR", "set": {"defense": "fdcr"}},
            {"label": "SDFC", "set": {"defense": "sdfc"}}]
    # the oracle needs the server's clean set: under FDCR the config stops before any training
    with pytest.raises(ConfigError, match="clean-set Fisher"):
        config.variants_of({"matrix": {"rows": rows, "columns": cols}})
    why = "FDCR holds no clean set"
    raw = {"matrix": {"rows": rows, "columns": cols,
                      "exclude": [{"row": "oracle", "columns": ["FDCR"], "why": why}]}}
    assert [v.label for v in config.variants_of(raw)] == ["badnets | FDCR", "badnets | SDFC",
                                                          "oracle | SDFC"]
    for bad, match in (({"row": "nope", "columns": ["FDCR"], "why": why}, "no row labelled"),
                       ({"row": "oracle", "columns": ["FDCR"], "why": ""}, "expected"),
                       ({"row": "oracle", "columns": ["FedAvg"], "why": why}, "no column labelled")):
        with pytest.raises(ConfigError, match=match):
            config.variants_of({"matrix": {**raw["matrix"], "exclude": [bad]}})


def test_a_mapping_set_after_one_of_its_keys_is_refused_not_dropped(tmp_path):
    # `defense.preset: code` then `defense.options: {...}` silently lost the preset
    from fisherguard import config

    p = tmp_path / "c.yaml"
    p.write_text("defense: sdfc\nvariants:\n  - {label: x, set: {defense.preset: code, "
                 "defense.options: {echo_rtol: 0.1}}}\n")
    with pytest.raises(config.ConfigError, match="defense.options is set after defense.preset"):
        config.load(p)
    p.write_text("defense: sdfc\nvariants:\n  - {label: x, set: {defense.options: {echo_rtol: 0.1},"
                 " defense.preset: code}}\n")
    opts = config.load(p)[0].config.defense.options
    assert opts["preset"] == "code" and opts["echo_rtol"] == 0.1


def test_a_label_with_a_comma_is_refused_because_only_splits_on_commas(tmp_path):
    from fisherguard import config

    p = tmp_path / "c.yaml"
    p.write_text('variants:\n  - {label: "echo (recovered, margin 0.1)", set: {}}\n')
    with pytest.raises(config.ConfigError, match="contains a comma"):
        config.load(p)
    p.write_text('matrix:\n  rows: [{label: "a, b", set: {}}]\n  columns: [{label: c, set: {}}]\n')
    with pytest.raises(config.ConfigError, match="contains a comma"):
        config.load(p)
