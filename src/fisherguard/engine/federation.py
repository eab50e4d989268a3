"""A run's fixed parts, built once from its config: data, split, partition, attack, model, U.

Both engines build the same ``Federation`` from the same config (the Flower ClientApp builds it
on every node), so each client's data, trigger and random streams are identical everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fisherguard import metrics
from fisherguard.attacks.base import AttackContext, choose_attackers
from fisherguard.attacks.plan import AttackPlan
from fisherguard.clients.training import (ClientDataset, ClientJob, FisherRequest, TrainPlan,
                                          client_fisher)
from fisherguard.config import Config
from fisherguard.data.datasets import load_raw
from fisherguard.data.partition import dirichlet, legacy_global_generator, train_validation_split
from fisherguard.data.transforms import Pipeline, resize_to_32
from fisherguard.defenses.base import ClientPlan, Defense
from fisherguard.engine.server_data import ValidationSet
from fisherguard.models import build_model, flatten, load_flat
from fisherguard.seeding import derive_seed, numpy_stream, torch_stream

log = logging.getLogger("fisherguard")


@dataclass
class Federation:
    """Everything a run needs that does not change between rounds."""

    cfg: Config
    pipeline: Pipeline
    clients: list[ClientDataset]  # each client's training data (an attacker's poisoned)
    attack: AttackPlan
    attackers: list[int]  # known to the attack and the metrics only
    test_x: torch.Tensor  # uint8 (N, C, 32, 32)
    test_y: np.ndarray
    server_images: torch.Tensor
    server_labels: torch.Tensor
    partition_info: dict[str, Any] = field(default_factory=dict)
    # an attacker's clean data, for the rounds its attack's schedule leaves idle
    clean: dict[int, ClientDataset] = field(default_factory=dict)
    # images the attack held out of every client (an edge-case tail), scored as ASR_edge
    tail_test: torch.Tensor | None = None  # uint8 (n, C, 32, 32), like test_x
    tail_target: int | None = None
    # ``prepare(cfg, only=k)``: client k's view; every other client's entry of ``clients`` is None
    only: int | None = None

    def model_factory(self) -> nn.Module:
        return build_model("simplecnn", self.cfg.data.channels)

    def datasets(self) -> list[ClientDataset]:
        """Every dataset a client may train on (the trainers' workers hold them all)."""
        if self.only is not None:
            raise ValueError(f"a federation prepared for client {self.only} holds only its data")
        return self.clients + [d for k, d in sorted(self.clean.items())]

    def is_attacking(self, cid: int, round_idx: int) -> bool:
        """Client ``cid`` attacks in this round (it is an attacker and the schedule is on)."""
        return cid in self.attackers and self.attack.active(round_idx)

    @property
    def test_trigger(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.attack.test_trigger()


def prepare(cfg: Config, only: int | None = None) -> Federation:
    """Load data, split, hold out the attack's reserved images (an edge-case tail), partition,
    choose attackers and poison their data (docs/protocol.md §1–§5, docs/attacks.md §3.6).

    ``only=k`` prepares what client k's node needs, bit-identical to the full federation's: the
    split, partition and attackers are drawn in full (cheap: indices and labels), client k's
    images are cut out and, for an attacker, poisoned; the attack is bound to the same context
    (every attacker's clean data), and each attacker's poisoning draws from its own named
    streams, so poisoning one is poisoning it among all. Other clients' ``clients`` entries are
    None; no test or server set is kept (a Flower deployment node, docs/flower.md §3.2).
    """
    d, seed = cfg.data, cfg.experiment.seed
    if d.dataset == "synthetic":
        raw = load_raw("synthetic", n_train=d.synthetic_train, n_test=d.synthetic_test)
    else:
        raw = load_raw(d.dataset, root=d.data_dir)
    if d.channels == 1 and not raw.grey:
        raise ValueError("data.channels: 1 is only allowed for grey datasets "
                         "(mnist, fashion-mnist, usps, synthetic)")
    pipeline = Pipeline(grey=raw.grey, out_channels=d.channels)
    train_x = resize_to_32(raw.train_x)
    test_x = resize_to_32(raw.test_x)
    test_y = np.asarray(raw.test_y, dtype=np.int64)
    if d.test_subset:
        test_x, test_y = test_x[:d.test_subset], test_y[:d.test_subset]
    train_y = np.asarray(raw.train_y, dtype=np.int64)

    split = train_validation_split(len(train_y), val_size=cfg.server.val_size,
                                   rng=numpy_stream(seed, "server-set"))
    pool = split.client_pool[:d.train_subset] if d.train_subset else split.client_pool
    attack = cfg.build_attack()
    reserved = attack.reserve(train_x, train_y, pool, seed)
    extra = None
    if reserved is not None:  # held out of every client before the partition
        pool = pool[~np.isin(pool, reserved.indices)]
        extra = ClientDataset(labels=reserved.attacker_labels, pipeline=pipeline,
                              images=reserved.attacker_images)
    fed = cfg.federation
    part_rng = (legacy_global_generator(seed, len(train_y))
                if cfg.partition.stream == "legacy-global" else numpy_stream(seed, "partition"))
    part = dirichlet(train_y[pool], fed.clients, cfg.partition.beta, part_rng,
                     min_size=cfg.partition.min_size)
    attackers = choose_attackers(fed.clients, cfg.attack_fraction, mode=cfg.attack.attackers,
                                 rng=numpy_stream(seed, "attackers"))
    if only is not None and not 0 <= only < fed.clients:
        raise ValueError(f"client {only} is not among the federation's {fed.clients}")
    need = set(range(fed.clients)) if only is None else {only, *attackers}
    clients = [ClientDataset(labels=torch.from_numpy(train_y[pool[local]]), pipeline=pipeline,
                             images=train_x[torch.from_numpy(pool[local])])
               if k in need else None
               for k, local in enumerate(part.client_indices)]
    clean = {k: clients[k] for k in attackers}
    attack.bind(AttackContext(num_clients=fed.clients, attackers=list(attackers), seed=seed,
                              target=cfg.attack.target, clean_data=dict(clean),
                              model_factory=lambda: build_model("simplecnn", d.channels),
                              plan=train_plan(cfg), extra_data=extra))
    for k in attackers:
        if only is None or k == only:
            clients[k] = attack.poison(k, clients[k], seed)
        else:
            clients[k] = None  # another attacker's data: bound to the attack, not this node's
    if only is not None:
        clean = {k: d for k, d in clean.items() if k == only}
    sizes = part.sizes
    small = [k for k, n in enumerate(sizes) if n < fed.batch_size]
    if small:
        log.warning("clients %s hold fewer than %d samples and get no training step", small,
                    fed.batch_size)
    info = {"sizes": sizes, "attempts": part.attempts,
            "class_counts": part.class_counts(train_y[pool]).tolist(), "attackers": attackers,
            "server_set_size": int(len(split.server_set)), "client_pool": int(len(pool))}
    if reserved is not None:
        info["held_out"] = {"total": int(len(reserved.indices)),
                            "attackers": int(len(reserved.attacker_labels)),
                            "test": int(len(reserved.test_images))}
    u = torch.from_numpy(split.server_set)
    if only is not None:  # a node evaluates nothing and holds no server set
        test_x, test_y, u = test_x[:0], test_y[:0], u[:0]
    return Federation(cfg=cfg, pipeline=pipeline, clients=clients,  # type: ignore[arg-type]
                      attack=attack, attackers=attackers, test_x=test_x, test_y=test_y,
                      server_images=train_x[u],
                      server_labels=torch.from_numpy(train_y[split.server_set[:len(u)]]),
                      partition_info=info, clean=clean,
                      tail_test=None if reserved is None else reserved.test_images,
                      tail_target=None if reserved is None else reserved.target, only=only)


def initial_weights(fed: Federation) -> torch.Tensor:
    """One PyTorch default initialisation from the run seed (docs/protocol.md §4)."""
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(fed.cfg.experiment.seed, "model-init"))
        return flatten(fed.model_factory()).clone()


def train_plan(cfg: Config) -> TrainPlan:
    """The clients' local optimiser settings of a config (docs/protocol.md §4)."""
    f = cfg.federation
    return TrainPlan(epochs=f.local_epochs, batch_size=f.batch_size, lr=f.lr,
                     momentum=f.momentum, weight_decay=f.weight_decay)


def server_data(fed: Federation, defense: Defense, plan: TrainPlan) -> ValidationSet | None:
    """The server's clean set U, for the defenses that read it (docs/protocol.md §2)."""
    if not defense.needs_server_data:
        return None
    cfg = fed.cfg
    if defense.reads_root_set and cfg.server.root_set == "mnist-5000":
        images, labels = mnist_root_set(cfg)
        # MNIST is grey: the CIFAR-10 strong augmentation becomes the grey training transform
        transform = "train" if cfg.server.transform == "strong" else cfg.server.transform
        return ValidationSet(fed.model_factory, images, labels,
                             Pipeline(grey=True, out_channels=cfg.data.channels),
                             transform=transform, plan=plan,
                             fisher_options=defense.fisher_options(), seed=cfg.experiment.seed)
    return ValidationSet(fed.model_factory, fed.server_images, fed.server_labels, fed.pipeline,
                         transform=cfg.server.transform, plan=plan,
                         fisher_options=defense.fisher_options(), seed=cfg.experiment.seed)


ROOT_SET_SIZE = 5000  # MarsFL's `pub_minst` (docs/baselines.md C5)


def mnist_root_set(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """FLTrust's and Sageflow's server data under `code`: 5 000 random MNIST training images,
    whatever the task (docs/baselines.md C5), drawn from the named stream ``mnist-root-set``. The
    set is MarsFL's in kind and size, not image for image: which 5 000 the release picks is not
    reproduced."""
    raw = load_raw("mnist", root=cfg.data.data_dir)
    y = np.asarray(raw.train_y, dtype=np.int64)
    pick = np.sort(numpy_stream(cfg.experiment.seed, "mnist-root-set")
                   .choice(len(y), size=min(ROOT_SET_SIZE, len(y)), replace=False))
    return resize_to_32(np.asarray(raw.train_x)[pick]), torch.from_numpy(y[pick])


def client_job(fed: Federation, cid: int, round_idx: int, weights: torch.Tensor,
               client_plan: ClientPlan | None, fisher: FisherRequest | None = None) -> ClientJob:
    """Client ``cid``'s local training in round ``round_idx``: its data, its named stream, its plan,
    and, for an attacker whose attack acts this round, the attack's training stage."""
    p = client_plan
    start = p.start_weights if p is not None and p.start_weights is not None else weights
    regulariser = p.regulariser if p is not None else None
    attacking = fed.is_attacking(cid, round_idx)
    data = training_data(fed, cid, round_idx)
    modifier = fed.attack.training(cid, round_idx, start) if attacking else None
    if attacking and not fed.attack.follow_protocol:
        regulariser = None  # a non-compliant attacker drops the defense's client-side term
    return ClientJob(cid, start, data,
                     torch_stream(fed.cfg.experiment.seed, "client", cid, round_idx),
                     regulariser, fisher, modifier)


def client_fisher_options(cfg: Config, defense: Defense) -> dict[str, Any]:
    """The options of every client Fisher a run asks for: the defense's estimator options, and
    under ``federation.fisher_data: train_loader`` (the `code` preset) the training loader's
    augmented samples as its data (``clients.training.client_fisher``)."""
    options = dict(defense.fisher_options())
    if cfg.federation.fisher_data != "plain":
        options["data"] = cfg.federation.fisher_data
    return options


def fisher_request(fed: Federation, cid: int, tag: int | str,
                   fisher_options: dict[str, Any]) -> FisherRequest:
    """Ask client ``cid`` for its Fisher, drawing from its named stream ``("fisher", cid, tag)``."""
    return FisherRequest(fisher_options, torch_stream(fed.cfg.experiment.seed, "fisher", cid, tag))


def training_data(fed: Federation, cid: int, round_idx: int) -> ClientDataset:
    """The data client ``cid`` trains on in this round (an idle attacker's is its clean data)."""
    if cid in fed.clean and not fed.is_attacking(cid, round_idx):
        return fed.clean[cid]
    return fed.clients[cid]


def local_fisher(fed: Federation, model: nn.Module, cid: int, round_idx: int,
                 weights: torch.Tensor, tag: int | str,
                 fisher_options: dict[str, Any],
                 data: ClientDataset | None = None) -> torch.Tensor:
    """F(D_k; w), client ``cid``'s diagonal Fisher on its round's data, or on ``data`` when given
    (docs/algorithms.md §2), drawn from stream ``tag``."""
    return client_fisher(model, training_data(fed, cid, round_idx) if data is None else data,
                         weights, fisher_request(fed, cid, tag, fisher_options))


def plan_tag(round_idx: int) -> str:
    """The Fisher stream tag of the Fishers a defense's client plan asks for in this round."""
    return f"plan-{round_idx}"


def evaluate(fed: Federation, model: nn.Module, weights: torch.Tensor) -> dict[str, Any]:
    """Clean accuracy and backdoor metrics of a global model (docs/protocol.md §7), trigger from the attack."""
    load_flat(model, weights)
    bs = fed.cfg.eval.batch_size
    clean = metrics.predict(model, fed.test_x, bs, fed.pipeline.test)
    trigger = fed.test_trigger or _no_trigger
    trig = metrics.predict(model, fed.test_x, bs, fed.pipeline.test, trigger=trigger)
    scores = metrics.backdoor_metrics(clean, fed.test_y, trig, fed.cfg.attack.target)
    if fed.tail_test is not None and len(fed.tail_test) and fed.tail_target is not None:
        tail = metrics.predict(model, fed.tail_test, bs, fed.pipeline.test)
        scores["ASR_edge"] = metrics.edge_asr(tail, fed.tail_target)
    return scores


def _no_trigger(x: torch.Tensor) -> torch.Tensor:
    """Without a backdoor the 'triggered' test set is the clean one (ASR measures the base rate)."""
    return x
