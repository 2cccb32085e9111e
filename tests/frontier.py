"""One small FEDIT federation shared by the frontier attacks' end-to-end tests (attacks/updates.py and the
attacks of issue 20): trained once per session, each test runs its own attacks on the cached checkpoints
through `run_matrix`, the path `fedleak run` takes."""

from __future__ import annotations

from pathlib import Path

# The small embedded model (tests/conftest.py); 3 clients x 3 rounds x 3 local epochs memorise enough for
# LOSS to beat chance on the global view, in about 30 s on 2 cores.
BASE = """
seed = 0
[model.embedded]
pretrain_steps = 200
public_records = 2000
[data.embedded]
private_records = 60
heldout_records = 60
canary_repetitions = [1, 8]
canaries_per_repetition = 2
audit_canaries = 16
[federation]
clients = 3
rounds = 3
local_epochs = 3
batch_size = 8
lr = 5e-3
[utility]
records = 4
max_new_tokens = 8
[attack]
bootstrap = 200
public_records = 120
"""


class Frontier:
    """A FEDIT federation (defenses none and secagg) trained once; `cells` runs attacks on it."""

    def __init__(self, root: Path):
        self.root = root
        self.out = root / "out"
        self.cells("""{ name = "loss", observers = ["global", "upload", "client"] }""")

    def config_text(self, attacks: str, *, defenses: str = '["none", "secagg"]', extra: str = "") -> str:
        return (BASE + extra + f"\n[matrix]\nalgorithms = [\"fedit\"]\ndefenses = {defenses}\n"
                f"attacks = [{attacks}]\n")

    def cells(self, attacks: str, *, defenses: str = '["none", "secagg"]', extra: str = "") -> list[dict]:
        """The cells of `attacks` (TOML array items) on the shared trainings (trained on first use)."""
        from fedleak.eval.config import load_config
        from fedleak.eval.matrix import run_matrix

        path = self.root / "run.toml"
        path.write_text(self.config_text(attacks, defenses=defenses, extra=extra))
        return run_matrix(load_config(path), self.out, progress=False)["cells"]

    def training_dir(self, defense: str = "none") -> Path:
        return next(self.out.glob(f"trainings/fedit-{defense}-seed0"))
