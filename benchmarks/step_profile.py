"""Where a compiled program's time goes: a JAX profiler trace of a few calls, summed per HLO op
and grouped by what the op is (convolution, attention, matmul, normalisation-like reductions,
elementwise, copies and transposes, collectives) and by the pass it belongs to (forward,
backward, the rest: optimiser, EMA, NaN guard, RNG), from the op's ``op_name`` metadata; and
how many of the compiled program's top-level operations do work in each pass
(:func:`kernel_counts`: what XLA compiles, loads from its cache and launches, one by one).

    from step_profile import profile
    summary, last_output = profile(compiled, args, steps=5, out_dir="/tmp/trace", donate=True)

Works on any backend whose trace events carry XLA's ``hlo_op`` / ``hlo_module`` arguments (CPU
thunks, GPU kernels; on a GPU only the device's events are counted). Run on demand by the
benchmarks (``adm64_accelerator.py --profile N``, ``python benchmarks/step_profile.py``), never
by the tests.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import time

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{$|^ENTRY %?([\w.\-]+)")


def _opcode(rhs: str) -> str:
    """The opcode of an instruction's right-hand side ``SHAPE opcode(operands), attrs``."""
    i = 0
    if rhs.startswith("("):  # a tuple shape
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        i += 1
    else:
        i = rhs.find(" ")
    rest = rhs[i:].strip()
    return rest[:rest.find("(")] if "(" in rest else rest


def hlo_ops(hlo_text: str) -> dict[str, dict[str, str]]:
    """Each instruction of a compiled module's text: its opcode, what it is, its pass and its
    op_name metadata; fusions are classified by the ops of the computation they call."""
    bodies: dict[str, set[str]] = collections.defaultdict(set)
    body_names: dict[str, list[str]] = collections.defaultdict(list)  # op_names inside
    ops: dict[str, dict] = {}
    current = entry = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and " = " not in line:
            current = head.group(1) or head.group(2)
            entry = current if line.startswith("ENTRY") else entry
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, rhs = m.groups()
        opcode = _opcode(rhs)
        calls = re.search(r"calls=%?([\w.\-]+)", rhs)
        target = re.search(r'custom_call_target="([^"]*)"', rhs)
        op_name = re.search(r'op_name="([^"]*)"', rhs)
        if current is not None:
            bodies[current].add(opcode)
            if op_name:
                body_names[current].append(op_name.group(1))
        operands = rhs[:rhs.find("), ")] if "), " in rhs else rhs
        ops[name] = {"opcode": opcode, "calls": calls.group(1) if calls else "",
                     "target": target.group(1) if target else "",
                     "op_name": op_name.group(1) if op_name else "",
                     "operands": re.findall(r"%([\w.\-]+)", operands),
                     "top_level": current is not None and current == entry}
    users: dict[str, list[str]] = collections.defaultdict(list)
    for name, info in ops.items():
        for operand in info["operands"]:
            users[operand].append(name)
    for name, info in ops.items():
        body = bodies.get(info["calls"], set())
        info["kind"] = _kind(name, info["opcode"], info["target"], info["op_name"], body)
        # An op XLA made (a layout copy, a rewritten weight-gradient convolution) has no
        # op_name: it is backward work if what is fused into it, or the nearest named ops
        # it reads or feeds, are (a forward activation transposed for a weight gradient).
        names = [info["op_name"]] if info["op_name"] else list(body_names.get(info["calls"], []))
        if not info["op_name"]:
            names += _neighbour_names(name, ops, users, body_names)
        info["pass"] = _pass(names)
    return ops


# Top-level instructions that launch no work of their own.
_NO_WORK = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
            "opt-barrier", "partition-id", "replica-id"}


