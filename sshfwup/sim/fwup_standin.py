"""A stand-in for fwup, for machines where the real fwup cannot be installed. It is NOT fwup.

It implements the part of fwup that sshfwup uses, with fwup's command line, ``--framing``
protocol, output and error wording:

- ``-a -d DEV [-i FILE] -t TASK [-U] [--framing] [--exit-handshake] [-p KEY]... [-q]``
- ``-m -i FILE`` (metadata; ``meta-nickname`` is left out), ``-V -i FILE`` (verify)

Apply streams the archive (stdin or ``-i``): ZIP local headers in order, deflate through zlib,
each resource hashed while it is written; memory stays bounded whatever the resource size.
A task is chosen like fwup does: the first task, in file order, whose name starts with ``-t``
and whose requirements all hold. Functions: ``info error uboot_setenv uboot_unsetenv
uboot_clearenv raw_write raw_memset trim mbr_write``; requirements: ``require-uboot-variable
require-partition-offset``; ``require-unmounted-destination`` is accepted. ``trim`` is a no-op.

Where it is stricter than fwup, on purpose:

- U-Boot environment and MBR writes are held back and written only after on-finish ran, i.e.
  after every resource was written and verified (fwup's block cache usually behaves so too);
  the destination is fsync'ed before and after. A failure never touches the boot environment.
- With ``--framing`` the input must end with the zero-length packet; input that just stops is
  an error even when the archive inside looks complete.
- It never unmounts anything (``-U`` or not) and implements none of fwup's FAT functions.
"""

from __future__ import annotations

import getopt
import hashlib
import os
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from sshfwup import __version__, fwfile
from sshfwup.fwfile import (
    BLOCK_SIZE,
    ArchiveInputError,
    Call,
    FirmwareError,
    FirmwareInfo,
    Task,
    ZipStream,
)

FWUP_COMPAT_VERSION = "1.16.0"  # the fwup whose behaviour this stand-in follows
_READ_SIZE = 256 * 1024
_MEMSET_CHUNK = 1024 * 1024

USAGE = f"""\
sshfwup fwup stand-in {__version__} -- NOT fwup: a test double for the subset of fwup
{FWUP_COMPAT_VERSION} that sshfwup uses. Install the real fwup on devices.

Usage: python -m sshfwup.sim.fwup_standin [options]
  -a, --apply              Apply the firmware update
  -d <file or device>      Destination (a disk image file or a block device)
  -i <input.fw>            Input firmware file (default or "-": stdin)
  -t, --task <task>        Task prefix to apply (e.g. upgrade, complete)
  -U, --no-unmount         Accepted; the stand-in never unmounts anything
  -m, --metadata           Print the firmware's metadata
  -V, --verify             Verify the archive's hashes (and signature with -p)
  -p, --public-key-file <keyfile>  Require a signature by this key (repeatable)
  --framing                4-byte length framing on stdin and stdout (fwup's protocol)
  --exit-handshake         Write 0x1a and the exit status, then wait for stdin to close
  -q, --quiet              No progress output
  --version, -h/--help
"""


class Failure(Exception):
    """The run stops; the message is what fwup would print."""


# --- input ----------------------------------------------------------------------------------


class RawInput:
    """A file or unframed stdin."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.bytes_in = 0

    def read(self, n: int) -> bytes:
        data = os.read(self.fd, n)
        self.bytes_in += len(data)
        return data

    def finish(self) -> None:
        """Nothing to check: fwup stops reading raw input at the archive's central directory."""


class FramedInput:
    """stdin in fwup's --framing protocol: 4-byte big-endian length packets, 0 = end."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.left = 0
        self.ended = False
        self.bytes_in = 0

    def _read_exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n:
            data = os.read(self.fd, n)
            if not data:
                break
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def read(self, n: int) -> bytes:
        if self.ended:
            return b""
        if self.left == 0:
            header = self._read_exact(4)
            if len(header) < 4:
                raise ArchiveInputError(
                    "Error reading stdin: the input ended without fwup's end-of-input packet (truncated upload?)"
                )
            (self.left,) = struct.unpack(">I", header)
            if self.left == 0:
                self.ended = True
                return b""
        data = os.read(self.fd, min(n, self.left))
        if not data:
            raise ArchiveInputError("Received EOF even though framing indicated more bytes")
        self.left -= len(data)
        self.bytes_in += len(data)
        return data

    def finish(self) -> None:
        """Read past the archive's trailer up to the end-of-input packet, which must come."""
        while self.read(_READ_SIZE):
            pass


