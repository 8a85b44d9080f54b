"""The CA directory and the `certs` commands: file modes, no overwriting,
keys in exactly one file each, and root rotation step by step."""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from lepton_mesh.cli import main
from lepton_mesh.identity.bundle import TrustBundle, load_certificates
from lepton_mesh.identity.ca import CertificateAuthority
from lepton_mesh.identity.csr import build_csr, generate_key
from lepton_mesh.identity.errors import BundleError, CaError
from lepton_mesh.identity.spiffe import SpiffeId
from lepton_mesh.identity.store import (
    CaFiles,
    init_ca,
    issue_to_files,
    rotate_activate,
    rotate_finish,
    rotate_prepare,
)

CHAT = SpiffeId("cluster.local", "default", "chat")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _private_scalar(key_path: Path) -> bytes:
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]


def _decoded(data: bytes) -> bytes:
    """The file's bytes plus the DER inside every PEM block it holds: a key
    copied in any PEM or raw form shows up here as its private scalar."""
    out = [data]
    for block in re.findall(rb"-----BEGIN [^-]+-----(.*?)-----END", data, re.S):
        out.append(base64.b64decode(b"".join(block.split())))
    return b"".join(out)


def _all_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


def _assert_keys_only_in_their_files(*roots: Path) -> None:
    files = _all_files(*roots)
    keys = [p for p in files if p.name.endswith("-key.pem")]
    assert keys
    for key_path in keys:
        scalar = _private_scalar(key_path)
        assert scalar in _decoded(key_path.read_bytes())  # the check can see a key
        assert _mode(key_path) == 0o600, key_path
        for other in files:
            if other != key_path:
                assert scalar not in _decoded(other.read_bytes()), f"{key_path} leaks into {other}"


def test_init_writes_the_layout_with_private_keys_0600(tmp_path: Path) -> None:
    files = init_ca(tmp_path / "certs")
    assert _mode(files.directory) == 0o700
    assert {p.name for p in files.directory.iterdir()} == {
        "root-cert.pem",
        "root-key.pem",
        "ca-cert.pem",
        "ca-key.pem",
        "bundle.pem",
    }
    assert _mode(files.root_key) == _mode(files.ca_key) == 0o600
    assert _mode(files.root_cert) == _mode(files.ca_cert) == _mode(files.bundle) == 0o644
    assert files.bundle.read_bytes() == files.root_cert.read_bytes()
    ca = files.load_authority()
    assert ca.trust_domain == "cluster.local"
    _assert_keys_only_in_their_files(files.directory)


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    files = init_ca(tmp_path)
    before = files.ca_key.read_bytes()
    with pytest.raises(CaError) as err:
        init_ca(tmp_path)
    assert err.value.reason == "ca_exists"
    assert files.ca_key.read_bytes() == before
    # One leftover file is enough to refuse.
    for p in files.pair_paths():
        p.unlink()
    with pytest.raises(CaError):
        init_ca(tmp_path)
    init_ca(tmp_path, force=True)
    assert files.ca_key.read_bytes() != before
    assert _mode(files.ca_key) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_init_with_a_trust_domain(tmp_path: Path) -> None:
    files = init_ca(tmp_path, "prod.example")
    assert files.load_authority().trust_domain == "prod.example"


def test_issue_to_files_and_key_separation(tmp_path: Path) -> None:
    files = init_ca(tmp_path / "certs")
    chain, key, issued = issue_to_files(files, CHAT, tmp_path / "out")
    assert _mode(key) == 0o600
    assert issued.identity == CHAT
    bundle = TrustBundle.from_pem(files.bundle.read_bytes())
    assert bundle.verify(load_certificates(chain.read_bytes())) == CHAT
    with pytest.raises(CaError):
        issue_to_files(files, CHAT, tmp_path / "out")  # no silent overwrite
    _assert_keys_only_in_their_files(tmp_path)


def _leaf(ca: CertificateAuthority, service: str = "chat") -> list:
    sid = SpiffeId(ca.trust_domain, "default", service)
    return load_certificates(ca.issue(build_csr(generate_key(), sid), sid).chain_pem)


def test_root_rotation_steps(tmp_path: Path) -> None:
    files = init_ca(tmp_path)
    old_ca = files.load_authority()
    old_leaf = _leaf(old_ca)

    nxt = rotate_prepare(tmp_path)
    both = TrustBundle.from_pem(files.bundle.read_bytes())
    assert len(both.roots) == 2
    assert both.roots[0] == load_certificates(files.root_cert.read_bytes())[0]  # old first
    # Nothing is active yet: the daemon still issues from the old intermediate.
    assert files.load_authority().certificate == old_ca.certificate
    new_ca = CertificateAuthority.load(nxt.ca_cert, nxt.ca_key, files.bundle)
    new_leaf = _leaf(new_ca)
    # The two-root bundle verifies leaves from either root.
    assert both.verify(old_leaf) == both.verify(new_leaf) == CHAT

    rotate_activate(tmp_path)
    active = files.load_authority()
    assert active.certificate == new_ca.certificate
    assert not nxt.directory.exists()
    assert files.previous.ca_cert.read_bytes() == old_ca.certificate.public_bytes(
        serialization.Encoding.PEM
    )
    assert both.verify(_leaf(active)) == CHAT
    _assert_keys_only_in_their_files(tmp_path / "previous")
    _assert_keys_only_in_their_files(tmp_path)  # includes previous/: no key in two places

    bundle = rotate_finish(tmp_path)
    assert len(bundle.roots) == 1
    assert TrustBundle.from_pem(files.bundle.read_bytes()) == bundle
    assert not files.previous.directory.exists()
    assert bundle.verify(_leaf(files.load_authority())) == CHAT
    with pytest.raises(BundleError):
        bundle.verify(old_leaf)


