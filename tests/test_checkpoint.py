import json

import pytest
import torch

from fedleak.federated import checkpoint
from fedleak.federated.errors import FedleakError


def _state(value):
    return {"base_model.model.layer.lora_A.weight": torch.full((2, 3), value),
            "base_model.model.layer.lora_B.weight": torch.arange(6.0).view(3, 2) * value}


def test_round_trip_of_every_view(tmp_path):
    folder = checkpoint.write_round(tmp_path, 2, global_state=_state(1.0), uploads={0: _state(2.0), 3: _state(3.0)},
                                    num_examples={0: 10, 3: 12}, config_hash="abc")
    manifest = checkpoint.read_manifest(folder)
    assert manifest["round"] == 2 and manifest["clients"] == [0, 3] and manifest["config_hash"] == "abc"
    assert manifest["num_examples"] == {"0": 10, "3": 12}
    for observer, client, value in (("global", None, 1.0), ("upload", 0, 2.0), ("upload", 3, 3.0)):
        loaded = checkpoint.load_view(folder, observer, client)
        for key, tensor in _state(value).items():
            torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
    assert checkpoint.rounds(tmp_path) == [2]
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_tampered_file_is_detected(tmp_path):
    folder = checkpoint.write_round(tmp_path, 1, global_state=_state(1.0), uploads={}, num_examples={}, config_hash="h")
    from safetensors.torch import save_file

    save_file(_state(9.0), str(folder / "global.safetensors"))
    with pytest.raises(FedleakError, match="sha256 does not match"):
        checkpoint.load_view(folder, "global")


def test_missing_manifest_view_and_format_errors(tmp_path):
    folder = checkpoint.write_round(tmp_path, 1, global_state=_state(1.0), uploads={}, num_examples={}, config_hash="h")
    with pytest.raises(FedleakError, match="no view 'upload/5'"):
        checkpoint.load_view(folder, "upload", 5)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format"] = "something-else"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FedleakError, match="format"):
        checkpoint.load_view(folder, "global")
    (folder / "manifest.json").unlink()
    with pytest.raises(FedleakError, match="missing"):
        checkpoint.load_view(folder, "global")
    assert checkpoint.rounds(tmp_path) == []  # an unfinished round is not listed