# --- output ---------------------------------------------------------------------------------


class Output:
    """fwup's stdout: framed packets, or text with a ``\\r`` progress bar. Unbuffered."""

    BAR = 36

    def __init__(self, *, framing: bool, quiet: bool) -> None:
        self.framing = framing
        self.quiet = quiet
        self.last_percent: int | None = None
        self.on_bar = False
        self.started = time.monotonic()
        self.counts: Callable[[], tuple[int, int]] = lambda: (0, 0)

    def write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(1, data):]
        except BrokenPipeError:
            pass  # nobody listens any more; the exit status still tells

    def packet(self, kind: bytes, code: int, text: str = "") -> None:
        payload = kind + struct.pack(">H", code) + text.encode("utf-8")
        self.write(struct.pack(">I", len(payload)) + payload)

    def progress(self, percent: int) -> None:
        if self.quiet or percent == self.last_percent:
            return
        self.last_percent = percent
        if self.framing:
            self.packet(b"PR", percent)
            return
        line = f"\r{percent:3d}% [{'=' * (percent * self.BAR // 100):<{self.BAR}}]"
        if percent:
            bytes_in, bytes_out = self.counts()
            line += f" {fwfile.format_size(bytes_in)} in / {fwfile.format_size(bytes_out)} out     " + "\b" * 5
        self.on_bar = True
        self.write(line.encode())

    def _line(self, text: str) -> None:
        prefix = "\r\033[K" if self.on_bar else ""
        self.on_bar = False
        self.write(f"{prefix}{text}\n".encode("utf-8"))

    def info(self, text: str) -> None:
        if self.framing:
            self.packet(b"WN", 0, text)
        else:
            self._line(f"fwup: {text}")

    def error(self, text: str) -> None:
        if self.framing:
            self.packet(b"ER", 0, text)
        else:
            self._line(f"fwup: {text}")

    def done(self, text: str = "") -> None:
        """Success of a command that has no progress (-m, -V): the listing or message."""
        if self.framing:
            self.packet(b"OK", 0, text)
        else:
            self.write(text.encode("utf-8"))

    def applied(self) -> None:
        self.progress(100)
        if self.framing:
            self.packet(b"OK", 0)
        elif not self.quiet:
            elapsed = time.monotonic() - self.started
            shown = f"{int(elapsed) // 60} min {int(elapsed) % 60:02d} s" if elapsed > 60 else f"{elapsed:.3f} s"
            self.on_bar = False
            self.write(f"\nSuccess!\nElapsed time: {shown}\n".encode())


# --- the destination ------------------------------------------------------------------------


