"""fwup's ``.fw`` archives on the build machine: read by streaming, verify, sign.

The package, one concept per module (importers use only this package's names):

- :mod:`.archive`: the ``.fw`` layout; read it as a stream (signature, meta.conf, uuid,
  verified resources); ``fwup -m`` metadata.
- :mod:`.build`: sign ``.fw`` archives (archives are made by ``fwup -c``).
- :mod:`.zipstream` / :mod:`.zipwrite`: the ZIP format, read front to back / written like fwup.
- :mod:`.conf`: fwup's libconfuse syntax (parse, quote, ``${VAR}``).
- :mod:`.metaconf`: a compiled meta.conf as data (resources, tasks, U-Boot envs, MBRs).
- :mod:`.keys`: fwup's key files, ed25519 signatures over meta.conf.
- :mod:`.errors`: :class:`FirmwareError` and its subclasses.

Every error is a :class:`FirmwareError`, written for an operator. Nothing here imports
``cryptography`` at import time.
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
from .build import sign_firmware
from .conf import (
    ConfCall,
    ConfOption,
    ConfSection,
    expand_variables,
    parse_conf,
    quote_value,
)
from .errors import ArchiveInputError, FirmwareError
from .keys import generate_keypair, load_private_key, load_public_key, verify_signature
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
    "UBootEnvironment",
    "ZipEntry",
    "ZipStream",
    "expand_variables",
    "extract_resource",
    "firmware_uuid",
    "format_metadata",
    "format_size",
    "generate_keypair",
    "iter_resource",
    "load_private_key",
    "load_public_key",
    "parse_conf",
    "parse_meta_conf",
    "quote_value",
    "read_entries",
    "read_firmware",
    "read_head",
    "sign_firmware",
    "verify_signature",
]
