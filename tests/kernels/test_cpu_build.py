"""setup.py compiles the AVX-512 kernels only where they can run (PIPELINE_CPU_ISAS): the build
must still take the widest path the CPU has, and the kernels it left out must still compile."""

import os
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

kernels = pytest.importorskip(
    "pipeline.kernels._C", reason="C++ extension not built (python setup.py build_ext --inplace)"
)
from pipeline.kernels import cpu_capability  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
AVX512 = {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("no flags line in /proc/cpuinfo")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the flags of Linux")
def test_the_build_runs_the_widest_path_the_cpu_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_CPU_CAPABILITY", raising=False)
    flags = cpu_flags()
    if flags >= AVX512:
        expected = "avx512_bf16" if "avx512_bf16" in flags else "avx512"
        if expected == "avx512_bf16" and flags >= {"amx_tile", "amx_bf16"}:
            expected = "amx_bf16"  # unless Linux refused the tile state (then avx512_bf16)
    elif flags >= {"avx2", "fma"}:
        expected = "avx2"
    else:
        expected = "default"
    assert cpu_capability() == expected


def compiled_symbols(source: str, tmp_path: Path) -> str:
    """The symbols of csrc/<source> compiled at -O0 (seconds, not minutes): the front end and
    the always_inline / target checks run."""
    cxx = os.environ.get("CXX", "c++")
    includes = [f"-I{p}" for p in include_paths()]
    result = subprocess.run(
        [cxx, "-O0", "-std=c++17", "-fopenmp", *includes, "-c",
         str(REPO / "csrc" / source), "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return subprocess.run(["nm", "-C", str(tmp_path / "kernels.o")], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(
    cpu_capability() in ("avx512", "avx512_bf16", "amx_bf16"),
    reason="this build compiled the AVX-512 kernels",
)
def test_the_avx512_kernels_left_out_here_still_compile(tmp_path: Path) -> None:
    symbols = compiled_symbols("causal_attention_avx512.cpp", tmp_path)
    for dtype in ("float", "double", "c10::BFloat16", "c10::Half"):
        assert f"forward_tile_avx512<{dtype}>" in symbols
        assert f"backward_item_avx512<{dtype}>" in symbols
    assert "forward_tile_avx512_bf16(" in symbols
    amx = compiled_symbols("causal_attention_amx.cpp", tmp_path)  # built with the AVX-512 unit
    assert "forward_tile_amx(" in amx and "amx_pack_keys(" in amx
    assert "backward_head_amx(" in amx and "backward_item_amx(" in amx
