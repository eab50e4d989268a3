"""A Flower strategy around any fisherguard defense (docs/flower.md §5): the engine's round
(``engine.round.Server``) behind Flower's ``configure_train`` / ``aggregate_train`` hooks.

``configure_train`` begins the round (``Server.begin``; the client Fishers a defense's plan asks
for come from the clients in one query round) and sends every client the global weights, the
resolved run config and its ``ClientPlan``. ``aggregate_train`` reads the replies as hostile input
(missing, malformed, non-finite → an ``Upload`` with a reason, never a crash) and ends the round
(``Server.end``: aggregate, evaluate, the round record, checkpoint), so a killed run resumes and
the run directory is the in-process engine's.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Iterable, TextIO

import torch

from fisherguard.engine.flower import require_flwr

require_flwr()
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from fisherguard.clients.training import Upload  # noqa: E402
from fisherguard.config import Config  # noqa: E402
from fisherguard.engine.federation import Federation, prepare  # noqa: E402
from fisherguard.engine.flower.records import (ARRAYS, ATTACK_STATE, CONFIG, FISHER,  # noqa: E402
                                               METRICS, BadRecord, Layout, attack_state_bytes,
                                               plan_records, read_flat, to_record)
from fisherguard.engine.round import ClientFishers, RoundStart, Server  # noqa: E402
from fisherguard.results import RunDir  # noqa: E402

log = logging.getLogger("fisherguard")

ERROR_FILE = "flower-error.txt"  # the launcher reports its text when a Flower run fails


class TooFewReplies(RuntimeError):
    """Fewer clients replied in a round than the configured minimum; finished rounds are kept."""


class DefenseStrategy(FedAvg):
    """FedAvg's plumbing with fisherguard's round, defense and results (docs/flower.md §5, docs/flower.md §9.3)."""

    def __init__(self, cfg: Config, out_dir: Any, *, label: str | None = None,
                 resume: bool = False, min_replies: int = 1, threads: int = 1,
                 progress: TextIO | None = sys.stderr, fed: Federation | None = None) -> None:
        # every node is asked every round (protocol: all K clients); evaluation is on the server
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=0,
                         min_evaluate_nodes=0, min_available_nodes=0)
        if not isinstance(min_replies, int) or min_replies < 1:
            raise ValueError(f"min-replies must be an integer >= 1, got {min_replies!r}")
        self.cfg = cfg
        self.config_text = cfg.to_yaml()
        self.min_replies = min_replies
        self.threads = threads
        run_dir = RunDir(out_dir)
        (run_dir.path / ERROR_FILE).unlink(missing_ok=True)
        done = run_dir.start(self.config_text, resume=resume)
        self.fed = fed if fed is not None else prepare(cfg)
        self.server = Server(self.fed, run_dir, done, label=label or cfg.experiment.name,
                             engine=cfg.runtime.engine, progress=progress)
        self.ids = self.server.ids
        self.layout = Layout.of(self.fed.model_factory())
        self.nodes: dict[int, int] = {}  # client id (partition-id) → Flower node id
        self.grid: Grid | None = None
        self.timeout = 600.0
        self._first = done  # the round index of the first round of this start()
        self._start: RoundStart | None = None
        self._sent: dict[int, int] = {}
        self._messages: dict[int, Message] = {}  # this round's TRAIN messages, by client
        self._collect_t0 = 0.0

    # ------------------------------------------------------------------ helpers

    @property
    def remaining(self) -> int:
        return self.server.remaining

    @property
    def weights(self) -> torch.Tensor:
        return self.server.weights

    @property
    def defense(self) -> Any:
        return self.server.defense

    @property
    def run_dir(self) -> RunDir:
        return self.server.run_dir

    def global_arrays(self) -> ArrayRecord:
        return to_record(self.weights, self.layout)

    def _config(self, round_idx: int, **extra: Any) -> ConfigRecord:
        d = {"fg-config": self.config_text, "fg-round": int(round_idx), "threads": int(self.threads),
             "need-fisher": bool(self.defense.needs_fisher),
             "fisher-options": json.dumps(self.server.fisher_options),
             # a simulation of runs with different K has as many nodes as the largest K: a node
             # past this run's K answers `hello` as a spare and is never used
             # (``client_app.client_id``); a deployment's nodes must fit K exactly
             "spare-nodes": self.cfg.runtime.engine == "flower-sim"}
        d.update(extra)
        return ConfigRecord(d)

    def _round_idx(self, server_round: int) -> int:
        return self._first + server_round - 1  # Flower counts the rounds of this start() from 1

    def fail(self, text: str) -> TooFewReplies:
        """Say why the run stops (stderr, which ``flwr run --stream`` shows, and the file the
        launcher reads) and return the error to raise."""
        print(f"fisherguard: error: {text}", file=sys.stderr, flush=True)
        (self.run_dir.path / ERROR_FILE).write_text(text + "\n")
        return TooFewReplies(text)

    # ------------------------------------------------------------------ node discovery

    def connect(self, grid: Grid, timeout: float, wait_s: float = 60.0,
                known: dict[int, int] | None = None) -> None:
        """Wait up to ``wait_s`` for one node per client, then learn which node serves which
        client (a ``hello`` query; node ids are random). Fewer nodes than clients stop the run at
        once with a message naming both numbers, rather than a round timeout later.

        ``known`` (node id → partition-id) carries what a ``hello`` learnt from one experiment
        of a Flower simulation to the next (``server_app.main``): a simulation's nodes stay the
        same for the whole Flower run, so a later experiment skips the query when the same nodes
        are there (every node answering it costs a message; 200 of them take seconds).
        Deployments always ask."""
        self.grid, self.timeout = grid, timeout
        k = len(self.ids)
        deadline = time.monotonic() + wait_s
        while len(list(grid.get_node_ids())) < k and time.monotonic() < deadline:
            time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
        if len(node_ids) < k:
            raise self.fail(f"federation.clients={k} needs {k} SuperNodes (one per client, "
                            f"--node-config 'partition-id=0..{k - 1} num-partitions={k}'); "
                            f"{len(node_ids)} connected to the SuperLink after waiting "
                            f"{wait_s:.0f}s (run config `node-wait`). Start the missing nodes "
                            f"or lower federation.clients")
        if self.cfg.runtime.engine == "flower-sim" and known and set(known) == set(node_ids):
            seen = {c: n for n, c in known.items()}
        else:
            seen = self._hello(grid, node_ids, timeout)
            if known is not None:
                known.clear()
                known.update({n: c for c, n in seen.items()})
        self.nodes = {c: seen[c] for c in sorted(seen) if c in self.ids}
        missing = [c for c in self.ids if c not in self.nodes]
        if len(self.nodes) < self.min_replies:
            raise self.fail(f"only {len(self.nodes)} of {k} clients answered within {timeout:.0f}s "
                            f"(minimum {self.min_replies}); missing partition-ids {missing}")
        if missing:
            log.warning("clients %s have no SuperNode; they count as missing every round", missing)

    def _hello(self, grid: Grid, node_ids: list[int], timeout: float) -> dict[int, int]:
        """Ask every node which client it serves: partition-id → node id of those answering."""
        msgs = [Message(RecordDict({CONFIG: self._config(self.server.done, op="hello")}),
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
        return seen

    # ------------------------------------------------------------------ a defense's client plan

    def _remote_fishers(self, grid: Grid, round_idx: int, targets: dict[int, int]) -> ClientFishers:
        """F(D_k; w) from the clients a plan asks, in one query round; None where none came back."""
        def fetch(wanted: dict[int, torch.Tensor], tag: str) -> dict[int, torch.Tensor | None]:
            msgs = []
            for cid, w in wanted.items():
                if cid in targets:
                    content = RecordDict({ARRAYS: to_record(w, self.layout),
                                          CONFIG: self._config(round_idx, op="fisher",
                                                               **{"fisher-tag": tag})})
                    msgs.append(Message(content, dst_node_id=targets[cid],
                                        message_type=MessageType.QUERY))
            by_node = {n: c for c, n in targets.items()}
            out: dict[int, torch.Tensor | None] = {cid: None for cid in wanted}
            for reply in grid.send_and_receive(msgs, timeout=self.timeout):
                cid = by_node.get(reply.metadata.src_node_id)
                if cid is None or cid not in out or reply.has_error():
                    continue
                try:
                    out[cid] = read_flat(reply.content.array_records.get(FISHER), self.layout)
                except BadRecord:
                    out[cid] = None
            return out

        return fetch

    # ------------------------------------------------------------------ Flower's hooks

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Begin the round, then one TRAIN message per client: w^t, the run config and its plan."""
        start = self.begin_round(server_round, grid)
        glob = self.global_arrays()
        # the coordinator (this process) updated a per-round trigger in ``Server.begin``: its
        # state goes to the attackers' nodes only, which load it before they train
        attack, t = self.fed.attack, start.round_idx
        state = (attack_state_bytes(attack.state_dict())
                 if attack.dynamic and attack.active(t) and self.fed.attackers else None)
        self._messages = {}
        for cid, node in self._sent.items():
            extra = {ATTACK_STATE: state} if state is not None and cid in self.fed.attackers else {}
            content = RecordDict({ARRAYS: glob, CONFIG: self._config(t, **extra),
                                  **plan_records(start.plans.get(cid), self.layout)})
            self._messages[cid] = Message(content, dst_node_id=node,
                                          message_type=MessageType.TRAIN)
        self._collect_t0 = time.perf_counter()
        return list(self._messages.values())

    def begin_round(self, server_round: int, grid: Grid) -> RoundStart:
        """``Server.begin`` for the round's clients (all, or the seeded sample,
        ``fisherguard.sampling``) whose nodes are online (they are this round's targets)."""
        t = self._round_idx(server_round)
        online = set(grid.get_node_ids())
        sampled = set(self.server.round_ids(t))
        self._sent = {c: n for c, n in self.nodes.items() if n in online and c in sampled}
        self._start = self.server.begin(t, self._remote_fishers(grid, t, self._sent))
        return self._start

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replies → one ``Upload`` per client → ``Server.end`` (aggregate, evaluate, record)."""
        t = self._round_idx(server_round)
        if self._start is None or self._start.round_idx != t:
            raise RuntimeError(f"round {t + 1}: aggregate_train without configure_train")
        by_node = {n: c for c, n in self._sent.items()}
        # an error the SuperLink writes for a dead node comes from the SuperLink, not the node:
        # it names the message it answers, which names the client (Flower set its id on sending)
        by_msg = {m.metadata.message_id: c for c, m in self._messages.items()
                  if m.metadata.message_id}
        uploads: dict[int, Upload] = {}
        errors: dict[str, str] = {}
        for reply in replies:
            cid = by_node.get(reply.metadata.src_node_id)
            if reply.has_error():
                cid = by_msg.get(reply.metadata.reply_to_message_id, cid)
                key = str(cid) if cid is not None else f"node {reply.metadata.src_node_id}"
                errors[key] = str(reply.error.reason)[:300]
                log.warning("round %d: error reply from node %s: %s", t + 1,
                            reply.metadata.src_node_id, str(reply.error.reason)[:300])
                continue
            if cid is None or cid in uploads:
                continue  # not a node asked this round, or a second reply from it
            uploads[cid] = self._read_reply(reply, cid)
        replied = len(uploads)
        if replied < self.min_replies:
            asked = self._start.ids or self.ids
            lost = [c for c in asked if c not in uploads]
            raise self.fail(f"round {t + 1}: {replied} of {len(asked)} clients replied, fewer "
                            f"than the minimum of {self.min_replies} (no reply from clients "
                            f"{lost}); rounds 1..{t} are saved in {self.run_dir.path} (resume to "
                            "continue)")
        record = self.server.end(self._start, list(uploads.values()),
                                 replies={"received": replied, "errors": errors},
                                 collect_s=time.perf_counter() - self._collect_t0)
        numeric = {k: float(v) for k, v in record["metrics"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numeric["replies"] = replied
        return self.global_arrays(), MetricRecord(numeric)

    def _read_reply(self, reply: Message, cid: int) -> Upload:
        """One reply's weights, Fisher, n_k and train stats; a malformed record gives a reason."""
        content = reply.content
        try:
            mr = content.metric_records[METRICS]
            count = mr.get("num-examples", 0)
            claimed = mr.get("partition-id", cid)
            stats = {key[len("train-"):]: float(v) for key, v in mr.items()  # type: ignore[arg-type]
                     if key.startswith("train-") and key != "train-steps"}
        except (KeyError, TypeError, ValueError):
            return Upload(cid, reason="bad_shape")
        if claimed != cid:
            return Upload(cid, num_samples=count, stats=stats, reason="bad_shape")
        try:
            w = read_flat(content.array_records.get(ARRAYS), self.layout)
        except BadRecord as e:
            return Upload(cid, num_samples=count, stats=stats, reason=e.reason)
        f = None
        if self.defense.needs_fisher:
            try:
                f = read_flat(content.array_records.get(FISHER), self.layout)
            except BadRecord as e:
                return Upload(cid, w, num_samples=count, stats=stats, reason=e.reason)
        return Upload(cid, w, f, count, stats)

    def finish(self) -> dict[str, Any]:
        """summary.json / summary.csv, as the in-process engine writes them."""
        return self.server.summarise()