def test_rotation_steps_refuse_out_of_order(tmp_path: Path) -> None:
    init_ca(tmp_path)
    with pytest.raises(CaError):
        rotate_activate(tmp_path)  # nothing prepared
    with pytest.raises(CaError):
        rotate_finish(tmp_path)  # nothing activated
    rotate_prepare(tmp_path)
    with pytest.raises(CaError):
        rotate_prepare(tmp_path)  # next/ exists
    rotate_prepare(tmp_path, force=True)
    assert len(TrustBundle.from_pem(CaFiles(tmp_path).bundle.read_bytes()).roots) == 3
    rotate_activate(tmp_path)
    with pytest.raises(CaError):
        rotate_prepare(tmp_path)  # finish the current rotation first


def test_prepare_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(CaError):
        rotate_prepare(tmp_path)


# --- the CLI -----------------------------------------------------------------


def test_cli_init_issue_show_rotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "certs")
    assert main(["certs", "init", "--dir", d, "--trust-domain", "mesh.test"]) == 0
    assert "move it offline" in capsys.readouterr().out
    assert main(["certs", "init", "--dir", d]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err

    out = str(tmp_path / "out")
    argv = ["certs", "issue", "--dir", d, "--service", "chat", "--out", out, "--lifetime", "2h"]
    assert main(argv) == 0
    assert "spiffe://mesh.test/ns/default/svc/chat" in capsys.readouterr().out

    assert main(["certs", "show", f"{out}/default.chat-chain.pem"]) == 0
    shown = capsys.readouterr().out
    assert "certificate 2 of 2" in shown
    assert "identity:  spiffe://mesh.test/ns/default/svc/chat" in shown
    assert "CA:        yes, path length 0" in shown

    assert main(["certs", "show", f"{d}/ca-key.pem"]) == 1
    captured = capsys.readouterr()
    assert "never shown" in captured.err and "PRIVATE" not in captured.out

    for step in ("prepare", "activate", "finish"):
        assert main(["certs", "rotate-root", step, "--dir", d]) == 0
    capsys.readouterr()
    assert main(["certs", "rotate-root", "finish", "--dir", d]) == 1
    _assert_keys_only_in_their_files(tmp_path)


@pytest.mark.parametrize("lifetime", ["0h", "24", "h", "-1h", "1w"])
def test_cli_rejects_bad_lifetimes(lifetime: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["certs", "issue", "--service", "chat", "--lifetime", lifetime])
    assert exc.value.code == 2
    capsys.readouterr()


def test_cli_show_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "show", str(tmp_path / "nope.pem")]) == 1
    assert "nope.pem" in capsys.readouterr().err


def test_cli_issue_with_invalid_service_name(tmp_path: Path, capsys) -> None:
    d = str(tmp_path)
    init_ca(tmp_path)
    assert main(["certs", "issue", "--dir", d, "--service", "Bad_Name", "--out", d]) == 2
    assert "invalid service" in capsys.readouterr().err


def test_written_files_survive_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        files = init_ca(tmp_path)
    finally:
        os.umask(old)
    assert _mode(files.bundle) == 0o644  # explicit modes, not the umask's


def test_a_backdated_certificate_does_not_verify(tmp_path: Path) -> None:
    files = init_ca(tmp_path)
    ca = files.load_authority()
    sid = CHAT
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    issued = ca.issue(build_csr(generate_key(), sid), sid, now=past, lifetime=dt.timedelta(hours=1))
    assert issued.not_after < dt.datetime.now(dt.UTC)
    with pytest.raises(BundleError):
        ca.bundle.verify(load_certificates(issued.chain_pem))


def test_interrupted_activate_is_refused_then_recovered_as_documented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = init_ca(tmp_path)
    rotate_prepare(tmp_path)
    real_replace, calls = os.replace, []

    def crash_after_three(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # the intermediate key: after its certificate
            raise OSError("crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_three)
    with pytest.raises(OSError):
        rotate_activate(tmp_path)
    monkeypatch.undo()
    with pytest.raises(CaError):  # new certificate, old key: refused, not used
        files.load_authority()

    # docs/security.md: copy previous/ back, delete it, activate again.
    for src, dst in zip(files.previous.pair_paths(), files.pair_paths(), strict=True):
        dst.write_bytes(src.read_bytes())
    shutil.rmtree(files.previous.directory)
    files.load_authority()
    rotate_activate(tmp_path)
    assert (
        files.load_authority().certificate
        != load_certificates(files.previous.ca_cert.read_bytes())[0]
    )
