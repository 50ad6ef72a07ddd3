"""deploy/ checked with public tools: shellcheck on every script, every Kubernetes manifest against the Kubernetes JSON
schemas (kubernetes-validate ships them: no network), `systemd-analyze verify` on the units, the Dockerfiles parsed and
held to the serving contract, and the GCE startup script run end to end against a local bucket until /ready answers."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.fixtures.server import free_port
from textmill.registry import Registry

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.37.0"
SERVING_DOCKERFILES = ["Dockerfile.serve-cpu", "Dockerfile.serve-cuda"]
DRAIN_TIMEOUT_S = 30
TEXTMILL = shutil.which("textmill") or str(Path(sys.executable).parent / "textmill")


def scripts() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and (p.suffix == ".sh" or p.read_bytes()[:2] == b"#!")
                  and b"python" not in p.read_bytes().split(b"\n", 1)[0])


# --- shell scripts ------------------------------------------------------------------------------------------------

def test_every_deploy_script_passes_shellcheck():
    found = scripts()
    assert DEPLOY / "gce" / "startup.sh" in found
    result = subprocess.run(["shellcheck", "--severity=style", *map(str, found)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_shellcheck_catches_a_broken_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $PREFIX/ cache\nif [ $x == 1 ] then echo; fi\n")
    assert subprocess.run(["shellcheck", str(bad)], capture_output=True).returncode != 0


# --- Kubernetes ---------------------------------------------------------------------------------------------------

def manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def test_every_manifest_validates_against_the_kubernetes_schemas():
    docs = manifests()
    assert {"deployment.yaml", "deployment-gpu.yaml", "service.yaml", "hpa.yaml", "pdb.yaml",
            "serviceaccount.yaml"} <= set(docs)
    for name, resources in docs.items():
        for resource in resources:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)   # raises ValidationError


def test_schema_validation_rejects_a_mistyped_probe():
    deployment = manifests()["deployment.yaml"][0]
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-gpu.yaml"])
def test_deployments_follow_the_serving_contract(name):
    docs = manifests()
    config = docs["configmap.yaml"][0]["data"]
    dep = docs[name][0]
    pod = dep["spec"]["template"]["spec"]
    init, serve = pod["initContainers"][0], pod["containers"][0]
    assert init["command"] == ["textmill", "sync"]
    assert serve["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/live"
    assert serve["startupProbe"]["httpGet"]["path"] in ("/ready", "/live")
    pre_stop = serve["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > float(config["TEXTMILL_DRAIN_TIMEOUT"]) + pre_stop
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pod["serviceAccountName"] == docs["serviceaccount.yaml"][0]["metadata"]["name"]
    assert "iam.gke.io/gcp-service-account" in docs["serviceaccount.yaml"][0]["metadata"]["annotations"]
    mounts = {m["mountPath"] for c in (init, serve) for m in c["volumeMounts"]}
    assert mounts == {config["TEXTMILL_CACHE_DIR"]}
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (docs["service.yaml"][0]["spec"]["selector"], docs["pdb.yaml"][0]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    gpu = serve["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpu == 1) == (name == "deployment-gpu.yaml")


def test_hpa_targets_a_deployment_that_exists():
    docs = manifests()
    target = docs["hpa.yaml"][0]["spec"]["scaleTargetRef"]
    names = {d["metadata"]["name"] for ds in docs.values() for d in ds if d["kind"] == "Deployment"}
    assert target["kind"] == "Deployment" and target["name"] in names


# --- systemd ------------------------------------------------------------------------------------------------------

def verify_units(folder: Path) -> subprocess.CompletedProcess:
    units = sorted(str(p) for p in folder.iterdir() if p.suffix in (".service", ".timer"))
    return subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, cwd=folder)


def local_units(tmp_path: Path) -> Path:
    """deploy/systemd with the install prefix's textmill replaced by this venv's (verify checks ExecStart exists)."""
    out = tmp_path / "units"
    out.mkdir()
    for unit in (DEPLOY / "systemd").iterdir():
        text = unit.read_text().replace("/opt/textmill/venv/bin/textmill", TEXTMILL)
        (out / unit.name).write_text(text.replace("/opt/textmill/repo", str(REPO)))
    return out


def test_systemd_units_verify(tmp_path):
    units = local_units(tmp_path)
    assert {p.name for p in units.iterdir()} >= {"textmill-serve.service", "textmill-retrain.service",
                                                 "textmill-retrain.timer"}
    result = verify_units(units)
    assert result.returncode == 0, result.stderr
    serve = (units / "textmill-serve.service").read_text()
    assert "Restart=always" in serve and re.search(r"^ExecStart=\S+ serve$", serve, re.M)
    assert int(re.search(r"^TimeoutStopSec=(\d+)", serve, re.M).group(1)) > DRAIN_TIMEOUT_S
    assert re.search(r"^ExecStart=\S+ retrain ", (units / "textmill-retrain.service").read_text(), re.M)


def test_systemd_verify_rejects_a_bad_calendar(tmp_path):
    units = local_units(tmp_path)
    timer = units / "textmill-retrain.timer"
    timer.write_text(re.sub(r"^OnCalendar=.*$", "OnCalendar=nightly at 3", timer.read_text(), flags=re.M))
    assert verify_units(units).returncode != 0


# --- Dockerfiles (hadolint is not packaged here: parse them) -----------------------------------------------------

def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "docker" / name).read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def exec_form(args: str) -> list[str]:
    return json.loads(args)


@pytest.mark.parametrize("name", ["Dockerfile.serve-cpu", "Dockerfile.serve-cuda", "Dockerfile.pipeline"])
def test_dockerfile_runs_as_non_root_and_copies_what_exists(name):
    steps = dockerfile(name)
    users = [a.strip() for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end on a non-root USER"
    run_text = " ".join(a for i, a in steps if i == "RUN")
    assert "useradd --system --uid 10001" in run_text
    for instruction, args in steps:
        if instruction == "COPY":
            *sources, _ = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY {src} does not exist in the repo"


@pytest.mark.parametrize("name", SERVING_DOCKERFILES)
def test_serving_images_follow_the_node_contract(name):
    steps = dockerfile(name)
    text = " ".join(a for _, a in steps).lower()
    assert "tensorflow" not in text and "[all]" not in text and '".[serve]"' in text
    assert exec_form(dict(steps)["ENTRYPOINT"]) == ["textmill", "serve"]
    assert exec_form(dict(steps)["VOLUME"]) == ["/models"]
    env = " ".join(a for i, a in steps if i == "ENV")
    assert "TEXTMILL_CACHE_DIR=/models" in env and "TEXTMILL_HOST=0.0.0.0" in env
    health = dict(steps)["HEALTHCHECK"]
    assert exec_form(health.split("CMD", 1)[1]) == ["textmill-healthcheck", "/live"]
    torch_index = re.search(r"download\.pytorch\.org/whl/(\S+?)\"?\s+torch==(\S+)", text)
    assert torch_index, "torch must come from the PyTorch index for the image's build (CPU or CUDA)"
    pinned = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert torch_index.group(2) == pinned


def test_cpu_image_can_build_the_native_kernels_and_serves_the_fast_precision():
    """serving/kernels compiles its C source on the node: the CPU image carries a C compiler and the C library's
    headers (and libmvec), and leaves serving.dtype at auto so the int8 path is what a node runs."""
    steps = dockerfile("Dockerfile.serve-cpu")
    run_text = " ".join(a for i, a in steps if i == "RUN")
    assert re.search(r"apt-get install -y --no-install-recommends [^&]*\bgcc\b[^&]*\blibc6-dev\b", run_text)
    env = " ".join(a for i, a in steps if i == "ENV")
    assert "TEXTMILL_DTYPE=auto" in env


def test_cuda_image_names_the_pascal_build_and_k80():
    text = (DEPLOY / "docker" / "Dockerfile.serve-cuda").read_text()
    assert "ARG TORCH_CUDA=cu126" in text and "P100" in text and "K80" in text


@pytest.mark.parametrize("name", ["Dockerfile.serve-cpu", "Dockerfile.serve-cuda", "Dockerfile.pipeline"])
def test_dockerfile_run_steps_pass_shellcheck(name, tmp_path):
    steps = dockerfile(name)
    args = {m.group(1): "x" for i, a in steps if i == "ARG" for m in [re.match(r"(\w+)", a)]}
    script = tmp_path / "steps.sh"
    body = "\n".join(a for i, a in steps if i == "RUN")
    script.write_text("#!/bin/sh\nset -e\n" + "".join(f"{k}={v}\n" for k in args for v in ["x"]) + body + "\n")
    result = subprocess.run(["shellcheck", "-s", "sh", "-e", "SC2034", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- GCE startup script, end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_bucket(tmp_path_factory, tiny_export):
    root = tmp_path_factory.mktemp("bucket") / "models"
    version = Registry(str(root)).publish("tiny", tiny_export, metrics={"val_loss": 5.0}, provenance={}, progress=False)
    return str(root), version.version


def healthcheck(url: str, path: str = "/live") -> int:
    return subprocess.run([sys.executable, str(DEPLOY / "docker" / "healthcheck.py"), path, "--url", url],
                          capture_output=True).returncode


def test_startup_script_runs_end_to_end_until_ready(local_bucket, tmp_path):
    root, version = local_bucket
    port = free_port()
    env = {**os.environ, "TEXTMILL_ROOT": root, "TEXTMILL_PORT": str(port), "TEXTMILL_HOST": "127.0.0.1",
           "TEXTMILL_DEVICE": "cpu", "TEXTMILL_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO),
           "PATH": f"{Path(TEXTMILL).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["bash", str(DEPLOY / "gce" / "startup.sh"), "--skip-install", "--foreground", "--no-metadata",
           "--prefix", str(tmp_path / "prefix"), "--unit-dir", str(tmp_path / "units"),
           "--env-file", str(tmp_path / "etc" / "serve.env")]
    log = open(tmp_path / "startup.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "startup.log").read_text()
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("not ready in 120 s:\n" + (tmp_path / "startup.log").read_text())
        # the cache was filled by `textmill sync` before the server started
        assert (tmp_path / "cache" / "tiny" / version / "model.safetensors").exists()
        assert "model cache filled" in (tmp_path / "startup.log").read_text()
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        assert [(m["id"], m["version"]) for m in models] == [("tiny", version)]
        assert healthcheck(url, "/live") == 0 and healthcheck(url, "/ready") == 0
        env_file = (tmp_path / "etc" / "serve.env").read_text()
        assert f"TEXTMILL_ROOT={root}\n" in env_file and f"TEXTMILL_PORT={port}\n" in env_file
        # the unit it would run under systemd: Restart=always, and it verifies
        unit = (tmp_path / "units" / "textmill-serve.service").read_text()
        assert "Restart=always" in unit and f"EnvironmentFile={tmp_path / 'etc' / 'serve.env'}" in unit
        assert re.search(rf"^ExecStart={re.escape(TEXTMILL)} serve$", unit, re.M)
        result = verify_units(tmp_path / "units")
        assert result.returncode == 0, result.stderr
    finally:
        proc.send_signal(signal.SIGTERM)   # exec'd: SIGTERM reaches textmill serve, which drains and exits 0
        code = proc.wait(60)
        log.close()
    assert code == 0, (tmp_path / "startup.log").read_text()
    assert healthcheck(url, "/live") == 1   # nothing listening: the container HEALTHCHECK fails


@pytest.mark.parametrize("env, message", [
    ({"TEXTMILL_ROOT": ""}, "no registry root"),
    ({"TEXTMILL_PORT": "80a"}, "is not a port number"),
])
def test_startup_script_refuses_bad_settings_in_one_line(tmp_path, env, message):
    full = {**os.environ, "TEXTMILL_ROOT": str(tmp_path), **env}
    result = subprocess.run(["bash", str(DEPLOY / "gce" / "startup.sh"), "--skip-install", "--foreground",
                             "--no-metadata", "--env-file", str(tmp_path / "serve.env")],
                            env=full, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
