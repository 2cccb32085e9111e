"""The curious server: how much white-box access to the updates adds over querying the models it receives.

A server holds every client's upload of every round, white-box (`attacks/updates.py`). Per training, at the
final round, the best membership attack that reads the updates (cells with access "updates": update-gradient
alignment, FedMIA) stands beside the best black-box attack on the same views: the clients' uploads, and the
global adapter (the aggregate, all a server learns under secure aggregation). Then what the updates give away
beyond membership: the tokens of each client's round data (vocabulary leakage). Cross-client PII extraction by
a semi-honest client (FedPII) closes the section: it needs no server, only the global model every client gets.
"""

from __future__ import annotations

from fedleak.reports.document import Section, Table, defense_label, fmt, is_number, view
from fedleak.reports.merge import Merged, interval, metric_text, training_key
from fedleak.reports.poisoning import distinguishable

UPDATES = "updates"
SERVER_VIEWS = ("upload", "global")
BEST_NOTE = ("Best: the cell with the largest AUC among that access's attacks on those views (over attacks and "
             "clients), an optimistic pick on both sides; each AUC carries its own 95% interval. A difference counts "
             "only where the two intervals do not overlap; otherwise it reads \"not distinguishable\".")


def access(cell: dict) -> str:
    """What the cell's attack read: "updates" or "black-box" (results written before the field: black-box)."""
    return cell.get("access") or "black-box"


def _best(cells: list[dict]) -> dict | None:
    scored = [c for c in cells if is_number(c["metrics"].get("auc"))]
    return max(scored, key=lambda c: c["metrics"]["auc"]) if scored else None


def _cell_text(cell: dict | None) -> str:
    if cell is None:
        return "not run"
    blind = "" if access(cell) == UPDATES else f"; blind {metric_text(cell, 'blind_auc')}"
    return f"{metric_text(cell, 'auc')} ({cell['attack']}, {view(cell)}{blind})"


def verdict(white: dict | None, black: dict | None) -> str:
    """Whether the update-based attack's AUC is distinguishably above (or below) the black-box one's."""
    if white is None or black is None:
        return "n/a"
    w, b = interval(white, "auc"), interval(black, "auc")
    if not w or not b:
        return "no interval"
    if w[0] > b[1]:
        return f"updates add {white['metrics']['auc'] - black['metrics']['auc']:+.3f}"
    if b[0] > w[1]:
        return f"black-box higher by {black['metrics']['auc'] - white['metrics']['auc']:.3f}"
    return "not distinguishable"


def chance(cell: dict | None) -> str:
    """Whether an AUC's interval still includes chance (0.5): the defense removed what that attack sees."""
    if cell is None:
        return "n/a"
    ci = interval(cell, "auc")
    if not ci:
        return "no interval"
    return "at chance" if ci[0] <= 0.5 <= ci[1] else "above chance" if ci[0] > 0.5 else "below chance"


def membership_rows(run: Merged) -> list[list[str]]:
    """One row per (training, server view kind) that some update-based attack probed."""
    cells = [c for c in run.of_family("membership") if c["observer"] in SERVER_VIEWS]
    trainings = dict.fromkeys(training_key(c) for c in cells if access(c) == UPDATES)
    rows = []
    for key in trainings:
        own = [c for c in cells if training_key(c) == key]
        for observer in SERVER_VIEWS:
            here = [c for c in own if c["observer"] == observer]
            white = _best([c for c in here if access(c) == UPDATES])
            if white is None:
                continue
            black = _best([c for c in here if access(c) != UPDATES])
            what = "each client's upload" if observer == "upload" else "the aggregate (global)"
            rows.append([here[0]["algorithm"], defense_label(here[0]), what, _cell_text(black), _cell_text(white),
                         verdict(white, black), chance(white)])
    return rows


def vocabulary_rows(run: Merged) -> list[list[str]]:
    """Vocabulary leakage per training and view kind: the mean over the probed views (clients) of each metric."""
    cells = [c for c in run.of_family("extraction") if c.get("attack_name") == "vocabulary"]
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((training_key(c), c["observer"]), []).append(c)
    rows = []
    for (_, observer), group in groups.items():
        mean = lambda name: _mean([c["metrics"].get(name) for c in group])
        rows.append([group[0]["algorithm"], defense_label(group[0]), observer, str(len(group)),
                     fmt(mean("precision")), fmt(mean("prior_precision")),
                     fmt(mean("token_auc")), fmt(mean("prior_token_auc")),
                     fmt(_mean([((c.get("details") or {}).get("other_uploads") or {}).get("token_auc") for c in group])),
                     fmt(mean("identifier_token_recall")), fmt(mean("prior_identifier_token_recall"))])
    return rows


