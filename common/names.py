"""Names that the results files and every layer share: the evaluation writes them into results.json
and the report reads them back, so they are defined once here (no torch, nothing heavy)."""

CLEAN = "clean"  # the scenario with no malicious client, trained for every (algorithm, defense)
NO_DEFENSE = "none"  # the defense axis's baseline
OBSERVERS = ("global", "upload", "client")  # the views a checkpoint folder holds, in report order
CHANCE_AUC = 0.5

# Fields that identify a cell or a training across seeds (results.json's aggregates group by them).
CELL_GROUP = ("algorithm", "defense", "scenario", "attack", "family", "observer", "client", "round")
TRAINING_GROUP = ("algorithm", "defense", "scenario")
