"""The first-answer-token weight of the answer CE, against a naive per-token loop."""

import torch
import torch.nn.functional as F
from test_write_cache import multi_message_episodes, setup

from deltamem_agents.train.batching import IGNORE, collate, encode_example
from deltamem_agents.train.objective import answer_losses, batch_loss, write_pass


def naive_weighted_ce(model, batch, states, first_weight):
    """Per example: the CE of every answer token from its own logits, the first weighted, then the weighted mean."""
    from deltamem_agents.core.attach import decoder_of
    from deltamem_agents.core.cache import DeltaMemCache

    cache = DeltaMemCache.from_states(model, states, writes=False)
    hidden = decoder_of(model)(
        input_ids=batch.read_ids, attention_mask=batch.read_mask.long(), cache=cache, use_cache=True
    ).last_hidden_state  # (B, T, d)
    logits = model.get_output_embeddings()(hidden)  # (B, T, V)
    out = []
    for b in range(batch.size):
        total, weight, seen = 0.0, 0.0, False
        for t in range(batch.labels.shape[1] - 1):
            target = int(batch.labels[b, t + 1])
            if target == IGNORE:
                continue
            w = 1.0 if seen else first_weight
            seen = True
            total += w * float(F.cross_entropy(logits[b, t][None], torch.tensor([target])))
            weight += w
        out.append(total / weight)
    return torch.tensor(out)


def test_first_token_weight_matches_the_naive_loop_and_one_is_the_plain_mean():
    model, tokenizer = setup()
    examples = [encode_example(tokenizer, e, 0, system_prompt="m") for e in multi_message_episodes(3)]
    batch = collate(examples, pad_id=0)
    assert int((batch.labels != IGNORE).sum(1).min()) >= 2  # several answer tokens: the weight matters
    with torch.no_grad():
        states, _ = write_pass(model, batch, detach_backbone=True)
        for weight in (1.0, 4.0):
            torch.testing.assert_close(
                answer_losses(model, batch, states, first_weight=weight),
                naive_weighted_ce(model, batch, states, weight),
                rtol=1e-4,
                atol=1e-5,
            )
        plain = answer_losses(model, batch, states)
        assert not torch.allclose(plain, answer_losses(model, batch, states, first_weight=4.0))


def test_batch_loss_passes_the_first_token_weight():
    model, tokenizer = setup()
    batch = collate([encode_example(tokenizer, e, 0, system_prompt="m") for e in multi_message_episodes(2)], 0)
    plain = batch_loss(model, batch, detach_backbone=True, contrastive_weight=1.0)
    weighted = batch_loss(model, batch, detach_backbone=True, contrastive_weight=1.0, first_weight=4.0)
    assert abs(plain.ce - weighted.ce) > 1e-6
