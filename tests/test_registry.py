import pytest

from fedleak.attacks.base import ATTACKS
from fedleak.defenses.base import DEFENSES, Defense
from fedleak.federated.registry import Registry, RegistryError


def test_builtins_are_registered():
    assert {"none", "median"} <= set(DEFENSES.names())
    assert "loss" in ATTACKS.names()


def test_duplicate_names_are_refused():
    registry = Registry("defense", base=Defense)

    @registry.register("x")
    class A(Defense):
        pass

    with pytest.raises(RegistryError, match="already registered"):
        @registry.register("x")
        class B(Defense):
            pass

    assert registry.get("x") is A


def test_unknown_name_suggests_the_closest_and_lists_all():
    with pytest.raises(RegistryError, match=r"did you mean 'median'\? available: .*median.*none"):
        DEFENSES.get("medain")
    with pytest.raises(RegistryError, match="available: adversarial_prompt, adversarial_trigger, alie, backdoor, con_recall, dc_pdd, discoverable, exposure, fedmia, fedpii, .*, loss, lowercase, min_k, min_k_pp, pii, recall, reference, rmia, scaling, sign_flip, spv_mia, update_gradient, vocabulary, zlib"):
        ATTACKS.get("zzz")
