"""Just enough of U-Boot's hush shell to run deploy/uboot/*/boot.cmd against a disk image.

What the scripts may use, and nothing more (a script that needs more fails here first): local
variables (``name=value``), ``${name}`` (the environment, then locals), ``if/elif/else/fi``
with ``&&``/``||``, ``test`` (= != -z -n -gt -ge -lt -le -eq -ne), ``setenv``, ``echo``, ``run``,
``env export -t ADDR`` / ``env export -c -s SIZE ADDR``, ``env import [-d] -c ADDR SIZE`` /
``env import -t ADDR SIZE``, and ``<iface> dev N`` / ``<iface> read|write ADDR BLK CNT`` on the
image; quoting as hush has it ("..." expands, '...' keeps ``${name}`` for a later ``run``).
``setexpr`` is deliberately absent (Debian's qemu-x86 U-Boot has none). The environment
block is U-Boot's: CRC32 (little-endian) of the data, then ``name=value\\0`` pairs — what
fw_printenv reads, so a test can check the script's writes with libubootenv.

As real U-Boot (2023.01, cli_hush.c) has it: local variables are the shell's own, not the
environment's, so ``env import -d`` (which replaces the whole environment) keeps them; a
``${name}`` is looked up in the environment first (``lookup_param``: env_get, then the local
variable), so a script's local must not share a name with an environment variable.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 512


class ShellError(Exception):
    """The script used something this shell (and so the scripts' contract) does not have."""


@dataclass
class UBoot:
    disk: Path
    env: dict[str, str] = field(default_factory=dict)  # U-Boot's own (the board's) environment
    memory: dict[int, bytes] = field(default_factory=dict)
    locals: dict[str, str] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    booted: str | None = None  # the command run last by `run sshfwup_boot_*`

    # --- parsing ------------------------------------------------------------------------------

    def source(self, text: str) -> None:
        statements = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for part in _split(line, ";"):
                part = part.strip()
                word, _, rest = part.partition(" ")
                if word in ("then", "else") and rest:
                    statements += [word, rest.strip()]
                elif part:
                    statements.append(part)
        block, end = self._parse(statements, 0, ())
        assert end == len(statements)
        self._run_block(block)

    def _parse(self, st: list[str], i: int, stops: tuple[str, ...]) -> tuple[list, int]:
        block: list = []
        while i < len(st):
            word = st[i].split(" ", 1)[0]
            if word in stops:
                return block, i
            if word == "if":
                branches = []
                cond = st[i][3:]
                while True:
                    if st[i + 1] != "then":
                        raise ShellError(f"expected then after {st[i]!r}")
                    body, i = self._parse(st, i + 2, ("elif", "else", "fi"))
                    branches.append((cond, body))
                    word = st[i].split(" ", 1)[0]
                    if word == "elif":
                        cond = st[i][5:]
                        continue
                    otherwise: list = []
                    if word == "else":
                        otherwise, i = self._parse(st, i + 1, ("fi",))
                    block.append(("if", branches, otherwise))
                    i += 1
                    break
            else:
                block.append(("cmd", st[i]))
                i += 1
        if stops:
            raise ShellError(f"missing {stops[-1]}")
        return block, i

    # --- running ------------------------------------------------------------------------------

    def _run_block(self, block: list) -> None:
        for node in block:
            if node[0] == "cmd":
                self._command(node[1])
            else:
                for cond, body in node[1]:
                    if self._condition(cond):
                        self._run_block(body)
                        break
                else:
                    self._run_block(node[2])

    def _condition(self, text: str) -> bool:
        parts = re.split(r"\s(&&|\|\|)\s", text)
        result = self._command(parts[0])
        for op, cmd in zip(parts[1::2], parts[2::2]):
            result = (result and self._command(cmd)) if op == "&&" else (result or self._command(cmd))
        return result

    def _expand(self, word: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.env.get(m.group(1), self.locals.get(m.group(1), "")), word)

    def _words(self, text: str) -> list[str]:
        """Words as hush splits them: "..." expands ${name}, '...' keeps it, "" is an argument."""
        words: list[str] = []
        current: str | None = None
        i = 0
        while i < len(text):
            c = text[i]
            if c in "\"'":
                end = text.index(c, i + 1)
                inner = text[i + 1 : end]
                current = (current or "") + (self._expand(inner) if c == '"' else inner)
                i = end + 1
            elif c.isspace():
                if current is not None:
                    words.append(current)
                    current = None
                i += 1
            else:
                end = i
                while end < len(text) and not text[end].isspace() and text[end] not in "\"'":
                    end += 1
                current = (current or "") + self._expand(text[i:end])
                i = end
        if current is not None:
            words.append(current)
        return words

    def _command(self, text: str) -> bool:
        m = re.fullmatch(r"(\w+)=(\S*)", text)
        if m:
            self.locals[m.group(1)] = self._expand(m.group(2))
            return True
        words = self._words(text)
        name, args = words[0], words[1:]
        if name == "setenv":
            if len(args) == 1:
                self.env.pop(args[0], None)
            else:
                self.env[args[0]] = " ".join(args[1:])
            return True
        if name == "echo":
            self.output.append(" ".join(args))
            return True
        if name == "test":
            return _test(args)
        if name == "run":
            if args[0].startswith("sshfwup_boot_"):
                self.booted = args[0]
                return True
            self.source(self.env[args[0]])
            return True
        if name == "env":
            return self._env(args)
        if len(args) >= 1 and args[0] == "dev":
            return True
        if len(args) == 4 and args[0] in ("read", "write"):
            addr, blk, cnt = (int(x, 16) for x in args[1:])
            with open(self.disk, "r+b") as f:
                f.seek(blk * BLOCK)
                if args[0] == "read":
                    self.memory[addr] = f.read(cnt * BLOCK)
                else:
                    f.write(self.memory[addr][: cnt * BLOCK])
            return True
        raise ShellError(f"command not available to the boot scripts: {text!r}")

    def _env(self, args: list[str]) -> bool:
        op, flags = args[0], [a for a in args[1:] if a.startswith("-")]
        rest = [a for a in args[1:] if not a.startswith("-")]
        if op == "export" and flags == ["-t"]:
            text = "".join(f"{k}={v}\n" for k, v in sorted(self.env.items())).encode()
            self.memory[int(rest[0], 16)] = text
            self.env["filesize"] = f"{len(text):x}"
            return True
        if op == "export" and flags == ["-c", "-s"]:
            size, addr = int(rest[0], 16), int(rest[1], 16)
            data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in sorted(self.env.items())) + b"\0"
            data = data.ljust(size - 4, b"\0")
            self.memory[addr] = (zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "little") + data
            return True
        if op == "import" and set(flags) <= {"-d", "-c"} and "-c" in flags:
            addr, size = int(rest[0], 16), int(rest[1], 16)
            raw = self.memory[addr][:size]
            if zlib.crc32(raw[4:]) & 0xFFFFFFFF != int.from_bytes(raw[:4], "little"):
                # as U-Boot's do_env_import: checked before anything is imported or deleted
                self.output.append("## Error: bad CRC, import failed")
                return False
            if "-d" in flags:
                self.env.clear()
            for pair in raw[4:].split(b"\0\0", 1)[0].split(b"\0"):
                if pair:
                    k, _, v = pair.decode().partition("=")
                    self.env[k] = v
            return True
        if op == "import" and flags == ["-t"]:
            text = self.memory[int(rest[0], 16)][: int(rest[1], 16)].decode()
            for line in text.splitlines():
                k, _, v = line.partition("=")
                self.env[k] = v
            return True
        raise ShellError(f"env {' '.join(args)}: not available to the boot scripts")


def _split(line: str, sep: str) -> list[str]:
    parts, current, quote = [], "", ""
    for c in line:
        if c in "\"'" and (not quote or quote == c):
            quote = "" if quote else c
        if c == sep and not quote:
            parts.append(current)
            current = ""
        else:
            current += c
    return [*parts, current]


def _test(args: list[str]) -> bool:
    if len(args) == 2 and args[0] in ("-z", "-n"):
        return (args[1] == "") == (args[0] == "-z")
    if len(args) != 3:
        raise ShellError(f"test {args}: not a form the scripts may use")
    a, op, b = args
    if op in ("=", "!="):
        return (a == b) == (op == "=")
    numbers = {"-gt": int.__gt__, "-ge": int.__ge__, "-lt": int.__lt__, "-le": int.__le__, "-eq": int.__eq__, "-ne": int.__ne__}
    if op in numbers:
        return numbers[op](int(a, 0), int(b, 0))
    raise ShellError(f"test: unknown operator {op}")
