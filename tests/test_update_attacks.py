"""The curious server's update attacks: update_gradient (gradient-update alignment) and FedMIA.

Formulas by hand (cosine, projection against an explicit QR basis, FedMIA's one-sided Gaussian test against
scipy), the gradient dots against finite differences on the shared frontier training, the refusals, and
one end-to-end run on the frontier federation (tests/frontier.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fedleak.attacks.base import ATTACKS, Target
from fedleak.attacks.membership.fedmia import FedMIAAttack, fedmia_scores
from fedleak.attacks.membership.stats import compute_stats
from fedleak.attacks.membership.update_gradient import (UpdateGradientAttack, cosines, projection_share,
                                                        round_gradients)
from fedleak.attacks.updates import ServerRecord, flat
from fedleak.common.errors import FedleakError
from fedleak.federated.data import Record


def test_cosine_is_the_update_against_minus_the_gradient():
    # g . Delta for g = (1, 0) with Delta = (-2, 0), (0, 3), (2, 2): cos(-g, Delta) = 1, 0, -1/sqrt(2).
    dots = np.array([-2.0, 0.0, 2.0])
    got = [cosines(np.array([d]), np.array([1.0]), n)[0] for d, n in zip(dots, [2.0, 3.0, np.sqrt(8)])]
    np.testing.assert_allclose(got, [1.0, 0.0, -1 / np.sqrt(2)])
    assert cosines(np.array([1.0]), np.array([0.0]), 1.0)[0] == 0.0  # no scored token: no direction


def test_projection_share_matches_an_explicit_qr_basis():
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(3, 12))  # K updates in P = 12 dimensions
    grads = rng.normal(size=(5, 12))
    q, _ = np.linalg.qr(updates.T)  # orthonormal basis of the span
    expected = np.linalg.norm(grads @ q, axis=1) / np.linalg.norm(grads, axis=1)
    got = projection_share(grads @ updates.T, updates @ updates.T, np.linalg.norm(grads, axis=1))
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # A repeated update adds no dimension; a gradient inside the span scores 1, one orthogonal to it 0.
    doubled = np.vstack([updates, updates[:1]])
    np.testing.assert_allclose(projection_share(grads @ doubled.T, doubled @ doubled.T,
                                                np.linalg.norm(grads, axis=1)), expected, rtol=1e-8)
    inside, outside = updates.T @ [1.0, -2.0, 0.5], grads[0] - q @ (q.T @ grads[0])
    both = np.vstack([inside, outside])
    np.testing.assert_allclose(projection_share(both @ updates.T, updates @ updates.T, np.linalg.norm(both, axis=1)),
                               [1.0, 0.0], atol=1e-10)


# FedMIA by hand: 2 rounds, 3 records; the target's statistic and 2 other clients' per round.
OBSERVED = np.array([[-1.0, -2.0, -1.5],
                     [-0.8, -2.5, -1.1]])
REFERENCE = np.array([[[-1.4, -2.1, -1.3], [-1.2, -1.9, -1.9]],
                      [[-1.0, -2.0, -1.6], [-1.3, -2.2, -1.2]]])


def test_fedmia_is_the_mean_over_rounds_of_the_one_sided_gaussian_test():
    mu, sd = REFERENCE.mean(axis=1), REFERENCE.std(axis=1)  # ddof = 0, as the authors' code
    expected = norm.cdf(OBSERVED, loc=mu, scale=sd).mean(axis=0)
    np.testing.assert_allclose(fedmia_scores(OBSERVED, REFERENCE), expected, rtol=1e-12)
    # Pooled: each round's variance is the mean over records of the per-record variances.
    pooled = np.sqrt((REFERENCE.var(axis=1)).mean(axis=1, keepdims=True))
    np.testing.assert_allclose(fedmia_scores(OBSERVED, REFERENCE, global_variance=True),
                               norm.cdf(OBSERVED, loc=mu, scale=pooled).mean(axis=0), rtol=1e-12)


def test_fedmia_ignores_a_client_missing_from_a_round_and_survives_identical_references():
    padded = np.concatenate([REFERENCE, np.full((2, 1, 3), np.nan)], axis=1)
    padded[1, 2] = [-1.1, -2.1, -1.4]  # a third client uploads in round 2 only
    mu1, sd1 = REFERENCE[0].mean(0), REFERENCE[0].std(0)
    mu2, sd2 = padded[1].mean(0), padded[1].std(0)
    expected = (norm.cdf(OBSERVED[0], mu1, sd1) + norm.cdf(OBSERVED[1], mu2, sd2)) / 2
    np.testing.assert_allclose(fedmia_scores(OBSERVED, padded), expected, rtol=1e-12)
    same = np.repeat(OBSERVED[:, None, :], 2, axis=1)  # zero variance and no difference: the test's midpoint
    np.testing.assert_allclose(fedmia_scores(OBSERVED, same), 0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        fedmia_scores(OBSERVED[:1], REFERENCE)


class _Server:
    """What the refusals read of a server's record."""

    training_dir = Path("nowhere")

    def __init__(self, clients, hides_uploads=False):
        self._clients, self.hides_uploads = clients, hides_uploads

    def clients(self, rnd):
        return self._clients

    def available(self, rnd, view):
        return True


