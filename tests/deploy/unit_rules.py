"""Run a command under two rules of a systemd unit, installed as systemd 252 installs them
(seccomp filters), without systemd: ``MemoryDenyWriteExecute=yes`` and
``RestrictAddressFamilies=``.

    python unit_rules.py [--memory-deny-write-execute] [--families AF_INET,...] -- ARGV...

MemoryDenyWriteExecute: ``mmap`` of memory both writable and executable, ``mprotect``
and ``pkey_mprotect`` asking for execute, and ``shmat`` with ``SHM_EXEC`` fail with EPERM.
RestrictAddressFamilies: ``socket()`` of any other family fails with EAFNOSUPPORT. The
filters outlive ``execve`` and pass to children, as under systemd; everything else is
allowed. Linux on x86-64 and arm64 only (``supported()``).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import socket
import struct

# (audit architecture, syscall numbers) of the architectures this knows.
_ARCHES = {
    "x86_64": (0xC000003E, {"mmap": 9, "mprotect": 10, "shmat": 30, "socket": 41}),
    "aarch64": (0xC00000B7, {"mmap": 222, "mprotect": 226, "shmat": 196, "socket": 198}),
}
_PKEY_MPROTECT = {"x86_64": 329, "aarch64": 288}

_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_AND = 0x54  # BPF_ALU | BPF_AND | BPF_K
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
# struct seccomp_data: int nr, u32 arch, u64 instruction_pointer, u64 args[6]; the low
# half of an argument comes first (little-endian machines only, as above).
_NR, _ARCH = 0, 4


def _arg(index: int) -> int:
    return 16 + 8 * index


_PROT_WRITE, _PROT_EXEC = 0x2, 0x4
_SHM_EXEC = 0o100000
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2

Instruction = tuple[int, int, int, int]


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in _ARCHES


def _when(number: int, body: list[Instruction]) -> list[Instruction]:
    """``body`` (which ends in a return) for one syscall, skipped for any other."""
    return [(_LD_ABS, 0, 0, _NR), (_JEQ, 0, len(body), number), *body]


def _deny_if_set(arg: int, bits: int) -> list[Instruction]:
    return [
        (_LD_ABS, 0, 0, _arg(arg)),
        (_JSET, 0, 1, bits),
        (_RET, 0, 0, _ERRNO | errno.EPERM),
        (_RET, 0, 0, _ALLOW),
    ]


def program(memory_deny_write_execute: bool, families: list[int] | None) -> list[Instruction]:
    """The filter: a list of classic BPF instructions (code, jt, jf, k)."""
    machine = platform.machine()
    audit_arch, numbers = _ARCHES[machine]
    # A foreign architecture's calls are not what this is about (SystemCallArchitectures=
    # refuses them under systemd).
    instructions: list[Instruction] = [
        (_LD_ABS, 0, 0, _ARCH),
        (_JEQ, 1, 0, audit_arch),
        (_RET, 0, 0, _ALLOW),
    ]
    if memory_deny_write_execute:
        write_exec = _PROT_WRITE | _PROT_EXEC
        instructions += _when(
            numbers["mmap"],
            [
                (_LD_ABS, 0, 0, _arg(2)),
                (_AND, 0, 0, write_exec),
                (_JEQ, 0, 1, write_exec),
                (_RET, 0, 0, _ERRNO | errno.EPERM),
                (_RET, 0, 0, _ALLOW),
            ],
        )
        instructions += _when(numbers["mprotect"], _deny_if_set(2, _PROT_EXEC))
        instructions += _when(_PKEY_MPROTECT[machine], _deny_if_set(2, _PROT_EXEC))
        instructions += _when(numbers["shmat"], _deny_if_set(2, _SHM_EXEC))
    if families is not None:
        # Each allowed family jumps past the others and the refusal, to ALLOW.
        allowed = [(_JEQ, len(families) - i, 0, family) for i, family in enumerate(families)]
        instructions += _when(
            numbers["socket"],
            [
                (_LD_ABS, 0, 0, _arg(0)),
                *allowed,
                (_RET, 0, 0, _ERRNO | errno.EAFNOSUPPORT),
                (_RET, 0, 0, _ALLOW),
            ],
        )
    instructions.append((_RET, 0, 0, _ALLOW))
    return instructions


def install(instructions: list[Instruction]) -> None:
    """Install the filter on this process (and so on what it execs)."""
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in instructions)
    filters = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(instructions), ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    # prctl(option, arg2, arg3, arg4, arg5): the unused ones must be 0.
    ulong = ctypes.c_ulong
    libc.prctl.argtypes = [ctypes.c_int, ulong, ctypes.c_void_p, ulong, ulong]
    # NoNewPrivileges=yes, which the units set too (and an unprivileged filter needs).
    for option, value, pointer in (
        (_PR_SET_NO_NEW_PRIVS, 1, None),
        (_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog)),
    ):
        if libc.prctl(option, value, pointer, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl({option}): {os.strerror(error)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-deny-write-execute", action="store_true")
    parser.add_argument("--families", help="comma-separated, e.g. AF_INET,AF_INET6,AF_UNIX")
    parser.add_argument("argv", nargs="+")
    args = parser.parse_args()
    families = None
    if args.families is not None:
        families = [int(getattr(socket, name)) for name in args.families.split(",")]
    install(program(args.memory_deny_write_execute, families))
    os.execvp(args.argv[0], args.argv)


if __name__ == "__main__":
    main()
