"""Per-step figures read from a compiled module's HLO text, with every loop body weighted by its trip count.

XLA's `cost_analysis()` visits a while loop's body once. The model runs its layers in `lax.scan`, so for a3b (one
dense layer, then 27 MoE layers in one scan) it counts two layers of 28, and libtpu's cost model returns a
negative `optimal_seconds` for the train step (it cannot price the ragged all-to-all and Mosaic calls). This
module walks the HLO call graph instead:

- each computation gets a multiplier: how many times one step runs it (a while body runs trip-count times per run
  of its caller; the trip count is read from the loop condition `i < N` and the loop's initial `i`);
- matmul FLOPs come from `dot` (2 * output elements * contracted size), `convolution` (2 * output elements *
  kernel input features * window) and Mosaic/Triton custom calls (the `cost_estimate` their Pallas kernels carry);
- bytes are what each top-level instruction reads from and writes to HBM, by the rules of XLA's own
  `HloCostAnalysis`: operands plus results, except that a slice or dynamic-slice reads only the slice, an in-place
  dynamic-update-slice reads and writes only the update, and a fusion reads of each operand only the slices its
  fused computation takes (one layer of a scan-stacked array, not the stack) and writes only the update of a root
  dynamic-update-slice;
- collectives are counted with their result bytes per chip.

`roofline_seconds` turns that into a step-time estimate: per instruction max(FLOPs / peak, bytes / HBM bandwidth),
plus collective bytes over the ICI bandwidth. It is a model, not a measurement; the test suite checks it against
XLA's own `optimal_seconds` where XLA gives one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

COLLECTIVES = ("all-gather", "all-to-all", "ragged-all-to-all", "reduce-scatter", "all-reduce", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "f8e4m3fn": 1, "f8e5m2": 1}  # fmt: skip
# Instructions that move no data of their own (views, tuples, control flow whose bodies are counted themselves).
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "iota", "copy-start", "copy-done", "opt-barrier",
               "add-dependency", "domain"}  # fmt: skip

_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COST_FLOPS = re.compile(
    r'"cost_estimate":\{"flops":"?(\d+)"?(?:,"transcendentals":"?\d+"?)?(?:,"bytes_accessed":"?(\d+)"?)?'
)
_COLLECTIVE_OP = re.compile(r"^(" + "|".join(sorted(COLLECTIVES, key=len, reverse=True)) + r")(-start)?$")


@dataclasses.dataclass
class Instruction:
    name: str
    type_text: str  # "bf16[8,2560]{1,0}" or a tuple of them
    opcode: str
    operands: list[str]
    attrs: str  # everything after the operand list
    index: int | None = None  # a parameter's number (`parameter(2)`)

    def called(self, key: str) -> list[str]:
        m = re.search(key + r"=\{?%?([^,}\s]+(?:,\s*%[^,}\s]+)*)\}?", self.attrs)
        return [c.strip().lstrip("%") for c in m.group(1).split(",")] if m else []


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    instructions: list[Instruction]
    root: str = ""  # the ROOT instruction's name

    @functools.cached_property
    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for i in self.instructions}

    @functools.cached_property
    def users(self) -> dict[str, list[Instruction]]:
        """Each instruction's users in this computation, once per user (as XLA's `users()`)."""
        out: dict[str, list[Instruction]] = {}
        for inst in self.instructions:
            for name in dict.fromkeys(inst.operands):
                out.setdefault(name, []).append(inst)
        return out

    @functools.cached_property
    def parameters(self) -> dict[int, Instruction]:
        return {i.index: i for i in self.instructions if i.opcode == "parameter" and i.index is not None}


def _split_operands(rest: str) -> tuple[str, str]:
    """`rest` starts just after `opcode(`: return (operand text, attribute text) at the matching `)`."""
    depth = 0
    for i, ch in enumerate(rest):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                return rest[:i], rest[i + 1 :]
            depth -= 1
    return rest, ""


def parse_module(text: str) -> dict[str, Computation]:
    comps: dict[str, Computation] = {}
    current: Computation | None = None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = Computation(m.group(2), bool(m.group(1)), [])
            continue
        if line.startswith("}"):
            comps[current.name] = current
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            operand_text, attrs = _split_operands(m.group(5))
            operands = re.findall(r"%([^\s,()]+)", operand_text)
            index = int(operand_text) if m.group(4) == "parameter" and operand_text.strip().isdigit() else None
            current.instructions.append(Instruction(m.group(2), m.group(3), m.group(4), operands, attrs, index))
            if m.group(1):
                current.root = m.group(2)
    return comps


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(d, tuple(int(x) for x in s.split(",") if x)) for d, s in _ARRAY.findall(type_text) if d in DTYPE_BYTES]


def type_bytes(type_text: str, last_only: bool = False) -> int:
    """Bytes of every array in an HLO type (a tuple's elements summed), or of its last array only."""
    found = arrays(type_text)
    if last_only:
        found = found[-1:]
    return sum(DTYPE_BYTES[d] * math.prod(s) for d, s in found)


def _shape(comp: Computation, name: str) -> tuple[int, ...] | None:
    inst = comp.by_name.get(name)
    if inst is None:
        return None
    found = arrays(inst.type_text)
    return found[0][1] if len(found) == 1 else None


def instruction_flops(inst: Instruction, comp: Computation) -> float:
    """Matmul FLOPs of one instruction (0 for anything else)."""
    if inst.opcode == "custom-call":
        m = _COST_FLOPS.search(inst.attrs)
        return float(m.group(1)) if m else 0.0
    if inst.opcode not in ("dot", "convolution"):
        return 0.0
    out = arrays(inst.type_text)
    if not out:
        return 0.0
    out_elems = math.prod(out[0][1])
    lhs = _shape(comp, inst.operands[0])
    if inst.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attrs)
        if lhs is None or not m:
            return 0.0
        return 2.0 * out_elems * math.prod(lhs[int(d)] for d in m.group(1).split(",") if d)
    rhs = _shape(comp, inst.operands[1]) if len(inst.operands) > 1 else None
    m = re.search(r"dim_labels=([^_]+)_([^-]+)->(\w+)", inst.attrs)
    if lhs is None or rhs is None or not m or (len(m.group(1)), len(m.group(2))) != (len(lhs), len(rhs)):
        return 0.0
    lhs_dims = dict(zip(m.group(1), lhs, strict=True))
    rhs_dims = dict(zip(m.group(2), rhs, strict=True))
    out_dims = dict(zip(m.group(3), out[0][1], strict=False))
    window = _window(inst.attrs)
    taps = 1
    for d in sorted(k for k in rhs_dims if k.isdigit()):
        taps *= _valid_taps(lhs_dims[d], rhs_dims[d], out_dims[d], *(attr[int(d)] for attr in window))
    # XLA writes some dots as convolutions whose "window" slides over zero padding (a head axis of 20 becomes a
    # window of 20 over 19 + 1 + 19 padded positions): only taps that land on the input do work.
    return 2.0 * out_dims.get("b", 1) * out_dims.get("f", 1) * rhs_dims["i"] * taps


