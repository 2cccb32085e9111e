"""Names that the results files and every layer share: the evaluation writes them into results.json
and the report reads them back, so they are defined once here (no torch, nothing heavy)."""

CLEAN = "clean"  # the scenario with no malicious client, trained for every (algorithm, defense)
NO_DEFENSE = "none"  # the defense axis's baseline
OBSERVERS = ("global", "upload", "client")  # the views a checkpoint folder holds, in report order
CHANCE_AUC = 0.5

# Fields that identify a cell or a training across seeds (results.json's aggregates group by them).
CELL_GROUP = ("algorithm", "defense", "scenario", "attack", "family", "observer", "client", "round")
TRAINING_GROUP = ("algorithm", "defense", "scenario")

# Regexes for the identifier formats of fedleak's synthetic data (federated/data.py), in the order a report's
# redaction tries them; results.json records them (eval/identifiers.py) and reports fall back on them.
IDENTIFIER_FORMATS = (
    r"\d{4}-\d{2}-\d{2}",  # date of birth
    r"\d{3}-\d{3}(?:-\d+)*",  # phone number 555-DDD-DDDD, also cut short or run on in model output
    r"\d{6,}",  # record number (8 digits), canary secret (6 digits), also glued to letters
)
