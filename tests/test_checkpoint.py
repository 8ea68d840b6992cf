"""Sharded checkpoints (tpshard.checkpoint): bit-exact round trips, loading one rank's file on
real gloo ranks, every error from a real bad input, and output that never looks complete
when it is not.

Checkpoints are built once per module (float64 gpt — tied weights, fused c_attn split by
segments — and llama — grouped-query attention, rotary buffers) and copied where a test
damages one.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

import tpshard
from tpshard import checkpoint as ck
from tpshard import models
from tpshard.checkpoint import safetensors_io
from tpshard.checkpoint import shard as ck_shard
from tpshard.checkpoint import CheckpointError
from tpshard.verify.launch import run_ranks

NAMES = ("gpt", "llama")


def _factory(name: str) -> functools.partial:
    return functools.partial(models.build, name, dtype=torch.float64)


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    return {name: _factory(name)()[0] for name in NAMES}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, built: dict) -> dict[str, Path]:
    """A 2-rank checkpoint of each model, written from a .safetensors weights file."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, model in built.items():
        weights = root / f"{name}.safetensors"
        save_model(model, str(weights))  # drops one name of a tied pair, as Hugging Face files do
        with ck.empty_weights():
            meta_model, _ = models.build(name, dtype=torch.float64)
        out[name] = root / f"{name}-tp2"
        ck.save_sharded(meta_model, out[name], 2, weights=weights, model_spec=name, progress=False)
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _assert_merged_equal(merged: Path, model: torch.nn.Module, ties: dict[str, str]) -> None:
    full = load_file(str(merged))
    sd = model.state_dict()
    assert set(full) == set(sd)  # tied aliases too: load_state_dict(strict=True) works
    for k, v in sd.items():
        got = full[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k


# ---------------------------------------------------------------------------------------------
# Round trips.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shard_merge_reshard_round_trip_is_bit_exact(name: str, built: dict, ckpts: dict, tmp_path: Path) -> None:
    model, src = built[name], ckpts[name]
    manifest = ck.read_manifest(src)
    assert manifest.world_size == 2 and manifest.model == name
    assert manifest.tpshard_version == tpshard.__version__ and manifest.torch_version == torch.__version__
    if name == "gpt":
        assert manifest.ties == {"lm_head.weight": "wte.weight"}
        assert "lm_head.weight" not in manifest.tensors
        assert manifest.tensors["h.0.attn.c_attn.weight"].segments == (32, 32, 32)

    # Every rank file loads with safetensors and holds exactly the plan's shard.
    for r, f in enumerate(manifest.files):
        assert f.name == f"rank-0000{r}-of-00002.safetensors"
        with safe_open(str(src / f.name), "pt") as fh:
            assert list(fh.keys()) == sorted(manifest.tensors)
            for key in fh.keys():
                want = manifest.tensors[key].spec.shard(model.state_dict()[key], r, 2)
                assert torch.equal(fh.get_tensor(key), want), key

    ck.merge(src, tmp_path / "full.safetensors", progress=False)
    _assert_merged_equal(tmp_path / "full.safetensors", model, manifest.ties)

    # 2 -> 4 -> 1 ranks, each step tensor by tensor, then merged: still the original bits.
    m4 = ck.reshard(src, tmp_path / "tp4", 4, model=_factory(name), progress=False)
    assert m4.world_size == 4 and len(list((tmp_path / "tp4").glob("rank-*-of-00004.safetensors"))) == 4
    ck.reshard(tmp_path / "tp4", tmp_path / "tp1", 1, model=_factory(name), progress=False)
    ck.merge(tmp_path / "tp1", tmp_path / "full1.safetensors", progress=False)
    assert (tmp_path / "full1.safetensors").read_bytes() == (tmp_path / "full.safetensors").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_streaming_in_tiny_chunks_writes_the_same_bytes(name: str, built: dict, ckpts: dict, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors go through in chunks of rows (a few rows here, 32 MiB normally): same files."""
    unchunked = ck.reshard(ckpts[name], tmp_path / "ref4", 4, model=_factory(name), progress=False)
    monkeypatch.setattr(ck_shard, "_CHUNK_BYTES", 300)
    monkeypatch.setattr(safetensors_io, "_GAP_READ_BYTES", 300)  # the readers' hashing of skipped bytes
    with ck.empty_weights():
        meta_model, _ = models.build(name, dtype=torch.float64)
    weights = ckpts[name].parent / f"{name}.safetensors"
    m = ck.save_sharded(meta_model, tmp_path / "tp2", 2, weights=weights, model_spec=name, progress=False)
    assert [f.sha256 for f in m.files] == [f.sha256 for f in ck.read_manifest(ckpts[name]).files]
    ck.reshard(tmp_path / "tp2", tmp_path / "tp4", 4, model=_factory(name), progress=False)
    assert [f.sha256 for f in ck.read_manifest(tmp_path / "tp4").files] == [f.sha256 for f in unchunked.files]
    ck.merge(tmp_path / "tp4", tmp_path / "full.safetensors", progress=False)
    _assert_merged_equal(tmp_path / "full.safetensors", built[name], m.ties)


@pytest.mark.parametrize("name", NAMES)
def test_load_sharded_offline_equals_parallelize(name: str, built: dict, ckpts: dict) -> None:
    model = built[name]
    for rank in range(2):
        loaded = ck.load_sharded(_factory(name), ckpts[name], rank=rank)
        ref = tpshard.parallelize(model, 2, group=tpshard.OfflineGroup(rank, 2))
        got, want = dict(loaded.named_parameters(remove_duplicate=False)), dict(ref.named_parameters(remove_duplicate=False))
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
            assert got[k].requires_grad == want[k].requires_grad
        got_b, want_b = dict(loaded.named_buffers()), dict(ref.named_buffers())
        assert got_b.keys() == want_b.keys() and all(torch.equal(got_b[k], want_b[k]) for k in want_b)
        assert loaded.state_dict().keys() == ref.state_dict().keys()  # non-persistent buffers stay so
        if name == "gpt":
            assert loaded.get_parameter("lm_head.weight") is loaded.get_parameter("wte.weight")


def test_replicated_kv_heads_shard_merge_reshard_load(built: dict, ckpts: dict, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """llama's 2 kv heads over 4 ranks are replicated 2-fold (ParamShard.replicas): each rank file
    holds only its kv head's rows, read as row slices of the source file; ranks 0, 1 (and 2, 3)
    hold the same rows; merge takes one replica; reshard 4 -> 2 -> merge gives the same bits."""
    from tpshard.checkpoint import weights as ck_weights

    model = built["llama"]
    reads: list[tuple[str, int, int]] = []
    load_rows = ck_weights._SafetensorsSource.load_rows

    def counting(self: object, name: str, start: int, rows: int) -> torch.Tensor:
        reads.append((name, start, rows))
        return load_rows(self, name, start, rows)

    monkeypatch.setattr(ck_weights._SafetensorsSource, "load_rows", counting)
    with ck.empty_weights():
        meta_model, _ = models.build("llama", dtype=torch.float64)
    m = ck.save_sharded(meta_model, tmp_path / "tp4", 4, weights=ckpts["llama"].parent / "llama.safetensors",
                        model_spec="llama", progress=False)
    k = "layers.0.self_attn.k_proj.weight"
    assert m.tensors[k].replicas == 2 and m.plan.params[k].replicas == 2
    assert json.loads((tmp_path / "tp4" / "manifest.json").read_text())["tensors"][k]["replicas"] == 2
    head = model.config.head_dim  # 8 rows per kv head: rank r reads rows of kv head r // 2 only
    assert sorted({(s, n) for name, s, n in reads if name == k}) == [(0, head), (head, head)]
    full = model.state_dict()[k]
    for r, f in enumerate(m.files):
        with safe_open(str(tmp_path / "tp4" / f.name), "pt") as fh:
            kv = r // 2
            assert torch.equal(fh.get_tensor(k), full[kv * head:(kv + 1) * head]), r
    ck.merge(tmp_path / "tp4", tmp_path / "full.safetensors", progress=False)
    _assert_merged_equal(tmp_path / "full.safetensors", model, m.ties)
    for rank in range(4):  # load_sharded: the same module as parallelize's, bit for bit
        loaded = ck.load_sharded(_factory("llama"), tmp_path / "tp4", rank=rank)
        ref = tpshard.parallelize(model, 4, group=tpshard.OfflineGroup(rank, 4))
        want = dict(ref.named_parameters())
        assert all(torch.equal(p, want[n]) for n, p in loaded.named_parameters())
    ck.reshard(tmp_path / "tp4", tmp_path / "tp2", 2, model=_factory("llama"), progress=False)
    ck.merge(tmp_path / "tp2", tmp_path / "full2.safetensors", progress=False)
    assert (tmp_path / "full2.safetensors").read_bytes() == (tmp_path / "full.safetensors").read_bytes()


def _load_on_ranks(rank: int, world: int, ckpts: dict[str, str], wrong: str) -> dict:
    """On each real rank: load_sharded equals parallelize (bit for bit) and the original."""
    out = {}
    for name, path in ckpts.items():
        model, (ids,) = models.build(name, dtype=torch.float64, batch=3)
        loaded = ck.load_sharded(_factory(name), path)
        ref = tpshard.parallelize(model, world)
        y, y_ref = loaded(ids), ref(ids)
        out[name] = (torch.equal(y, y_ref), float((y - model(ids)).abs().max()))
    try:
        ck.load_sharded(_factory("gpt"), wrong)
        out["wrong"] = "no error"
    except CheckpointError as e:
        out["wrong"] = str(e)
    return out


@pytest.mark.timeout(90)
def test_load_sharded_on_gloo_ranks_matches_parallelize(ckpts: dict, tmp_path: Path) -> None:
    wrong = ck.reshard(ckpts["gpt"], tmp_path / "tp4", 4, model=_factory("gpt"), progress=False)
    results = run_ranks(_load_on_ranks, 2, {n: str(p) for n, p in ckpts.items()}, str(wrong.directory), timeout=80)
    for res in results:
        for name in NAMES:
            same, err = res[name]
            assert same, name
            assert err < 1e-12, (name, err)
        assert "is for world size 4" in res["wrong"] and "2 ranks" in res["wrong"]
        assert "tpshard reshard" in res["wrong"]


def _load_on_cuda_ranks(rank: int, world: int, path: str) -> float:
    """On a rank that shares the GPU (gloo over CUDA tensors): load, run, compare."""
    model, (ids,) = models.build("llama", dtype=torch.float64, batch=3, device="cuda")
    loaded = ck.load_sharded(_factory("llama"), path, device="cuda")
    assert all(t.device.type == "cuda" for t in [*loaded.parameters(), *loaded.buffers()])
    return float((loaded(ids) - model(ids)).abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(180)
def test_load_sharded_onto_cuda(built: dict, ckpts: dict) -> None:
    loaded = ck.load_sharded(_factory("llama"), ckpts["llama"], rank=1, device="cuda")
    ref = tpshard.parallelize(built["llama"], 2, group=tpshard.OfflineGroup(1, 2))
    got = dict(loaded.named_parameters())
    for name, want in ref.named_parameters():
        assert got[name].device.type == "cuda" and torch.equal(got[name].cpu(), want), name
    assert loaded.cos.device.type == "cuda"
    errors = run_ranks(_load_on_cuda_ranks, 2, str(ckpts["llama"]), timeout=170, device="cuda", backend="gloo")
    assert max(errors) < 1e-12, errors


def test_load_reads_only_its_own_rank_file(ckpts: dict, tmp_path: Path) -> None:
    d = _copy(ckpts["llama"], tmp_path)
    (d / "rank-00001-of-00002.safetensors").unlink()
    ck.load_sharded(_factory("llama"), d, rank=0)  # rank 0 never looks at rank 1's file
    with pytest.raises(CheckpointError, match=r"rank-00001-of-00002\.safetensors is missing"):
        ck.load_sharded(_factory("llama"), d, rank=1)
    with pytest.raises(CheckpointError, match="is missing"):
        ck.merge(d, tmp_path / "out.safetensors", progress=False)
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Errors, each from a real bad input.
# ---------------------------------------------------------------------------------------------


def _rank1(d: Path) -> Path:
    return d / "rank-00001-of-00002.safetensors"


def test_truncated_rank_file(ckpts: dict, tmp_path: Path) -> None:
    d = _copy(ckpts["gpt"], tmp_path)
    f = _rank1(d)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"rank-00001-of-00002\.safetensors: truncated"):
        ck.load_sharded(_factory("gpt"), d, rank=1)
    with pytest.raises(CheckpointError, match="truncated"):
        ck.reshard(d, tmp_path / "tp4", 4, model=_factory("gpt"), progress=False)
    assert not (tmp_path / "tp4").exists()


def test_flipped_byte_fails_the_checksum_and_leaves_no_output(ckpts: dict, tmp_path: Path) -> None:
    d = _copy(ckpts["gpt"], tmp_path)
    data = bytearray(_rank1(d).read_bytes())
    data[-5] ^= 0x01  # in the last tensor's data: the header still parses
    _rank1(d).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank-00001-of-00002\.safetensors: sha256 mismatch.*corrupted"):
        ck.load_sharded(_factory("gpt"), d, rank=1)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        ck.merge(d, tmp_path / "full.safetensors", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [d.name]  # no output, no temp file


def _rewrite_header(path: Path, edit: callable) -> None:
    """Change a rank file's header in place, keeping its length (so only the header is wrong)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])


def test_shape_and_dtype_mismatch_with_the_manifest(ckpts: dict, tmp_path: Path) -> None:
    d = _copy(ckpts["gpt"], tmp_path)
    _rewrite_header(_rank1(d), lambda h: h["h.0.attn.c_attn.weight"].update(shape=[32, 48]))
    with pytest.raises(CheckpointError, match=r"00002\.safetensors: shape mismatch for 'h\.0\.attn\.c_attn\.weight'"):
        ck.load_sharded(_factory("gpt"), d, rank=1)
    d2 = tmp_path / "d2"
    shutil.copytree(ckpts["gpt"], d2)
    _rewrite_header(_rank1(d2), lambda h: h["wpe.weight"].update(dtype="I64"))
    with pytest.raises(CheckpointError, match=r"00002\.safetensors: dtype mismatch for 'wpe\.weight'"):
        ck.merge(d2, tmp_path / "x.safetensors", progress=False)


def test_world_size_and_rank_errors(ckpts: dict) -> None:
    with pytest.raises(CheckpointError, match=r"manifest\.json is for world size 2, but this job's tensor-parallel "
                                              r"group has 4 ranks.*tpshard reshard"):
        ck.load_sharded(_factory("gpt"), ckpts["gpt"], group=tpshard.OfflineGroup(0, 4))
    with pytest.raises(CheckpointError, match="no torch.distributed job is running.*rank=R"):
        ck.load_sharded(_factory("gpt"), ckpts["gpt"])
    with pytest.raises(CheckpointError, match="rank 2 is outside the 2 ranks"):
        ck.load_sharded(_factory("gpt"), ckpts["gpt"], rank=2)


def test_newer_format_version_is_refused(ckpts: dict, tmp_path: Path) -> None:
    d = _copy(ckpts["gpt"], tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = ck.FORMAT_VERSION + 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"manifest\.json has format version 2, newer than this tpshard reads "
                                              r"\(1\); upgrade tpshard"):
        ck.load_sharded(_factory("gpt"), d, rank=0)
    with pytest.raises(CheckpointError, match="not a tpshard checkpoint"):
        ck.read_manifest(tmp_path)


def test_model_that_does_not_match_the_checkpoint(ckpts: dict) -> None:
    with pytest.raises(CheckpointError, match=r"the model \(Llama\) does not match .*manifest\.json"):
        ck.load_sharded(_factory("llama"), ckpts["gpt"], rank=0)
    with pytest.raises(CheckpointError, match=r"shape differs: \['wpe\.weight \(model \[16, 32\], checkpoint \[32, 32\]\)'\]"):
        ck.load_sharded(functools.partial(models.build, "gpt", dtype=torch.float64, block_size=16),
                        ckpts["gpt"], rank=0)


def test_model_entirely_on_meta_loses_non_persistent_buffers(ckpts: dict) -> None:
    meta_model, _ = models.build("gpt", dtype=torch.float64, device="meta")  # its causal mask is meta too
    with pytest.raises(CheckpointError, match=r"h\.\d\.attn\.bias .*non-persistent.*empty_weights\(\)"):
        ck.load_sharded(meta_model, ckpts["gpt"], rank=0)
    with ck.empty_weights():
        model, _ = models.build("gpt", dtype=torch.float64)
    loaded = ck.load_sharded(model, ckpts["gpt"], rank=0)  # a module built under empty_weights works
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert model.wte.weight.is_meta and not model.h[0].attn.bias.is_meta  # the input is left as it was


def test_weights_that_do_not_match_the_model(tmp_path: Path, built: dict) -> None:
    save_file({"nonsense": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"w\.safetensors does not match the model \(GPT\): missing 28 tensors"):
        ck.save_sharded(built["gpt"], tmp_path / "out", 2, weights=tmp_path / "w.safetensors", progress=False)
    sd = dict(built["llama"].state_dict())
    sd["norm.weight"] = torch.zeros(5, dtype=torch.float64)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w\.pt: tensor 'norm\.weight' has shape \[5\], the model expects \[32\]"):
        ck.save_sharded(built["llama"], tmp_path / "out", 2, weights=tmp_path / "w.pt", progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a safetensors file, or truncated"):
        ck.open_weights(tmp_path / "junk.safetensors")
    assert not (tmp_path / "out").exists()


def test_pickled_module_needs_trust(tmp_path: Path, built: dict) -> None:
    model = built["llama"]
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt holds pickled Python objects.*--trust-pickle.*state_dict"):
        ck.open_weights(tmp_path / "model.pt")
    with ck.open_weights(tmp_path / "model.pt", trust_pickle=True) as w:
        assert set(w.keys()) == set(model.state_dict())
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with ck.open_weights(tmp_path / "legacy.pt") as w:  # not memory-mappable: loaded plainly
        assert torch.equal(w.load("norm.weight"), model.norm.weight)


# ---------------------------------------------------------------------------------------------
# Output that never looks complete, and --force.
# ---------------------------------------------------------------------------------------------


def _fail_on_second_write(monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]) -> None:
    real = ck.SafetensorsWriter.write
    calls = {"n": 0}

    def write(self: ck.SafetensorsWriter, name: str, tensor: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise exc("simulated interruption")
        real(self, name, tensor)

    monkeypatch.setattr(ck.SafetensorsWriter, "write", write)


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt])
def test_interrupted_shard_leaves_nothing(exc: type, tmp_path: Path, built: dict,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_on_second_write(monkeypatch, exc)
    with pytest.raises(exc, match="simulated"):
        ck.save_sharded(built["gpt"], tmp_path / "out", 2, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither DIR nor a temporary directory


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path: Path, built: dict, ckpts: dict,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d = _copy(ckpts["llama"], tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    _fail_on_second_write(monkeypatch, RuntimeError)
    with pytest.raises(RuntimeError, match="simulated"):
        ck.reshard(d, d.parent / "gpt", 2, model=_factory("llama"), progress=False)
    _fail_on_second_write(monkeypatch, RuntimeError)
    with pytest.raises(RuntimeError, match="simulated"):
        ck.save_sharded(built["llama"], d, 2, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [d.name]
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_force_semantics(tmp_path: Path, built: dict) -> None:
    model = built["llama"]
    out = tmp_path / "ckpt"
    first = ck.save_sharded(model, out, 2, progress=False)
    with pytest.raises(CheckpointError, match=r"ckpt exists; pass --force"):
        ck.save_sharded(model, out, 1, progress=False)
    assert ck.read_manifest(out).world_size == 2
    second = ck.save_sharded(model, out, 1, force=True, progress=False)  # a checkpoint is replaced
    assert second.world_size == 1 and sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "rank-00000-of-00001.safetensors"]
    assert first.files[0].sha256 != second.files[0].sha256
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to replace .*notes: it is not a tpshard checkpoint"):
        ck.save_sharded(model, other, 2, force=True, progress=False)
    assert (other / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    ck.save_sharded(model, tmp_path / "empty", 2, force=True, progress=False)  # an empty directory is fine
    ck.merge(out, tmp_path / "full.safetensors", progress=False)
    with pytest.raises(CheckpointError, match="full.safetensors exists; pass --force"):
        ck.merge(out, tmp_path / "full.safetensors", progress=False)
    ck.merge(tmp_path / "empty", tmp_path / "full.safetensors", force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "empty", "full.safetensors", "notes"]


# ---------------------------------------------------------------------------------------------
# Pieces: the streaming writer, empty_weights, sources, progress.
# ---------------------------------------------------------------------------------------------


def test_streaming_writer_is_read_by_safetensors(tmp_path: Path) -> None:
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(7, dtype=torch.int32),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }
    path = tmp_path / "t.safetensors"
    with ck.SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"a": "b"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"a": "b"}
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # data aligned
    with pytest.raises(CheckpointError, match="expected a F32"):
        with ck.SafetensorsWriter(tmp_path / "u.safetensors", [("a", torch.float32, (2,))]) as w:
            w.write("b", torch.zeros(2))


def test_empty_weights_keeps_buffers_and_ties() -> None:
    with ck.empty_weights():
        model, _ = models.build("gpt")
        llama = models.Llama()
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.wte.weight
    assert not llama.cos.is_meta and torch.equal(llama.cos, models.Llama().cos)
    with pytest.raises(ZeroDivisionError):
        with ck.empty_weights():
            1 / 0
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the patch is gone, even after an error


def test_progress_bar_when_asked(tmp_path: Path, built: dict, capsys: pytest.CaptureFixture) -> None:
    ck.save_sharded(built["gpt"], tmp_path / "out", 2, progress=True)
    err = capsys.readouterr().err
    assert "shard: 100%|" in err and err.endswith("\n")  # tqdm's bar, closed
    ck.merge(tmp_path / "out", tmp_path / "full.safetensors")  # stderr is not a terminal: no bar
    assert capsys.readouterr().err == ""


def test_example_inputs_are_recorded_for_reshard(tmp_path: Path) -> None:
    model, args = models.build("mlp", dtype=torch.float64)
    m = ck.save_sharded(model, tmp_path / "mlp", 2, example_inputs=args, progress=False)
    assert m.example_inputs == {"args": [{"tensor": list(args[0].shape), "dtype": "float64"}], "kwargs": {}}
    with pytest.raises(CheckpointError, match="reshard needs the model"):
        ck.reshard(tmp_path / "mlp", tmp_path / "mlp4", 4, progress=False)
    with ck.empty_weights():
        meta_model, _ = models.build("mlp", dtype=torch.float64)
    ck.reshard(tmp_path / "mlp", tmp_path / "mlp4", 4, model=meta_model, progress=False)
    ck.merge(tmp_path / "mlp4", tmp_path / "full.safetensors", progress=False)
    _assert_merged_equal(tmp_path / "full.safetensors", model, {})
    assert os.stat(tmp_path / "mlp4").st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_reshard_keeps_the_overrides_the_checkpoint_was_made_with(tmp_path: Path, built: dict) -> None:
    over = {"lm_head": "column_no_gather"}
    m2 = ck.save_sharded(built["gpt"], tmp_path / "tp2", 2, overrides=over, progress=False)
    assert m2.plan.overrides == over and m2.plan.modules["lm_head"].style == "column_no_gather"
    m4 = ck.reshard(tmp_path / "tp2", tmp_path / "tp4", 4, model=_factory("gpt"), progress=False)
    assert m4.plan.overrides == over and m4.plan.modules["lm_head"].style == "column_no_gather"
    assert ck.read_manifest(tmp_path / "tp4").plan.overrides == over
    with pytest.raises(CheckpointError, match="either plan= or overrides="):
        ck.save_sharded(built["gpt"], tmp_path / "x", 2, plan=m2.plan, overrides=over, progress=False)
