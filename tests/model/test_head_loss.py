"""The fused LM head loss against `F.cross_entropy(hidden @ W.T)`, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import GPT, GPTConfig, head_loss
from pipeline.model.head_loss import IGNORE_INDEX, linear_cross_entropy, target_logprobs


def inputs(n: int = 70, c: int = 16, v: int = 300, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, c, generator=g, dtype=dtype) * 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = IGNORE_INDEX
    return hidden, weight, targets


def reference(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 32, 64, 1000])  # 70 rows: a ragged last chunk, or one
def test_mean_loss_and_grads_equal_cross_entropy_in_fp32(chunk):
    hidden, weight, targets = inputs()
    fused = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    ref = reference(hidden, weight, targets)
    torch.testing.assert_close(fused, ref)
    for got, want in zip(
        grads(2.5 * fused, hidden, weight), grads(2.5 * ref, hidden, weight), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_frozen_head_weight_gets_no_gradient_and_the_hidden_one_is_exact():
    hidden, weight, targets = inputs()
    weight.requires_grad_(False)  # LoRA freezes the tied head
    (got,) = grads(linear_cross_entropy(hidden, weight, targets), hidden)
    torch.testing.assert_close(got, grads(reference(hidden, weight, targets), hidden)[0])
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets.clamp_min(0)[:, None])
    want = (logp.squeeze(-1) * (targets != IGNORE_INDEX)).sum()
    (got,) = grads(target_logprobs(hidden, weight, targets).sum(), hidden)
    torch.testing.assert_close(got, grads(want, hidden)[0])


def test_float64_gradcheck_of_both_reductions():
    hidden, weight, targets = inputs(n=9, c=4, v=11, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, targets, chunk=4), (hidden, weight)
    )
    assert torch.autograd.gradcheck(
        lambda h, w: target_logprobs(h, w, targets, chunk=4), (hidden, weight)
    )


def test_target_logprobs_and_their_grads_equal_log_softmax_per_token():
    hidden, weight, targets = inputs()
    scale = torch.linspace(-1, 2, len(targets))  # per-token weights, as DPO's rows get
    got = target_logprobs(hidden, weight, targets, chunk=32)
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets.clamp_min(0)[:, None])
    want = logp.squeeze(-1) * (targets != IGNORE_INDEX)
    torch.testing.assert_close(got, want)
    for a, b in zip(
        grads((got * scale).sum(), hidden, weight),
        grads((want * scale).sum(), hidden, weight),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_ignored_rows_get_no_gradient_and_an_all_ignored_batch_is_nan_like_cross_entropy():
    hidden, weight, targets = inputs()
    (grad_h,) = grads(linear_cross_entropy(hidden, weight, targets), hidden)
    assert grad_h[targets == IGNORE_INDEX].abs().max() == 0
    none = torch.full_like(targets, IGNORE_INDEX)
    fused = linear_cross_entropy(hidden, weight, none)
    assert fused.isnan() and reference(hidden, weight, none).isnan()
    # The loop stops on the NaN loss before any update; the gradient is zero, not NaN.
    fused.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0
    assert target_logprobs(hidden, weight, none).abs().max() == 0


def test_bf16_autocast_matches_the_linear_head_under_autocast():
    hidden, weight, targets = inputs(n=40, c=32, v=257)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, targets, chunk=16)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads(fused, hidden, weight), grads(ref, hidden, weight), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-2, atol=2e-3)


def test_no_gradient_work_under_no_grad(monkeypatch):
    hidden, weight, targets = inputs()
    calls = []
    monkeypatch.setattr(head_loss, "_accumulate_grads", lambda *a: calls.append(a))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert loss.grad_fn is None and not calls  # evaluation computes no gradients
    torch.testing.assert_close(loss, reference(hidden, weight, targets).detach())


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, context_length=16, n_layer=1, n_head=2, n_embd=16))


def test_gpt_forward_with_targets_equals_cross_entropy_of_its_logits_with_tied_grads():
    idx = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    targets[0, :5] = IGNORE_INDEX
    fused_model, ref_model = tiny_gpt(), tiny_gpt()
    fused = fused_model(idx, targets=targets)
    ref = F.cross_entropy(ref_model(idx).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(fused, ref)
    fused.backward()
    ref.backward()
    for (name, a), b in zip(fused_model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_gpt_head_loss_rejects_an_unknown_reduction():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="reduction must be"):
        model(
            torch.zeros(1, 4, dtype=torch.long),
            targets=torch.zeros(1, 4, dtype=torch.long),
            reduction="sum",
        )


def assert_compiled_gpt_trains_like_eager(shapes: list[tuple[int, int]]) -> None:
    """A compiled model (from scratch, whatever an earlier test compiled) gives the eager
    model's loss and gradients through the fused loss, batch shape after batch shape."""
    torch._dynamo.reset()
    model, ref_model = tiny_gpt(), tiny_gpt()
    compiled = torch.compile(model)
    for batch, seq_len in shapes:
        idx = torch.randint(0, 97, (batch, seq_len))
        loss = compiled(idx, targets=idx)
        torch.testing.assert_close(loss, ref_model(idx, targets=idx))
        loss.backward()
        ref_model(idx, targets=idx).backward()
        torch.testing.assert_close(model.tok_emb.weight.grad, ref_model.tok_emb.weight.grad)


def test_compiled_gpt_trains_through_the_fused_loss():
    assert_compiled_gpt_trains_like_eager([(2, 16)])


@pytest.mark.skipif(
    torch.__version__ < "2.13",
    reason="torch 2.11's dynamo fails an internal assertion tracing the fused loss's "
    "autograd.Function with symbolic shapes",
)
def test_compiled_gpt_trains_through_the_fused_loss_at_new_shapes():
    """A compiled model meets new batch shapes (a last, shorter batch; padded fine-tuning
    batches): dynamo recompiles with symbolic shapes, through the fused loss too."""
    assert_compiled_gpt_trains_like_eager([(2, 16), (3, 12), (1, 7)])
