import numpy as np
import pytest

from fedleak.common.errors import FedleakError
from fedleak.federated.partition import partition


def _skew(parts, labels_of):
    """Mean over clients of the largest category share: 1/num_categories for IID, 1 for one category."""
    shares = []
    for part in parts:
        counts = np.unique([labels_of[i] for i in part], return_counts=True)[1]
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


ITEMS = list(range(600))
LABELS = [f"cat{i % 6}" for i in ITEMS]


def test_every_record_lands_in_exactly_one_client_and_minimum_holds():
    for method in ("iid", "dirichlet"):
        parts = partition(ITEMS, LABELS, method=method, num_clients=4, alpha=0.5, min_records=20,
                          rng=np.random.default_rng(0))
        assert sorted(i for p in parts for i in p) == ITEMS
        assert min(len(p) for p in parts) >= 20
    iid = partition(ITEMS, LABELS, method="iid", num_clients=4, alpha=1.0, min_records=1, rng=np.random.default_rng(0))
    assert [len(p) for p in iid] == [150] * 4


def test_small_alpha_skews_categories_more_than_large_alpha():
    skews = {}
    for alpha in (0.1, 100.0):
        skews[alpha] = np.mean([
            _skew(partition(ITEMS, LABELS, method="dirichlet", num_clients=3, alpha=alpha, min_records=1,
                            rng=np.random.default_rng(seed)), LABELS) for seed in range(10)])
    assert skews[0.1] > 0.5 > skews[100.0]
    assert skews[100.0] < 0.25  # near the IID value of 1/6


def test_partition_is_deterministic_for_a_seed():
    a = partition(ITEMS, LABELS, method="dirichlet", num_clients=3, alpha=1.0, min_records=5, rng=np.random.default_rng(7))
    b = partition(ITEMS, LABELS, method="dirichlet", num_clients=3, alpha=1.0, min_records=5, rng=np.random.default_rng(7))
    assert a == b


def test_impossible_minimum_is_a_clear_error():
    with pytest.raises(FedleakError, match="min_records_per_client"):
        partition(ITEMS[:10], LABELS[:10], method="iid", num_clients=3, alpha=1.0, min_records=5,
                  rng=np.random.default_rng(0))
    with pytest.raises(FedleakError, match="alpha"):  # one category: Dirichlet cannot give everyone 190
        partition(ITEMS, ["x"] * 600, method="dirichlet", num_clients=3, alpha=0.05, min_records=190,
                  rng=np.random.default_rng(0), max_tries=5)
