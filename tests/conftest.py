import os
import re
from pathlib import Path

import pytest

# Hub downloads fail on these machines and in CI: everything must work offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `make test`'s two workers each takes one core, it and the fedleak processes it starts: two OpenMP
    # threads per worker on 2 cores spin-wait on each other (measured: a FEDPIT training test 6 s alone, 184 s so).
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent

# A small embedded build: pretrained enough for LoRA to learn and memorise, built in 25 s on a fast 2-core CPU, 67 s
# (two threads) to 103 s (one) on a 2-core AMD EPYC, whose two builds were bit-identical.
SMALL_MODEL = {"pretrain_steps": 200, "public_records": 2000}


@pytest.fixture(scope="session", autouse=True)
def model_cache(request, tmp_path_factory):
    """Embedded models are keyed by a hash of their settings and corpus, so a cache kept in
    .pytest_cache between runs is safe; FEDLEAK_TEST_CACHE can point elsewhere."""
    cache = os.environ.get("FEDLEAK_TEST_CACHE")
    path = Path(cache) if cache else Path(request.config.cache.mkdir("fedleak-models"))
    os.environ["FEDLEAK_CACHE"] = str(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny matrices gain
    little from a second thread and lose a lot when another process holds the other core (OpenMP threads wait on
    each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_path(small_model_path, tmp_path_factory):
    """`family -> folder` of a tiny random instance of a real architecture (tests/tiny_archs.py), built
    once per session with the small embedded model's tokenizer."""
    from tests.tiny_archs import build_tiny

    root = tmp_path_factory.mktemp("tiny-archs")
    return lambda family: build_tiny(family, root / family, tokenizer_from=small_model_path)


@pytest.fixture(scope="module")
def embedded(small_model_path):
    """(model, tokenizer) of the small embedded model, loaded once per test module."""
    from fedleak.federated.model import load_base_model

    return load_base_model(small_model_path)


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    """`family -> (model, tokenizer)` of a tiny architecture, loaded anew on each call."""
    from fedleak.federated.model import load_base_model

    return lambda family: load_base_model(tiny_model_path(family))


@pytest.fixture(scope="session")
def small_model_path(model_cache):
    import fcntl

    from fedleak.federated.embedded import EmbeddedModelConfig, build_embedded

    import torch

    # One build for both pytest-xdist workers: the second waits for the first's, then finds it cached. Both need the
    # model within seconds of the session's start, so the waiting worker's core is mostly idle: the build takes it
    # (two threads: 67 s instead of 103 s on a 2-core AMD EPYC).
    with open(model_cache / ".small-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(before, min(2, cores)))
        try:
            return build_embedded(EmbeddedModelConfig(**SMALL_MODEL))
        finally:
            torch.set_num_threads(before)


# `make test` runs two pytest-xdist workers, scheduled here by module: all of a module's tests go to one worker, so
# its module-scoped fixtures (one end-to-end run serving many assertions) run once; the modules that start servers
# (Flower's SuperLink and SuperNodes, a Ray cluster, Flower's Ray-based Simulation Engine, chromium) form one unit so
# they never overlap in ports, Ray sessions or time limits; the modules on the session's shared FEDIT federation
# (tests/frontier.py) form another so it trains once. (xdist's --dist loadgroup would do this from marks, but
# xdist 3.8 writes the group into `item._nodeid`, which pytest 9 no longer reads.)
PROCESS_MODULES = {"test_flower", "test_flower_deployment", "test_ray_executor", "test_browser"}
LONGEST_FIRST = ("processes", "frontier", "test_end_to_end", "test_matrix_runs", "test_architectures", "test_algorithms",
                 "test_poisoning", "test_plugins", "test_adaptations", "test_membership_truth", "test_sweep", "test_dp_budget")


def _frontier_modules() -> set[str]:
    uses = re.compile(r"^def test_\w+\([^)]*\bfrontier\b", re.M)
    return {p.stem for p in Path(__file__).parent.glob("test_*.py") if uses.search(p.read_text())}


@pytest.hookimpl(optionalhook=True)  # pytest without xdist, or with -p no:xdist, has no such hook
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") not in ("load", "loadscope"):
        return None  # a --dist the user chose (each, loadfile, ...) is xdist's
    from xdist.scheduler import LoadScopeScheduling

    frontier = _frontier_modules()

    class ModuleUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = Path(nodeid.split("::", 1)[0]).stem
            return "processes" if module in PROCESS_MODULES else "frontier" if module in frontier else module

        def _assign_work_unit(self, node) -> None:
            # The longest units first (measured on one torch thread beside the other worker, before 2ca4b7f's
            # trims: processes ~1100 s without Ray's tests, frontier ~340 s, the end-to-end run ~490 s, the matrix
            # runs ~330 s), so neither worker is left with one at the end.
            if not getattr(self, "_ordered", False):
                rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
                ordered = sorted(self.workqueue.items(), key=lambda item: rank.get(item[0], len(rank)))
                self.workqueue.clear()
                self.workqueue.update(ordered)
                self._ordered = True
            super()._assign_work_unit(node)

    return ModuleUnits(config, log)


@pytest.fixture(scope="session")
def tiny_run_config(small_model_path) -> str:
    """The head of a config for a matrix that runs in seconds; tests append a [matrix] table."""
    return """
[model.embedded]
pretrain_steps = 200
public_records = 2000
[data.embedded]
private_records = 30
heldout_records = 12
canaries_per_repetition = 0
[federation]
rounds = 2
local_epochs = 1
min_records_per_client = 2
[utility]
records = 4
max_new_tokens = 8
"""


@pytest.fixture(scope="session")
def frontier(small_model_path, tmp_path_factory):
    """A small FEDIT federation (defenses none and secagg) trained once per session (tests/frontier.py)."""
    from tests.frontier import Frontier

    return Frontier(tmp_path_factory.mktemp("frontier"))


@pytest.fixture(scope="session")
def flower_inprocess(small_model_path, tmp_path_factory, tiny_run_config) -> Path:
    """The in-process run both Flower modules compare with (tests/flower_reference.py), trained once per session:
    both modules are on one worker."""
    from tests.flower_reference import run_inprocess

    return run_inprocess(tmp_path_factory.mktemp("flower-reference"), tiny_run_config)
