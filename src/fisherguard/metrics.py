"""The papers' metrics and the project's diagnostics (docs/protocol.md §7). The only room that knows who attacked."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

LAST = 5  # tables average the models of the last five rounds (both papers)


def backdoor_metrics(pred_clean: np.ndarray, labels: np.ndarray, pred_triggered: np.ndarray,
                     target: int = 2, num_classes: int = 10) -> dict[str, float | bool]:
    """A, ASR_all, R = 100 − ASR_all, standard ASR, V = (A+R)/2, histogram stats, collapse (docs/protocol.md §7.3–§7.4)."""
    pred_clean, labels, pred_triggered = map(np.asarray, (pred_clean, labels, pred_triggered))
    if not (len(pred_clean) == len(labels) == len(pred_triggered)) or len(labels) == 0:
        raise ValueError("predictions and labels must be non-empty and of equal length")
    acc = 100.0 * float(np.mean(pred_clean == labels))
    asr_all = 100.0 * float(np.mean(pred_triggered == target))
    not_target = labels != target
    asr = 100.0 * float(np.mean(pred_triggered[not_target] == target)) if not_target.any() else float("nan")
    q = np.bincount(pred_clean, minlength=num_classes) / len(pred_clean)
    nz = q[q > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(num_classes))
    r = 100.0 - asr_all
    return {"A": acc, "R": r, "ASR": asr, "ASR_all": asr_all, "V": (acc + r) / 2,
            "q_max": float(q.max()), "entropy": entropy,
            "collapsed": bool(acc < 2 * 100.0 / num_classes or q.max() >= 0.5)}


def edge_asr(pred_tail: np.ndarray, target: int) -> float:
    """ASR_edge: share of the held-out edge-case tail images predicted as the target, % (docs/protocol.md §7.3)."""
    pred_tail = np.asarray(pred_tail)
    if len(pred_tail) == 0:
        raise ValueError("no held-out tail images to score")
    return 100.0 * float(np.mean(pred_tail == target))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000,
            transform: Any = None,
            trigger: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Arg-max predictions in eval mode; ``transform`` maps stored uint8 batches to model input,
    ``trigger`` (the attack's, ``Attack.test_trigger``) then stamps the normalised batch."""
    model.eval()
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s:s + batch_size]
        if transform is not None:
            xb = transform(xb)
        if trigger is not None:
            xb = trigger(xb)
        out.append(model(xb).argmax(1))
    return torch.cat(out).numpy()


