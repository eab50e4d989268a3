"""fisherguard's ClientApp: the in-process engine's client layer behind Flower's Message API.

Every message carries the resolved run config (YAML text); a node derives its client id from the
node config's ``partition-id`` and its client's data from the config with ``federation.prepare``,
cached per process: a Ray actor serves many clients and builds the whole federation once; a
deployment node (one long-lived process per SuperNode, ``clientapp_worker``) builds only its own
client's part (``prepare(cfg, only=k)``). Local training (``SequentialTrainer.train_one`` via ``federation.client_job``),
the attack (poisoned ``ClientDataset``), regularisers and the Fisher (``federation.local_fisher``)
are the in-process ones, on the same named streams, so a round matches the in-process round.
"""

from __future__ import annotations

import time

_IMPORTED = time.time()  # when this module began importing (after flwr's own start-up)

import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from dataclasses import dataclass
from typing import Any

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from fisherguard.engine.flower import require_flwr  # noqa: E402

require_flwr()
from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fisherguard import config as config_mod  # noqa: E402
from fisherguard.allocator import retain_freed_memory  # noqa: E402
from fisherguard.clients.training import SequentialTrainer  # noqa: E402
from fisherguard.engine.federation import (Federation, client_job, local_fisher, prepare,  # noqa: E402
                                           train_plan)
from fisherguard.engine.flower.records import (ARRAYS, ATTACK_STATE, CONFIG, FISHER,  # noqa: E402
                                               METRICS, Layout, plan_from, read_attack_state,
                                               read_flat, to_record)

app = ClientApp()
_READY = time.time()  # this module and torch imported
PROFILE_VAR = "FISHERGUARD_FLOWER_PROFILE"  # a file: one JSON line of timestamps per message


def _process_start() -> float:
    """Wall-clock time this process started (Linux ``/proc``; 0.0 elsewhere)."""
    try:
        stat = open("/proc/self/stat").read()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class _Profile:
    """Timestamps of one message's steps, appended as a JSON line to ``$FISHERGUARD_FLOWER_PROFILE``
    when set (docs/flower.md §3.2); nothing is recorded otherwise."""

    def __init__(self, kind: str, msg: Message) -> None:
        self.path = os.environ.get(PROFILE_VAR)
        self.marks: dict[str, Any] = {"kind": kind, "pid": os.getpid()}
        if self.path:  # created: when the ServerApp made the message (its clock: same machine)
            self.marks.update(created=float(msg.metadata.created_at),
                              process_start=_process_start(), module_import=_IMPORTED,
                              module_ready=_READY, handler=time.time())

    def mark(self, step: str) -> None:
        if self.path:
            self.marks[step] = time.time()

    def write(self, **extra: Any) -> None:
        if self.path:
            self.mark("reply")
            with open(self.path, "a") as f:
                f.write(json.dumps({**self.marks, **extra}) + "\n")


@dataclass
class Node:
    """What one process keeps per run config: the federation's data and reusable models."""

    cfg: config_mod.Config
    fed: Federation
    trainer: SequentialTrainer
    fisher_model: nn.Module
    layout: Layout


@functools.lru_cache(maxsize=4)
def _config(config_hash: str, config_text: str) -> config_mod.Config:
    del config_hash  # the cache key; hashing long texts once keeps lookups cheap
    return config_mod.resolve(yaml.safe_load(config_text))


@functools.lru_cache(maxsize=2)
def _node(config_hash: str, config_text: str, only: int | None) -> Node:
    """Build the federation once per process, config and client (docs/protocol.md §1–§5): the
    whole one (``only`` None) where one process serves many clients (Ray actors), client
    ``only``'s part of it on a deployment node (``federation.prepare(cfg, only)``)."""
    cfg = _config(config_hash, config_text)
    if cfg.runtime.retain_memory:
        retain_freed_memory()
    fed = prepare(cfg, only=only)
    return Node(cfg, fed, SequentialTrainer(fed.model_factory), fed.model_factory(),
                Layout.of(fed.model_factory()))


def node_for(config_text: str, context: Context | None = None) -> Node:
    """The node of this run config: on a deployment SuperNode (``runtime.engine:
    flower-deployment``) only this node's client's data, else the whole federation's."""
    h = hashlib.sha256(config_text.encode()).hexdigest()
    cfg = _config(h, config_text)
    only = None
    if context is not None and cfg.runtime.engine == "flower-deployment":
        only = client_id(context, cfg.federation.clients)
    return _node(h, config_text, only)


