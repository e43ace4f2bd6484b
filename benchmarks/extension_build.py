"""Where the extension's build time goes: each translation unit compiled alone, per flag set.

    python benchmarks/extension_build.py [--variant NAME=FLAGS ...] [--rounds N] [--only PATTERN]

Reads the compile commands `setup.py build_ext` wrote (build/temp.*/build.ninja: run `make setup`
first) and compiles each translation unit once per variant and round, the variants in turns (so
a machine that gets busier part-way through slows every variant alike). For each unit and variant
it prints the compiler's CPU seconds (user + sys: what a 2-core set-up pays, less sensitive to
other load than wall time), the ratio to the first variant, and the object's text size. The first
line gives the compiler and the CPU's vector flags.

The default variants, the reference first: setup.py's flags as they were before the set-up time
was cut (`-g -fgcse` appended: Python's own CFLAGS add debug information, which setup.py's `-g0`
now turns off, and GCC's RTL GCSE, which its `-fno-gcse` turns off); with only the debug
information off (`-fgcse`: `-g0` changes no machine code, `objdump -d` of both objects is
identical); and as they are now (nothing appended).
"""

import argparse
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_flags() -> str:
    """The CPU's vector instruction-set flags, as every figure in this project names them."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.findall(r"\b(avx2|avx512[a-z_0-9]*|amx[a-z_0-9]*)\b", text))
    return " ".join(sorted(flags)) or "no AVX2/AVX-512/AMX"


def compile_commands() -> dict[str, list[str]]:
    """{source: argv} for each C++ translation unit in the build folder's build.ninja."""
    ninja = sorted(REPO.glob("build/temp.*/build.ninja"))
    if not ninja:
        sys.exit(
            "error: no build/temp.*/build.ninja: run `make setup` (or setup.py build_ext) first"
        )
    text = ninja[-1].read_text()
    variables = dict(re.findall(r"^(cflags|post_cflags|cxx) = (.*)$", text, flags=re.M))
    commands = {}
    for source in re.findall(r"^build \S+\.o: compile (\S+\.cpp)$", text, flags=re.M):
        argv = [*shlex.split(variables.get("cxx", "c++")), *shlex.split(variables["cflags"])]
        argv += [source, *shlex.split(variables["post_cflags"])]
        commands[Path(source).name] = argv
    return commands


def compile_once(argv: list[str], flags: list[str], out: Path) -> tuple[float, float]:
    """CPU seconds (user + sys) and wall seconds of one compile to `out`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([*argv, "-o", str(out), *flags], check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def text_size(obj: Path) -> int:
    """Bytes of machine code in an object file (`size`'s text column)."""
    out = subprocess.run(["size", str(obj)], capture_output=True, text=True, check=True).stdout
    return int(out.splitlines()[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant",
        action="append",
        metavar="NAME=FLAGS",
        help="a flag set appended to each compile (repeatable; the first is the reference)",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default="", help="compile only units whose name contains this")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant or [])
    if not variants:
        variants = {"before (-g -fgcse)": "-g -fgcse", "-g0 (-fgcse)": "-fgcse", "now": ""}
    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout
    print(f"# {compiler.splitlines()[0]}; CPU flags: {cpu_flags()}")
    commands = {n: a for n, a in compile_commands().items() if args.only in n}
    totals = {name: 0.0 for name in variants}
    print(f"{'unit':32s} {'variant':28s} {'cpu s':>8s} {'ratio':>6s} {'text KB':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for unit, argv in commands.items():
            seconds: dict[str, list[float]] = {name: [] for name in variants}
            objects = {name: Path(tmp) / f"{unit}.{i}.o" for i, name in enumerate(variants)}
            for _ in range(args.rounds):
                for name, flags in variants.items():
                    cpu, _wall = compile_once(argv, shlex.split(flags), objects[name])
                    seconds[name].append(cpu)
            reference = min(seconds[next(iter(variants))])
            for name in variants:
                best = min(seconds[name])
                totals[name] += best
                size = text_size(objects[name]) / 1e3
                print(f"{unit:32s} {name:28s} {best:8.1f} {best / reference:6.2f} {size:8.0f}")
    first = totals[next(iter(variants))]
    for name, total in totals.items():
        print(f"{'all units':32s} {name:28s} {total:8.1f} {total / first:6.2f}")


if __name__ == "__main__":
    main()