PII_TYPES = ("name", "mrn", "phone", "dob", "secret")


def fedpii_rows(run: Merged) -> list[list[str]]:
    """FedPII per training, attack setting and round: coverage with its interval, per type, the controls, the
    coverage against each control by their intervals (`reports.poisoning.distinguishable`), queries."""
    cells = sorted((c for c in run.of_family("extraction", every_round=True) if c.get("attack_name") == "fedpii"),
                   key=lambda c: (training_key(c), c["attack"], c["round"]))
    versus = lambda c, control: distinguishable(interval(c, "coverage"), interval(c, control))
    return [[c["algorithm"], defense_label(c), c["attack"], fmt(c["round"]), metric_text(c, "coverage"),
             *[metric_text(c, f"coverage_{t}") for t in PII_TYPES], metric_text(c, "control_coverage"),
             metric_text(c, "base_coverage"), f"{versus(c, 'control_coverage')} / {versus(c, 'base_coverage')}",
             fmt(c["metrics"].get("efficiency")), fmt(c["metrics"].get("queries"), 0)]
            for c in cells]


def _mean(values: list) -> float | None:
    numbers = [v for v in values if is_number(v)]
    return sum(numbers) / len(numbers) if numbers else None


def server_section(run: Merged) -> Section | None:
    """The curious-server section; None when no update-based attack, vocabulary or FedPII cell ran."""
    blocks: list = []
    rows = membership_rows(run)
    if rows:
        blocks += [
            "Membership inference by the server: the best attack that reads the updates against the best black-box "
            "attack on the same views, final round. " + BEST_NOTE + " \"At chance\": the update-based attack's "
            "interval includes 0.5, so under that defense the updates tell the server nothing it can measure about "
            "membership.",
            Table(["algorithm", "defense", "server's view", "best black-box AUC [95% CI]",
                   "best update-based AUC [95% CI]", "white-box access", "update-based vs chance"], rows)]
    vocab = vocabulary_rows(run)
    if vocab:
        blocks += [
            "Vocabulary leakage from the updates: which tokens occurred in a client's round data, read from its "
            "update (the aggregate's on the global view), against a prior that ranks tokens by their frequency in the "
            "attacker's public text without looking at the update. Precision at k = the size of the true bag of "
            "tokens (so it equals the recall at k); identifier tokens: the share of the tokens of the clients' identifiers in the top k. "
            "Means over the probed views.",
            "\"Other uploads\": the same token AUC read from the other clients' uploads of the round against this "
            "client's tokens; what a client's own update adds is the gap to it, the rest is the domain's vocabulary.",
            Table(["algorithm", "defense", "view", "views", "precision@k", "prior precision@k", "token AUC",
                   "prior token AUC", "other uploads' token AUC", "identifier tokens", "prior identifier tokens"], vocab)]
    pii = fedpii_rows(run)
    if pii:
        blocks += [
            "Cross-client PII extraction by a semi-honest client (FedPII): one participating client prompts the global "
            "model of each round with prefixes from its own records, sampled by frequency, and counts the other "
            "clients' identifiers written out verbatim. Coverage: the share of those identifiers recovered (95% "
            "Clopper-Pearson interval), per type; control: the same count on identifiers no client trained on "
            "(held-out patients, reference canaries); base: the same queries to the base model. Coverage is "
            "memorisation only as far as it exceeds both controls: \"vs control / base\" reads \"higher\" (or "
            "\"lower\") only where the coverage's interval lies above (below) that control's, \"not "
            "distinguishable\" where they overlap, \"n/a\" where a control did not run. Names and dates of birth can "
            "be guessed off the generator's lists; six-digit codes and record numbers practically cannot.",
            Table(["algorithm", "defense", "attack", "round", "coverage", *PII_TYPES, "control", "base model",
                   "vs control / base", "recovered per query", "queries"], pii)]
    return Section("The curious server", blocks) if blocks else None
