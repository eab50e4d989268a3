"""Freed training memory stays in the process: a grouped SGD step no longer page-faults."""

import platform
import subprocess
import sys
import textwrap

import pytest

from fisherguard import config
from fisherguard.allocator import retain_freed_memory
from fisherguard.engine import runner

pytestmark = pytest.mark.unit

# A fresh interpreter, so the allocator starts from glibc's defaults; prints faults per step.
STEPS = textwrap.dedent("""
    import resource, sys
    import torch
    from fisherguard.allocator import retain_freed_memory
    from fisherguard.clients.grouped import client_losses
    from fisherguard.clients.training import TrainPlan, make_optimizer
    from fisherguard.models import SimpleCNN, trainable

    torch.set_num_threads(1)
    print(retain_freed_memory() if sys.argv[1] == "retain" else None)
    g = 5
    params = [torch.stack([p.detach().clone() for _ in range(g)]).requires_grad_(True)
              for p in trainable(SimpleCNN())]
    opt = make_optimizer(params, TrainPlan())
    x = torch.randn(64, g, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (g, 64))

    def step():
        opt.zero_grad(set_to_none=True)
        client_losses(params, x, y, summed_conv1=True).sum().backward()
        opt.step()

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def faults_per_step(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return out[0], float(out[1])


@pytest.mark.integration  # a fresh interpreter measuring page faults (~5 s)
def test_retained_memory_removes_page_faults_from_training_steps():
    applied, retained = faults_per_step("retain")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied == "True"
        # Against glibc's defaults measured in the same run, not an absolute count: the
        # reference varies by machine (1 600-2 000 faults per step here; retained 0.1 here,
        # 124 on a loaded CI box), the tenfold cut does not.
        _, default = faults_per_step("default")
        assert retained < default / 10, (retained, default)
    else:  # nothing to tune: the call says so instead of pretending
        assert applied == "False"


@pytest.mark.parametrize("limit", [0, -1, 2**31])
def test_limit_out_of_range_is_refused(limit):
    with pytest.raises(ValueError, match="limit"):
        retain_freed_memory(limit)


@pytest.mark.integration  # runs the engine end to end
@pytest.mark.parametrize("retain", [True, False])
def test_the_engine_applies_runtime_retain_memory(monkeypatch, tmp_path, retain):
    calls = []
    monkeypatch.setattr(runner, "retain_freed_memory", lambda: calls.append(1) or True)
    cfg = config.resolve({
        "experiment": {"name": "alloc", "seed": 0},
        "data": {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 100},
        "federation": {"clients": 2, "rounds": 1, "local_epochs": 1},
        "attack": {"name": "none"}, "defense": "fedavg", "server": {"val_size": 32},
        "runtime": {"retain_memory": retain}})
    runner.run(cfg, tmp_path / "run", progress=None)
    assert calls == ([1] if retain else [])