def _stub(observer="upload", client=0, rnd=2, server=None) -> Target:
    return Target(model=torch.nn.Linear(1, 1), tokenizer=None, observer=observer, client=client, round=rnd,
                  server=server if server is not None else _Server([0, 1]))


RECORDS = [Record("Summarise the visit.", "", "Patient seen, vitals normal.", "visit", f"r{i}") for i in range(2)]


def test_refusals_name_the_attack_and_the_fix():
    with pytest.raises(FedleakError, match=r"^attack update_gradient: observer 'client' is not a server view"):
        UpdateGradientAttack().score(_stub("client"), RECORDS)
    with pytest.raises(FedleakError, match=r"^attack fedmia: observer 'global'.*observers = \[\"upload\"\]"):
        FedMIAAttack().score(_stub("global", client=None), RECORDS)
    with pytest.raises(FedleakError, match=r"^attack fedmia: secure aggregation hides"):
        FedMIAAttack().score(_stub(server=_Server([], hides_uploads=True)), RECORDS)
    with pytest.raises(FedleakError, match=r"^attack fedmia: no other client's upload accompanies client 0"):
        FedMIAAttack().score(_stub(server=_Server([0])), RECORDS)
    bare = _stub()
    bare.server = None
    for attack in (UpdateGradientAttack(), FedMIAAttack()):
        with pytest.raises(FedleakError, match=r"Target\.server"):
            attack.score(bare, RECORDS)
        assert np.isnan(attack.score(_stub(rnd=0), RECORDS)).all()  # round 0: no update, metrics undefined


@pytest.mark.parametrize("name, kwargs, param", [
    ("update_gradient", {"similarity": "dot"}, "similarity"),
    ("update_gradient", {"history": "last"}, "history"),
    ("fedmia", {"statistic": "hinge"}, "statistic"),
    ("fedmia", {"global_variance": "yes"}, "global_variance"),
])
def test_bad_params_are_refused(name, kwargs, param):
    with pytest.raises(FedleakError, match=rf"{param}"):
        ATTACKS.get(name)(**kwargs)
    assert ATTACKS.get(name).access == "updates"