def kernel_counts(hlo_text: str) -> dict[str, int]:
    """How many operations of a compiled module's entry computation do work (fusions,
    library calls, copies, collectives, loops: each a kernel or a thunk to compile, load and
    launch), by pass (forward, backward, the rest: optimiser, EMA, guard), most first."""
    count: collections.Counter = collections.Counter()
    for info in hlo_ops(hlo_text).values():
        if info["top_level"] and info["opcode"] not in _NO_WORK:
            count[info["pass"]] += 1
    return dict(count.most_common())


def _neighbour_names(name: str, ops: dict, users: dict, body_names: dict) -> list[str]:
    """op_names of the nearest named ops up and down the graph from ``name``."""
    out = []
    for step in (lambda n: ops[n]["operands"], lambda n: users.get(n, [])):
        frontier, seen, found = step(name), {name}, []
        while frontier and not found and len(seen) < 64:
            nxt = []
            for other in frontier:
                if other in seen or other not in ops:
                    continue
                seen.add(other)
                o = ops[other]
                names = [o["op_name"]] if o["op_name"] else body_names.get(o["calls"], [])
                found += names
                if not names:
                    nxt += step(other)
            frontier = nxt
        out += found
    return out


def _kind(name: str, opcode: str, target: str, op_name: str, body: set[str]) -> str:
    t = target.lower()
    if "fmha" in t or "attention" in op_name or "flash" in t:
        return "attention"
    if opcode == "convolution" or "conv" in t or "convolution" in body:
        return "convolution"
    if opcode == "dot" or "gemm" in t or "matmul" in t or "dot" in body:
        return "matmul"
    if any(c in opcode for c in ("all-reduce", "all-gather", "reduce-scatter",
                                 "collective-permute", "all-to-all")):
        return "collective"
    # (XLA names a fusion after its root: a transpose_copy_fusion is a layout change with
    # the elementwise work before it folded in)
    if opcode in ("copy", "transpose", "copy-start", "copy-done") or (
            opcode == "fusion" and name.startswith(("transpose", "copy"))):
        return "copy / transpose"
    if opcode in ("reduce", "reduce-window") or "reduce" in body:
        return "reduction fusion (norms, sums)"
    if opcode in ("while", "conditional", "call"):
        return "control flow"
    if opcode == "fusion" or body:
        return "elementwise fusion"
    return f"other ({opcode})"


def _pass(op_names: list[str]) -> str:
    """backward if any of the op_names is of the transposed (backward) program, else forward
    if any is under jvp, else the rest of the step."""
    if not op_names:
        return "unattributed"
    if any("transpose(" in n for n in op_names):
        return "backward"
    if any("jvp(" in n for n in op_names):
        return "forward"
    return "rest (optimiser, EMA, guard, RNG)"