class Destination:
    """The disk image or block device. Boot-critical writes (env, MBR) wait for commit()."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            st = os.stat(path)
            create = stat.S_ISREG(st.st_mode)
        except FileNotFoundError:
            create = True
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)
        except OSError as e:
            raise Failure(f"Cannot open output ({path}): {e.strerror}") from None
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.held: dict[int, bytes] = {}
        self.bytes_out = 0

    def pread(self, size: int, offset: int) -> bytes:
        for start, data in self.held.items():  # what commit() would write is what is there
            if start <= offset and offset + size <= start + len(data):
                return data[offset - start : offset - start + size]
        return os.pread(self.fd, size, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
                self.bytes_out += n
        except OSError as e:
            raise Failure(f"Cannot write to {self.path} at offset {offset}: {e.strerror}") from None

    def hold(self, offset: int, data: bytes) -> None:
        self.held[offset] = data

    def commit(self) -> None:
        try:
            os.fsync(self.fd)  # the new slot is on disk before the env points at it
            for offset in sorted(self.held):
                self.pwrite(self.held[offset], offset)
            self.held.clear()
            os.fsync(self.fd)
        except OSError as e:
            raise Failure(f"Cannot flush {self.path}: {e.strerror}") from None

    def close(self) -> None:
        os.close(self.fd)


# --- running a task -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Signature:
    """Arity of each supported function (arguments after the name)."""

    argc: int
    context: str = "any"  # "resource": only inside on-resource


_FUNCTIONS = {
    "info": _Signature(1),
    "error": _Signature(1),
    "uboot_setenv": _Signature(3),
    "uboot_unsetenv": _Signature(2),
    "uboot_clearenv": _Signature(1),
    "raw_write": _Signature(1, "resource"),
    "raw_memset": _Signature(3),
    "trim": _Signature(2),
    "mbr_write": _Signature(1),
}
_REQUIREMENTS = {"require-uboot-variable": 3, "require-partition-offset": 2}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("-")[0].split("."):
        parts.append(int(piece) if piece.isdigit() else 0)
    return tuple(parts)


class Apply:
    """One ``fwup -a``: select the task, run on-init, each on-resource as data streams, on-finish."""

    def __init__(self, info: FirmwareInfo, stream: ZipStream, dest: Destination, out: Output) -> None:
        self.info = info
        self.meta = info.meta
        self.stream = stream
        self.dest = dest
        self.out = out
        self.env = dict(os.environ)
        self.env["FWUP_META_UUID"] = info.uuid
        for key, value in info.metadata.items():
            self.env["FWUP_META_" + key.upper().replace("-", "_")] = value
        self.envs: dict[str, dict[str, str]] = {}
        self.total_units = 0
        self.done_units = 0
        self.data: Iterator[bytes] | None = None  # the current resource's data, for raw_write
        self.resource: str | None = None

    # -- helpers --
    def arg(self, value: str) -> str:
        return fwfile.expand_variables(value, self.env)

    def number(self, value: str, what: str) -> int:
        try:
            number = int(self.arg(value), 0)
        except ValueError:
            raise Failure(f"{what} requires a non-negative integer, got {value!r}") from None
        if number < 0:
            raise Failure(f"{what} requires a non-negative integer, got {value!r}")
        return number

    def report(self, units: int) -> None:
        self.done_units += units
        if self.total_units:
            self.out.progress(min(99, self.done_units * 100 // self.total_units))

    def env_spec(self, name: str) -> fwfile.UBootEnvironment:
        spec = self.meta.uboot_env.get(self.arg(name))
        if spec is None:
            raise Failure(f"Can't find uboot-environment reference '{name}'")
        return spec

    def read_env(self, name: str) -> dict[str, str]:
        spec = self.env_spec(name)
        if spec.name not in self.envs:
            block = self.dest.pread(spec.size, spec.byte_offset)
            try:
                self.envs[spec.name] = fwfile.parse_uboot_env(block)
            except fwfile.UBootEnvError as e:
                # fwup names the block: "U-boot environment (block 2048) CRC32 mismatch (...)"
                where = f"U-boot environment (block {spec.block_offset})"
                raise Failure(e.fwup_message.replace("U-boot environment", where, 1)) from None
        return self.envs[spec.name]

    def write_env(self, name: str, variables: dict[str, str]) -> None:
        spec = self.env_spec(name)
        self.envs[spec.name] = variables
        try:
            self.dest.hold(spec.byte_offset, fwfile.write_uboot_env(spec.size, variables))
        except fwfile.UBootEnvError as e:
            raise Failure(e.fwup_message) from None

    # -- selection --
    def requirement_met(self, req: Call) -> bool:
        args = [self.arg(a) for a in req.args]
        if req.name == "require-uboot-variable":
            try:
                variables = self.read_env(args[0])
            except Failure:
                return False
            return variables.get(args[1]) == args[2]
        if req.name == "require-partition-offset":
            offsets = fwfile.mbr_partition_offsets(self.dest.pread(BLOCK_SIZE, 0))
            index, offset = self.number(args[0], req.name), self.number(args[1], req.name)
            return offsets is not None and 0 <= index < 4 and offsets[index] == offset
        raise Failure(f"The sshfwup fwup stand-in does not implement the requirement {req.name}()")

    def select(self, prefix: str) -> Task:
        for name, task in self.meta.tasks.items():
            if not name.startswith(prefix):
                continue
            for req in task.requirements:
                if _REQUIREMENTS.get(req.name, -1) != len(req.args):
                    raise Failure(f"The sshfwup fwup stand-in does not implement the requirement "
                                  f"{req.name}() with {len(req.args)} arguments (task '{name}')")
            if all(self.requirement_met(req) for req in task.requirements):
                self.envs.clear()  # reread through the held writes from now on
                return task
        raise Failure(f"Couldn't find applicable task '{prefix}'. If task is available, the task's requirements "
                      "may not be met.")

    def check_functions(self, task: Task) -> None:
        """Refuse, before writing anything, a task that uses what the stand-in cannot do."""
        lists = [("on-init", task.on_init), ("on-finish", task.on_finish), ("on-error", task.on_error)]
        lists += [(f'on-resource "{r}"', calls) for r, calls in task.on_resource.items()]
        for where, calls in lists:
            for call in calls:
                sig = _FUNCTIONS.get(call.name)
                if sig is None:
                    raise Failure(f"The sshfwup fwup stand-in does not implement {call.name}() "
                                  f"(task '{task.name}' {where})")
                if len(call.args) != sig.argc:
                    raise Failure(f"{call.name}() takes {sig.argc} arguments, got {len(call.args)} "
                                  f"(task '{task.name}' {where})")
                if sig.context == "resource" and not where.startswith("on-resource"):
                    raise Failure(f"{call.name} only usable in on-resource")
                if call.name == "mbr_write" and self.arg(call.args[0]) not in self.meta.mbrs:
                    raise Failure("mbr_write can't find mbr reference")

    def units(self, call: Call, resource: str | None) -> int:
        if call.name == "raw_write" and resource is not None and resource in self.meta.resources:
            return self.meta.resources[resource].length
        if call.name == "raw_memset":
            return self.number(call.args[1], "raw_memset") * BLOCK_SIZE
        if call.name in ("uboot_setenv", "uboot_unsetenv", "uboot_clearenv", "mbr_write"):
            return 1
        return 0

    # -- functions --
    def run(self, calls: Sequence[Call]) -> None:
        for call in calls:
            getattr(self, "fn_" + call.name)(*call.args)

    def fn_info(self, message: str) -> None:
        self.out.info(self.arg(message))

    def fn_error(self, message: str) -> None:
        raise Failure(self.arg(message))

    def fn_uboot_clearenv(self, name: str) -> None:
        self.write_env(name, {})
        self.report(1)

    def fn_uboot_setenv(self, name: str, variable: str, value: str) -> None:
        variables = dict(self.read_env(name))
        variables[self.arg(variable)] = self.arg(value)
        self.write_env(name, variables)
        self.report(1)

    def fn_uboot_unsetenv(self, name: str, variable: str) -> None:
        variables = dict(self.read_env(name))
        variables.pop(self.arg(variable), None)
        self.write_env(name, variables)
        self.report(1)

    def fn_mbr_write(self, name: str) -> None:
        mbr = self.meta.mbrs[self.arg(name)]
        self.dest.hold(0, fwfile.encode_mbr(mbr, device_blocks=self.dest.size // BLOCK_SIZE or None))
        self.report(1)

    def fn_trim(self, block_offset: str, count: str) -> None:
        """A no-op: discarding blocks is an optimisation, and a failed upgrade may leave the
        inactive slot half-written anyway."""
        self.number(block_offset, "trim")
        self.number(count, "trim")

    def fn_raw_memset(self, block_offset: str, count: str, value: str) -> None:
        offset = self.number(block_offset, "raw_memset") * BLOCK_SIZE
        left = self.number(count, "raw_memset") * BLOCK_SIZE
        byte = self.number(value, "raw_memset")
        if byte > 255:
            raise Failure("raw_memset requires value to be between 0 and 255")
        chunk = bytes([byte]) * min(left, _MEMSET_CHUNK)
        while left:
            piece = chunk[: min(left, len(chunk))]
            self.dest.pwrite(piece, offset)
            offset += len(piece)
            left -= len(piece)
            self.report(len(piece))

    def fn_raw_write(self, block_offset: str) -> None:
        name = self.resource
        assert name is not None
        resource = self.meta.resources.get(name)
        if resource is None:
            raise Failure(f"Resource '{name}' used, but metadata is missing. Archive is corrupt.")
        if self.data is None:
            raise Failure(f"raw_write didn't write anything. Was it called twice in an on-resource for '{name}'?")
        data, self.data = self.data, None
        offset = self.number(block_offset, "raw_write") * BLOCK_SIZE
        hasher = hashlib.blake2b(digest_size=32)
        written = 0
        for chunk in data:
            hasher.update(chunk)
            self.dest.pwrite(chunk, offset + written)
            written += len(chunk)
            self.report(len(chunk))
        if written != resource.length:
            raise Failure(f"raw_write wrote {written} bytes, but should have written {resource.length}")
        if hasher.hexdigest() != resource.blake2b_256:
            raise Failure("raw_write detected blake2b digest mismatch")

    # -- the whole task --
    def apply(self, prefix: str, finish_input: Callable[[], None]) -> None:
        task = self.select(prefix)
        self.check_functions(task)
        used = {name for name in task.on_resource if name in self.meta.resources}
        self.total_units = sum(self.units(c, None) for c in task.on_init + task.on_finish)
        self.total_units += sum(self.units(c, r) for r in used for c in task.on_resource[r])
        try:
            self.run(task.on_init)
            processed: set[str] = set()
            while (entry := self.stream.next_entry()) is not None:
                if not entry.name.startswith(fwfile.DATA_PREFIX):
                    raise Failure(f"Unexpected file in archive: {entry.name}")
                name = entry.name.removeprefix(fwfile.DATA_PREFIX)
                if not name or name not in task.on_resource:
                    self.stream.skip(entry)
                    continue
                if name in processed:
                    raise Failure(f"Processing {name} twice. Archive is corrupt.")
                resource = self.meta.resources.get(name)
                if resource is None:
                    raise Failure(f"Resource '{name}' used, but metadata is missing. Archive is corrupt.")
                if entry.size is not None and entry.size != resource.length:
                    raise Failure(f"File '{name}' isn't expected size ({entry.size} vs {resource.length}) and "
                                  "the sshfwup fwup stand-in does not support xdelta3 patches")
                self.resource, self.data = name, self.stream.read_data(entry)
                self.run(task.on_resource[name])
                if self.data is not None:  # no raw_write consumed it
                    for _ in self.data:
                        pass
                self.resource, self.data = None, None
                processed.add(name)
            missing = sorted(used - processed)
            if missing:
                raise Failure(f"Resource {missing[0]} not found in archive")
            finish_input()
            self.run(task.on_finish)
            self.dest.commit()
        except (Failure, FirmwareError) as error:
            self.dest.held.clear()  # nothing that decides the next boot is written
            self.envs.clear()
            try:
                self.run(task.on_error)
                self.dest.commit()
            except (Failure, FirmwareError, OSError):
                pass
            raise error


# --- commands ------------------------------------------------------------------------------


@dataclass
class Options:
    command: str | None = None
    device: str | None = None
    input: str | None = None
    task: str | None = None
    framing: bool = False
    exit_handshake: bool = False
    quiet: bool = False
    public_keys: tuple[str, ...] = ()


def parse_args(argv: Sequence[str]) -> Options:
    try:
        opts, rest = getopt.gnu_getopt(
            list(argv),
            "ad:i:t:UumVqp:nvyh",
            ["apply", "task=", "no-unmount", "unmount", "metadata", "verify", "quiet", "public-key-file=",
             "framing", "exit-handshake", "version", "help", "verbose"],
        )
    except getopt.GetoptError as e:
        raise Failure(f"{e}; see --help") from None
    if rest:
        raise Failure(f"unexpected parameter: {rest[0]}")
    o = Options()
    for key, value in opts:
        if key in ("-a", "--apply"):
            o.command = "apply"
        elif key in ("-m", "--metadata"):
            o.command = "metadata"
        elif key in ("-V", "--verify"):
            o.command = "verify"
        elif key in ("-h", "--help"):
            o.command = "help"
        elif key == "--version":
            o.command = "version"
        elif key == "-d":
            o.device = value
        elif key == "-i":
            o.input = None if value == "-" else value
        elif key in ("-t", "--task"):
            o.task = value
        elif key == "--framing":
            o.framing = True
        elif key == "--exit-handshake":
            o.exit_handshake = True
        elif key in ("-q", "--quiet"):
            o.quiet = True
        elif key in ("-p", "--public-key-file"):
            o.public_keys += (value,)
        # -U/-u/-n/-v/-y: accepted, nothing to do for the stand-in
    return o


def _open_input(o: Options) -> RawInput | FramedInput:
    if o.input is None:
        return FramedInput(0) if o.framing else RawInput(0)
    try:
        return RawInput(os.open(o.input, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        raise Failure(f"Cannot open archive ({o.input}): {e.strerror}") from None


def _public_keys(o: Options) -> list[bytes]:
    try:
        return [fwfile.load_public_key(path) for path in o.public_keys]
    except FirmwareError as e:
        raise Failure(e.fwup_message) from None


def run(o: Options, out: Output) -> None:
    if o.command == "help":
        out.write(USAGE.encode())
        return
    if o.command == "version":
        out.write(f"{FWUP_COMPAT_VERSION} (sshfwup fwup stand-in {__version__}; not fwup)\n".encode())
        return
    if o.command is None:
        raise Failure("specify one of -a, -m or -V (this is the sshfwup fwup stand-in; see --help)")
    keys = _public_keys(o)
    if o.command == "apply":
        out.progress(0)
        if not o.task:
            raise Failure("specify a task (-t)")
        if not o.device:
            raise Failure("specify a destination (-d); the stand-in does not look for memory cards")
    source = _open_input(o)
    name = o.input or "<stdin>"
    stream = ZipStream(source.read)
    info = fwfile.read_head(stream, public_keys=keys, source=name)
    required = info.meta.require_fwup_version
    if required and _version_tuple(required) > _version_tuple(FWUP_COMPAT_VERSION):
        raise Failure(f"This firmware requires fwup {required} or later; the stand-in behaves like "
                      f"fwup {FWUP_COMPAT_VERSION}")
    if o.command == "metadata":
        out.done(fwfile.format_metadata(info.metadata))
        return
    if o.command == "verify":
        fwfile.read_entries(stream, info)
        if keys and info.signature:
            message = "Valid archive with a good signature\n"
        elif info.signature:
            message = "Valid archive with an unverified signature. Specify a public key to authenticate.\n"
        else:
            message = "Valid archive without a signature\n"
        out.done(message)
        return
    assert o.device and o.task
    dest = Destination(o.device)
    out.counts = lambda: (source.bytes_in, dest.bytes_out)
    try:
        Apply(info, stream, dest, out).apply(o.task, source.finish)
    finally:
        dest.close()
    out.applied()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parse_args(args)
    except Failure as e:
        options = Options(framing="--framing" in args, exit_handshake="--exit-handshake" in args)
        out = Output(framing=options.framing, quiet=False)
        out.error(str(e))
        return _exit(options, out, 1)
    out = Output(framing=options.framing, quiet=options.quiet)
    status = 0
    try:
        run(options, out)
    except (Failure, FirmwareError) as e:
        message = e.fwup_message if isinstance(e, FirmwareError) else str(e)
        out.error(message)
        status = 1
    except KeyboardInterrupt:
        status = 1
    except Exception as e:  # a bug in the stand-in must still end like fwup: an error and status 1
        out.error(f"sshfwup fwup stand-in internal error: {type(e).__name__}: {e}")
        status = 1
    return _exit(options, out, status)


def _exit(options: Options, out: Output, status: int) -> int:
    if options.exit_handshake:
        # like fwup: say how it ended, then wait for the other side to close our stdin
        out.write(bytes((0x1A, status)))
        try:
            while os.read(0, _READ_SIZE):
                pass
        except OSError:
            pass
    return status


if __name__ == "__main__":
    sys.exit(main())
