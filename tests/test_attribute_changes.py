"""In-place mode's attribute changes are plan data: found at plan time, recorded in the Plan
(printed, JSON, the checkpoint manifest), and only applied by the in-place applier."""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import tpshard
from tpshard import checkpoint
from tpshard.compiler import apply_inplace, capture
from tpshard.plan import AttributeChange, Plan, PlanError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def test_attribute_changes_round_trip_and_are_explained() -> None:
    changes = [AttributeChange(f"h.{i}.attn", "split_size", 32, 16) for i in range(5)]
    plan = Plan(world_size=2, attribute_changes=changes + [AttributeChange("", "width", 8, 4)])
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.attribute_changes[0] == changes[0]
    text = plan.explain()
    assert "in place: split_size 32 -> 16 on h.0.attn, h.1.attn, h.2.attn and 2 more" in text
    assert "in place: width 8 -> 4 on <root>" in text


def test_a_plan_for_the_graph_searches_nothing_and_older_json_still_loads() -> None:
    plan = tpshard.plan(_mlp(), 2)
    assert plan.attribute_changes is None and "in place" not in plan.explain()
    d = plan.to_dict()
    del d["attribute_changes"]  # as written before the field existed
    assert Plan.from_dict(d) == plan
    inplace = tpshard.plan(_mlp(), 2, inplace=True)
    assert inplace.attribute_changes == [] and "in place: no attribute changes" in inplace.explain()
    assert {k: m.style for k, m in inplace.modules.items()} == {k: m.style for k, m in plan.modules.items()}


def test_the_applier_applies_only_what_the_plan_records() -> None:
    model = _mlp()
    c = capture(model)
    graph_plan = tpshard.plan(model, 2)
    with pytest.raises(PlanError, match="made for the graph.*inplace=True"):
        apply_inplace(model, c, graph_plan, tpshard.OfflineGroup(0, 2))
    # A change recorded in the plan is applied as it is, whatever the model's code would need.
    model.tpshard_width = 16
    plan = dataclasses.replace(graph_plan, attribute_changes=[AttributeChange("", "tpshard_width", 16, 8)])
    apply_inplace(model, c, plan, tpshard.OfflineGroup(0, 2))
    assert model.tpshard_width == 8 and model.tpshard_attribute_changes == [("", "tpshard_width", 8)]
    # parallelize(inplace=True) with a graph plan finds the changes first (none for an MLP).
    other = _mlp()
    tpshard.parallelize(other, 2, plan=graph_plan, group=tpshard.OfflineGroup(1, 2), inplace=True)
    assert other.tpshard_plan.attribute_changes == [] and other.tpshard_attribute_changes == []


def test_gpt2_attribute_changes_are_found_at_plan_time(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_hf import build  # noqa: E402

    model = build("gpt2")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    kw = {"use_cache": False}
    plan = tpshard.plan(model, 2, example_inputs=(ids,), example_kwargs=kw, inplace=True)
    assert {c.attribute for c in plan.attribute_changes} == {"nf", "split_size"}
    assert AttributeChange("transformer.h.0.attn", "split_size", 32, 16) in plan.attribute_changes
    assert "in place: split_size 32 -> 16 on transformer.h.0.attn" in plan.explain()
    assert Plan.from_json(plan.to_json()) == plan
    # The manifest holds the plan, attribute changes included.
    manifest = checkpoint.save_sharded(copy.deepcopy(model), tmp_path / "ckpt", 2, plan=plan, progress=False)
    assert checkpoint.read_manifest(manifest.directory).plan.attribute_changes == plan.attribute_changes
    # Applying is applying: the model's attributes take the plan's values, and nothing else changes.
    sharded = tpshard.parallelize(model, 2, example_inputs=(ids,), example_kwargs=kw, plan=plan,
                                  group=tpshard.OfflineGroup(0, 2), inplace=True)
    assert sharded.tpshard_plan is plan
    assert sharded.tpshard_attribute_changes == [(c.module, c.attribute, c.new) for c in plan.attribute_changes]
    assert model.get_submodule("transformer.h.1.attn").split_size == 16
