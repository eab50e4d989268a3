"""The fast path: a round's clients trained together as one grouped-convolution ensemble.

K SimpleCNNs with stacked parameters run as a single network: convolutions as one ``groups=K``
convolution in channels_last, linear layers as one batched matmul, and the loss is the sum of the
clients' mean cross-entropies so each client's gradient stays its own. SGD's momentum and weight
decay are element-wise, so one optimiser over the stacked tensors equals K separate ones; a client
that has run all its steps leaves the group (its slice and momentum are dropped), so no compute
is wasted on finished clients (docs/performance.md §3). The result equals ``SequentialTrainer`` to
float rounding; ``tests/test_grouped.py`` proves it.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fisherguard.clients.training import (ClientJob, ClientResult, TrainPlan, client_batches,
                                          finish_job, make_optimizer, num_steps)
from fisherguard.models import SimpleCNN, flatten, trainable

Tensor = torch.Tensor
# a grouped step's phases, timed per group: batch staging (augmentation, stacking, layout),
# forward, backward, optimiser step with the loss bookkeeping and the group's shrinking
PHASES = ("stage", "forward", "backward", "optim")


def supports(model: nn.Module) -> bool:
    """The grouped path knows the protocol SimpleCNN's layer sequence, nothing else."""
    return type(model) is SimpleCNN


def grouped_forward(params: list[Tensor], x: Tensor, *, summed_conv1: bool) -> Tensor:
    """Logits (G, B, 10) of G SimpleCNNs with stacked parameters on x (B, G·C, 32, 32).

    ``summed_conv1``: x carries one channel per client and conv1's kernel is summed over its input
    channels, which equals the 3-channel convolution when the three channels are identical.
    """
    (w1, b1, w2, b2, *linear) = params
    g = w1.shape[0]
    if summed_conv1:
        w1 = w1.sum(2, keepdim=True)
    h = F.conv2d(x, w1.reshape(g * w1.shape[1], *w1.shape[2:]), b1.reshape(-1), groups=g)
    h = F.relu(F.max_pool2d(h, 2))  # pool before ReLU: identical, cheaper (docs/performance.md §3)
    h = F.conv2d(h, w2.reshape(g * w2.shape[1], *w2.shape[2:]), b2.reshape(-1), groups=g)
    h = F.relu(F.max_pool2d(h, 2))
    batch = h.shape[0]
    h = h.reshape(batch, g, -1).transpose(0, 1)  # (G, B, 400) in each model's flatten order
    n_lin = len(linear) // 2
    for i in range(n_lin):
        w, b = linear[2 * i], linear[2 * i + 1]
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if i < n_lin - 2:  # SimpleCNN: ReLU after fc1, fc2, l1; none after l2 and cls
            h = F.relu(h)
    return h


def client_losses(params: list[Tensor], x: Tensor, y: Tensor, *, summed_conv1: bool) -> Tensor:
    """Each client's mean cross-entropy (G,) on its slice of x (B, G·C, 32, 32) with labels y (G, B).

    Their sum is the group's loss: each client's gradient is then its own mean-loss gradient.
    """
    logits = grouped_forward(params, x, summed_conv1=summed_conv1)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return ce.view(y.shape[0], -1).mean(1)


def group_input(xs: list[Tensor]) -> Tensor:
    """The clients' batches (B, C, H, W) as the group's input (B, G·C, H, W) in channels_last.

    Concatenated along the channels, then one transposing copy: 2x faster than concatenating
    channels-last views, whose copy writes G·C floats a pixel one client at a time (same numbers).
    """
    return torch.cat(xs, 1).contiguous(memory_format=torch.channels_last)


