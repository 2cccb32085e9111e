"""The report's curious-server section (reports/server.py): the best update-based membership attack beside the
best black-box one on the same server views, verdicts only where the intervals separate."""

from __future__ import annotations

from fedleak.reports.merge import merged
from fedleak.reports.render import render_markdown
from fedleak.reports.report import build_document
from fedleak.reports.server import membership_rows, server_section


def _cell(defense, attack, observer, client, auc, low, high, *, access=None, rnd=3):
    cell = {"algorithm": "fedit", "defense": defense, "scenario": "clean", "seed": 0, "attack": attack,
            "attack_name": attack, "family": "membership", "observer": observer, "client": client, "round": rnd,
            "metrics": {"auc": auc, "auc_low": low, "auc_high": high, "blind_auc": 0.5, "blind_auc_low": 0.4,
                        "blind_auc_high": 0.6},
            "n_members": 40, "n_nonmembers": 40, "cost": {"wall_seconds": 1.0}}
    if access:
        cell["access"] = access
    return cell


def _results(cells):
    trainings = [{"algorithm": "fedit", "defense": d, "scenario": "clean", "seed": 0, "rounds": [{"round": r} for r in (1, 2, 3)]}
                 for d in dict.fromkeys(c["defense"] for c in cells)]
    return {"schema": "fedleak-results/4", "seed": 0, "cells": cells, "trainings": trainings}


CELLS = [
    # FedAvg: the updates separate members far better than querying the uploads.
    _cell("none", "loss", "upload", 0, 0.70, 0.62, 0.78),
    _cell("none", "loss", "upload", 1, 0.74, 0.66, 0.80),  # the best black-box cell
    _cell("none", "update_gradient", "upload", 0, 0.93, 0.88, 0.97, access="updates"),
    _cell("none", "update_gradient", "upload", 0, 0.99, 0.97, 1.0, access="updates", rnd=2),  # not the final round
    # DP-SGD: both at chance, not distinguishable.
    _cell("dp_sgd", "loss", "upload", 0, 0.55, 0.45, 0.64),
    _cell("dp_sgd", "update_gradient", "upload", 0, 0.52, 0.43, 0.61, access="updates"),
    # Secure aggregation: no upload view; the aggregate only.
    _cell("secagg", "loss", "global", None, 0.66, 0.58, 0.73),
    _cell("secagg", "update_gradient", "global", None, 0.60, 0.52, 0.69, access="updates"),
    # A training no update-based attack probed has no row.
    _cell("median", "loss", "upload", 0, 0.8, 0.7, 0.9),
]


def test_rows_compare_the_best_of_each_access_at_the_final_round():
    rows = {(r[1], r[2]): r for r in membership_rows(merged(_results(CELLS)))}
    assert set(rows) == {("none", "each client's upload"), ("dp_sgd", "each client's upload"),
                         ("secagg", "the aggregate (global)")}
    none = rows["none", "each client's upload"]
    assert none[3].startswith("0.740 [0.660, 0.800] (loss, upload/1")
    assert none[4].startswith("0.930 [0.880, 0.970] (update_gradient, upload/0")  # round 2's 0.99 is not final
    assert none[5] == "updates add +0.190"
    assert none[6] == "above chance"
    dp = rows["dp_sgd", "each client's upload"]
    assert dp[5] == "not distinguishable" and dp[6] == "at chance"
    assert rows["secagg", "the aggregate (global)"][5] == "not distinguishable"


def test_black_box_higher_is_said_and_old_cells_count_as_black_box():
    cells = [_cell("none", "zlib", "global", None, 0.9, 0.85, 0.95),
             _cell("none", "update_gradient", "global", None, 0.6, 0.5, 0.7, access="updates")]
    (row,) = membership_rows(merged(_results(cells)))
    assert row[5] == "black-box higher by 0.300"


def test_the_section_renders_and_is_absent_without_update_attacks():
    text = render_markdown(build_document(_results(CELLS)))
    assert "## The curious server" in text and "updates add +0.190" in text
    assert server_section(merged(_results([c for c in CELLS if "access" not in c]))) is None


def _extraction(name, rnd, metrics, observer="global", client=None, details=None):
    return {"algorithm": "fedit", "defense": "none", "scenario": "clean", "seed": 0, "attack": name,
            "attack_name": name, "family": "extraction", "access": "updates" if name == "vocabulary" else "black-box",
            "observer": observer, "client": client, "round": rnd, "metrics": metrics, "details": details or {},
            "cost": {"wall_seconds": 1.0}}


def test_vocabulary_and_fedpii_tables():
    from fedleak.reports.server import fedpii_rows, vocabulary_rows

    vocab = [_extraction("vocabulary", 3, {"precision": p, "prior_precision": 0.6, "token_auc": a, "prior_token_auc": 0.88,
                                           "identifier_token_recall": 0.4, "prior_identifier_token_recall": 0.2},
                         observer="upload", client=c, details={"other_uploads": {"token_auc": o}})
             for c, (p, a, o) in enumerate([(0.5, 0.7, 0.6), (0.3, 0.8, 0.7)])]
    pii = [_extraction("fedpii", r, {"coverage": cov, "coverage_low": low, "coverage_high": cov + 0.1,
                                     "coverage_secret": 1.0, "control_coverage": 0.0, "control_coverage_low": 0.0,
                                     "control_coverage_high": 0.02, "base_coverage": base, "base_coverage_low": base - 0.05,
                                     "base_coverage_high": base + 0.05, "efficiency": cov / 10, "queries": 96.0})
           for r, cov, low, base in ((3, 0.2, 0.1, 0.5), (1, 0.05, 0.0, 0.05))]
    run = merged(_results(CELLS + vocab + pii))
    (row,) = vocabulary_rows(run)
    assert row[2:] == ["upload", "2", "0.400", "0.600", "0.750", "0.880", "0.650", "0.400", "0.200"]
    rows = fedpii_rows(run)
    assert [r[3] for r in rows] == ["1", "3"]  # every round, in order
    assert rows[1][4] == "0.200 [0.100, 0.300]" and rows[1][9] == "1.000" and rows[1][-1] == "96"
    # Above the held-out control's interval only in round 3, where the base model writes more (its interval is above).
    assert [r[12] for r in rows] == ["not distinguishable / not distinguishable", "higher / lower"]
    text = render_markdown(build_document(_results(CELLS + vocab + pii)))
    assert "Cross-client PII extraction" in text and "other uploads' token AUC" in text
