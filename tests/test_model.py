import torch

from model import CompactNet, Net


def parameter_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_net_maps_a_batch_of_digits_to_ten_log_probabilities():
    output = Net()(torch.randn(3, 1, 28, 28))
    assert output.shape == (3, 10)
    assert torch.all(output <= 0)
    assert torch.allclose(output.exp().sum(dim=1), torch.ones(3), atol=1e-5)


def test_net_has_the_originals_593200_parameters():
    assert parameter_count(Net()) == 593_200


def test_net_state_dict_has_the_originals_names_and_shapes():
    # The original's layers, by name: a state_dict saved by it loads here with strict=True, and the other way round.
    original = {
        "conv1": (32, 1, 3, 3), "conv2": (64, 32, 3, 3), "conv3": (128, 64, 3, 3), "conv4": (256, 128, 3, 3),
        "fc1": (50, 4096), "fc2": (10, 50),
    }
    expected = {}
    for name, shape in original.items():
        expected[f"{name}.weight"] = shape
        expected[f"{name}.bias"] = shape[:1]
    state = Net().state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    Net().load_state_dict({key: torch.zeros(shape) for key, shape in expected.items()}, strict=True)


def test_compact_net_has_under_8000_parameters_as_its_docstring_says_and_gives_log_probabilities():
    model = CompactNet()
    assert parameter_count(model) < 8_000
    assert CompactNet.__doc__.startswith(f"{parameter_count(model):,} parameters")
    model.eval()  # batch norm with its running statistics
    output = model(torch.randn(5, 1, 28, 28))
    assert output.shape == (5, 10)
    assert torch.allclose(output.exp().sum(dim=1), torch.ones(5), atol=1e-5)
