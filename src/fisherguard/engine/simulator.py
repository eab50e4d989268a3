"""The in-process simulator: per round, clients train, a defense aggregates, the metrics layer scores.

Data flows one way (architecture.md §1); only this module and ``metrics`` hold the attacker ids,
and the defense never receives them (the labelled ``fdcr-oracle`` ablation excepted).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np
import torch
from torch import nn

from fisherguard import metrics
from fisherguard.allocator import retain_freed_memory
from fisherguard.attacks.badnets import poison_draw, trigger_mask
from fisherguard.clients.trainers import build_trainer
from fisherguard.clients.training import (ClientDataset, ClientJob, FisherRequest, LocalTrainer,
                                          TrainPlan, client_fisher)
from fisherguard.config import _defense_options
from fisherguard.data.datasets import load_raw
from fisherguard.data.partition import attacker_ids, dirichlet, train_validation_split
from fisherguard.data.transforms import Pipeline, resize_to_32
from fisherguard.defenses import registry
from fisherguard.defenses.base import ClientPlan, Defense, PlanInput, RoundInput
from fisherguard.defenses.fdcr import ORACLE_LABEL
from fisherguard.engine.server_data import ValidationSet
from fisherguard.models import build_model, flatten
from fisherguard.results import RunDir
from fisherguard.seeding import derive_seed, numpy_stream, torch_stream

log = logging.getLogger("fisherguard")



@dataclass
class Federation:
    """Everything a run needs that does not change between rounds."""

    cfg: dict[str, Any]
    pipeline: Pipeline
    clients: list[ClientDataset]
    attackers: list[int]
    test_x: torch.Tensor  # uint8 (N, C, 32, 32)
    test_y: np.ndarray
    trigger: torch.Tensor
    server_images: torch.Tensor
    server_labels: torch.Tensor
    partition_info: dict[str, Any] = field(default_factory=dict)

    def model_factory(self) -> nn.Module:
        return build_model("simplecnn", self.cfg["data"]["channels"])


def prepare(cfg: dict[str, Any]) -> Federation:
    """Load data, split, partition, choose attackers and poison their data (protocol §1–§5)."""
    d, exp = cfg["data"], cfg["experiment"]
    seed = exp["seed"]
    if d["dataset"] == "synthetic":
        raw = load_raw("synthetic", n_train=d["synthetic_train"], n_test=d["synthetic_test"])
    else:
        raw = load_raw(d["dataset"], root=d["data_dir"])
    if d["channels"] == 1 and not raw.grey:
        raise ValueError("data.channels: 1 is only allowed for grey datasets "
                         "(mnist, fashion-mnist, usps, synthetic)")
    pipeline = Pipeline(grey=raw.grey, out_channels=d["channels"])
    train_x = resize_to_32(raw.train_x)
    test_x = resize_to_32(raw.test_x)
    test_y = np.asarray(raw.test_y, dtype=np.int64)
    if d["test_subset"]:
        test_x, test_y = test_x[:d["test_subset"]], test_y[:d["test_subset"]]
    train_y = np.asarray(raw.train_y, dtype=np.int64)

    split = train_validation_split(len(train_y), val_size=cfg["server"]["val_size"],
                                   rng=numpy_stream(seed, "server-set"))
    pool = split.client_pool[:d["train_subset"]] if d["train_subset"] else split.client_pool
    fed = cfg["federation"]
    part = dirichlet(train_y[pool], fed["clients"], cfg["partition"]["beta"],
                     numpy_stream(seed, "partition"), min_size=cfg["partition"]["min_size"])
    att = cfg["attack"]
    frac = att["fraction"] if att["name"] != "none" else 0.0
    attackers = attacker_ids(fed["clients"], frac, mode=att["attackers"],
                             rng=numpy_stream(seed, "attackers"))
    trig = trigger_mask(d["channels"], exp["family"])

    clients = []
    for k, local in enumerate(part.client_indices):
        ix = torch.from_numpy(pool[local])
        images = train_x[ix]
        labels = torch.from_numpy(train_y[pool[local]])
        if k not in attackers:
            clients.append(ClientDataset(labels=labels, pipeline=pipeline, images=images))
            continue
        poisoned = torch.from_numpy(poison_draw(len(ix), numpy_stream(seed, "poison", k),
                                                att["poison_prob"]))
        labels = torch.where(poisoned, torch.full_like(labels, att["target"]), labels)
        cd = ClientDataset(labels=labels, pipeline=pipeline, images=images, poisoned=poisoned,
                           trigger=trig)
        if att["augmentation"] == "frozen":
            # the release transforms each attacker sample once and trains on it all run (§5.5)
            idx = torch.arange(len(ix))
            frozen = cd.batch(idx, torch_stream(seed, "attacker-augmentation", k))[0]
            cd = ClientDataset(labels=labels, pipeline=pipeline, frozen=frozen.contiguous())
        clients.append(cd)
    sizes = part.sizes
    small = [k for k, n in enumerate(sizes) if n < fed["batch_size"]]
    if small:
        log.warning("clients %s hold fewer than %d samples and get no training step", small,
                    fed["batch_size"])
    info = {"sizes": sizes, "attempts": part.attempts,
            "class_counts": part.class_counts(train_y[pool]).tolist(), "attackers": attackers,
            "server_set_size": int(len(split.server_set)), "client_pool": int(len(pool))}
    u = torch.from_numpy(split.server_set)
    return Federation(cfg=cfg, pipeline=pipeline, clients=clients, attackers=attackers,
                      test_x=test_x, test_y=test_y, trigger=trig, server_images=train_x[u],
                      server_labels=torch.from_numpy(train_y[split.server_set]),
                      partition_info=info)


def initial_weights(fed: Federation) -> torch.Tensor:
    """One PyTorch default initialisation from the run seed (protocol §4)."""
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(fed.cfg["experiment"]["seed"], "model-init"))
        return flatten(fed.model_factory()).clone()


class Progress:
    """One line per round on a terminal (rewritten in place), plain lines otherwise."""

    def __init__(self, total: int, label: str, stream: TextIO | None = sys.stderr) -> None:
        self.total, self.label, self.stream = total, label, stream
        self.tty = bool(stream and stream.isatty())

    def update(self, done: int, text: str) -> None:
        if self.stream is None:
            return
        width = 20
        bar = "#" * (width * done // self.total) + "." * (width - width * done // self.total)
        line = f"[{self.label}] [{bar}] round {done}/{self.total}  {text}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def build_defense(cfg: dict[str, Any]) -> Defense:
    return registry.build(cfg["defense"]["name"], _defense_options(cfg))


def run(cfg: dict[str, Any], out_dir: str | Path, *, resume: bool = False, label: str | None = None,
        trainer: LocalTrainer | None = None, progress: TextIO | None = sys.stderr,
        stop_after: int | None = None) -> dict[str, Any]:
    """Run one experiment into ``out_dir``; return its summary. ``stop_after`` ends early (tests)."""
    label = label or cfg["experiment"]["name"]
    if cfg["runtime"]["engine"] != "inprocess":  # the same round on Flower (engine/flower/)
        from fisherguard.engine.flower.launch import run_engine

        return run_engine(cfg, out_dir, resume=resume, label=label, progress=progress)
    if cfg["runtime"]["threads"]:
        torch.set_num_threads(cfg["runtime"]["threads"])
    if cfg["runtime"]["retain_memory"]:
        retain_freed_memory()
    run_dir = RunDir(out_dir)
    done = run_dir.start(cfg, resume=resume)
    total = cfg["federation"]["rounds"]
    if done >= total:  # a finished run: nothing to load or train
        return _summarise(run_dir, cfg, label, total)
    fed = prepare(cfg)
    defense = build_defense(cfg)
    plan = train_plan(cfg)
    own_trainer = trainer is None
    rt = cfg["runtime"]
    trainer = trainer or build_trainer(fed.model_factory, fed.clients, kind=rt["trainer"],
                                       workers=rt["workers"], group_size=rt["group_size"])
    log.info("trainer: %s%s", getattr(trainer, "name", type(trainer).__name__),
             f" × {rt['workers']} workers" if rt["workers"] > 1 else "")
    try:
        return _rounds(cfg, run_dir, done, total, fed, defense, plan, trainer, label, progress,
                       stop_after)
    finally:
        if own_trainer and hasattr(trainer, "close"):
            trainer.close()


def _rounds(cfg: dict[str, Any], run_dir: RunDir, done: int, total: int, fed: Federation,
            defense: Defense, plan: TrainPlan, trainer: LocalTrainer, label: str,
            progress: TextIO | None, stop_after: int | None) -> dict[str, Any]:
    fcfg = cfg["federation"]
    fisher_model = fed.model_factory()
    eval_model = fed.model_factory()
    fisher_opts = defense.fisher_options()
    server = server_data(fed, defense, plan)
    oracle = bool(defense.needs_attacker_ids)
    if oracle:
        warnings.warn(f"{ORACLE_LABEL}: the engine hands the true attacker ids to the defense",
                      UserWarning, stacklevel=2)
        defense.receive_attacker_ids(list(fed.attackers))  # type: ignore[attr-defined]

    ck = run_dir.load_checkpoint() if done else None
    if ck is not None:
        weights = ck["weights"]
        defense.load_state_dict(ck["defense_state"])
    else:
        weights = initial_weights(fed)
        (run_dir.path / "partition.json").write_text(__import__("json").dumps(fed.partition_info))
    ids = list(range(fcfg["clients"]))
    bar = Progress(total, label, progress)

    for t in range(done, total):
        if stop_after is not None and t >= stop_after:
            break
        t0 = time.perf_counter()
        if server is not None:
            server.begin_round(t)
        plans = {}
        if defense.client_regulariser:
            plans = defense.plan_clients(PlanInput(
                round_idx=t, global_weights=weights, client_ids=ids,
                client_fisher=lambda cid, w, _t=t: local_fisher(fed, fisher_model, cid, w,
                                                                f"plan-{_t}", fisher_opts),
                server_data=server))
        jobs = []
        for k in ids:
            jobs.append(client_job(fed, k, t, weights, plans.get(k),
                                   fisher_request(fed, k, t, fisher_opts)
                                   if defense.needs_fisher else None))
        t_train = time.perf_counter()
        results = trainer.train_round(jobs, plan)
        t_train = time.perf_counter() - t_train
        updates = torch.stack([r.weights - weights for r in results])
        fisher = None
        if defense.needs_fisher:
            fisher = torch.stack([r.fisher for r in results])  # type: ignore[misc]
        counts = torch.tensor([len(fed.clients[k]) for k in ids], dtype=torch.float64)
        ri = RoundInput(global_weights=weights, updates=updates, num_samples=counts, client_ids=ids,
                        lr=fcfg["lr"], round_idx=t, fisher=fisher, server_data=server,
                        num_rounds=total)
        t_agg = time.perf_counter()
        agg = defense.aggregate(ri)
        weights = agg.new_weights.detach().clone()
        evaluated = agg.eval_weights if agg.eval_weights is not None else weights
        t_eval = time.perf_counter()
        m = evaluate(fed, eval_model, evaluated, cfg["eval"]["batch_size"])
        t_done = time.perf_counter()
        fisher_s = sum(r.timing.get("fisher_s", 0.0) for r in results)
        timing = {"train_and_fisher_s": t_train, "fisher_s_summed": fisher_s,
                  "aggregate_s": t_eval - t_agg, "eval_s": t_done - t_eval}
        record = round_record(fed, t, ids, counts, agg, m, [r.stats for r in results],
                              time.perf_counter() - t0, oracle=oracle)
        record["timing"] = timing
        run_dir.append_round(record)
        run_dir.save_checkpoint({"rounds_done": t + 1, "weights": weights,
                                 "defense_state": defense.state_dict()})
        bar.update(t + 1, f"A={m['A']:.2f} ASR={m['ASR']:.2f} ({record['wall_time_s']:.1f}s)")
    return _summarise(run_dir, cfg, label, total)


def _summarise(run_dir: RunDir, cfg: dict[str, Any], label: str, total: int) -> dict[str, Any]:
    rounds = run_dir.rounds()
    summary = {"label": label, "defense": cfg["defense"]["name"], **metrics.summarize(rounds),
               "dataset": cfg["data"]["dataset"], "seed": cfg["experiment"]["seed"],
               "preset": cfg["experiment"]["preset"], "family": cfg["experiment"]["family"],
               "beta": cfg["partition"]["beta"], "attack_fraction": cfg["attack"]["fraction"]
               if cfg["attack"]["name"] != "none" else 0.0,
               "complete": len(rounds) == total, "engine": cfg["runtime"]["engine"]}
    if registry.get(cfg["defense"]["name"]).needs_attacker_ids:
        summary["defense"] = ORACLE_LABEL
    run_dir.write_summary(summary)
    return summary


def evaluate(fed: Federation, model: nn.Module, weights: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Clean accuracy and backdoor metrics of a global model (protocol §7)."""
    from fisherguard.models import load_flat

    load_flat(model, weights)
    target = fed.cfg["attack"]["target"]
    clean = metrics.predict(model, fed.test_x, batch_size, fed.pipeline.test)
    trig = metrics.predict(model, fed.test_x, batch_size, fed.pipeline.test, trigger=fed.trigger)
    return metrics.backdoor_metrics(clean, fed.test_y, trig, target)


