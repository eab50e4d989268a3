"""One federated round, the same for every engine: begin → collect uploads → end.

``Server.begin`` runs the server's step before local training (the server set's round, and a
defense's client plans in two phases: the defense names the client Fishers it needs, the engine
fetches them, the defense plans with them). The engine then collects one ``Upload`` per client —
the in-process trainer (``run_round``) or Flower replies (``engine.flower.strategy``) — and
``Server.end`` does the rest: the attack's after-training stage, ``RoundInput.from_uploads``,
``defense.aggregate``, evaluation, one record (the same schema on every engine, naming it), append,
checkpoint and progress. The oracle ablation is wired here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

import torch

from fisherguard import metrics
from fisherguard.clients.grouped import PHASES
from fisherguard.clients.training import ClientDataset, LocalTrainer, SequentialTrainer, Upload
from fisherguard.config import Config
from fisherguard.defenses.base import (FAILURE_REASONS, SUSPICION, ClientPlan, PlanInput,
                                       RoundInput)
from fisherguard.defenses.fdcr import ORACLE_LABEL
from fisherguard.engine.federation import (Federation, client_fisher_options, client_job, evaluate,
                                           fisher_request,
                                           initial_weights, local_fisher, plan_tag, server_data,
                                           train_plan)
from fisherguard.results import RunDir, software
from fisherguard.sampling import sample_clients

log = logging.getLogger("fisherguard")

# What an engine offers the round for a defense's client plan: F(D_k; w) for each asked client at
# the asked weights, drawn from the stream tag given; None where a client could not answer.
ClientFishers = Callable[[dict[int, torch.Tensor], str], dict[int, torch.Tensor | None]]


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


@dataclass
class RoundStart:
    """What ``Server.begin`` decided for a round, handed back to ``Server.end``."""

    round_idx: int
    plans: dict[int, ClientPlan]
    started: float  # time.perf_counter() at the start of the round
    plan_s: float = 0.0
    attack_s: float = 0.0  # the attack's own work at the start of the round (trigger updates)
    ids: list[int] = field(default_factory=list)  # the round's sampled clients (all K by default)


class Server:
    """The server side of a run: defense, server set U, global weights and the run directory."""

    def __init__(self, fed: Federation, run_dir: RunDir, done: int, *, label: str, engine: str,
                 progress: TextIO | None = sys.stderr) -> None:
        cfg: Config = fed.cfg
        self.fed, self.cfg, self.run_dir, self.done = fed, cfg, run_dir, done
        self.label, self.engine = label, engine
        self.total = cfg.federation.rounds
        self.ids = list(range(cfg.federation.clients))  # every client of the federation
        self.per_round = cfg.clients_per_round  # m, the clients a round samples (K by default)
        self.defense = cfg.build_defense()
        self.plan = train_plan(cfg)
        self.server_set = server_data(fed, self.defense, self.plan)
        self.fisher_options = client_fisher_options(cfg, self.defense)
        self.eval_model = fed.model_factory()
        self._fisher_model: torch.nn.Module | None = None  # a crafted upload's Fisher, lazily
        self.oracle = bool(self.defense.needs_attacker_ids)
        if self.oracle:  # the labelled ablation: the only place a defense is told who attacks
            warnings.warn(f"{ORACLE_LABEL}: the engine hands the true attacker ids to the defense",
                          UserWarning, stacklevel=3)
            self.defense.receive_attacker_ids(list(fed.attackers))  # type: ignore[attr-defined]
        ck = run_dir.load_checkpoint() if done else None
        if ck is not None:
            self.weights: torch.Tensor = ck["weights"]
            self.defense.load_state_dict(ck["defense_state"])
            fed.attack.load_state_dict(ck.get("attack_state") or {"stages": [
                {} for _ in fed.attack.stages]})
        else:
            self.weights = initial_weights(fed)
            run_dir.write_text("partition.json", json.dumps(fed.partition_info))
            run_dir.write_json("defense.json", {"name": cfg.defense.name,
                                                "params": self.defense.get_params()})
        self.bar = Progress(self.total, label, progress)

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done)

    def round_ids(self, round_idx: int) -> list[int]:
        """The clients of round ``round_idx``: every client, or the seeded sample
        (``fisherguard.sampling``; the same on a resumed run, no saved state)."""
        f = self.cfg.federation
        return sample_clients(self.cfg.experiment.seed, round_idx, f.clients, self.per_round,
                              self.fed.attackers, attackers_always=f.attackers_always)

    def clients_seen(self, round_idx: int) -> int:
        """How many distinct clients rounds 0..round_idx sampled (redrawn: no saved state)."""
        seen: set[int] = set()
        for t in range(round_idx + 1):
            seen.update(self.round_ids(t))
        return len(seen)

    def begin(self, round_idx: int, client_fishers: ClientFishers) -> RoundStart:
        """The server's step before local training: the round's clients, U's round, then the
        defense's client plans."""
        t0 = time.perf_counter()
        ids = self.round_ids(round_idx)
        attack_s = 0.0
        if self.fed.attack.active(round_idx):  # e.g. an optimised trigger follows the global model
            self.fed.attack.begin_round(round_idx, self.weights)
            attack_s = time.perf_counter() - t0
        if self.server_set is not None:
            self.server_set.begin_round(round_idx)
        plans: dict[int, ClientPlan] = {}
        if self.defense.client_regulariser:
            pi = PlanInput(round_idx=round_idx, global_weights=self.weights, client_ids=ids,
                           server_data=self.server_set)
            wanted = self.defense.plan_fisher_requests(pi)
            got = client_fishers(wanted, plan_tag(round_idx)) if wanted else {}
            plans = self.defense.plan_clients(dataclasses.replace(pi, client_fishers=got))
        return RoundStart(round_idx, plans, t0, time.perf_counter() - t0 - attack_s, attack_s, ids)

    def end(self, start: RoundStart, uploads: list[Upload], *,
            replies: dict[str, Any] | None = None, collect_s: float = 0.0) -> dict[str, Any]:
        """Attack stage → RoundInput → aggregate → evaluate → record, append, checkpoint."""
        t = start.round_idx
        fed, attack = self.fed, self.fed.attack
        ids = start.ids or self.ids
        taking_part = set(ids)
        by_id = {u.client_id: u for u in uploads if u.client_id in taking_part}
        active = attack.active(t)
        t_att = time.perf_counter()
        if active and fed.attackers:
            trained = {k: by_id[k].weights for k in fed.attackers if k in by_id}
            trained_fisher = {k: by_id[k].fisher for k in trained}
            view = attack.round_view(t, self.weights, by_id, fed.attackers,
                                     fisher=self._own_fisher(t) if self.defense.needs_fisher
                                     else None, plans=start.plans,
                                     server_fisher=None if self.server_set is None
                                     else self.server_set.peek_fisher)
            by_id.update(attack.after_training(view))
            if attack.fisher_at_upload and self.defense.needs_fisher:
                # a Fisher a forgery stage replaced is the upload as meant; only the trained
                # one follows the crafted weights
                self._fisher_at_upload(t, by_id, {k: w for k, w in trained.items()
                                                  if k in by_id and by_id[k].fisher is
                                                  trained_fisher[k]})
        # begin_round, the upload stage, and the attackers' own training hooks (summed over them)
        attack_s = (start.attack_s + time.perf_counter() - t_att
                    + sum(u.timing.get("attack_s", 0.0) for u in by_id.values()))
        # the plans (SDFC: a copy of H_k and of the anchor per client) are done with once the
        # attack stage has read them; letting them go lowers the aggregation's peak memory
        start.plans.clear()
        ordered = [by_id.get(k, Upload(k, reason="missing")) for k in ids]
        ri = RoundInput.from_uploads(
            self.weights, [None if u.weights is None else _update(u.weights, self.weights)
                           for u in ordered],
            [u.num_samples for u in ordered], ids,
            fisher=[u.fisher for u in ordered] if self.defense.needs_fisher else None,
            lr=self.cfg.federation.lr, round_idx=t, server_data=self.server_set,
            num_rounds=self.total, count_cap=self.cfg.server.count_cap)
        assert ri.pre_reasons is not None
        ri.pre_reasons = [u.reason if u.reason is not None else p
                          for u, p in zip(ordered, ri.pre_reasons)]
        t_agg = time.perf_counter()
        agg = self.defense.aggregate(ri)
        self.weights = agg.new_weights.detach().clone()
        evaluated = agg.eval_weights if agg.eval_weights is not None else self.weights
        t_eval = time.perf_counter()
        scores = evaluate(fed, self.eval_model, evaluated)
        t_done = time.perf_counter()
        record = self.record(t, ri.num_samples, agg, scores, [u.stats for u in ordered],
                             t_done - start.started, ids)
        record["timing"] = {"plan_s": start.plan_s, "train_and_fisher_s": collect_s,
                            "fisher_s_summed": sum(u.timing.get("fisher_s", 0.0) for u in ordered),
                            "aggregate_s": t_eval - t_agg, "eval_s": t_done - t_eval,
                            "phases": train_phases(ordered),
                            # the attack's own work (trigger updates, upload stage) and its share
                            "attack_s": attack_s,
                            "attack_share": attack_s / max(record["wall_time_s"], 1e-9)}
        record["attack"] = {"name": attack.name, "active": bool(active and fed.attackers)}
        record["replies"] = replies if replies is not None else {
            "received": sum(u.reason != "missing" for u in ordered), "errors": {}}
        defense_state = self.defense.state_dict()
        if "sampling" in record:  # per-client state is bounded by the clients seen, not by K
            record["sampling"]["clients_seen"] = self.clients_seen(t)
            record["sampling"]["defense_state_bytes"] = state_bytes(defense_state)
        self.run_dir.append_round(record)
        self.run_dir.save_checkpoint({"rounds_done": t + 1, "weights": self.weights,
                                      "defense_state": defense_state,
                                      "attack_state": fed.attack.state_dict()})
        self.done = t + 1
        self.bar.update(t + 1, f"A={scores['A']:.2f} ASR={scores['ASR']:.2f} "
                               f"({record['wall_time_s']:.1f}s)")
        return record

    def _own_fisher(self, t: int) -> Callable[[int, torch.Tensor, ClientDataset | None],
                                               torch.Tensor]:
        """The attack's ``RoundView.fisher``: F(D; w) for an attacker at any weights, on its
        round's training data or a given dataset, with the client's own options and stream."""
        def fisher(cid: int, weights: torch.Tensor,
                   data: ClientDataset | None = None) -> torch.Tensor:
            if cid not in self.fed.attackers:  # the seam is for the attack's own clients only
                raise ValueError(f"RoundView.fisher: client {cid} is not an attacker")
            if self._fisher_model is None:
                self._fisher_model = self.fed.model_factory()
            return local_fisher(self.fed, self._fisher_model, cid, t, weights, t,
                                self.fisher_options, data)

        return fisher

    def _fisher_at_upload(self, t: int, by_id: dict[int, Upload],
                          trained: dict[int, torch.Tensor | None]) -> None:
        """A crafted upload's Fisher: F(D_k; uploaded w_k), the client's own options and stream
        (docs/attacks.md §5); a non-finite or ill-shaped upload keeps its Fisher for the
        validity check to reject."""
        if self._fisher_model is None:
            self._fisher_model = self.fed.model_factory()
        for k, before in trained.items():
            u = by_id.get(k)
            w = None if u is None else u.weights
            if (not isinstance(w, torch.Tensor) or w is before or w.shape != self.weights.shape
                    or not bool(torch.isfinite(w).all())
                    or (isinstance(before, torch.Tensor) and torch.equal(w, before))):
                continue
            u.fisher = local_fisher(self.fed, self._fisher_model, k, t, w, t, self.fisher_options)

    def record(self, round_idx: int, counts: torch.Tensor, agg: Any, scores: dict[str, Any],
               train_stats: list[dict[str, float]], wall_time_s: float,
               ids: list[int] | None = None) -> dict[str, Any]:
        """One line of rounds.jsonl: metrics, detection, per-client weights/flags/reasons over the
        round's clients ``clients.ids`` (docs/architecture.md §5); a sampled run adds
        ``sampling`` (how many of the K took part, the attackers among them, the f in force)."""
        ids = self.ids if ids is None else ids
        cw = agg.client_weights.tolist()
        failed = [r in FAILURE_REASONS for r in agg.reasons]
        det = metrics.detection(agg.flagged.tolist(), ids, self.fed.attackers, failed,
                                agg.diagnostics.get(SUSPICION))
        det["failures"] = {}
        for r, f in zip(agg.reasons, failed):
            if f:
                det["failures"][r] = det["failures"].get(r, 0) + 1
        det["attacker_share"] = metrics.attacker_weight_share(cw, ids, self.fed.attackers)
        record = {"round": round_idx + 1, "engine": self.engine, "metrics": scores,
                  "detection": det,
                  "clients": {"ids": ids, "weights": cw, "flagged": agg.flagged.tolist(),
                              "reasons": agg.reasons, "num_samples": counts.tolist(),
                              "train": train_stats},
                  "diagnostics": agg.diagnostics, "status": agg.status, "wall_time_s": wall_time_s}
        if self.cfg.sampling:
            att = set(self.fed.attackers)
            record["sampling"] = {
                "clients": self.cfg.federation.clients, "sampled": len(ids),
                "fraction": len(ids) / self.cfg.federation.clients,
                "attackers_sampled": sum(c in att for c in ids),
                "attackers_always": self.cfg.federation.attackers_always,
                "assumed_attackers": self.cfg.assumed_attackers}
        if self.oracle:
            record["label"] = ORACLE_LABEL
        return record

    def summarise(self) -> dict[str, Any]:
        """summary.json / summary.csv of the run directory (any engine)."""
        return summarise(self.run_dir, self.cfg, self.label)


