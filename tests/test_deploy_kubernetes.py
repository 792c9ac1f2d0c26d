"""deploy/kubernetes/: the manifests validate offline (kubernetes-validate
--strict) and say what the DaemonSet promises: unprivileged, probes on
/healthz and /readyz, a grace period above drain + destroy, the metrics port
reachable in the pod, the privileged init container only when asked for."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiod.config import load

K8S = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
VERSIONS = ("1.29.0", "1.33.0")


def validator() -> str:
    for candidate in (Path(sys.executable).parent / "kubernetes-validate",
                      shutil.which("kubernetes-validate")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("kubernetes-validate is missing: it is in the test extras (make install)")


def validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([validator(), "--strict", "-k", version, str(path)],
                          capture_output=True, text=True, timeout=120)


def kustomization() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return doc


def resources() -> list[Path]:
    return [K8S / r for r in kustomization()["resources"]]


def daemonset() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / "daemonset.yaml").read_text())
    return doc


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch for what the component adds (new keys only)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    return patch


def with_component(name: str) -> dict[str, Any]:
    comp = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
    assert comp["kind"] == "Component"
    ds = copy.deepcopy(daemonset())
    for p in comp["patches"]:
        patch = yaml.safe_load((K8S / name / p["path"]).read_text())
        assert (patch["kind"], patch["metadata"]["name"]) == ("DaemonSet", "aiod")
        ds = merge(ds, patch)
    return ds


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    for path in resources():
        r = validate(path, version)
        assert r.returncode == 0 and "passed" in r.stdout, r.stdout + r.stderr


def test_strict_validation_catches_a_misspelled_field(tmp_path: Path) -> None:
    bad = tmp_path / "daemonset.yaml"
    bad.write_text((K8S / "daemonset.yaml").read_text()
                   .replace("readOnlyRootFilesystem", "readOnlyRootFilesytem"))
    r = validate(bad, VERSIONS[0])
    assert r.returncode != 0 and "readOnlyRootFilesytem" in r.stdout + r.stderr


def test_the_kustomization_names_files_that_exist() -> None:
    k = kustomization()
    for path in resources():
        assert path.is_file(), path
    for gen in k["configMapGenerator"]:
        for f in gen["files"]:
            assert (K8S / f).is_file(), f
    assert k["components"] == [], "the privileged init container must be off by default"
    assert (K8S / "init-sysctl" / "kustomization.yaml").is_file()
    names = {gen["name"] for gen in k["configMapGenerator"]}
    volumes = daemonset()["spec"]["template"]["spec"]["volumes"]
    assert {v["configMap"]["name"] for v in volumes if "configMap" in v} <= names


def test_the_pod_is_unprivileged() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    assert not spec.get("hostPID") and not spec.get("hostNetwork") and not spec.get("hostIPC")
    assert "initContainers" not in spec
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 65534
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged")
    assert spec["automountServiceAccountToken"] is False


def test_probes_port_and_grace_period_match_the_config() -> None:
    cfg = load(K8S / "aiod.yaml")
    spec = daemonset()["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["args"] == ["run", "--config", "/etc/aiod/aiod.yaml"]
    (port,) = c["ports"]
    # reachable from the Service and the kubelet: not loopback
    assert cfg.metrics.host == "0.0.0.0" and port["containerPort"] == cfg.metrics.port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    drain_destroy = cfg.shutdown.drain_timeout + cfg.shutdown.destroy_timeout
    assert spec["terminationGracePeriodSeconds"] > drain_destroy
    service = yaml.safe_load((K8S / "service.yaml").read_text())
    (sp,) = service["spec"]["ports"]
    assert sp["targetPort"] == port["name"] and sp["port"] == cfg.metrics.port
    assert service["spec"]["selector"] == daemonset()["spec"]["selector"]["matchLabels"]


def test_the_image_tag_is_aiod_s_version() -> None:
    from aiod import __version__
    (image,) = kustomization()["images"]
    assert image == {"name": "aiod", "newTag": __version__}
    (c,) = daemonset()["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"aiod:{__version__}"
    assert "ENTRYPOINT [\"/opt/aiod/bin/aiod\"]" in (K8S.parent / "Containerfile").read_text()


def test_probe_targets_live_on_a_host_path() -> None:
    cfg = load(K8S / "aiod.yaml")
    spec = daemonset()["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    state = [n for n, p in mounts.items() if Path(p) == cfg.state_directory]
    assert state and "hostPath" in vols[state[0]]
    for job in cfg.jobs:
        assert job.target.is_relative_to(cfg.state_directory), job.target


def test_the_optional_init_container_validates_and_raises_aio_max_nr(tmp_path: Path) -> None:
    ds = with_component("init-sysctl")
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    assert init["securityContext"]["privileged"] is True
    assert "/proc/sys/fs/aio-max-nr" in " ".join(init["command"])
    out = tmp_path / "daemonset-with-init.yaml"
    out.write_text(yaml.safe_dump(ds))
    r = validate(out, VERSIONS[0])
    assert r.returncode == 0, r.stdout + r.stderr