def _window(attrs: str) -> tuple[list, list, list, list]:
    """Per spatial dim: (low padding, stride, lhs dilation, rhs dilation) from `window={size=.. pad=.. ...}`."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(f.split("=", 1) for f in m.group(1).split()) if m else {}
    n = len(fields.get("size", "").split("x")) if "size" in fields else 0

    def ints(key: str, default: int) -> list[int]:
        return [int(v) for v in fields[key].split("x")] if key in fields else [default] * n

    pad_low = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * n
    return pad_low, ints("stride", 1), ints("lhs_dilate", 1), ints("rhs_dilate", 1)


def _valid_taps(size: int, window: int, out: int, pad_low: int, stride: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """Number of (output position, window position) pairs of one spatial dim that read a real input element."""
    extent = (size - 1) * lhs_dilate + 1
    total = 0
    for w in range(window):
        offset = w * rhs_dilate - pad_low  # input position = o * stride + offset
        lo = max(0, math.ceil(-offset / stride))
        hi = min(out, math.ceil((extent - offset) / stride))
        if hi > lo:
            total += hi - lo if lhs_dilate == 1 else sum((o * stride + offset) % lhs_dilate == 0 for o in range(lo, hi))
    return total


def _operand_bytes(comp: Computation, name: str) -> int:
    inst = comp.by_name.get(name)
    return type_bytes(inst.type_text) if inst is not None else 0


def _parameter_read_bytes(module: Module, comp: Computation, param: Instruction) -> int:
    """HBM bytes a fusion reads through one parameter of its fused computation `comp`, as XLA's
    `HloCostAnalysis::FusionParameterReadBytes` counts them: a slice or dynamic-slice of it reads only the slice,
    a dynamic-update-slice into it reads nothing (the buffer is updated in place), a broadcast or reshape reads it
    whole, and every other user shares one whole read. A nested fusion is followed into its own parameter."""
    if len(arrays(param.type_text)) != 1:  # a tuple-typed parameter: counted whole
        return type_bytes(param.type_text)
    whole = type_bytes(param.type_text)
    size, seen_whole = 0, False
    for user in comp.users.get(param.name, []):
        if user.opcode == "fusion":
            inner = module.computations[user.called("calls")[0]]
            root = inner.by_name.get(inner.root)
            for idx in (i for i, o in enumerate(user.operands) if o == param.name):
                nested_param = inner.parameters[idx]
                # XLA calls a nested fusion simple when this parameter feeds its root directly.
                simple = root is not None and (not root.operands or root.operands[0] == nested_param.name)
                nested_seen = False
                for fusion_user in comp.users.get(user.name, []):
                    if simple and fusion_user.opcode == "slice":
                        size += type_bytes(fusion_user.type_text)
                    elif simple and fusion_user.opcode == "dynamic-slice":
                        if fusion_user.operands[0] == user.name:
                            size += type_bytes(fusion_user.type_text)
                        elif not nested_seen:
                            nested_seen = True
                            size += type_bytes(user.type_text)
                    elif simple and fusion_user.opcode == "dynamic-update-slice":
                        if fusion_user.operands[0] != user.name and not nested_seen:
                            nested_seen = True
                            size += type_bytes(user.type_text)
                    elif not nested_seen:
                        nested_seen = True
                        size += _parameter_read_bytes(module, inner, nested_param)
        elif user.opcode == "slice":
            size += type_bytes(user.type_text)
        elif user.opcode == "dynamic-slice":
            if user.operands[0] == param.name:
                size += type_bytes(user.type_text)
            elif not seen_whole:
                seen_whole = True
                size += whole
        elif user.opcode == "dynamic-update-slice":
            if user.operands[0] != param.name and not seen_whole:
                seen_whole = True
                size += whole
        elif user.opcode in ("broadcast", "reshape"):
            size += whole
        elif not seen_whole:
            seen_whole = True
            size += whole
    return size


def _fusion_output_bytes(comp: Computation, inst: Instruction) -> int:
    """Bytes a fusion writes: its result, except that a root dynamic-update-slice (or one element of a root tuple)
    writes only its update, in place."""
    root = comp.by_name.get(comp.root)
    if root is None:
        return type_bytes(inst.type_text)
    outputs = [comp.by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
    total = 0
    for out in outputs:
        if out is not None and out.opcode == "dynamic-update-slice":
            total += _operand_bytes(comp, out.operands[1])
        elif out is not None:
            total += type_bytes(out.type_text)
    return total


def instruction_bytes(module: Module, comp: Computation, inst: Instruction) -> int:
    """HBM bytes one top-level instruction reads and writes, by the rules of XLA's `HloCostAnalysis`: operands plus
    result, except slices (read and write the slice), dynamic-update-slices (read and write the update, in place)
    and fusions (see `_parameter_read_bytes` and `_fusion_output_bytes`). Views, control flow and collectives move
    no HBM bytes here (collectives are counted apart); a Pallas call carries its own estimate."""
    if inst.opcode in _NO_TRAFFIC or _COLLECTIVE_OP.match(inst.opcode.removesuffix("-done")):
        return 0
    if inst.opcode == "custom-call":
        m = _COST_FLOPS.search(inst.attrs)
        if m and m.group(2):
            return int(m.group(2))
    if inst.opcode == "slice":
        return 2 * type_bytes(inst.type_text)
    if inst.opcode == "dynamic-slice":  # XLA adds the first start index only
        return 2 * type_bytes(inst.type_text) + _operand_bytes(comp, inst.operands[1])
    if inst.opcode == "dynamic-update-slice":
        return 2 * _operand_bytes(comp, inst.operands[1]) + _operand_bytes(comp, inst.operands[2])
    if inst.opcode == "fusion":
        fused = module.computations[inst.called("calls")[0]]
        read = sum(_parameter_read_bytes(module, fused, p) for _, p in sorted(fused.parameters.items()))
        return read + _fusion_output_bytes(fused, inst)
    return sum(_operand_bytes(comp, o) for o in inst.operands) + type_bytes(inst.type_text)


class Module:
    """A parsed HLO module with per-computation run counts."""

    def __init__(self, text: str):
        self.computations = parse_module(text)
        entries = [c for c in self.computations.values() if c.entry]
        if len(entries) != 1:
            raise ValueError(f"expected one ENTRY computation in the HLO text, found {len(entries)}")
        self.entry = entries[0]
        self.constants = self._constants(text)
        self.unknown_trip_counts: list[str] = []
        self.trip_counts: dict[str, int] = {}
        self.fused: set[str] = set()  # computations inlined into a fusion (their traffic is the fusion's)
        self.callers: dict[str, list[tuple[str, int]]] = {}
        for comp in self.computations.values():
            for inst in comp.instructions:
                for callee, factor, fused in self._callees(comp, inst):
                    self.callers.setdefault(callee, []).append((comp.name, factor))
                    if fused:
                        self.fused.add(callee)

    @staticmethod
    def _constants(text: str) -> dict[str, int]:
        """Scalar integer constants by instruction name (`%c = s32[] constant(27)`)."""
        out = {}
        for m in re.finditer(r"%([^\s=]+)\s*=\s*[su](?:8|16|32|64)\[\]\S*\s+constant\((-?\d+)\)", text):
            out[m.group(1)] = int(m.group(2))
        return out

    def _trip_count(self, comp: Computation, loop: Instruction) -> int | None:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
        if m:
            return int(m.group(1))
        cond = self.computations.get((loop.called("condition") or [""])[0])
        if cond is None or not cond.instructions:
            return None
        root = next((i for i in cond.instructions if i.opcode == "compare"), None)
        if root is None or len(root.operands) != 2:
            return None
        direction = re.search(r"direction=(\w+)", root.attrs)
        a, b = (cond.by_name.get(o) for o in root.operands)
        if a is None or b is None:
            return None
        if a.opcode == "constant" and b.opcode == "get-tuple-element":
            a, b = b, a
            flip = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}
            op = flip.get(direction.group(1), direction.group(1)) if direction else None
        else:
            op = direction.group(1) if direction else None
        limit = self.constants.get(b.name)
        if a.opcode != "get-tuple-element" or limit is None or op not in ("LT", "LE"):
            return None
        index = int(re.search(r"index=(\d+)", a.attrs).group(1))
        init = 0
        state = comp.by_name.get(loop.operands[0]) if loop.operands else None
        if state is not None and state.opcode == "tuple" and index < len(state.operands):
            init = self.constants.get(state.operands[index], 0)
        return max(0, limit - init + (op == "LE"))

    def _callees(self, comp: Computation, inst: Instruction):
        """(callee, runs per run of inst, fused?) for every computation `inst` calls."""
        if inst.opcode == "while":
            trips = self._trip_count(comp, inst)
            if trips is None:
                self.unknown_trip_counts.append(inst.name)
                trips = 1
            body = inst.called("body")
            for b in body:
                self.trip_counts[b] = trips
                yield b, trips, False
            for c in inst.called("condition"):
                yield c, trips + 1, False
        elif inst.opcode == "fusion":
            for c in inst.called("calls"):
                yield c, 1, True
        elif inst.opcode in ("call", "async-start", "custom-call"):
            for c in inst.called("calls") + inst.called("to_apply"):
                yield c, 1, False
        elif inst.opcode == "conditional":
            # Every branch is counted as if taken: an upper bound (the train step has no conditionals on its path).
            for key in ("branch_computations", "true_computation", "false_computation"):
                for c in inst.called(key):
                    yield c, 1, False
        # reduce/scatter/sort/all-reduce `to_apply` are scalar combiners: no matmuls, no traffic of their own.

    @functools.cache  # noqa: B019 - one Module per compiled program
    def runs(self, name: str) -> int:
        """How many times one execution of the module runs computation `name`."""
        if name == self.entry.name:
            return 1
        return sum(self.runs(caller) * factor for caller, factor in self.callers.get(name, []))

    @functools.cache  # noqa: B019 - a fused computation can be called from many fusions
    def _fused_flops(self, name: str) -> float:
        comp = self.computations.get(name)
        if comp is None:
            return 0.0
        total = 0.0
        for inst in comp.instructions:
            total += instruction_flops(inst, comp)
            if inst.opcode == "fusion":
                total += sum(self._fused_flops(c) for c in inst.called("calls"))
        return total

    def top_level(self):
        """(computation, instruction, runs) for each instruction outside fusions and scalar combiners."""
        for comp in self.computations.values():
            if comp.name in self.fused or (comp.name not in self.callers and not comp.entry):
                continue
            n = self.runs(comp.name)
            if n == 0:
                continue
            for inst in comp.instructions:
                yield comp, inst, n

    @functools.cached_property
    def op_costs(self) -> list[tuple[float, int, int, Instruction]]:
        """(flops, HBM bytes, runs, instruction) of each top-level instruction, computed once per module."""
        out = []
        for comp, inst, n in self.top_level():
            if inst.opcode == "fusion":
                flops = sum(self._fused_flops(c) for c in inst.called("calls"))
            else:
                flops = instruction_flops(inst, comp)
            out.append((flops, instruction_bytes(self, comp, inst), n, inst))
        return out

    def flops(self, weighted: bool = True) -> float:
        return sum(f * (n if weighted else 1) for f, _, n, _ in self.op_costs)

    def flops_by_kernel(self) -> dict[str, float]:
        """Weighted FLOPs split into XLA's own matmuls ("xla") and each Pallas kernel (by its pallas_call name)."""
        out: dict[str, float] = {"xla": 0.0}
        for flops, _, n, inst in self.op_costs:
            if not flops:
                continue
            key = re.sub(r"\.\d+$", "", inst.name) if inst.opcode == "custom-call" else "xla"
            out[key] = out.get(key, 0.0) + flops * n
        return out

    def collectives(self, weighted: bool = True) -> dict[str, dict[str, int]]:
        """Per collective kind: instructions run per step and their result bytes per chip."""
        out = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}
        for comp, inst, n in self.top_level():
            m = _COLLECTIVE_OP.match(inst.opcode)
            if not m:
                continue
            k = n if weighted else 1
            # An async `-start` returns (operands..., result): the result is its last array.
            size = type_bytes(inst.type_text, last_only=True)
            if m.group(1) == "ragged-all-to-all" and inst.operands and inst.operands[0] in comp.by_name:
                # Its output buffer is sized for the worst case (every row landing on one device); the rows that
                # move are at most the smaller of the send and receive buffers, and about that when balanced.
                size = min(size, type_bytes(comp.by_name[inst.operands[0]].type_text))
            out[m.group(1)]["count"] += k
            out[m.group(1)]["bytes"] += k * size
        return out


