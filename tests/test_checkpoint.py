import json

import pytest
import torch

from fedleak.federated import checkpoint
from fedleak.common.errors import FedleakError


def _state(value):
    return {"base_model.model.layer.lora_A.weight": torch.full((2, 3), value),
            "base_model.model.layer.lora_B.weight": torch.arange(6.0).view(3, 2) * value}


def test_round_trip_of_every_view(tmp_path):
    files = {"global": _state(1.0), "upload-client-00": _state(2.0), "local-client-00": _state(3.0)}
    views = {"global": {"default": "global"}, "upload/0": {"default": "upload-client-00"},
             "client/0": {"default": "global", "local": "local-client-00"}}
    folder = checkpoint.write_round(tmp_path, 2, files=files, views=views, num_examples={0: 10},
                                    config_hash="abc", extra={"clients": [0]})
    manifest = checkpoint.read_manifest(folder)
    assert manifest["round"] == 2 and manifest["clients"] == [0] and manifest["config_hash"] == "abc"
    assert manifest["num_examples"] == {"0": 10} and checkpoint.available_views(folder) == list(views)
    expected = {("global", None): {"default": 1.0}, ("upload", 0): {"default": 2.0},
                ("client", 0): {"default": 1.0, "local": 3.0}}
    for (observer, client), adapters in expected.items():
        loaded = checkpoint.load_view(folder, observer, client)
        assert list(loaded) == list(adapters)
        for name, value in adapters.items():
            for key, tensor in _state(value).items():
                torch.testing.assert_close(loaded[name][key], tensor, rtol=0, atol=0)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{stem}.safetensors" for stem in files] + ["manifest.json"])
    assert checkpoint.rounds(tmp_path) == [2]
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def _global_only(tmp_path):
    return checkpoint.write_round(tmp_path, 1, files={"global": _state(1.0)}, views={"global": {"default": "global"}},
                                  num_examples={}, config_hash="h")


def test_a_view_must_name_written_files(tmp_path):
    with pytest.raises(ValueError, match="unknown files"):
        checkpoint.write_round(tmp_path, 1, files={}, views={"global": {"default": "global"}}, num_examples={},
                               config_hash="h")


def test_tampered_file_is_detected(tmp_path):
    folder = _global_only(tmp_path)
    from safetensors.torch import save_file

    save_file(_state(9.0), str(folder / "global.safetensors"))
    with pytest.raises(FedleakError, match="sha256 does not match"):
        checkpoint.load_view(folder, "global")


def test_missing_manifest_view_and_format_errors(tmp_path):
    folder = _global_only(tmp_path)
    with pytest.raises(FedleakError, match="no view 'upload/5': available views are global"):
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


def test_a_view_missing_an_adapter_tensor_is_refused_not_mixed_with_the_previous_view(tmp_path, small_model_path):
    from fedleak.federated.adapters import LoraSettings, add_peft_adapter, get_adapter_state
    from fedleak.federated.model import load_base_model

    settings = LoraSettings(r=2, alpha=4)
    model = add_peft_adapter(load_base_model(small_model_path)[0], settings, seed=0)
    full = {k: torch.full_like(v, 0.5) for k, v in get_adapter_state(model).items()}
    dropped = sorted(full)[3]
    partial = {k: torch.zeros_like(v) for k, v in full.items() if k != dropped}
    folder = checkpoint.write_round(tmp_path, 1, files={"full": full, "partial": partial},
                                    views={"global": {"default": "partial"}, "upload/0": {"default": "full"}},
                                    num_examples={0: 1}, config_hash="h")
    checkpoint.apply_saved_view(model, folder, "upload", 0, settings)
    assert all(torch.equal(v, full[k]) for k, v in get_adapter_state(model).items())
    with pytest.raises(FedleakError) as raised:
        checkpoint.apply_saved_view(model, folder, "global", None, settings)
    assert str(raised.value) == (f"{folder / 'partial.safetensors'} lacks 1 of the adapter's {len(full)} tensors "
                                 f"(first: {dropped}): restore the file or rerun the training")


def _with_file(tmp_path, data: bytes, name: str):
    """A round whose global view is `data` under `name`, its sha256 in the manifest matching."""
    folder = _global_only(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / name).write_bytes(data)
    manifest["files"]["global"] = {"path": name, "sha256": checkpoint.sha256_bytes(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_corrupt_safetensors_header_is_refused_naming_the_file(tmp_path):
    good = (_global_only(tmp_path / "good") / "global.safetensors").read_bytes()
    folder = _with_file(tmp_path, (10 ** 12).to_bytes(8, "little") + good[8:], "broken.safetensors")
    with pytest.raises(FedleakError, match=r"broken.safetensors: not a valid safetensors file \(.*\): restore it"):
        checkpoint.verify_round(folder)


def test_a_pickle_is_never_opened_even_with_a_matching_sha256(tmp_path, monkeypatch):
    import pickle

    folder = _with_file(tmp_path, pickle.dumps({"w": 1}), "adapter_model.bin")
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(FedleakError, match=r"manifest.json: files.global.path = 'adapter_model.bin' is not a "
                                           r".safetensors file: fedleak never loads pickle files"):
        checkpoint.load_view(folder, "global")


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["files"]["global"].update(path="../outside.safetensors"), "leaves the round folder"),
    (lambda m: m["files"]["global"].update(sha256=5), r"files.global must be \{\"path\""),
    (lambda m: m["views"]["global"].update(default="absent"), "views.global.default = 'absent' is not in files"),
    (lambda m: m.update(clients=[0, -1]), "field 'clients' = .* is not a list of client indices"),
])
def test_manifest_fields_are_checked_before_any_file_is_read(tmp_path, edit, expected):
    folder = _global_only(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FedleakError, match=expected):
        checkpoint.read_manifest(folder)
    (folder / "manifest.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(FedleakError, match="is not UTF-8 JSON text"):
        checkpoint.read_manifest(folder)