def make_groups(jobs: list[ClientJob], plan: TrainPlan, group_size: int) -> list[list[int]]:
    """A round's ensembles as job indices: ⌈m / group_size⌉ groups of at most ``group_size``
    clients with balanced local steps, each listed largest first (ties in job order).

    Clients are dealt longest-processing-time first: largest first, each to the group with the
    fewest steps so far among those not yet full (lowest index on ties). Consecutive chunks of the
    sorted clients would put the largest ones together and leave the worker holding the smaller
    group idle for about a third of the round (docs/performance.md §8.2).
    A function of the jobs and ``group_size`` alone, never of the worker count: a client's float
    rounding depends on the ensemble it trains in (the grouped convolution's kernel differs with
    the group's size and members), so the groups are fixed first and workers take whole groups.
    Largest first within a group keeps its active clients a prefix, so shrinking is a slice.
    With one group (m ≤ group_size) this is the round's clients sorted largest first.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    steps = [num_steps(len(j.data), plan) for j in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -steps[i])
    groups: list[list[int]] = [[] for _ in range(-(-len(jobs) // group_size))]
    loads = [0] * len(groups)
    for i in order:
        g = min((k for k in range(len(groups)) if len(groups[k]) < group_size),
                key=lambda k: loads[k])
        groups[g].append(i)
        loads[g] += steps[i]
    return groups


class GroupedTrainer:
    """Default trainer for SimpleCNN: clients of a round trained as one shrinking group."""

    name = "grouped"

    def __init__(self, model_factory: Callable[[], nn.Module], group_size: int = 10) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        template = model_factory()
        if not supports(template):
            raise ValueError(f"the grouped trainer supports SimpleCNN only, not {type(template).__name__}")
        self.template = template
        self.shapes = [p.shape for p in trainable(template)]
        self.group_size = group_size
        self.fisher_model = model_factory()

    def train_round(self, jobs: list[ClientJob], plan: TrainPlan) -> list[ClientResult]:
        changed = [j.client_id for j in jobs if j.modifier is not None]
        if changed:  # an attack's own training steps cannot share the ensemble's
            raise ValueError(f"clients {changed}: jobs with an attack's training stage take the "
                             "per-client path (SequentialTrainer)")
        out: dict[int, ClientResult] = {}
        for members in make_groups(jobs, plan, self.group_size):
            for i, r in zip(members, self._train_group([jobs[i] for i in members], plan)):
                out[i] = r
        return [out[i] for i in range(len(jobs))]

    def _stack(self, jobs: list[ClientJob]) -> list[Tensor]:
        flat = torch.stack([j.start_weights.detach().to(torch.float32) for j in jobs])
        sizes = [s.numel() for s in self.shapes]
        return [piece.reshape(len(jobs), *shape).clone().requires_grad_(True)
                for piece, shape in zip(torch.split(flat, sizes, dim=1), self.shapes)]

    def _train_group(self, jobs: list[ClientJob], plan: TrainPlan) -> list[ClientResult]:
        t0 = time.perf_counter()
        steps = [num_steps(len(j.data), plan) for j in jobs]
        summed = self.shapes[0][1] > 1 and all(j.data.replicated_channels for j in jobs)
        active = sum(1 for n in steps if n > 0)  # a prefix: jobs arrive largest first
        params = self._stack(jobs[:active]) if active else []
        opt = make_optimizer(params, plan) if active else None
        streams = [client_batches(j, plan, first_channel=summed) for j in jobs]
        finals: list[Tensor | None] = [None] * len(jobs)
        stats: list[dict[str, float]] = [{"loss": float("nan")} for _ in jobs]
        for i, j in enumerate(jobs):
            if j.regulariser is not None:
                stats[i]["penalty"] = 0.0
        for i in range(active, len(jobs)):  # no full batch: the client returns its start weights
            finals[i] = jobs[i].start_weights.detach().to(torch.float32).clone()
        step = 0
        # where the group's time goes (docs/performance.md §8.2): batch staging, forward, backward,
        # optimiser and bookkeeping; perf_counter costs well under a microsecond a call
        phases = dict.fromkeys(PHASES, 0.0)
        while active > 0:
            ta = time.perf_counter()
            xs, ys = [], []
            for i in range(active):
                x, y = next(streams[i])
                xs.append(x)
                ys.append(y)
            xg = group_input(xs)
            yg = torch.stack(ys)  # (G, B)
            assert opt is not None
            opt.zero_grad(set_to_none=True)
            tb = time.perf_counter()
            ce = client_losses(params, xg, yg, summed_conv1=summed)
            loss = ce.sum()
            pens = []
            for i in range(active):
                if jobs[i].regulariser is not None:
                    pen = jobs[i].regulariser.penalty([p[i] for p in params])
                    pens.append((i, pen))
                    loss = loss + pen
            tc = time.perf_counter()
            loss.backward()
            td = time.perf_counter()
            opt.step()
            step += 1
            ce_d = ce.detach()
            for i in range(active):
                stats[i]["loss"] = float(ce_d[i])
            for i, pen in pens:
                stats[i]["penalty"] = float(pen.detach())
            remaining = sum(1 for i in range(active) if steps[i] > step)
            if remaining < active:
                for i in range(remaining, active):
                    finals[i] = flatten([p[i] for p in params]).clone()
                params, opt = self._shrink(params, opt, remaining, plan)
                active = remaining
            te = time.perf_counter()
            for name, a, b in zip(PHASES, (ta, tb, tc, td), (tb, tc, td, te)):
                phases[name] += b - a
        elapsed = time.perf_counter() - t0
        results = []
        for i, j in enumerate(jobs):
            w = finals[i]
            assert w is not None
            results.append(finish_job(j, w, steps[i], stats[i], self.fisher_model, elapsed))
        if results:  # the group's phases once, on its first member (a round record sums them)
            results[0].timing.update({f"{k}_s": v for k, v in phases.items()})
        return results

    @staticmethod
    def _shrink(params: list[Tensor], opt: torch.optim.Optimizer, keep: int, plan: TrainPlan
                ) -> tuple[list[Tensor], torch.optim.Optimizer | None]:
        """Drop the finished clients' slices from the parameters and the momentum buffers (exact)."""
        if keep == 0:
            return [], None
        new = [p.detach()[:keep].clone().requires_grad_(True) for p in params]
        new_opt = make_optimizer(new, plan)
        for old, p in zip(params, new):
            buf = opt.state.get(old, {}).get("momentum_buffer")
            if buf is not None:
                new_opt.state[p]["momentum_buffer"] = buf[:keep].clone()
        return new, new_opt
