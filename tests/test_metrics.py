import numpy as np
import pytest

from fisherguard.metrics import backdoor_metrics, detection, summarize

pytestmark = pytest.mark.unit


def test_model_that_always_predicts_one_non_target_class():
    labels = np.repeat(np.arange(10), 100)
    const = np.full(1000, 7)
    m = backdoor_metrics(const, labels, const, target=2)
    assert m["A"] == pytest.approx(10.0)
    assert m["R"] == 100.0 and m["ASR"] == 0.0
    assert m["V"] == pytest.approx(55.0)
    assert m["collapsed"] is True and m["q_max"] == 1.0 and m["entropy"] == 0.0


def test_asr_excludes_target_class_but_r_does_not():
    labels = np.repeat(np.arange(10), 10)
    clean = labels.copy()
    trig = labels.copy()  # trigger has no effect: class-2 images still predicted 2
    m = backdoor_metrics(clean, labels, trig, target=2)
    assert m["A"] == 100.0
    assert m["ASR_all"] == pytest.approx(10.0) and m["R"] == pytest.approx(90.0)
    assert m["ASR"] == 0.0 and not m["collapsed"]
    trig_all = np.full(100, 2)
    m2 = backdoor_metrics(clean, labels, trig_all, target=2)
    assert m2["ASR"] == 100.0 and m2["R"] == 0.0 and m2["V"] == 50.0


def test_collapse_by_low_accuracy_or_dominant_class():
    labels = np.repeat(np.arange(10), 10)
    half = np.where(np.arange(100) < 50, 0, labels)
    assert backdoor_metrics(half, labels, labels)["collapsed"]


def test_detection_rates():
    d = detection([False, True, True, False], [0, 1, 2, 3], attackers=[2, 3])
    assert d["TPR"] == 50.0 and d["FPR"] == 50.0 and d["removed"] == 2
    none = detection([False] * 3, [0, 1, 2], attackers=[])
    assert none["TPR"] is None and none["FPR"] == 0.0


def test_failed_clients_are_not_detections():
    # issue 19.2: a dead or invalid client (weight 0, flagged) is neither a true nor a false
    # positive: it leaves the TPR/FPR denominators and is counted apart
    flagged = [True, True, False, True, True]
    failed = [True, True, False, False, True]  # 0, 1 benign non_finite; 4 an attacker missing
    d = detection(flagged, [0, 1, 2, 3, 4], attackers=[3, 4], failed=failed)
    assert d["FPR"] == 0.0 and d["TPR"] == 100.0  # benign 2 kept; attacker 3 removed
    assert d["removed"] == 1 and d["failed"] == 3
    all_failed = detection([True, True], [0, 1], attackers=[1], failed=[True, True])
    assert all_failed["TPR"] is None and all_failed["FPR"] is None and all_failed["failed"] == 2


def test_summary_counts_failed_client_rounds_apart():
    ok = _round(50.0)
    failed = _round(50.0)
    failed["detection"] = {"TPR": None, "FPR": 0.0, "removed": 0, "failed": 2,
                           "failures": {"missing": 1, "non_finite": 1}}
    s = summarize([ok, failed, failed])
    assert s["failed_client_rounds"] == 4 and s["nodes_failed"] is True
    assert s["failures"] == {"missing": 2, "non_finite": 2}
    assert s["FPR"] == 0.0
    s = summarize([ok, ok])
    assert s["failed_client_rounds"] == 0 and s["nodes_failed"] is False and s["failures"] == {}


def _round(a, collapsed=False):
    return {"metrics": {"A": a, "R": 100 - a, "ASR": a, "V": 50.0, "ASR_all": a, "q_max": 0.1,
                        "entropy": 1.0, "collapsed": collapsed},
            "detection": {"TPR": None, "FPR": 0.0, "removed": 0}, "wall_time_s": 1.0}


def test_summary_means_last_five_and_run_collapse_rule():
    rounds = [_round(float(a)) for a in range(10)]
    s = summarize(rounds)
    assert s["A"] == pytest.approx(7.0)  # mean of 5..9
    rounds = [_round(1.0, c) for c in (False,) * 5 + (True, True, False, True, False)]
    assert summarize(rounds)["collapsed"] is True
    rounds = [_round(1.0, c) for c in (True,) * 5 + (True, True, False, False, False)]
    assert summarize(rounds)["collapsed"] is False


def _rounds(active, asr):
    return [{"metrics": {"ASR": a}, "attack": {"active": x}} for x, a in zip(active, asr)]


def test_lifespan_counts_the_rounds_a_backdoor_outlives_its_attack():
    from fisherguard.metrics import lifespan

    assert lifespan(_rounds([1, 1, 0, 0, 0, 0], [90, 95, 80, 60, 40, 70])) == \
        {"lifespan": 2, "lifespan_censored": False}
    assert lifespan(_rounds([1, 0, 0], [90, 30, 20])) == {"lifespan": 0, "lifespan_censored": False}
    assert lifespan(_rounds([1, 0, 0], [90, 80, 70])) == {"lifespan": 2, "lifespan_censored": True}
    assert lifespan(_rounds([1, 1, 1], [90, 80, 70]))["lifespan"] is None  # never stopped
    assert lifespan(_rounds([0, 0], [5, 5]))["lifespan"] is None  # never ran
