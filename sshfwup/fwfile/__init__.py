"""fwup's ``.fw`` archives: read by streaming, compile meta.conf, write, sign and verify.

The package, one concept per module (importers use only this package's names):

- :mod:`.archive`: the ``.fw`` layout; read it as a stream (signature, meta.conf, uuid,
  verified resources); ``fwup -m`` metadata.
- :mod:`.build`: write and sign ``.fw`` archives.
- :mod:`.zipstream` / :mod:`.zipwrite`: the ZIP format, read front to back / written like fwup.
- :mod:`.conf`: fwup's libconfuse syntax (parse, print, quote, ``${VAR}``).
- :mod:`.metaconf`: a compiled meta.conf as data (resources, tasks, U-Boot envs, MBRs).
- :mod:`.compile`: the compiled meta.conf of the simulated device's firmware.
- :mod:`.keys`: fwup's key files, ed25519 signatures over meta.conf.
- :mod:`.ubootenv` / :mod:`.mbr`: U-Boot environment blocks, MBR sectors.
- :mod:`.errors`: :class:`FirmwareError` and its subclasses.

Every error is a :class:`FirmwareError`, written for an operator and carrying fwup's own wording
(see :mod:`.errors`). The constants (``BLOCK_SIZE``, ``DATA_PREFIX``, ``ROOTFS_RESOURCE``...) are
importable from here too; ``__all__`` lists the same names as the single module it replaces.

Nothing here imports ``cryptography``, ``tempfile`` or other heavy modules at import time: the
fwup stand-in imports this package and must start fast.
"""

from .archive import DATA_PREFIX as DATA_PREFIX
from .archive import META_CONF_MAX as META_CONF_MAX
from .archive import META_CONF_NAME as META_CONF_NAME
from .archive import SIGNATURE_LEN as SIGNATURE_LEN
from .archive import SIGNATURE_NAME as SIGNATURE_NAME
from .archive import (
    FirmwareInfo,
    extract_resource,
    firmware_uuid,
    format_metadata,
    format_size,
    iter_resource,
    read_entries,
    read_firmware,
    read_head,
)
from .build import sign_firmware, write_firmware
from .compile import MBR_NAME as MBR_NAME
from .compile import ROOTFS_RESOURCE as ROOTFS_RESOURCE
from .compile import SIM_APP_DEVPATH as SIM_APP_DEVPATH
from .compile import SIM_APP_FSTYPE as SIM_APP_FSTYPE
from .compile import SIM_APP_TARGET as SIM_APP_TARGET
from .compile import SIM_DEVPATH as SIM_DEVPATH
from .compile import UBOOT_ENV_NAME as UBOOT_ENV_NAME
from .compile import compile_meta_conf
from .conf import (
    ConfCall,
    ConfOption,
    ConfSection,
    expand_variables,
    format_conf,
    parse_conf,
    quote_value,
)
from .errors import ArchiveInputError, FirmwareError, UBootEnvError
from .keys import generate_keypair, load_private_key, load_public_key, verify_signature
from .mbr import encode_mbr, mbr_partition_offsets
from .metaconf import BLOCK_SIZE as BLOCK_SIZE
from .metaconf import (
    Call,
    FileResource,
    Mbr,
    MetaConf,
    Partition,
    Task,
    UBootEnvironment,
    parse_meta_conf,
)
from .ubootenv import parse_uboot_env, write_uboot_env
from .zipstream import FirmwareEntry, ZipEntry, ZipStream

__all__ = [
    "ArchiveInputError",
    "Call",
    "ConfCall",
    "ConfOption",
    "ConfSection",
    "FileResource",
    "FirmwareEntry",
    "FirmwareError",
    "FirmwareInfo",
    "Mbr",
    "MetaConf",
    "Partition",
    "Task",
    "UBootEnvError",
    "UBootEnvironment",
    "ZipEntry",
    "ZipStream",
    "compile_meta_conf",
    "encode_mbr",
    "expand_variables",
    "extract_resource",
    "firmware_uuid",
    "format_conf",
    "format_metadata",
    "format_size",
    "generate_keypair",
    "iter_resource",
    "load_private_key",
    "load_public_key",
    "mbr_partition_offsets",
    "parse_conf",
    "parse_meta_conf",
    "parse_uboot_env",
    "quote_value",
    "read_entries",
    "read_firmware",
    "read_head",
    "sign_firmware",
    "verify_signature",
    "write_firmware",
    "write_uboot_env",
]