@pytest.fixture(scope="module")
def server_view(frontier, small_model_path):
    """Client 0's round-3 upload of the frontier's FEDIT/none training, as eval/attacking.py builds it."""
    from fedleak.eval.config import load_config
    from fedleak.federated import checkpoint
    from fedleak.federated.adapters import add_peft_adapter
    from fedleak.federated.model import load_base_model

    cfg = load_config(frontier.root / "run.toml")
    model, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(model, cfg.model.adapter, seed=0)
    training = frontier.training_dir("none")
    checkpoint.apply_saved_view(model, checkpoint.round_dir(training, 3), "upload", 0, cfg.model.adapter)
    server = ServerRecord(training, cfg.model.adapter)
    return Target(model=model, tokenizer=tokenizer, observer="upload", client=0, round=3,
                  max_length=cfg.federation.max_length, server=server)


def test_gradient_dots_are_the_loss_slope_along_each_update_at_the_rounds_start(server_view):
    """g . Delta at global(2) against a central difference of the loss along Delta: the gradient is taken
    where the round started, in the update's coordinates; the scores are the cosines of -g with them."""
    target, server = server_view, server_view.server
    records = [Record("Summarise the visit.", "", "Patient Ana Silva (MRN 12345678) was seen on 2020-01-02.",
                      "visit", "fd-0"), Record("Give the phone.", "", "Call 555-123-4567.", "contact", "fd-1")]
    cache, dots, norms = round_gradients(target, server, records, 3)
    start = server.state(2, "global")
    for view in ("upload/0", "global"):
        j = cache.index(3, view)
        update = server.update(3, view)
        assert cache.norms_of_rows[j] == pytest.approx(float(flat(update).norm()), rel=1e-12)
        eps, losses = 1e-3, []
        for sign in (1, -1):
            with server.viewing(target, {k: start[k] + sign * eps * update[k] for k in start}):
                losses.append(compute_stats(target.model, target.tokenizer, records, max_length=target.max_length,
                                            response_only=True, batch_size=8).loss)
        np.testing.assert_allclose(dots[:, j], (losses[0] - losses[1]) / (2 * eps), rtol=2e-2)
    np.testing.assert_allclose(UpdateGradientAttack().score(target, records),
                               -dots[:, cache.index(3, "upload/0")] / (norms * cache.norms_of_rows[cache.index(3, "upload/0")]))


def test_update_attacks_beat_chance_on_fedit_uploads_and_read_the_aggregate_under_secagg(frontier):
    """Measured (seed 0): update_gradient AUC 0.78 / 0.90 / 0.67 on uploads 0-2 (LOSS 0.82 / 0.68 / 0.75), 0.63 on
    the global view with or without secure aggregation (LOSS 0.64); FedMIA 0.80 / 0.66 / 0.76."""
    cells = frontier.cells('{ name = "update_gradient", observers = ["global", "upload"], rounds = [0, 3] }, '
                           '{ name = "fedmia", observers = ["upload"] }')
    final = [c for c in cells if c["round"] == 3]
    for name in ("update_gradient", "fedmia"):
        uploads = [c for c in final if c["attack"] == name and c["defense"] == "none" and c["observer"] == "upload"]
        aucs = [c["metrics"]["auc"] for c in uploads]
        assert len(aucs) == 3 and min(aucs) > 0.6 and np.mean(aucs) > 0.7, (name, aucs)
        # No blind baseline (the base model has no update), and the cell says why.
        assert all(c["access"] == "updates" and "blind_auc" not in c["metrics"] and "server's updates" in c["blind_note"]
                   for c in uploads)
    for defense in ("none", "secagg"):  # the aggregate update: all a server learns under secure aggregation
        (aggregate,) = [c for c in final if c["observer"] == "global" and c["defense"] == defense]
        assert aggregate["metrics"]["auc"] > 0.58 and "error" not in aggregate, aggregate["metrics"]
    assert not [c for c in final if c["attack"] == "fedmia" and c["defense"] == "secagg"]  # no uploads to read
    (start,) = [c for c in cells if c["round"] == 0 and c["defense"] == "none"]
    assert start["metrics"]["auc"] is None or np.isnan(start["metrics"]["auc"])
    assert "metrics undefined" in start["error"] and "no update to read" in start["error"]
