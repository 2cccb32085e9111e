import pytest
import torch

from fedleak.defenses.median import coordinate_median
from fedleak.federated.aggregation import fedavg


def test_fedavg_of_two_adapters_is_their_example_weighted_mean():
    a = {"x.lora_A.weight": torch.tensor([[1.0, 2.0]]), "x.lora_B.weight": torch.tensor([[0.0], [4.0]])}
    b = {"x.lora_A.weight": torch.tensor([[3.0, -2.0]]), "x.lora_B.weight": torch.tensor([[8.0], [0.0]])}
    out = fedavg([(a, 1), (b, 3)])
    torch.testing.assert_close(out["x.lora_A.weight"], torch.tensor([[2.5, -1.0]]))
    torch.testing.assert_close(out["x.lora_B.weight"], torch.tensor([[6.0], [1.0]]))
    assert out["x.lora_A.weight"].dtype == torch.float32


def test_fedavg_rejects_empty_input():
    with pytest.raises(ValueError):
        fedavg([])


def test_coordinate_median_odd_and_even_counts():
    states = [{"w": torch.tensor([1.0, 5.0, 3.0])}, {"w": torch.tensor([2.0, 2.0, 2.0])},
              {"w": torch.tensor([9.0, 0.0, 4.0])}]
    torch.testing.assert_close(coordinate_median([(s, 1) for s in states])["w"], torch.tensor([2.0, 2.0, 3.0]))
    # Example counts do not weight the median, and an outlier cannot move it.
    outlier = {"w": torch.tensor([1e6, -1e6, 1e6])}
    torch.testing.assert_close(coordinate_median([(s, 100) for s in states] + [(outlier, 1)])["w"],
                               torch.tensor([5.5, 1.0, 3.5]))
