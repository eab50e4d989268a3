"""Local training: a client's data as it trains on it, and the reference per-client trainer.

The engine hands a round's jobs to a ``LocalTrainer``; this module's ``SequentialTrainer`` is the
readable reference (one model per client, one after another). A batched trainer can replace it
as long as it returns the same weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fisherguard.clients.modifier import Timed, TrainingModifier
from fisherguard.clients.plan import TrainPlan
from fisherguard.clients.regulariser import Regulariser
from fisherguard.data.transforms import Pipeline
from fisherguard.models import flatten, load_flat, trainable


class Trigger(Protocol):
    """A backdoor pattern as the client layer uses it (the attack room defines real ones)."""

    channel_uniform: bool  # the same pattern on every channel (grey inputs stay grey)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The triggered version of a normalised batch (N, C, H, W), as a new tensor."""


@dataclass
class ClientDataset:
    """One client's samples. Attackers' poisoned samples carry label ``target`` already.

    Benign clients (and attackers with per-epoch augmentation) keep uint8 images and draw a fresh
    crop each time a sample is loaded; attackers with frozen augmentation (docs/protocol.md §5.5) keep
    the normalised, stamped tensors built once.
    """

    labels: torch.Tensor  # int64 (n,)
    pipeline: Pipeline
    images: torch.Tensor | None = None  # uint8 (n, C, 32, 32)
    frozen: torch.Tensor | None = None  # float32 (n, C', 32, 32), normalised and stamped
    poisoned: torch.Tensor | None = None  # bool (n,), stamp these after the transform
    trigger: Trigger | None = None  # written into the poisoned samples after the transform
    _replicated: bool | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def replicated_channels(self) -> bool:
        """True when every sample this client trains on has identical channels (grey data, 3 channels).

        Then a 3-channel first convolution equals a 1-channel one with its kernel summed over the
        input channels (docs/performance.md §8, lever for target 4); an ``sdfc``-family trigger on
        channel 0 alone breaks it.
        """
        if self._replicated is None:
            self._replicated = self._channels_identical()
        return self._replicated

    def _channels_identical(self) -> bool:
        if self.frozen is not None:
            f = self.frozen
            return f.shape[1] > 1 and all(torch.equal(f[:, 0], f[:, c]) for c in range(1, f.shape[1]))
        if not (self.pipeline.grey and self.pipeline.out_channels > 1):
            return False
        if self.trigger is None or self.poisoned is None or not bool(self.poisoned.any()):
            return True
        return self.trigger.channel_uniform

    def batch(self, idx: torch.Tensor, generator: torch.Generator, *, first_channel: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples ``idx`` as the model sees them; ``first_channel``: only channel 0 (N, 1, H, W),
        for the grouped trainer's summed conv1 on replicated channels."""
        if self.frozen is not None:
            x = self.frozen[idx]
            return (x[:, :1] if first_channel else x), self.labels[idx]
        assert self.images is not None
        if first_channel and self.pipeline.grey and not self._any_poisoned(idx):
            # a grey image's channels are one normalised copy each: channel 0 alone is the same
            # numbers for a third of the work (docs/performance.md §8.2)
            one = Pipeline(grey=True, out_channels=1)
            return one.train(self.images[idx], generator), self.labels[idx]
        x = self._stamp(self.pipeline.train(self.images[idx], generator), idx)
        return (x[:, :1] if first_channel else x), self.labels[idx]

    def _any_poisoned(self, idx: torch.Tensor) -> bool:
        return self.poisoned is not None and self.trigger is not None and bool(self.poisoned[idx].any())

    def fisher_data(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All n_k samples without random augmentation (docs/algorithms.md §2.4); with a
        ``generator``, each sample as the training loader gives it (training transform drawn
        from it; an attacker's frozen tensors), the `code` preset's client Fisher."""
        if generator is not None:
            return self.batch(torch.arange(len(self)), generator)
        if self.frozen is not None:
            return self.frozen, self.labels
        assert self.images is not None
        idx = torch.arange(len(self))
        return self._stamp(self.pipeline.test(self.images), idx), self.labels

    def _stamp(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.poisoned is None or self.trigger is None:
            return x
        sel = self.poisoned[idx]
        if bool(sel.any()):
            x = x.clone()
            x[sel] = self.trigger.apply(x[sel])
        return x


FISHER_DATA = ("plain", "train_loader")  # the client Fisher's data: paper / code (issue 20)


@dataclass
class FisherRequest:
    """Ask the client for its diagonal Fisher at its trained weights (``fisher.diagonal_fisher`` options)."""

    options: dict[str, Any]
    generator: torch.Generator  # the client's Fisher stream for this round


@dataclass
class ClientJob:
    client_id: int
    start_weights: torch.Tensor  # (P,)
    data: ClientDataset
    generator: torch.Generator  # this client's stream for this round
    regulariser: Regulariser | None = None
    fisher: FisherRequest | None = None
    # an attacker's change to its own training (attack stages); forces the per-client path
    modifier: TrainingModifier | None = None


@dataclass
class ClientResult:
    client_id: int
    weights: torch.Tensor  # (P,)
    steps: int
    stats: dict[str, float] = field(default_factory=dict)
    fisher: torch.Tensor | None = None  # (P,), when the job asked for it
    timing: dict[str, float] = field(default_factory=dict)  # seconds; not part of the results


@dataclass
class Upload:
    """One client's upload as the server receives it; any field may be missing or malformed.

    Both engines build these (the in-process trainer's results, or Flower replies), the attack's
    after-training stage may replace them, and the round turns them into a ``RoundInput``.
    """

    client_id: int
    weights: Any = None  # w_k, flat (a float tensor when well formed)
    fisher: Any = None  # F(D_k; w_k), flat, when the defense asked for it
    num_samples: Any = 0  # the client-reported n_k
    stats: dict[str, float] = field(default_factory=dict)  # local training's last loss, …
    reason: str | None = None  # a transport-level problem found before the defense ("missing")
    timing: dict[str, float] = field(default_factory=dict)  # seconds; not part of the results


def client_fisher(model: nn.Module, data: ClientDataset, weights: torch.Tensor,
                  request: FisherRequest) -> torch.Tensor:
    """The client's diagonal Fisher over all its samples without augmentation
    (docs/algorithms.md §2.4), or, when the options ask for ``data: train_loader`` (the `code`
    preset), over its samples under the training transform, drawn from the request's stream."""
    from fisherguard.fisher import diagonal_fisher

    options = dict(request.options)
    source = options.pop("data", "plain")
    if source not in FISHER_DATA:
        raise ValueError(f"Fisher data must be one of {', '.join(FISHER_DATA)}, got {source!r}")
    x, y = data.fisher_data(request.generator if source == "train_loader" else None)
    return diagonal_fisher(model, weights, x, y, generator=request.generator, **options)


def finish_job(job: ClientJob, weights: torch.Tensor, steps: int, stats: dict[str, float],
               fisher_model: nn.Module, train_s: float) -> ClientResult:
    """Attach the requested Fisher (and the times spent) to a trained client's result."""
    fisher, timing = None, {"train_s": train_s}
    if job.fisher is not None:
        t0 = time.perf_counter()
        fisher = client_fisher(fisher_model, job.data, weights, job.fisher)
        timing["fisher_s"] = time.perf_counter() - t0
    return ClientResult(job.client_id, weights, steps, stats, fisher, timing)


def client_batches(job: ClientJob, plan: TrainPlan, *, first_channel: bool = False
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The client's mini-batches in training order, drawing from its own generator only.

    Every trainer consumes a client's stream in this order (epoch permutation, then each batch's
    augmentation), so batched and per-client training see identical batches.
    """
    for _ in range(plan.epochs):
        for idx in epoch_batches(len(job.data), plan.batch_size, job.generator):
            yield job.data.batch(idx, job.generator, first_channel=first_channel)


def num_steps(n: int, plan: TrainPlan) -> int:
    return plan.epochs * (n // plan.batch_size)


class LocalTrainer(Protocol):
    def train_round(self, jobs: list[ClientJob], plan: TrainPlan) -> list[ClientResult]: ...


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A fresh permutation of the client's indices cut into full batches (last partial dropped)."""
    perm = torch.randperm(n, generator=generator)
    return [perm[s:s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]


def make_optimizer(params: list[nn.Parameter], plan: TrainPlan) -> torch.optim.Optimizer:
    # fused SGD is the same update rule as the default, ≈15 % faster here (docs/performance.md §3)
    return torch.optim.SGD(params, lr=plan.lr, momentum=plan.momentum,
                           weight_decay=plan.weight_decay, fused=True)


class SequentialTrainer:
    """Reference path: each client trains its own model copy in turn (docs/protocol.md §4)."""

    name = "sequential"

    def __init__(self, model_factory: Callable[[], nn.Module]) -> None:
        # channels_last vectorises the small convolutions better on CPU (docs/performance.md §3)
        self.model = model_factory().to(memory_format=torch.channels_last)
        self.fisher_model = model_factory()

    def train_one(self, job: ClientJob, plan: TrainPlan) -> ClientResult:
        t0 = time.perf_counter()
        model = load_flat(self.model, job.start_weights)
        model.train()
        params = trainable(model)
        mod = Timed(job.modifier) if job.modifier is not None else None
        if mod is not None:
            plan = mod.plan(plan)
            mod.begin(model, params, job.start_weights)
        per_epoch = max(1, len(job.data) // plan.batch_size)
        opt = make_optimizer(params, plan)
        steps, ce_last, pen_last = 0, float("nan"), 0.0
        for x, y in client_batches(job, plan):
            x = x.contiguous(memory_format=torch.channels_last)
            if mod is not None:
                mod.before_step(opt, steps, per_epoch)
            opt.zero_grad(set_to_none=True)
            ce = F.cross_entropy(model(x), y)
            loss = ce
            if job.regulariser is not None:
                pen = job.regulariser.penalty(params)
                loss = ce + pen
                pen_last = float(pen.detach())
            if mod is not None:
                loss = mod.loss(loss, ce, model, params, x, y)
            loss.backward()
            if mod is not None:
                mod.after_backward(params)
            opt.step()
            if mod is not None:
                mod.after_step(params)
            steps += 1
            ce_last = float(ce.detach())
        stats = {"loss": ce_last}
        if job.regulariser is not None:
            stats["penalty"] = pen_last
        result = finish_job(job, flatten(model).clone(), steps, stats, self.fisher_model,
                            time.perf_counter() - t0)
        if mod is not None:
            result.timing["attack_s"] = mod.seconds
        return result

    def train_round(self, jobs: list[ClientJob], plan: TrainPlan) -> list[ClientResult]:
        return [self.train_one(job, plan) for job in jobs]
