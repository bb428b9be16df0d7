"""Signed firmware end to end: with ``[fwup] public_keys`` set, only firmware signed by one of
those keys reaches the device; every refusal is clear, non-zero, and changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Sim, output

from sshfwup.firmware.keys import load_private_key
from sshfwup.host.firmware_sign import sign_firmware


@pytest.fixture
def sim_config(firmware_keys: dict[str, Path]) -> dict[str, Any]:
    return {"fwup": {"public_keys": [str(firmware_keys["ours.pub"])], "success_callback": "sshfwup.update.update:report_only"}}


def signed(firmware: Path, key: Path, out: Path) -> Path:
    return sign_firmware(firmware, out, load_private_key(key))


def assert_untouched(sim: Sim) -> None:
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1"
    assert not env.get("b.nerves_fw_version")


async def test_signed_firmware_is_accepted(sim: Sim, firmware, firmware_keys: dict[str, Path], tmp_path: Path) -> None:
    result = sim.upload(signed(firmware("2.0.0"), firmware_keys["ours"], tmp_path / "v2.signed.fw"))
    assert result.returncode == 0, output(result)
    assert sim.env()["b.nerves_fw_version"] == "2.0.0"


def swapped_payload(signed_fw: Path, other_fw: Path, out: Path, *, same_size: bool = False) -> Path:
    """The signature and meta.conf of ``signed_fw`` with another firmware's rootfs, in a well-formed
    zip (valid CRCs): what an attacker who cannot sign would have to try. ``same_size``: cut or
    padded to the signed rootfs's size (else fwup takes it for a delta patch)."""
    import zipfile

    with zipfile.ZipFile(signed_fw) as a, zipfile.ZipFile(other_fw) as b, zipfile.ZipFile(out, "w") as z:
        rootfs = b.read("data/rootfs.img")
        if same_size:
            size = a.getinfo("data/rootfs.img").file_size
            rootfs = rootfs[:size].ljust(size, b"\0")
        z.writestr("meta.conf.ed25519", a.read("meta.conf.ed25519"))
        z.writestr("meta.conf", a.read("meta.conf"), compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("data/rootfs.img", rootfs, compress_type=zipfile.ZIP_DEFLATED)
    return out


@pytest.mark.parametrize("case", ["unsigned", "other-key", "flipped-payload", "swapped-payload", "swapped-same-size"])
async def test_refusals(sim: Sim, firmware, firmware_keys: dict[str, Path], tmp_path: Path, case: str) -> None:
    if case == "unsigned":
        data = firmware("2.0.0").read_bytes()
    elif case == "other-key":
        data = signed(firmware("2.0.0"), firmware_keys["theirs"], tmp_path / "x.fw").read_bytes()
    elif case == "flipped-payload":
        good = bytearray(signed(firmware("2.0.0"), firmware_keys["ours"], tmp_path / "x.fw").read_bytes())
        good[len(good) - 4096] ^= 0x01  # inside rootfs.img
        data = bytes(good)
    else:
        ours = signed(firmware("2.0.0"), firmware_keys["ours"], tmp_path / "x.fw")
        other = firmware("2.0.0", changes=("kernel",))
        data = swapped_payload(ours, other, tmp_path / "evil.fw", same_size=case == "swapped-same-size").read_bytes()
    result = sim.upload(data)
    text = output(result)
    assert result.returncode == 1, text
    assert "sshfwup: update failed:" in text, text
    # "not changed" exactly when nothing was (a refusal: the mark is back as it was, issue 28); a
    # payload fwup may have written leaves slot b marked, and the message names it
    marked = sim.env().get("b.sshfwup_state") == "incomplete"
    assert ("the device was not changed" in text) != marked, text
    assert marked == (case in ("flipped-payload", "swapped-payload", "swapped-same-size")), (case, sim.env())
    expected = {
        "unsigned": "Expecting signed firmware archive",
        "other-key": "fails digital signature verification",
        "flipped-payload": "ZIP bad CRC",  # the zip's own check catches a careless change first
        # the signed meta.conf pins the rootfs hash — and its size: a payload of another size is
        # taken by fwup for a delta patch (deploy/fwup.conf allows them), which it is not
        "swapped-payload": ("mismatch", "not a VCDIFF input"),
        "swapped-same-size": "mismatch",
    }[case]
    assert any(e in text for e in ((expected,) if isinstance(expected, str) else expected)), text
    assert_untouched(sim)


@pytest.fixture
def real_keys(tmp_path_factory: pytest.TempPathFactory, fwup: str) -> Path:
    """A key pair made by fwup itself (``fwup -g``)."""
    import subprocess

    out = tmp_path_factory.mktemp("fwup-g")
    subprocess.run([fwup, "-g", "-o", str(out / "real")], check=True, capture_output=True)
    return out / "real"


@pytest.mark.parametrize("how", ["fwup -S", "firmware sign"])
async def test_firmware_signed_by_fwup_with_its_own_key(
    sim: Sim, firmware, fwup: str, real_keys: Path, tmp_path: Path, how: str
) -> None:
    """fwup -g keys on the device; the firmware signed by fwup -S, or by our signer with fwup's key."""
    import subprocess

    await sim.restart_server(fwup={"public_keys": [f"{real_keys}.pub"]})
    out = tmp_path / "v2.signed.fw"
    if how == "fwup -S":
        subprocess.run([fwup, "-S", "-s", f"{real_keys}.priv", "-i", str(firmware("2.0.0")), "-o", str(out)],
                       check=True, capture_output=True)  # fmt: skip
    else:
        signed(firmware("2.0.0"), Path(f"{real_keys}.priv"), out)
    result = sim.upload(out)
    assert result.returncode == 0, output(result)
    assert sim.env()["b.nerves_fw_version"] == "2.0.0"


async def test_a_delta_patch_keeps_the_signature(sim: Sim, firmware, firmware_keys: dict[str, Path], tmp_path: Path) -> None:
    """The patch carries NEW's meta.conf and signature verbatim: a device that requires signed
    firmware applies it; a patch of unsigned firmware is refused like the firmware itself."""
    from sshfwup.host.firmware_delta import make_patch

    unsigned = make_patch(firmware("1.0.0"), firmware("2.0.0"), tmp_path / "unsigned-patch.fw")
    result = sim.upload(unsigned.path)
    assert result.returncode == 1 and "Expecting signed firmware archive" in output(result), output(result)
    assert_untouched(sim)
    v2 = signed(firmware("2.0.0"), firmware_keys["ours"], tmp_path / "v2.signed.fw")
    patch = make_patch(firmware("1.0.0"), v2, tmp_path / "patch.fw")
    result = sim.upload(patch.path)
    assert result.returncode == 0, output(result)
    assert sim.env()["b.nerves_fw_version"] == "2.0.0" and sim.env()["b.nerves_fw_uuid"] == patch.target.uuid
