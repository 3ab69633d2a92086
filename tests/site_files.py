"""Files a site has, made in tmp_path: MedMNIST slices, images, DICOM, keys, certificates."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_medmnist_slice(source: Path, out: Path, sizes: dict[str, int], seed: int) -> Path:
    """``out``: a MedMNIST file with ``sizes[split]`` random rows of each split of ``source``."""
    rng = np.random.default_rng(seed)
    with np.load(source) as data:
        arrays = {}
        for split, n in sizes.items():
            rows = rng.choice(len(data[f"{split}_labels"]), size=n, replace=False)
            arrays[f"{split}_images"] = data[f"{split}_images"][rows]
            arrays[f"{split}_labels"] = data[f"{split}_labels"][rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return out


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def random_image(rng: np.random.Generator, height: int = 24, width: int = 20) -> np.ndarray:
    return rng.integers(0, 256, (height, width), dtype=np.uint8)


def write_class_tree(root: Path, per_class: dict[str, int], seed: int = 0,
                     split: str | None = None) -> None:
    """PNG files ``root[/split]/<class>/<i>.png``, ``per_class[class]`` of each."""
    rng = np.random.default_rng(seed)
    base = root / split if split else root
    for name, count in per_class.items():
        (base / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_png(base / name / f"{i:03d}.png", random_image(rng, 20 + i % 7, 24))


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                slope: float | None = None, intercept: float | None = None) -> Path:
    """A DICOM file built from scratch with ``pixels`` (2D, or 3D for several frames)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ssh_key(path: Path, curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    """An unencrypted EC private key in OpenSSH format (as ssh-keygen writes it), mode 600."""
    key = ec.generate_private_key(curve or ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return key


def write_ca_certificate(path: Path, days: int = 365, start_days_ago: int = 1) -> Path:
    """A self-signed CA certificate, valid from ``start_days_ago`` days ago for ``days`` days."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=start_days_ago)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def site_toml(data_path: str = "images", data_format: str = "imagefolder",
              extra_privacy: str = "", extra_top: str = "", port: int = 19094,
              epsilon: float = 1.0, delta: float = 1e-5, releases: str = "") -> str:
    """A complete site file; relative paths point beside it."""
    return f"""\
name = "test-site"
{extra_top}
[data]
path = "{data_path}"
format = "{data_format}"

[privacy]
epsilon = {epsilon!r}
delta = {delta!r}
clip = 0.05
ledger = "state/ledger.json"
{extra_privacy}
[releases]
{releases}
[superlink]
address = "127.0.0.1:9092"
ca_certificate = "certs/ca.crt"
private_key = "keys/supernode"
clientapp_port = {port}
"""


def write_site(root: Path, toml: str | None = None, per_class: dict[str, int] | None = None,
               pool: int = 3) -> Path:
    """A complete site in ``root``: an image tree with a pool, a CA, a key and site.toml."""
    write_class_tree(root / "images", per_class or {"a": 20, "b": 20})
    rng = np.random.default_rng(7)
    for i in range(pool):
        write_png(root / "images" / "deploy" / f"p{i}.png", random_image(rng))
    write_ca_certificate(root / "certs" / "ca.crt")
    write_ssh_key(root / "keys" / "supernode")
    config = root / "site.toml"
    config.write_text(toml if toml is not None else site_toml())
    return config
