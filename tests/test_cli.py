"""The ``tpshard`` command line: plan | shard | merge | reshard (and verify's registration),
exit codes (0 success, 2 user error as one line on stderr), MODEL and --weights resolution."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model

import tpshard
from tpshard import cli, models
from tpshard import checkpoint as ck


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _user_error(code: int, err: str) -> str:
    """Exit 2 with one line on stderr, no traceback; return that line."""
    assert code == 2, err
    assert err.startswith("tpshard") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _equal_to(merged: Path, model: torch.nn.Module, ties: dict[str, str]) -> bool:
    full = load_file(str(merged))
    return all(torch.equal(full[ties.get(k, k)], v) for k, v in model.state_dict().items())


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module with a model factory, importable as ``my_models:small_llama``."""
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from tpshard import models

        def small_llama():
            model, args = models.build("llama", n_layer=1, seed=7)
            return model, args, {}

        not_a_model = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_models:small_llama"


def test_plan_table_memory_and_json(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, "plan", "gpt", "--world-size", "2")
    assert code == 0 and err == ""
    header = out.splitlines()[0].split()
    assert header[:5] == ["module", "style", "split", "params/rank", "collectives"]
    assert "h.0.attn.c_attn" in out and "dim 0 [32, 32, 32]" in out and "fwd all_reduce x1" in out
    assert "memory per rank (parameters and buffers, float32):" in out
    assert "  0-1   16,544    64.62 KiB" in out  # 16,544 float32 elements on each rank
    code, out, _ = _run(capsys, "plan", "gpt", "-n", "2", "--json")
    model, args = models.build("gpt", device="meta")
    assert code == 0 and tpshard.Plan.from_json(out) == tpshard.plan(model, 2, example_inputs=args)


def test_plan_dtype_comes_from_the_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, _ = models.build("gpt", dtype=torch.bfloat16)
    save_model(model, str(tmp_path / "w.safetensors"))
    code, out, _ = _run(capsys, "plan", "gpt", "-n", "2", "--weights", tmp_path / "w.safetensors")
    # bfloat16 weights; the causal masks (non-persistent buffers, not in the file) stay float32
    assert code == 0 and "(parameters and buffers, bfloat16, float32)" in out and "36.31 KiB" in out