def summarize(trace_dir: str, hlo_text: str, module: str, calls: int,
              seconds_per_call: float | None = None) -> dict:
    """Per-call milliseconds by kind, by pass, and the top ops, from the trace under
    ``trace_dir`` of ``calls`` calls of the module whose name starts with ``module``."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        trace = json.load(f)
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in names.items() if n.startswith("/device:")}
    ops = hlo_ops(hlo_text)
    per_op: collections.Counter = collections.Counter()
    for e in trace["traceEvents"]:
        args = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in args:
            continue
        if device_pids and e["pid"] not in device_pids:
            continue
        if not str(args.get("hlo_module", "")).startswith(module):
            continue
        per_op[args["hlo_op"]] += e["dur"] / 1000.0 / calls  # ms per call
    by_kind: collections.Counter = collections.Counter()
    by_pass: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for op, ms in per_op.items():
        info = ops.get(op, {"kind": "unknown (not in the HLO text)", "pass": "?"})
        by_kind[info["kind"]] += ms
        by_pass[info["pass"]] += ms
        count[info["kind"]] += 1
    total = sum(per_op.values())
    top = [{"op": op, "ms": ms, "kind": ops.get(op, {}).get("kind", "?"),
            "op_name": ops.get(op, {}).get("op_name", "")} for op, ms in per_op.most_common(15)]
    return {"total_ms": total, "ops": len(per_op),
            "wall_ms": seconds_per_call * 1000 if seconds_per_call else None,
            "by_kind": dict(by_kind.most_common()), "ops_by_kind": dict(count),
            "by_pass": dict(by_pass.most_common()), "top": top,
            "kernels_by_pass": kernel_counts(hlo_text)}


def profile(compiled, args: tuple, steps: int, out_dir: str,
            donate: bool = False) -> tuple[dict, object]:
    """Runs ``compiled(*args)`` ``steps`` times under the profiler (feeding its first output
    back as the first argument when ``donate``: a train step's state); the summary and the
    last call's output."""
    import jax

    shutil.rmtree(out_dir, ignore_errors=True)
    out = compiled(*args)  # warm: nothing of the first call in the trace
    jax.block_until_ready(out)
    if donate:
        args = (out[0],) + tuple(args[1:])
    jax.profiler.start_trace(out_dir)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = compiled(*args)
        jax.block_until_ready(out)
        if donate:
            args = (out[0],) + tuple(args[1:])
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    hlo = compiled.as_text()
    module = re.search(r"HloModule (\S+?)[,\s]", hlo).group(1)
    return summarize(out_dir, hlo, module, steps, wall), out


def format_summary(s: dict) -> str:
    lines = [f"traced {s['total_ms']:.1f} ms per call over {s['ops']} ops"
             + (f" (wall {s['wall_ms']:.1f} ms; ops may overlap or leave gaps)"
                if s.get("wall_ms") else "")]
    total = s["total_ms"] or 1.0
    lines.append("| kind | ms | share | ops |")
    lines.append("|---|---|---|---|")
    for kind, ms in s["by_kind"].items():
        lines.append(f"| {kind} | {ms:.2f} | {ms / total:.1%} | {s['ops_by_kind'][kind]} |")
    lines.append("| pass | ms | share |")
    lines.append("|---|---|---|")
    for name, ms in s["by_pass"].items():
        lines.append(f"| {name} | {ms:.2f} | {ms / total:.1%} |")
    if s.get("kernels_by_pass"):
        lines.append("compiled operations doing work, by pass: " + ", ".join(
            f"{name} {n}" for name, n in s["kernels_by_pass"].items()))
    lines.append("top ops:")
    for t in s["top"]:
        lines.append(f"  {t['ms']:7.2f} ms  {t['kind']:<28} {t['op']:<28} {t['op_name'][-90:]}")
    return "\n".join(lines)


def main() -> None:
    """The train step of an experiment on this machine's default backend."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--config", default="experiments/fashion_mnist.py")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="/tmp/diffjax_step_profile")
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from diffjax import hugepages, parallel

    hugepages.maybe_reexec()  # as diffjax.main runs: huge pages, then its XLA options
    parallel.xla_defaults()
    import jax
    import numpy as np

    from diffjax import configlib, experiment
    from diffjax.train import loop

    c = configlib.load_config_file(args.config)
    c.data.batch_size = args.batch
    mesh = parallel.make_mesh()
    exp = experiment.build(c, num_devices=parallel.num_data_shards(mesh))
    trainer = loop.Trainer(exp.task, exp.optim, exp.train, mesh)
    state = trainer.new_state()
    rng = np.random.default_rng(0)
    s, ch = c.data.image_size, c.data.channels
    batch = {"image": rng.uniform(-1, 1, (args.batch, s, s, ch)).astype(np.float32),
             "label": rng.integers(0, max(c.data.num_classes, 1), (args.batch,)).astype(np.int32)}
    batch = jax.device_put(batch, parallel.data_sharding(mesh))
    compiled = trainer.train_step.lower(state, batch).compile()
    summary, _ = profile(compiled, (state, batch), args.steps, args.out, donate=True)
    print(f"{args.config} train step, batch {args.batch}, {jax.devices()[0].device_kind}")
    print(format_summary(summary))


if __name__ == "__main__":
    main()
