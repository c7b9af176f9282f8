"""Context distillation: the teacher reads the fact-holding messages, the student reads memory without them."""

import torch
from test_write_cache import multi_message_episodes, setup

from deltamem_agents import memory_parameters
from deltamem_agents.train.batching import collate, encode_example
from deltamem_agents.train.objective import batch_loss, distillation_kl


def test_top_k_kl_is_zero_for_equal_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(5, 200)
    assert torch.allclose(distillation_kl(logits, logits, 64), torch.zeros(5), atol=1e-6)
    kl = distillation_kl(logits, torch.randn(5, 200), 64)
    assert (kl > 0).all()
    student = logits + torch.randn(5, 200)
    p, q = logits.log_softmax(-1), student.log_softmax(-1)  # k = V: the plain full-vocabulary KL
    torch.testing.assert_close(distillation_kl(logits, student, 200), (p.exp() * (p - q)).sum(-1))


def test_teacher_prompt_holds_the_fact_and_the_loss_trains_the_memory():
    model, tokenizer = setup()
    episode = multi_message_episodes(1)[0]
    example = encode_example(tokenizer, episode, 0, system_prompt="m", teacher=True)
    teacher_prompt = tokenizer.decode(example.teacher_ids[example.teacher_labels == -100])
    student_prompt = tokenizer.decode(example.read_ids[example.labels == -100])
    assert "k=a" in teacher_prompt and "k=a" not in student_prompt
    assert torch.equal(example.teacher_ids[example.teacher_labels != -100], example.read_ids[example.labels != -100])
    examples = [encode_example(tokenizer, e, 0, system_prompt="m", teacher=True) for e in multi_message_episodes(4)]
    batch = collate(examples, pad_id=0)
    plain = batch_loss(model, batch, detach_backbone=True, contrastive_weight=1.0)
    parts = batch_loss(model, batch, detach_backbone=True, contrastive_weight=1.0, distill_weight=1.0)
    assert parts.distill is not None and parts.distill > 0 and plain.distill is None
    assert abs(float(parts.loss) - float(plain.loss) - parts.distill) < 1e-4
    params = list(memory_parameters(model).values())
    grads = torch.autograd.grad(parts.loss, params, allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 0 for g in grads)
