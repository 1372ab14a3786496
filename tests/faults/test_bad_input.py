"""Bad specs and bad checkpoints: refused before any store is touched, as clean lines with exit status 2;
a checkpoint is judged from its header, never by unpickling it."""

from __future__ import annotations

import pytest
import torch
import yaml

from extract.models.config import TINY_FLAGS

from .conftest import cli, tiny_spec

BAD_SPECS = {
    "unknown key": ("features: {timestep: [10]}\n", "did you mean 'timesteps'"),
    "yaml syntax": ("model: {flags: [\n", "YAML"),
    "not a mapping": ("- just\n- a list\n", "mapping"),
    "empty file": ("", "a spec is a mapping of sections"),
    "block out of range": (None, "block 99 does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_is_refused_with_its_problems(tmp_path, case):
    text, message = BAD_SPECS[case]
    if text is None:
        text = yaml.safe_dump(tiny_spec(features={"blocks": [99]}))
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    store = tmp_path / "s.zarr"
    for args in (["spec", "check", str(spec)], ["extract", str(spec), "--store", str(store), "--no-progress"]):
        result = cli(*args)
        assert result.exit_code == 2, (case, result.output)
        assert message in result.output, (case, result.output)
        assert "Traceback" not in result.output
    assert not store.exists()


def test_missing_spec_file_is_a_usage_error(tmp_path):
    result = cli("spec", "check", str(tmp_path / "nothere.yaml"))
    assert result.exit_code == 2 and "nothere.yaml" in result.output and "Traceback" not in result.output


def _tiny_model(**flags):
    from extract.models.adm import ADMUNet

    return ADMUNet.from_flags(**{**TINY_FLAGS, **flags})


def _checkpoints(tmp_path) -> dict[str, tuple[object, str]]:
    from extract.models.checkpoints import save_safetensors

    good = _tiny_model()
    save_safetensors(good, tmp_path / "good.safetensors")
    torch.save(good.state_dict(), tmp_path / "good.pt")
    save_safetensors(_tiny_model(num_channels=64), tmp_path / "wide.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder.pt").mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("PWNED",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    torch.save({"ema": {k: v[..., :1] if v.ndim else v for k, v in good.state_dict().items()}}, tmp_path / "cut.pt")
    return {
        "random bytes": ("random.pt", "not a checkpoint diffbank can read"),
        "empty": ("empty.pt", "not a checkpoint diffbank can read"),
        "truncated safetensors": ("truncated.safetensors", "truncated"),
        "wrong shapes": ("wide.safetensors", "(check the flag num_channels)"),
        "wrong shapes inside a .pt wrapper": ("cut.pt", "shape mismatch at"),
        "pickled code": ("evil.pt", "not a state dict"),
        "a directory": ("folder.pt", "is a directory, not a file"),
    }


def test_bad_checkpoints_refused_from_their_header(tmp_path, capfd):
    cases = _checkpoints(tmp_path)
    for name in ("good.safetensors", "good.pt"):
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump(tiny_spec(model={"checkpoint": str(tmp_path / name)})))
        ok = cli("spec", "check", str(spec))
        assert ok.exit_code == 0, ok.output
    for case, (name, message) in cases.items():
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump(tiny_spec(model={"checkpoint": str(tmp_path / name)})))
        store = tmp_path / f"{name}.zarr"
        for args in (["spec", "check", str(spec)], ["extract", str(spec), "--store", str(store), "--no-progress"]):
            result = cli(*args)
            assert result.exit_code == 2, (case, result.output)
            assert "model.checkpoint" in result.output and message in result.output, (case, result.output)
            assert "weights_only` set to `False" not in result.output and "will likely succeed" not in result.output
            assert "Traceback" not in result.output
        assert not store.exists(), case
    assert "PWNED" not in capfd.readouterr().out  # nothing in the file ran


def test_random_bytes_checkpoint_never_quotes_torchs_unsafe_advice(tmp_path):
    from extract.models.checkpoints import CheckpointError, read_state_dict

    _checkpoints(tmp_path)
    for name in ("random.pt", "evil.pt"):
        with pytest.raises(CheckpointError) as err:
            read_state_dict(tmp_path / name)
        assert "weights_only` set to `False" not in str(err.value) and "will likely succeed" not in str(err.value)
        assert "add_safe_globals" not in str(err.value)