def client_id(context: Context, num_clients: int, *, spare_ok: bool = False) -> int:
    """This node's client: ``partition-id`` of the node config (simulation sets it; deployment
    passes ``--node-config 'partition-id=i num-partitions=N'``).

    ``spare_ok`` (the server's ``spare-nodes``, set on Flower simulation only): a simulation
    holding runs of different K has ``num-supernodes`` = the largest K, so a run of K clients
    sees more nodes than clients; a node with ``partition-id`` >= K then serves no client (its
    id is returned, the server ignores it). A deployment's node must fit exactly."""
    nc = context.node_config
    if "partition-id" not in nc:
        raise ValueError("the SuperNode has no partition-id; start it with "
                         f"--node-config 'partition-id=<0..{num_clients - 1}> "
                         f"num-partitions={num_clients}'")
    cid = int(nc["partition-id"])
    parts = int(nc.get("num-partitions", num_clients))
    fits = parts == num_clients and 0 <= cid < num_clients
    spare = spare_ok and parts > num_clients and 0 <= cid < parts
    if not (fits or spare):
        raise ValueError(f"node config partition-id={cid} num-partitions={parts} does not fit the "
                         f"run's federation.clients={num_clients}")
    return cid


def _setup(msg: Message, context: Context) -> tuple[Node, Any]:
    c = msg.content.config_records[CONFIG]
    node = node_for(str(c["fg-config"]), context)
    # a Ray actor serves many clients and deployment processes start with all cores: set it always
    torch.set_num_threads(max(1, int(c.get("threads", 1))))
    return node, c


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One client's local round: train from the sent weights (and plan), Fisher if asked."""
    prof = _Profile("train", msg)
    node, c = _setup(msg, context)
    prof.mark("prepared")
    k = node.cfg.federation.clients
    cid = client_id(context, k, spare_ok=bool(c.get("spare-nodes", False)))
    if cid >= k:
        raise ValueError(f"partition-id={cid} serves no client of federation.clients={k}")
    t = int(c["fg-round"])
    weights = read_flat(msg.content.array_records[ARRAYS], node.layout)
    if ATTACK_STATE in c and cid in node.fed.attackers:  # the round's optimised trigger
        node.fed.attack.load_state_dict(read_attack_state(c[ATTACK_STATE]))
    job = client_job(node.fed, cid, t, weights, plan_from(msg.content, node.layout))
    result = node.trainer.train_one(job, train_plan(node.cfg))
    prof.mark("trained")
    n = len(node.fed.clients[cid])
    content = RecordDict({ARRAYS: to_record(result.weights, node.layout)})
    metrics: dict[str, Any] = {"num-examples": n, "partition-id": cid, "train-steps": result.steps}
    metrics.update({f"train-{k}": float(v) for k, v in result.stats.items()})
    if bool(c.get("need-fisher", False)):
        opts = json.loads(str(c.get("fisher-options", "{}")))
        f = local_fisher(node.fed, node.fisher_model, cid, t, result.weights, t, opts)
        prof.mark("fisher")
        content[FISHER] = to_record(f, node.layout)
        metrics["fisher-samples"] = n
    content[METRICS] = MetricRecord(metrics)
    reply = Message(content, reply_to=msg)
    prof.write(cid=cid, round=t)
    return reply


@app.query()
def query(msg: Message, context: Context) -> Message:
    """``hello``: which client this node serves; ``fisher``: F(D_k; w) at sent weights (a defense's plan)."""
    op = str(msg.content.config_records[CONFIG].get("op", ""))
    prof = _Profile(op, msg)
    node, c = _setup(msg, context)
    prof.mark("prepared")
    k = node.cfg.federation.clients
    cid = client_id(context, k, spare_ok=bool(c.get("spare-nodes", False)))
    if cid >= k:  # a spare simulated node (``client_id``): it says which it is, and no more
        if op != "hello":
            raise ValueError(f"partition-id={cid} serves no client of federation.clients={k}")
        return Message(RecordDict({METRICS: MetricRecord({"partition-id": cid})}), reply_to=msg)
    content = RecordDict({METRICS: MetricRecord({"partition-id": cid,
                                                 "num-examples": len(node.fed.clients[cid])})})
    if op == "fisher":
        w = read_flat(msg.content.array_records[ARRAYS], node.layout)
        opts = json.loads(str(c.get("fisher-options", "{}")))
        tag = str(c["fisher-tag"])
        content[FISHER] = to_record(local_fisher(node.fed, node.fisher_model, cid,
                                                 int(c["fg-round"]), w, tag, opts), node.layout)
    elif op != "hello":
        raise ValueError(f"unknown query op {op!r}")
    reply = Message(content, reply_to=msg)
    prof.write(cid=cid)
    return reply


__all__ = ["app", "client_id", "node_for"]
