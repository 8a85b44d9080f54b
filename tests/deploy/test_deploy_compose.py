"""deploy/compose/: the demo topology's structure, read without Docker.

What is checked: the file parses; every lepton-mesh container runs the one
image and a command the CLI accepts; control containers' LEPTON_* variables
are real flags and make valid options; every sidecar config exists and loads
(`lepton-mesh validate`), registers the address its callers dial (its compose
service's name), points at the control services on their real port, and
finds its bundle and join token under the volumes it mounts, with the names
init-secrets.sh writes; apps share their sidecar's network namespace and
listen where it forwards; no two listeners share a port in one network
namespace, and no host port is published twice.

What is not: the containers themselves (no Docker engine here).
test_deploy_compose_bootstrap.py runs the parts that are plain lepton-mesh
processes (init-secrets.sh, a control daemon, a sidecar) on this machine.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
from deploy_support import (
    COMPOSE,
    COMPOSE_DIR,
    IMAGE,
    REPO,
    assert_shell_syntax,
    compose,
    control_env_names,
    controls,
    lepton_services,
    mounts,
    parse_cli,
    port_of,
    python_snippets,
    runs_cli,
    services,
    sidecars,
    volume_at,
)


def sidecar_config(s: dict[str, Any]) -> Any:
    from lepton_mesh.policy.sidecar_loader import load_sidecar_config

    args = parse_cli(s["command"])
    source, inner = volume_at(s, args.config)
    assert source.startswith("./") and inner == ".", "the config is a file of deploy/compose"
    return load_sidecar_config(str(COMPOSE_DIR / source))


def test_every_lepton_container_is_the_one_image_built_from_the_dockerfile():
    for name, s in lepton_services().items():
        build = s["build"]
        assert (COMPOSE_DIR / build["context"]).resolve() == REPO, name
        assert (REPO / build["dockerfile"]).is_file(), name
    others = set(services()) - set(lepton_services())
    assert others == {"etcd"}


@pytest.mark.parametrize("name", sorted(n for n, s in services().items() if runs_cli(s)))
def test_commands_parse(name):
    s = services()[name]
    env = {k: str(v) for k, v in s.get("environment", {}).items()}
    args = parse_cli(s["command"], env)
    assert args.command in ("sidecar", "control", "apply")


def test_control_replicas_are_configured_by_real_flags():
    from lepton_mesh.control.daemon import options_from_args

    known = set(control_env_names().values())
    ids = set()
    assert len(controls()) == 2
    for name, s in controls().items():
        env = {k: str(v) for k, v in s["environment"].items()}
        assert set(env) <= known, f"{name}: not control flags: {set(env) - known}"
        options = options_from_args(parse_cli(s["command"], env))
        ids.add(options.replica_id)
        assert options.etcd == ("http://etcd:2379",)
        assert options.admin is not None and options.admin[0] == "0.0.0.0"
        # The CA and token key come from the volume lepton-init writes.
        for path in (env["LEPTON_CA_DIR"], env["LEPTON_TOKEN_KEY"]):
            assert volume_at(s, path)[0] == "lepton-ca"
        assert mounts(s)["/var/lib/lepton/ca"] == "lepton-ca"
        assert s["volumes"] == ["lepton-ca:/var/lib/lepton/ca:ro"]
        assert s["depends_on"]["lepton-init"]["condition"] == "service_completed_successfully"
    assert len(ids) == 2, "each replica names itself"


@pytest.mark.parametrize("name", sorted(sidecars()))
def test_sidecars_load_and_fit_the_topology(name):
    s = sidecars()[name]
    cfg = sidecar_config(s)
    # Callers dial the compose service that owns the network namespace.
    assert cfg.instance.address == name
    assert cfg.app.host == "127.0.0.1"
    assert cfg.listeners.admin.host == "127.0.0.1"
    # Every control replica, on the port it listens on.
    listen = {n: port_of(c["environment"]["LEPTON_LISTEN"]) for n, c in controls().items()}
    assert {(a.host, a.port) for a in cfg.control.addresses} == set(listen.items())
    # The bundle and the token are in the join volume, named as lepton-init writes them.
    assert volume_at(s, cfg.control.ca_bundle) == ("lepton-join", "bundle.pem")
    assert volume_at(s, cfg.control.token_file) == ("lepton-join", f"{cfg.service}.token")
    assert cfg.service in init_services()
    # Last-known-good lives in a volume of the sidecar's own.
    state, _ = volume_at(s, cfg.control.state_dir)
    assert state == f"{name}-state" and state in compose()["volumes"]
    assert cfg.tls is not None and cfg.tls.source == "control"


def init_services() -> list[str]:
    text = (COMPOSE_DIR / "init-secrets.sh").read_text()
    found = re.search(r"^SERVICES=\$\{SERVICES:-([^}]*)\}", text, re.M)
    assert found
    return found.group(1).split()


def test_every_service_with_a_sidecar_gets_a_join_token():
    assert sorted(init_services()) == sorted(
        {sidecar_config(s).service for s in sidecars().values()}
    )


def apps() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if "network_mode" in s}


@pytest.mark.parametrize("name", sorted(apps()))
def test_apps_share_their_sidecars_network_and_start_after_it(name):
    s = apps()[name]
    owner = s["network_mode"].removeprefix("service:")
    assert owner in sidecars()
    assert s["depends_on"] == {owner: {"condition": "service_healthy"}}
    assert s["entrypoint"] == ["python", "-m", "lepton_mesh.demo.apps"]
    cfg = sidecar_config(sidecars()[owner])
    command = s["command"]
    assert command[0] == cfg.service
    assert int(command[command.index("--port") + 1]) == cfg.app.port
    assert command[command.index("--host") + 1] == "127.0.0.1"
    if cfg.dependencies:
        outbound = command[command.index("--outbound") + 1]
        assert port_of(outbound) == cfg.listeners.outbound.port
    if "--version" in command:
        assert command[command.index("--version") + 1] == cfg.instance.labels["version"]
    assert "ports" not in s, "a shared network namespace publishes through its owner"


def test_every_sidecar_has_an_app():
    owners = Counter(s["network_mode"].removeprefix("service:") for s in apps().values())
    assert owners == Counter(list(sidecars()))


def test_no_port_is_used_twice():
    published = [p.rsplit(":", 1)[0] for s in services().values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))
    for name, s in sidecars().items():
        cfg = sidecar_config(s)
        in_netns = [
            cfg.listeners.outbound.port,
            cfg.listeners.inbound.port,
            cfg.listeners.admin.port,
            *(svc.listen.port for svc in cfg.services.values() if svc.listen),
            cfg.app.port,
        ]
        assert len(in_netns) == len(set(in_netns)), name
        for p in s.get("ports", []):
            assert int(p.rsplit(":", 1)[1]) == cfg.listeners.inbound.port, name


def test_health_checks_are_valid_python():
    for name, s in services().items():
        test = s.get("healthcheck", {}).get("test", [])
        for code in python_snippets(test[1:]):
            compile(code, f"{name} healthcheck", "exec")


def test_volumes_are_declared_and_host_paths_exist():
    declared = set(compose()["volumes"])
    for name, s in services().items():
        for source in mounts(s).values():
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: {source}"


def test_the_init_script_is_valid_sh_and_mounted():
    script = COMPOSE_DIR / "init-secrets.sh"
    assert_shell_syntax(script.read_text(), str(script))
    init = services()["lepton-init"]
    assert init["entrypoint"][0] == "/bin/sh"
    assert mounts(init)[init["entrypoint"][1]] == "./init-secrets.sh"
    assert {"lepton-ca", "lepton-join"} <= set(mounts(init).values())


def test_the_policies_step_applies_files_that_validate():
    from lepton_mesh.cli import main

    s = services()["policies"]
    args = parse_cli(s["command"])
    for path in args.paths:
        source, inner = volume_at(s, path)
        assert main(["validate", str(COMPOSE_DIR / source / inner)]) == 0
    assert volume_at(s, s["environment"]["LEPTON_CONFIG"])[0] == "lepton-ca"


def test_nothing_is_left_to_compose_interpolation_but_the_image():
    # `$` in a compose file is interpolated from the caller's environment.
    text = COMPOSE.read_text()
    found = set(re.findall(r"\$\{?[A-Za-z_][^}\s]*\}?", text))
    assert found == {IMAGE}
