"""The path authorization matches is the path the app gets: normalization, table-driven."""

from __future__ import annotations

import pytest

from lepton_mesh.proxy.errors import ProxyError
from lepton_mesh.proxy.security.inbound_policy import normalize_path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/", b"/"),
        (b"/v1/classify", b"/v1/classify"),
        (b"/v1/classify/", b"/v1/classify/"),
        (b"//admin", b"/admin"),
        (b"/a//b///c", b"/a/b/c"),
        (b"/a/./b", b"/a/b"),
        (b"/a/b/..", b"/a/"),
        (b"/x/../admin/secret", b"/admin/secret"),
        (b"/../../admin", b"/admin"),
        (b"/a/b/../../..", b"/"),
        (b"/.well-known/jwks.json", b"/.well-known/jwks.json"),
        (b"/a/..b/c", b"/a/..b/c"),
        (b"/%61dmin/secret", b"/admin/secret"),
        (b"/%2e%2e/admin", b"/admin"),
        (b"/x/%2E%2E/admin", b"/admin"),
        (b"/a%20b", b"/a%20b"),
        (b"/a%3ab", b"/a%3Ab"),
        (b"/caf%c3%a9", b"/caf%C3%A9"),
        (b"/a%7eb", b"/a~b"),
        (b"/a;v=1/b", b"/a;v=1/b"),  # matrix parameters on other segments are left alone
        (b"/a/..x;y/b", b"/a/..x;y/b"),
    ],
)
def test_normalize_path(path: bytes, expected: bytes):
    assert normalize_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        b"/admin%2Fsecret",
        b"/admin%2fsecret",
        b"/admin%5Csecret",
        b"/a\\b",
        b"/a%2",
        b"/a%zz",
        # Tomcat and other servlet containers strip `;params` before resolving dots.
        b"/public/..;/admin",
        b"/public/..;x/admin",
        b"/public/%2e%2e;/admin",
        b"/public/.;/admin",
        b"/public/..;",
    ],
)
def test_ambiguous_paths_are_refused(path: bytes):
    with pytest.raises(ProxyError) as err:
        normalize_path(path)
    assert err.value.status == 400
