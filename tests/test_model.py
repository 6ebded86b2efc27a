"""The models: what each returns, whatever its layers."""
import pytest
import torch

from model import MODELS


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_returns_log_probabilities_of_ten_digits(name):
    output = MODELS[name]().eval()(torch.randn(3, 1, 28, 28))
    assert output.shape == (3, 10)
    assert torch.allclose(output.exp().sum(dim=1), torch.ones(3), atol=1e-5)


def test_net_keeps_the_original_s_layer_names_so_its_weights_load_both_ways():
    assert [name for name, _ in MODELS["Net"]().named_children()] == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"]
