"""The server's clean validation set U behind the ``ServerData`` callables a defense may use."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fisherguard.clients.training import ClientDataset, ClientJob, SequentialTrainer, TrainPlan
from fisherguard.data.transforms import Pipeline, StrongPipeline
from fisherguard.models import load_flat
from fisherguard.seeding import torch_stream


class ValidationSet:
    """U (docs/protocol.md §2) with the transform of the preset (docs/protocol.md §1.3); randomness per round and call."""

    def __init__(self, model_factory: Callable[[], nn.Module], images: torch.Tensor,
                 labels: torch.Tensor, pipeline: Pipeline, *, transform: str, plan: TrainPlan,
                 fisher_options: dict[str, Any], seed: int) -> None:
        self.size = int(labels.numel())
        self._model = model_factory()
        self._factory = model_factory
        self._labels = labels
        self._images = images
        if transform == "strong":  # the SDFC release's CIFAR-10 U (docs/protocol.md §1.3)
            if pipeline.grey:
                raise ValueError("server.transform: strong is the CIFAR-10 augmentation; a grey "
                                 "dataset takes train or test")
            pipeline = StrongPipeline(pipeline.grey, pipeline.out_channels)
        self._pipeline = pipeline
        self._augment = transform in ("train", "strong")
        self._fixed = None if self._augment else pipeline.test(images)
        self._plan = plan
        self._fisher_options = dict(fisher_options)
        self._seed = seed
        self._round = 0
        self._calls = 0

    def begin_round(self, round_idx: int) -> None:
        self._round, self._calls = round_idx, 0

    def _stream(self, what: str) -> torch.Generator:
        self._calls += 1
        return torch_stream(self._seed, "server", what, self._round, self._calls)

    def _inputs(self, g: torch.Generator) -> torch.Tensor:
        return self._pipeline.train(self._images, g) if self._augment else self._fixed

    def fisher(self, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """M(U; w), or M over the samples ``rows`` of U (``subset``)."""
        from fisherguard.fisher import diagonal_fisher

        g = self._stream("fisher")
        if rows is None:
            x, y = self._inputs(g), self._labels
        else:  # augment only the rows used, so a subset costs its own size
            x = (self._pipeline.train(self._images[rows], g) if self._augment
                 else self._fixed[rows])  # type: ignore[index]
            y = self._labels[rows]
        return diagonal_fisher(self._model, weights, x, y, generator=g, **self._fisher_options)

    def subset(self, size: int) -> ValidationSet | ValidationSubset:
        """U itself when ``size`` ≥ |U|, else ``size`` samples of U drawn afresh from the round's
        stream, for a defense that evaluates many models on the same subset (docs/sampling.md §7)."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"subset size must be a positive integer, got {size!r}")
        if size >= self.size:
            return self
        rows = torch.randperm(self.size, generator=self._stream("subset"))[:size].sort().values
        return ValidationSubset(self, rows)

    def peek_fisher(self, weights: torch.Tensor) -> torch.Tensor:
        """M(U; w) from the stream the server's next ``fisher`` call will draw, without moving
        it: the named oracle of an attack (docs/attacks.md §4.0) must not change the defense."""
        calls = self._calls
        try:
            return self.fisher(weights)
        finally:
            self._calls = calls

    def train(self, weights: torch.Tensor, epochs: int) -> torch.Tensor:
        g = self._stream("train")
        data = ClientDataset(labels=self._labels, pipeline=self._pipeline,
                             images=self._images if self._augment else None,
                             frozen=None if self._augment else self._fixed)
        plan = TrainPlan(epochs=epochs, batch_size=self._plan.batch_size, lr=self._plan.lr,
                         momentum=self._plan.momentum, weight_decay=self._plan.weight_decay)
        trainer = SequentialTrainer(self._factory)
        return trainer.train_one(ClientJob(-1, weights, data, g), plan).weights

    @torch.no_grad()
    def loss_and_entropy(self, weights: torch.Tensor) -> tuple[float, float]:
        model = load_flat(self._model, weights).eval()
        x = self._fixed if self._fixed is not None else self._pipeline.test(self._images)
        logits = model(x)
        loss = float(F.cross_entropy(logits, self._labels))
        logp = logits.log_softmax(1)
        entropy = float(-(logp.exp() * logp).sum(1).mean())
        return loss, entropy


class ValidationSubset:
    """``size`` fixed samples of a ``ValidationSet``: its Fisher at any weights (``ServerData.fisher``)."""

    def __init__(self, parent: ValidationSet, rows: torch.Tensor) -> None:
        self._parent = parent
        self.rows = rows
        self.size = int(rows.numel())

    def fisher(self, weights: torch.Tensor) -> torch.Tensor:
        return self._parent.fisher(weights, self.rows)
