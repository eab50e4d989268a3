"""Refactoring guard: fixed-seed runs give the stored final weights, bit for bit (in-process).

A change that claims not to change results must leave the digests as they are. Bit-identical
weights hold only for one CPU and torch build (kernels round differently across instruction
sets and vendors), so the digests are stored per machine (``regression_digests.machine()``:
the CPU's model and flags and torch's version, hashed). On a machine without stored digests the
guard is weaker and says so: two runs of each config must agree bit for bit, and the digests to
store are printed (``python tests/regression_digests.py``).

History: the digests of the machine the project started on (fedavg f344bc17d5d46ed6, fdcr
d480b3d1cc338397, sdfc 485a8a22d9a65816, multi-krum 5b1a095cb1d91f06) were taken before the
engine's round was unified; issue 17's client-Fisher lever changed FDCR's and SDFC's rounding
(FedAvg and Multi-Krum kept theirs), and that machine's new digests could not be taken.
"""

import pytest

from regression_digests import SYNTHETIC, digest, final_weights, machine

pytestmark = pytest.mark.integration

STORED = {
    # 2-core Intel Xeon, AVX-512, torch 2.13.0+cpu (taken after issue 17's Fisher lever; the code
    # before it gave fdcr 1504d20b7de9c7f1 and sdfc 88266035fd71853f here, the rest the same)
    "bf58c27942d1": {"fedavg": "f2f99a2b0470e5fa", "fdcr": "076e4aea62b82633",
                     "sdfc": "8f8f3fccbef19d05", "multi-krum": "8630a56cb2e6e8d6"},
}
DEFENSES = ("fedavg", "fdcr", "sdfc", "multi-krum")


@pytest.mark.parametrize("defense", DEFENSES)
def test_final_weights_are_the_stored_ones(tmp_path, defense):
    got = digest(final_weights(SYNTHETIC, defense, tmp_path / "a"))
    stored = STORED.get(machine())
    if stored is not None:
        assert got == stored[defense]
    else:  # no digests for this CPU: the same run twice must still agree bit for bit
        again = digest(final_weights(SYNTHETIC, defense, tmp_path / "b"))
        assert got == again, f"{defense}: two runs of one config differ on this machine"
        print(f"no stored digests for machine {machine()}: {defense} {got}")


def test_machine_key_is_stable_and_short():
    assert machine() == machine() and len(machine()) == 12
