"""Issue 34, item 1: decision diagnostics (decisions.jsonl, the search's distances and comebacks in report.json,
and compare's overlap of final decisions)."""
import json
import shutil

import pytest
import torch

from atp.diagnostics import decode, encode, gate_params, overlap, search_diagnostics
from atp.report import decision_overlaps
from atp.space import PruningSpace
from atp.train import PruneRecipe, train
from helpers import cfg_for, tiny_config


def lines_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_decisions_file_has_a_line_per_generator_step_that_decodes_to_the_masks_used(
        tiny_model_dir, train_file, tmp_path, monkeypatch):
    used = {}
    original = PruneRecipe.lora_step

    def recording(self, step, new_decisions):
        original(self, step, new_decisions)
        used[step] = {k: v.detach().cpu().clone() for k, v in self.decisions.items()}

    monkeypatch.setattr(PruneRecipe, "lora_step", recording)
    report = train(cfg_for(tiny_model_dir, train_file, tmp_path / "run", max_steps=8, mlp_block=4), progress=False)
    lines = lines_of(tmp_path / "run" / "decisions.jsonl")
    generator = [line for line in lines if "event" not in line]
    assert len(generator) == report["generator_steps"] == 6
    assert [line["step"] for line in generator] == [1, 2, 3, 4, 5, 6]
    for line in generator:  # the LoRA step of the same step masks with what the generator step left
        decoded = decode(line["decisions"])
        assert all(torch.equal(decoded[k], used[line["step"]][k]) for k in decoded)
    assert lines[-1]["event"] == "freeze" and lines[-1]["step"] == 6
    final = decode(report["decisions"])
    assert all(torch.equal(final[k], used[8][k]) for k in final)  # what the last LoRA steps and the export used
    assert [h for layer in report["layers"] for h in layer["kept_heads"]] == \
        [i for row in final["heads"].tolist() for i, g in enumerate(row) if g]
    search = report["decision_search"]
    path = search["distance_to_final"]
    assert len(path) == 7 and path[-1]["gates"] == 0 and path[-1]["params"] == 0 and path[-1]["share"] == 0
    weights = gate_params(PruningSpace.from_config(tiny_config("llama", True), mlp_block=4))
    for entry, line in zip(path, lines):  # the distances are the differing gates of the decoded masks
        decoded = decode(line["decisions"])
        assert entry["gates"] == sum(int((decoded[k] != final[k]).sum()) for k in final)
        assert entry["params"] == round(sum(float((weights[k] * (decoded[k] != final[k])).sum()) for k in final))
    assert search["stable_from_step"] is not None and search["stable_from_step"] <= 6


def test_resume_neither_duplicates_nor_loses_decision_lines(tiny_model_dir, train_file, tmp_path):
    def cfg():
        return cfg_for(tiny_model_dir, train_file, tmp_path / "run", max_steps=8, save_every=4, mlp_block=4)

    train(cfg(), progress=False)
    whole = (tmp_path / "run" / "decisions.jsonl").read_text()
    # as if killed after step 6: the file holds lines past the step-4 checkpoint, the last one cut short
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000008")
    shutil.rmtree(tmp_path / "run" / "model")
    (tmp_path / "run" / "report.json").unlink()
    with open(tmp_path / "run" / "decisions.jsonl", "a") as f:
        f.write('{"step": 7, "decis')
    resumed = train(cfg(), progress=False, resume=True)
    assert (tmp_path / "run" / "decisions.jsonl").read_text() == whole
    assert resumed["decision_search"]["generator_steps_logged"] == 6


def test_frozen_generator_logs_its_search_too(tiny_model_dir, train_file, tmp_path):
    report = train(cfg_for(tiny_model_dir, train_file, tmp_path / "run", method="frozen-generator", max_steps=4,
                           mlp_block=4), progress=False)
    lines = lines_of(tmp_path / "run" / "decisions.jsonl")
    assert len(lines) == report["decisions_info"]["generator_steps"] + 1 and lines[-1]["event"] == "freeze"
    assert report["decision_search"]["distance_to_final"][-1]["gates"] == 0


def gates(heads, mlp):
    return {"heads": torch.tensor(heads, dtype=torch.float32), "mlp": torch.tensor(mlp, dtype=torch.float32)}


def test_a_structure_pruned_after_the_target_and_kept_at_export_is_a_comeback():
    weights = {"heads": torch.full((2, 3), 10.0), "mlp": torch.full((2, 2), 4.0)}
    final = gates([[1, 1, 0], [1, 1, 1]], [[1, 0], [1, 1]])
    steps = [
        (1, gates([[0, 1, 0], [1, 1, 1]], [[1, 0], [1, 1]])),  # head (0, 0) pruned before the target: no comeback
        (2, gates([[1, 1, 0], [1, 0, 1]], [[1, 0], [1, 1]])),  # head (1, 1) pruned once the target is reached
        (3, gates([[1, 1, 0], [1, 1, 1]], [[1, 0], [0, 1]])),  # mlp block (1, 0) too
        (4, final),
    ]
    lines = [{"step": s, "decisions": encode(g)} for s, g in steps]
    search = search_diagnostics(lines, final, weights, prunable=100, target_step=2)
    assert search["comebacks"]["heads"] == {"count": 1, "which": [[1, 1]]}
    assert search["comebacks"]["mlp"] == {"count": 1, "which": [[1, 0]]}
    assert [e["gates"] for e in search["distance_to_final"]] == [1, 1, 1, 0]
    assert [e["params"] for e in search["distance_to_final"]] == [10, 10, 4, 0]
    assert search["distance_to_final"][0]["share"] == pytest.approx(0.1)
    assert search["stable_from_step"] == 4


def test_compare_overlap_is_zero_for_the_same_decisions_and_the_share_of_pruned_parameters_otherwise():
    weights = {"heads": torch.full((2, 3), 10.0), "mlp": torch.full((2, 2), 4.0)}
    atp = gates([[0, 0, 1], [1, 1, 1]], [[0, 1], [1, 1]])
    other = gates([[1, 0, 0], [1, 1, 1]], [[0, 1], [1, 1]])
    same = overlap(atp, atp, weights)
    assert same["share"] == 0 and same["kinds"]["heads"]["per_layer"] == [0.0, None]
    found = overlap(atp, other, weights)
    # heads, layer 0: 0 and 1 pruned by atp, 1 and 2 by the other: 0 and 2 by one only, 3 heads by either
    assert found["kinds"]["heads"]["per_layer"] == [pytest.approx(2 / 3), None]
    assert found["kinds"]["mlp"]["share"] == 0.0
    assert found["share"] == pytest.approx(20 / 34)  # 2 heads of 10 out of 3 heads and one MLP block of 4

    def cell(method, decisions):
        return {"method": method, "sparsity": 0.4, "seed": 0,
                "report": {"decisions": encode(decisions),
                           "decision_weights": {"heads": {"rows": 2, "row": [10.0] * 3},
                                                "mlp": {"rows": 2, "row": [4.0] * 2}}}}

    rows = decision_overlaps([cell("atp", atp), cell("taylor", other), cell("random", atp),
                              {"method": "magnitude", "sparsity": 0.4, "seed": 0, "report": {}}])
    by = {r["b"]: r for r in rows}
    assert by["taylor"]["share"] == pytest.approx(20 / 34) and by["random"]["share"] == 0
    assert by["taylor"]["kinds"]["heads"]["per_layer"] == [pytest.approx(2 / 3), None]
    assert by["magnitude"]["not_recorded"] == [0] and "kinds" not in by["magnitude"]
