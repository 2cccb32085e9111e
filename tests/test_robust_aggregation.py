"""Robust aggregation rules against Flower's numpy implementations (test oracles) and hand cases."""

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import (aggregate_bulyan, aggregate_krum, aggregate_median,
                                            aggregate_trimmed_avg)

from fedleak.defenses.base import Composition
from fedleak.defenses.bulyan import Bulyan, bulyan
from fedleak.defenses.geomedian import geometric_median
from fedleak.defenses.krum import Krum, MultiKrum, krum_select
from fedleak.defenses.median import Median, coordinate_median
from fedleak.defenses.norm_bound import NormBound, clip_update
from fedleak.defenses.secagg import SecAgg
from fedleak.defenses.trimmed_mean import trimmed_mean
from fedleak.common.errors import FedleakError
from fedleak.federated.hooks import ClientUpdate, RoundInfo

KEYS = ("layer.lora_A.weight", "layer.lora_B.weight")


def _results(n=7, seed=0, counts=None):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        state = {KEYS[0]: torch.tensor(rng.normal(size=(2, 5))), KEYS[1]: torch.tensor(rng.normal(size=(5, 2)))}
        out.append((state, counts[i] if counts else int(rng.integers(1, 20))))
    return out


def _flower(results):
    return [([state[k].numpy() for k in sorted(state)], n) for state, n in results]


def _close(state, arrays):
    for key, array in zip(sorted(state), arrays):
        np.testing.assert_allclose(state[key].numpy(), array, rtol=1e-10, atol=1e-12)


def _info():
    return RoundInfo(round=1, clients=[], num_clients_total=7, generator=torch.Generator())


def test_median_matches_flower():
    for n in (6, 7):
        results = _results(n)
        _close(coordinate_median(results), aggregate_median(_flower(results)))


def test_trimmed_mean_matches_flower():
    results = _results(7)
    for beta in (0.0, 0.15, 0.3, 0.45):
        _close(trimmed_mean(results, beta=beta), aggregate_trimmed_avg(_flower(results), proportiontocut=beta))


def test_krum_and_multikrum_match_flower():
    results = _results(7)
    for f in (0, 1, 2):
        chosen = krum_select(results, f=f)[0]
        _close(results[chosen][0], aggregate_krum(_flower(results), num_malicious=f, to_keep=0))
        updates = [ClientUpdate(client=i, state=s, num_examples=n) for i, (s, n) in enumerate(results)]
        for m in (2, 4):
            _close(MultiKrum(f=f, m=m).aggregate(updates, info=_info()),
                   aggregate_krum(_flower(results), num_malicious=f, to_keep=m))


def test_bulyan_matches_flower():
    results = _results(7)
    state, selected = bulyan(results, f=1)
    assert len(selected) == 5
    _close(state, aggregate_bulyan(_flower(results), num_malicious=1, aggregation_rule=aggregate_krum, to_keep=0))


def test_selecting_rules_exclude_an_outlier_and_record_it():
    results = _results(7)
    outlier = ({k: v + 50.0 for k, v in results[3][0].items()}, results[3][1])
    results[3] = outlier
    updates = [ClientUpdate(client=10 + i, state=s, num_examples=n) for i, (s, n) in enumerate(results)]
    for defense in (Krum(f=1), MultiKrum(f=1, m=5), Bulyan(f=1)):
        info = _info()
        aggregated = defense.aggregate(updates, info=info)
        assert 13 in info.metrics["excluded_clients"], defense.name
        assert all(float((aggregated[k] - outlier[0][k]).abs().min()) > 10 for k in KEYS)
    info = _info()
    Krum(f=1).aggregate(updates, info=info)
    kept = 10 + krum_select(results, f=1)[0]
    assert sorted(info.metrics["excluded_clients"] + [kept]) == list(range(10, 17))


def test_preconditions_refuse_too_few_clients():
    with pytest.raises(FedleakError, match="more than 2f \\+ 2 = 4 clients per round, got 4"):
        Krum(f=1).check(clients_per_round=4)
    Krum(f=1).check(clients_per_round=5)
    with pytest.raises(FedleakError, match="at least 4f \\+ 3 = 7"):
        Bulyan(f=1).check(clients_per_round=6)
    with pytest.raises(FedleakError, match="more than 2f"):  # also at run time, e.g. when uploads go missing
        Krum(f=1).aggregate([ClientUpdate(client=i, state=s, num_examples=n) for i, (s, n) in enumerate(_results(4))],
                            info=_info())


def test_norm_bound_clips_updates_to_the_bound_hand_case():
    reference = {KEYS[0]: torch.zeros(2, 2, dtype=torch.float64)}
    state = {KEYS[0]: torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)}  # update norm 5
    clipped, norm = clip_update(state, reference, max_norm=1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped[KEYS[0]], torch.tensor([[0.6, 0.0], [0.0, 0.8]], dtype=torch.float64))
    small, _ = clip_update(state, reference, max_norm=10.0)
    torch.testing.assert_close(small[KEYS[0]], state[KEYS[0]])
    info = _info()
    out = NormBound(max_norm=1.0).before_aggregation([ClientUpdate(0, state, 1)], global_state=reference, info=info)
    torch.testing.assert_close(out[0].state[KEYS[0]], clipped[KEYS[0]])
    assert info.metrics["update_norms"] == {"0": pytest.approx(5.0)}


def test_geometric_median_hand_cases():
    def point(x, y):
        return ({KEYS[0]: torch.tensor([x, y], dtype=torch.float64)}, 1)

    # An equilateral triangle's geometric median is its centroid.
    triangle = [point(0, 0), point(2, 0), point(1, 3 ** 0.5)]
    median, _ = geometric_median(triangle, max_iter=200, ftol=1e-12)
    torch.testing.assert_close(median[KEYS[0]], torch.tensor([1.0, 3 ** 0.5 / 3], dtype=torch.float64), atol=1e-5, rtol=0)
    # A far outlier barely moves it, unlike the mean.
    cluster = [point(0, 0), point(1, 0), point(0, 1), point(1, 1), point(1000, 1000)]
    median, _ = geometric_median(cluster, max_iter=100, ftol=1e-12)
    assert float(median[KEYS[0]].norm()) < 2.0


def test_composition_chains_clipping_into_the_median():
    reference = {KEYS[0]: torch.zeros(3, dtype=torch.float64)}
    states = [{KEYS[0]: torch.tensor(v, dtype=torch.float64)} for v in ([3.0, 0, 0], [0, 0.5, 0], [0, 0, 100.0])]
    updates = [ClientUpdate(i, s, 1) for i, s in enumerate(states)]
    both = Composition([NormBound(max_norm=1.0), Median()])
    info = _info()
    out = both.aggregate(both.before_aggregation(updates, global_state=reference, info=info), info=info)
    torch.testing.assert_close(out[KEYS[0]], torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64))
    assert both.name == "norm_bound+median" and both.needs_individual_updates and not both.hides_uploads
    with pytest.raises(FedleakError, match="cannot be combined"):
        Composition([SecAgg(), Median()])
    with pytest.raises(FedleakError, match="both replace aggregate"):
        Composition([Krum(), Median()])
