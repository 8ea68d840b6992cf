"""Saved models people have, in and out: Hugging Face ``save_pretrained`` directories (many
safetensors files and their index), whole modules saved with ``torch.save``, the default
``use_cache=True`` call, and plans exported to DTensor and Hugging Face; on real gloo ranks.

Tiny models made here (nothing downloaded). One rank launch checks many things: starting
ranks costs seconds.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

import tpshard
from tpshard import checkpoint, cli
from tpshard.verify.launch import run_ranks

tf = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

IDS = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                              max_position_embeddings=64)).eval()


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                            bos_token_id=0, eos_token_id=0)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Multi-file directories (max_shard_size 20KB), their 2-rank checkpoints, a torch.save module."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, build in (("llama", _llama), ("gpt2", _gpt2)):
        build().save_pretrained(root / name, max_shard_size="20KB")
        assert cli.main(["shard", str(root / name), "-n", "2", "--out", str(root / f"ck-{name}")]) == 0
        out[name], out[f"ck-{name}"] = root / name, root / f"ck-{name}"
    torch.save(_gpt2(), root / "whole.pt")
    out["whole"] = root / "whole.pt"
    out["root"] = root
    return out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Offline: the directory is a MODEL, the manifest says where it came from, merge goes back.
# ---------------------------------------------------------------------------------------------


def test_directory_is_multi_file_and_manifest_records_its_source(saved: dict) -> None:
    index = json.loads((saved["llama"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really many files
    m = checkpoint.read_manifest(saved["ck-llama"])
    assert m.model == str(saved["llama"].absolute())
    assert m.source["config"]["model_type"] == "llama"
    names = {f["name"]: f["bytes"] for f in m.source["files"]}
    assert "config.json" in names and all(names[f] == (saved["llama"] / f).stat().st_size
                                          for f in index["weight_map"].values())
    assert checkpoint.read_manifest(saved["ck-gpt2"]).ties == {"lm_head.weight": "transformer.wte.weight"}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_to_directory_loads_bit_exact_with_from_pretrained(name: str, saved: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert cli.main(["merge", str(saved[f"ck-{name}"]), "--out", str(out), "--max-shard-size", "20KB"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files and len(files) > 3
    original = tf.AutoModelForCausalLM.from_pretrained(saved[name])
    merged = tf.AutoModelForCausalLM.from_pretrained(out)
    a, b = _state(original), _state(merged)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # One file keeps working, and holds tied aliases: strict load_state_dict of the original.
    from safetensors.torch import load_file

    full = load_file(str(checkpoint.merge(saved[f"ck-{name}"], tmp_path / "full.safetensors", progress=False)))
    original.load_state_dict(full, strict=True)
    assert all(torch.equal(full[k], v) for k, v in a.items())


def test_reshard_builds_the_model_from_the_recorded_config(saved: dict, tmp_path: Path) -> None:
    import shutil

    moved = tmp_path / "ck"
    shutil.copytree(saved["ck-llama"], moved)
    m = checkpoint.read_manifest(moved)
    # Without --model, the model is built from the config the manifest records (the source
    # directory may be gone by now).
    assert cli.main(["reshard", str(moved), "-n", "1", "--out", str(tmp_path / "tp1")]) == 0
    assert checkpoint.read_manifest(tmp_path / "tp1").source == m.source
    checkpoint.merge(tmp_path / "tp1", tmp_path / "out", progress=False)
    a = _state(tf.AutoModelForCausalLM.from_pretrained(saved["llama"]))
    b = _state(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_verify_a_directory(saved: dict, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["verify", str(saved["llama"]), "-n", "2", "--quiet", "--dtype", "float32"]) == 0
    assert "EQUIVALENT" in capsys.readouterr().out


def test_torch_saved_module_needs_trust_pickle_and_nothing_is_written(saved: dict, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ck"
    assert cli.main(["shard", str(saved["whole"]), "-n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "arbitrary code" in err and not out.exists()
    assert cli.main(["shard", str(saved["whole"]), "-n", "2", "--out", str(out), "--trust-pickle"]) == 0
    checkpoint.merge(out, tmp_path / "full.safetensors", progress=False)
    from safetensors.torch import load_file

    full = load_file(str(tmp_path / "full.safetensors"))
    assert all(torch.equal(full[k], v) for k, v in _gpt2().state_dict().items())


def test_plan_of_a_directory_with_overrides(saved: dict, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["plan", str(saved["llama"]), "-n", "2", "--override", "model.layers.0.mlp.*=replicate",
                     "--override", "lm_head=column_no_gather", "--json"]) == 0
    plan = tpshard.Plan.from_json(capsys.readouterr().out)
    assert plan.overrides == {"model.layers.0.mlp.*": "replicate", "lm_head": "column_no_gather"}
    assert plan.modules["model.layers.0.mlp.up_proj"].style == "replicate"
    assert plan.modules["lm_head"].style == "column_no_gather"
    assert cli.main(["plan", "mlp", "-n", "2", "--override", "no-equals-sign"]) == 2
    assert "PATTERN=STYLE" in capsys.readouterr().err


def test_cli_conventions(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tpshard {tpshard.__version__}"
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.choices and "plan" in a.choices)
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.dest)  # help text on every option
    assert {"override", "quiet"} <= {a.dest for a in sub.choices["verify"]._actions}


def test_verify_quiet_prints_the_verdict_only(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["verify", "mlp", "-n", "2", "--quiet", "--override", "2=replicate"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "EQUIVALENT" in out[0]


def test_plan_exports_say_what_they_cannot_express() -> None:
    from tpshard import models

    gpt, args = models.build("gpt")
    plan = tpshard.plan(gpt, 2, example_inputs=args)
    with pytest.raises(tpshard.PlanError, match="fused projection"):
        plan.to_dtensor_plan()
    loose = plan.to_dtensor_plan(strict=False)
    assert "h.0.attn.c_attn" not in loose and any("h.0.attn.c_attn" in u for u in loose.unsupported)
    assert any("inplace=True" in u for u in loose.unsupported)  # head counts in reshapes
    assert "h.0.mlp.c_fc" in loose
    llama = _llama()
    p = tpshard.plan(llama, 2, example_inputs=(IDS,), example_kwargs={"use_cache": False}, inplace=True)
    hf = p.to_hf_tp_plan(prefix="model.")
    assert {k: v for k, v in hf.items() if k.startswith("layers.")} == tf.LlamaConfig.base_model_tp_plan
    assert hf["lm_head"] == "colwise_gather_output" and hf["embed_tokens"] == "embedding_rowwise"
    assert hf.unsupported == []


# ---------------------------------------------------------------------------------------------
# On 2 gloo ranks: load_sharded(DIR, CKPT), the default HF call, the exported DTensor plan.
# ---------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


def _ranks_body(rank: int, world: int, saved: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    res: dict = {}
    # 1. A model directory loaded from its checkpoint equals from_pretrained(DIR), unsharded.
    for name in ("llama", "gpt2"):
        ref = tf.AutoModelForCausalLM.from_pretrained(saved[name]).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # the copyreg warning is gone
            sharded = tpshard.load_sharded(saved[name], saved[f"ck-{name}"])
        res[f"load {name}"] = _rel(sharded(IDS, use_cache=False).logits, ref(IDS, use_cache=False).logits)
    # 2. The default call (use_cache not passed): captured, the cache handled explicitly.
    model = _llama()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sharded = tpshard.parallelize(model, world, example_kwargs={"input_ids": IDS})
    out = sharded(input_ids=IDS)
    res["default call"] = _rel(out.logits, ref(input_ids=IDS).logits)
    res["no cache"] = out.past_key_values is None and model.config.use_cache is True
    # 3. The exported DTensor plan, applied by parallelize_module, shards as tpshard does.
    model = _llama()
    plan = tpshard.plan(model, world, example_inputs=(IDS,), example_kwargs={"use_cache": False}, inplace=True)
    dt = parallelize_module(copy.deepcopy(model), init_device_mesh("cpu", (world,)), plan.to_dtensor_plan())
    mine = tpshard.parallelize(copy.deepcopy(model), world, example_inputs=(IDS,),
                               example_kwargs={"use_cache": False}, plan=plan, inplace=True)
    res["dtensor vs tpshard"] = _rel(dt(IDS, use_cache=False).logits, mine(IDS, use_cache=False).logits)
    res["dtensor vs original"] = _rel(dt(IDS, use_cache=False).logits, model(IDS, use_cache=False).logits)
    mine_params = dict(mine.named_parameters())
    res["same shards"] = all(
        torch.equal(p.to_local() if hasattr(p, "to_local") else p, mine_params[n]) for n, p in dt.named_parameters())
    return res


@pytest.mark.slow
def test_on_two_ranks(saved: dict) -> None:
    results = run_ranks(_ranks_body, 2, saved, timeout=420)
    for res in results:
        for key in ("load llama", "load gpt2", "default call", "dtensor vs tpshard", "dtensor vs original"):
            assert res[key] < 1e-5, (key, res[key])  # float32 models: rounding of the split sums
        assert res["no cache"] and res["same shards"], res
