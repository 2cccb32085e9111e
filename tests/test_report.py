"""Rendering from a results dict alone: model text is escaped, numbers appear in both formats."""

from fedleak.reports.report import build_document, fmt, render_html, render_markdown


def _results():
    cell = {"algorithm": "fedpit", "defense": "none", "attack": "loss", "family": "membership", "observer": "global",
            "client": None, "round": 2, "metrics": {"auc": 0.61234, "tpr@0.01fpr": 0.1, "tpr@0.001fpr": 0.05},
            "n_members": 10, "n_nonmembers": 10, "roc": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.7, 1.0]}}
    training = {"algorithm": "fedpit", "defense": "none", "train_seconds": 1.0, "privacy": None,
                "utility": {"records": 4, "clients": {}, "global": {"loss": 1.23456, "perplexity": 3.4, "rouge_l": 0.5}},
                "synthetic": {"candidates": 4, "accepted": 1},
                "synthetic_examples": [{"instruction": "<script>alert(1)</script> | pipe", "output": "a & b"}]}
    return {"schema": "fedleak-results/1", "cells": [cell], "trainings": [training], "versions": {}, "model": {}}


def test_model_text_is_escaped_and_numbers_match():
    sections = build_document(_results())
    page = render_html(sections)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &amp; b" in page
    markdown = render_markdown(sections)
    assert "\\| pipe" in markdown  # a pipe inside a cell does not break the Markdown table
    for value in (0.61234, 1.23456):
        assert fmt(value) in page and fmt(value) in markdown
    assert page.count('src="data:image/png;base64,') == 1
