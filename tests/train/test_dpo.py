import math

import pytest
import torch

from pipeline.data.instruct import InstructionExample
from pipeline.model import GPT, GPTConfig
from pipeline.stages.align_dpo import collate_pairs, pair_logprobs, reference_logprobs
from pipeline.train.dpo import model_response_logprobs, preference_loss, response_logprobs


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_and_rewards_match_a_hand_computed_example():
    # log-ratios: chosen -10 - (-11) = 1, rejected -12 - (-11) = -1, margin 2; beta 0.1:
    # loss = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
    loss, stats = preference_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)))
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert stats["chosen_reward"].item() == pytest.approx(0.1)
    assert stats["rejected_reward"].item() == pytest.approx(-0.1)
    assert stats["reward_margin"].item() == pytest.approx(0.2)
    assert stats["reward_accuracy"].item() == 1.0


def test_label_smoothing_and_ipo_against_hand_computed_values():
    args = (
        torch.tensor([-10.0]),
        torch.tensor([-12.0]),
        torch.tensor([-11.0]),
        torch.tensor([-11.0]),
    )
    smoothed, _ = preference_loss(*args, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(-0.8 * log_sigmoid(0.2) - 0.2 * log_sigmoid(-0.2))
    ipo, _ = preference_loss(*args, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.1)) ** 2)  # (margin - 5)^2 = 9
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(*args, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(*args, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        preference_loss(*args, beta=0.0)


def test_known_limits_small_beta_and_identical_answers_give_log_2():
    policy_c, policy_r = torch.tensor([-3.0, -8.0]), torch.tensor([-9.0, -1.0])
    ref_c, ref_r = torch.tensor([-4.0, -2.0]), torch.tensor([-5.0, -6.0])
    tiny_beta, _ = preference_loss(policy_c, policy_r, ref_c, ref_r, beta=1e-8)
    assert tiny_beta.item() == pytest.approx(math.log(2), abs=1e-6)
    same = torch.tensor([-7.0, -2.5])
    loss, stats = preference_loss(same, same, ref_c, ref_c, beta=0.5)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["reward_margin"].item() == 0.0 and stats["reward_accuracy"].item() == 0.0


def test_response_logprobs_sum_only_unmasked_targets():
    logits = torch.zeros(2, 3, 4)  # uniform: every token has log-probability -log 4
    logits[1, 2, 3] = 100.0  # (almost) certain token 3 at the last position of row 1
    targets = torch.tensor([[-100, 1, 2], [-100, -100, 3]])
    out = response_logprobs(logits, targets)
    assert out[0].item() == pytest.approx(-2 * math.log(4))
    assert out[1].item() == pytest.approx(0.0, abs=1e-6)


def test_fused_head_gives_the_full_logits_result_and_gradients():
    chosen, rejected = toy_pairs()
    model, ref_model = toy_model(3).eval(), toy_model(3).eval()
    inputs, targets = collate_pairs(chosen, rejected, context_length=16, eos_id=EOT)
    full = response_logprobs(ref_model(inputs), targets)
    fused = model_response_logprobs(model, inputs, targets)
    torch.testing.assert_close(fused, full)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # rows scaled differently, as DPO's are
    (fused * weights).sum().backward()
    (full * weights).sum().backward()
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def toy_pairs():
    prompt = (5, 6, 7)
    chosen = [InstructionExample(prompt, (8, 9)), InstructionExample((4, 5), (10, 11, 12))]
    rejected = [InstructionExample(prompt, (20, 21, 22)), InstructionExample((4, 5), (30,))]
    return chosen, rejected


EOT = 50256  # the end-of-text id of the toy model's (GPT-2-sized) vocabulary


def toy_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=50257, context_length=16, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**config.to_dict()))


def test_pairs_mask_prompts_and_padding_and_the_reference_gets_no_gradient():
    chosen, rejected = toy_pairs()
    inputs, targets = collate_pairs(chosen, rejected, context_length=16, eos_id=EOT)
    assert inputs.shape[0] == 4
    # chosen[0]: prompt 5 6 7, response 8 9, eot: learned targets are 8, 9, eot only
    assert targets[0].tolist()[:5] == [-100, -100, 8, 9, 50256]
    assert (targets[0, 5:] == -100).all()
    model = toy_model()
    ref_c, ref_r = reference_logprobs(model, chosen, rejected, 16, batch_size=1, eos_id=EOT)
    assert not ref_c.requires_grad and not ref_r.requires_grad
    assert all(p.grad is None for p in model.parameters())
    inputs, targets = collate_pairs(chosen, rejected, context_length=16, eos_id=EOT)
    with torch.no_grad():
        direct_c, direct_r = pair_logprobs(model.eval(), inputs, targets)
    torch.testing.assert_close(ref_c, direct_c)  # batch size and padding do not change them
    torch.testing.assert_close(ref_r, direct_r)


def test_one_step_raises_the_chosen_over_rejected_margin():
    chosen, rejected = toy_pairs()
    model = toy_model(1)
    inputs, targets = collate_pairs(chosen, rejected, context_length=16, eos_id=EOT)
    model.eval()
    with torch.no_grad():
        ref_c, ref_r = pair_logprobs(model, inputs, targets)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = None
    for _ in range(2):
        policy_c, policy_r = pair_logprobs(model, inputs, targets)
        loss, stats = preference_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1)
        if before is None:
            before = stats["reward_margin"].item()
            assert before == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(
                math.log(2)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert stats["reward_margin"].item() > before + 1e-3
    assert stats["reward_accuracy"].item() == 1.0
