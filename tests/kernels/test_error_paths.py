"""Every error the fused op raises reaches Python as an exception, on every instruction-set path
this CPU has, with and without autograd (torch 2.11 crashed in `redispatch` under
`register_autograd` instead, on one GPU host; issue 32). Each path runs its cases in a
subprocess that names each case before it runs it, so a segfault fails the test naming the case
and the signal instead of killing pytest; three controls run first (torch's own error, torch's
error under a Python `register_autograd` op, ours below autograd), so the first to crash names
the layer."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

kernels = pytest.importorskip(
    "pipeline.kernels", reason="pipeline.kernels._C is not built", exc_type=ImportError
)
CAPABILITIES = ["default", "avx2", "avx512", "avx512_bf16", "amx_bf16"]

CASES = r"""
import json, sys
import torch
from pipeline.kernels import causal_attention

fwd = torch.ops.pipeline.causal_attention_fwd.default
bwd = torch.ops.pipeline.causal_attention_bwd.default


def qkv(shapes, dtypes=(torch.float32,) * 3, grad=False):
    return [torch.zeros(s, dtype=d, requires_grad=grad and d.is_floating_point)
            for s, d in zip(shapes, dtypes)]


good = [(1, 2, 5, 8)] * 3
f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16


@torch.library.custom_op("errorpaths::mm", mutates_args=())
def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b)


mm.register_autograd(lambda ctx, g: (g, g), setup_context=lambda ctx, inputs, output: None)
d0 = qkv([(1, 2, 5, 0)] * 3)
cases = {  # controls first: whichever layer crashes first names it
    "control: torch's own error": lambda: torch.mm(torch.zeros(2, 3), torch.zeros(2, 3)),
    "control: torch's error under register_autograd": lambda: mm(
        torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3)),
    "control: ours below autograd": lambda: fwd.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *d0),
}
for grad in (False, True):
    tag = "autograd " if grad else ""
    cases.update({
        tag + "2-d inputs": lambda g=grad: causal_attention(*qkv([(2, 3)] * 3, grad=g)),
        tag + "5-d inputs": lambda g=grad: causal_attention(*qkv([(1, 2, 3, 4, 5)] * 3, grad=g)),
        tag + "k of another length": lambda g=grad: causal_attention(
            *qkv([(1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 5, 8)], grad=g)),
        tag + "v of another width": lambda g=grad: causal_attention(
            *qkv([(1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 4)], grad=g)),
        tag + "D = 0": lambda g=grad: causal_attention(*qkv([(1, 2, 5, 0)] * 3, grad=g)),
        tag + "int32": lambda g=grad: causal_attention(*qkv(good, (torch.int32,) * 3, grad=g)),
        tag + "float32 with float64": lambda g=grad: causal_attention(
            *qkv(good, (f32, f64, f32), grad=g)),
        tag + "bfloat16 with float32": lambda g=grad: causal_attention(
            *qkv(good, (bf16, bf16, f32), grad=g)),
        tag + "meta k": lambda g=grad: causal_attention(
            *qkv(good, grad=g)[:1], torch.zeros(good[0], device="meta"),
            *qkv(good, grad=g)[2:]),
    })
q, k, v = qkv(good)
out, lse = fwd(q, k, v)
cases.update({
    "backward: lse of another shape": lambda: bwd(out, q, k, v, out, lse[:, :1]),
    "backward: float lse": lambda: bwd(out, q, k, v, out, lse.float()),
    "backward: grad_out of another shape": lambda: bwd(out[..., :4], q, k, v, out, lse),
})
results = {}
for name, case in cases.items():
    print("case:", name, file=sys.stderr, flush=True)
    try:
        case()
        results[name] = "no error"
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        results[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
print(json.dumps(results))
"""

EXPECTED = {  # case (without its "autograd " prefix): the start of what Python gets
    "control: torch's own error": "RuntimeError: mat1 and mat2 shapes cannot be multiplied",
    "control: torch's error under register_autograd": "RuntimeError: mat1 and mat2 shapes",
    "control: ours below autograd": "RuntimeError: causal_attention: head dimension D must be",
    "2-d inputs": r"RuntimeError: causal_attention: q must have shape \(B, H, T, D\)",
    "5-d inputs": r"RuntimeError: causal_attention: q must have shape \(B, H, T, D\)",
    "k of another length": "RuntimeError: causal_attention: k must have the shape of q",
    "v of another width": "RuntimeError: causal_attention: v must have the shape of q",
    "D = 0": "RuntimeError: causal_attention: head dimension D must be positive",
    "int32": "RuntimeError: causal_attention: dtype must be float32, float64, bfloat16 or float16",
    "float32 with float64": "RuntimeError: causal_attention: q, k and v must have the same dtype",
    "bfloat16 with float32": "RuntimeError: causal_attention: q, k and v must have the same dtype",
    "meta k": "RuntimeError: causal_attention: q, k and v must be on the same device",
    "backward: lse of another shape": "RuntimeError: causal_attention: lse must have shape",
    "backward: float lse": "RuntimeError: causal_attention: lse must have dtype Double, got",
    "backward: grad_out of another shape": "RuntimeError: causal_attention: grad_out must have",
}


@pytest.mark.parametrize(
    ("capability", "cpp_stacktraces"),
    [(capability, False) for capability in CAPABILITIES] + [("avx512_bf16", True)],
)
def test_every_error_is_an_exception_on_every_instruction_set(
    capability: str, cpp_stacktraces: bool
) -> None:
    """With TORCH_SHOW_CPP_STACKTRACES=1 too (each error then walks the C++ stack, which a
    crash of the unwinder would show), under faulthandler, which names a crash's signal."""
    env = {**os.environ, "PIPELINE_CPU_CAPABILITY": capability}
    env.pop("TORCH_SHOW_CPP_STACKTRACES", None)
    if cpp_stacktraces:
        env["TORCH_SHOW_CPP_STACKTRACES"] = "1"
    probe = [sys.executable, "-c", "from pipeline.kernels import cpu_capability as c; print(c())"]
    if subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() != capability:
        pytest.skip(f"this CPU does not support {capability}")
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", CASES],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    started = [line.removeprefix("case: ") for line in done.stderr.splitlines() if "case: " in line]
    died = signal.Signals(-done.returncode).name if done.returncode < 0 else done.returncode
    assert done.returncode == 0, (
        f"{capability}: the process died ({died}) in case {started[-1:]!r}:\n{done.stderr[-3000:]}"
    )
    results = json.loads(done.stdout.splitlines()[-1])
    assert len(results) == 3 + 2 * 9 + 3
    for name, got in results.items():
        expected = EXPECTED[name.removeprefix("autograd ")]
        assert re.match(expected, got), f"{capability}, {name}: {got}"
