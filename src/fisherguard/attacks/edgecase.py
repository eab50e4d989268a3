"""Edge-case backdoor, in-attack proxy: rare source-class inputs relabelled to the target (docs/attacks.md §3.6).

PROXY. The specification's Fashion-MNIST / CIFAR-10 / synthetic proxy is the 10 % of
source-class training images with the lowest confidence under a clean reference model, held out
from every client, with the ASR measured on a held-out part of that tail. That needs the engine
to take images out of the partition and to score a second test set, which this stage cannot do.
What it does instead, inside the attacker's own partition: the tail set is the share
``tail_fraction`` of the attacker's own source-class images with the lowest confidence (softmax
probability of their true class) under a clean reference model the attacker trains on its own
clean data (``selection="confidence"``, default), or a seeded random share of them
(``selection="random"``); they are not held out from anyone. The attacker trains on n_k samples of which a share ``p_edge`` is drawn (with
replacement) from its tail set relabelled to the target and the rest (without replacement) from
its other, clean samples. There is no trigger, so the run's ASR is the target-class base rate,
not the edge-case ASR.
"""

from __future__ import annotations

import logging

import torch

from fisherguard.attacks.base import Attack, AttackConfigError
from fisherguard.clients.training import ClientDataset, ClientJob, SequentialTrainer
from fisherguard.models import flatten, load_flat
from fisherguard.seeding import derive_seed, numpy_stream, torch_stream

SELECTIONS = ("confidence", "random")

log = logging.getLogger("fisherguard")


class EdgeCase(Attack):
    """Edge-case backdoor, proxy tail set from the attacker's own source-class images (Wang et al., NeurIPS 2020; docs/attacks.md §3.6)."""

    name = "edge-case"
    paper = "Wang et al., NeurIPS 2020"
    summary = ("PROXY edge-case: the least confident share of the attacker's own source-class "
               "images (clean reference model), relabelled to the target, makes up p_edge of its "
               "training data (no held-out tail, ASR not measured on tail inputs)")
    kind = "data poisoning"
    knowledge = "data-only"

    def __init__(self, *, source_class: int = 7, target: int = 2, p_edge: float = 0.5,
                 tail_fraction: float = 0.1, selection: str = "confidence") -> None:
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