def summarise(run_dir: RunDir, cfg: Config, label: str) -> dict[str, Any]:
    """The run's summary row from its round records; written beside them."""
    from fisherguard.defenses import registry

    rounds = run_dir.rounds()
    summary = {"label": label, "defense": cfg.defense.name, "attack": cfg.attack.name,
               **metrics.summarize(rounds),
               "dataset": cfg.data.dataset, "seed": cfg.experiment.seed,
               "preset": cfg.experiment.preset, "family": cfg.experiment.family,
               "beta": cfg.partition.beta, "attack_fraction": cfg.attack_fraction,
               "complete": len(rounds) == cfg.federation.rounds, "engine": cfg.runtime.engine,
               "software": software()}
    if registry.get(cfg.defense.name).needs_attacker_ids:
        summary["defense"] = ORACLE_LABEL
    made = run_dir.finished_summary()
    if made is not None and summary["complete"]:
        # a finished run summarised again (a --resume that skips it) keeps the provenance of the
        # code that made it, or none if that code recorded none: never the code that only read it
        summary.pop("software")
        if "software" in made:
            summary["software"] = made["software"]
    run_dir.write_summary(summary)
    return summary


def train_phases(uploads: list[Upload]) -> dict[str, Any]:
    """The grouped trainer's phase times summed over the round's groups, and each worker's busy
    time, where the trainer reported them (docs/performance.md §8.2)."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        vals = [u.timing[f"{phase}_s"] for u in uploads if f"{phase}_s" in u.timing]
        if vals:
            out[f"{phase}_s_summed"] = sum(vals)
    busy = [u.timing["worker_s"] for u in uploads if "worker_s" in u.timing]
    if busy:
        out["worker_busy_s"] = busy
    return out


def state_bytes(state: Any) -> int:
    """The bytes of the tensors (and numbers, 8 each) in a defense's ``state_dict``."""
    if isinstance(state, torch.Tensor):
        return int(state.numel() * state.element_size())
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 8 if isinstance(state, (int, float)) else 0