# ---- one round's pieces, shared by this loop and the Flower adapter (engine/flower/) ----------


def train_plan(cfg: dict[str, Any]) -> TrainPlan:
    """The clients' local optimiser settings of a config (protocol §4)."""
    f = cfg["federation"]
    return TrainPlan(epochs=f["local_epochs"], batch_size=f["batch_size"], lr=f["lr"],
                     momentum=f["momentum"], weight_decay=f["weight_decay"])


def server_data(fed: Federation, defense: Defense, plan: TrainPlan) -> ValidationSet | None:
    """The server's clean set U, for the defenses that read it (protocol §2)."""
    if not defense.needs_server_data:
        return None
    cfg = fed.cfg
    return ValidationSet(fed.model_factory, fed.server_images, fed.server_labels, fed.pipeline,
                         transform=cfg["server"]["transform"], plan=plan,
                         fisher_options=defense.fisher_options(), seed=cfg["experiment"]["seed"])


def client_job(fed: Federation, cid: int, round_idx: int, weights: torch.Tensor,
               client_plan: ClientPlan | None, fisher: FisherRequest | None = None) -> ClientJob:
    """Client ``cid``'s local training in round ``round_idx``: its data, its named stream, its plan."""
    p = client_plan
    start = p.start_weights if p is not None and p.start_weights is not None else weights
    return ClientJob(cid, start, fed.clients[cid],
                     torch_stream(fed.cfg["experiment"]["seed"], "client", cid, round_idx),
                     p.regulariser if p is not None else None, fisher)