# What a fusion does, by the opcodes inside it, most telling first: its kind in the roofline's breakdown.
_FUSION_KINDS = (
    (("dot", "convolution"), "matmul"),
    (("sort",), "sort"),
    (("scatter",), "scatter"),
    (("gather",), "gather"),
    (("dynamic-update-slice",), "dynamic-update-slice"),
    (("dynamic-slice",), "dynamic-slice"),
    (("reduce", "reduce-window"), "reduce"),
)
_OP_KINDS = {"copy": "copy", "transpose": "copy", **{op: kind for ops, kind in _FUSION_KINDS for op in ops}}


def _fused_opcodes(module: Module, inst: Instruction) -> set[str]:
    """The opcodes inside a fusion, through the fusions nested in it (XLA:TPU nests them)."""
    found, pending = set(), list(inst.called("calls"))
    while pending:
        for inner in module.computations[pending.pop()].instructions:
            found.add(inner.opcode)
            if inner.opcode == "fusion":
                pending += inner.called("calls")
    return found


def op_kind(module: Module, inst: Instruction) -> str:
    """A top-level instruction's kind: "matmul", "sort", "scatter", "gather", "dynamic-update-slice",
    "dynamic-slice", "reduce", "copy", "elementwise" (a fusion of none of those), "kernel:NAME" (a Pallas call),
    or else its opcode."""
    if inst.opcode == "custom-call":
        return "kernel:" + re.sub(r"\.\d+$", "", inst.name)
    if inst.opcode == "fusion":
        inside = _fused_opcodes(module, inst)
        return next((kind for opcodes, kind in _FUSION_KINDS if inside & set(opcodes)), "elementwise")
    return _OP_KINDS.get(inst.opcode, inst.opcode)


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One top-level instruction's share of a step, per chip, over all the runs one step makes of it."""

    name: str
    kind: str  # op_kind
    shape: str  # its result type without layouts, e.g. "bf16[8,4096,2560]"
    runs: int  # times one step runs it (loop trip counts)
    flops: float
    bytes: float  # HBM traffic: operands plus result
    seconds: float  # runs * max(FLOPs / peak, bytes / HBM bandwidth)
    bound: str  # "compute" or "memory": which side of the max won