def _update(weights: Any, global_weights: torch.Tensor) -> Any:
    """Δ_k = w_k − w^t for a well-formed upload; anything else goes on to be judged as it is."""
    if isinstance(weights, torch.Tensor) and weights.shape == global_weights.shape \
            and weights.is_floating_point():
        return weights - global_weights
    return weights


@dataclass
class InProcessClients:
    """The in-process engine's side of a round: a ``LocalTrainer`` over the federation's clients."""

    fed: Federation
    trainer: LocalTrainer
    fisher_model: torch.nn.Module = field(init=False)
    reference: SequentialTrainer | None = field(default=None, init=False)  # attackers' path

    def __post_init__(self) -> None:
        self.fisher_model = self.fed.model_factory()

    def fishers(self, server: Server, round_idx: int) -> ClientFishers:
        def compute(wanted: dict[int, torch.Tensor], tag: str) -> dict[int, torch.Tensor | None]:
            return {cid: local_fisher(self.fed, self.fisher_model, cid, round_idx, w, tag,
                                      server.fisher_options)
                    for cid, w in wanted.items()}

        return compute

    def train(self, server: Server, start: RoundStart) -> list[Upload]:
        """Every client's local round; jobs an attack's training stage changes go one by one."""
        t, fed = start.round_idx, self.fed
        jobs = [client_job(fed, k, t, server.weights, start.plans.get(k),
                           fisher_request(fed, k, t, server.fisher_options)
                           if server.defense.needs_fisher else None)
                for k in (start.ids or server.ids)]
        changed = [j for j in jobs if j.modifier is not None]
        results = self.trainer.train_round([j for j in jobs if j.modifier is None], server.plan)
        if changed:
            if self.reference is None:
                log.info("attack %s changes its clients' training: they take the per-client path",
                         fed.attack.name)
                self.reference = SequentialTrainer(fed.model_factory)
            results += self.reference.train_round(changed, server.plan)
        results.sort(key=lambda r: r.client_id)
        return [Upload(r.client_id, r.weights, r.fisher, len(j.data), r.stats, timing=r.timing)
                for r, j in zip(results, sorted(jobs, key=lambda j: j.client_id))]


def run_round(server: Server, clients: InProcessClients, round_idx: int) -> dict[str, Any]:
    """One in-process round: begin, train every client, end."""
    start = server.begin(round_idx, clients.fishers(server, round_idx))
    t0 = time.perf_counter()
    uploads = clients.train(server, start)
    return server.end(start, uploads, collect_s=time.perf_counter() - t0)
