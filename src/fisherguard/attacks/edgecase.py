"""Edge-case backdoor with a proxy tail held out of every client (docs/attacks.md §3.6).

PROXY. The original tail sets (ARDIS sevens, Southwest planes) are not shipped. The defaults of
``tail``, ``tail_dataset``, ``source_class`` and ``target`` come from the run's dataset
(``PRESETS``; an option or ``attack.target`` the user sets always wins): MNIST and USPS use
``tail="cross"``, Fashion-MNIST, CIFAR-10 and synthetic ``tail="held-out"``.

``tail="cross"``: the tail is the source-class training images of another handwriting dataset
(``tail_dataset``: USPS sevens for an MNIST task, MNIST sevens for a USPS task, the in-repo
analogue of ARDIS), loaded through the data room and converted like the task's own images
(``resize_to_32``; grey repeated to the task's channels), relabelled to the target, at most
``tail_max`` of them (a seeded subsample), split (seeded, ``test_share``) into the attackers'
part and the test part measured as ASR_edge. Nothing is taken out of the client pool.

``tail="held-out"``, the other datasets' proxy: before the partition (``reserve``) the tail is
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
from fisherguard.data import load_raw
from fisherguard.data.catalogue import canonical_name
from fisherguard.data.transforms import resize_to_32
from fisherguard.models import flatten, load_flat
from fisherguard.seeding import derive_seed, numpy_stream, torch_stream

SELECTIONS = ("confidence", "random")
TAILS = ("held-out", "own", "cross")
# docs/attacks.md §3.6 "source/target classes per dataset preset": the defaults of the options
# left unset, by the run's dataset (``data.dataset``, handed over as the ``dataset`` fact);
# a direct construction without a dataset gets the generic (Fashion-MNIST) preset
PRESETS: dict[str, dict] = {
    "mnist": {"tail": "cross", "tail_dataset": "usps", "source_class": 7, "target": 1},
    "usps": {"tail": "cross", "tail_dataset": "mnist", "source_class": 7, "target": 1},
    "fashion-mnist": {"tail": "held-out", "tail_dataset": None, "source_class": 7, "target": 2},
    "cifar10": {"tail": "held-out", "tail_dataset": None, "source_class": 0, "target": 9},
    "synthetic": {"tail": "held-out", "tail_dataset": None, "source_class": 7, "target": 2},
}
GENERIC = "fashion-mnist"
TAIL_DATASETS = ("mnist", "usps", "fashion-mnist", "cifar10")  # datasets with files
GREY = ("mnist", "usps", "fashion-mnist", "synthetic")
TAIL_MAX = 1000  # cross tail: at most this many source images (MNIST has 6265 sevens, USPS 645)
REFERENCE_STEPS = 200  # full-batch gradient steps of the logistic-regression reference model
REFERENCE_LR = 0.5
REFERENCE_L2 = 1e-4
REFERENCE_FIT = 4000  # the reference model is fitted on at most this many pool images

log = logging.getLogger("fisherguard")


def preset(dataset: str | None) -> dict:
    """The edge-case defaults of a dataset (``PRESETS``); the generic ones for None/unknown."""
    try:
        key = canonical_name(dataset) if dataset else GENERIC
    except ValueError:
        key = GENERIC
    return dict(PRESETS.get(key, PRESETS[GENERIC]))


class EdgeCase(Attack):
    """Edge-case backdoor, proxy tail: another dataset's source-class images (MNIST, USPS) or
    low-confidence source-class images held out of every client (Fashion-MNIST, CIFAR-10)
    (Wang et al., NeurIPS 2020; docs/attacks.md §3.6)."""

    name = "edge-case"
    paper = "Wang et al., NeurIPS 2020"
    summary = ("PROXY edge-case, per dataset: MNIST/USPS take the other set's sevens as the tail "
               "(labelled 1), Fashion-MNIST/CIFAR-10 hold the least confident 10 % of the "
               "source class (7 → 2, airplane → truck) out of every client; half the tail makes "
               "up p_edge of the attackers' data, half measures ASR_edge")
    kind = "data poisoning"
    knowledge = "data-only"

    def __init__(self, *, source_class: int | None = None, target: int | None = None,
                 p_edge: float = 0.5, tail_fraction: float = 0.1, selection: str = "confidence",
                 tail: str | None = None, tail_dataset: str | None = None,
                 test_share: float = 0.5, tail_max: int = TAIL_MAX, dataset: str | None = None,
                 data_dir: str | None = None) -> None:
        # None: the dataset's preset (PRESETS); ``dataset``/``data_dir`` are the run's data facts
        ds = None
        if dataset is not None:
            try:
                ds = canonical_name(dataset)
            except ValueError as e:
                raise AttackConfigError(f"edge-case dataset: {e}") from None
        pre = preset(ds)
        if tail is None:
            tail = "cross" if tail_dataset is not None else pre["tail"]
        if tail not in TAILS:
            raise AttackConfigError(f"edge-case tail must be one of {', '.join(TAILS)}, "
                                    f"got {tail!r}")
        if tail != "cross":
            if tail_dataset is not None:
                raise AttackConfigError(f"edge-case tail_dataset is used by tail 'cross' only, "
                                        f"got tail {tail!r}")
        else:
            if tail_dataset is None:
                tail_dataset = pre["tail_dataset"] if ds is not None else None
            if tail_dataset is None:
                raise AttackConfigError(
                    f"edge-case tail 'cross' has no default tail_dataset on "
                    f"{ds or 'an unnamed dataset'} (the presets pair mnist and usps); set "
                    f"tail_dataset to one of {', '.join(TAIL_DATASETS)}")
            try:
                tail_dataset = canonical_name(str(tail_dataset))
            except ValueError:
                tail_dataset = str(tail_dataset)
            if tail_dataset not in TAIL_DATASETS:
                raise AttackConfigError(f"edge-case tail_dataset must be one of "
                                        f"{', '.join(TAIL_DATASETS)}, got {tail_dataset!r}")
            if tail_dataset == ds:
                raise AttackConfigError(f"edge-case tail_dataset must be another dataset than "
                                        f"the task's ({ds})")
            if ds in GREY and tail_dataset not in GREY:
                raise AttackConfigError(f"edge-case tail_dataset {tail_dataset!r} is colour; "
                                        f"the {ds} task is grey")
        if not isinstance(tail_max, int) or isinstance(tail_max, bool) or tail_max < 2:
            raise AttackConfigError(f"edge-case tail_max must be an integer >= 2, "
                                    f"got {tail_max!r}")
        source_class = pre["source_class"] if source_class is None else source_class
        target = pre["target"] if target is None else target
        if (not isinstance(test_share, (int, float)) or isinstance(test_share, bool)
                or not 0.0 < test_share < 1.0):
            raise AttackConfigError(f"edge-case test_share must be in (0, 1), got {test_share!r}")
        if selection not in SELECTIONS:
            raise AttackConfigError(f"edge-case selection must be one of {', '.join(SELECTIONS)}, "
                                    f"got {selection!r}")
        for opt, v in (("p_edge", p_edge), ("tail_fraction", tail_fraction)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 < v <= 1.0:
                raise AttackConfigError(f"edge-case {opt} must be in (0, 1], got {v!r}")
        for opt, v in (("source_class", source_class), ("target", target)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 10:
                raise AttackConfigError(f"edge-case {opt} must be a class index in 0..9, "
                                        f"got {v!r}")
        if source_class == target:
            raise AttackConfigError(f"edge-case source_class must differ from the target "
                                    f"({target}), got {source_class!r}")
        self.source_class, self.target = source_class, target
        self.p_edge, self.tail_fraction = float(p_edge), float(tail_fraction)
        self.selection = selection
        self.tail_source, self.test_share = tail, float(test_share)
        self.tail_dataset, self.tail_max = tail_dataset, tail_max
        self.dataset, self.data_dir = ds, data_dir

    def get_params(self) -> dict:
        return {**super().get_params(), "tail": self.tail_source}

    def reserve(self, images: torch.Tensor, labels: np.ndarray, pool: np.ndarray,
                seed: int) -> Reserved | None:
        """The held-out tail (``tail="held-out"``): the ``tail_fraction`` of the pool's
        source-class images with the lowest reference confidence (or a seeded random share),
        split by stream ``edge-case-reserve`` into the attackers' part and the test part.
        ``tail="cross"``: ``cross_tail`` (nothing leaves the pool)."""
        if self.tail_source == "cross":
            return self.cross_tail(images, seed)
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
        test_idx, att_idx = self.split(rng, tail_idx)
        return Reserved(indices=np.sort(tail_idx),
                        attacker_images=images[torch.from_numpy(att_idx)],
                        attacker_labels=torch.full((len(att_idx),), self.target, dtype=torch.int64),
                        test_images=images[torch.from_numpy(test_idx)], target=self.target)

    def split(self, rng: np.random.Generator, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The test part (``test_share``, at least one) and the attackers' part (at least one)."""
        k = len(tail)
        n_test = min(k - 1, max(1, round(self.test_share * k)))
        perm = rng.permutation(k)
        return tail[perm[:n_test]], tail[perm[n_test:]]

    def cross_tail(self, images: torch.Tensor, seed: int) -> Reserved:
        """The ``tail_dataset``'s training images of the source class, converted like the task's
        images (``resize_to_32``, grey repeated to the task's channels), at most ``tail_max`` (a
        seeded subsample), relabelled to the target and split by stream ``edge-case-cross``.
        A missing dataset raises the data room's DatasetMissingError (with the fetch command)."""
        raw = load_raw(self.tail_dataset, root=self.data_dir)
        src = np.flatnonzero(np.asarray(raw.train_y) == self.source_class)
        if len(src) < 2:
            raise AttackConfigError(f"edge-case: {self.tail_dataset} holds {len(src)} training "
                                    f"image(s) of class {self.source_class}; the cross tail "
                                    f"needs at least 2")
        rng = numpy_stream(seed, "edge-case-cross")
        if len(src) > self.tail_max:
            src = np.sort(src[rng.permutation(len(src))[:self.tail_max]])
        tail = resize_to_32(np.asarray(raw.train_x)[src])
        want = images.shape[1]
        if tail.shape[1] != want:
            if tail.shape[1] != 1:
                raise AttackConfigError(f"edge-case: {self.tail_dataset} images have "
                                        f"{tail.shape[1]} channels, the task's {want}")
            tail = tail.expand(-1, want, -1, -1).contiguous()
        test_idx, att_idx = self.split(rng, np.arange(len(tail)))
        return Reserved(indices=np.empty(0, dtype=np.int64),
                        attacker_images=tail[torch.from_numpy(att_idx)],
                        attacker_labels=torch.full((len(att_idx),), self.target, dtype=torch.int64),
                        test_images=tail[torch.from_numpy(test_idx)], target=self.target)

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
        if self.tail_source in ("held-out", "cross"):
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
