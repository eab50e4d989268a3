"""The Message record layout of fisherguard on Flower (docs/flower.md §4): flat weights ↔ ArrayRecord,
client plans (SDFC's FDReg, RSA's L1 pull, own start weights) ↔ records, replies → rows.

A reply is hostile input: ``read_flat`` never trusts keys, shapes, dtypes or values; a malformed
record raises ``BadRecord`` with a reason from ``defenses.base.UPLOAD_REASONS``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fisherguard.engine.flower import require_flwr

require_flwr()
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from fisherguard.clients.fdreg import FDReg  # noqa: E402
from fisherguard.clients.l1pull import L1Pull  # noqa: E402
from fisherguard.defenses.base import ClientPlan  # noqa: E402

# record keys (Flower's kebab-case style)
ARRAYS, FISHER, METRICS, CONFIG = "arrays", "fisher", "metrics", "config"
START, ANCHOR, IMPORTANCE = "start", "anchor", "importance"
ATTACK_STATE = "attack-state"  # config key: the attack's per-round state, for attacker nodes only


class BadRecord(ValueError):
    """A record that cannot be read as this model's weights; ``reason`` is an upload reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the model's trainable parameters in docs/protocol.md §6 (flat-vector) order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "Layout":
        named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(s for _, s in named))

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))


def to_record(flat: torch.Tensor, layout: Layout) -> ArrayRecord:
    """A (P,) float32 vector as an ArrayRecord keyed by parameter name (docs/flower.md §4)."""
    flat = flat.detach().to(torch.float32).reshape(-1).contiguous()
    if flat.numel() != layout.size:
        raise ValueError(f"vector has {flat.numel()} entries, the model needs {layout.size}")
    out: dict[str, Array] = {}
    offset = 0
    for name, shape in zip(layout.names, layout.shapes):
        n = int(np.prod(shape))
        out[name] = Array(flat[offset:offset + n].reshape(shape).numpy().copy())
        offset += n
    return ArrayRecord(out)


def read_flat(record: Any, layout: Layout) -> torch.Tensor:
    """The (P,) float32 vector in an ArrayRecord; ``BadRecord`` unless keys and shapes match exactly."""
    if not isinstance(record, ArrayRecord):
        raise BadRecord("missing", f"expected an ArrayRecord, got {type(record).__name__}")
    if set(record.keys()) != set(layout.names):
        raise BadRecord("bad_shape", f"keys {list(record.keys())[:4]}… differ from the model's")
    pieces = []
    for name, shape in zip(layout.names, layout.shapes):
        try:
            a = record[name].numpy()
        except Exception as e:  # noqa: BLE001 - any undecodable payload is a malformed upload
            raise BadRecord("bad_shape", f"{name}: cannot decode ({e})") from None
        if tuple(a.shape) != shape:
            raise BadRecord("bad_shape", f"{name}: shape {tuple(a.shape)}, expected {shape}")
        if a.dtype.kind != "f":
            raise BadRecord("bad_shape", f"{name}: dtype {a.dtype}, expected a float type")
        pieces.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(-1))
    return torch.cat(pieces)


def plan_records(plan: ClientPlan | None, layout: Layout) -> dict[str, Any]:
    """What a client needs of its ``ClientPlan`` (regulariser tensors, start weights) as records."""
    cfg: dict[str, Any] = {"reg-kind": "", "reg-lambda": 0.0}
    out: dict[str, Any] = {}
    if plan is None:
        return {"plan": ConfigRecord(cfg)}
    if plan.start_weights is not None:
        out[START] = to_record(plan.start_weights, layout)
    reg = plan.regulariser
    if isinstance(reg, FDReg):
        cfg.update({"reg-kind": "fdreg", "reg-lambda": reg.lam})
        out[ANCHOR] = to_record(reg.anchor, layout)
        out[IMPORTANCE] = to_record(reg.importance, layout)
    elif isinstance(reg, L1Pull):
        cfg.update({"reg-kind": "l1pull", "reg-lambda": reg.lam})
        out[ANCHOR] = to_record(reg.anchor, layout)
    elif reg is not None:
        raise TypeError(f"no Flower record layout for the regulariser {type(reg).__name__}; "
                        "add one in engine/flower/records.py")
    out["plan"] = ConfigRecord(cfg)
    return out


def plan_from(content: RecordDict, layout: Layout) -> ClientPlan | None:
    """The ``ClientPlan`` a server sent (the same FDReg / L1Pull classes as in-process)."""
    if "plan" not in content.config_records:
        return None
    cfg = content.config_records["plan"]
    kind, lam = str(cfg.get("reg-kind", "")), float(cfg.get("reg-lambda", 0.0))
    arrays = content.array_records
    start = read_flat(arrays[START], layout) if START in arrays else None
    reg: Any = None
    if kind == "fdreg":
        reg = FDReg(read_flat(arrays[IMPORTANCE], layout), read_flat(arrays[ANCHOR], layout), lam)
    elif kind == "l1pull":
        reg = L1Pull(lam, read_flat(arrays[ANCHOR], layout))
    elif kind:
        raise ValueError(f"unknown regulariser kind {kind!r} in the request")
    if reg is None and start is None:
        return None
    return ClientPlan(regulariser=reg, start_weights=start)


def attack_state_bytes(state: dict[str, Any]) -> bytes:
    """An attack's ``state_dict`` (tensors, numbers, None, nested dicts/lists) as bytes."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def read_attack_state(data: Any) -> dict[str, Any]:
    """The state ``attack_state_bytes`` wrote; tensors and plain containers only (no pickled code)."""
    if not isinstance(data, bytes):
        raise ValueError(f"{ATTACK_STATE} must be bytes, got {type(data).__name__}")
    state = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{ATTACK_STATE} must hold a dict, got {type(state).__name__}")
    return state