def detection(flagged: Sequence[bool], client_ids: Sequence[int], attackers: Sequence[int],
              failed: Sequence[bool] | None = None,
              suspicion: Sequence[float | None] | None = None) -> dict[str, Any]:
    """TPR and FPR of flagged (weight exactly 0) clients against the true attacker set
    (docs/protocol.md §7.6). A ``failed`` client (missing, or its upload invalid:
    ``defenses.base.FAILURE_REASONS``) is no detection: it leaves both rates and is counted in
    ``failed``; ``removed`` counts the defense's removals only. ``AUC`` and ``AP`` rank the
    defense's per-client ``suspicion`` (``defenses.base.SUSPICION``) over the same judged
    clients (``score_detection``); None without a score."""
    att = set(attackers)
    failed = [False] * len(client_ids) if failed is None else [bool(f) for f in failed]
    judged = [(bool(f), c in att) for f, c, x in zip(flagged, client_ids, failed) if not x]
    n_att = sum(a for _, a in judged)
    n_ben = len(judged) - n_att
    tp = sum(1 for f, a in judged if f and a)
    fp = sum(1 for f, a in judged if f and not a)
    out = {"TPR": 100.0 * tp / n_att if n_att else None,
           "FPR": 100.0 * fp / n_ben if n_ben else None,
           "removed": int(sum(f for f, _ in judged)), "failed": int(sum(failed))}
    out.update(score_detection(suspicion, flagged, client_ids, attackers, failed))
    return out


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """ROC AUC in the Mann–Whitney form: the share of (positive, negative) pairs in which the
    positive scores higher, a tie counting one half. None without a positive or a negative."""
    pos = [float(s) for s, p in zip(scores, positive) if p]
    neg = [float(s) for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    wins = sum((sp > sn) + 0.5 * (sp == sn) for sp in pos for sn in neg)
    return wins / (len(pos) * len(neg))


def average_precision(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Average precision Σ_t (R_t − R_{t−1}) P_t over the thresholds t = the distinct scores,
    highest first (tied scores enter together, as in scikit-learn's ``average_precision_score``).
    None without a positive or a negative (the same rounds as ``roc_auc``)."""
    pairs = [(float(s), bool(p)) for s, p in zip(scores, positive)]
    n_pos = sum(p for _, p in pairs)
    if n_pos == 0 or n_pos == len(pairs):
        return None
    ap, tp, seen, recall_prev = 0.0, 0, 0, 0.0
    for t in sorted({s for s, _ in pairs}, reverse=True):
        at = [p for s, p in pairs if s == t]
        tp += sum(at)
        seen += len(at)
        recall = tp / n_pos
        ap += (recall - recall_prev) * (tp / seen)
        recall_prev = recall
    return ap


def score_detection(suspicion: Sequence[float | None] | None, flagged: Sequence[bool],
                    client_ids: Sequence[int], attackers: Sequence[int],
                    failed: Sequence[bool]) -> dict[str, float | None]:
    """Per-round ``AUC`` and ``AP`` of the defense's suspicion (higher = more suspicious)
    against the attacker set, over the clients that did not fail (as TPR/FPR;
    docs/protocol.md §7.6).

    A judged client without a score (None or NaN) that the defense removed (FDCR ``spiky``,
    SDFC ``echo``, Sageflow ``high_entropy``: refused before or instead of scoring) ranks above
    every scored client; a kept client without a score leaves the round undefined. Both are
    None when the defense has no score, or no attacker or no benign client was judged: never
    a made-up 0.5.
    """
    none: dict[str, float | None] = {"AUC": None, "AP": None}
    if suspicion is None or len(suspicion) != len(client_ids):
        return none
    att = set(attackers)
    scores: list[float] = []
    positive: list[bool] = []
    for s, f, c, x in zip(suspicion, flagged, client_ids, failed):
        if x:
            continue
        v = math.nan if s is None else float(s)
        if math.isnan(v):
            if not f:
                return none
            v = math.inf
        scores.append(v)
        positive.append(c in att)
    return {"AUC": roc_auc(scores, positive), "AP": average_precision(scores, positive)}


def attacker_weight_share(weights: Sequence[float], client_ids: Sequence[int], attackers: Sequence[int]) -> float | None:
    att = set(attackers)
    total = float(sum(weights))
    if not att or total <= 0:
        return None
    return 100.0 * sum(w for w, c in zip(weights, client_ids) if c in att) / total


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(vals)) if vals else None


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Run summary: last-5 means (ASR_edge None without a held-out tail), run collapse (≥3 of the
    last 5), detection over all and last 5."""
    if not rounds:
        raise ValueError("no finished rounds to summarise")
    last = rounds[-LAST:]
    out: dict[str, Any] = {"rounds": len(rounds)}
    for m in ("A", "R", "ASR", "V", "ASR_all", "q_max", "entropy"):
        out[m] = _mean([r["metrics"][m] for r in last])
    out["ASR_edge"] = _mean([r["metrics"].get("ASR_edge") for r in last])  # None without a tail
    out["collapsed"] = sum(bool(r["metrics"]["collapsed"]) for r in last) >= 3 if len(last) >= 3 else \
        all(r["metrics"]["collapsed"] for r in last)
    for m in ("TPR", "FPR"):
        out[m] = _mean([r["detection"][m] for r in rounds])
        out[f"{m}_last5"] = _mean([r["detection"][m] for r in last])
    out["attacker_share"] = _mean([r["detection"].get("attacker_share") for r in rounds])
    # the suspicion score's ranking quality: mean over the rounds where it is defined, and how many
    for m in ("AUC", "AP"):
        out[m] = _mean([r["detection"].get(m) for r in rounds])
    out["AUC_rounds"] = sum(r["detection"].get("AUC") is not None for r in rounds)
    out.update(lifespan(rounds))
    out["removed_per_round"] = _mean([float(r["detection"]["removed"]) for r in rounds])
    # clients that failed (missing, or an invalid upload) are counted apart from detections
    failures: dict[str, int] = {}
    for r in rounds:
        for why, n in (r["detection"].get("failures") or {}).items():
            failures[why] = failures.get(why, 0) + int(n)
    out["failed_client_rounds"] = int(sum(int(r["detection"].get("failed") or 0) for r in rounds))
    out["failures"] = failures
    out["nodes_failed"] = out["failed_client_rounds"] > 0
    out["wall_time_s"] = float(sum(r.get("wall_time_s", 0.0) for r in rounds))
    return out


LIFESPAN_ASR = 50.0  # docs/attacks.md §1: a backdoor lives while its ASR stays at or above this


def lifespan(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds after the attack's last active round whose ASR stays ≥ 50 % before the first drop.

    ``lifespan_censored`` is true when the ASR never dropped before the run ended (the lifespan is
    then at least the value given); both are None when the attack never stopped (or never ran).
    """
    active = [bool((r.get("attack") or {}).get("active")) for r in rounds]
    if not any(active) or active[-1]:
        return {"lifespan": None, "lifespan_censored": None}
    last = max(i for i, a in enumerate(active) if a)
    after = [r["metrics"].get("ASR") for r in rounds[last + 1:]]
    for i, asr in enumerate(after):
        if asr is not None and not (isinstance(asr, float) and math.isnan(asr)) and asr < LIFESPAN_ASR:
            return {"lifespan": i, "lifespan_censored": False}
    return {"lifespan": len(after), "lifespan_censored": True}
