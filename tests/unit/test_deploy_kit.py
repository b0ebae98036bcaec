"""The site kit (deploy/) agrees with the code: image names, ports, node-config keys, file
names. No Docker engine runs on the CI machine, so this is checked by reading the files (and
the image build's refusal to start where no container can, against a fake Podman)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import fedpriv
from fedpriv.client.site import SITE_KEYS, SiteSettings, load_site_file
from fedpriv.privacy.he import SECRET_FILE

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGES = {f"fedpriv/superlink:{fedpriv.__version__}", f"fedpriv/supernode:{fedpriv.__version__}"}


def _node_config(text: str) -> dict[str, Any]:
    """Parse Flower's 'key=value key=value' node config (TOML values)."""
    return tomllib.loads("\n".join(shlex.split(text, posix=False)))


def _flag(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]
    raise AssertionError(f"{name} not in {args}")


def _defaults(text: str) -> str:
    """Compose's ``${NAME:-default}`` read with its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def _source(mounts: dict[str, str], path: str) -> str:
    """The host path a container path comes from, through the deepest mount above it."""
    target = max((t for t in mounts if path == t or path.startswith(t.rstrip("/") + "/")), key=len)
    return mounts[target] + path[len(target) :]


def test_images_are_built_with_the_makefiles_torch_and_tagged_as_the_kit_uses() -> None:
    build = (DEPLOY / "build-images.sh").read_text()
    makefile_torch = re.search(r"TORCH \?= (\S+)", (ROOT / "Makefile").read_text())
    assert makefile_torch
    assert f'TORCH="${{TORCH:-{makefile_torch.group(1)}}}"' in build
    assert f'IMAGE_TAG="${{IMAGE_TAG:-{fedpriv.__version__}}}"' in build
    assert 'image="fedpriv/$role:$IMAGE_TAG"' in build
    for role in ("superlink", "supernode"):
        text = (DEPLOY / f"{role}.Dockerfile").read_text()
        assert f'ARG TORCH="{makefile_torch.group(1)}"' in text
        assert "ARG BASE_IMAGE=" in text and "FROM ${BASE_IMAGE}" in text
        # the containers run as the fixed unprivileged user the site's files are given to
        assert "USER ${APP_UID}:${APP_UID}" in text
    # only the coordinator listens; a hospital's SuperNode only connects out
    assert "EXPOSE" not in (DEPLOY / "supernode.Dockerfile").read_text()


def test_compose_pilot_matches_the_code() -> None:
    compose = yaml.safe_load(_defaults((DEPLOY / "compose.yaml").read_text()))
    services = compose["services"]
    superlink_cmd = (DEPLOY / "superlink.Dockerfile").read_text()
    port = re.search(r'"--port", "(\d+)"', superlink_cmd).group(1)  # type: ignore[union-attr]
    assert services["superlink"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert {s["image"] for s in services.values()} == IMAGES
    hospitals = [name for name in services if name != "superlink"]
    assert len(hospitals) == 3
    for name in hospitals:
        args = services[name]["command"]
        assert _flag(args, "--superlink") == f"superlink:{port}"
        config = _node_config(args[args.index("--node-config") + 1])
        assert set(config) <= set(SITE_KEYS)
        site = SiteSettings.from_node_config(config)
        assert site.hospital_name == name and site.require_dp
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        # every path the node config names is mounted, from this hospital's own files
        _source(mounts, str(site.data_path))
        _source(mounts, str(site.ledger_path))
        assert _source(mounts, str(site.he_secret_context)).endswith(f"{name}/he/{SECRET_FILE}")
        assert f"/{name}/" in _source(mounts, _flag(args, "--auth-supernode-private-key"))
        assert _source(mounts, _flag(args, "--root-certificates")).endswith("ca.crt")
    link_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["superlink"]["volumes"]}
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        target = re.search(rf'"{flag}", "([^"]+)"', superlink_cmd).group(1)  # type: ignore[union-attr]
        assert _source(link_mounts, target).startswith(link_mounts["/certs"])
    # the coordinator gets its own copy of the public CKKS context, never a hospital's
    assert link_mounts["/he"].endswith("mounts/superlink/he")


@pytest.mark.parametrize("manifest", ["coordinator.yaml", "hospital.yaml"])
def test_kubernetes_manifests_match_the_code(manifest: str) -> None:
    documents = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / manifest).read_text()) if d]
    kinds = {d["kind"] for d in documents}
    assert "Deployment" in kinds
    superlink_cmd = (DEPLOY / "superlink.Dockerfile").read_text()
    port = int(re.search(r'"--port", "(\d+)"', superlink_cmd).group(1))  # type: ignore[union-attr]
    for document in documents:
        if document["kind"] == "Deployment":
            (container,) = document["spec"]["template"]["spec"]["containers"]
            assert container["image"] in IMAGES
            if manifest == "coordinator.yaml":
                assert int(_flag(container["args"], "--port")) == port
                assert container["ports"][0]["containerPort"] == port
            else:
                assert _flag(container["args"], "--superlink").endswith(f":{port}")
        if document["kind"] == "Service":
            assert document["spec"]["ports"][0]["port"] == port
        if document["kind"] == "ConfigMap":
            config = _node_config(document["data"]["node-config"])
            assert set(config) <= set(SITE_KEYS)
            SiteSettings.from_node_config(config)


def test_the_example_site_settings_are_valid_keys() -> None:
    settings = load_site_file(DEPLOY / "site.example.toml")
    assert set(settings) == set(SITE_KEYS)
    site = SiteSettings.from_node_config(settings)
    assert site.require_dp and site.budget_epsilon > 0


def test_the_image_build_skips_saying_why_where_no_container_starts(tmp_path: Path) -> None:
    """A host where Podman answers but its runtime cannot start a container (crun on hybrid
    cgroups, as on this project's VMs without runc): the build says so and how to mend it,
    and skips (exit 0; 1 with KIT_REQUIRE=1) instead of failing half-way through a build."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "podman"  # answers `info` and `image exists`; cannot `run`
    fake.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = run ] && { echo "Error: OCI runtime error: crun: cgroups '
        'in hybrid mode not supported, drop all controllers from cgroupv2" >&2; exit 126; }; '
        "done\nexit 0\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "KIT_RUNTIME": "crun"}
    done = subprocess.run(
        ["bash", str(DEPLOY / "build-images.sh")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "SKIP: containers do not start here" in done.stderr
    assert "apt-get install runc" in done.stderr
    required = subprocess.run(
        ["bash", str(DEPLOY / "build-images.sh")],
        capture_output=True,
        text=True,
        env={**env, "KIT_REQUIRE": "1"},
    )
    assert required.returncode == 1 and "SKIP" in required.stderr
