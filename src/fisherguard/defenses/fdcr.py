"""FDCR (Huang et al., NeurIPS 2024): Fisher-weighted discrepancy clustering and rescaling.

Server steps per docs/algorithms.md §3.1, degenerate cases docs/algorithms.md §3.2, the separation gate docs/algorithms.md §3.4 and the
released code's ground-truth oracle as a labelled ablation (docs/algorithms.md §4). Equation numbers refer to the
FDCR paper. Server statistics are float64.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any, Iterable, Sequence

import torch

from fisherguard.defenses.base import (PRESETS, SUSPICION, Aggregate, Combined, Defense,
                                       DefenseConfigError, RoundInput, Rows, check_choice,
                                       check_flag, check_range, fisher_estimator_option,
                                       reject_all, valid_mask)
from fisherguard.seeding import STREAMS, defense_generator, defense_seed

Tensor = torch.Tensor

DISCREPANCIES = ("mse", "l2", "cosine")
CLUSTERINGS = ("finch", "kmeans", "dbscan")
# How V becomes removals (issue 21): the paper's clustering + gate, or one of the candidate rules
# with a controlled false-removal rate. ``finch`` is the default and runs ``clustering``.
RULES = ("finch", "robust-z", "cumulative")
# Iglewicz & Hoaglin (1993): a modified z-score above 3.5 marks a potential outlier. Not tuned to
# any run; under normal scores one-sided z > 3.5 has probability 2.3e-4 per client and round.
Z_THRESHOLD = 3.5
MAD_TO_SIGMA = 1.4826  # 1/Φ⁻¹(3/4): MAD · 1.4826 estimates σ of a normal sample
MEANAD_TO_SIGMA = 1.253314  # √(π/2): mean absolute deviation · 1.2533 estimates σ (normal)
CUMULATIVE_MIN_ROUNDS = 2
ORACLE_LABEL = "FDCR-oracle (uses ground truth; not a defense)"
# The released discrepancy is torch's pairwise_distance, whose eps is added to the difference.
L2_EPS = 1e-6
# Scores this close count as equal: all-equal V skips clustering (docs/algorithms.md §3.2); tied cluster means unite.
EQUAL_V_RTOL = 1e-12
TIE_RTOL = 1e-12
# The spiky rule's default: reject when the importance support S or level L is below the
# round median / 10. Honest real uploads reached S/median ≥ 0.259 and L/median ≥ 0.377
# (tests/fixtures/fisher_real.npz; docs/algorithms.md §8.2).
SUPPORT_RATIO = 10.0
# reject_duplicates: two clients whose Δ and F both differ by at most this fraction of their
# norms count as copies. Honest clients train on different data with their own seeds; only
# uploads built to be alike come this close (the `fdcr-steer` colluders are bit-identical).
DUPLICATE_RTOL = 1e-6


# ---------------------------------------------------------------------------------------------
# The paper's building blocks, on plain float64 tensors
# ---------------------------------------------------------------------------------------------

def fisher_importance(fisher: Tensor, layer_sizes: Sequence[int] | None = None) -> Tensor:
    """Importance I_k = (F_k − min F_k)/(max F_k − min F_k) per row of (K, P) or (P,) (FDCR Eq. 6)."""
    # With layer_sizes each tensor's slice is normalised on its own (importance_scope = layer); a
    # slice whose Fisher is constant gets I = 0, since it ranks no parameter above another.
    f = fisher.to(torch.float64)
    squeeze = f.dim() == 1
    if squeeze:
        f = f.unsqueeze(0)
    if layer_sizes is None:
        segments = [f]
    else:
        if sum(layer_sizes) != f.shape[1]:
            raise ValueError(f"layer_sizes sum to {sum(layer_sizes)}, the Fisher has {f.shape[1]} entries")
        segments = list(torch.split(f, list(layer_sizes), dim=1))
    out = []
    for seg in segments:
        lo = seg.min(dim=1, keepdim=True).values
        span = seg.max(dim=1, keepdim=True).values - lo
        safe = torch.where(span > 0, span, torch.ones_like(span))
        out.append(torch.where(span > 0, (seg - lo) / safe, torch.zeros_like(seg)))
    res = torch.cat(out, dim=1)
    return res.squeeze(0) if squeeze else res


def importance_weighted_gradient(updates: Tensor, importance: Tensor | None, lr: float) -> Tensor:
    """g̃_k = I_k ⊙ g_k with pseudo-gradient g_k = (w_k − w^t)/η (FDCR Eqs. 7–8); I = None gives g_k."""
    g = updates.to(torch.float64) / float(lr)
    return g if importance is None else g * importance.to(torch.float64)


def discrepancy(weighted: Tensor, alpha: Tensor, kind: str = "mse", *,
                l2_eps: float = L2_EPS) -> tuple[Tensor, Tensor]:
    """(V, ḡ): reference ḡ = Σ_k α_k g̃_k and discrepancy V_k of kind mse|l2|cosine (FDCR Eqs. 9a, 9b)."""
    # mse is Eq. 9b's (1/P)·Σ_v (ḡ_v − g̃_{k,v})²; l2 the released ‖g̃_k − ḡ + eps‖₂ (torch's
    # pairwise_distance); cosine the third-party 1 − cos(g̃_k, ḡ)
    gt = weighted.to(torch.float64)
    a = alpha.to(torch.float64)
    ref = (a.unsqueeze(1) * gt).sum(0)
    diff = gt - ref
    if kind == "mse":
        v = diff.square().mean(1)
    elif kind == "l2":
        v = (diff + l2_eps).norm(dim=1)
    elif kind == "cosine":
        denom = gt.norm(dim=1) * ref.norm()
        cos = torch.where(denom > 0, (gt @ ref) / torch.where(denom > 0, denom, torch.ones_like(denom)),
                          torch.zeros_like(denom))
        v = 1.0 - cos
    else:
        raise ValueError(f"discrepancy must be one of {DISCREPANCIES}, got {kind!r}")
    return v, ref


def finch_level0(points: Tensor | Sequence[float]) -> list[int]:
    """FINCH level 0 on (n,) or (n, d) points: nearest-neighbour links, connected components (FDCR Eq. 10)."""
    # Euclidean in float64, a tie for the nearest neighbour goes to the lowest index, labels in
    # order of first appearance. Not finch-clust: it casts to float32, which changes partitions
    # of scores that differ only in the 7th significant digit.
    x = torch.as_tensor(points, dtype=torch.float64)
    if x.dim() == 1:
        x = x.unsqueeze(1)
    n = x.shape[0]
    if n == 0:
        return []
    if n == 1:
        return [0]
    dist = torch.cdist(x, x) if x.shape[1] > 1 else (x - x.T).abs()
    dist.fill_diagonal_(math.inf)
    first = dist.argmin(dim=1).tolist()  # argmin returns the first (lowest) index on ties
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in enumerate(first):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    labels: dict[int, int] = {}
    return [labels.setdefault(root(i), len(labels)) for i in range(n)]


def separation_silhouette(scores: Tensor | Sequence[float], flagged: Sequence[bool]) -> float:
    """Mean silhouette of the split {E, S∖E} of the 1-D scores V (gate of docs/algorithms.md §3.4, after FDCR Eq. 10)."""
    v = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    e = torch.as_tensor(list(flagged), dtype=torch.bool)
    n = v.numel()
    if e.numel() != n:
        raise ValueError(f"{e.numel()} flags for {n} scores")
    d = (v.unsqueeze(0) - v.unsqueeze(1)).abs()
    total = 0.0
    for i in range(n):
        same = e == e[i]
        same_others = same.clone()
        same_others[i] = False
        other = ~same
        if not bool(same_others.any()) or not bool(other.any()):
            continue  # a one-member group scores s_i = 0
        a = float(d[i, same_others].mean())
        b = float(d[i, other].mean())
        m = max(a, b)
        total += 0.0 if m == 0 else (b - a) / m
    return total / n


def importance_support(importance: Tensor) -> tuple[Tensor, Tensor]:
    """(S, L) per row of (K, P) importance: support fraction and level (docs/algorithms.md §8.2).

    S_k = exp(H(q_k))/P with q_k = I_k/ΣI_k (entropy effective dimension over P, in (0, 1]);
    L_k = mean(I_k)/S_k = ΣI_k/exp(H(q_k)), the mean importance on that effective support.
    Neither depends on P for vectors whose entries follow one distribution (tiling a vector
    leaves both unchanged); a one-coordinate spike has S = 1/P, a flat floor c has L ≈ c.
    """
    imp = importance.to(torch.float64)
    if imp.dim() == 1:
        imp = imp.unsqueeze(0)
    total = imp.sum(dim=1)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    q = imp / safe.unsqueeze(1)
    eff = torch.exp(torch.special.entr(q).sum(dim=1))
    support = torch.where(total > 0, eff / imp.shape[1], torch.zeros_like(total))
    level = torch.where(total > 0, total / eff, torch.zeros_like(total))
    return support, level


def spiky_rows(support: Tensor, level: Tensor, ratio: float) -> list[int]:
    """Rows whose support S or level L is below the rows' median / ``ratio`` (the spiky rule)."""
    med_s = statistics.median(support.tolist())
    med_l = statistics.median(level.tolist())
    return [pos for pos in range(support.numel())
            if float(support[pos]) < med_s / ratio or float(level[pos]) < med_l / ratio]


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 0…n−1 of a vector's entries, tied entries sharing their mean rank (Spearman's rule)."""
    values, order = torch.sort(x.reshape(-1))
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) + 1) / 2  # mean of the run's positions
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    return ranks


def update_consistency(importance: Tensor, updates: Tensor) -> Tensor:
    """ρ_k = Spearman correlation of I_k with |Δ_k| per row (docs/algorithms.md §8.2,
    ``fisher_update_consistency``); 0 where either row ranks nothing (all entries tied)."""
    imp, upd = importance.reshape(importance.shape[0], -1), updates.reshape(updates.shape[0], -1)
    out = torch.zeros(imp.shape[0], dtype=torch.float64)
    for k in range(imp.shape[0]):
        a = average_ranks(imp[k].to(torch.float64))
        b = average_ranks(upd[k].to(torch.float64).abs())
        a, b = a - a.mean(), b - b.mean()
        den = float(a.norm() * b.norm())
        out[k] = float(a @ b) / den if den > 0 else 0.0
    return out


def duplicate_rows(updates: Tensor, fisher: Tensor, rtol: float) -> list[int]:
    """Rows whose (Δ_k, F_k) lies within ``rtol`` × the pair's mean norm of another row's, for
    Δ and F alike (0: bit-identical): the copies colluders upload to steer FINCH (docs/attacks.md §4.8)."""
    out: set[int] = set()
    n = updates.shape[0]
    parts = [updates.to(torch.float64), fisher.to(torch.float64)]
    norms = [x.norm(dim=1) for x in parts]
    for i in range(n):
        for j in range(i + 1, n):
            if all(float((x[i] - x[j]).norm()) <= rtol * 0.5 * float(nx[i] + nx[j])
                   for x, nx in zip(parts, norms)):
                out.update((i, j))
    return sorted(out)


def fpra_rescale(updates: Tensor, importance: Tensor) -> Tensor:
    """Rescaled updates 2σ(I_k) ⊙ Δ_k, i.e. ŵ_k = w^t + 2σ(I_k) ⊙ Δ_k (FDCR Eq. 12, code's sign)."""
    return 2.0 * torch.sigmoid(importance.to(torch.float64)) * updates.to(torch.float64)


def clip_to_median_norm(updates: Tensor) -> tuple[Tensor, Tensor, float]:
    """(Δ_k · min(1, m/‖Δ_k‖), clipped mask, m), m the rows' median L2 norm (``norm_bound``,
    docs/algorithms.md §8.2)."""
    upd = updates.to(torch.float64)
    norms = upd.norm(dim=1)
    med = statistics.median(norms.tolist())
    clipped = norms > med
    # rows that are not clipped keep scale 1 (a zero row's med/0 is never selected)
    scale = torch.where(clipped, med / norms, torch.ones_like(norms))
    return upd * scale.unsqueeze(1), clipped, float(med)


def fcdc_reweight(alpha: Tensor, removed: Sequence[int]) -> Tensor:
    """α̂_k = 0 for removed k, α_k / Σ_{j kept} α_j otherwise (FDCR Eq. 11)."""
    a = alpha.to(torch.float64).clone()
    if len(removed):
        a[list(removed)] = 0.0
    return a / a.sum()


def robust_z(scores: Tensor | Sequence[float]) -> Tensor:
    """Modified z-scores (V − median)/(1.4826·MAD) (Iglewicz & Hoaglin 1993); MAD = 0 falls back
    to 1.2533 × the mean absolute deviation from the median; all zeros when both are 0."""
    v = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if v.numel() == 0:
        return v.clone()
    med = statistics.median(v.tolist())
    dev = (v - med).abs()
    scale = MAD_TO_SIGMA * statistics.median(dev.tolist())
    if not scale > 0:
        scale = MEANAD_TO_SIGMA * float(dev.mean())
    if not scale > 0:
        return torch.zeros_like(v)
    return (v - med) / scale


def stouffer(z_sum: float, n: int) -> float:
    """Stouffer's Σ_t z_t / √n of a client's n per-round z-scores (Stouffer et al. 1949)."""
    return z_sum / math.sqrt(n) if n > 0 else 0.0


def kmeans_partition(scores: Tensor, seed: int) -> list[int]:
    """2-means on the scores, 10 seeded starts (FDCR Tab. 1 ablation; settings are the project's)."""
    from sklearn.cluster import KMeans

    x = scores.to(torch.float64).reshape(-1, 1).numpy()
    return [int(c) for c in KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(x)]


def dbscan_partition(scores: Tensor) -> list[int]:
    """DBSCAN with eps = 1.4826·MAD(V) (floor 1e-12), min_samples 2, noise as singletons (FDCR Tab. 1 ablation)."""
    from sklearn.cluster import DBSCAN

    v = scores.to(torch.float64).reshape(-1)
    med = statistics.median(v.tolist())
    mad = statistics.median((v - med).abs().tolist())
    eps = max(1.4826 * mad, 1e-12)
    raw = DBSCAN(eps=eps, min_samples=2).fit_predict(v.reshape(-1, 1).numpy())
    nxt = int(raw.max()) + 1 if raw.size else 0
    out = []
    for c in raw:
        if c < 0:  # each noise point is its own cluster
            out.append(nxt)
            nxt += 1
        else:
            out.append(int(c))
    return out


def top_cluster(scores: Tensor, labels: Sequence[int]) -> list[int]:
    """Positions in the cluster(s) with the largest mean score; tied clusters are united (docs/algorithms.md §3.1 step 8)."""
    v = scores.to(torch.float64).reshape(-1)
    means: dict[int, float] = {}
    for c in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        means[c] = float(v[idx].mean())
    best = max(means.values())
    tol = TIE_RTOL * abs(best)
    top = {c for c, m in means.items() if m >= best - tol}
    return [i for i, lab in enumerate(labels) if lab in top]


# ---------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------

class FDCR(Defense):
    """FDCR: drop the top FINCH cluster of Fisher-weighted discrepancies V_k, rescale by 2σ(I) (FDCR Alg. 1).

    Hyperparameters (keyword-only; ``None`` means "from the preset"):
    ``preset`` paper|code; ``discrepancy`` mse|l2|cosine (paper mse, code l2); ``clustering``
    finch|kmeans|dbscan; ``weight_by_importance`` (Eq. 8 uses I_k); ``use_fcdc`` (cluster and
    drop); ``use_fpra`` (rescale); ``importance_scope`` global|layer with ``layer_sizes``;
    ``fpra_when_single_cluster`` (paper true, code false); ``min_silhouette`` (gate threshold,
    None = published rule); ``hardening`` on|off (gate and spikiness check); ``support_ratio``
    (spikiness threshold, None disables; ``spiky_ratio``, its mean-importance predecessor, is
    refused with a message); ``max_drop_fraction`` (None = no cap); ``param_slice``
    [start, stop) of the vectors the discrepancy looks at (None = all); ``fisher_estimator``
    per_sample|official_label_mixed (paper / code); ``label_source``; ``seed`` (K-Means
    starts); ``streams`` named|shared (K-Means draws from its own named stream;
    docs/protocol.md §7.5).

    ``rule`` (issue 21; docs/algorithms.md §3.7) turns V into removals: ``finch`` (default:
    the paper's ``clustering``, gate and cap, unchanged), ``robust-z`` (remove z_k >
    ``z_threshold``, z the round's modified z-score of V, ``robust_z``) or ``cumulative``
    (remove when a client's Stouffer statistic of its per-round z, each clipped to
    ±``z_threshold``, exceeds ``z_threshold`` after ``min_rounds`` scored rounds, so one round
    alone never removes a client; clients are kept by id across rounds). ``z_threshold`` 3.5 is
    Iglewicz & Hoaglin's outlier bound, not tuned. ``two_sided`` (both z rules; default off)
    also removes a client whose statistic is below −``z_threshold``, with the reason
    ``low_discrepancy``. ``reject_duplicates`` (default off) refuses, with the reason
    ``duplicate``, every client whose Δ and F lie within ``duplicate_rtol`` of another's
    (``duplicate_rows``). ``fisher_update_consistency`` (default None: off) refuses, with the
    reason ``inconsistent``, every client whose ρ_k, the Spearman correlation of I_k with
    |Δ_k| (``update_consistency``), is below it, and records ρ_k per client. ``norm_bound``
    (default off) clips every update V scored to the round's median update norm before FPRA
    (``clip_to_median_norm``; the record gains ``norm_bound`` and ``norm_clipped``). The two
    candidate rules skip the silhouette gate (they are the decision rule themselves);
    ``max_drop_fraction`` applies to every rule. With them FPRA counts a round without
    removals as a single cluster, ``cluster`` is 1 for a removed client and 0 otherwise, and
    removals have the reason ``high_discrepancy``; the record adds ``rule``, ``robust_z`` and
    (cumulative) ``cumulative_z`` and ``observations`` per client.

    Round scalars in diagnostics: ``gate_fired`` is true when the separation gate cancelled a
    drop that clustering proposed; ``num_removed`` counts clients removed by clustering
    (``clustered_out``), ``num_rejected`` those refused by input or spikiness checks.
    """

    name = "fdcr"
    paper = "Huang et al., NeurIPS 2024 (FDCR)"
    summary = ("Fisher-importance-weighted update discrepancy, FINCH level-0 clustering, top "
               "cluster removed behind a silhouette gate, kept updates rescaled by 2σ(I)")
    needs_fisher = True
    suspicion_score = "discrepancy V_k as is (Eq. 9b; the top cluster of V is removed)"

    def __init__(self, *, preset: str = "paper", discrepancy: str | None = None,
                 clustering: str = "finch", weight_by_importance: bool = True,
                 use_fcdc: bool = True, use_fpra: bool = True, importance_scope: str = "global",
                 layer_sizes: list[int] | None = None,
                 fpra_when_single_cluster: bool | None = None,
                 min_silhouette: float | None = 0.75, hardening: str = "on",
                 support_ratio: float | None = SUPPORT_RATIO,
                 spiky_ratio: float | None = None, max_drop_fraction: float | None = None,
                 param_slice: list[int] | None = None,
                 fisher_estimator: str | None = None, label_source: str = "dataset",
                 seed: int = 0, rule: str = "finch", z_threshold: float = Z_THRESHOLD,
                 min_rounds: int = CUMULATIVE_MIN_ROUNDS, two_sided: bool = False,
                 reject_duplicates: bool = False, duplicate_rtol: float = DUPLICATE_RTOL,
                 fisher_update_consistency: float | None = None, norm_bound: bool = False,
                 streams: str = "named") -> None:
        check_choice("preset", preset, PRESETS)
        code = preset == "code"
        discrepancy = discrepancy if discrepancy is not None else ("l2" if code else "mse")
        check_choice("discrepancy", discrepancy, DISCREPANCIES)
        check_choice("clustering", clustering, CLUSTERINGS)
        for flag, val in (("weight_by_importance", weight_by_importance), ("use_fcdc", use_fcdc),
                          ("use_fpra", use_fpra)):
            check_flag(flag, val)
        check_choice("importance_scope", importance_scope, ("global", "layer"))
        if importance_scope == "layer":
            if (not isinstance(layer_sizes, (list, tuple)) or not layer_sizes
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                               for s in layer_sizes)):
                raise DefenseConfigError("layer_sizes must be a non-empty list of positive integers "
                                         f"when importance_scope is 'layer', got {layer_sizes!r}")
        fpra_when_single_cluster = (fpra_when_single_cluster if fpra_when_single_cluster is not None
                                    else not code)
        check_flag("fpra_when_single_cluster", fpra_when_single_cluster)
        check_range("min_silhouette", min_silhouette, low=-1.0, high=1.0, allow_none=True)
        check_choice("hardening", hardening, ("on", "off"))
        check_range("support_ratio", support_ratio, low=1.0, allow_none=True)
        if spiky_ratio is not None:
            raise DefenseConfigError(
                "spiky_ratio (the mean-importance spikiness rule) was replaced by support_ratio, "
                "which bounds the importance support and level (docs/algorithms.md §8.2); "
                f"set support_ratio instead of spiky_ratio={spiky_ratio!r}")
        check_range("max_drop_fraction", max_drop_fraction, low=0.0, high=1.0, low_open=True,
                    allow_none=True)
        if param_slice is not None:
            if (not isinstance(param_slice, (list, tuple)) or len(param_slice) != 2
                    or not all(isinstance(s, int) and not isinstance(s, bool) for s in param_slice)
                    or not 0 <= param_slice[0] < param_slice[1]):
                raise DefenseConfigError(f"param_slice must be [start, stop) with 0 <= start < stop, "
                                         f"got {param_slice!r}")
        fisher_estimator = fisher_estimator_option(fisher_estimator, label_source, code=code)
        check_range("seed", seed, low=0, integer=True)
        check_choice("rule", rule, RULES)
        check_range("z_threshold", z_threshold, low=0.0, low_open=True)
        if not math.isfinite(z_threshold):
            raise DefenseConfigError(f"z_threshold must be finite, got {z_threshold!r}")
        check_range("min_rounds", min_rounds, low=1, integer=True)
        check_flag("two_sided", two_sided)
        check_flag("reject_duplicates", reject_duplicates)
        check_range("duplicate_rtol", duplicate_rtol, low=0.0, high=1.0)
        check_range("fisher_update_consistency", fisher_update_consistency, low=-1.0, high=1.0,
                    allow_none=True)
        check_flag("norm_bound", norm_bound)
        if two_sided and rule == "finch":
            raise DefenseConfigError("two_sided applies to the rules 'robust-z' and 'cumulative', "
                                     "not to 'finch'")
        check_choice("streams", streams, STREAMS)

        self.preset = preset
        self.discrepancy = discrepancy
        self.clustering = clustering
        self.weight_by_importance = weight_by_importance
        self.use_fcdc = use_fcdc
        self.use_fpra = use_fpra
        self.importance_scope = importance_scope
        self.layer_sizes = list(layer_sizes) if layer_sizes is not None else None
        self.fpra_when_single_cluster = fpra_when_single_cluster
        self.min_silhouette = min_silhouette
        self.hardening = hardening
        self.support_ratio = support_ratio
        self.spiky_ratio = None  # replaced by support_ratio; kept only to name the change
        self.max_drop_fraction = max_drop_fraction
        self.param_slice = list(param_slice) if param_slice is not None else None
        self.fisher_estimator = fisher_estimator
        self.label_source = label_source
        self.seed = int(seed)
        self.rule = rule
        self.z_threshold = float(z_threshold)
        self.min_rounds = int(min_rounds)
        self.two_sided = bool(two_sided)
        self.reject_duplicates = bool(reject_duplicates)
        self.duplicate_rtol = float(duplicate_rtol)
        self.fisher_update_consistency = (None if fisher_update_consistency is None
                                          else float(fisher_update_consistency))
        self.norm_bound = bool(norm_bound)
        # rule cumulative: client id → [Σ_t clip(z_t), rounds scored]; absent clients keep theirs
        self._cumulative: dict[int, list[float]] = {}
        self.streams = streams

    def draws_randomness(self) -> bool:
        return self.clustering == "kmeans"

    def fisher_options(self) -> dict[str, Any]:
        """Options for ``fisherguard.fisher.diagonal_fisher`` on every client (docs/algorithms.md §2.4)."""
        return {"estimator": self.fisher_estimator, "label_source": self.label_source}

    # The oracle subclass replaces rows here; the honest defense uses the uploads as they are.
    def _fisher_rows(self, ri: RoundInput, fisher: Tensor, valid: Tensor) -> Tensor:
        return fisher

    def _blank_diagnostics(self, k_all: int) -> dict[str, Any]:
        """Every key of the round's record, filled in as the steps run (also on rejection)."""
        return {
            "importance_mass": [None] * k_all, "importance_support": [None] * k_all,
            "importance_level": [None] * k_all, "discrepancy": [None] * k_all,
            "cluster": [None] * k_all, "silhouette": None, "gate_fired": False,
            "num_removed": 0, "num_rejected": 0, "num_clusters": None, "fpra_applied": False,
            "drop_capped": False, SUSPICION: [None] * k_all,
        }

    def reject(self, ri: RoundInput, reasons: list[str | None]) -> Aggregate:
        """No valid upload (step 0, docs/algorithms.md §8.1): w^t back, with the full (empty) record."""
        diag = self._blank_diagnostics(ri.num_clients)
        diag["num_rejected"] = ri.num_clients
        return reject_all(ri, reasons, diagnostics=diag)

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        """One FDCR round after validation (docs/algorithms.md §3.1 steps 1–12).

        Works in RoundInput order (``reasons``), not the rows' client-id order.
        """
        k_all, p = ri.num_clients, ri.num_params
        valid = valid_mask(reasons)
        diag = self._blank_diagnostics(k_all)
        assert ri.fisher is not None
        wt = ri.global_weights.to(torch.float64)
        fisher = self._fisher_rows(ri, ri.fisher, valid)

        # step 2: importance on every valid client, then the spikiness check (docs/algorithms.md §8.2)
        idx = [k for k in range(k_all) if reasons[k] is None]
        layer = self.layer_sizes if self.importance_scope == "layer" else None
        imp = fisher_importance(fisher[idx], layer)
        mass = imp.mean(dim=1)
        support, level = importance_support(imp)
        if self.hardening == "on" and self.support_ratio is not None and len(idx) >= 3:
            for pos in spiky_rows(support, level, self.support_ratio):
                reasons[idx[pos]] = "spiky"
        if self.reject_duplicates and len(idx) >= 2:
            for pos in duplicate_rows(ri.updates[idx], fisher[idx], self.duplicate_rtol):
                reasons[idx[pos]] = reasons[idx[pos]] or "duplicate"
        if self.fisher_update_consistency is not None:
            # a Fisher that does not rank the coordinates the update moved (a forged or
            # borrowed vector) is refused; recorded for every valid client, so a run with
            # the threshold at -1 measures honest values without refusing anyone
            rho = update_consistency(imp, ri.updates[idx])
            diag["update_consistency"] = [None] * k_all
            for pos, k in enumerate(idx):
                diag["update_consistency"][k] = float(rho[pos])
                if float(rho[pos]) < self.fisher_update_consistency:
                    reasons[k] = reasons[k] or "inconsistent"
        for pos, k in enumerate(idx):
            diag["importance_mass"][k] = float(mass[pos])
            diag["importance_support"][k] = float(support[pos])
            diag["importance_level"][k] = float(level[pos])
        keep_pos = [pos for pos, k in enumerate(idx) if reasons[k] is None]
        idx = [idx[pos] for pos in keep_pos]
        imp = imp[keep_pos]
        diag["num_rejected"] = sum(r is not None for r in reasons)
        if not idx:
            return Combined.unchanged(ri, "no_valid_clients", diagnostics=diag)

        if self.param_slice is not None and self.param_slice[1] > p:
            raise ValueError(f"param_slice {list(self.param_slice)} exceeds the {p} parameters")
        sl = slice(*self.param_slice) if self.param_slice is not None else slice(None)
        while True:
            # step 1 (after every rejection): data-size weights over the surviving clients
            n = ri.num_samples.to(torch.float64)[idx]
            alpha = n / n.sum()
            upd = ri.updates[idx].to(torch.float64)
            # steps 3–6: importance-weighted pseudo-gradients and their discrepancy
            gtilde = importance_weighted_gradient(
                upd[:, sl], imp[:, sl] if self.weight_by_importance else None, ri.lr)
            # a finite but astronomically large update can overflow float64 in V: reject its
            # sender first (its own squared norm overflows), then, as a last resort, any
            # client whose V is still not finite, rather than cluster NaN
            finite = torch.isfinite(gtilde.square().sum(1))
            v = torch.empty(0, dtype=torch.float64)
            if bool(finite.all()):
                v, _ = discrepancy(gtilde, alpha, self.discrepancy)
                finite = torch.isfinite(v)
                if bool(finite.all()):
                    break
            bad = [pos for pos in range(len(idx)) if not bool(finite[pos])]
            for pos in bad:
                reasons[idx[pos]] = "non_finite"
            keep_pos = [pos for pos in range(len(idx)) if bool(finite[pos])]
            idx, imp = [idx[pos] for pos in keep_pos], imp[keep_pos]
            diag["num_rejected"] = sum(r is not None for r in reasons)
            if not idx:
                return Combined.unchanged(ri, "no_valid_clients", diagnostics=diag)
        for pos, k in enumerate(idx):
            diag["discrepancy"][k] = float(v[pos])
            diag[SUSPICION][k] = float(v[pos])

        # steps 7–9: cluster, flag the top cluster, gate (or the candidate rule of issue 21)
        flagged_pos, info = self.select_flagged(v, [int(ri.client_ids[k]) for k in idx])
        single_cluster = info["single_cluster"]
        for pos, k in enumerate(idx):
            diag["cluster"][k] = int(info["labels"][pos]) if self.use_fcdc else None
        for key in ("num_clusters", "silhouette", "gate_fired", "drop_capped"):
            diag[key] = info[key]
        if self.rule != "finch":
            diag["rule"] = self.rule
            for key in ("robust_z", "cumulative_z", "observations"):
                if key in info:
                    diag[key] = [None] * k_all
                    for pos, k in enumerate(idx):
                        diag[key][k] = info[key][pos]

        # step 10: re-weight
        low = set(info.get("low", ()))
        for pos in flagged_pos:
            reasons[idx[pos]] = ("clustered_out" if self.rule == "finch" else
                                 "low_discrepancy" if pos in low else "high_discrepancy")
        diag["num_removed"] = len(flagged_pos)
        ahat = fcdc_reweight(alpha, flagged_pos)

        # steps 11–12: FPRA and aggregation (buffers: none in the flat protocol vector)
        fpra = self.use_fpra and (self.fpra_when_single_cluster or not single_cluster)
        diag["fpra_applied"] = bool(fpra)
        if self.norm_bound:
            # a scaled (model-replacement) update keeps its direction but no more than the
            # median client's length; the median is over every client V scored this round
            upd, clipped, med = clip_to_median_norm(upd)
            diag["norm_bound"] = med
            diag["norm_clipped"] = [int(ri.client_ids[k]) for pos, k in enumerate(idx)
                                    if bool(clipped[pos])]
        steps = fpra_rescale(upd, imp) if fpra else upd
        new = wt + (ahat.unsqueeze(1) * steps).sum(0)
        weights = torch.zeros(k_all, dtype=torch.float64)
        weights[idx] = ahat
        return Combined(weights, new, diag)

    def select_flagged(self, v: Tensor, ids: Sequence[int] | None = None
                       ) -> tuple[list[int], dict[str, Any]]:
        """Positions of ``v`` to remove and the clustering record (docs/algorithms.md §3.1 steps 7–9, docs/algorithms.md §3.2, docs/algorithms.md §3.4).

        The record holds ``labels``, ``num_clusters``, ``silhouette``, ``gate_fired``,
        ``drop_capped`` and ``single_cluster`` (no partition: FPRA then follows
        ``fpra_when_single_cluster``). ``ids`` (the clients of ``v``, in its order) are needed
        by ``rule = cumulative`` only.
        """
        v = v.to(torch.float64).reshape(-1)
        kv = v.numel()
        info: dict[str, Any] = {"labels": [0] * kv, "num_clusters": 1 if kv else 0,
                                "silhouette": None, "gate_fired": False, "drop_capped": False,
                                "single_cluster": True}
        if not self.use_fcdc:
            info["single_cluster"] = False  # FPRA-only ablation: everyone kept and rescaled
            info["num_clusters"] = None
            return [], info
        if kv == 0:
            return [], info
        if self.rule != "finch":
            return self._select_by_z(v, ids, info)
        vmax, vmin = float(v.max()), float(v.min())
        if kv <= 2 or vmax - vmin <= EQUAL_V_RTOL * max(abs(vmax), abs(vmin)):
            # K′ ≤ 2 never splits under level 0; equal scores are one cluster, FINCH not called
            return [], info
        if self.clustering == "finch":
            labels = finch_level0(v)
        elif self.clustering == "kmeans":
            labels = kmeans_partition(
                v, defense_seed(self.seed, "fdcr-kmeans", self.streams) % 2**32)
        else:
            labels = dbscan_partition(v)
        info["labels"] = labels
        info["num_clusters"] = len(set(labels))
        top = top_cluster(v, labels)
        if len(top) == kv:
            return [], info  # E holding every valid client means no partition (step 8)
        info["single_cluster"] = False
        top_set = set(top)
        sil = separation_silhouette(v, [pos in top_set for pos in range(kv)])
        info["silhouette"] = sil
        if self.hardening == "on" and self.min_silhouette is not None and sil < self.min_silhouette:
            info["gate_fired"] = True
            return [], info
        if self.max_drop_fraction is not None and len(top) > self.max_drop_fraction * kv:
            info["drop_capped"] = True
            return [], info
        return top, info

    def _select_by_z(self, v: Tensor, ids: Sequence[int] | None,
                     info: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        """Rules ``robust-z`` and ``cumulative``: removals from the round's modified z-scores."""
        kv = v.numel()
        z = robust_z(v)
        info["robust_z"] = [float(x) for x in z]
        info["num_clusters"] = None
        c = self.z_threshold
        # two_sided: a V far below the others is suspect too (the V-minimising forgeries of
        # docs/attacks.md §4.7 and docs/attacks.md §4.8 land low, but not low enough: see
        # docs/detection.md §3.3)
        def beyond(x: float) -> bool:
            return (abs(x) if self.two_sided else x) > c

        if self.rule == "robust-z":
            top = [pos for pos in range(kv) if beyond(float(z[pos]))]
            low = [pos for pos in top if float(z[pos]) < 0]
        else:
            if ids is None or len(ids) != kv:
                raise ValueError("rule 'cumulative' needs the client id of every score")
            stats, seen = [], []
            for pos, cid in enumerate(ids):
                acc = self._cumulative.setdefault(int(cid), [0.0, 0])
                acc[0] += min(max(float(z[pos]), -c), c)
                acc[1] += 1
                stats.append(stouffer(acc[0], int(acc[1])))
                seen.append(int(acc[1]))
            info["cumulative_z"], info["observations"] = stats, seen
            top = [pos for pos in range(kv) if seen[pos] >= self.min_rounds and beyond(stats[pos])]
            low = [pos for pos in top if stats[pos] < 0]
        info["low"] = low
        top_set = set(top)
        info["labels"] = [int(pos in top_set) for pos in range(kv)]
        info["single_cluster"] = not top
        if top and self.max_drop_fraction is not None and len(top) > self.max_drop_fraction * kv:
            info["drop_capped"] = True
            return [], info
        return top, info

    def state_dict(self) -> dict[str, Any]:
        """Rule ``cumulative``: the per-client sums; the other rules keep no state."""
        if self.rule != "cumulative":
            return {}
        return {"cumulative": {cid: list(acc) for cid, acc in self._cumulative.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.rule != "cumulative":
            super().load_state_dict(state)
            return
        if set(state) - {"cumulative"}:
            raise ValueError(f"unexpected keys {sorted(set(state) - {'cumulative'})}")
        self._cumulative = {int(c): [float(a[0]), int(a[1])]
                            for c, a in (state.get("cumulative") or {}).items()}


class FDCROracle(FDCR):
    """The released FDCR server (docs/algorithms.md §4.2): marked clients' Fisher replaced by N(0, 1) noise. Not a defense.

    ``code`` preset, gate and spikiness check off. It refuses to aggregate until
    ``receive_attacker_ids`` has been called; every result carries the label
    "FDCR-oracle (uses ground truth; not a defense)".
    """

    name = "fdcr-oracle"
    paper = "Huang et al., NeurIPS 2024 (FDCR), released server with ground truth"
    summary = ORACLE_LABEL
    needs_attacker_ids = True

    def __init__(self, *, fisher_estimator: str | None = None, seed: int = 0,
                 streams: str = "named") -> None:
        super().__init__(preset="code", min_silhouette=None, hardening="off", support_ratio=None,
                         fisher_estimator=fisher_estimator, seed=seed, streams=streams)
        self._attacker_ids: frozenset[int] | None = None
        self._noise = defense_generator(int(seed), "fdcr-oracle", streams)

    def receive_attacker_ids(self, ids: Iterable[int]) -> None:
        """Hand over the ground-truth attacker ids (the released server's oracle, docs/algorithms.md §4.2 step 1)."""
        warnings.warn(f"{ORACLE_LABEL}: fdcr-oracle replaces the Fisher of the ground-truth "
                      "attackers by noise; its results measure the oracle, not FDCR",
                      UserWarning, stacklevel=2)
        self._attacker_ids = frozenset(int(i) for i in ids)

    def _fisher_rows(self, ri: RoundInput, fisher: Tensor, valid: Tensor) -> Tensor:
        assert self._attacker_ids is not None
        out = fisher.clone()
        for k, cid in enumerate(ri.client_ids):
            if int(cid) in self._attacker_ids:
                # drawn for every marked client, valid or not, so the stream does not depend on validity
                noise = torch.randn(ri.num_params, generator=self._noise, dtype=torch.float64)
                if bool(valid[k]):
                    out[k] = noise.to(out.dtype)
        return out

    def _blank_diagnostics(self, k_all: int) -> dict[str, Any]:
        return {**super()._blank_diagnostics(k_all), "label": ORACLE_LABEL}

    def draws_randomness(self) -> bool:
        return True

    def check_ready(self, ri: RoundInput) -> None:
        """FDCR with the marked clients' Fisher swapped for noise (docs/algorithms.md §4.3) needs the ids first."""
        if self._attacker_ids is None:
            raise RuntimeError("fdcr-oracle uses ground-truth attacker ids and refuses to aggregate "
                               "until receive_attacker_ids(ids) has been called explicitly")

    def state_dict(self) -> dict[str, Any]:
        return {"noise_state": self._noise.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) - {"noise_state"}:
            raise ValueError(f"unexpected keys {sorted(set(state) - {'noise_state'})}")
        if "noise_state" in state:
            self._noise.set_state(state["noise_state"])
