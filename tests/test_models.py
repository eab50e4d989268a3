import pytest
import torch
import torch.nn.functional as F

from fisherguard.models import SimpleCNN, flatten, load_flat, num_params, unflatten

pytestmark = pytest.mark.unit


def test_protocol_shapes_and_parameter_counts():
    m = SimpleCNN(3)
    assert num_params(m) == 92626 and len(list(m.parameters())) == 14
    assert num_params(SimpleCNN(1)) == 92326
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)  # a batch of one works (no squeeze)
    names = [n for n, _ in m.named_parameters()]
    assert names[:2] == ["conv1.weight", "conv1.bias"] and names[-2:] == ["cls.weight", "cls.bias"]


def test_pool_before_relu_matches_the_papers_order():
    m = SimpleCNN(3)
    x = torch.randn(5, 3, 32, 32)
    h = F.max_pool2d(F.relu(m.conv1(x)), 2)
    h = F.max_pool2d(F.relu(m.conv2(h)), 2).reshape(5, -1)
    h = F.relu(m.l1(F.relu(m.fc2(F.relu(m.fc1(h))))))
    ref = m.cls(m.l2(h))
    assert torch.allclose(m(x), ref, atol=1e-6)


def test_flatten_load_roundtrip_and_errors():
    m = SimpleCNN(3)
    w = torch.randn(92626)
    load_flat(m, w)
    assert torch.equal(flatten(m), w)
    assert unflatten(m, w)["conv1.weight"].shape == (6, 3, 5, 5)
    try:
        load_flat(m, torch.zeros(5))
    except ValueError as e:
        assert "(92626,)" in str(e)
    else:
        raise AssertionError("a wrong-length vector must be refused")


def test_one_channel_variant_equals_three_channel_on_grey_input_with_summed_kernel():
    m3, m1 = SimpleCNN(3), SimpleCNN(1)
    w1 = {k: v.clone() for k, v in m3.state_dict().items()}
    w1["conv1.weight"] = w1["conv1.weight"].sum(1, keepdim=True)
    m1.load_state_dict(w1)
    g = torch.randn(4, 1, 32, 32)
    assert torch.allclose(m1(g), m3(g.expand(-1, 3, -1, -1)), atol=1e-5)