def op_times(module: Module, peak_flops: float, hbm_bytes_per_s: float) -> list[OpTime]:
    """Every top-level instruction that takes time in the roofline model, slowest first."""
    out = []
    for flops, traffic, n, inst in module.op_costs:
        compute_s, memory_s = flops / peak_flops, traffic / hbm_bytes_per_s
        if compute_s or memory_s:
            out.append(
                OpTime(
                    name=inst.name,
                    kind=op_kind(module, inst),
                    shape=re.sub(r"\{[^}]*\}", "", inst.type_text),
                    runs=n,
                    flops=n * flops,
                    bytes=n * traffic,
                    seconds=n * max(compute_s, memory_s),
                    bound="compute" if compute_s >= memory_s else "memory",
                )
            )
    return sorted(out, key=lambda op: op.seconds, reverse=True)


def seconds_by_kind(ops: list[OpTime]) -> dict[str, float]:
    """The roofline compute time split by op kind, largest first."""
    out: dict[str, float] = {}
    for op in ops:
        out[op.kind] = out.get(op.kind, 0.0) + op.seconds
    return dict(sorted(out.items(), key=lambda item: item[1], reverse=True))


def roofline_seconds(module: Module, peak_flops: float, hbm_bytes_per_s: float, ici_bytes_per_s: float) -> dict:
    """Step-time estimate per chip: each top-level instruction takes max(FLOPs / peak, bytes / HBM bandwidth)
    (XLA's own per-op model), collectives take result bytes / ICI bandwidth. `overlapped` assumes communication
    hides behind compute, `serial` that it does not."""
    compute = sum(op.seconds for op in op_times(module, peak_flops, hbm_bytes_per_s))
    comm = sum(c["bytes"] for c in module.collectives().values()) / ici_bytes_per_s
    return {"compute_s": compute, "collective_s": comm, "overlapped_s": max(compute, comm), "serial_s": compute + comm}