def fisher_request(fed: Federation, cid: int, tag: int | str,
                   fisher_options: dict[str, Any]) -> FisherRequest:
    """Ask client ``cid`` for its Fisher, drawing from its named stream ``("fisher", cid, tag)``."""
    return FisherRequest(fisher_options,
                         torch_stream(fed.cfg["experiment"]["seed"], "fisher", cid, tag))


def local_fisher(fed: Federation, model: nn.Module, cid: int, weights: torch.Tensor,
                 tag: int | str, fisher_options: dict[str, Any]) -> torch.Tensor:
    """F(D_k; w), client ``cid``'s diagonal Fisher on its own data (algorithms.md §2), stream ``tag``."""
    return client_fisher(model, fed.clients[cid], weights,
                         fisher_request(fed, cid, tag, fisher_options))


def round_record(fed: Federation, round_idx: int, ids: list[int], counts: torch.Tensor,
                 agg: Any, scores: dict[str, Any], train_stats: list[Any], wall_time_s: float,
                 *, oracle: bool = False) -> dict[str, Any]:
    """One line of rounds.jsonl: metrics, detection, per-client weights/flags/reasons (architecture §5)."""
    cw = agg.client_weights.tolist()
    det = metrics.detection(agg.flagged.tolist(), ids, fed.attackers)
    det["attacker_share"] = metrics.attacker_weight_share(cw, ids, fed.attackers)
    record = {"round": round_idx + 1, "metrics": scores, "detection": det,
              "clients": {"ids": ids, "weights": cw, "flagged": agg.flagged.tolist(),
                          "reasons": agg.reasons, "num_samples": counts.tolist(),
                          "train": train_stats},
              "diagnostics": agg.diagnostics, "status": agg.status, "wall_time_s": wall_time_s}
    if oracle:
        record["label"] = ORACLE_LABEL
    return record


def slug(label: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in label)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "run"


def run_all(variants: list[Any], out_root: str | Path, *, resume: bool = False,
            progress: TextIO | None = sys.stderr, seeds: list[int] | None = None,
            on_summary: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run each labelled variant (each seed) into its own sub-directory; ``out_root/summary.csv``."""
    import copy

    from fisherguard.results import write_csv

    out_root = Path(out_root)
    summaries = []
    for v in variants:
        sub = out_root / slug(v.label) if getattr(v, "nested", False) else out_root
        for seed in seeds if seeds is not None else [None]:
            cfg, where = v.config, sub
            if seed is not None:
                cfg = copy.deepcopy(v.config)
                cfg["experiment"]["seed"] = seed
                where = sub / f"seed-{seed}"
            s = run(cfg, where, resume=resume, label=v.label, progress=progress)
            summaries.append(s)
            if on_summary:
                on_summary(s)
    if len(summaries) > 1:
        from fisherguard.results import aggregate_seeds, format_table

        out_root.mkdir(parents=True, exist_ok=True)
        write_csv(out_root / "summary.csv", summaries)
        table = format_table(aggregate_seeds(summaries) if seeds else summaries)
        (out_root / "summary.txt").write_text(table + "\n")
    return summaries
