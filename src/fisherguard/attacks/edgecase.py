"""Edge-case backdoor with a held-out low-confidence tail, a proxy (docs/attacks.md §3.6).

PROXY. The original tail sets (ARDIS sevens, Southwest planes) are not shipped. Default
(``tail="held-out"``), the specification's proxy: before the partition (``reserve``) the tail is
the share ``tail_fraction`` of the client pool's source-class images with the lowest confidence
(softmax probability of their true class) under a clean reference model, held out of every
client and split (seeded) into the attackers' part and a held-out test part on which the engine
measures ASR_edge. The reference model is a multinomial logistic regression on 4×4-pooled grey
pixels fitted by full-batch gradient descent from zero weights (``reference_confidence``): cheap
(a few seconds on a 20 000-image pool) and deterministic without any random draw; a proxy
for the paper's "clean model". ``selection="random"`` takes a seeded random share instead. Each
attacker trains on n_k samples of which a share ``p_edge`` is drawn (with replacement) from the
attackers' tail part, labelled with the target, and the rest (without replacement) from its own
clean data. ``tail="own"`` keeps the earlier in-attack variant: the tail is the least confident
share of the attacker's own source-class images under a SimpleCNN it trains on its own data,
nothing is held out and ASR_edge is not measured. There is no trigger, so the run's ASR is the
target-class base rate; ASR_edge is the edge-case ASR.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fisherguard.attacks.base import Attack, AttackConfigError, Reserved
from fisherguard.clients.training import ClientDataset, ClientJob, SequentialTrainer
from fisherguard.models import flatten, load_flat
from fisherguard.seeding import derive_seed, numpy_stream, torch_stream

SELECTIONS = ("confidence", "random")
TAILS = ("held-out", "own")
REFERENCE_STEPS = 200  # full-batch gradient steps of the logistic-regression reference model
REFERENCE_LR = 0.5
REFERENCE_L2 = 1e-4
REFERENCE_FIT = 4000  # the reference model is fitted on at most this many pool images

log = logging.getLogger("fisherguard")


class EdgeCase(Attack):
    """Edge-case backdoor, proxy tail: low-confidence source-class images held out of every client
    (Wang et al., NeurIPS 2020; docs/attacks.md §3.6)."""

    name = "edge-case"
    paper = "Wang et al., NeurIPS 2020"
    summary = ("PROXY edge-case: the least confident share (10 %) of the client pool's "
               "source-class images (logistic-regression reference model), held out of every "
               "client; half relabelled to the target make up p_edge of the attackers' data, "
               "half measure ASR_edge")
    kind = "data poisoning"
    knowledge = "data-only"

    def __init__(self, *, source_class: int = 7, target: int = 2, p_edge: float = 0.5,
                 tail_fraction: float = 0.1, selection: str = "confidence",
                 tail: str = "held-out", test_share: float = 0.5) -> None:
        if tail not in TAILS:
            raise AttackConfigError(f"edge-case tail must be one of {', '.join(TAILS)}, "
                                    f"got {tail!r}")
        if (not isinstance(test_share, (int, float)) or isinstance(test_share, bool)
                or not 0.0 < test_share < 1.0):
            raise AttackConfigError(f"edge-case test_share must be in (0, 1), got {test_share!r}")
        if selection not in SELECTIONS:
            raise AttackConfigError(f"edge-case selection must be one of {', '.join(SELECTIONS)}, "
                                    f"got {selection!r}")
        for opt, v in (("p_edge", p_edge), ("tail_fraction", tail_fraction)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 < v <= 1.0:
                raise AttackConfigError(f"edge-case {opt} must be in (0, 1], got {v!r}")
        if not isinstance(source_class, int) or isinstance(source_class, bool) or source_class < 0:
            raise AttackConfigError(f"edge-case source_class must be a class index >= 0, "
                                    f"got {source_class!r}")
        if source_class == target:
            raise AttackConfigError(f"edge-case source_class must differ from the target "
                                    f"({target}), got {source_class!r}")
        self.source_class, self.target = source_class, target
        self.p_edge, self.tail_fraction = float(p_edge), float(tail_fraction)
        self.selection = selection
        self.tail_source, self.test_share = tail, float(test_share)

    def get_params(self) -> dict:
        return {**super().get_params(), "tail": self.tail_source}

    def reserve(self, images: torch.Tensor, labels: np.ndarray, pool: np.ndarray,
                seed: int) -> Reserved | None:
        """The held-out tail (``tail="held-out"``): the ``tail_fraction`` of the pool's
        source-class images with the lowest reference confidence (or a seeded random share),
        split by stream ``edge-case-reserve`` into the attackers' part and the test part."""
        if self.tail_source != "held-out":
            return None
        pool = np.asarray(pool)
        pool_y = np.asarray(labels)[pool]
        src = np.flatnonzero(pool_y == self.source_class)
        if len(src) < 2:
            log.warning("edge-case: the client pool holds %d image(s) of class %d; no tail is "
                        "held out and the attackers train on clean data", len(src),
                        self.source_class)
            return None
        rng = numpy_stream(seed, "edge-case-reserve")
        k = min(len(src), max(2, round(self.tail_fraction * len(src))))
        if self.selection == "confidence":
            score = reference_confidence(images[torch.from_numpy(pool)],
                                         torch.from_numpy(pool_y))
            order = torch.argsort(score[torch.from_numpy(src)], stable=True).numpy()
            chosen = src[order[:k]]
        else:
            chosen = src[rng.permutation(len(src))[:k]]
        tail_idx = pool[chosen]  # training-set indices
        n_test = min(k - 1, max(1, round(self.test_share * k)))
        perm = rng.permutation(k)
        test_idx, att_idx = tail_idx[perm[:n_test]], tail_idx[perm[n_test:]]
        return Reserved(indices=np.sort(tail_idx),
                        attacker_images=images[torch.from_numpy(att_idx)],
                        attacker_labels=torch.full((len(att_idx),), self.target, dtype=torch.int64),
                        test_images=images[torch.from_numpy(test_idx)], target=self.target)

    def confidence(self, client_id: int, data: ClientDataset, seed: int) -> torch.Tensor:
        """p(true class | x) of every sample under a clean reference model the attacker trains
        from a seeded initialisation on its own clean data with the benign optimiser."""
        ctx = self.ctx
        if ctx.model_factory is None or ctx.plan is None:
            raise AttackConfigError("edge-case selection 'confidence' needs the federation's model "
                                    "and optimiser; use selection: random")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "edge-case-reference-init", client_id))
            start = flatten(ctx.model_factory()).detach().clone()
        job = ClientJob(client_id, start, data, torch_stream(seed, "edge-case-reference", client_id))
        weights = SequentialTrainer(ctx.model_factory).train_one(job, ctx.plan).weights
        model = load_flat(ctx.model_factory(), weights).eval()
        x, y = data.fisher_data()  # every sample, no random augmentation
        with torch.no_grad():
            p = torch.cat([model(x[s:s + 500]).softmax(1) for s in range(0, len(y), 500)])
        return p[torch.arange(len(y)), y]

    def tail(self, labels: torch.Tensor, rng, score: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of the attacker's tail set: the ``tail_fraction`` of its source-class samples
        with the lowest ``score`` (a seeded random share when no score is given), at least one."""
        src = torch.nonzero(labels == self.source_class).flatten()
        if len(src) == 0:
            return src
        k = max(1, round(self.tail_fraction * len(src)))
        if score is None:
            return src[torch.from_numpy(rng.permutation(len(src))[:k])]
        return src[torch.argsort(score[src], stable=True)[:k]]

    def poison(self, client_id: int, data: ClientDataset, seed: int) -> ClientDataset:
        if data.images is None:
            raise AttackConfigError("edge-case selects raw images; put it first among the stages")
        if self.tail_source == "held-out":
            return self.poison_held_out(client_id, data, seed)
        rng = numpy_stream(seed, "edge-case", client_id)
        n = len(data)
        score = None
        if self.selection == "confidence" and bool((data.labels == self.source_class).any()):
            score = self.confidence(client_id, data, seed)
        tail = self.tail(data.labels, rng, score)
        if len(tail) == 0:
            log.warning("edge-case: client %d holds no image of class %d; it trains on clean data",
                        client_id, self.source_class)
            return data
        keep = torch.ones(n, dtype=torch.bool)
        keep[tail] = False
        clean = torch.nonzero(keep).flatten()
        n_edge = min(n, max(1, round(self.p_edge * n)))
        n_clean = min(len(clean), n - n_edge)
        edge_idx = tail[torch.from_numpy(rng.integers(0, len(tail), size=n_edge))]
        clean_idx = clean[torch.from_numpy(rng.permutation(len(clean))[:n_clean])]
        idx = torch.cat([edge_idx, clean_idx])
        labels = torch.cat([torch.full((n_edge,), self.target, dtype=data.labels.dtype),
                            data.labels[clean_idx]])
        poisoned = torch.zeros(len(idx), dtype=torch.bool)
        poisoned[:n_edge] = True  # marks the relabelled tail samples (no trigger is stamped)
        return ClientDataset(labels=labels, pipeline=data.pipeline, images=data.images[idx],
                             poisoned=poisoned)

    def poison_held_out(self, client_id: int, data: ClientDataset, seed: int) -> ClientDataset:
        """p_edge of n_k drawn with replacement from the attackers' reserved tail part (labelled
        with the target), the rest without replacement from the attacker's own clean data."""
        extra = getattr(self, "ctx", None) and self.ctx.extra_data
        if extra is None or len(extra) == 0:
            log.warning("edge-case: no reserved tail images; client %d trains on clean data",
                        client_id)
            return data
        assert extra.images is not None
        rng = numpy_stream(seed, "edge-case", client_id)
        n = len(data)
        n_edge = min(n, max(1, round(self.p_edge * n)))
        edge_idx = torch.from_numpy(rng.integers(0, len(extra), size=n_edge))
        clean_idx = torch.from_numpy(rng.permutation(n)[:n - n_edge])
        labels = torch.cat([extra.labels[edge_idx].to(data.labels.dtype), data.labels[clean_idx]])
        images = torch.cat([extra.images[edge_idx], data.images[clean_idx]])
        poisoned = torch.zeros(n, dtype=torch.bool)
        poisoned[:n_edge] = True  # marks the tail samples (no trigger is stamped)
        return ClientDataset(labels=labels, pipeline=data.pipeline, images=images,
                             poisoned=poisoned)


