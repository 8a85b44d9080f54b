"""The CA directory on disk: `certs init`, `certs issue` and the three steps of
`certs rotate-root`.

Layout of `--dir` (default `certs/`), the names Istio operators know:

    root-cert.pem   the root certificate (public)
    root-key.pem    the root key: 0600; move it offline after init
    ca-cert.pem     the intermediate certificate (public), the daemon's issuer
    ca-key.pem      the intermediate key: 0600; the daemon's mounted secret
    bundle.pem      the trust bundle: every root sidecars accept (public)
    next/           during a rotation: the new root and intermediate
    previous/       after `activate`: the old ones, until `finish`

Invariants:
- Every file is written atomically: a private temp file in the same
  directory (mkstemp: 0600 from birth), fsync, then rename (or link, when
  overwriting is refused, so two concurrent inits cannot both win). A crash
  leaves the old file or the new one, never half of one.
- Private keys are created 0600 and exist in exactly one file each: no key
  bytes go into any other file these functions write.
- Nothing is overwritten without `force`.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from lepton_mesh.identity.bundle import TrustBundle, fingerprint, load_certificates
from lepton_mesh.identity.ca import (
    WORKLOAD_LIFETIME,
    CaKeyPair,
    CertificateAuthority,
    IssuedCertificate,
    create_intermediate,
    create_root,
)
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.errors import CaError
from lepton_mesh.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700
# Modes of CaFiles.pair_paths(): root cert, root key, CA cert, CA key.
_PAIR_MODES = (PUBLIC_MODE, PRIVATE_MODE, PUBLIC_MODE, PRIVATE_MODE)


@dataclass(frozen=True, slots=True)
class CaFiles:
    """The paths of one CA directory (nothing is read by constructing this)."""

    directory: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))  # accept str too

    @property
    def root_cert(self) -> Path:
        return self.directory / "root-cert.pem"

    @property
    def root_key(self) -> Path:
        return self.directory / "root-key.pem"

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca-cert.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def bundle(self) -> Path:
        return self.directory / "bundle.pem"

    @property
    def next(self) -> CaFiles:
        return CaFiles(self.directory / "next")

    @property
    def previous(self) -> CaFiles:
        return CaFiles(self.directory / "previous")

    def pair_paths(self) -> tuple[Path, Path, Path, Path]:
        return (self.root_cert, self.root_key, self.ca_cert, self.ca_key)

    def load_authority(
        self, *, workload_lifetime: dt.timedelta = WORKLOAD_LIFETIME
    ) -> CertificateAuthority:
        return CertificateAuthority.load(
            self.ca_cert, self.ca_key, self.bundle, workload_lifetime=workload_lifetime
        )


def write_atomic(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write `data` to `path` atomically with `mode`; CaError(ca_exists) if it
    exists and `overwrite` is false."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: no clobbering, even racing
            except FileExistsError:
                raise CaError(
                    f"{path} exists; refusing to overwrite (use --force)", reason="ca_exists"
                ) from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pair(files: CaFiles, root: CaKeyPair, inter: CaKeyPair, *, overwrite: bool) -> None:
    write_atomic(files.root_key, root.key_pem(), mode=PRIVATE_MODE, overwrite=overwrite)
    write_atomic(files.root_cert, root.cert_pem(), mode=PUBLIC_MODE, overwrite=overwrite)
    write_atomic(files.ca_key, inter.key_pem(), mode=PRIVATE_MODE, overwrite=overwrite)
    write_atomic(files.ca_cert, inter.cert_pem(), mode=PUBLIC_MODE, overwrite=overwrite)


def _make_dir(directory: Path) -> None:
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def _refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise CaError(
            f"refusing to overwrite {', '.join(existing)} (use --force)", reason="ca_exists"
        )


def init_ca(
    directory: str | Path,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    force: bool = False,
    now: dt.datetime | None = None,
) -> CaFiles:
    """Create a root CA, an intermediate signed by it, and a bundle of the root."""
    files = CaFiles(Path(directory))
    _make_dir(files.directory)
    if not force:
        _refuse_existing([*files.pair_paths(), files.bundle])
    root = create_root(trust_domain, now=now)
    inter = create_intermediate(root, now=now)
    _write_pair(files, root, inter, overwrite=force)
    write_atomic(files.bundle, root.cert_pem(), mode=PUBLIC_MODE, overwrite=force)
    return files


def read_bundle(files: CaFiles) -> TrustBundle:
    try:
        return TrustBundle.from_pem(files.bundle.read_bytes(), what=str(files.bundle))
    except FileNotFoundError:
        raise CaError(
            f"{files.bundle} is missing: run `certs init` first", reason="ca_missing"
        ) from None


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return load_certificates(path.read_bytes(), what=str(path))[0]
    except FileNotFoundError:
        raise CaError(f"{path} is missing", reason="ca_missing") from None


def issue_to_files(
    files: CaFiles,
    identity: SpiffeId,
    out_dir: str | Path,
    *,
    lifetime: dt.timedelta | None = None,
    force: bool = False,
) -> tuple[Path, Path, IssuedCertificate]:
    """Make a workload key and certificate with the CA's own key (tests, ops,
    services outside the join-token flow). Writes `<ns>.<svc>-key.pem` (0600)
    and `<ns>.<svc>-chain.pem` into `out_dir`; returns (chain path, key path, issued)."""
    ca = files.load_authority()
    key = generate_key()
    issued = ca.issue(build_csr(key, identity), identity, lifetime=lifetime)
    out = Path(out_dir)
    _make_dir(out)
    stem = f"{identity.namespace}.{identity.service}"
    key_path, chain_path = out / f"{stem}-key.pem", out / f"{stem}-chain.pem"
    write_atomic(key_path, private_key_pem(key), mode=PRIVATE_MODE, overwrite=force)
    write_atomic(chain_path, issued.chain_pem, mode=PUBLIC_MODE, overwrite=force)
    return chain_path, key_path, issued


# Root rotation: prepare -> (bundle reaches every sidecar) -> activate ->
# (every workload re-issued) -> finish. docs/security.md has the procedure.


def rotate_prepare(
    directory: str | Path, *, force: bool = False, now: dt.datetime | None = None
) -> CaFiles:
    """Step 1: a new root and intermediate in `next/`, and the bundle extended
    with the new root (old roots first). Needs no old key."""
    files = CaFiles(Path(directory))
    bundle = read_bundle(files)
    current = files.load_authority()
    nxt = files.next
    if files.previous.directory.exists():
        raise CaError(
            f"{files.previous.directory} exists: run `certs rotate-root finish` first",
            reason="rotation_in_progress",
        )
    _make_dir(nxt.directory)
    if not force:
        _refuse_existing(list(nxt.pair_paths()))
    root = create_root(current.trust_domain, now=now)
    inter = create_intermediate(root, now=now)
    _write_pair(nxt, root, inter, overwrite=force)
    write_atomic(
        files.bundle, bundle.with_root(root.cert).to_pem(), mode=PUBLIC_MODE, overwrite=True
    )
    return nxt


def rotate_activate(directory: str | Path) -> CaFiles:
    """Step 2: the new pair becomes the active CA (the daemon issues from it on
    reload); the old pair moves to `previous/`. The bundle keeps both roots."""
    files = CaFiles(Path(directory))
    nxt, prev = files.next, files.previous
    for p in nxt.pair_paths():
        if not p.exists():
            raise CaError(
                f"{p} is missing: run `certs rotate-root prepare` first", reason="ca_missing"
            )
    bundle = read_bundle(files)
    if not bundle.contains(_read_cert(nxt.root_cert)):
        raise CaError(
            f"{files.bundle} does not hold the new root: run `certs rotate-root prepare` again",
            reason="ca_invalid",
        )
    # The new pair must load as a CA against the bundle before it goes live.
    CertificateAuthority.load(nxt.ca_cert, nxt.ca_key, files.bundle)
    if prev.directory.exists():
        raise CaError(
            f"{prev.directory} exists: finish the earlier rotation first",
            reason="rotation_in_progress",
        )
    _make_dir(prev.directory)
    # Copies, never hard links: an operator restoring with `cp` writes into
    # the file in place, and through a link would change both names.
    for src, dst, mode in zip(files.pair_paths(), prev.pair_paths(), _PAIR_MODES, strict=True):
        write_atomic(dst, src.read_bytes(), mode=mode, overwrite=False)
    # Each replace is atomic; next/ stays complete until all four are done. A
    # crash in between leaves a certificate and key that do not match, which
    # `CertificateAuthority.load` refuses loudly; previous/ holds the old pair
    # to put back before running activate again (docs/security.md).
    for src, dst, mode in zip(nxt.pair_paths(), files.pair_paths(), _PAIR_MODES, strict=True):
        write_atomic(dst, src.read_bytes(), mode=mode, overwrite=True)
    shutil.rmtree(nxt.directory)
    return files


def rotate_finish(directory: str | Path) -> TrustBundle:
    """Step 3: drop the old root from the bundle and delete `previous/` (the old
    keys with it). Run only once every workload holds a new-root certificate."""
    files = CaFiles(Path(directory))
    prev = files.previous
    old_root = _read_cert(prev.root_cert)
    active_root = _read_cert(files.root_cert)
    if fingerprint(old_root) == fingerprint(active_root):
        raise CaError("previous/ holds the active root; nothing to finish", reason="ca_invalid")
    bundle = read_bundle(files).without_root(old_root)
    write_atomic(files.bundle, bundle.to_pem(), mode=PUBLIC_MODE, overwrite=True)
    shutil.rmtree(prev.directory)
    return bundle