def test_shard_merge_reshard_workflow(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, _ = models.build("gpt")  # what `tpshard shard gpt` shards: the built-in weights (seed 0)
    code, out, err = _run(capsys, "shard", "gpt", "-n", "2", "--out", tmp_path / "tp2")
    assert code == 0 and err == "" and "2 rank files" in out and "1 tied aliases" in out
    code, out, _ = _run(capsys, "reshard", tmp_path / "tp2", "-n", "4", "--out", tmp_path / "tp4")
    assert code == 0 and "2 -> 4 ranks" in out  # the MODEL recorded in the manifest is planned again
    code, _, _ = _run(capsys, "merge", tmp_path / "tp4", "--out", tmp_path / "full.safetensors")
    assert code == 0 and _equal_to(tmp_path / "full.safetensors", model, {"lm_head.weight": "wte.weight"})

    # Refusals: an existing output without --force; then --force replaces it.
    err = _user_error(*_run(capsys, "merge", tmp_path / "tp2", "--out", tmp_path / "full.safetensors")[::2])
    assert "full.safetensors exists; pass --force" in err
    err = _user_error(*_run(capsys, "shard", "gpt", "-n", "4", "--out", tmp_path / "tp2")[::2])
    assert "tp2 exists; pass --force" in err and ck.read_manifest(tmp_path / "tp2").world_size == 2
    assert _run(capsys, "shard", "gpt", "-n", "4", "--out", tmp_path / "tp2", "--force")[0] == 0
    assert ck.read_manifest(tmp_path / "tp2").world_size == 4


def test_factory_model_with_weights_file(tmp_path: Path, factory_module: str, capsys: pytest.CaptureFixture) -> None:
    model, _ = models.build("llama", n_layer=1, seed=3)  # other weights than the factory's own
    torch.save(model.state_dict(), tmp_path / "w.pt")
    code, _, err = _run(capsys, "shard", factory_module, "-n", "2", "--weights", tmp_path / "w.pt",
                        "--out", tmp_path / "ckpt")
    assert code == 0, err
    assert ck.read_manifest(tmp_path / "ckpt").model == factory_module
    assert _run(capsys, "merge", tmp_path / "ckpt", "--out", tmp_path / "m.safetensors")[0] == 0
    assert _equal_to(tmp_path / "m.safetensors", model, {})
    loaded = ck.load_sharded(lambda: models.build("llama", n_layer=1), tmp_path / "ckpt", rank=1)
    assert torch.equal(loaded.get_parameter("norm.weight"), model.norm.weight)


def test_pickled_module_needs_trust_pickle(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, _ = models.build("llama", seed=5)
    torch.save(model, tmp_path / "model.pt")
    argv = ["shard", "llama", "-n", "2", "--weights", tmp_path / "model.pt", "--out", tmp_path / "ckpt"]
    err = _user_error(*_run(capsys, *argv)[::2])
    assert "model.pt holds pickled Python objects" in err and "--trust-pickle" in err
    assert "torch.save(model.state_dict()" in err and not (tmp_path / "ckpt").exists()
    assert _run(capsys, *argv, "--trust-pickle")[0] == 0
    assert _run(capsys, "merge", tmp_path / "ckpt", "--out", tmp_path / "m.safetensors")[0] == 0
    assert _equal_to(tmp_path / "m.safetensors", model, {})


def test_user_errors_exit_2_with_one_line(tmp_path: Path, factory_module: str, capsys: pytest.CaptureFixture) -> None:
    err = _user_error(*_run(capsys, "shard", "gpt", "-n", "3", "--out", tmp_path / "x")[::2])
    assert "not divisible by the world size 3" in err and "world sizes that divide it" in err  # the PlanError
    assert not (tmp_path / "x").exists()
    err = _user_error(*_run(capsys, "plan", "resnet", "-n", "2")[::2])
    assert "unknown MODEL 'resnet'" in err and "gpt" in err
    err = _user_error(*_run(capsys, "plan", "no_such_module:f", "-n", "2")[::2])
    assert "cannot load MODEL 'no_such_module:f'" in err
    err = _user_error(*_run(capsys, "plan", "my_models:not_a_model", "-n", "2")[::2])
    assert "is a int, not a callable" in err
    err = _user_error(*_run(capsys, "merge", tmp_path, "--out", tmp_path / "m.safetensors")[::2])
    assert "manifest.json is missing" in err
    err = _user_error(*_run(capsys, "shard", "gpt", "-n", "2", "--weights", tmp_path / "nope.safetensors",
                            "--out", tmp_path / "y")[::2])
    assert "nope.safetensors: no such weights file" in err
    err = _user_error(*_run(capsys, "shard", "gpt", "-n", "2")[::2])  # argparse: --out is required
    assert "tpshard shard: error: the following arguments are required: --out" in err
    err = _user_error(*_run(capsys, "plan", "gpt", "-n", "0")[::2])
    assert "'0' is not a positive integer" in err


def test_newer_manifest_and_reshard_without_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, _ = models.build("mlp")
    ck.save_sharded(model, tmp_path / "ckpt", 2, progress=False)  # from Python: no MODEL recorded
    err = _user_error(*_run(capsys, "reshard", tmp_path / "ckpt", "-n", "1", "--out", tmp_path / "r")[::2])
    assert "does not say which model it holds" in err and "--model MODEL" in err
    assert _run(capsys, "reshard", tmp_path / "ckpt", "-n", "1", "--out", tmp_path / "r", "--model", "mlp")[0] == 0
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps(manifest))
    err = _user_error(*_run(capsys, "merge", tmp_path / "ckpt", "--out", tmp_path / "m.safetensors")[::2])
    assert "format version 99, newer than this tpshard reads (1); upgrade tpshard" in err


def test_verify_subcommand_is_registered_when_its_module_exists(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    def add_parser(sub: object) -> None:
        p = sub.add_parser("verify", help="compare sharded and original on real ranks")
        p.set_defaults(fn=lambda ns: print("verified") or 0)

    monkeypatch.setitem(sys.modules, "tpshard.verify.cli", types.SimpleNamespace(add_parser=add_parser))
    assert _run(capsys, "verify")[:2] == (0, "verified\n")
    monkeypatch.delitem(sys.modules, "tpshard.verify.cli")
    monkeypatch.setattr(sys.modules["tpshard.verify"], "cli", None, raising=False)  # as if the module did not exist
    monkeypatch.setitem(sys.modules, "tpshard.verify.cli", None)
    code, _, err = _run(capsys, "verify")
    assert code == 2 and "invalid choice: 'verify'" in err


@pytest.mark.timeout(60)
def test_real_subprocess_reports_plan_error_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tpshard.cli", "shard", "gpt", "--world-size", "3", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if "UserWarning" not in line and "_add_verify" not in line]
    assert len(lines) == 1 and lines[0].startswith("tpshard: h.0.attn.c_attn:"), proc.stderr
    assert "not divisible by the world size 3" in lines[0]
    assert list(tmp_path.iterdir()) == []