def reference_features(images: torch.Tensor) -> torch.Tensor:
    """Grey pixels in [0, 1], 4×4 average-pooled to 8×8 and flattened (float64 for the fit)."""
    x = images[:, :1].float() if images.shape[1] == 1 else images.float().mean(1, keepdim=True)
    return (torch.nn.functional.avg_pool2d(x, 4).flatten(1) / 255.0).to(torch.float64)


def reference_confidence(images: torch.Tensor, labels: torch.Tensor,
                         num_classes: int = 10) -> torch.Tensor:
    """p(true class | x) of every image under the clean reference model: a multinomial logistic
    regression on ``reference_features`` (standardised), fitted in float64 on an evenly strided
    subset of at most ``REFERENCE_FIT`` of the given images (the client pool is already in a
    seeded random order) by ``REFERENCE_STEPS`` full-batch gradient steps from zero weights with
    an L2 penalty. No random draw, so the scores depend only on the images and their order."""
    x = reference_features(images)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = labels.to(torch.int64)
    fit = torch.arange(0, len(y), max(1, -(-len(y) // REFERENCE_FIT)))
    xf = x[fit].contiguous()
    xt = xf.T.contiguous()
    onehot = torch.nn.functional.one_hot(y[fit], num_classes).to(x.dtype)
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype)
    for _ in range(REFERENCE_STEPS):
        p = (xf @ w).softmax(1)
        w -= REFERENCE_LR * (xt @ (p - onehot) / len(fit) + REFERENCE_L2 * w)
    p = (x @ w).softmax(1)
    return p[torch.arange(len(y)), y].to(torch.float32)
