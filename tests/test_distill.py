import pytest
import torch

from atp.distill import kd_loss
from helpers import cfg_for, tiny_model


def test_kd_loss_is_token_averaged_kl_times_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    for t in (1.0, 2.0):
        p = torch.softmax(teacher / t, -1)
        manual = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1)
        expected = (manual * mask).sum() / mask.sum() * t * t
        assert kd_loss(student, teacher, mask, t) == pytest.approx(float(expected), rel=1e-5)
    # padding positions do not count, whatever their logits
    changed = student.clone()
    changed[0, 4] += 100
    assert kd_loss(changed, teacher, mask) == pytest.approx(float(kd_loss(student, teacher, mask)), rel=1e-6)
    assert float(kd_loss(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(student, teacher, mask, tokens=12) == pytest.approx(float(kd_loss(student, teacher, mask)) * 6 / 12)


def test_kd_gradient_moves_the_student_towards_the_teacher():
    torch.manual_seed(1)
    teacher = torch.randn(1, 3, 7)
    student = torch.zeros(1, 3, 7, requires_grad=True)
    optimizer = torch.optim.SGD([student], lr=1.0)
    before = kd_loss(student, teacher, torch.ones(1, 3)).item()
    for _ in range(50):
        optimizer.zero_grad()
        kd_loss(student, teacher, torch.ones(1, 3)).backward()
        optimizer.step()
    assert kd_loss(student, teacher, torch.ones(1, 3)).item() < before / 10


def test_self_teacher_is_the_dense_pretrained_model(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    from atp.distill import ModelTeacher, SelfTeacher
    from atp.errors import ATPError
    from atp.masking import GateController
    from atp.space import PruningSpace

    ids = torch.randint(3, 500, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense = tiny_model("qwen2", seed=4)
    with torch.no_grad():
        expected = dense(**batch).logits
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(tiny_model("qwen2", seed=4), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    space = PruningSpace.from_config(model.config, mlp_block=4)
    controller = GateController(model, space, mode="frozen", modes=("both",))
    gates = space.full_gates()
    gates["heads"][:, :2] = 0
    gates["mlp"][:, 1:3] = 0
    controller.set(gates)
    with torch.no_grad():
        student = model(**batch).logits
    assert (student - expected).abs().max() > 1e-3  # LoRA and the masks change the student
    teacher = SelfTeacher(model, controller.disabled)
    assert torch.allclose(teacher.logits(batch), expected, atol=1e-5)
    assert controller.masks is not None  # the masks are back after the teacher's pass
    assert torch.equal(model(**batch).logits.detach(), student)

    with pytest.raises(ATPError, match="no model there"):
        ModelTeacher.from_run(str(tmp_path), "cpu", 512)
    tiny_model("llama", vocab_size=600).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(ATPError, match="vocabulary has 600 tokens"):
        ModelTeacher.from_run(str(tmp_path), "cpu", 512)


def test_training_with_distillation_logs_kd_and_exports(tiny_model_dir, train_file, tmp_path):
    import json

    from atp.train import train

    report = train(cfg_for(tiny_model_dir, train_file, tmp_path / "run", max_steps=4, distill=0.5, log_every=1),
                   progress=False)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    # step 1: nothing pruned and LoRA still zero, so the student is the teacher; then they part
    assert log[0]["kd_loss"] == pytest.approx(0.0, abs=1e-6) and all(r["kd_loss"] > 0 for r in log[1:])
    assert any("generator_kd_loss" in r for r in log)
    assert report["logits_check"]["passed"]
    # a dense + LoRA run as the teacher (Minitron's teacher correction)
    train(cfg_for(tiny_model_dir, train_file, tmp_path / "dense", max_steps=2, prune=False), progress=False)
    report = train(cfg_for(tiny_model_dir, train_file, tmp_path / "run2", max_steps=2, distill=1.0,
                           teacher=str(tmp_path / "dense")), progress=False)
    assert report["logits_check"]["passed"]


def test_distillation_is_on_by_default_when_pruning_only():
    from atp.cli import build_parser, config_from_args
    from atp.config import DEFAULT_DISTILL
    from atp.options import ATPConfig, fingerprint

    def parsed(*flags):
        args = build_parser().parse_args(["prune", "--model", "m", *flags])
        return config_from_args(args, ATPConfig)

    assert DEFAULT_DISTILL == 0.5
    assert parsed().distill == 0.5
    assert parsed("--no-prune").distill == 0.0  # dense + LoRA: nothing to distil into
    assert parsed("--distill", "0").distill == 0.0
    assert parsed("--no-prune", "--distill", "0.3").distill == 0.3
    assert parsed("--method", "frozen-generator").distill == 0.5  # the baselines get the same recipe
    # the default is the explicit 0.5 as far as resuming and compare cells are concerned
    assert fingerprint(parsed()) == fingerprint(parsed("--distill", "0.5")) != fingerprint(parsed("--distill", "0"))
    with pytest.raises(Exception, match="--distill must be in"):
        parsed("--distill", "1.5").validate()
