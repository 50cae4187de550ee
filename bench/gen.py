#!/usr/bin/env python3
"""Generate a millrace benchmark pipeline of N trivial WASM steps (std-lib only).

usage: gen.py SHAPE N DIR WASM
       gen.py change SHAPE N DIR     (rewrite the one input the "change" phase alters)

Writes DIR/pipeline.toml and its inputs under DIR/data/, and prints the pipeline path.

Shapes (every step is the testkit `copy` plugin; each step gets a distinct `--tag`
argument, which copy accepts and ignores, so no two steps share a cache key):

  chain   s1 reads inputs.seed (data/seed.txt); s_k reads s_{k-1}.out.   N steps.
          change = rewrite data/seed.txt -> all N steps execute.
  fanout  inputs in_1..in_{N-1} (data/in_k.txt); leaf_k reads inputs.in_k; one step
          "join" reads every leaf's output (mounts l1..l{N-1}).          N steps.
          change = rewrite data/in_{N//2}.txt -> 2 steps execute (that leaf + join).
"""

import os
import sys


def q(s: str) -> str:
    """A TOML basic string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def step(name: str, wasm: str, tag: str, inputs: dict[str, str]) -> str:
    ins = ", ".join(f"{k} = {q(v)}" for k, v in inputs.items())
    return (
        "\n[[step]]\n"
        f"name = {q(name)}\n"
        f"wasm = {q(wasm)}\n"
        f'args = ["--out", "out", "--tag", {q(tag)}]\n'
        f"inputs = {{ {ins} }}\n"
        'outputs = ["out"]\n'
    )


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def changed_input(shape: str, n: int) -> str:
    return "data/seed.txt" if shape == "chain" else f"data/in_{n // 2}.txt"


def generate(shape: str, n: int, out: str, wasm: str) -> str:
    if n < 2:
        sys.exit("gen.py: N must be at least 2")
    wasm = os.path.abspath(wasm)
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    parts = [f"name = {q(f'bench-{shape}-{n}')}\n"]
    if shape == "chain":
        write(os.path.join(data, "seed.txt"), "seed v1\n")
        parts.append('\n[inputs.seed]\npath = "data/seed.txt"\n')
        parts.append(step("s1", wasm, "1", {"in": "inputs.seed"}))
        for k in range(2, n + 1):
            parts.append(step(f"s{k}", wasm, str(k), {"in": f"s{k - 1}.out"}))
    elif shape == "fanout":
        leaves = n - 1
        for k in range(1, leaves + 1):
            write(os.path.join(data, f"in_{k}.txt"), f"input {k} v1\n")
            parts.append(f'\n[inputs.in_{k}]\npath = "data/in_{k}.txt"\n')
        for k in range(1, leaves + 1):
            parts.append(step(f"leaf_{k}", wasm, f"leaf{k}", {"in": f"inputs.in_{k}"}))
        # Leaf k's output holds in_k.txt: distinct file names, so copy merges them fine.
        parts.append(step("join", wasm, "join", {f"l{k}": f"leaf_{k}.out" for k in range(1, leaves + 1)}))
    else:
        sys.exit(f"gen.py: unknown shape {shape!r} (chain | fanout)")
    path = os.path.join(out, "pipeline.toml")
    write(path, "".join(parts))
    return path


def change(shape: str, n: int, out: str) -> str:
    path = os.path.join(out, changed_input(shape, n))
    with open(path) as f:
        old = f.read()
    write(path, old.replace("v1", "v2") if "v1" in old else old + "changed\n")
    return path


def main(argv: list[str]) -> None:
    if len(argv) == 5 and argv[1] == "change":
        print(change(argv[2], int(argv[3]), argv[4]))
    elif len(argv) == 5:
        print(generate(argv[1], int(argv[2]), argv[3], argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
