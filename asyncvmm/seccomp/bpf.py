"""Compile a seccomp policy into classic BPF; pure, no I/O.

A :class:`Filter` is what Firecracker's seccompiler JSON describes: a
default action (taken for a call no rule matches), a filter action (taken
for one that matches) and, per system call, either no rules (the call
always matches) or rules each made of conditions on the call's arguments,
all of which must hold (rules are OR-ed, conditions AND-ed).

The program checks the architecture (anything but x86_64, and x32 calls,
get the default action), loads the call number, then tests the calls in
the order given: the allowlists put the hottest calls first, so the common
path (``ioctl(KVM_RUN)`` on a vCPU thread) costs a few instructions.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Iterable

# struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }
BPF_LD_W_ABS = 0x20
BPF_ALU_AND_K = 0x54
BPF_JMP_JA = 0x05
BPF_JEQ_K = 0x15
BPF_JGT_K = 0x25
BPF_JGE_K = 0x35
BPF_RET_K = 0x06
BPF_MAXINSNS = 4096

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
OFF_NR = 0
OFF_ARCH = 4
OFF_ARGS = 16
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000

OPS = ("eq", "ne", "lt", "le", "gt", "ge", "masked_eq")


class FilterError(ValueError):
    """A policy that cannot be compiled (bad condition, program too long)."""


@dataclasses.dataclass(frozen=True)
class Cond:
    index: int                 # argument 0..5
    op: str                    # one of OPS
    val: int
    qword: bool = False        # compare all 64 bits, not only the low 32 ("dword")
    mask: int = 0              # for masked_eq: (arg & mask) == val

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 5:
            raise FilterError(f"argument index {self.index} is not 0..5")
        if self.op not in OPS:
            raise FilterError(f"unknown comparison {self.op!r} (one of {', '.join(OPS)})")
        limit = 1 << (64 if self.qword else 32)
        for what, v in (("value", self.val), ("mask", self.mask)):
            if not 0 <= v < limit:
                raise FilterError(f"{what} {v} does not fit a {'qword' if self.qword else 'dword'}")


@dataclasses.dataclass(frozen=True)
class Rule:
    conds: tuple[Cond, ...]


@dataclasses.dataclass
class Filter:
    default_action: int
    filter_action: int
    # call number -> rules; an empty list means the call matches whatever its arguments.
    rules: dict[int, list[Rule]]


# -- a tiny assembler with forward labels ---------------------------------------------

class _Asm:
    def __init__(self) -> None:
        self.items: list = []      # ("insn", code, jt, jf, k) with jt/jf/k ints or label names, or ("label", name)
        self._n = 0

    def label(self) -> str:
        self._n += 1
        return f"L{self._n}"

    def place(self, name: str) -> None:
        self.items.append(("label", name))

    def insn(self, code: int, k: int | str = 0, jt: int | str = 0, jf: int | str = 0) -> None:
        self.items.append(("insn", code, jt, jf, k))

    def assemble(self) -> list[tuple[int, int, int, int]]:
        where: dict[str, int] = {}
        pc = 0
        for item in self.items:
            if item[0] == "label":
                where[item[1]] = pc
            else:
                pc += 1
        out, pc = [], 0
        for item in self.items:
            if item[0] == "label":
                continue
            _, code, jt, jf, k = item

            def rel(target: int | str) -> int:
                return target if isinstance(target, int) else where[target] - pc - 1
            if code == BPF_JMP_JA:
                k = rel(k)
            jt, jf = rel(jt), rel(jf)
            if not (0 <= jt <= 255 and 0 <= jf <= 255 and k >= 0):
                raise FilterError("a rule is too long for a BPF conditional jump")
            out.append((code, jt, jf, k))
            pc += 1
        if len(out) > BPF_MAXINSNS:
            raise FilterError(f"the filter needs {len(out)} BPF instructions; the kernel takes {BPF_MAXINSNS}")
        return out


def _cond(a: _Asm, c: Cond, fail: str) -> None:
    """Fall through when ``c`` holds, jump to ``fail`` when it does not."""
    lo_off = OFF_ARGS + 8 * c.index
    hi_off = lo_off + 4
    val_lo, val_hi = c.val & 0xFFFF_FFFF, c.val >> 32
    if not c.qword:
        a.insn(BPF_LD_W_ABS, lo_off)
        match c.op:
            case "eq": a.insn(BPF_JEQ_K, val_lo, 0, fail)
            case "ne": a.insn(BPF_JEQ_K, val_lo, fail, 0)
            case "gt": a.insn(BPF_JGT_K, val_lo, 0, fail)
            case "ge": a.insn(BPF_JGE_K, val_lo, 0, fail)
            case "lt": a.insn(BPF_JGE_K, val_lo, fail, 0)
            case "le": a.insn(BPF_JGT_K, val_lo, fail, 0)
            case "masked_eq":
                a.insn(BPF_ALU_AND_K, c.mask)
                a.insn(BPF_JEQ_K, val_lo, 0, fail)
        return
    ok = a.label()
    match c.op:
        case "eq":
            a.insn(BPF_LD_W_ABS, hi_off); a.insn(BPF_JEQ_K, val_hi, 0, fail)
            a.insn(BPF_LD_W_ABS, lo_off); a.insn(BPF_JEQ_K, val_lo, 0, fail)
        case "ne":
            a.insn(BPF_LD_W_ABS, hi_off); a.insn(BPF_JEQ_K, val_hi, 0, ok)
            a.insn(BPF_LD_W_ABS, lo_off); a.insn(BPF_JEQ_K, val_lo, fail, 0)
        case "masked_eq":
            a.insn(BPF_LD_W_ABS, hi_off); a.insn(BPF_ALU_AND_K, c.mask >> 32); a.insn(BPF_JEQ_K, val_hi, 0, fail)
            a.insn(BPF_LD_W_ABS, lo_off); a.insn(BPF_ALU_AND_K, c.mask & 0xFFFF_FFFF)
            a.insn(BPF_JEQ_K, val_lo, 0, fail)
        case "gt" | "ge":   # high word decides unless equal, then the low word (unsigned)
            a.insn(BPF_LD_W_ABS, hi_off); a.insn(BPF_JGT_K, val_hi, ok, 0); a.insn(BPF_JEQ_K, val_hi, 0, fail)
            a.insn(BPF_LD_W_ABS, lo_off)
            a.insn(BPF_JGT_K if c.op == "gt" else BPF_JGE_K, val_lo, ok, fail)
        case "lt" | "le":
            a.insn(BPF_LD_W_ABS, hi_off); a.insn(BPF_JGE_K, val_hi, 0, ok); a.insn(BPF_JGT_K, val_hi, fail, 0)
            a.insn(BPF_LD_W_ABS, lo_off)
            a.insn(BPF_JGE_K if c.op == "lt" else BPF_JGT_K, val_lo, fail, ok)
    a.place(ok)


def compile_filter(f: Filter) -> list[tuple[int, int, int, int]]:
    """The BPF program for ``f``, as (code, jt, jf, k) instructions."""
    a = _Asm()
    default = a.label()
    a.insn(BPF_LD_W_ABS, OFF_ARCH)
    a.insn(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0)
    a.insn(BPF_JMP_JA, default)
    a.insn(BPF_LD_W_ABS, OFF_NR)
    a.insn(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1)
    a.insn(BPF_JMP_JA, default)
    for nr, rules in f.rules.items():
        next_call = a.label()
        a.insn(BPF_JEQ_K, nr, 1, 0)
        a.insn(BPF_JMP_JA, next_call)
        for rule in rules:
            next_rule = a.label()
            for c in rule.conds:
                _cond(a, c, next_rule)
            a.insn(BPF_RET_K, f.filter_action)
            a.place(next_rule)
        a.insn(BPF_RET_K, f.default_action if rules else f.filter_action)
        a.place(next_call)  # reached only by the jump above: the accumulator still holds the number
    a.place(default)
    a.insn(BPF_RET_K, f.default_action)
    return a.assemble()


def pack(program: Iterable[tuple[int, int, int, int]]) -> bytes:
    """The program as the kernel's array of ``struct sock_filter``."""
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in program)


def run(program: list[tuple[int, int, int, int]], nr: int, args: tuple[int, ...] = (),
        arch: int = AUDIT_ARCH_X86_64) -> int:
    """Interpret ``program`` for one call (tests check the compiler with this, no kernel needed)."""
    full = list(args) + [0] * (6 - len(args))
    data = struct.pack("=iIQ6Q", nr, arch, 0, *full)
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == BPF_ALU_AND_K:
            acc &= k
        elif code == BPF_JMP_JA:
            pc += k
        elif code in (BPF_JEQ_K, BPF_JGT_K, BPF_JGE_K):
            hit = {BPF_JEQ_K: acc == k, BPF_JGT_K: acc > k, BPF_JGE_K: acc >= k}[code]
            pc += jt if hit else jf
        elif code == BPF_RET_K:
            return k
        else:
            raise FilterError(f"unknown BPF instruction {code:#x}")
