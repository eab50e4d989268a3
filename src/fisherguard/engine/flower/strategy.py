"""A Flower strategy around any fisherguard defense (flower.md §5): the same ``Defense`` object
the in-process engine calls, fed from the clients' reply records.

``configure_train`` sends every client the global weights, the resolved run config and its
``ClientPlan`` (SDFC's FDReg tensors, RSA's L1 pull and own start model), fetching the client
Fishers a plan needs in one query round first. ``aggregate_train`` reads the replies as hostile
input (missing, malformed, non-finite → a flagged client with a reason, never a crash), calls
``defense.aggregate``, evaluates, and writes the round to the same run directory format as the
in-process engine (``results.RunDir``), checkpoint included, so a killed run resumes.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
import warnings
from typing import Any, Callable, Iterable, TextIO

import torch

from fisherguard.engine.flower import require_flwr

require_flwr()
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from fisherguard import config as config_mod  # noqa: E402
from fisherguard.defenses.base import Defense, PlanInput, RoundInput  # noqa: E402
from fisherguard.defenses.fdcr import ORACLE_LABEL  # noqa: E402
from fisherguard.engine import simulator  # noqa: E402
from fisherguard.engine.flower.records import (ARRAYS, CONFIG, FISHER, METRICS, BadRecord,  # noqa: E402
                                               Layout, plan_records, read_flat, to_record)
from fisherguard.results import RunDir  # noqa: E402

log = logging.getLogger("fisherguard")

ERROR_FILE = "flower-error.txt"  # the launcher reports its text when a Flower run fails


class TooFewReplies(RuntimeError):
    """Fewer clients replied in a round than the configured minimum; finished rounds are kept."""


class DefenseStrategy(FedAvg):
    """FedAvg's plumbing with fisherguard's defense, records and results (flower.md §5, §9.3)."""

    def __init__(self, cfg: dict[str, Any], out_dir: Any, *, label: str | None = None,
                 resume: bool = False, min_replies: int = 1, threads: int = 1,
                 progress: TextIO | None = sys.stderr,
                 fed: simulator.Federation | None = None) -> None:
        # every node is asked every round (protocol: all K clients); evaluation is on the server
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=0,
                         min_evaluate_nodes=0, min_available_nodes=0)
        if not isinstance(min_replies, int) or min_replies < 1:
            raise ValueError(f"min-replies must be an integer >= 1, got {min_replies!r}")
        self.cfg = cfg
        self.config_text = config_mod.dump(cfg)
        self.label = label or cfg["experiment"]["name"]
        self.min_replies = min_replies
        self.threads = threads
        self.total = cfg["federation"]["rounds"]
        self.ids = list(range(cfg["federation"]["clients"]))
        self.run_dir = RunDir(out_dir)
        (self.run_dir.path / ERROR_FILE).unlink(missing_ok=True)
        self.done = self.run_dir.start(cfg, resume=resume)
        self.fed = fed if fed is not None else simulator.prepare(cfg)
        self.defense: Defense = simulator.build_defense(cfg)
        self.layout = Layout.of(self.fed.model_factory())
        self.plan = simulator.train_plan(cfg)
        self.server = simulator.server_data(self.fed, self.defense, self.plan)
        self.eval_model = self.fed.model_factory()
        self.oracle = bool(self.defense.needs_attacker_ids)
        if self.oracle:
            warnings.warn(f"{ORACLE_LABEL}: the engine hands the true attacker ids to the defense",
                          UserWarning, stacklevel=2)
            self.defense.receive_attacker_ids(list(self.fed.attackers))  # type: ignore[attr-defined]
        ck = self.run_dir.load_checkpoint() if self.done else None
        if ck is not None:
            self.weights = ck["weights"]
            self.defense.load_state_dict(ck["defense_state"])
        else:
            self.weights = simulator.initial_weights(self.fed)
            (self.run_dir.path / "partition.json").write_text(json.dumps(self.fed.partition_info))
        self.nodes: dict[int, int] = {}  # client id (partition-id) → Flower node id
        self.grid: Grid | None = None
        self.timeout = 600.0
        self.bar = simulator.Progress(self.total, self.label, progress)
        self._t0 = 0.0
        self._sent: dict[int, int] = {}

    # ------------------------------------------------------------------ helpers

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done)

    def global_arrays(self) -> ArrayRecord:
        return to_record(self.weights, self.layout)

    def _config(self, round_idx: int, **extra: Any) -> ConfigRecord:
        d = {"fg-config": self.config_text, "fg-round": int(round_idx), "threads": int(self.threads),
             "need-fisher": bool(self.defense.needs_fisher),
             "fisher-options": json.dumps(self.defense.fisher_options())}
        d.update(extra)
        return ConfigRecord(d)

    def _round_idx(self, server_round: int) -> int:
        return self.done + server_round - 1  # Flower counts the rounds of this start() from 1

    def fail(self, text: str) -> TooFewReplies:
        """Write the reason where the launcher finds it and return the error to raise."""
        (self.run_dir.path / ERROR_FILE).write_text(text + "\n")
        return TooFewReplies(text)

    # ------------------------------------------------------------------ node discovery

    def connect(self, grid: Grid, timeout: float, wait_s: float | None = None) -> None:
        """Learn which node serves which client (a ``hello`` query; node ids are random)."""
        self.grid, self.timeout = grid, timeout
        k = len(self.ids)
        deadline = time.monotonic() + (timeout if wait_s is None else wait_s)
        while len(list(grid.get_node_ids())) < k and time.monotonic() < deadline:
            time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
        msgs = [Message(RecordDict({CONFIG: self._config(self.done, op="hello")}),
                        dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        seen: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error():
                log.warning("node did not answer the hello query: %s", reply.error.reason)
                continue
            try:
                cid = int(reply.content.metric_records[METRICS]["partition-id"])
            except (KeyError, TypeError, ValueError):
                continue
            if cid in seen:
                raise self.fail(f"two SuperNodes claim partition-id={cid}; give each node its own "
                                "--node-config 'partition-id=i num-partitions=N'")
            seen[cid] = reply.metadata.src_node_id
        self.nodes = {c: seen[c] for c in sorted(seen) if c in self.ids}
        missing = [c for c in self.ids if c not in self.nodes]
        if len(self.nodes) < self.min_replies:
            raise self.fail(f"only {len(self.nodes)} of {k} clients answered within {timeout:.0f}s "
                            f"(minimum {self.min_replies}); missing partition-ids {missing}")
        if missing:
            log.warning("clients %s have no SuperNode; they count as missing every round", missing)

    # ------------------------------------------------------------------ a defense's client plan

    def _remote_fisher(self, grid: Grid, round_idx: int,
                       targets: dict[int, int]) -> Callable[[list[tuple[int, torch.Tensor]]], dict[int, torch.Tensor | None]]:
        def fetch(wanted: list[tuple[int, torch.Tensor]]) -> dict[int, torch.Tensor | None]:
            msgs = {}
            for cid, w in wanted:
                if cid not in targets:
                    continue
                content = RecordDict({ARRAYS: to_record(w, self.layout),
                                      CONFIG: self._config(round_idx, op="fisher",
                                                           **{"fisher-tag": f"plan-{round_idx}"})})
                msgs[targets[cid]] = Message(content, dst_node_id=targets[cid],
                                             message_type=MessageType.QUERY)
            by_node = {n: c for c, n in targets.items()}
            out: dict[int, torch.Tensor | None] = {cid: None for cid, _ in wanted}
            for reply in grid.send_and_receive(list(msgs.values()), timeout=self.timeout):
                cid = by_node.get(reply.metadata.src_node_id)
                if cid is None or reply.has_error():
                    continue
                try:
                    out[cid] = read_flat(reply.content.array_records.get(FISHER), self.layout)
                except BadRecord:
                    out[cid] = None
            return out

        return fetch

    def plan_round(self, grid: Grid, round_idx: int, targets: dict[int, int]) -> dict[int, Any]:
        """``defense.plan_clients`` with F(D_k; w) computed by the clients (one query round).

        A dry run on copies of the defense and server set records which client Fishers the plan
        asks for; they are fetched from all those clients at once, then the real plan reads them.
        A Fisher that cannot be had (lost node, bad reply) is a NaN vector, which the defense
        treats as an unusable plan for that client.
        """
        fetch = self._remote_fisher(grid, round_idx, targets)
        nan = torch.full_like(self.weights, float("nan"))
        asked: list[tuple[int, torch.Tensor]] = []

        def record(cid: int, w: torch.Tensor) -> torch.Tensor:
            asked.append((int(cid), w.detach().clone()))
            return torch.zeros_like(w)

        try:
            probe, server = copy.deepcopy(self.defense), copy.deepcopy(self.server)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                probe.plan_clients(self._plan_input(round_idx, record, server))
        except Exception:  # noqa: BLE001 - the dry run is an optimisation; the real plan decides
            asked = []
        cache: dict[tuple[int, bytes], torch.Tensor | None] = {}
        if asked:
            got = fetch(asked)
            for cid, w in asked:
                cache[(cid, w.numpy().tobytes())] = got.get(cid)

        def client_fisher(cid: int, w: torch.Tensor) -> torch.Tensor:
            key = (int(cid), w.detach().numpy().tobytes())
            if key not in cache:  # not foreseen by the dry run: one more round trip
                cache[key] = fetch([(int(cid), w.detach().clone())]).get(int(cid))
            f = cache[key]
            return nan.clone() if f is None else f

        return self.defense.plan_clients(self._plan_input(round_idx, client_fisher, self.server))

    def _plan_input(self, round_idx: int, fisher: Callable[[int, torch.Tensor], torch.Tensor],
                    server: Any) -> PlanInput:
        return PlanInput(round_idx=round_idx, global_weights=self.weights, client_ids=self.ids,
                         client_fisher=fisher, server_data=server)

    # ------------------------------------------------------------------ Flower's hooks

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One TRAIN message per client: w^t, the run config and this client's plan."""
        t = self._round_idx(server_round)
        self._t0 = time.perf_counter()
        if self.server is not None:
            self.server.begin_round(t)
        online = set(grid.get_node_ids())
        targets = {c: n for c, n in self.nodes.items() if n in online}
        plans = self.plan_round(grid, t, targets) if self.defense.client_regulariser else {}
        glob = self.global_arrays()
        msgs = []
        for cid, node in targets.items():
            content = RecordDict({ARRAYS: glob, CONFIG: self._config(t),
                                  **plan_records(plans.get(cid), self.layout)})
            msgs.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        self._sent = dict(targets)
        return msgs

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replies → ``RoundInput.from_uploads`` → ``defense.aggregate`` → evaluation → rounds.jsonl."""
        t = self._round_idx(server_round)
        by_node = {n: c for c, n in self._sent.items()}
        k = len(self.ids)
        upd: list[Any] = [None] * k
        fis: list[Any] = [None] * k
        counts: list[Any] = [0] * k
        stats: list[dict[str, Any]] = [{} for _ in range(k)]
        reasons: list[str | None] = ["missing"] * k
        errors: dict[int, str] = {}
        replied = 0
        for reply in replies:
            cid = by_node.get(reply.metadata.src_node_id)
            if reply.has_error():
                if cid is not None:
                    errors[cid] = str(reply.error.reason)[:300]
                log.warning("round %d: error reply from node %s: %s", t + 1,
                            reply.metadata.src_node_id, str(reply.error.reason)[:300])
                continue
            if cid is None or reasons[cid] != "missing" or upd[cid] is not None:
                continue  # not a node asked this round, or a second reply from it
            replied += 1
            reasons[cid], upd[cid], fis[cid], counts[cid], stats[cid] = self._read_reply(reply, cid)
        if replied < self.min_replies:
            lost = [c for c in self.ids if c not in self._sent or reasons[c] == "missing"]
            raise self.fail(f"round {t + 1}: {replied} of {k} clients replied, fewer than the minimum "
                            f"of {self.min_replies} (no reply from clients {lost}); rounds 1..{t} "
                            f"are saved in {self.run_dir.path} (resume to continue)")
        ri = RoundInput.from_uploads(self.weights, upd, counts, self.ids,
                                     fisher=fis if self.defense.needs_fisher else None,
                                     lr=self.cfg["federation"]["lr"], round_idx=t,
                                     server_data=self.server, num_rounds=self.total)
        assert ri.pre_reasons is not None
        ri.pre_reasons = [r if r is not None else p for r, p in zip(reasons, ri.pre_reasons)]
        agg = self.defense.aggregate(ri)
        self.weights = agg.new_weights.detach().clone()
        evaluated = agg.eval_weights if agg.eval_weights is not None else self.weights
        m = simulator.evaluate(self.fed, self.eval_model, evaluated, self.cfg["eval"]["batch_size"])
        record = simulator.round_record(self.fed, t, self.ids, ri.num_samples, agg, m, stats,
                                        time.perf_counter() - self._t0, oracle=self.oracle)
        record["engine"] = self.cfg["runtime"]["engine"]
        record["replies"] = {"received": replied, "errors": {str(c): e for c, e in errors.items()}}
        self.run_dir.append_round(record)
        self.run_dir.save_checkpoint({"rounds_done": t + 1, "weights": self.weights,
                                      "defense_state": self.defense.state_dict()})
        self.bar.update(t + 1, f"A={m['A']:.2f} ASR={m['ASR']:.2f} ({record['wall_time_s']:.1f}s)")
        numeric = {k2: float(v) for k2, v in m.items() if isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        numeric["replies"] = replied
        return self.global_arrays(), MetricRecord(numeric)

    def _read_reply(self, reply: Message, cid: int) -> tuple[str | None, Any, Any, Any, dict[str, Any]]:
        """One reply's weights, Fisher, n_k and train stats; a malformed record gives a reason."""
        content = reply.content
        stats: dict[str, Any] = {}
        count: Any = 0
        try:
            mr = content.metric_records[METRICS]
            count = mr.get("num-examples", 0)
            claimed = mr.get("partition-id", cid)
            stats = {key[len("train-"):]: float(v) for key, v in mr.items()  # type: ignore[arg-type]
                     if key.startswith("train-") and key != "train-steps"}
        except (KeyError, TypeError, ValueError):
            return "bad_shape", None, None, 0, {}
        if claimed != cid:
            return "bad_shape", None, None, count, stats
        try:
            w = read_flat(content.array_records.get(ARRAYS), self.layout)
        except BadRecord as e:
            return e.reason, None, None, count, stats
        f = None
        if self.defense.needs_fisher:
            try:
                f = read_flat(content.array_records.get(FISHER), self.layout)
            except BadRecord as e:
                return e.reason, w - self.weights, None, count, stats
        return None, w - self.weights, f, count, stats

    def finish(self) -> dict[str, Any]:
        """summary.json / summary.csv, as the in-process engine writes them."""
        return simulator._summarise(self.run_dir, self.cfg, self.label, self.total)

    def summary(self) -> None:
        log.info("fisherguard %s on Flower: %d clients, %d rounds", self.cfg["defense"]["name"],
                 len(self.ids), self.total)
